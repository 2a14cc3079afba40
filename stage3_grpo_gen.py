"""
Stage 3 — Understanding for Generation: Flow-GRPO on the decoder (docs/algorithm.md §5).

The frozen encoder captions each image; c = g(H(caption)) is the condition; the policy (the SD3 DiT
with a fresh LoRA) draws G images from c with a stochastic (SDE) sampler, each from its own noise;
the reward is R(x, x~) against the source; Flow-GRPO raises the likelihood of the denoising
transitions of the samples that redraw the source better than their group.

Launch (tiny, on a CPU, after stage2_grpo_und.py's tiny line; then Qwen2.5-VL-3B + SD3.5-large on 8 x 80 GB):
  python stage3_grpo_gen.py --init out/stage2 --data data/shapes/train/captions.jsonl --resolution 64 --reward pixel \
      --steps 4 --G 4 --groups 2 --sample_steps 4 --eval_steps 4 --max_new_tokens 16 --lr 1e-3 --out_dir out/stage3
  torchrun --nproc_per_node=8 stage3_grpo_gen.py --init out/stage2 --data images/ --reward clip --resolution 512 \
      --G 8 --dtype bf16 --grad_ckpt --out_dir out/stage3
The defaults are the real run's. A learning run on the tiny preset: tests/test_stage3.py::test_pixel_reward_rises.

Where this departs from the paper (which gives no RL details for this stage) and from Flow-GRPO
(why, with measurements: docs/algorithm.md §5, docs/performance.md):
1. Hyper-parameters are Flow-GRPO's SD3.5 ones; a group of G lives on one rank (Flow-GRPO: 24 over GPUs).
2. The prompt is the image's own caption by the frozen encoder; the reward is similarity to that image.
3. std_i at s = 1 uses s_1 in both places of sqrt(s / (1 - s)); Flow-GRPO's code, in the denominator only.
4. Advantages: the group's population std with a floor (--std_floor); no per-prompt history across steps.
5. No EMA of the LoRA weights.
6. One flat all-reduce of the LoRA gradients, not DDP; every draw is seeded by (seed, step, global group
   id) or (seed, image), so N ranks == 1 rank with the same global batch and --resume continues exactly.
7. The trained step subset (--train_frac < 1) is shared by all samples of an iteration.
8. Captions are cached (--captions_per_image K, caption_cache.py): K per image, sampled before step 1.
9. --sde_window W (off by default): noise, log-probs and training on the first W sampler steps, Euler after.

Flow convention (docs/algorithm.md §2): x_s = (1 - s) x0 + s eps, s = 1 noise, s = 0 data; the DiT predicts
v = eps - x0 at timestep 1000 s; sigmas s_0 = 1 > ... > s_N = 0 (UAE.sigmas, the scheduler's shift);
dt = s_{i+1} - s_i < 0.
"""
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

