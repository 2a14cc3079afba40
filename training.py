"""
Training plumbing shared by the three stage scripts: torchrun set-up, seeds, the global batch of
a step, gradient and metric all-reduce, the optimizer step, the lr schedule, the run log, and the
train state that makes --resume exact.
"""
import json
import math
import os
import time
import zlib

import numpy as np
import torch

import model as M


def seed_of(*keys):
    """The one seed derivation of this repo: a 63-bit seed from keys, e.g. (seed, step, global
    group id, "sde_noise"); a string key names the purpose (hashed with crc32). Every random draw
    that must not depend on the rank count, the batch split or a resume is seeded by this."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2 ** 63 for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(*keys, device="cpu"):
    """A torch.Generator seeded by seed_of(*keys)."""
    return torch.Generator(device).manual_seed(seed_of(*keys))



def parse_args(cls, argv=None):
    """A script's @dataclass Args from the command line (argv None), a list of strings, or an Args."""
    if isinstance(argv, cls):
        return argv
    from transformers import HfArgumentParser
    return HfArgumentParser(cls).parse_args_into_dataclasses(args=argv)[0]


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


def dist_setup(seed):
    """torchrun -> (rank, world, device); plain python -> (0, 1, cuda:0 or cpu). Seeds offset by rank."""
    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local = 0, 1, 0
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(seed + rank)
    return rank, world, device


