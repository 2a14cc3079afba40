"""
What a stage's loop needs besides the model: torchrun set-up, seeds, the global batch of a step,
gradient and metric all-reduce, the optimizer step, the lr schedule, a clock per phase, the run log,
and FSDP2 sharding. The run folder itself (flag checks, checkpoints, --resume) is runs.py's.
"""
import datetime
import json
import math
import os
import time
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm


def seed_of(*keys):
    """The one seed derivation of this repo: a 63-bit seed from keys, e.g. (seed, step, global
    group id, "sde_noise"); a string key names the purpose (hashed with crc32). Every random draw
    that must not depend on the rank count, the batch split or a resume is seeded by this."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2 ** 63 for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(*keys, device="cpu"):
    """A torch.Generator seeded by seed_of(*keys)."""
    return torch.Generator(device).manual_seed(seed_of(*keys))


# --dist_timeout's default for the stages, in minutes: how long a collective waits for a rank that does not arrive
# before the job ends. Above the longest legitimate wait of a real launch (README, "What happens when things go
# wrong": rank 0 writing a full-DiT checkpoint while the others wait at its barrier; a slow rank's model load).
DIST_TIMEOUT_MIN = 10.0
FAULT_TEXT = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")  # gloo's words
FAULT_GRACE_S = 10.0  # collective_failure: at most this long (or half the timeout) for the other ranks' marks
_timeout_min = None  # this process group's, for the message


def dist_setup(seed, timeout_min=DIST_TIMEOUT_MIN):
    """torchrun -> (rank, world, device); plain python -> (0, 1, cuda:0 or cpu). Seeds offset by rank. A collective
    that waits more than timeout_min minutes for the other ranks raises (a stalled or dead rank; NCCL's watchdog
    aborts the process): under runs.cli the job ends with collective_failure's line."""
    global _timeout_min
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local = 0, 1, 0
    if ddp:
        _timeout_min = timeout_min
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(seed + rank)
    return rank, world, device


def collective_failure(e):
    """e, an exception out of a collective that not every rank joined (it waited --dist_timeout, or a rank's
    connection closed: it died) -> (the one line that ends the job, naming the ranks that had not reached it; whether
    this rank is the first of those that did, which prints it at once). None for any other exception. Every rank
    that fails so marks itself in the rendezvous store, then waits a little for the others to do the same: the
    ranks that never mark are the stalled or dead ones."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or any(t in text for t in FAULT_TEXT)):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()  # torchrun's agent holds it: it outlives a dead rank
        store.set(f"uae/fault/{rank}", "1")
        end = time.time() + min(FAULT_GRACE_S, 60 * (_timeout_min or 1) / 2)  # the others time out about now too
        while True:
            missing = [r for r in range(world) if not store.check([f"uae/fault/{r}"])]
            if not missing or time.time() > end:
                break
            time.sleep(0.2)
    except Exception:  # the store is gone too (its host died): the ranks cannot be named
        missing = None
    if missing is None:
        who = "another rank stalled or died"
    elif missing:
        who = f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} had not reached it (stalled or dead)"
    else:
        who = "every rank failed there (none is missing: collectives out of step?)"
    first = (text.splitlines() or [""])[0][-200:]
    wait = f"--dist_timeout {_timeout_min:g} min" if _timeout_min else "its timeout"  # None: not our dist_setup
    msg = f"[rank {rank}] a collective of the {world} ranks failed after waiting up to {wait}: {who} " \
          f"({type(e).__name__}: {first})"
    return msg, rank == min(set(range(world)) - set(missing or []))


def batch_indices(n, batch, step, seed, rank=0, world=1):
    """The global batch for `step` (a seeded permutation per epoch), this rank's slice of it."""
    g = batch * world
    out = []
    for k in range(step * g, step * g + g):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=generator(seed, epoch, "batch"))
        out.append(int(perm[pos]))
    return out[rank * batch:(rank + 1) * batch]


def allreduce_grads(params, world):
    """Data parallel over the trainable parameters: one flat all-reduce of their gradients (mean
    over ranks). Generate/reference passes never touch a DDP wrapper this way, and LoRA grads are
    small enough that one bucket costs nothing."""
    params = list(params)
    if world == 1 or not params:
        return
    for p in params:  # the same flat layout on every rank, even where a parameter got no gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def optimizer_step(params, opt, world, grad_clip, bad=False):
    """The end of every stage's step, after the backward passes: every rank agrees on skipping (a
    non-finite loss or reward anywhere), gradients are all-reduced (mean over ranks), clipped to
    grad_clip (0 = no clipping) and checked, then AdamW steps. A skipped step leaves weights and
    optimizer state untouched. -> (grad norm or None when skipped, skipped)."""
    bad = allreduce_metrics({"bad": float(bad)}, world, {"bad": "max"})["bad"] > 0
    gnorm = None
    if not bad:
        for p in params:  # the same layout on every rank (and the same AdamW update whatever the rank count)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        allreduce_grads([p for p in params if not is_sharded(p)], world)  # FSDP's are reduce-scattered already
        gnorm = fsdp_clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))  # = clip_grad_norm_ unsharded
        bad = not math.isfinite(gnorm)  # identical on all ranks after the all-reduce
    if not bad:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return (None if bad else gnorm), bad