import caption_cache as CC
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
    init: str = arg("", "checkpoint to start from (a stage-1/2 out_dir, or released:DIR); '' = base")
    data: str = arg("", "folder of images or .jsonl of {image, caption}")
    out_dir: str = arg("out/stage3", "checkpoints, log.jsonl, samples/")
    reward: str = arg("clip", "reward (reward.py): a backbone (clip | longclip | dinov2 | dinov3 | pixel) or module:function")
    reward_path: str = arg("", "the backbone's weights ('' = its real default; 'tiny' = seeded random tiny weights)")
    resolution: int = arg(512, "image side of source and samples (Flow-GRPO: 512; tiny: 64)")
    # Flow-GRPO (docs/algorithm.md §5)
    G: int = arg(8, "images sampled per caption (group size)")
    groups: int = arg(1, "groups (source images) per rank per step")
    sample_steps: int = arg(10, "SDE sampling steps for training")
    eval_steps: int = arg(40, "ODE (Euler) steps for evaluation")
    cfg: float = arg(4.5, "classifier-free guidance scale (sampling and training)")
    negative_prompt: str = arg(M.NEGATIVE_PROMPT, "text of the CFG negative condition")
    noise_level: float = arg(0.7, "a: SDE noise level, std_i = a sqrt(s_i / (1 - s_i))")
    sde_window: int = arg(0, "W > 0: noise and training on the first W sampler steps only, Euler after them (the "
                             "rewarded image is the ODE's continuation; departure 9); 0 = every step, as Flow-GRPO")
    train_frac: float = arg(1.0, "fraction of steps trained (1.0 = all but the last; <1 = random subset per step)")
    eps_clip: float = arg(1e-4, "ratio clip range (tiny: log-probs are per-dim means)")
    beta: float = arg(0.04, "KL weight against the adapter-off DiT")
    adv_clip: float = arg(5.0, "advantages clamped to +-adv_clip")
    scale_rewards: str = arg("group", "group | batch | none: divide advantages by this std")
    std_floor: float = arg(1e-3, "advantage denominator is max(std, std_floor) + 1e-4")
    mu: int = arg(1, "num_inner_epochs: policy updates per sampled batch")
    temperature: float = arg(0.7, "caption sampling temperature (0 = greedy)")
    max_new_tokens: int = arg(512, "caption length cap")
    instruction: str = arg("", "captioning instruction ('' = model.INSTRUCTION, 'released' = the release's, "
                               "model.RELEASED_INSTRUCTION, or the text itself)")
    instruction_first: bool = arg(False, "the instruction before the image in the user turn (the release's order)")
    captions_per_image: int = arg(4, "K captions per image, sampled once before step 1 into out_dir/captions.jsonl; "
                                     "a visit uses one of them (departure 8); 0 = a fresh caption at every visit")
    # optimisation
    lora_r: int = arg(32, "DiT LoRA rank (Flow-GRPO: 32)")
    lora_alpha: int = arg(64, "DiT LoRA alpha (Flow-GRPO: 64)")
    lr: float = arg(3e-4, "AdamW learning rate")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    warmup: int = arg(0, "linear warmup steps")
    schedule: str = arg("constant", "constant | cosine")
    grad_clip: float = arg(1.0, "max grad norm")
    steps: int = arg(1000, "sampling/update iterations")
    dtype: str = arg("fp32", "fp32 | bf16: one dtype for sampling and training (LoRA kept fp32)")
    grad_ckpt: bool = arg(False, "gradient checkpointing in the DiT")
    fsdp: bool = arg(False, "shard the DiT (frozen base + LoRA) per block with FSDP2 (training.fsdp_shard); "
                            "needs --eval_images >= ranks")
    seed: int = arg(0, "global seed")
    dist_timeout: float = arg(T.DIST_TIMEOUT_MIN, "torchrun: minutes a collective waits for every rank; "
                                                  "then the job ends, naming the ranks that did not arrive")
    step_offset: int = arg(0, "draw the data and every per-step seed of steps N+1.. (the log still counts from 1): a run "
                              "chained after another with --init continues its batches (Unified-GRPO in rounds)")
    # logging / checkpoints / evaluation
    log_every: int = arg(1, "log line every N steps")
    save_every: int = arg(100, "checkpoint every N steps (and at the end)")
    sample_every: int = arg(50, "write samples/step*.png (source | G samples) every N steps (0 = never)")
    eval_every: int = arg(100, "fixed ODE eval (eval_steps): before step 1, every N steps, at the end (0 = never)")
    eval_images: int = arg(8, "samples in the fixed eval set (image i mod len(eval data), one fixed noise each)")
    eval_data: str = arg("", "eval images: folder or .jsonl ('' = --data; a held-out split is better)")
    resume: bool = arg(False, "continue from out_dir/ckpt exactly (fresh start if there is none); "
                              "flags that change the optimisation must be the saved ones")
    overwrite: bool = arg(False, "start over in an out_dir that holds a run (its log, checkpoint, samples/ are deleted)")
    max_pixels: int = arg(images.MAX_PIXELS, "refuse images of more pixels (read from the header, never decoded)")
    wandb: str = arg("", "wandb project ('' = off)")
    tensorboard: bool = arg(False, "write tensorboard events to out_dir/tb")


# ----------------------------------------------------------------------------------------------
# The pure pieces of Flow-GRPO (tests import these).

