"""
Stage 2 — Generation for Understanding: GRPO on the encoder (docs/algorithm.md §4).

The LVLM pi_phi (a fresh LoRA on its language model) captions each image G times; the frozen
pre-stage environment (same LVLM with the adapter off -> projector g -> DiT -> VAE) redraws the
image from each caption alone; the reward is cos(f_I(x), f_I(x~)); GRPO raises the likelihood of
captions that redraw better than their group.

Launch (tiny, on a CPU, after stage1_coldstart.py's tiny lines; then Qwen2.5-VL-3B + SD3.5-large on 8 x 80 GB):
  python stage2_grpo_und.py --init out/stage1 --data data/shapes/train/captions.jsonl --resolution 64 --reward pixel \
      --steps 4 --G 4 --batch_size 2 --max_new_tokens 16 --sample_steps 4 --cfg 1.0 --lr 5e-3 --out_dir out/stage2
  torchrun --nproc_per_node=8 stage2_grpo_und.py --init out/stage1 --data images/ --reward clip --resolution 512 \
      --G 8 --batch_size 1 --micro_batch 4 --max_new_tokens 512 --sample_steps 20 --cfg 5.0 --lr 1e-5 \
      --dtype bf16 --grad_ckpt --out_dir out/stage2

Where this departs from the paper (which gives no RL hyper-parameters) and from TRL's GRPO
(why: docs/algorithm.md §4):
1. Defaults are TRL/DeepSeek's (G 8, temperature 1, eps 0.2, beta 0.04, mu 1); the paper gives none.
2. Loss aggregation defaults to token-level ("dapo"): per-sequence means ("grpo") are biased against long
   captions, the very thing the aha moment is about; "dr_grpo" divides by G * max_new_tokens.
3. The condition is the caption re-encoded by the *pre-stage* encoder (adapter off): the environment
   does not move while the policy learns.
4. The redraw is a deterministic Euler ODE from one noise per group, so rewards compare captions.
5. Advantages use a std floor (CLIP rewards are continuous; groups can be nearly flat).
6. One flat all-reduce of the LoRA gradients, not DDP; the "dapo" token count is all-reduced, so
   2 ranks == 1 rank with the same global batch.
7. --seed_per_group: each group sampled under its own seed (reproducible across rank counts); off by default.
8. --eval_every: a fixed evaluation (same images, caption seeds, noise) the curve can be read from.
"""
import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

import images
import model as M
import runs
import training as T
from runs import arg


