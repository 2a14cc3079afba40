"""
This project's checkpoint, on disk. A checkpoint is a folder: weights.safetensors + uae.json. It holds
only what was trained: the projector, the pooled buffer, and the LoRA adapters of every stage so far
(earlier stages' are merged when loaded, the last one stays live with --resume), a fully trained DiT's
weights when there is one, and for a run the optimizer state and every rank's RNG. Everything is
written to a temporary folder and published with one rename: a reader never sees half a checkpoint.
"""
import json
import os
import shutil
import tempfile
import uuid
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from images import CheckpointError, atomic_publish
from model import add_lora, lora_state, merge_lora
from training import is_sharded

CKPT_FORMAT = "uae-ckpt-v1"


def arch_of(m):
    return {"hidden": m.encoder.config.text_config.hidden_size, "vocab": m.suppress.numel(),
            "joint_attention_dim": m.transformer.config.joint_attention_dim,
            "pooled_dim": m.pooled.numel(), "dit_layers": m.transformer.config.num_layers}


def checkpoint_dir(path):
    """A run folder -> its published checkpoint, <run>/ckpt; a checkpoint folder -> itself."""
    return os.path.join(path, "ckpt") if os.path.isdir(os.path.join(path, "ckpt")) else path


def checkpoint_id(init):
    """What --init's checkpoint is, not only where: the published checkpoint folder and its files' sizes and
    modification times (a stage rerun into the same out_dir writes a new checkpoint under the same path). None
    for a base model or released:DIR. Outputs made from a checkpoint record it, so a rerun can tell."""
    if not init or init.startswith("released:"):
        return None
    d = os.path.realpath(checkpoint_dir(init))
    files = [os.path.join(d, f) for f in ("uae.json", "weights.safetensors")]
    return [d] + [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]


def read_checkpoint(path):
    """-> (meta, tensors). Clear errors for a missing, truncated or foreign checkpoint."""
    path = checkpoint_dir(path)
    mp, wp = os.path.join(path, "uae.json"), os.path.join(path, "weights.safetensors")
    if not os.path.isfile(mp):
        raise CheckpointError(f"{path} is not a UAE checkpoint: no uae.json (expected a directory written by a stage script)")
    try:
        meta = json.load(open(mp))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mp} is corrupt: {e}") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{mp}: format {meta.get('format')!r}, expected {CKPT_FORMAT!r}")
    if not os.path.isfile(wp):
        raise CheckpointError(f"{path}: weights.safetensors is missing")
    try:
        tensors = load_file(wp)
    except Exception as e:
        raise CheckpointError(f"{wp} cannot be read (truncated or not safetensors): {e}") from None
    meta["path"] = os.path.abspath(path)
    return meta, tensors


def apply_checkpoint(m, meta, tensors, live_last=False):
    arch = arch_of(m)
    if meta["arch"] != arch:
        diff = {k: (meta["arch"].get(k), arch[k]) for k in arch if meta["arch"].get(k) != arch[k]}
        raise CheckpointError(f"{meta['path']} was trained for another architecture (checkpoint, model): {diff}")
    m.projector.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
    m.pooled.copy_(tensors["pooled"])
    if meta.get("transformer_full"):
        m.transformer_full = True  # a full-DiT lineage: every later save keeps the full weights
        m.transformer.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("transformer.")}, strict=False)
    for i, layer in enumerate(meta["layers"]):
        pre = f"layer{i}."
        lt = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        for part in ("encoder", "transformer"):
            if layer.get(part):
                mod = getattr(m, part)
                add_lora(mod, **layer[part])
                for n, p in mod.named_parameters():  # fp32 adapters: the saved fp32 tensors come back exactly
                    if "lora_" in n:
                        p.data = p.data.float()
                sd = {k[len(part) + 1:]: v for k, v in lt.items() if k.startswith(part + ".")}
                missing = set(lora_state(mod)) - set(sd)
                if missing:
                    raise CheckpointError(f"{meta['path']}: layer {i} lacks {len(missing)} {part} LoRA tensors, e.g. {sorted(missing)[0]}")
                mod.load_state_dict(sd, strict=False)
        if live_last and meta.get("live_layer") and i == len(meta["layers"]) - 1:
            return
        m.layers.append((layer, lt))
        for part in ("encoder", "transformer"):
            if layer.get(part):
                merge_lora(getattr(m, part))