def sde_step(x, v, s, s_next, a, noise=None, prev_sample=None, s_for_std=None):
    """One transition x_s -> x_{s_next} of Flow-GRPO's SDE (docs/algorithm.md §5), fp32.
    Convention: x_s = (1 - s) x0 + s eps, v = eps - x0 (the DiT at timestep 1000 s), dt = s_next - s < 0.
        std  = a sqrt(s' / (1 - s'))   with s' = s_for_std (pass s_1 when s = 1) else s
        mean = x + [v + std^2 / (2 s) (x + (1 - s) v)] dt
        x'   = mean + std sqrt(-dt) eps
        log p(x' | x) = log N(x'; mean, std^2 |dt|), averaged over the latent dims -> (N,)
    prev_sample given: its log-prob under this step's mean (training); else x' is drawn with
    `noise` (N, ...) ~ N(0, 1). Pass s, s_next as 0-d fp32 tensors from UAE.sigmas: with a = 0
    this is then exactly model.UAE.sample_ode's Euler step `x + v * (s_next - s)`, bit for bit,
    and the log-prob is undefined (zero variance): zeros are returned, std is 0.
    -> (x_next, log_prob (N,), mean, std)."""
    x, v = x.float(), v.float()
    dt = s_next - s
    if a == 0:
        mean = x + v * dt                               # plain Euler, as in sample_ode
        x_next = mean if prev_sample is None else prev_sample.float()
        return x_next, torch.zeros(x.shape[0], device=x.device), mean, torch.zeros((), device=x.device)
    ss = s if s_for_std is None else s_for_std
    std = a * torch.sqrt(torch.as_tensor(ss / (1 - ss), dtype=torch.float32))
    mean = x + (v + std ** 2 / (2 * s) * (x + (1 - s) * v)) * dt
    sd = std * torch.sqrt(-torch.as_tensor(dt, dtype=torch.float32))   # transition std, std sqrt(|dt|)
    if prev_sample is None:
        x_next = mean + sd * noise.float()
    else:
        x_next = prev_sample.float()
    lp = -((x_next.detach() - mean) ** 2) / (2 * sd ** 2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    return x_next, lp.flatten(1).mean(1), mean, std


def sigma_for_std(sig, i):
    """docs/algorithm.md §5: at s = 1 (std infinite) use the first sigma below 1."""
    return sig[1] if sig[i] >= 1 else sig[i]


def transition(m, x, i, sig, cond, neg, a, cfg, noise=None, prev_sample=None):
    """The policy's step i from x = x_{s_i}: v = D(x, s_i, c) with CFG, then sde_step. The one code
    path shared by sampling, training and the reference (so the first ratio is exactly 1)."""
    v = m.velocity(x, sig[i], cond, neg, cfg).float()
    return sde_step(x, v, sig[i], sig[i + 1], a, noise, prev_sample, s_for_std=sigma_for_std(sig, i))


def _randn(shape, gens, device):
    """(N, *shape[1:]) standard normal noise, N/len(gens) rows from each generator in turn (one per group)."""
    gens = gens if isinstance(gens, (list, tuple)) else [gens]
    n = shape[0] // len(gens)
    return torch.cat([torch.randn((n,) + tuple(shape[1:]), generator=g, device=g.device) for g in gens]).to(device)


@torch.no_grad()
def sde_sample(m, noise, cond, neg, sigmas, a, cfg, generator, window=0):
    """SDE sampling of all N rows in one batched DiT call per step, fp32 state. window W > 0: noise level a
    on the first W steps only, plain Euler (ODE) steps after them (--sde_window; their log-probs are 0).
    noise (N, C, h, w) initial; generator: a torch.Generator or a list of them (one per block of
    N/len rows) for the per-step noise. -> (x_0 (N, C, h, w), trajectory (N, steps+1, C, h, w),
    log_probs (N, steps)) with trajectory[:, 0] = noise, trajectory[:, -1] = x_0."""
    x = noise.float()
    traj, lps = [x], []
    for i in range(len(sigmas) - 1):
        ai = a if (not window or i < window) else 0.0                        # outside the window: an Euler step
        eps = _randn(x.shape, generator, x.device) if ai != 0 else None
        x, lp, _, _ = transition(m, x, i, sigmas, cond, neg, ai, cfg, noise=eps)
        traj.append(x)
        lps.append(lp)
    return x, torch.stack(traj, 1), torch.stack(lps, 1)


def group_advantages(r, G, *, scale="group", std_floor=1e-3, eps=1e-4, clip=None):
    """docs/algorithm.md §5 / Flow-GRPO: A_i = (r_i - mean_G r) / (max(std, std_floor) + eps), then
    clamped to +-clip. std is the population std (ddof 0) of the group (scale=group), of the whole
    batch (batch), or no division (none), as Flow-GRPO's per-prompt stat tracker; stage 2's twin
    uses the sample std, as TRL. r (N,) with rows grouped G at a time -> (N,)."""
    rg = r.float().view(-1, G)                               # (B, G)
    A = rg - rg.mean(1, keepdim=True)
    if scale == "group":
        A = A / (rg.std(1, unbiased=False, keepdim=True).clamp_min(std_floor) + eps)
    elif scale == "batch":
        A = A / (r.float().std(unbiased=False).clamp_min(std_floor) + eps)
    elif scale != "none":
        raise ValueError(f"--scale_rewards must be group | batch | none, got {scale!r}")
    A = A.flatten()
    return A.clamp(-clip, clip) if clip else A


def sde_kl(mean, mean_ref, std):
    """docs/algorithm.md §5 (Flow-GRPO's form): KL = mean over latent dims of (mean_theta - mean_ref)^2 / (2 std^2) -> (N,)."""
    return ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std ** 2)


