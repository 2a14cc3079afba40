"""
The run folder, hardened: what every script calls in about three places, so that its loop stays
readable. validate: every flag, path, data file and a --resume's compatibility, checked before
anything is loaded or written; load_model: --init (a checkpoint, a run folder, released:DIR) or the
base models of --preset (tiny | real); start / save: out_dir prepared, exact --resume, checkpoints
published atomically (checkpoint.py). A user error is one line, `error: ...`, exit status 2 (cli).
"""
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import field

import torch
from tqdm import tqdm
from transformers import HfArgumentParser

import caption_cache as CC
import checkpoint as ck
import images
import model as M
import reward
import training as T
from tools import released, tiny


def arg(default, help, **kw):
    """A field of a script's @dataclass Args with its --help text (and e.g. choices=[...])."""
    return field(default=default, metadata={"help": help, **kw})


def arg_parser(cls):
    """HfArgumentParser for a script's @dataclass Args whose errors (a bad value, a missing argument) are
    UsageErrors: one line under cli(), not argparse's usage block."""

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


class UsageError(Exception):
    """A flag, file or out_dir the user can fix. cli() prints it as one line `error: ...`, exit 2."""


USER_ERRORS = (UsageError, images.DataError, images.CheckpointError, reward.RewardError)


def one_line(msg):
    """A message on one line: its lines joined by '; ' (or a space after ':' and '.')."""
    out = ""
    for ln in (x.strip() for x in str(msg).splitlines()):
        if ln:
            out += ("" if not out else " " if out.endswith((":", ".", ";")) else "; ") + ln
    return out


RANK_ERROR_DELAY = 15   # seconds a rank other than 0 waits before printing a user error (see cli)


def cli(main):
    """Every script's `if __name__ == "__main__":`. A user error (USER_ERRORS) prints `error: <one line>` to
    stderr and exits 2; any other exception is a bug and keeps its traceback, but for a collective that not every
    rank joined (training.collective_failure: one line naming the ranks that stalled or died, exit 1). main's int
    result is the exit status (eval), anything else exits 0. Under torchrun every rank checks the same things, so
    rank 0 prints at once and the others wait RANK_ERROR_DELAY s first: torchrun stops them when rank 0 exits (on a
    loaded machine that takes seconds), and only an error rank 0 did not have (a file missing on one node) gets its
    own `error: [rank r] ...` line."""
    try:
        rc = main()
    except USER_ERRORS as e:
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank:
            time.sleep(RANK_ERROR_DELAY)
        say(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(e)}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(2)
    except Exception as e:  # a collective that a stalled or dead rank never joined: one line, naming that rank
        fault = T.collective_failure(e)
        if fault is None:
            raise
        msg, first = fault
        if not first:
            time.sleep(3)
        say(f"error: {msg}")
        sys.exit(1)
    sys.exit(rc if type(rc) is int else 0)


def say(line):
    """One line on stderr, on a line of its own even while a progress bar is drawn there (tqdm.write)."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


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


def check_sampling(args):
    """The captioning and drawing flags eval_unified.py and sample.py share: temperature, top-k / top-p /
    repetition penalty where set (None: the release's generation config decides), resolution, CFG, dtype, preset."""
    at_least(args, 1, "max_pixels", "steps", "max_new_tokens")
    at_least(args, 0, "temperature", "resolution")
    if args.top_k is not None:
        at_least(args, 0, "top_k")
    if args.top_p is not None:
        above(args, 0, "top_p")
        need(args.top_p <= 1, f"--top_p {args.top_p}: must be in (0, 1]")
    if args.repetition_penalty is not None:
        above(args, 0, "repetition_penalty")
    need(args.resolution % 16 == 0, f"--resolution {args.resolution}: must be 0 (the decoder's own) or a positive "
                                    "multiple of 16 (VAE factor 8 x DiT patch 2)")
    finite(args, "cfg")
    one_of(args, "dtype", ("auto", "fp32", "bf16"))
    one_of(args, "preset", ("tiny", "real"))


def check_local(flag, p, kind="folder"):
    """A local path (absolute, ./, ~) must exist; a hub id (org/name) is left to the loader."""
    if p and p.startswith(("/", ".", "~")):
        need(os.path.exists(os.path.expanduser(p)), f"--{flag} {p}: no such {kind}")


def check_writable(flag, path, folder=None):
    """--flag PATH, a folder this process will create or write in (or `folder`, the one a file --flag PATH goes in): a
    folder, or nothing yet under a folder, in which this process may write (os.access: permissions, and a read-only
    file system). Reads only."""
    need(bool(path), f"--{flag} is empty")
    p = folder or os.path.abspath(os.path.expanduser(path))
    d = p
    while not os.path.lexists(d):  # the nearest existing folder on the way up: where the first write happens
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"--{flag} {path}: exists and is not a folder" if d == p and not folder else
                         f"--{flag} {path}: {d} is a file, not a folder")
    need(os.access(d, os.W_OK | os.X_OK), f"--{flag} {path}: cannot write in {d} (no write permission, or a read-only "
                                          "file system); pick another --" + flag)


