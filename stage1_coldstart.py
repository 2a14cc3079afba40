"""
Stage 0/1 — decoder pre-training (flow matching) and the semantic cold start (docs/algorithm.md §3).

`fm`  : the decoder learns to read the LVLM. Image/caption pairs; c = g(H(caption)) from the
        text-only re-encoding; z0 = VAE(x); s ~ logit-normal; z_s = (1 - s) z0 + s eps;
        loss = mse(D(z_s, s, c), eps - z0). Trains g + D (LoRA, or the full DiT).
`sem` : the cold start closes the loop image -> E -> caption -> g -> D -> x~ with
        L_sem = 1 - cos(f(x), f(x~)). Captions are sampled from E (no gradient); the condition
        is their re-encoding WITH gradient (E's LoRA, g); x~ = VAE.decode(z_s - s v) (one-step
        estimate; gradient through the frozen VAE decoder into D's LoRA).
`fm+sem`: w_fm * L_fm + w_sem * L_sem on the same images.
Flow convention (docs/algorithm.md §2): x_s = (1 - s) x0 + s eps, s = 1 is noise, v = eps - x0, x0_hat = x_s - s v.

Launch (tiny, on a CPU: the shapes world's data, then pre-training and the cold start; README.md's chain):
  python data/shapes/prepare.py
  python stage1_coldstart.py --preset tiny --data data/shapes/train/captions.jsonl --objective fm \
      --steps 10 --batch_size 4 --lr 1e-3 --out_dir out/stage1_fm
  python stage1_coldstart.py --init out/stage1_fm --data data/shapes/train/captions.jsonl --objective sem \
      --reward pixel --steps 4 --batch_size 2 --max_new_tokens 16 --out_dir out/stage1
  # Qwen2.5-VL-3B + SD3.5-large, 8 x 80 GB: decoder pre-training (the full DiT needs --fsdp:
  # docs/operations.md, "Memory plan"), then the cold start from it
  torchrun --nproc_per_node=8 stage1_coldstart.py --preset real --data pairs/long_captions.jsonl \
      --objective fm --dit_full --fsdp --resolution 1024 --batch_size 2 --grad_accum 4 --lr 1e-4 --steps 20000 \
      --dtype bf16 --grad_ckpt --out_dir out/stage1_fm
  torchrun --nproc_per_node=8 stage1_coldstart.py --init out/stage1_fm --data images/ --objective sem \
      --reward clip --resolution 512 --batch_size 2 --lr 2e-5 --steps 2000 --dtype bf16 --grad_ckpt --out_dir out/stage1

Where this departs from the paper (which gives no stage-1 hyper-parameters) and its released code
(why: docs/algorithm.md §3):
1. The cold start's gradient is a one-step estimate x0_hat = z_s - s v, not the released full sampler
   (10 steps, CFG 5); --sem_steps_k K backpropagates through the last K steps of a sampler instead.
2. The DiT trains with LoRA (Flow-GRPO's targets, r 32, alpha 64) by default; --dit_full trains all of it.
3. The condition is always the text-only re-encoding of the caption; the released code's captioning-pass
   hidden states (they attend to the image) are --cond_source captioning_pass.
4. VAE: posterior mean, frozen; x~ is clamped to [0, 1].
5. Timesteps s ~ logit-normal(0, 1) (SD3's recipe) for both objectives; uniform weighting.
6. The encoder LoRA trains only when the objective includes `sem` (--train_encoder_lora overrides).
7. `sem` captions: one per image (temperature 0.7, as the demo) from the current encoder, no gradient.
8. No EMA of the weights; AdamW with linear warmup + cosine to 10 %.
9. One flat all-reduce of the trainable gradients, not DDP (--fsdp: FSDP2, docs/algorithm.md §6); the
   flow-matching draws are seeded per sample, so they do not depend on the rank count; `sem` captions at
   temperature > 0 are seeded per (micro-step, rank), so they do.
"""
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import images
import model as M
import reward
import runs
import training as T
from runs import arg