def flow_grpo_loss(logp, logp_old, adv, eps_clip, kl=None, beta=0.0):
    """docs/algorithm.md §5 per-step loss: mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))) + beta mean(KL),
    rho = exp(logp - logp_old). All (N,). -> (loss, stats of detached tensors)."""
    ratio = torch.exp(logp - logp_old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_clip, 1 + eps_clip)).mean()
    loss = policy + beta * kl.mean() if (kl is not None and beta > 0) else policy
    r = ratio.detach()
    stats = {"policy": policy.detach(), "kl": kl.detach().mean() if kl is not None else torch.zeros(()),
             "clipfrac": ((r - 1).abs() > eps_clip).float().mean(), "ratio": r}
    return loss, stats


def trained_steps(n_steps, frac, seed, step, window=0):
    """Step indices trained this iteration: all but the last (frac >= 1), or a seeded random subset; with a
    window W > 0 only among the first W (the steps that are sampled with noise)."""
    cand = (list(range(n_steps - 1)) or [0])[:window or None]
    if frac >= 1:
        return cand
    k = max(1, round(frac * len(cand)))
    perm = torch.randperm(len(cand), generator=T.generator(seed, step, "train_steps"))
    return sorted(cand[i] for i in perm[:k].tolist())


# ----------------------------------------------------------------------------------------------

def caption_groups(m, x, seeds, args):
    """One caption per image (frozen encoder), each under its own seed (rank-count invariant)."""
    return m.sample_captions_seeded(x, seeds, G=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    instruction=M.instruction_text(args.instruction),
                                    instruction_first=args.instruction_first).texts


def validate(args):
    """Every flag, the data and a resume's compatibility, before anything is loaded or written
    (training.validate_run does the shared part). A user error raises training.UsageError."""
    if not args.data:
        raise runs.UsageError(runs.no_data("python stage3_grpo_gen.py --data data/shapes/train/captions.jsonl --resolution 64 "
                                     "--reward pixel --G 4 --groups 2 --sample_steps 6 --eval_steps 6 --max_new_tokens 24 "
                                     "--steps 10 --lr 1e-3"))
    runs.at_least(args, 2, "G", why="a group of one sample has advantage 0: nothing can learn")
    runs.at_least(args, 2, "sample_steps", why="the last sampler step is never trained: with one, nothing is")
    runs.at_least(args, 1, "groups", "eval_steps", "mu", "eval_images")
    runs.at_least(args, 0, "beta", "adv_clip", "std_floor", "eval_every", "step_offset")
    runs.above(args, 0, "noise_level", why="at 0 the sampler is deterministic: no log-prob to train")
    runs.above(args, 0, "eps_clip", "train_frac")
    runs.need(args.train_frac <= 1, f"--train_frac {args.train_frac}: must be in (0, 1]")
    runs.at_least(args, 0, "sde_window")
    runs.need(args.sde_window <= args.sample_steps - 1,
           f"--sde_window {args.sde_window}: at most --sample_steps - 1 = {args.sample_steps - 1} (the last step is never trained)")
    runs.finite(args, "cfg")
    runs.one_of(args, "scale_rewards", ("group", "batch", "none"))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    runs.need(not (args.fsdp and args.eval_every and args.eval_images < world),  # FSDP: every DiT call is collective
           f"--fsdp: every rank takes part in each DiT call; --eval_images {args.eval_images} is below the {world} ranks")
    runs.at_least(args, 0, "captions_per_image")
    data = [("data", False)] + ([("eval_data", False)] if args.eval_every and args.eval_data else [])
    args = runs.validate_run(args, "stage3", size=args.resolution, datasets=data)
    cache = os.path.join(args.out_dir, CC.CAPTION_CACHE)
    if args.captions_per_image > 0 and os.path.lexists(cache):  # what of it the model does not decide, checked now
        CC.read_caption_cache(cache, CC.args_header(args, images.list_dataset(args.data)))
    return args