def check_file_out(flag, path):
    """--flag FILE that a script will write (sample.py's .txt / .png, bench.py's .json): its folder as in
    check_writable, the file itself a writable regular file if it exists, not in a training run's folder. Reads
    only."""
    need(bool(path), f"--{flag} is empty")
    p = os.path.abspath(os.path.expanduser(path))
    need(not os.path.lexists(p) or os.path.isfile(p), f"--{flag} {path}: exists and is not a file")
    check_writable(flag, path, folder=os.path.dirname(p))
    need(not os.path.lexists(p) or os.access(p, os.W_OK), f"--{flag} {path}: cannot write it (no write permission, "
                                                          "or a read-only file system)")
    run = training_run_entries(os.path.dirname(p))
    need(not run, f"--{flag} {path}: {os.path.dirname(p)} holds a training run ({', '.join(run)}); write elsewhere")


# A script that writes into a folder of results (eval_unified.py's --out_dir, sample.py's --out) records what it
# wrote in OUTPUTS there; it writes only into a folder that is new, empty, or holds only what it wrote before.
OUTPUTS = "uae_outputs.json"


def training_run_entries(folder):
    """The entries of `folder` that belong to a stage's run: its checkpoint (ckpt, ckpt.<step>, ckpt.legacy, an
    interrupted write's .ckpt-*), log.jsonl, stage 3's caption cache. [] for a folder that is not one (or none)."""
    if not os.path.isdir(folder):
        return []
    out = []
    for n in sorted(os.listdir(folder)):
        if n in (ck.LINK, "log.jsonl") or n.startswith((ck.LINK + ".", ".ckpt-")):
            out.append(n)
        elif n == CC.CAPTION_CACHE and CC.is_caption_cache(os.path.join(folder, n)):
            out.append(f"{n} (stage 3's caption cache)")
    return out