@dataclass
class Args:
    preset: str = arg("tiny", "base models when --init is empty: tiny | real")
    encoder: str = arg("", "override the LVLM (local dir or hub id)")
    decoder: str = arg("", "override the SD3 decoder (local dir or hub id)")
    init: str = arg("", "checkpoint to start from ('' = base models, random projector; released:DIR = the authors' release)")
    data: str = arg("", "folder of images (sem) or .jsonl of {image, caption} (fm needs captions)")
    out_dir: str = arg("out/stage1", "checkpoints (out_dir/ckpt), log.jsonl, samples/")
    resolution: int = arg(0, "image side (0 = 64 for tiny, 512 for real; SD3.5 pre-training: 1024)")
    # objective (docs/algorithm.md §3)
    objective: str = arg("fm", "fm | sem | fm+sem", choices=["fm", "sem", "fm+sem"])
    w_fm: float = arg(1.0, "weight of the flow-matching loss")
    w_sem: float = arg(1.0, "weight of the semantic loss 1 - cos(f(x), f(x~))")
    s_mean: float = arg(0.0, "logit-normal timestep density: mean of logit(s)")
    s_std: float = arg(1.0, "logit-normal timestep density: std of logit(s)")
    reward: str = arg("clip", "semantic backbone f (reward.py): clip | pixel | ...")
    reward_path: str = arg("", "backbone weights ('' = its real default; 'tiny' = random tiny CLIP)")
    temperature: float = arg(0.7, "caption sampling temperature for sem (0 = greedy)")
    max_new_tokens: int = arg(512, "caption length cap for sem and samples")
    sem_steps_k: int = arg(0, "0 = one-step estimate; K > 0 = backprop the last K sampler steps")
    sem_sample_steps: int = arg(10, "sampler steps when sem_steps_k > 0 (released cold start: 10)")
    cond_source: str = arg("text", "sem condition: text (re-encoding, as at inference) | captioning_pass (released code)", choices=["text", "captioning_pass"])
    # what trains
    train_encoder_lora: Optional[bool] = arg(None, "train a LoRA on the LVLM (default: only when the objective has sem)")
    dit_full: bool = arg(False, "train every DiT weight instead of a DiT LoRA")
    lora_r: int = arg(32, "LoRA rank (released UAE: 32)")
    lora_alpha: int = arg(64, "LoRA alpha (released UAE: 64)")
    # optimisation
    batch_size: int = arg(4, "images per rank per micro-step")
    grad_accum: int = arg(1, "micro-steps per optimizer step")
    steps: int = arg(1000, "optimizer steps (the length of the lr schedule)")
    stop_after: int = arg(0, "end this run (with a checkpoint) at this step; continue with --resume (0 = at --steps)")
    lr: float = arg(1e-4, "AdamW learning rate")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    warmup: int = arg(100, "linear warmup steps (at most 10 pct of --steps)")
    schedule: str = arg("cosine", "cosine (down to 0.1 lr) | constant", choices=["cosine", "constant"])
    grad_clip: float = arg(1.0, "max grad norm (0 = no clipping)")
    dtype: str = arg("fp32", "fp32 | bf16: one dtype for weights and compute", choices=["fp32", "bf16"])
    grad_ckpt: bool = arg(False, "gradient checkpointing in the LVLM, the DiT and the VAE decoder")
    fsdp: bool = arg(False, "shard the DiT (per block) and the projector with FSDP2: fp32 master weights, "
                                                        "gradients and AdamW state split over ranks (needed for --dit_full at real size)")
    seed: int = arg(0, "global seed")
    dist_timeout: float = arg(T.DIST_TIMEOUT_MIN, "torchrun: minutes a collective waits for every rank; "
                                                  "then the job ends, naming the ranks that did not arrive")
    # samples / logging / checkpoints
    cfg: float = arg(5.0, "CFG of the sample reconstructions")
    sample_steps: int = arg(40, "Euler steps of the sample reconstructions")
    sample_n: int = arg(4, "images in each sample grid (the first of the data)")
    sample_every: int = arg(100, "write samples/step*.png (source | reconstruction + caption); 0 = never")
    save_every: int = arg(500, "checkpoint every N steps (and at the end)")
    log_every: int = arg(1, "print a log line every N steps (the JSONL gets every step)")
    resume: bool = arg(False, "continue exactly from out_dir/ckpt (fresh start if there is none); "
                                                           "flags that change the optimisation must be the saved ones")
    overwrite: bool = arg(False, "start over in an out_dir that holds a run (its log, checkpoint, samples/ are deleted)")
    max_pixels: int = arg(images.MAX_PIXELS, "refuse images of more pixels (read from the header, never decoded)")
    wandb: str = arg("", "wandb project ('' = off)")
    tensorboard: bool = arg(False, "write tensorboard events to out_dir/tb")