def main(argv=None):
    args = validate(runs.parse_args(Args, argv))
    rank, world, device = T.dist_setup(args.seed, args.dist_timeout)
    master = rank == 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ds = images.ImageDataset(args.data, args.resolution)
    m, lora_cfg = setup(args, dtype, device)
    if args.fsdp:  # FSDP2 over the DiT's blocks (base and LoRA); every rank then runs every DiT call
        T.fsdp_shard(m, ("transformer",), dtype, world)
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.fsdp:
        T.fsdp_track(opt, m)
    reward = runs.load_reward(args.reward, args.reward_path, device)             # R(x, x~), frozen
    with torch.no_grad():
        neg = m.condition([args.negative_prompt]) if args.cfg != 1.0 else None   # frozen (1, L, D)
    sig = m.sigmas(args.sample_steps)                                             # (steps+1,) s_0 = 1 ... 0
    step, meta, log = runs.start(args, opt, rank, world)                          # --resume: optimizer, RNG
    skipped = meta.get("skipped", 0)
    if master:
        print(f"stage 3: {len(ds)} images, {world} rank(s), {args.groups}x{args.G} samples/rank/step, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable DiT LoRA params, dtype {args.dtype}")
    G, ev = args.G, {}
    eval_ds = images.ImageDataset(args.eval_data, args.resolution) if args.eval_every and args.eval_data else ds
    cache = CC.caption_cache(m, ds, args, rank, world, device) if args.captions_per_image > 0 else None
    if args.eval_every and not args.resume:
        log.log(step, evaluate(m, eval_ds, neg, reward, args, rank, world, device, ev))
    pbar = tqdm(total=args.steps, initial=step, disable=not master, desc="stage3")
    while step < args.steps:
        clock = T.Clock()
        t = step + args.step_offset                                               # the step that draws: data, seeds
        idx = T.batch_indices(len(ds), args.groups, t, args.seed, rank, world)
        gids = [t * args.groups * world + rank * args.groups + k for k in range(args.groups)]
        x, _, names = ds.batch(idx)
        x = x.to(device)                                                          # (B, 3, H, W)
        # 1. Caption: the frozen encoder's caption of each image, one of its K cached ones (or a fresh one with
        #    --captions_per_image 0); c = g(H(y)), frozen
        if cache is not None:
            caps = CC.visit_captions(m, cache, idx, names, x, gids, ds, args)
        else:
            caps = caption_groups(m, x, [T.seed_of(args.seed, t, g, "caption") for g in gids], args)
        with torch.no_grad():
            cond = m.condition(caps).repeat_interleave(G)                         # (N, L, D), N = B*G
        clock.tick("caption")
        # 2. Sample: G images per caption with the SDE sampler (own initial and step noise), trajectory kept
        gens = [T.generator(args.seed, t, gid, "sde_noise") for gid in gids]
        shape = (len(gids) * G,) + m.latent_shape(args.resolution, args.resolution)
        noise = _randn(shape, gens, device)
        z, traj, logp_old = sde_sample(m, noise, cond, neg, sig, args.noise_level, args.cfg, gens, args.sde_window)
        clock.tick("sample")
        with torch.no_grad():
            recon = m.vae_decode(z)                                               # (N, 3, H, W)
        clock.tick("decode")
        # 3. Reward: r = R(x, x~), e.g. cos(f(x), f(x~)), no grad; gathered so that every rank sees the whole batch
        with torch.no_grad():
            r = reward(x.repeat_interleave(G, 0), recon, [c for c in caps for _ in range(G)])   # (N,)
        r_all = T.gather(r, world)
        clock.tick("reward")
        # 4. Advantage: (r - mean_G r) / (max(std_G r, floor) + eps), clamped to +-adv_clip
        bad = not torch.isfinite(r_all).all().item()
        N = r.shape[0]
        adv = group_advantages(r_all.nan_to_num(0.0), G, scale=args.scale_rewards, std_floor=args.std_floor,
                               clip=args.adv_clip)[rank * N:(rank + 1) * N]
        js = trained_steps(args.sample_steps, args.train_frac, args.seed, t, args.sde_window)
        lr = T.lr_at(step, args.lr, args.warmup, args.steps, args.schedule)
        for g_ in opt.param_groups:
            g_["lr"] = lr
        first, gnorm = [], 0.0
        for it in range(args.mu):
            for j in js:
                if bad:
                    break
                # 5. Transition log-prob: the policy's step j recomputed on the stored trajectory
                xj, xn = traj[:, j].contiguous(), traj[:, j + 1].contiguous()
                _, logp, mean, std = transition(m, xj, j, sig, cond, neg, args.noise_level, args.cfg, prev_sample=xn)
                # 6. KL to the reference (adapter off): mean (mean_theta - mean_ref)^2 / (2 std^2)
                kl = None
                if args.beta > 0:
                    with torch.no_grad(), M.adapters_disabled(m.transformer):
                        _, _, mean_ref, _ = transition(m, xj, j, sig, cond, neg, args.noise_level, args.cfg, prev_sample=xn)
                    kl = sde_kl(mean, mean_ref, std)
                # 7. Loss: max(-A rho, -A clip(rho)) + beta KL, one backward per trained step
                loss, s = flow_grpo_loss(logp, logp_old[:, j], adv, args.eps_clip, kl, args.beta)
                if not torch.isfinite(loss):
                    bad = True
                    if not args.fsdp:  # FSDP: every rank runs the same backwards (collectives); the step is skipped
                        break
                (loss / len(js)).backward()
                if it == 0:  # statistics of the first (on-policy) pass
                    first.append((j, loss.detach(), s))
            # 8. Step: skip agreed on every rank, gradients all-reduced, clipped, AdamW
            gnorm, skip = T.optimizer_step(params, opt, world, args.grad_clip, bad)
            if skip:
                skipped += 1
                break
        clock.tick("train")
        step += 1
        met = step_metrics(r_all, adv, logp_old[:, :args.sde_window or None], first, js, caps, args, gnorm, lr, skipped,
                           clock, world)
        bad_files = T.all_bad_files(ds.bad, world)                                # run-wide: every rank's
        if bad_files:
            met["data/bad_files"] = len(bad_files)
        log.log(step, met, log_line(step, met, skipped) if step % args.log_every == 0 else None)
        pbar.update(1)
        if master and args.sample_every and step % args.sample_every == 0:
            write_samples(os.path.join(args.out_dir, "samples", f"step{step:06d}.png"), x, recon, caps, r, G)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.log(step, evaluate(m, eval_ds, neg, reward, args, rank, world, device, ev))
        if step % args.save_every == 0 or step == args.steps:
            runs.save(args, m, step, opt, {"transformer": lora_cfg}, rank, world, "stage3", extra_meta={"skipped": skipped})
    pbar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return m