@dataclass
class Args:
    preset: str = arg("tiny", "base models when --init is empty: tiny | real")
    encoder: str = arg("", "override the LVLM (local dir or hub id)")
    decoder: str = arg("", "override the SD3 decoder (local dir or hub id)")
    init: str = arg("", "checkpoint to start from (a stage-1 out_dir, or released:DIR: the authors' release)")
    data: str = arg("", "folder of images or .jsonl of {image, caption}")
    out_dir: str = arg("out/stage2", "checkpoints, log.jsonl, samples/")
    reward: str = arg("clip", "reward (reward.py): a backbone (clip | longclip | dinov2 | dinov3 | pixel) or module:function")
    reward_path: str = arg("", "the backbone's weights ('' = its real default; 'tiny' = seeded random tiny weights)")
    resolution: int = arg(512, "image side for the source and the reconstruction")
    # GRPO (docs/algorithm.md §4)
    G: int = arg(8, "captions per image (group size)")
    batch_size: int = arg(1, "images per rank per step (rollout batch = batch_size*G)")
    micro_batch: int = arg(8, "captions per policy forward/backward")
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = arg(1.0, "nucleus sampling: must stay 1 (a truncation is not in the scored log-probs)")
    top_k: int = arg(0, "top-k sampling: must stay 0 (same reason)")
    max_new_tokens: int = arg(512, "caption length cap")
    instruction: str = arg("", "captioning instruction ('' = model.INSTRUCTION, 'released' = the release's, "
                               "model.RELEASED_INSTRUCTION, or the text itself)")
    instruction_first: bool = arg(False, "the instruction before the image in the user turn (the release's order)")
    eps_low: float = arg(0.2, "clip range below 1")
    eps_high: float = arg(0.2, "clip range above 1 (DAPO uses 0.28)")
    beta: float = arg(0.04, "k3 KL weight against the adapter-off reference")
    mu: int = arg(1, "num_iterations: policy updates per rollout batch")
    scale_rewards: str = arg("group", "group | batch | none: divide advantages by this std")
    std_floor: float = arg(1e-2, "advantage denominator is max(std, std_floor) + 1e-4")
    loss_agg: str = arg("dapo", "dapo (token mean) | grpo (sequence mean) | dr_grpo")
    seed_per_group: bool = arg(False, "seed each group's sampling (reproducible across rank counts)")
    # environment (frozen decoder)
    sample_steps: int = arg(20, "Euler steps of the reconstruction")
    cfg: float = arg(5.0, "classifier-free guidance of the reconstruction")
    # optimisation
    lora_r: int = arg(32, "LoRA rank (released UAE: 32)")
    lora_alpha: int = arg(64, "LoRA alpha (released UAE: 64)")
    lr: float = arg(1e-5, "AdamW learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup: int = arg(0, "linear warmup steps")
    schedule: str = arg("constant", "constant | cosine")
    grad_clip: float = arg(1.0, "max grad norm")
    steps: int = arg(500, "optimizer steps (rollout batches)")
    dtype: str = arg("fp32", "fp32 | bf16: one dtype for sampling and training")
    grad_ckpt: bool = arg(False, "gradient checkpointing in the policy forward")
    fsdp: bool = arg(False, "shard the environment's frozen DiT per block with FSDP2 (training.fsdp_shard); "
                            "the encoder stays replicated; needs --eval_images >= ranks")
    seed: int = arg(0, "global seed (ranks offset it)")
    dist_timeout: float = arg(T.DIST_TIMEOUT_MIN, "torchrun: minutes a collective waits for every rank; "
                                                  "then the job ends, naming the ranks that did not arrive")
    step_offset: int = arg(0, "draw the data and every per-step seed of steps N+1.. (the log still counts from 1): a run "
                              "chained after another with --init continues its batches (Unified-GRPO in rounds)")
    # logging / checkpoints
    eval_every: int = arg(0, "fixed eval before step 1, every N steps and at the end (0 = never)")
    eval_images: int = arg(8, "images in the fixed eval (the first of --eval_data)")
    eval_G: int = arg(4, "captions per eval image (seeded per image, same every eval)")
    eval_data: str = arg("", "eval images: folder or .jsonl ('' = --data; a held-out split is better)")
    log_every: int = arg(1, "log line every N steps")
    save_every: int = arg(100, "checkpoint every N steps (and at the end)")
    sample_every: int = arg(50, "write samples/step*.png + .jsonl every N steps (0 = never)")
    resume: bool = arg(False, "continue from out_dir/ckpt exactly (fresh start if there is none); "
                              "flags that change the optimisation must be the saved ones")
    overwrite: bool = arg(False, "start over in an out_dir that holds a run (its log, checkpoint, samples/ are deleted)")
    max_pixels: int = arg(images.MAX_PIXELS, "refuse images of more pixels (read from the header, never decoded)")
    wandb: str = arg("", "wandb project ('' = off)")
    tensorboard: bool = arg(False, "write tensorboard events to out_dir/tb")


# ----------------------------------------------------------------------------------------------
# The pure pieces of GRPO (tests import these).

def group_advantages(r, G, *, scale="group", std_floor=1e-2, eps=1e-4):
    """docs/algorithm.md §4: A_i = (r_i - mean_G r) / (max(std_G r, floor) + eps). r (N,) with rows
    grouped G at a time -> (N,). scale: group | batch (std over the whole batch) | none (no division).
    std is the sample std (ddof 1), as TRL's GRPO; stage 3's twin uses the population std, as
    Flow-GRPO. A flat group gives 0, not NaN."""
    rg = r.view(-1, G)                                  # (B, G)
    centred = rg - rg.mean(1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    if scale not in ("group", "batch"):
        raise ValueError(f"--scale_rewards must be group | batch | none, got {scale!r}")
    std = rg.std(1, keepdim=True) if scale == "group" else r.std().expand(rg.shape[0], 1)
    if G == 1 or (scale == "batch" and r.numel() == 1):
        std = torch.zeros_like(std)
    denom = std.clamp_min(std_floor) + eps
    return torch.where(denom > 0, centred / denom, torch.zeros_like(centred)).flatten()


def k3_kl(logp, ref_logp):
    """docs/algorithm.md §4: KL_t = exp(ref - logp) - (ref - logp) - 1 >= 0 (k3 estimator), per token."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp, logp_old, adv, eps_low=0.2, eps_high=0.2, ref_logp=None, beta=0.0):
    """docs/algorithm.md §4 per-token loss: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta KL_t.
    logp, logp_old, ref_logp (N, T); adv (N,). Returns (loss (N, T), ratio (N, T), kl or None)."""
    ratio = torch.exp(logp - logp_old)                  # rho_t = pi / pi_old
    A = adv[:, None]
    loss = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    kl = None
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return loss, ratio, kl


def aggregate(loss_tok, mask, mode, n_seqs, n_tokens, max_len):
    """This micro-batch's share of the batch loss. mode: dapo = sum / tokens of the batch,
    grpo = mean over sequences of the per-sequence token mean, dr_grpo = sum / (N * max_len)."""
    if mode == "dapo":
        return (loss_tok * mask).sum() / n_tokens
    if mode == "grpo":
        return ((loss_tok * mask).sum(1) / mask.sum(1).clamp_min(1)).sum() / n_seqs
    if mode == "dr_grpo":
        return (loss_tok * mask).sum() / (n_seqs * max_len)
    raise ValueError(f"--loss_agg must be dapo | grpo | dr_grpo, got {mode!r}")


def group_noise(shape, seed, step, group_ids, device):
    """One initial noise per group, drawn from (seed, step, global group id): the G captions of a
    group share it, and it does not depend on how groups are split over ranks."""
    return torch.stack([torch.randn(shape, generator=T.generator(seed, step, g, "group_noise")) for g in group_ids]).to(device)


@torch.no_grad()
def reconstruct(m, texts, noise, neg, args):
    """The environment: c = g(H(y)) with the pre-stage encoder (adapter off), Euler ODE from the
    given noise, VAE decode. texts: N captions, noise (N, C, h, w) -> images (N, 3, H, W)."""
    with M.adapters_disabled(m.encoder):
        cond = m.condition(texts)                                             # (N, L, D)
    return m.vae_decode(m.sample_ode(noise, cond, neg, args.sample_steps, args.cfg))


# ----------------------------------------------------------------------------------------------

def validate(args):
    """Every flag, the data and a resume's compatibility, before anything is loaded or written
    (training.validate_run does the shared part). A user error raises training.UsageError."""
    if not args.data:
        raise runs.UsageError(runs.no_data("python stage2_grpo_und.py --data data/shapes/train/captions.jsonl --resolution 64 "
                                     "--reward pixel --G 4 --batch_size 2 --max_new_tokens 24 --sample_steps 6 --cfg 1.0 "
                                     "--steps 10 --lr 5e-3"))
    runs.at_least(args, 2, "G", why="a group of one caption has advantage 0: nothing can learn")
    runs.at_least(args, 1, "batch_size", "micro_batch", "mu", "sample_steps", "eval_images", "eval_G")
    runs.at_least(args, 0, "eps_low", "eps_high", "beta", "std_floor", "eval_every", "step_offset")
    runs.above(args, 0, "temperature", why="at 0 the G captions of a group are identical: nothing can learn")
    runs.need(args.top_p == 1 and args.top_k == 0,  # sampling would not draw from the distribution completion_logprobs scores
           f"--top_p {args.top_p} / --top_k {args.top_k}: GRPO scores the untruncated distribution; "
           "use --top_p 1 --top_k 0 (lower --temperature to sharpen sampling)")
    runs.need(args.eps_low < 1, f"--eps_low {args.eps_low}: must be < 1")
    runs.finite(args, "cfg")
    runs.one_of(args, "loss_agg", ("dapo", "grpo", "dr_grpo"))
    runs.one_of(args, "scale_rewards", ("group", "batch", "none"))
    data = [("data", False)] + ([("eval_data", False)] if args.eval_every and args.eval_data else [])
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    runs.need(not (args.fsdp and args.eval_every and args.eval_images < world),  # FSDP: every DiT call is collective
           f"--fsdp: every rank takes part in each DiT call; --eval_images {args.eval_images} is below the {world} ranks")
    return runs.validate_run(args, "stage2", size=args.resolution, datasets=data)


def main(argv=None):
    args = validate(runs.parse_args(Args, argv))
    rank, world, device = T.dist_setup(args.seed, args.dist_timeout)
    master = rank == 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ds = images.ImageDataset(args.data, args.resolution)
    m, lora_cfg = setup(args, dtype, device)
    if args.fsdp:  # FSDP2 over the environment's DiT blocks; every rank then runs every DiT call
        T.fsdp_shard(m, ("transformer",), dtype, world)
    torch.manual_seed(args.seed + rank)  # unseeded draws (batched sampling) differ by rank
    params = [p for p in m.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.fsdp:
        T.fsdp_track(opt, m)
    reward = runs.load_reward(args.reward, args.reward_path, device)               # R(x, x~), frozen
    with torch.no_grad(), M.adapters_disabled(m.encoder):
        neg = m.condition([M.NEGATIVE_PROMPT])  # the environment's: pre-stage weights, adapter off (as on resume)
    step, _, log = runs.start(args, opt, rank, world)                               # --resume: optimizer, RNG
    if master:
        print(f"stage 2: {len(ds)} images, {world} rank(s), {args.batch_size}x{args.G} captions/rank/step, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable LoRA params, dtype {args.dtype}")
    G, skipped, ev = args.G, 0, {}
    if args.eval_every:
        ev["ds"] = images.ImageDataset(args.eval_data, args.resolution) if args.eval_data else ds
        if not args.resume:
            log.log(step, evaluate(m, ev, neg, reward, args, rank, world, device))
    pbar = tqdm(total=args.steps, initial=step, disable=not master, desc="stage2")
    while step < args.steps:
        clock = T.Clock()
        t = step + args.step_offset                                              # the step that draws: data, seeds
        idx = T.batch_indices(len(ds), args.batch_size, t, args.seed, rank, world)
        gids = [t * args.batch_size * world + rank * args.batch_size + b for b in range(args.batch_size)]
        x, _, names = ds.batch(idx)
        x = x.to(device)                                                         # (B, 3, H, W)
        # 1. Rollout: G captions per image from pi_old = the current policy, one KV-cached batched decode
        m.eval()
        gen = dict(G=G, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, instruction=M.instruction_text(args.instruction),
                   instruction_first=args.instruction_first)
        if args.seed_per_group:
            roll = m.sample_captions_seeded(x, [T.seed_of(args.seed, gid, "caption") for gid in gids], **gen)
        else:
            roll = m.sample_captions(x, **gen)                                    # N = B*G rows
        clock.tick("generate")
        # 2. Environment: c = g(H(y)) with the pre-stage encoder, ODE redraw from one noise per group
        noise = group_noise(m.latent_shape(args.resolution, args.resolution), args.seed, t, gids, device)
        recon = reconstruct(m, roll.texts, noise.repeat_interleave(G, 0), neg, args)   # (N, 3, H, W)
        clock.tick("reconstruct")
        # 3. Reward: r_i = R(x, x~_i), e.g. cos(f(x), f(x~_i)), no grad
        with torch.no_grad():
            r = reward(x.repeat_interleave(G, 0), recon, roll.texts)              # (N,)
        clock.tick("reward")
        # 4. Advantage: A_i = (r_i - mean_G r) / (max(std, floor) + eps), groups live on this rank
        mask = roll.completion_mask                                               # (N, T)
        N = mask.shape[0]
        adv = group_advantages(T.gather(r, world), G, scale=args.scale_rewards,   # gathered: batch std over ranks
                               std_floor=args.std_floor)[rank * N:(rank + 1) * N]  # (N,)
        n_tok = T.allreduce_metrics({"n": mask.sum().item()}, world)["n"]          # mean tokens per rank
        # 5. Log-probs: old (only when mu > 1, else logp.detach()) and reference (adapter off), no grad
        mbs = [(i, min(i + args.micro_batch, N)) for i in range(0, N, args.micro_batch)]
        old, ref = [None] * len(mbs), [None] * len(mbs)
        with torch.no_grad():
            for k, (i, j) in enumerate(mbs):
                if args.mu > 1:
                    old[k] = m.completion_logprobs(roll.rows(i, j), args.temperature)
                if args.beta > 0:
                    with M.adapters_disabled(m.encoder):
                        ref[k] = m.completion_logprobs(roll.rows(i, j), args.temperature)
        clock.tick("reference")
        m.train()
        lr = T.lr_at(step, args.lr, args.warmup, args.steps, args.schedule)
        for g_ in opt.param_groups:
            g_["lr"] = lr
        bad, first, gnorm = not torch.isfinite(r).all().item(), [], 0.0
        for it in range(args.mu):
            for k, (i, j) in enumerate(mbs):
                if bad:
                    break
                sub = roll.rows(i, j)
                logp, ent = m.completion_logprobs(sub, args.temperature, with_entropy=True)   # (n, T)
                logp_old = old[k] if old[k] is not None else logp.detach()
                # 6. Token loss: -min(rho A, clip(rho) A) + beta KL_t (k3, against the adapter-off model)
                loss_tok, ratio, kl = grpo_token_loss(logp, logp_old, adv[i:j], args.eps_low, args.eps_high, ref[k], args.beta)
                # 7. Aggregate: this micro-batch's share of the batch loss (dapo | grpo | dr_grpo)
                loss = aggregate(loss_tok, sub.completion_mask, args.loss_agg, N, n_tok, args.max_new_tokens)
                if not torch.isfinite(loss):
                    bad = True
                    break
                loss.backward()
                if it == 0:  # statistics of the first (on-policy) pass
                    first.append((loss.detach(), ent, ratio.detach(), kl, sub.completion_mask))
            # 8. Step: skip agreed on every rank, gradients all-reduced, clipped, AdamW
            gnorm, skip = T.optimizer_step(params, opt, world, args.grad_clip, bad)
            if skip:
                skipped += 1
                break
        clock.tick("train")
        step += 1
        met = step_metrics(r, roll, first, n_tok, G, args, gnorm, lr, skipped, clock, world)
        bad_files = T.all_bad_files(ds.bad, world)                                # run-wide: every rank's
        if bad_files:
            met["data/bad_files"] = len(bad_files)
        log.log(step, met, log_line(step, met) if step % args.log_every == 0 else None)
        pbar.update(1)
        if master and args.sample_every and step % args.sample_every == 0:
            write_samples(args.out_dir, step, x, recon, roll.texts, r, G, names)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.log(step, evaluate(m, ev, neg, reward, args, rank, world, device))
        if step % args.save_every == 0 or step == args.steps:
            runs.save(args, m, step, opt, {"encoder": lora_cfg}, rank, world, "stage2")
    pbar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return m


# ----------------------------------------------------------------------------------------------
# Helpers of main: set-up, metrics, evaluation, samples.

def setup(args, dtype, device):
    """The policy: pre-stage weights merged, this stage's encoder LoRA live (fresh, the same on
    every rank; or the checkpoint's with --resume). -> (m, lora_cfg)."""
    if args.resume:
        m = runs.load_model(init=args.out_dir, dtype=dtype, device=device, resume=True)
        lora_cfg = runs.live_lora(args.out_dir)["encoder"]
    else:
        m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                       decoder=args.decoder or None, dtype=dtype, device=device)
        torch.manual_seed(args.seed)  # the same fresh adapter on every rank
        lora_cfg = M.add_lora(m.encoder, args.lora_r, args.lora_alpha, M.ENCODER_LORA_TARGETS)
    m.to(device).precision(dtype)  # the LoRA in fp32, frozen weights in --dtype (docs/algorithm.md §8)
    if args.grad_ckpt:
        if hasattr(m.encoder, "activation_checkpointing_enable"):  # transformers >= 5.x name
            m.encoder.activation_checkpointing_enable({"use_reentrant": False})
        else:
            m.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m, lora_cfg


def step_metrics(r, roll, first, n_tok, G, args, gnorm, lr, skipped, clock, world):
    """The aha-moment signals (caption length, reward) and the first pass's loss statistics,
    token-weighted, all-reduced over ranks."""
    N = r.shape[0]
    lens = roll.completion_mask.sum(1)
    words = torch.tensor([float(len(t.split())) for t in roll.texts])
    rg = r.view(-1, G)
    st = {"loss": 0.0, "entropy": 0.0, "clipfrac": 0.0, "kl": 0.0, "ratio_max": 0.0, "ratio_min": 1e9}
    for loss, ent, ratio, kl, mk in first:
        st["loss"] += loss.item()
        st["entropy"] += ((ent * mk).sum() / n_tok).item()
        clipped = ((ratio < 1 - args.eps_low) | (ratio > 1 + args.eps_high)).float()
        st["clipfrac"] += ((clipped * mk).sum() / n_tok).item()
        if kl is not None:
            st["kl"] += ((kl.detach() * mk).sum() / n_tok).item()
        rm = ratio[mk.bool()]
        st["ratio_max"] = max(st["ratio_max"], rm.max().item() if rm.numel() else 1.0)
        st["ratio_min"] = min(st["ratio_min"], rm.min().item() if rm.numel() else 1.0)
    met = {"reward/mean": r.mean().item(), "reward/std": r.std().item() if N > 1 else 0.0,
           "reward/flat_group_frac": (rg.std(1) < args.std_floor).float().mean().item() if G > 1 else 1.0,
           "caption/tokens_mean": lens.float().mean().item(), "caption/tokens_max": lens.max().item(),
           "caption/words_mean": words.mean().item(), "caption/words_max": words.max().item(),
           "caption/truncated_frac": roll.truncated.float().mean().item(),
           "loss/policy": st["loss"], "loss/kl": st["kl"], "loss/clipfrac": st["clipfrac"],
           "loss/entropy": st["entropy"], "ratio/max": st["ratio_max"], "ratio/min": st["ratio_min"],
           "grad_norm": gnorm or 0.0, "lr": lr, "skipped": float(skipped),
           **clock.times, "time/step": clock.total()}
    ops = {"caption/tokens_max": "max", "caption/words_max": "max", "ratio/max": "max", "ratio/min": "min",
           "skipped": "max", "time/step": "max"}
    return T.allreduce_metrics(met, world, ops)


def log_line(step, met):
    return (f"step {step:5d} | reward {met['reward/mean']:.4f} ± {met['reward/std']:.4f} | len {met['caption/tokens_mean']:6.1f} tok "
            f"{met['caption/words_mean']:5.1f} w | kl {met['loss/kl']:.4f} | clip {met['loss/clipfrac']:.3f} | "
            f"ent {met['loss/entropy']:.3f} | gnorm {met['grad_norm']:.3f} | {met['time/step']:.2f}s")


@torch.no_grad()
def evaluate(m, ev, neg, reward, args, rank, world, device):
    """Fixed evaluation of the current policy: image i < eval_images (i mod len(eval data); split over
    ranks) gets eval_G captions sampled under a seed of its own and one noise of its own, the same at every
    evaluation. -> {"eval/reward", "eval/words_mean", "eval/tokens_mean"}: means over all eval captions."""
    ids = [i for i in range(args.eval_images) if i % world == rank]
    tot = {"r": 0.0, "w": 0.0, "t": 0.0, "n": 0.0}
    if ids:
        if "x" not in ev:
            x, _, _ = ev["ds"].batch([i % len(ev["ds"]) for i in ids])
            ev["x"] = x.to(device)
            ev["noise"] = group_noise(m.latent_shape(args.resolution, args.resolution), args.seed, "eval", ids, device)
        m.eval()
        roll = m.sample_captions_seeded(ev["x"], [T.seed_of(args.seed, i, "eval_caption") for i in ids], G=args.eval_G,
                                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens,
                                        instruction=M.instruction_text(args.instruction),
                                        instruction_first=args.instruction_first)
        recon = reconstruct(m, roll.texts, ev["noise"].repeat_interleave(args.eval_G, 0), neg, args)
        r = reward(ev["x"].repeat_interleave(args.eval_G, 0), recon, roll.texts)
        tot = {"r": r.sum().item(), "w": float(sum(len(t.split()) for t in roll.texts)),
               "t": roll.completion_mask.sum().item(), "n": float(len(roll.texts))}
    s = T.allreduce_metrics(tot, world)
    n = max(s["n"], 1e-9)
    return {"eval/reward": s["r"] / n, "eval/words_mean": s["w"] / n, "eval/tokens_mean": s["t"] / n}


def write_samples(out_dir, step, x, recon, texts, r, G, names):
    """samples/step{N}.png: per image, source | its G reconstructions; the best caption below.
    samples/step{N}.jsonl: every caption with its reward."""
    B = x.shape[0]
    cols = [x.cpu()] + [recon.view(B, G, *recon.shape[1:])[:, g].cpu() for g in range(G)]
    best = r.view(B, G).argmax(1)
    labels = [f"best r={r.view(B, G)[b, best[b]]:.3f}: {texts[b * G + int(best[b])]}" for b in range(B)]
    images.save_grid(os.path.join(out_dir, "samples", f"step{step:06d}.png"), cols, labels)
    with open(os.path.join(out_dir, "samples", f"step{step:06d}.jsonl"), "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"image": names[i // G], "caption": t, "reward": r[i].item()}) + "\n")


if __name__ == "__main__":
    runs.cli(main)
