"""
Stage 3 — Understanding for Generation: Flow-GRPO on the decoder (docs/algorithm.md §5).

The frozen encoder captions each image once; c = g(H(caption)) is the condition; the policy (the
SD3 DiT with a fresh LoRA) draws G images from c with a stochastic (SDE) sampler, each from its
own noise; the reward is cos(f_I(x), f_I(x~)) against the source; Flow-GRPO raises the
likelihood of the denoising transitions of the samples that redraw the source better than
their group.

Launch:
  python stage3_grpo_gen.py --preset tiny --data data/shapes/train --resolution 64 --steps 4 \
      --G 4 --groups 2 --sample_steps 4 --eval_steps 4 --max_new_tokens 16 --reward pixel \
      --lr 1e-2 --eval_every 2 --sample_every 2 --out_dir out/stage3-tiny      # tiny, CPU, seconds
  torchrun --nproc_per_node=2 stage3_grpo_gen.py --preset tiny ...            # same, 2 ranks (gloo)
  torchrun --nproc_per_node=8 stage3_grpo_gen.py --init out/stage2 --data images/ \
      --reward clip --reward_path /ckpt/clip-vit-l-14 --dtype bf16 --grad_ckpt \
      --out_dir out/stage3   # Qwen2.5-VL-3B + SD3.5-large (from the init checkpoint), 512 px, 8 x 80 GB
The defaults are the real run's; the tiny run is only flags. A learning run on the tiny preset
(pixel reward, one image, greedy caption): --resolution 32 --G 64 --groups 1 --steps 24
--lr 5e-2 --cfg 1 --temperature 0 --beta 0 (tests/test_stage3.py::test_pixel_reward_rises).

Where this departs from the paper (which gives no RL details for this stage) and Flow-GRPO:
1. Hyper-parameters are Flow-GRPO's SD3.5 ones (512 px, 10 train / 40 eval steps, CFG 4.5,
   a 0.7, eps 1e-4, beta 0.04, lr 3e-4, wd 1e-4, clip 1.0, LoRA r 32 / alpha 64 on the
   attention projections, all steps but the last trained); the paper states none. G is 8 per
   group (Flow-GRPO: 24 spread over GPUs) because a group lives on one rank here.
2. The prompt is not a text prompt but the image's own caption by the frozen encoder (sampled at
   temperature 0.7 as the released demo; cached, see 8), and the reward is similarity to that image.
3. std_i at s = 1 uses s_1 in place of s in both places of sqrt(s / (1 - s)) (docs/algorithm.md §5, read
   literally); Flow-GRPO's code replaces it only in the denominator. The two differ by sqrt(s_1)
   (~0.98) at the first step only.
4. Advantages use the population std of the group (Flow-GRPO's per-prompt tracker) with a std
   floor (default 1e-3; Flow-GRPO has none) so that near-flat groups do not amplify noise.
   No per-prompt history across steps (each image appears as one fresh group).
5. No EMA of the LoRA weights and no reward-model-specific tricks (Flow-GRPO has an EMA option).
6. Data parallel by one flat all-reduce of the LoRA gradients (training.optimizer_step), not DDP.
   Every random draw (initial and SDE noise, the trained step subset, on-the-fly captions) comes
   from a generator seeded by (seed, step, global group id), cached captions from (seed, image
   index) and the pick among them from (seed, image index, epoch), so N ranks == 1 rank with the
   same global batch, and --resume continues exactly. Captions are therefore sampled one image per
   generate call.
7. The trained step subset (--train_frac < 1) is shared by all samples of an iteration (Flow-GRPO
   permutes timesteps per sample in some versions); each trained step gets its own backward.
8. Captions are cached (--captions_per_image K, default 4; 0 = as before, a fresh caption at
   every visit). Before step 1 the frozen encoder captions every image the run will visit K times
   (one generate call of K rows per image, sharded over ranks) into out_dir/captions.jsonl, which
   --resume and reruns read back (a file from other data, K, sampling or encoder is refused); a
   visit uses one of its image's K, each once in any K consecutive epochs. What this changes:
   an image gets K different captions over the run instead of a new one per visit (the same up
   to K epochs, repeated after; Flow-GRPO itself repeats one fixed prompt), and captioning moves
   out of the step: -32..-34% per step at 2 threads, -28% at 1 (bench.py, tiny, the same captions
   with and without the cache: about the captioning share, 30-34% of the step that day), for a
   one-off cost before step 1. Only the text is cached: the condition is recomputed each step
   (~4 ms, 2% of the tiny step; at real size ~5 MB per caption to store). Why 4: K rows in one
   generate call cost 1.06-1.09x (K 2), 1.20-1.27x (K 4), 1.41-1.47x (K 8), 1.78-1.96x (K 16) one
   row (tiny, CPU, bench.py --sweep, 3 runs); 4 is the largest K within about a quarter of one
   caption per visited image, so the cache costs about what captioning each image once does and
   pays from the second epoch on (a run of one epoch or less gains nothing: use 0). At real size
   decoding is memory-bound, so K rows should cost less extra; not measured here.
9. --sde_window W (default 0 = off, as Flow-GRPO): noise, log-probs and training on the first W sampler steps only;
   the steps after them are plain Euler steps, so the rewarded image is what the ODE sampler (eval, benchmark)
   makes from the state the window left. Flow-GRPO's "Fast" variant and MixGRPO also confine the SDE to a window
   of steps (they move it; here it is fixed at the start). Why it exists (README, "Stage 3 in the shapes world"):
   with 8 steps the scheduler's sigmas are 1, .95, .88, .80, .69, .55, .34, .009, 0, so the last trained step
   leaps from .34 to .009 adding noise of std .29 that no later step removes, and in the demo the training reward
   rose while a fixed ODE eval fell; with the window the gains carried over to the ODE (5 seeds of 5).

Flow convention (docs/algorithm.md §2): x_s = (1 - s) x0 + s eps, s = 1 noise, s = 0 data; the DiT predicts
v = eps - x0 at timestep 1000 s; sigmas s_0 = 1 > ... > s_N = 0 (UAE.sigmas, the scheduler's
shift); dt = s_{i+1} - s_i < 0.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import model as M
import data as D
import training as T


@dataclass
class Args:
    preset: str = field(default="tiny", metadata={"help": "base models when --init is empty: tiny | real"})
    encoder: str = field(default="", metadata={"help": "override the LVLM (local dir or hub id)"})
    decoder: str = field(default="", metadata={"help": "override the SD3 decoder (local dir or hub id)"})
    init: str = field(default="", metadata={"help": "checkpoint to start from (a stage-1/2 out_dir, or released:DIR); '' = base"})
    data: str = field(default="", metadata={"help": "folder of images or .jsonl of {image, caption}"})
    out_dir: str = field(default="out/stage3", metadata={"help": "checkpoints, log.jsonl, samples/"})
    reward: str = field(default="clip", metadata={"help": "reward backbone (reward.py): clip | pixel | ..."})
    reward_path: str = field(default="", metadata={"help": "reward weights ('' = the backbone's default, 'tiny')"})
    resolution: int = field(default=512, metadata={"help": "image side of source and samples (Flow-GRPO: 512; tiny: 64)"})
    # Flow-GRPO (docs/algorithm.md §5)
    G: int = field(default=8, metadata={"help": "images sampled per caption (group size)"})
    groups: int = field(default=1, metadata={"help": "groups (source images) per rank per step"})
    sample_steps: int = field(default=10, metadata={"help": "SDE sampling steps for training"})
    eval_steps: int = field(default=40, metadata={"help": "ODE (Euler) steps for evaluation"})
    cfg: float = field(default=4.5, metadata={"help": "classifier-free guidance scale (sampling and training)"})
    negative_prompt: str = field(default=M.NEGATIVE_PROMPT, metadata={"help": "text of the CFG negative condition"})
    noise_level: float = field(default=0.7, metadata={"help": "a: SDE noise level, std_i = a sqrt(s_i / (1 - s_i))"})
    sde_window: int = field(default=0, metadata={"help": (
        "W > 0: noise (and training) on the first W sampler steps only, plain Euler steps after them, so the "
        "rewarded image is the ODE's continuation (departure 9; shapes demo: 3 of 8); 0 = every step, as Flow-GRPO")})
    train_frac: float = field(default=1.0, metadata={"help": "fraction of steps trained (1.0 = all but the last; <1 = random subset per step)"})
    eps_clip: float = field(default=1e-4, metadata={"help": "ratio clip range (tiny: log-probs are per-dim means)"})
    beta: float = field(default=0.04, metadata={"help": "KL weight against the adapter-off DiT"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantages clamped to +-adv_clip"})
    scale_rewards: str = field(default="group", metadata={"help": "group | batch | none: divide advantages by this std"})
    std_floor: float = field(default=1e-3, metadata={"help": "advantage denominator is max(std, std_floor) + 1e-4"})
    mu: int = field(default=1, metadata={"help": "num_inner_epochs: policy updates per sampled batch"})
    temperature: float = field(default=0.7, metadata={"help": "caption sampling temperature (0 = greedy)"})
    max_new_tokens: int = field(default=512, metadata={"help": "caption length cap"})
    captions_per_image: int = field(default=4, metadata={"help": (
        "K: before step 1 the frozen encoder captions every image the run will visit K times, once (one generate call "
        "of K rows per image, seeded per image; sharded over ranks), kept in out_dir/captions.jsonl (--resume and "
        "reruns read it back); each visit uses one of the K, a different one in each of K consecutive epochs. "
        "0 = a fresh caption at every visit, as before. Default 4: the largest K whose one-off cost stays within "
        "about a quarter of one caption per image (tiny, CPU: 1.2-1.27x; 8: 1.41-1.47x; 16: 1.78-1.96x; "
        "bench.py --sweep) (departure 8)")})
    # optimisation
    lora_r: int = field(default=32, metadata={"help": "DiT LoRA rank (Flow-GRPO: 32)"})
    lora_alpha: int = field(default=64, metadata={"help": "DiT LoRA alpha (Flow-GRPO: 64)"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=0, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="constant", metadata={"help": "constant | cosine"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm"})
    steps: int = field(default=1000, metadata={"help": "sampling/update iterations"})
    dtype: str = field(default="fp32", metadata={"help": "fp32 | bf16: one dtype for sampling and training (LoRA kept fp32)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing in the DiT"})
    fsdp: bool = field(default=False, metadata={"help": "shard the DiT (frozen base + LoRA) per block with FSDP2 (training.fsdp_shard): "
                                                        "~14 GB less per GPU on 8 ranks; --eval_images >= ranks"})
    seed: int = field(default=0, metadata={"help": "global seed"})
    step_offset: int = field(default=0, metadata={"help": "count the data order and every per-step random draw from step N+1 (the log still counts from 1): a run chained after another with --init (Unified-GRPO in rounds, README) continues its batches instead of drawing the same ones again"})
    # logging / checkpoints / evaluation
    log_every: int = field(default=1, metadata={"help": "log line every N steps"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    sample_every: int = field(default=50, metadata={"help": "write samples/step*.png (source | G samples) every N steps (0 = never)"})
    eval_every: int = field(default=100, metadata={"help": "fixed ODE eval (eval_steps): before step 1, every N steps, at the end (0 = never)"})
    eval_images: int = field(default=8, metadata={"help": "samples in the fixed eval set (image i mod len(eval data), one fixed noise each)"})
    eval_data: str = field(default="", metadata={"help": "eval images: folder or .jsonl ('' = --data; a held-out split is better)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt exactly (fresh start if there is none); "
                                                           "flags that change the optimisation must be the saved ones"})
    overwrite: bool = field(default=False, metadata={"help": "start over in an out_dir that holds a run (its log, checkpoint, samples/ are deleted)"})
    max_pixels: int = field(default=D.MAX_PIXELS, metadata={"help": "refuse images of more pixels (read from the header, never decoded)"})
    wandb: str = field(default="", metadata={"help": "wandb project ('' = off)"})
    tensorboard: bool = field(default=False, metadata={"help": "write tensorboard events to out_dir/tb"})


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
    return m.sample_captions_seeded(x, seeds, G=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens).texts


def validate(args):
    """Every flag, the data and a resume's compatibility, before anything is loaded or written
    (training.validate_run does the shared part). A user error raises training.UsageError."""
    if not args.data:
        raise T.UsageError(T.no_data("python stage3_grpo_gen.py --data data/shapes/train/captions.jsonl --resolution 64 "
                                     "--reward pixel --G 4 --groups 2 --sample_steps 6 --eval_steps 6 --max_new_tokens 24 "
                                     "--steps 10 --lr 1e-3"))
    T.at_least(args, 2, "G", why="a group of one sample has advantage 0: nothing can learn")
    T.at_least(args, 2, "sample_steps", why="the last sampler step is never trained: with one, nothing is")
    T.at_least(args, 1, "groups", "eval_steps", "mu", "eval_images")
    T.at_least(args, 0, "beta", "adv_clip", "std_floor", "eval_every", "step_offset")
    T.above(args, 0, "noise_level", why="at 0 the sampler is deterministic: no log-prob to train")
    T.above(args, 0, "eps_clip", "train_frac")
    T.need(args.train_frac <= 1, f"--train_frac {args.train_frac}: must be in (0, 1]")
    T.at_least(args, 0, "sde_window")
    T.need(args.sde_window <= args.sample_steps - 1,
           f"--sde_window {args.sde_window}: at most --sample_steps - 1 = {args.sample_steps - 1} (the last step is never trained)")
    T.finite(args, "cfg")
    T.one_of(args, "scale_rewards", ("group", "batch", "none"))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    T.need(not (args.fsdp and args.eval_every and args.eval_images < world),  # FSDP: every DiT call is collective
           f"--fsdp: every rank takes part in each DiT call; --eval_images {args.eval_images} is below the {world} ranks")
    data = [("data", False)] + ([("eval_data", False)] if args.eval_every and args.eval_data else [])
    return T.validate_run(args, "stage3", size=args.resolution, datasets=data)


# The caption cache (--captions_per_image K): the encoder is frozen, so the captions of an image need not be
# sampled again at every visit. Every caption comes from a seed of (seed, dataset index), never of a step, a rank or
# a batch, so the cache and every draw from it are the same for any rank count and across --resume.
CAPTION_CACHE = "captions.jsonl"
CAPTION_CACHE_FORMAT = "uae-caption-cache-v1"


class CaptionCacheError(RuntimeError):
    """out_dir/captions.jsonl belongs to another run (data, K, sampling or encoder) or is unreadable."""


def visited_images(n, global_batch, steps, seed, offset=0):
    """The dataset indices training.batch_indices draws in steps [offset, offset + steps) with `global_batch`
    images per step (groups x ranks), from its epoch permutations: every image once the run spans a full epoch."""
    lo, hi = offset * global_batch, (offset + steps) * global_batch
    if hi - lo >= n:
        return list(range(n))
    out = set()
    for epoch in range(lo // n, (hi - 1) // n + 1):  # at most two epochs
        perm = torch.randperm(n, generator=T.generator(seed, epoch, "batch")).tolist()
        out.update(perm[max(lo - epoch * n, 0):min(hi - epoch * n, n)])
    return sorted(out)


def cache_captions(m, x, keys, args):
    """K = args.captions_per_image captions of each image x[b] in one generate call of K rows, under a seed of its
    dataset index keys[b] alone. -> {key: [K captions]}."""
    K = args.captions_per_image
    texts = m.sample_captions_seeded(x, [T.seed_of(args.seed, k, "cache_caption") for k in keys], G=K,
                                     temperature=args.temperature, max_new_tokens=args.max_new_tokens).texts
    return {k: texts[b * K:(b + 1) * K] for b, k in enumerate(keys)}


def caption_pick(seed, key, epoch, K):
    """Which of image `key`'s K cached captions its visit in `epoch` uses: a fresh permutation of the K for every
    K epochs, so K consecutive epochs use each caption once (an image is visited once per epoch)."""
    return int(torch.randperm(K, generator=T.generator(seed, key, epoch // K, "caption_pick"))[epoch % K])


def pick_captions(cache, keys, epochs, args):
    """The caption of each visit: image keys[b] in epochs[b] -> [caption]."""
    return [cache[k][caption_pick(args.seed, k, e, len(cache[k]))] for k, e in zip(keys, epochs)]


def caption_cache_header(m, ds, args):
    """What the cached captions depend on; a cache file with another header is refused, not reused."""
    enc = hashlib.sha256()  # the encoder LoRA of every earlier stage, merged into the base encoder
    for _, tensors in m.layers:
        for k in sorted(t for t in tensors if t.startswith("encoder.")):
            enc.update(k.encode())
            enc.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    paths = "\n".join(os.path.abspath(p) for p, _ in ds.items)
    return {"format": CAPTION_CACHE_FORMAT, "captions_per_image": args.captions_per_image, "seed": args.seed,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "instruction": M.INSTRUCTION,
            "encoder": m.base.get("encoder"), "encoder_layers": enc.hexdigest()[:16], "n_images": len(ds.items),
            "images_sha256": hashlib.sha256(paths.encode()).hexdigest()[:16]}


def read_caption_cache(path, header):
    """{dataset index: [K captions]} from a cache file written for this header; {} when there is none."""
    if not os.path.exists(path):
        return {}
    try:
        lines = [json.loads(line) for line in open(path) if line.strip()]
        head, rows = lines[0], {int(d["i"]): list(d["captions"]) for d in lines[1:]}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CaptionCacheError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to caption again") from None
    diff = {k: (head.get(k), v) for k, v in header.items() if head.get(k) != v}
    if diff:
        raise CaptionCacheError(
            f"{path} holds captions of another run (this file's value, this run's): {diff}. Delete it to caption "
            "again, or use another --out_dir (--captions_per_image 0 captions at every visit and ignores it)")
    if any(len(c) != header["captions_per_image"] for c in rows.values()):
        raise CaptionCacheError(f"{path}: an image has a number of captions other than {header['captions_per_image']}")
    return rows


def write_caption_cache(path, header, cache, ds):
    """Header line, then one line per image in index order; written to a temporary file, then renamed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for i in sorted(cache):
            f.write(json.dumps({"i": i, "image": ds.items[i][0], "captions": cache[i]}) + "\n")
    os.replace(tmp, path)