# ----------------------------------------------------------------------------------------------
# Helpers of main: set-up, metrics, evaluation, samples.

def setup(args, dtype, device):
    """The policy: earlier stages merged (encoder and projector frozen), this stage's DiT LoRA live
    (fresh, the same on every rank; or the checkpoint's with --resume). -> (m, lora_cfg)."""
    if args.resume:
        m = runs.load_model(init=args.out_dir, dtype=dtype, device=device, resume=True)
        lora_cfg = runs.live_lora(args.out_dir)["transformer"]
    else:
        m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                       decoder=args.decoder or None, dtype=dtype, device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)  # the same fresh adapter on every rank
            lora_cfg = M.add_lora(m.transformer, args.lora_r, args.lora_alpha, M.DIT_LORA_TARGETS)
    m.projector.requires_grad_(False)  # E, g frozen: only the DiT LoRA trains
    m.to(device).precision(dtype)      # the LoRA in fp32, frozen weights in --dtype (docs/algorithm.md §8)
    if args.grad_ckpt:
        m.transformer.enable_gradient_checkpointing()
    return m, lora_cfg


def step_metrics(r_all, adv, logp_old, first, js, caps, args, gnorm, lr, skipped, clock, world):
    """Reward, advantage and first-pass loss statistics (averaged over trained steps), all-reduced."""
    G = args.G
    st = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/clipfrac": 0.0, "ratio/mean": 0.0, "ratio/min": 1.0,
          "ratio/max": 1.0, **{f"loss/step_{j}": 0.0 for j in js}}
    if first:
        st["ratio/min"], st["ratio/max"] = math.inf, -math.inf
    for j, loss, s in first:
        st[f"loss/step_{j}"] = loss.item()
        for k in ("policy", "kl", "clipfrac"):
            st[f"loss/{k}"] += s[k].item() / len(js)
        st["ratio/mean"] += s["ratio"].mean().item() / len(js)
        st["ratio/min"], st["ratio/max"] = min(st["ratio/min"], s["ratio"].min().item()), max(st["ratio/max"], s["ratio"].max().item())
    if len(first) < len(js):  # a skipped step: no complete first pass
        st["ratio/min"], st["ratio/max"] = 1.0, 1.0
    rf = r_all[torch.isfinite(r_all)]
    rg = r_all.view(-1, G)
    met = {"reward/mean": rf.mean().item() if rf.numel() else float("nan"),
           "reward/std": rf.std(unbiased=False).item() if rf.numel() else float("nan"),
           "reward/flat_group_frac": (rg.std(1, unbiased=False) <= max(args.std_floor, 1e-6)).float().mean().item(),
           "adv/abs_mean": adv.abs().mean().item(), "logp/mean": logp_old.mean().item(),
           **{k: (v if math.isfinite(v) else 0.0) for k, v in st.items()},
           "loss/total": sum(st[f"loss/step_{j}"] for j in js) / len(js),
           "caption/words_mean": sum(len(c.split()) for c in caps) / len(caps),
           "grad_norm": gnorm or 0.0, "lr": lr, "skipped": float(skipped), **clock.times, "time/total": clock.total()}
    ops = {"ratio/max": "max", "ratio/min": "min", "skipped": "max", "time/total": "max"}
    return T.allreduce_metrics(met, world, ops)