# ----------------------------------------------------------------------------------------------
# The pure pieces (tests import these).

def logit_normal(n, mean=0.0, std=1.0, generator=None):
    """s = sigmoid(mean + std * N(0, 1)), (n,) in (0, 1): SD3's timestep density."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def sample_noise(seed, k, keys, shape, mean=0.0, std=1.0):
    """Per-sample (s, eps) for both objectives from a generator seeded by (seed, micro-step k,
    global sample index): 2 ranks x B draw exactly what 1 rank x 2B draws.
    -> s (2, B), eps (2, B, *shape); index 0 is for fm, 1 for sem."""
    s, eps = [], []
    for gi in keys:
        g = T.generator(seed, k, gi, "fm_noise")
        s.append(logit_normal(2, mean, std, g))
        eps.append(torch.randn((2,) + tuple(shape), generator=g))
    return torch.stack(s, 1), torch.stack(eps, 1)


def _bcast(s, z):
    return s.to(z.device, z.dtype).view(-1, *[1] * (z.dim() - 1))


def flow_matching_loss(D, z0, s, eps):
    """docs/algorithm.md §3 decoder pre-training. D(z_s, s) -> v; z_s = (1 - s) z0 + s eps; target v = eps - z0.
    z0, eps (B, C, h, w), s (B,). -> per-sample mse (B,), fp32."""
    z_s = (1 - _bcast(s, z0)) * z0 + _bcast(s, z0) * eps
    v = D(z_s, s)
    return ((v.float() - (eps - z0).float()) ** 2).flatten(1).mean(1)


def one_step_x0(D, z0, s, eps):
    """docs/algorithm.md §3 default gradient path: x0_hat = z_s - s D(z_s, s), one DiT call."""
    z_s = (1 - _bcast(s, z0)) * z0 + _bcast(s, z0) * eps
    return z_s - _bcast(s, z0) * D(z_s, s).float()


def last_k_x0(D, eps, sigmas, k):
    """Euler ODE from pure noise over `sigmas` (1 -> 0); gradient only through the last k steps."""
    z, n = eps, len(sigmas) - 1
    for i in range(n):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= n - k):
            z = z + D(z, sigmas[i].expand(z.shape[0])).float() * (sigmas[i + 1] - sigmas[i])
    return z


def semantic_loss(f, x, x_tilde):
    """docs/algorithm.md §3: L_sem = 1 - cos(f(x), f(x~)) per sample (B,); f(x) of the source is a constant."""
    with torch.no_grad():
        a = f(x.float())
    return 1 - F.cosine_similarity(a.float(), f(x_tilde.float()).float(), dim=-1)


def loss_bins(loss, s, n_bins=10):
    """minRF-style diagnostic: per-sample losses summed by noise-level bin of s (deciles of
    [0, 1]). -> (sums (n_bins,), counts (n_bins,)); sums over ranks/micro-steps, then divide."""
    b = (s.detach().float().cpu().clamp(0, 1 - 1e-6) * n_bins).long()
    sums = torch.zeros(n_bins).index_add_(0, b, loss.detach().float().cpu())
    return sums, torch.bincount(b, minlength=n_bins).float()


def captioning_pass_cond(m, roll):
    """The released cold-start code's condition: g(hidden states of the caption tokens in the
    captioning pass itself — they attend to the image). With gradient."""
    P = roll.prompt_ids.shape[1]
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    attn = torch.cat([roll.prompt_mask, torch.ones_like(roll.completion_ids)], 1)
    mm = torch.cat([roll.mm_token_type_ids, torch.zeros_like(roll.completion_ids)], 1)
    with m.autocast():
        H = m.encoder.model(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, pixel_values=roll.pixel_values,
                            image_grid_thw=roll.image_grid_thw).last_hidden_state[:, P:]   # (N, T, hidden)
        emb = m.projector(H)
    mask = roll.completion_mask.bool()
    emb = emb * mask[..., None]
    return M.Cond(emb, mask, m.pooled.to(emb.dtype).expand(len(emb), -1))


def micro_losses(m, args, backbone, x, captions, k, keys, rank=0):
    """One micro-batch forward. x (B, 3, H, W) in [0, 1]; captions (fm) or None; k = global
    micro-step; keys = global sample indices. -> (weighted loss, stats of floats to sum)."""
    dev = x.device
    with torch.no_grad():
        z0 = m.vae_encode(x).float()                                          # (B, C, h, w) posterior mean
    s, eps = sample_noise(args.seed, k, keys, z0.shape[1:], args.s_mean, args.s_std)
    s, eps = s.to(dev), eps.to(dev)
    total, st, n_bins = 0.0, {}, 10
    ckpt = args.grad_ckpt                                                     # see setup()
    if "fm" in args.objective.split("+"):
        m.encoder.train(ckpt)                                                 # HF checkpoints only in train mode
        cond = m.condition(captions)                                          # c = g(H(y)), (B, L, D)
        l_fm = flow_matching_loss(lambda z, t: m.velocity(z, t, cond), z0, s[0], eps[0])   # (B,)
        total = total + args.w_fm * l_fm.mean()
        sums, cnt = loss_bins(l_fm, s[0], n_bins)
        st.update({"fm": l_fm.detach().mean().item(), **{f"fm_sum{i}": sums[i].item() for i in range(n_bins)},
                   **{f"fm_cnt{i}": cnt[i].item() for i in range(n_bins)}})
    if "sem" in args.objective.split("+"):
        m.encoder.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(T.seed_of(args.seed, k, rank, "sem_caption"))
            roll = m.sample_captions(x, G=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        m.encoder.train(ckpt)
        cond = m.condition(roll.texts) if args.cond_source == "text" else captioning_pass_cond(m, roll)
        D = lambda z, t: m.velocity(z, t, cond)
        if args.sem_steps_k > 0:
            z0_hat = last_k_x0(D, eps[1], m.sigmas(args.sem_sample_steps).to(dev), args.sem_steps_k)
        else:
            z0_hat = one_step_x0(D, z0, s[1], eps[1])                         # x0_hat = z_s - s v
        x_tilde = m.vae_decode(z0_hat)                                        # (B, 3, H, W), grad through the decoder
        l_sem = semantic_loss(backbone, x, x_tilde)                           # (B,)
        total = total + args.w_sem * l_sem.mean()
        st["sem"] = l_sem.detach().mean().item()
        if args.sem_steps_k == 0:
            sums, cnt = loss_bins(l_sem, s[1], n_bins)
            st.update({**{f"sem_sum{i}": sums[i].item() for i in range(n_bins)}, **{f"sem_cnt{i}": cnt[i].item() for i in range(n_bins)}})
        st["caption_words"] = sum(len(t.split()) for t in roll.texts) / len(roll.texts)
        st["caption_tokens"] = roll.completion_mask.sum(1).mean().item()
    m.encoder.eval()
    st["total"] = float(total.detach()) if torch.is_tensor(total) else float(total)
    return total, st


def setup(args, device, resume=False):
    """Model + this stage's trainable parameters (same init on every rank), in fp32 (docs/algorithm.md §8).
    -> (m, params, lora_cfg)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    full = ("transformer",) if args.dit_full else ()
    torch.manual_seed(args.seed)                          # same projector init and fresh adapters on every rank
    if resume:                                            # this stage's adapters come back live
        m = runs.load_model(init=args.out_dir, dtype=dtype, device=device, resume=True, train_full=full)
        lora_cfg = runs.live_lora(args.out_dir)
    else:
        m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                       decoder=args.decoder or None, dtype=dtype, device=device, train_full=full)
        train_enc = args.train_encoder_lora if args.train_encoder_lora is not None else "sem" in args.objective
        lora_cfg = {"encoder": M.add_lora(m.encoder, args.lora_r, args.lora_alpha, M.ENCODER_LORA_TARGETS) if train_enc else None,
                    "transformer": None if args.dit_full else M.add_lora(m.transformer, args.lora_r, args.lora_alpha, M.DIT_LORA_TARGETS)}
    m.projector.requires_grad_(True)                      # add_lora only flags lora_ params
    if args.dit_full:
        m.transformer.requires_grad_(True)
    m.to(device).precision(dtype)                         # trainable in fp32, frozen in --dtype
    if args.grad_ckpt:
        if hasattr(m.encoder, "activation_checkpointing_enable"):   # transformers >= 5.x name
            m.encoder.activation_checkpointing_enable({"use_reentrant": False})
        else:
            m.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.transformer.enable_gradient_checkpointing()
        m.vae.enable_gradient_checkpointing()
    m.eval()
    params = [p for part in (m.encoder, m.projector, m.transformer) for p in part.parameters() if p.requires_grad]
    return m, params, lora_cfg