def caption_cache(m, ds, args, rank, world, device):
    """The captions of every image that steps [0, args.steps) visit: read back from out_dir/captions.jsonl, the
    missing ones captioned now (sharded over ranks, all_gather_object, rank 0 rewrites the file).
    -> {dataset index: [K captions]}. An unreadable image is keyed by the image that replaces it (ds.batch)."""
    t0, path = time.time(), os.path.join(args.out_dir, CAPTION_CACHE)
    header = caption_cache_header(m, ds, args)
    cache = read_caption_cache(path, header)
    need = [i for i in visited_images(len(ds), args.groups * world, args.steps, args.seed, args.step_offset)
            if i not in cache]
    mine, new, chunk = need[rank::world], {}, 16
    for c in tqdm(range(0, len(mine), chunk), disable=rank != 0 or len(mine) <= chunk, desc="caption cache"):
        ids = mine[c:c + chunk]
        x, _, names = ds.batch(ids)
        new.update(cache_captions(m, x.to(device), image_keys(ds, ids, names), args))
    parts = [new]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, new)
    n_new = sum(len(p) for p in parts)
    for p in parts:
        cache.update(p)
    if rank == 0:
        if n_new:
            os.makedirs(args.out_dir, exist_ok=True)
            write_caption_cache(path, header, cache, ds)
        print(f"caption cache {path}: {len(cache) - n_new} images read back, {n_new} captioned x "
              f"{args.captions_per_image} in {time.time() - t0:.1f} s")
    return cache