def log_line(step, met, skipped):
    return (f"step {step:5d} | reward {met['reward/mean']:.4f} ± {met['reward/std']:.4f} | loss {met['loss/total']:+.5f} "
            f"| kl {met['loss/kl']:.3g} | clip {met['loss/clipfrac']:.3f} | ratio [{met['ratio/min']:.4f}, {met['ratio/max']:.4f}] "
            f"| gnorm {met['grad_norm']:.3f} | skipped {skipped} | {met['time/total']:.2f}s")


@torch.no_grad()
def evaluate(m, ds, neg, reward, args, rank, world, device, cache):
    """Fixed evaluation: eval_images samples (sample i: image i mod len(ds), the eval data; its own caption seed
    and noise; split over ranks), captions sampled once (the encoder is frozen), Euler ODE with
    eval_steps. -> {"eval/reward": mean over all eval samples}."""
    ids = [i for i in range(args.eval_images) if i % world == rank]
    if "cond" not in cache and ids:
        x, _, _ = ds.batch(ids)
        caps = caption_groups(m, x.to(device), [T.seed_of(args.seed, i, "eval_caption") for i in ids], args)
        cache.update(x=x.to(device), caps=caps, cond=m.condition(caps), noise=torch.cat([
            torch.randn((1,) + m.latent_shape(args.resolution, args.resolution),
                        generator=T.generator(args.seed, i, "eval_noise")) for i in ids]).to(device))
    tot = 0.0
    if ids:
        z = m.sample_ode(cache["noise"], cache["cond"], neg, args.eval_steps, args.cfg)
        tot = reward(cache["x"], m.vae_decode(z), cache["caps"]).sum().item()
    s = T.allreduce_metrics({"sum": tot, "n": float(len(ids))}, world)
    return {"eval/reward": s["sum"] / max(s["n"], 1e-9)}


def write_samples(path, x, recon, caps, r, G):
    """samples/step*.png: per source image one row, source | its G samples, rewards and caption below."""
    B = x.shape[0]
    cols = [x] + [recon.view(B, G, *recon.shape[1:])[:, g] for g in range(G)]
    rg = r.view(B, G).tolist()
    images.save_grid(path, cols, [f"r: {' '.join(f'{v:.3f}' for v in rg[b])} | {caps[b]}" for b in range(B)])


if __name__ == "__main__":
    runs.cli(main)
