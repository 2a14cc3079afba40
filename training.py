"""
Training plumbing shared by the three stage scripts: torchrun set-up, seeds, the global batch of
a step, gradient and metric all-reduce, the optimizer step, the lr schedule, the run log, the
train state that makes --resume exact, and what happens when things go wrong: user errors as one
line (cli), checks of flags, data, checkpoints and out_dir before anything is loaded or written
(validate_run), and checkpoints published in one atomic step (save_train_state).
"""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import uuid
import zlib

import numpy as np
import torch

import data as D
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



def arg_parser(cls):
    """HfArgumentParser for a script's @dataclass Args whose errors (a bad value, a missing argument) are
    UsageErrors: one line under cli(), not argparse's usage block."""
    from transformers import HfArgumentParser

    def error(message):
        raise UsageError(f"{message} (see --help)")
    p = HfArgumentParser(cls)
    p.error = error
    return p


def parse_args(cls, argv=None):
    """A script's @dataclass Args from the command line (argv None), a list of strings, or an Args.
    An unknown flag or a bad value is a UsageError naming it."""
    if isinstance(argv, cls):
        return argv
    args, rest = arg_parser(cls).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise UsageError(f"unknown argument(s): {' '.join(rest)} (see --help)")
    return args


# ----------------------------------------------------------------------------------------------
# User errors: one line, exit 2, before anything is loaded or written.

class UsageError(Exception):
    """A flag, file or out_dir the user can fix. cli() prints it as one line `error: ...`, exit 2."""


USER_ERRORS = (UsageError, D.DataError, D.CheckpointError)


def one_line(msg):
    """A message on one line: its lines joined by '; ' (or a space after ':' and '.')."""
    out = ""
    for ln in (x.strip() for x in str(msg).splitlines()):
        if ln:
            out += ("" if not out else " " if out.endswith((":", ".", ";")) else "; ") + ln
    return out


def cli(main):
    """Every script's `if __name__ == "__main__":`. A user error (UsageError, data.DataError,
    data.CheckpointError) prints `error: <one line>` to stderr and exits 2; any other exception is a
    bug and keeps its traceback. main's int result is the exit status (eval), anything else exits 0.
    Under torchrun every rank checks the same things, so rank 0 prints at once and the others wait
    3 s first: torchrun stops them when rank 0 exits, and only an error rank 0 did not have (a file
    missing on one node) gets its own `error: [rank r] ...` line."""
    try:
        rc = main()
    except USER_ERRORS as e:
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank:
            time.sleep(3)
        print(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(e)}", file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(2)
    sys.exit(rc if type(rc) is int else 0)


def need(ok, msg):
    if not ok:
        raise UsageError(msg)