def gather(t, world):
    """All ranks' (N, ...) tensors concatenated in rank order."""
    if world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def allreduce_metrics(d, world, ops=None):
    """Mean over ranks of a dict of floats ('max'/'min' for the keys named in ops)."""
    if world == 1:
        return d
    ops = ops or {}
    out = {}
    for kind, op in (("mean", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        keys = [k for k in d if ops.get(k, "mean") == kind]
        if keys:
            t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            out.update({k: v / (world if kind == "mean" else 1) for k, v in zip(keys, t.tolist())})
    return {k: out[k] for k in d}


def all_bad_files(bad, world):
    """The unreadable files that any rank has met so far (bad: this rank's ImageDataset.bad), sorted; a file that
    two ranks met counts once. Collective under torchrun: every rank calls it at every step."""
    if world == 1:
        return sorted(bad)
    if allreduce_metrics({"n": len(bad)}, world, {"n": "max"})["n"] == 0:  # the usual case: one small all-reduce
        return []
    parts = [None] * world
    dist.all_gather_object(parts, sorted(bad))
    return sorted(set().union(*parts))


def lr_at(step, lr, warmup, total, schedule="cosine"):
    """Linear warmup, then cosine to 10% of lr (or constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class Clock:
    """Wall time per phase of a step: clock.tick("generate") books the time since the last tick."""

    def __init__(self):
        self.t0 = self.t = time.time()
        self.times = {}

    def tick(self, name):
        now = time.time()
        self.times[f"time/{name}"] = now - self.t
        self.t = now

    def total(self):
        return time.time() - self.t0


class RunLog:
    """One fixed-format line per step on rank 0, a JSONL file per run (out_dir/log.jsonl, appended:
    runs.start has already cut it back to the checkpoint's step on --resume), optional wandb/tensorboard."""

    def __init__(self, out_dir, master, args=None, wandb_project="", tensorboard=False):
        self.master, self.wb, self.tb = master, None, None
        if not master:
            return
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a")
        if wandb_project:
            import wandb  # optional
            self.wb = wandb.init(project=wandb_project, config=args, dir=out_dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def log(self, step, d, line=None):
        if not self.master:
            return
        self.f.write(json.dumps({"step": step, **d}) + "\n")
        self.f.flush()
        if self.wb:
            self.wb.log(d, step=step)
        if self.tb:
            for k, v in d.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if line:
            tqdm.write(line)


# ----------------------------------------------------------------------------------------------
# FSDP (docs/algorithm.md §6): PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) for a full DiT
# fine-tune and for sharding frozen bases. Each transformer block is its own FSDP unit, then the
# part's root (embeddings, final norm/projection). Parameters stay fp32 where they are trainable
# (the sharded master weights), are all-gathered in --dtype for compute (MixedPrecisionPolicy
# param_dtype), and gradients are reduce-scattered in fp32. Forward inputs are not cast by FSDP
# (cast_forward_inputs=False): timesteps stay fp32 and UAE.autocast() does the casting, as without
# FSDP. AdamW then holds only its shard of the state; optimizer_step skips its all-reduce for the
# sharded (DTensor) parameters and clips over all of them (fsdp_clip_grad_norm_). The checkpoint
# side (full tensors gathered, the sharded optimizer state in ckpt/sharded/) is checkpoint.py's.

FSDP_BLOCKS = {"transformer": "transformer_blocks",             # SD3 DiT: JointTransformerBlock x num_layers
               "encoder": "model.language_model.layers"}       # Qwen2.5-VL: decoder layers


def is_sharded(t):
    return isinstance(t, DTensor)


def fsdp_shard(m, parts, dtype, world):
    """fully_shard m's `parts` ("transformer", "projector", "encoder"): one FSDP unit per transformer block
    (FSDP_BLOCKS), then the part itself. Call after UAE.precision (fp32 trainable / --dtype frozen) and before
    the optimizer is built. world 1 without a process group: nothing to shard, the model is left as it is (the
    checkpoint is still written in the FSDP format, so that a run can move between rank counts).
    -> m's trainable parameters (DTensors where sharded), in named_parameters order."""
    m.fsdp_parts = tuple(parts)
    if world > 1 or dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
        # Linear on (N, L, h) returns a view; nothing here modifies a part's output in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
        for part in parts:
            mod = getattr(m, part)
            blocks = mod.get_submodule(FSDP_BLOCKS[part]) if part in FSDP_BLOCKS else []
            for blk in blocks:
                fully_shard(blk, mp_policy=mp)
            fully_shard(mod, mp_policy=mp)
    return [p for p in m.parameters() if p.requires_grad]


def fsdp_track(opt, m):
    """Marks opt as the optimizer of an FSDP run (--fsdp): save_train_state writes its state sharded to
    ckpt/sharded/ and load_train_state reads it back there, on any number of ranks. -> opt."""
    opt.uae_fsdp_model = m
    return opt


def fsdp_clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ over a mix of sharded (DTensor, FSDP) and plain (replicated, all-reduced)
    parameters: the total norm combines the DTensor norm (reduced over the shards by DTensor) with the plain one,
    then every gradient is scaled by torch's clip coefficient. Without sharded parameters it is exactly
    clip_grad_norm_. -> total norm (float, the same on every rank)."""
    sharded = [p for p in params if p.grad is not None and is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if len(sharded) == len(params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor())
    from torch.nn.utils import get_total_norm  # torch >= 2.6
    plain = [p for p in params if p.grad is not None and not is_sharded(p.grad)]
    norms = [get_total_norm([p.grad for p in sharded]).full_tensor().float().cpu()]
    norms += [get_total_norm([p.grad for p in plain]).float().cpu()] if plain else []
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for group in (sharded, plain):
        if group:
            torch._foreach_mul_([p.grad for p in group], coef)
    return float(total)