def allreduce_grads(params, world):
    """Data parallel over the trainable parameters: one flat all-reduce of their gradients (mean
    over ranks). Generate/reference passes never touch a DDP wrapper this way, and LoRA grads are
    small enough that one bucket costs nothing."""
    params = list(params)
    if world == 1 or not params:
        return
    import torch.distributed as dist
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
    import torch.distributed as dist
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def allreduce_metrics(d, world, ops=None):
    """Mean over ranks of a dict of floats ('max'/'min' for the keys named in ops)."""
    if world == 1:
        return d
    import torch.distributed as dist
    ops = ops or {}
    out = {}
    for kind, op in (("mean", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        keys = [k for k in d if ops.get(k, "mean") == kind]
        if keys:
            t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            out.update({k: v / (world if kind == "mean" else 1) for k, v in zip(keys, t.tolist())})
    return {k: out[k] for k in d}


def lr_at(step, lr, warmup, total, schedule="cosine"):
    """Linear warmup, then cosine to 10% of lr (or constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class RunLog:
    """One fixed-format line per step on rank 0, a JSONL file per run, optional wandb/tensorboard."""

    def __init__(self, out_dir, master, args=None, wandb_project="", tensorboard=False, resume=False):
        self.master, self.wb, self.tb = master, None, None
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w")
        if wandb_project:
            import wandb
            self.wb = wandb.init(project=wandb_project, config=args, dir=out_dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
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
            from tqdm import tqdm
            tqdm.write(line)


def rng_tensors():
    t = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    return t


def set_rng(tensors):
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_train_state(out_dir, m, args, step, opt, lora_cfg, rank, world, stage, transformer_full=False, extra_meta=None):
    """Checkpoint (rank 0: weights + optimizer) and each rank's RNG state, for an exact --resume."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    path = os.path.join(out_dir, "ckpt")
    fsdp_m = getattr(opt, "uae_fsdp_model", None)           # FSDP: full weights gathered, optimizer sharded (DCP)
    full_state = fsdp_full_state(fsdp_m, rank) if fsdp_m is not None else None
    if rank == 0:
        ot, groups = optimizer_tensors(opt) if fsdp_m is None else ({}, None)
        M.save_checkpoint(path, m, {"stage": stage, "step": step, "args": args, "optim_groups": groups, "world": world,
                                  "optim_sharded": fsdp_m is not None, **(extra_meta or {})}, lora_cfg, transformer_full,
                          tensors_extra=ot, state=full_state)
    if world > 1:
        dist.barrier()
    if fsdp_m is not None:
        fsdp_save_optimizer(path, fsdp_m, opt)
    tmp = os.path.join(path, f".rng{rank}.tmp")
    save_file(rng_tensors(), tmp)
    os.replace(tmp, os.path.join(path, f"rng{rank}.safetensors"))
    if world > 1:
        dist.barrier()


def load_train_state(out_dir, opt, rank, world):
    """-> (step, meta) after restoring the optimizer and this rank's RNG from out_dir/ckpt."""
    from safetensors.torch import load_file
    meta, tensors = M.read_checkpoint(os.path.join(out_dir, "ckpt"))
    fsdp_m = getattr(opt, "uae_fsdp_model", None)           # FSDP: any rank count (the optimizer is resharded)
    if meta.get("world", world) != world and not (fsdp_m is not None and meta.get("optim_sharded")):
        raise M.CheckpointError(f"{meta['path']} was written with {meta['world']} ranks; resume with the same number (got {world})")
    if fsdp_m is not None:
        fsdp_load_optimizer(meta["path"], fsdp_m, opt)
    elif meta.get("optim_sharded"):
        raise M.CheckpointError(f"{meta['path']} was written with --fsdp (sharded optimizer state): resume with --fsdp")
    else:
        load_optimizer(opt, tensors, meta["optim_groups"])
    rp = os.path.join(meta["path"], f"rng{rank}.safetensors")
    if os.path.exists(rp):
        set_rng(load_file(rp))
    return meta["step"], meta


def optimizer_tensors(opt):
    """AdamW state as flat tensors (safetensors has no pickles) + the JSON-able rest."""
    sd = opt.state_dict()
    t = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return t, sd["param_groups"]


def load_optimizer(opt, tensors, groups):
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def batch_indices(n, batch, step, seed, rank=0, world=1):
    """The global batch for `step` (a seeded permutation per epoch), this rank's slice of it."""
    g = batch * world
    out = []
    for k in range(step * g, step * g + g):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=generator(seed, epoch, "batch"))
        out.append(int(perm[pos]))
    return out[rank * batch:(rank + 1) * batch]




# ----------------------------------------------------------------------------------------------
# FSDP (docs/algorithm.md §6): PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) for a full DiT
# fine-tune and for sharding frozen bases. Each transformer block is its own FSDP unit, then the
# part's root (embeddings, final norm/projection). Parameters stay fp32 where they are trainable
# (the sharded master weights), are all-gathered in --dtype for compute (MixedPrecisionPolicy
# param_dtype), and gradients are reduce-scattered in fp32. Forward inputs are not cast by FSDP
# (cast_forward_inputs=False): timesteps stay fp32 and UAE.autocast() does the casting, as without
# FSDP. AdamW then holds only its shard of the state; optimizer_step skips its all-reduce for the
# sharded (DTensor) parameters and clips over all of them (fsdp_clip_grad_norm_).
# Checkpoints: the full safetensors checkpoint as without FSDP (fsdp_full_state gathers what it
# holds) + the sharded optimizer state in ckpt/sharded/ (torch.distributed.checkpoint), which a
# run on another number of ranks reads back (resharded).

FSDP_BLOCKS = {"transformer": "transformer_blocks",             # SD3 DiT: JointTransformerBlock x num_layers
               "encoder": "model.language_model.layers"}       # Qwen2.5-VL: decoder layers


def is_sharded(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def fsdp_shard(m, parts, dtype, world):
    """fully_shard m's `parts` ("transformer", "projector", "encoder"): one FSDP unit per transformer block
    (FSDP_BLOCKS), then the part itself. Call after UAE.precision (fp32 trainable / --dtype frozen) and before
    the optimizer is built. world 1 without a process group: nothing to shard, the model is left as it is (the
    checkpoint is still written in the FSDP format, so that a run can move between rank counts).
    -> m's trainable parameters (DTensors where sharded), in named_parameters order."""
    import torch.distributed as dist
    m.fsdp_parts = tuple(parts)
    if world > 1 or dist.is_initialized():
        import warnings
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
    from torch.nn.utils import get_total_norm
    plain = [p for p in params if p.grad is not None and not is_sharded(p.grad)]
    norms = [get_total_norm([p.grad for p in sharded]).full_tensor().float().cpu()]
    norms += [get_total_norm([p.grad for p in plain]).float().cpu()] if plain else []
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for group in (sharded, plain):
        if group:
            torch._foreach_mul_([p.grad for p in group], coef)
    return float(total)


def fsdp_full_state(m, rank):
    """The full (unsharded) tensors that the safetensors checkpoint holds for each sharded part: a full DiT
    (m.transformer_full or a --dit_full run) or only its LoRA, the projector. Collective: every rank calls it; each
    sharded tensor is all-gathered (DTensor.full_tensor) one at a time, rank 0 keeps a CPU copy.
    -> {part: state_dict} on rank 0 (None elsewhere, and when nothing is sharded)."""
    parts = getattr(m, "fsdp_parts", ())
    if not any(is_sharded(p) for part in parts for p in getattr(m, part).parameters()):
        return None
    out = {}
    for part in parts:
        mod = getattr(m, part)  # whole part saved: projector, a full DiT (trained in full now or in an earlier stage)
        full = part == "projector" or getattr(m, "transformer_full", False) or \
            any(p.requires_grad for n, p in mod.named_parameters() if "lora_" not in n)
        sd = {}
        for k, v in mod.state_dict().items():
            if not (full or "lora_" in k):
                continue
            v = v.full_tensor() if is_sharded(v) else v
            if rank == 0:
                sd[k] = v.detach().cpu()
        out[part] = sd
    return out if rank == 0 else None


def _dcp_kw():
    import warnings
    import torch.distributed as dist
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")  # no_dist: meant
    return {"no_dist": not dist.is_initialized()}


def fsdp_save_optimizer(path, m, opt):
    """The optimizer's sharded state (AdamW moments of every shard, keyed by parameter name) to path/sharded/
    with torch.distributed.checkpoint; collective (every rank writes its shards). -> that folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    d = os.path.join(path, "sharded")
    dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=d, **_dcp_kw())
    return d


def fsdp_load_optimizer(path, m, opt):
    """Reads path/sharded/ into opt, resharded for this run's ranks (2 -> 1, 1 -> 2, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    d = os.path.join(path, "sharded")
    if not os.path.isdir(d):
        raise M.CheckpointError(f"{path} has no sharded optimizer state (sharded/): it was not written with --fsdp")
    osd = get_optimizer_state_dict(m, opt)   # allocates the state in this run's sharding
    dcp.load({"optim": osd}, checkpoint_id=d, **_dcp_kw())
    set_optimizer_state_dict(m, opt, osd)


def check_global_batch(meta, world, per_rank, key="batch_size"):
    """A resume on another number of ranks (FSDP) continues the same run only with the same global batch:
    per-rank batch (args[key] x grad_accum) x ranks as written. meta: load_train_state's."""
    a = meta.get("args") or {}
    old = (a.get(key) or 0) * (a.get("grad_accum") or 1) * meta.get("world", world)
    if meta.get("world", world) != world and old != per_rank * world:
        raise M.CheckpointError(f"{meta['path']}: written with a global batch of {old} ({meta.get('world')} ranks); "
                                f"{world} ranks x {per_rank} is {per_rank * world}: set the per-rank batch to {old // world}")