def at_least(args, lo, *flags, why=""):
    """Each --flag a finite number >= lo."""
    for k in flags:
        v = getattr(args, k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
        need(ok, f"--{k} {v}: must be >= {lo}" + (f" ({why})" if why else ""))


def above(args, lo, *flags, why=""):
    """Each --flag a finite number > lo."""
    for k in flags:
        v = getattr(args, k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > lo
        need(ok, f"--{k} {v}: must be > {lo}" + (f" ({why})" if why else ""))


def finite(args, *flags):
    for k in flags:
        v = getattr(args, k)
        need(isinstance(v, (int, float)) and math.isfinite(v), f"--{k} {v}: must be a finite number")


def one_of(args, flag, choices):
    v = getattr(args, flag)
    need(v in choices, f"--{flag} {v!r}: must be one of {' | '.join(map(str, choices))}")


def check_local(flag, p, kind="folder"):
    """A local path (absolute, ./, ~) must exist; a hub id (org/name) is left to the loader."""
    if p and p.startswith(("/", ".", "~")):
        need(os.path.exists(os.path.expanduser(p)), f"--{flag} {p}: no such {kind}")


def safetensors_names(path):
    """The tensor names of a .safetensors file from its header, checking that the file holds all the bytes
    the header promises (a truncated copy is refused here, not deep inside a load). CheckpointError otherwise."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the header needs {8 + n + end}")
    except FileNotFoundError:
        raise D.CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise D.CheckpointError(f"{path} cannot be read (truncated or not safetensors): {e}") from None
    return set(header) - {"__metadata__"}


def check_checkpoint(path, flag="--init"):
    """A checkpoint that load_uae can use, checked without loading anything: uae.json (format, base, arch,
    layers), weights.safetensors complete, every LoRA layer's tensors present. -> meta (+ "path": the folder).
    CheckpointError naming the flag and the file otherwise."""
    d = path
    if os.path.isdir(os.path.join(path, LINK)) or os.path.lexists(os.path.join(path, LINK)):
        d = os.path.join(path, LINK)
        if not os.path.isdir(d):
            raise D.CheckpointError(f"{flag} {path}: {d} points to a folder that does not exist")
    if not os.path.isdir(d):
        raise D.CheckpointError(f"{flag} {path}: no such checkpoint folder")
    mp = os.path.join(d, "uae.json")
    if not os.path.isfile(mp):
        raise D.CheckpointError(f"{flag} {path} is not a UAE checkpoint: no uae.json (expected a folder written by a stage script)")
    try:
        meta = json.load(open(mp, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise D.CheckpointError(f"{mp} is corrupt: {e}") from None
    def need_(ok, what):
        if not ok:
            raise D.CheckpointError(f"{mp}: {what}; not a checkpoint written by a stage script, or damaged")
    need_(isinstance(meta, dict), f"expected a JSON object, got {type(meta).__name__}")
    need_(meta.get("format") == M.CKPT_FORMAT, f"format {meta.get('format')!r}, expected {M.CKPT_FORMAT!r}")
    for key, typ in (("base", dict), ("arch", dict), ("layers", list)):
        need_(isinstance(meta.get(key), typ), f"no {key!r} ({typ.__name__})")
    need_(all(isinstance(meta["base"].get(k), str) for k in ("encoder", "decoder")), "'base' lacks encoder/decoder")
    names = safetensors_names(os.path.join(d, "weights.safetensors"))
    need_("pooled" in names and any(n.startswith("projector.") for n in names),
          "weights.safetensors has no projector / pooled tensors")
    for i, layer in enumerate(meta["layers"]):
        need_(isinstance(layer, dict), f"layer {i} is not an object")
        for part in ("encoder", "transformer"):
            cfg = layer.get(part)
            if cfg is None:
                continue
            need_(isinstance(cfg, dict) and {"r", "alpha", "targets"} <= set(cfg), f"layer {i} {part}: no LoRA r/alpha/targets")
            need_(any(n.startswith(f"layer{i}.{part}.") for n in names), f"layer {i} {part}: its LoRA tensors are missing")
    meta["path"] = os.path.realpath(d)
    return meta


def check_init(init):
    """--init: a checkpoint (check_checkpoint), or released:DIR (the authors' release: a folder, or a hub id,
    that released.py converts and checks when the model loads; its errors are CheckpointErrors too)."""
    if init.startswith("released:"):
        d = init[len("released:"):]
        ok = os.path.isdir(d) or (not d.startswith(("/", ".", "~")) and d.count("/") == 1)
        if not ok:
            raise D.CheckpointError(f"--init {init}: {d} is not a folder (expected the downloaded release)")
        return None
    return check_checkpoint(init, "--init")


# The flags that may change on --resume: cadence, logging, where/what to evaluate, memory-only switches.
# Every other flag changes the optimisation (or the data) and must match the checkpoint's.
RESUME_HARMLESS = {"steps", "stop_after", "save_every", "log_every", "sample_every", "sample_n", "wandb", "tensorboard",
                   "resume", "overwrite", "out_dir", "eval_every", "eval_images", "eval_G", "eval_data", "eval_steps",
                   "grad_ckpt", "micro_batch"}


def _previous_run(out_dir):
    """What in out_dir belongs to an earlier run ('' when nothing: absent, empty, or an empty log only)."""
    if not os.path.isdir(out_dir):
        return ""
    names = sorted(os.listdir(out_dir))
    if names == ["log.jsonl"] and os.path.getsize(os.path.join(out_dir, "log.jsonl")) == 0:
        return ""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def no_data(example):
    """The one line for a run without --data (the bare command on a fresh clone): what to run first."""
    return ("--data is required: a folder of images, or a .jsonl of {\"image\": path, \"caption\": text} lines. "
            f"To try the tiny shapes world first: python data/shapes/prepare.py && {example} "
            "(README.md, 'Stages', has the whole chain)")


def validate_run(args, stage, *, size, datasets=(), harmless=()):
    """The checks every stage shares, after its own flag checks and before anything is loaded or
    written: common flags, --init, --encoder/--decoder/--reward_path paths, the data (parsed in full:
    datasets = [(flag, need_captions)]), and out_dir: a non-empty out_dir needs --resume or --overwrite;
    --resume needs a checkpoint of this stage with the same world size, every rank's RNG state, and the
    same values of every flag outside RESUME_HARMLESS | harmless (all differing ones are named).
    --resume without a checkpoint starts from step 0. -> args (resume False in that case)."""
    one_of(args, "preset", ("tiny", "real"))
    one_of(args, "dtype", ("fp32", "bf16"))
    one_of(args, "schedule", ("cosine", "constant"))
    need(isinstance(size, int) and size > 0 and size % 16 == 0,
         f"--resolution {size}: must be a positive multiple of 16 (VAE factor 8 x DiT patch 2)")
    at_least(args, 1, "steps", "save_every", "log_every", "lora_r", "max_new_tokens", "max_pixels")
    at_least(args, 0, "lr", "weight_decay", "grad_clip", "warmup", "sample_every", "temperature")
    above(args, 0, "lora_alpha")
    for flag, pkg in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        need(not getattr(args, flag) or importlib.util.find_spec(pkg) is not None,
             f"--{flag} needs the {pkg} package (pip install {pkg})")
    for flag in ("encoder", "decoder"):
        check_local(flag, getattr(args, flag))
    if getattr(args, "reward", None) is not None and stage_uses_reward(args):
        import reward as R
        one_of(args, "reward", R.BACKBONES)
        if args.reward_path and args.reward_path != "tiny":
            check_local("reward_path", args.reward_path, "file or folder")
    if args.init:
        check_init(args.init)
    D.MAX_PIXELS = args.max_pixels  # the reader's cap for this process (as PIL's MAX_IMAGE_PIXELS)
    for flag, caps in datasets:
        D.list_dataset(getattr(args, flag), caps, flag=flag)
    return check_out_dir(args, stage, harmless)


def stage_uses_reward(args):
    return "sem" in getattr(args, "objective", "sem")


def check_out_dir(args, stage, harmless=()):
    """out_dir and --resume / --overwrite (see validate_run). Reads only."""
    out = args.out_dir
    need(bool(out), "--out_dir is empty")
    need(not os.path.exists(out) or os.path.isdir(out), f"--out_dir {out}: exists and is not a folder")
    need(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one")
    link = os.path.join(out, LINK)
    if os.path.lexists(link) and not os.path.isdir(link):
        raise D.CheckpointError(f"{link} points to a folder that does not exist; move out_dir aside or use --overwrite")
    cur = ckpt_dir(out) if os.path.isdir(out) else None
    if not args.resume:
        prev = _previous_run(out)
        need(not prev or args.overwrite,
             f"--out_dir {out} already holds a run ({prev}): --resume to continue it, --overwrite to replace it, "
             "or another --out_dir")
        return args
    if cur is None:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"--resume: no checkpoint in {out} yet: starting at step 0", file=sys.stderr)
        return dataclasses.replace(args, resume=False)
    meta = check_checkpoint(out, "--resume: out_dir")
    if meta.get("stage") != stage:
        raise UsageError(f"--resume: {meta['path']} was written by {meta.get('stage')!r}, not {stage}: resume in that "
                         f"stage's script, or start this stage from it with --init {out}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    saved_world = meta.get("world", 1)
    resharded = resharded_resume(args, meta, world, stage) if saved_world != world else set()   # FSDP only
    for r in range(saved_world):
        rp = os.path.join(meta["path"], f"rng{r}.safetensors")
        if not os.path.isfile(rp):
            raise D.CheckpointError(f"--resume: {meta['path']} has no RNG state for rank {r} (rng{r}.safetensors): "
                                    "it cannot be continued exactly; start over with --overwrite, or from it with --init")
        safetensors_names(rp)
    saved = meta.get("args")
    need(isinstance(saved, dict), f"--resume: {meta['path']}/uae.json records no flags ('args')")
    skip = RESUME_HARMLESS | set(harmless) | resharded
    diff = []
    for f in dataclasses.fields(args):
        if f.name in skip:
            continue
        given = getattr(args, f.name)
        was = saved[f.name] if f.name in saved else f.default  # a flag added since: its default then
        if was != given:
            diff.append(f"--{f.name} {was!r} (given {given!r})")
    need(not diff, f"--resume: {meta['path']} (step {meta.get('step')}) was trained with other settings: "
                   f"{', '.join(diff)}; resume with the saved values, or start a new run (--overwrite or another --out_dir)")
    step = meta.get("step", 0)
    need(args.steps >= step, f"--steps {args.steps} is below the checkpoint's step {step}")
    return args


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
    """One fixed-format line per step on rank 0, a JSONL file per run, optional wandb/tensorboard.
    Made after validate_run, so a refused run never touches out_dir. On rank 0 it first prepares
    out_dir: with overwrite, the previous run's outputs go (remove_run); leftovers of an interrupted
    checkpoint write are removed (clean_leftovers); with resume, the log is cut back to the
    checkpoint's `step` (trim_log: a crash after the checkpoint leaves lines that the resumed run
    writes again), and without it to nothing (validate_run lets a fresh run into a folder with a log
    only when that log is empty, or the run is --resume finding no checkpoint: its steps are redone).
    The log is then opened for append."""

    def __init__(self, out_dir, master, args=None, wandb_project="", tensorboard=False, resume=False, step=0,
                 overwrite=False):
        self.master, self.wb, self.tb = master, None, None
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        if overwrite and not resume:
            remove_run(out_dir)
        clean_leftovers(out_dir)
        path = os.path.join(out_dir, "log.jsonl")
        trim_log(path, step if resume else -1)  # a fresh start: only --resume without a checkpoint leaves lines here
        self.f = open(path, "a")
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


def trim_log(path, step):
    """Keep the log lines of steps <= step (and a line whose step cannot be read, unless it is the torn
    last line of a killed write); rewritten through a temporary file and one rename, never in place."""
    if not os.path.isfile(path):
        return
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            d = json.loads(ln)
            s = d.get("step", 0) if isinstance(d, dict) else 0
        except ValueError:
            if i >= len(lines) - 2:  # the torn last line of a killed write
                continue
            keep.append(ln)
            continue
        if not isinstance(s, (int, float)) or s <= step:
            keep.append(ln)
    new = "".join(ln + "\n" for ln in keep)
    if new != open(path, encoding="utf-8", errors="replace").read():
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Checkpoints. out_dir/ckpt is a symlink to a complete folder ckpt.<step> (weights.safetensors with the
# optimizer, uae.json with step, world and args, rng<r>.safetensors for every rank). A new checkpoint is
# written in full beside the old one, synced, and published by one atomic rename of a new link over
# `ckpt`; only then is the old folder deleted. A reader (--resume, --init out/x, --init out/x/ckpt) sees
# the old checkpoint or the new one, never a part, and there is no moment without one.

LINK = "ckpt"
LEGACY = "ckpt.legacy"   # a real ckpt/ folder of an earlier version, moved aside on the first new save


def _phase(name):
    """Fault-injection point of the checkpoint write (tests set _crash_hook to kill the write here)."""
    if _crash_hook is not None:
        _crash_hook(name)


_crash_hook = None


def _fsync(path, is_dir=False):
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_target(name):
    """ckpt.000123 or ckpt.000123.2: a checkpoint folder this code wrote (the link points to one of them)."""
    parts = name.split(".")
    return len(parts) in (2, 3) and parts[0] == LINK and all(p.isdigit() for p in parts[1:])


def ckpt_dir(out_dir):
    """The folder of out_dir's checkpoint (the link resolved) or None. Finishes the one two-rename
    publish there is (a pre-link ckpt/ folder moved to ckpt.legacy, the new link not yet in place)."""
    link = os.path.join(out_dir, LINK)
    if not os.path.lexists(link) and os.path.isfile(os.path.join(out_dir, LEGACY, "uae.json")):
        _replace_link(out_dir, LEGACY)
    return os.path.realpath(link) if os.path.isdir(link) else None


def _replace_link(out_dir, target_name):
    """Point out_dir/ckpt at target_name (relative: the folder can be moved) with one atomic rename."""
    tmp = os.path.join(out_dir, f".ckpt-link-{uuid.uuid4().hex[:8]}")
    os.symlink(target_name, tmp)
    _phase("link-made")
    os.replace(tmp, os.path.join(out_dir, LINK))


def clean_leftovers(out_dir):
    """Rank 0 at start: remove what an interrupted write left behind (.ckpt-* temporary folders and
    links, .old-* folders of the earlier publish, ckpt.<step> folders the link does not point to)."""
    if not os.path.isdir(out_dir):
        return
    cur = ckpt_dir(out_dir)
    link_exists = os.path.lexists(os.path.join(out_dir, LINK))
    for name in os.listdir(out_dir):
        p = os.path.join(out_dir, name)
        stale = name.startswith((".ckpt-", ".old-")) or (_is_target(name) and os.path.realpath(p) != cur)
        stale |= name == LEGACY and link_exists and os.path.realpath(p) != cur
        if stale:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.remove(p)
                except OSError:
                    pass


def remove_run(out_dir):
    """--overwrite: the previous run's outputs (log.jsonl, the checkpoint, samples/, tb/); nothing else."""
    cur = ckpt_dir(out_dir)
    for name in ("log.jsonl", LINK):
        p = os.path.join(out_dir, name)
        if os.path.islink(p) or os.path.isfile(p):
            os.remove(p)
        elif os.path.isdir(p):
            shutil.rmtree(p)
    if cur and os.path.isdir(cur):
        shutil.rmtree(cur)
    for name in ("samples", "tb"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def publish_checkpoint(out_dir, step, write, rng_states):
    """Write a complete checkpoint folder ckpt.<step> (write(path) makes weights + uae.json; then one
    rng<r>.safetensors per rank), sync it, and publish it with one atomic rename of a new `ckpt` link.
    Then delete the folder the link pointed to before. -> the new folder."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    name, k = f"{LINK}.{step:06d}", 1
    while os.path.lexists(os.path.join(out_dir, name)):
        name, k = f"{LINK}.{step:06d}.{k}", k + 1
    target = os.path.join(out_dir, name)
    _phase("begin")
    write(target)                                       # model.save_checkpoint: a .ckpt-* folder, renamed to target
    _phase("weights")
    for r, t in enumerate(rng_states):
        save_file(t, os.path.join(target, f"rng{r}.safetensors"))
        _phase(f"rng{r}")
    for f in os.listdir(target):
        _fsync(os.path.join(target, f))
    _fsync(target, is_dir=True)
    link = os.path.join(out_dir, LINK)
    old = ckpt_dir(out_dir)
    if os.path.isdir(link) and not os.path.islink(link):  # a ckpt/ folder of an earlier version: moved aside
        os.replace(link, os.path.join(out_dir, LEGACY))     # (ckpt_dir finishes this if killed in between)
        old = os.path.join(out_dir, LEGACY)
    _phase("link")
    _replace_link(out_dir, name)                        # the publish: one rename
    _fsync(out_dir, is_dir=True)
    _phase("published")
    if old and os.path.realpath(old) != os.path.realpath(target):
        shutil.rmtree(old, ignore_errors=True)
    _phase("done")
    return target


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
    """Checkpoint for an exact --resume: weights + optimizer (rank 0) and every rank's RNG state (gathered
    to rank 0), all inside one folder before its single atomic publish (publish_checkpoint)."""
    import torch.distributed as dist
    rngs = [rng_tensors()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_tensors())
    fsdp_m = getattr(opt, "uae_fsdp_model", None)   # FSDP (fsdp_track): full weights gathered, optimizer state sharded
    full_state = staging = None
    if fsdp_m is not None:                           # collectives: every rank, before rank 0 writes
        full_state = fsdp_full_state(fsdp_m, rank)
        staging = fsdp_save_optimizer(out_dir, step, fsdp_m, opt)
    if rank == 0:
        ot, groups = optimizer_tensors(opt) if fsdp_m is None else ({}, None)
        meta = {"stage": stage, "step": step, "args": args, "optim_groups": groups, "world": world,
                "optim_sharded": fsdp_m is not None, **(extra_meta or {})}

        def write(path):
            M.save_checkpoint(path, m, meta, lora_cfg, transformer_full, tensors_extra=ot, state=full_state)
            if staging:                              # the sharded state joins the folder before its publish
                os.replace(staging, os.path.join(path, "sharded"))
        publish_checkpoint(out_dir, step, write, rngs)
    if world > 1:
        dist.barrier()


def load_train_state(out_dir, opt, rank, world):
    """-> (step, meta) after restoring the optimizer and this rank's RNG from out_dir/ckpt. A checkpoint
    without this rank's RNG state is refused: it could only continue differently."""
    from safetensors.torch import load_file
    path = ckpt_dir(out_dir) or os.path.join(out_dir, LINK)
    meta, tensors = M.read_checkpoint(path)
    fsdp_m = getattr(opt, "uae_fsdp_model", None)   # FSDP: any rank count (the optimizer state is resharded)
    resharded = meta.get("world", world) != world
    if resharded and not (fsdp_m is not None and meta.get("optim_sharded")):
        raise M.CheckpointError(f"{meta['path']} was written with {meta['world']} ranks; resume with the same number (got {world})")
    if meta.get("optim_sharded") and fsdp_m is None:
        raise M.CheckpointError(f"{meta['path']} was written with --fsdp (sharded optimizer state): resume with --fsdp")
    if resharded:  # rank r of another rank count draws another stream: its RNG is not restored (seed_of draws agree)
        fsdp_load_optimizer(meta["path"], fsdp_m, opt)
        return meta["step"], meta
    rp = os.path.join(meta["path"], f"rng{rank}.safetensors")
    if not os.path.isfile(rp):
        raise M.CheckpointError(f"{meta['path']} has no RNG state for rank {rank} (rng{rank}.safetensors): "
                                "--resume cannot continue it exactly")
    if fsdp_m is not None:
        fsdp_load_optimizer(meta["path"], fsdp_m, opt)
    else:
        load_optimizer(opt, tensors, meta["optim_groups"])
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


def fsdp_save_optimizer(out_dir, step, m, opt):
    """The optimizer's sharded state (AdamW moments of every shard, keyed by parameter name) with
    torch.distributed.checkpoint into a staging folder out_dir/.ckpt-sharded-<step> (every rank writes its shards;
    DCP syncs the files), which save_train_state moves into the checkpoint folder as sharded/ before the publish
    (an interrupted write leaves a .ckpt-* folder: clean_leftovers removes it). Collective. -> the staging folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    d = os.path.join(out_dir, f".ckpt-sharded-{step:06d}")
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.exists(d):
        shutil.rmtree(d)
    if dist.is_initialized():
        dist.barrier()
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


def resharded_resume(args, meta, world, stage):
    """check_out_dir for a --resume on another rank count: only with --fsdp and a checkpoint written with --fsdp,
    and only at the same global batch (per-rank batch x grad_accum x ranks: the same samples and seeds each
    step). -> the flags that may then differ (the per-rank batch, grad_accum)."""
    saved_world = meta.get("world", 1)
    need(getattr(args, "fsdp", False) and meta.get("optim_sharded"),
         f"--resume: {meta['path']} was written by {saved_world} ranks, this run has {world}: resume with the same "
         "number of ranks (a run with --fsdp, resumed with --fsdp, may change it)")
    key = FSDP_PER_RANK_BATCH[stage]
    saved = meta.get("args") or {}
    old = (saved.get(key) or 0) * (saved.get("grad_accum") or 1) * saved_world
    new = getattr(args, key) * getattr(args, "grad_accum", 1) * world
    need(old == new, f"--resume: {meta['path']} was written with a global batch of {old} ({saved_world} ranks x --{key} "
                     f"{saved.get(key)} x --grad_accum {saved.get('grad_accum') or 1}); {world} ranks x --{key} "
                     f"{getattr(args, key)} x --grad_accum {getattr(args, 'grad_accum', 1)} is {new}: keep the product")
    return {key, "grad_accum"}


FSDP_PER_RANK_BATCH = {"stage1": "batch_size", "stage2": "batch_size", "stage3": "groups"}