def image_keys(ds, idx, names):
    """The dataset index of each image ds.batch(idx) returned: idx[b], or for an unreadable image the index of the
    one that replaced it (names[b])."""
    return [i if ds.items[i][0] == n else next(j for j, (p, _) in enumerate(ds.items) if p == n)
            for i, n in zip(idx, names)]


def visit_captions(m, cache, idx, names, x, gids, ds, args):
    """Step 1 with the cache: the caption of each group's visit (its image, its epoch = global group id // len(ds));
    an image missing from the cache (unreadable when it was built) is captioned now, under the same seed."""
    keys = image_keys(ds, idx, names)
    for b, k in enumerate(keys):
        if k not in cache:
            cache.update(cache_captions(m, x[b:b + 1], [k], args))
    return pick_captions(cache, keys, [g // len(ds) for g in gids], args)


def main(argv=None):
    import reward as R
    args = T.parse_args(Args, argv)
    args = validate(args)
    rank, world, device = T.dist_setup(args.seed)
    master = rank == 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ds = D.ImageDataset(args.data, args.resolution)
    m, lora_cfg = setup(args, dtype, device)
    if args.fsdp:  # FSDP2 over the DiT's blocks (base and LoRA); every rank then runs every DiT call
        T.fsdp_shard(m, ("transformer",), dtype, world)
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.fsdp:
        T.fsdp_track(opt, m)
    step, skipped = 0, 0
    if args.resume:
        step, st_meta = T.load_train_state(args.out_dir, opt, rank, world)
        skipped = st_meta.get("skipped", 0)
    backbone = R.load_backbone(args.reward, args.reward_path or None, device=device)
    with torch.no_grad():
        neg = m.condition([args.negative_prompt]) if args.cfg != 1.0 else None   # frozen (1, L, D)
    sig = m.sigmas(args.sample_steps)                                             # (steps+1,) s_0 = 1 ... 0
    log = T.RunLog(args.out_dir, master, asdict(args), args.wandb, args.tensorboard, resume=args.resume, step=step,
                   overwrite=args.overwrite)
    if master:
        print(f"stage 3: {len(ds)} images, {world} rank(s), {args.groups}x{args.G} samples/rank/step, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable DiT LoRA params, dtype {args.dtype}")
    G, ev = args.G, {}
    eval_ds = D.ImageDataset(args.eval_data, args.resolution) if args.eval_every and args.eval_data else ds
    cache = caption_cache(m, ds, args, rank, world, device) if args.captions_per_image > 0 else None
    if args.eval_every and not args.resume:
        log.log(step, evaluate(m, eval_ds, neg, backbone, args, rank, world, device, ev))
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
            caps = visit_captions(m, cache, idx, names, x, gids, ds, args)
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
        # 3. Reward: r = cos(f(x), f(x~)), no grad; gathered so that every rank sees the whole batch
        with torch.no_grad():
            r = backbone.similarity(x.float().repeat_interleave(G, 0), recon.float()).float()   # (N,)
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
        if ds.bad:
            met["data/bad_files"] = len(ds.bad)
        log.log(step, met, log_line(step, met, skipped) if step % args.log_every == 0 else None)
        pbar.update(1)
        if master and args.sample_every and step % args.sample_every == 0:
            write_samples(os.path.join(args.out_dir, "samples", f"step{step:06d}.png"), x, recon, caps, r, G)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.log(step, evaluate(m, eval_ds, neg, backbone, args, rank, world, device, ev))
        if step % args.save_every == 0 or step == args.steps:
            T.save_train_state(args.out_dir, m, asdict(args), step, opt, {"transformer": lora_cfg}, rank, world,
                               "stage3", extra_meta={"skipped": skipped})
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
        m = M.load_uae(init=args.out_dir, dtype=dtype, device=device, resume=True)
        lora_cfg = M.read_checkpoint(args.out_dir)[0]["layers"][-1]["transformer"]
    else:
        m = M.load_uae(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
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
def evaluate(m, ds, neg, backbone, args, rank, world, device, cache):
    """Fixed evaluation: eval_images samples (sample i: image i mod len(ds), the eval data; its own caption seed
    and noise; split over ranks), captions sampled once (the encoder is frozen), Euler ODE with
    eval_steps. -> {"eval/reward": mean over all eval samples}."""
    ids = [i for i in range(args.eval_images) if i % world == rank]
    if "cond" not in cache and ids:
        x, _, _ = ds.batch(ids)
        caps = caption_groups(m, x.to(device), [T.seed_of(args.seed, i, "eval_caption") for i in ids], args)
        cache.update(x=x.to(device), cond=m.condition(caps), noise=torch.cat([
            torch.randn((1,) + m.latent_shape(args.resolution, args.resolution),
                        generator=T.generator(args.seed, i, "eval_noise")) for i in ids]).to(device))
    tot = 0.0
    if ids:
        z = m.sample_ode(cache["noise"], cache["cond"], neg, args.eval_steps, args.cfg)
        tot = backbone.similarity(cache["x"].float(), m.vae_decode(z).float()).sum().item()
    s = T.allreduce_metrics({"sum": tot, "n": float(len(ids))}, world)
    return {"eval/reward": s["sum"] / max(s["n"], 1e-9)}


def write_samples(path, x, recon, caps, r, G):
    """samples/step*.png: per source image one row, source | its G samples, rewards and caption below."""
    B = x.shape[0]
    cols = [x] + [recon.view(B, G, *recon.shape[1:])[:, g] for g in range(G)]
    rg = r.view(B, G).tolist()
    D.save_grid(path, cols, [f"r: {' '.join(f'{v:.3f}' for v in rg[b])} | {caps[b]}" for b in range(B)])


if __name__ == "__main__":
    T.cli(main)