def save_checkpoint(path, m, meta_extra, lora_cfg=None, transformer_full=False, tensors_extra=None, state=None):
    """Atomically write a checkpoint directory: earlier layers + this stage's live adapters. state: {part:
    state_dict} read in place of the module's own (FSDP: the full tensors training.fsdp_full_state gathered)."""
    sd = lambda part: (state or {}).get(part) if part in (state or {}) else getattr(m, part).state_dict()
    t = {f"projector.{k}": v for k, v in sd("projector").items()}
    t["pooled"] = m.pooled
    transformer_full = transformer_full or getattr(m, "transformer_full", False)
    layers = []
    for i, (layer, lt) in enumerate(m.layers):
        if transformer_full:  # merged earlier DiT adapters are inside the full weights saved below
            layer = {**layer, "transformer": None}
            lt = {k: v for k, v in lt.items() if not k.startswith("transformer.")}
        layers.append(layer)
        t.update({f"layer{i}.{k}": v for k, v in lt.items()})
    cur = {p: (lora_cfg or {}).get(p) for p in ("encoder", "transformer")}
    if any(cur.values()):
        i = len(layers)
        layers.append(cur)
        for p in ("encoder", "transformer"):
            if cur[p]:
                lt_p = lora_state(getattr(m, p)) if p not in (state or {}) else {k: v for k, v in sd(p).items() if "lora_" in k}
                t.update({f"layer{i}.{p}.{k}": v for k, v in lt_p.items()})
    if transformer_full:
        t.update({f"transformer.{k.replace('.base_layer', '')}": v  # base names; a live LoRA goes in its layer
                  for k, v in sd("transformer").items() if "lora_" not in k})
    t.update(tensors_extra or {})
    meta = {"format": CKPT_FORMAT, "base": m.base, "arch": arch_of(m), "layers": layers,
            "transformer_full": transformer_full, "live_layer": any(cur.values()), **meta_extra}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)) or ".", prefix=".ckpt-")
    save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, os.path.join(tmp, "weights.safetensors"))
    with open(os.path.join(tmp, "uae.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    atomic_publish(tmp, path)


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
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} cannot be read (truncated or not safetensors): {e}") from None
    return set(header) - {"__metadata__"}


def check_checkpoint(path, flag="--init"):
    """A checkpoint that load_uae can use, checked without loading anything: uae.json (format, base, arch,
    layers), weights.safetensors complete, every LoRA layer's tensors present. -> meta (+ "path": the folder).
    CheckpointError naming the flag and the file otherwise."""
    d = path
    if os.path.isdir(os.path.join(path, LINK)) or os.path.lexists(os.path.join(path, LINK)):
        d = os.path.join(path, LINK)
        if not os.path.isdir(d):
            raise CheckpointError(f"{flag} {path}: {d} points to a folder that does not exist")
    if not os.path.isdir(d):
        raise CheckpointError(f"{flag} {path}: no such checkpoint folder")
    mp = os.path.join(d, "uae.json")
    if not os.path.isfile(mp):
        raise CheckpointError(f"{flag} {path} is not a UAE checkpoint: no uae.json (expected a folder written by a stage script)")
    try:
        meta = json.load(open(mp, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mp} is corrupt: {e}") from None
    def need_(ok, what):
        if not ok:
            raise CheckpointError(f"{mp}: {what}; not a checkpoint written by a stage script, or damaged")
    need_(isinstance(meta, dict), f"expected a JSON object, got {type(meta).__name__}")
    need_(meta.get("format") == CKPT_FORMAT, f"format {meta.get('format')!r}, expected {CKPT_FORMAT!r}")
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


# ----------------------------------------------------------------------------------------------
# The run folder. out_dir/ckpt is a symlink to a complete folder ckpt.<step> (weights.safetensors with the
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


def fsync(path, is_dir=False):
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


def prepare_out_dir(out_dir, resume, step, overwrite):
    """Rank 0 at a run's start (runs.start), after validation: with overwrite the previous run's outputs go
    (remove_run); leftovers of an interrupted checkpoint write go (clean_leftovers); the log is cut back to
    the checkpoint's `step` on resume (trim_log: a crash after the checkpoint leaves lines that the resumed
    run writes again), and to nothing otherwise (runs.validate_run lets a fresh run into a folder with a log
    only when that log is empty, or the run is --resume finding no checkpoint: its steps are redone)."""
    os.makedirs(out_dir, exist_ok=True)
    if overwrite and not resume:
        remove_run(out_dir)
    clean_leftovers(out_dir)
    trim_log(os.path.join(out_dir, "log.jsonl"), step if resume else -1)


def publish_checkpoint(out_dir, step, write, rng_states):
    """Write a complete checkpoint folder ckpt.<step> (write(path) makes weights + uae.json; then one
    rng<r>.safetensors per rank), sync it, and publish it with one atomic rename of a new `ckpt` link.
    Then delete the folder the link pointed to before. -> the new folder."""
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
        fsync(os.path.join(target, f))
    fsync(target, is_dir=True)
    link = os.path.join(out_dir, LINK)
    old = ckpt_dir(out_dir)
    if os.path.isdir(link) and not os.path.islink(link):  # a ckpt/ folder of an earlier version: moved aside
        os.replace(link, os.path.join(out_dir, LEGACY))     # (ckpt_dir finishes this if killed in between)
        old = os.path.join(out_dir, LEGACY)
    _phase("link")
    _replace_link(out_dir, name)                        # the publish: one rename
    fsync(out_dir, is_dir=True)
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
            save_checkpoint(path, m, meta, lora_cfg, transformer_full, tensors_extra=ot, state=full_state)
            if staging:                              # the sharded state joins the folder before its publish
                os.replace(staging, os.path.join(path, "sharded"))
        publish_checkpoint(out_dir, step, write, rngs)
    if world > 1:
        dist.barrier()


def load_train_state(out_dir, opt, rank, world):
    """-> (step, meta) after restoring the optimizer and this rank's RNG from out_dir/ckpt. A checkpoint
    without this rank's RNG state is refused: it could only continue differently."""
    path = ckpt_dir(out_dir) or os.path.join(out_dir, LINK)
    meta, tensors = read_checkpoint(path)
    fsdp_m = getattr(opt, "uae_fsdp_model", None)   # FSDP: any rank count (the optimizer state is resharded)
    resharded = meta.get("world", world) != world
    if resharded and not (fsdp_m is not None and meta.get("optim_sharded")):
        raise CheckpointError(f"{meta['path']} was written with {meta['world']} ranks; resume with the same number (got {world})")
    if meta.get("optim_sharded") and fsdp_m is None:
        raise CheckpointError(f"{meta['path']} was written with --fsdp (sharded optimizer state): resume with --fsdp")
    if resharded:  # rank r of another rank count draws another stream: its RNG is not restored (seed_of draws agree)
        fsdp_load_optimizer(meta["path"], fsdp_m, opt)
        return meta["step"], meta
    rp = os.path.join(meta["path"], f"rng{rank}.safetensors")
    if not os.path.isfile(rp):
        raise CheckpointError(f"{meta['path']} has no RNG state for rank {rank} (rng{rank}.safetensors): "
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


# ----------------------------------------------------------------------------------------------
# FSDP runs (training.fsdp_shard): the full safetensors checkpoint as without FSDP (fsdp_full_state gathers
# what it holds) + the sharded optimizer state in ckpt/sharded/ (torch.distributed.checkpoint), which a run
# on another number of ranks reads back (resharded).

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
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")  # no_dist: meant
    return {"no_dist": not dist.is_initialized()}


def fsdp_save_optimizer(out_dir, step, m, opt):
    """The optimizer's sharded state (AdamW moments of every shard, keyed by parameter name) with
    torch.distributed.checkpoint into a staging folder out_dir/.ckpt-sharded-<step> (every rank writes its shards;
    DCP syncs the files), which save_train_state moves into the checkpoint folder as sharded/ before the publish
    (an interrupted write leaves a .ckpt-* folder: clean_leftovers removes it). Collective. -> the staging folder."""
    d = os.path.join(out_dir, f".ckpt-sharded-{step:06d}")
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.exists(d):
        shutil.rmtree(d)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=d, **_dcp_kw())
    return d


def fsdp_load_optimizer(path, m, opt):
    """Reads path/sharded/ into opt, resharded for this run's ranks (2 -> 1, 1 -> 2, ...)."""
    d = os.path.join(path, "sharded")
    if not os.path.isdir(d):
        raise CheckpointError(f"{path} has no sharded optimizer state (sharded/): it was not written with --fsdp")
    osd = get_optimizer_state_dict(m, opt)   # allocates the state in this run's sharding
    dcp.load({"optim": osd}, checkpoint_id=d, **_dcp_kw())
    set_optimizer_state_dict(m, opt, osd)