@torch.no_grad()
def write_samples(m, args, ds, step, size, device, write=True):
    """samples/step{N}.png: source | reconstruction from the model's own caption (full ODE
    sampler, CFG), the caption below; samples/step{N}.jsonl: the captions in full. write=False: only the
    forwards (FSDP ranks other than 0 take part in them)."""
    n = min(args.sample_n, len(ds))
    x, _, names = ds.batch(list(range(n)))
    x = x.to(device)
    m.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        texts = m.sample_captions(x, G=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens).texts
    recon = m.generate_images(texts, steps=args.sample_steps, cfg=args.cfg, size=size, seed=args.seed)
    if not write:
        return
    d = os.path.join(args.out_dir, "samples")
    labels = ["".join(ch if ch.isprintable() else "?" for ch in t) for t in texts]
    images.save_grid(os.path.join(d, f"step{step:06d}.png"), [x.cpu(), recon.cpu()], labels)
    with open(os.path.join(d, f"step{step:06d}.jsonl"), "w") as f:
        for name, t in zip(names, texts):
            f.write(json.dumps({"image": name, "caption": t}) + "\n")


def _finite(d):
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------

def validate(args):
    """Every flag, the data and a resume's compatibility, before anything is loaded or written
    (training.validate_run does the shared part). A user error raises training.UsageError."""
    if not args.data:
        raise runs.UsageError(runs.no_data("python stage1_coldstart.py --data data/shapes/train/captions.jsonl --resolution 64 "
                                     "--steps 60 --batch_size 8 --lr 1e-3 --out_dir out/stage1_fm"))
    runs.one_of(args, "objective", ("fm", "sem", "fm+sem"))
    runs.one_of(args, "cond_source", ("text", "captioning_pass"))
    if "sem" in args.objective:  # L_sem needs the backbone's features (with gradients), not a module:function reward
        runs.one_of(args, "reward", reward.BACKBONES)
    runs.at_least(args, 1, "batch_size", "grad_accum", "sample_n", "sample_steps", "sem_sample_steps")
    runs.at_least(args, 0, "w_fm", "w_sem", "s_std", "sem_steps_k", "stop_after")
    runs.finite(args, "s_mean", "cfg")
    objs = args.objective.split("+")
    runs.need(sum(getattr(args, f"w_{o}") for o in objs) > 0, f"--objective {args.objective} with weight 0: nothing can learn")
    runs.need(args.sem_steps_k <= args.sem_sample_steps, f"--sem_steps_k {args.sem_steps_k}: at most --sem_sample_steps "
                                                      f"({args.sem_sample_steps})")
    size = args.resolution or (64 if args.preset == "tiny" else 512)
    return runs.validate_run(args, "stage1", size=size, datasets=[("data", "fm" in objs)], harmless=("cfg", "sample_steps"))