def read_outputs(folder):
    """OUTPUTS of folder -> {"tool": script, "written": [names]}, or None (absent or unreadable)."""
    try:
        d = json.load(open(os.path.join(folder, OUTPUTS), encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(d, dict) and isinstance(d.get("tool"), str) and isinstance(d.get("written"), list) and \
        all(isinstance(n, str) for n in d["written"])
    return d if ok else None


def check_own_folder(flag, path, tool, names=()):
    """--flag PATH, the folder `tool` writes its results in (and resumes from): writable (check_writable), and new,
    empty, or holding only what `tool` recorded in OUTPUTS there, plus `names`, the entries it writes on every run
    (a temporary `.<name>.tmp` of them too). A training run's folder, or anything else, is refused by name: the tool
    overwrites only what it wrote. Reads only."""
    check_writable(flag, path)
    if not os.path.isdir(path) or not os.listdir(path):
        return
    run = training_run_entries(path)
    need(not run, f"--{flag} {path} holds a training run ({', '.join(run)}): {tool} would write into it; "
                  f"use another --{flag}")
    rec = read_outputs(path)
    need(not rec or rec["tool"] == tool, f"--{flag} {path} holds what {rec and rec['tool']} wrote, not {tool}: "
                                         f"use another --{flag}")
    mine = set(rec["written"]) | set(names) if rec else set()
    mine |= {OUTPUTS} | {f".{n}.tmp" for n in mine | {OUTPUTS}}
    foreign = [n for n in sorted(os.listdir(path)) if n not in mine]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(f"--{flag} {path} holds files that {tool} did not write ({', '.join(foreign[:5])}{more}): it "
                         f"writes only into a new or empty folder, or one it wrote ({OUTPUTS} lists what); use another "
                         f"--{flag}")


def record_outputs(folder, tool, names):
    """Add `names` (entries of folder that `tool` writes) to folder's OUTPUTS, creating both; written to a temporary
    file, then renamed."""
    os.makedirs(folder, exist_ok=True)
    rec = read_outputs(folder) or {"tool": tool, "written": []}
    written = sorted(set(rec["written"]) | set(names))
    if written != rec["written"] or not os.path.isfile(os.path.join(folder, OUTPUTS)):
        tmp = os.path.join(folder, f".{OUTPUTS}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"tool": tool, "written": written}, f, indent=1)
        os.replace(tmp, os.path.join(folder, OUTPUTS))


def check_init(init):
    """--init: a checkpoint (ck.check_checkpoint), or released:DIR (the authors' release: a folder, or a hub id,
    that released.py converts and checks when the model loads; its errors are CheckpointErrors too)."""
    if init.startswith("released:"):
        d = init[len("released:"):]
        ok = os.path.isdir(d) or (not d.startswith(("/", ".", "~")) and d.count("/") == 1)
        if not ok:
            raise images.CheckpointError(f"--init {init}: {d} is not a folder (expected the downloaded release)")
        return None
    return ck.check_checkpoint(init, "--init")


RESUME_HARMLESS = {"steps", "stop_after", "save_every", "log_every", "sample_every", "sample_n", "wandb", "tensorboard",
                   "resume", "overwrite", "out_dir", "eval_every", "eval_images", "eval_G", "eval_data", "eval_steps",
                   "grad_ckpt", "micro_batch", "dist_timeout"}


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
            "(README.md, 'Stages on a CPU', has the whole chain)")


def validate_run(args, stage, *, size, datasets=(), harmless=()):
    """The checks every stage shares, after its own flag checks and before anything is loaded or
    written: common flags, --init, --encoder/--decoder/--reward_path paths, the data (parsed in full:
    datasets = [(flag, need_captions)]), the reward backbone's weights (reward.check_weights: its default found
    in the local cache when offline), and out_dir (writable): a non-empty out_dir needs --resume or --overwrite;
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
    above(args, 0, "lora_alpha", "dist_timeout")
    for flag, pkg in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        need(not getattr(args, flag) or importlib.util.find_spec(pkg) is not None,
             f"--{flag} needs the {pkg} package (pip install {pkg})")
    for flag in ("encoder", "decoder"):
        check_local(flag, getattr(args, flag))
    if getattr(args, "reward", None) is not None and stage_uses_reward(args):
        if args.reward in reward.BACKBONES:
            if args.reward_path and args.reward_path != "tiny":
                check_local("reward_path", args.reward_path, "file or folder")
        else:  # your own module:function, imported now: a typo is one line before anything loads
            need(":" in args.reward, f"--reward {args.reward!r}: must be one of {' | '.join(reward.BACKBONES)}, "
                                     "or module:function (your own reward)")
            reward.find_function(args.reward)
    if args.init:
        check_init(args.init)
    images.MAX_PIXELS = args.max_pixels  # the reader's cap for this process (as PIL's MAX_IMAGE_PIXELS)
    for flag, caps in datasets:
        images.list_dataset(getattr(args, flag), caps, flag=flag)
    backbone = getattr(args, "reward", None) in reward.BACKBONES and stage_uses_reward(args)
    if backbone and args.reward_path != "tiny":  # its real default ('') must be in the local cache when offline
        reward.check_weights(args.reward, args.reward_path or None)
    return check_out_dir(args, stage, harmless)


def stage_uses_reward(args):
    return "sem" in getattr(args, "objective", "sem")


def check_out_dir(args, stage, harmless=()):
    """out_dir and --resume / --overwrite (see validate_run). Reads only."""
    out = args.out_dir
    check_writable("out_dir", out)
    log = os.path.join(out, "log.jsonl")
    need(not os.path.lexists(log) or (os.path.isfile(log) and os.access(log, os.W_OK)),
         f"--out_dir {out}: cannot write its log.jsonl (not a writable file)")
    need(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one")
    link = os.path.join(out, ck.LINK)
    if os.path.lexists(link) and not os.path.isdir(link):
        raise images.CheckpointError(f"{link} points to a folder that does not exist; move out_dir aside or use --overwrite")
    cur = ck.ckpt_dir(out) if os.path.isdir(out) else None
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
    meta = ck.check_checkpoint(out, "--resume: out_dir")
    if meta.get("stage") != stage:
        raise UsageError(f"--resume: {meta['path']} was written by {meta.get('stage')!r}, not {stage}: resume in that "
                         f"stage's script, or start this stage from it with --init {out}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    saved_world = meta.get("world", 1)
    resharded = resharded_resume(args, meta, world, stage) if saved_world != world else set()   # FSDP only
    for r in range(saved_world):
        rp = os.path.join(meta["path"], f"rng{r}.safetensors")
        if not os.path.isfile(rp):
            raise images.CheckpointError(f"--resume: {meta['path']} has no RNG state for rank {r} (rng{r}.safetensors): "
                                    "it cannot be continued exactly; start over with --overwrite, or from it with --init")
        ck.safetensors_names(rp)
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


# ----------------------------------------------------------------------------------------------
# Models: --preset's base models or --init's checkpoint, through model.load_uae.

def base_paths(preset, encoder=None, decoder=None):
    """Base model locations for a preset ('tiny': built once under $UAE_HOME | 'real': the hub ids);
    explicit --encoder / --decoder win."""
    if preset == "tiny":
        e, d = tiny.tiny_paths()
    elif preset == "real":
        e, d = M.REAL_ENCODER, M.REAL_DECODER
    else:
        raise UsageError(f"--preset must be 'tiny' or 'real', got {preset!r}")
    return encoder or e, decoder or d


def load_model(init=None, preset="tiny", encoder=None, decoder=None, dtype=torch.float32, device="cpu", resume=False,
               train_full=()):
    """The base models of `preset` (or --encoder/--decoder), + the checkpoint `init` when given: a checkpoint
    folder, a run folder (its ckpt/), or released:DIR (the authors' release, converted once by
    tools/released.py; `decoder` then names the SD3.5 base it needs). With resume=True the checkpoint's last
    adapters stay live (not merged), so training continues exactly; what a checkpoint holds in fp32 comes
    back bit for bit (docs/algorithm.md §8). -> model.UAE."""
    if init and str(init).startswith("released:"):
        init, decoder = released.converted(init[len("released:"):], sd3=decoder), None
    meta, tensors = ck.read_checkpoint(init) if init else (None, None)
    if meta:
        encoder, decoder = encoder or meta["base"]["encoder"], decoder or meta["base"]["decoder"]
    else:
        encoder, decoder = base_paths(preset, encoder, decoder)
    m = M.load_uae(encoder, decoder, dtype=dtype, device=device, train_full=train_full, pooled=not meta)
    if meta:  # a checkpoint carries its own pooled embedding
        ck.apply_checkpoint(m, meta, tensors, live_last=resume)
    return m


def live_lora(out_dir):
    """The LoRA config of the live (last) layer of out_dir's checkpoint: {"encoder": cfg or None, "transformer": ...}."""
    meta = ck.read_checkpoint(out_dir)[0]
    live = meta["layers"][-1] if meta.get("live_layer") else {}
    return {"encoder": live.get("encoder"), "transformer": live.get("transformer")}


def reward_path(name, path):
    """--reward_path / --<backbone>_path: 'tiny' = the seeded tiny backbone under $UAE_HOME, '' = the real default."""
    if path == "tiny" and name in tiny.TINY_FILES:
        return tiny.tiny_backbone_paths()[name]
    return path or None


def load_reward(spec, path="", device="cpu"):
    """--reward NAME (a backbone of reward.py, with --reward_path) or module:function (your own, reward.py's
    contract) -> reward.Reward. Its errors are one line."""
    return reward.load_reward(spec, reward_path(spec, path), device=device)


# ----------------------------------------------------------------------------------------------
# A run's start and checkpoints.

def start(args, opt, rank, world):
    """After everything is built, before step 1: --resume restores the optimizer and this rank's RNG from
    out_dir/ckpt (ck.load_train_state); rank 0 prepares out_dir (--overwrite: the previous run's outputs go;
    leftovers of an interrupted checkpoint write go; the log is cut back to the checkpoint's step, or emptied)
    and opens the run log. -> (step, the checkpoint's meta ({} for a fresh run), training.RunLog)."""
    step, meta = ck.load_train_state(args.out_dir, opt, rank, world) if args.resume else (0, {})
    if rank == 0:
        ck.prepare_out_dir(args.out_dir, args.resume, step, args.overwrite)
    log = T.RunLog(args.out_dir, rank == 0, dataclasses.asdict(args), args.wandb, args.tensorboard)
    return step, meta, log


def save(args, m, step, opt, lora_cfg, rank, world, stage, transformer_full=False, extra_meta=None):
    """A complete checkpoint of this step in out_dir (weights, optimizer, every rank's RNG, the flags), published
    atomically: --resume continues it exactly, --init starts a next stage from it. Collective under torchrun."""
    ck.save_train_state(args.out_dir, m, dataclasses.asdict(args), step, opt, lora_cfg, rank, world, stage,
                        transformer_full=transformer_full, extra_meta=extra_meta)