def main(argv=None):
    args = validate(runs.parse_args(Args, argv))
    rank, world, device = T.dist_setup(args.seed, args.dist_timeout)
    master = rank == 0
    objs = args.objective.split("+")
    size = args.resolution or (64 if args.preset == "tiny" else 512)
    ds = images.ImageDataset(args.data, size, need_captions="fm" in objs)
    m, params, lora_cfg = setup(args, device, args.resume)
    if args.fsdp:  # FSDP2 over the DiT blocks and the projector (training.fsdp_shard); the encoder stays replicated
        params = T.fsdp_shard(m, ("transformer", "projector"), m.dtype, world)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.fsdp:
        T.fsdp_track(opt, m)
    torch.manual_seed(args.seed + rank)                   # (every draw below is also seeded explicitly)
    backbone = None                                       # f of L_sem, frozen; gradients reach its input
    if "sem" in objs:
        backbone = reward.load_backbone(args.reward, runs.reward_path(args.reward, args.reward_path), device=device)
    step, _, log = runs.start(args, opt, rank, world)      # --resume: optimizer, RNG
    if master:
        print(f"stage 1 ({args.objective}): {len(ds)} images at {size}px, {world} rank(s), "
              f"{args.batch_size}x{args.grad_accum} images/rank/step, {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
              f"(encoder LoRA {'on' if lora_cfg['encoder'] else 'off'}, DiT {'full' if args.dit_full else 'LoRA'}), {args.dtype}")
    skipped, bad_seen = 0, set()
    pbar = tqdm(total=args.steps, initial=step, disable=not master, desc="stage1")
    end = min(args.steps, args.stop_after or args.steps)
    while step < end:
        t0 = time.time()
        lr = T.lr_at(step, args.lr, min(args.warmup, args.steps // 10), args.steps, args.schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        sums, bad = {}, False
        for micro in range(args.grad_accum):
            # 1. Batch: this rank's slice of the global micro-batch k (seeded, rank-count invariant)
            k = step * args.grad_accum + micro                                # global micro-step
            idx = T.batch_indices(len(ds), args.batch_size, k, args.seed, rank, world)
            keys = [k * args.batch_size * world + rank * args.batch_size + b for b in range(args.batch_size)]
            x, caps, _ = ds.batch(idx)
            # 2. Losses: L_fm and/or L_sem on this micro-batch (micro_losses), 3. backward, accumulated
            loss, st = micro_losses(m, args, backbone, x.to(device), caps, k, keys, rank)
            for key, v in st.items():
                sums[key] = sums.get(key, 0.0) + v
            if not torch.isfinite(loss):
                bad = True
                if not args.fsdp:  # FSDP: every rank runs the same forwards/backwards (collectives); the step is skipped
                    break
            (loss / args.grad_accum).backward()
        # 4. Step: skip agreed on every rank, gradients all-reduced, clipped, AdamW
        gnorm, skip = T.optimizer_step(params, opt, world, args.grad_clip, bad)
        skipped += int(skip)
        step += 1
        met = step_metrics(sums, micro + 1, lr, gnorm, skipped, ds, bad_seen, world)
        met["time/step"] = T.allreduce_metrics({"t": time.time() - t0}, world, {"t": "max"})["t"]
        log.log(step, _finite(met), log_line(step, met, lr, gnorm, skipped) if step % args.log_every == 0 else None)
        pbar.update(1)
        if (master or args.fsdp) and args.sample_every and step % args.sample_every == 0:  # FSDP: all ranks draw
            write_samples(m, args, ds, step, size, device, write=master)
        if step % args.save_every == 0 or step == end:
            runs.save(args, m, step, opt, lora_cfg, rank, world, "stage1", transformer_full=args.dit_full)
    pbar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return m


def step_metrics(sums, n_micro, lr, gnorm, skipped, ds, bad_seen, world):
    """Means over micro-steps and ranks; loss by noise-level bin as sum / count; new bad files."""
    red = T.allreduce_metrics({key: v / n_micro for key, v in sums.items()}, world)
    met = {"loss/total": red["total"], "lr": lr, "grad_norm": gnorm, "skipped": skipped}
    for o in ("fm", "sem"):
        if o in red:
            met[f"loss/{o}"] = red[o]
        for i in range(10):
            if red.get(f"{o}_cnt{i}", 0) > 0:
                met[f"loss/{o}_bin{i}"] = red[f"{o}_sum{i}"] / red[f"{o}_cnt{i}"]
    if "caption_words" in red:
        met["caption/words_mean"], met["caption/tokens_mean"] = red["caption_words"], red["caption_tokens"]
    new_bad = sorted(set(T.all_bad_files(ds.bad, world)) - bad_seen)
    if new_bad:
        bad_seen |= set(new_bad)
        met["data/bad_files"] = new_bad
        met["data/n_bad"] = len(bad_seen)
    return met


def log_line(step, met, lr, gnorm, skipped):
    parts = " ".join(f"{o} {met[f'loss/{o}']:.4f}" for o in ("fm", "sem") if f"loss/{o}" in met)
    gn = f"{gnorm:.3f}" if gnorm is not None else "skip"
    return (f"step {step:6d} | loss {met['loss/total']:.4f} ({parts}) | gnorm {gn} | lr {lr:.2e} | "
            f"skipped {skipped} | {met['time/step']:.2f}s")


if __name__ == "__main__":
    runs.cli(main)
