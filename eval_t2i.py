"""
Text-to-image benchmarks the way the paper reports the decoder (docs/t2i.md): prompts -> images, in
the folder layouts the official scorers read, from a run, the authors' release or the base models,
through the generation path of `sample.py generate` (model.UAE.generate_images: the LVLM re-reads
the prompt, the projector maps it to the DiT condition, Euler ODE with CFG and the released
negative prompt).

    python eval_t2i.py geneval   --prompts geneval/prompts/evaluation_metadata.jsonl --init out/stage3 --out out/t2i/geneval
    python eval_t2i.py geneval++ --prompts Geneval++.jsonl --init released:weights/uae --preset_sampling released --out out/t2i/genevalpp
    torchrun --nproc_per_node=8 eval_t2i.py dpg --prompts ELLA/dpg_bench/prompts --init out/stage3 --out out/t2i/dpg
Tiny and fast (random weights, offline): add --preset tiny --steps 2.

Layouts (sources and scoring commands in docs/t2i.md):
  geneval    <out>/<index:05d>/metadata.jsonl (the prompt's line of evaluation_metadata.jsonl, byte for byte)
             <out>/<index:05d>/samples/<k:04d>.png, k < --n_samples (default 4); no grid.png (the scorer
             ignores it).
  geneval++  <out>/<n>.jpg, n = 1 + the prompt's index among the non-blank lines of Geneval++.jsonl (or its
             line in Geneval++.txt): one image a prompt, JPEG, as Eval-gpt-4.1-geneval++.py reads them.
  dpg        <out>/<id>.png for each <id>.txt of the prompt folder: the 2x2 grid of 4 samples without gaps,
             sample k at row k // 2, column k % 2 (the crop order of ELLA's compute_dpg_bench.py; its
             --resolution is one sample's size).

Each (prompt, sample) has its own seed (training.seed_of(--seed, benchmark, output name, k)) for the
initial noise, and a prompt's samples are one generate_images call whatever the rank count: a rerun,
a resumed run and an N-rank run write the same bytes. Under torchrun the unfinished prompts are split
over the ranks. A prompt's files are written in a temporary folder in <out> and published by one
rename: a killed run leaves no half prompt, and the next run (same command) generates only the
prompts without outputs. <out>/.eval_t2i.json records the benchmark, the prompts and the settings; a
rerun with other ones, and an --out that holds anything this script did not write, are refused.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

import checkpoint as ck
import images
import runs
import training as T
from runs import arg
from tools import released

BENCHMARKS = ("geneval", "geneval++", "dpg")
PROTOCOL_N = {"geneval": 4, "geneval++": 1, "dpg": 4}  # images per prompt that each scorer reads
MARKER = ".eval_t2i.json"
SETTINGS = ("init", "preset", "encoder", "decoder", "dtype", "preset_sampling", "resolution", "steps", "cfg", "seed")
LEFTOVER = (".tmp-", ".old-")  # a prompt being written (.tmp-), a folder being replaced (data.atomic_publish)
SCORER_FILES = {"dpg": re.compile(r"dpg-bench_.*_results(_detail)?\.txt")}  # ELLA's scorer writes them into <out>


@dataclass
class Args:
    prompts: str = arg("", "geneval: evaluation_metadata.jsonl; geneval++: Geneval++.jsonl or Geneval++.txt; "
                           "dpg: the folder of <id>.txt prompts (ELLA's dpg_bench/prompts)")
    out: str = arg("", "output folder (default out/t2i/<benchmark>); a rerun into it resumes")
    n_samples: int = arg(0, "images per prompt; 0 = the benchmark's protocol (geneval 4, geneval++ 1, dpg 4: "
                            "geneval++ and dpg accept only theirs)")
    limit: int = arg(0, "generate only the first N prompts of the file (0 = all); a later run without it adds the rest")
    init: str = arg("", "UAE checkpoint directory (a stage script's run or its ckpt), or released:DIR for the authors' "
                        "release (released.py; --decoder then names SD3.5-large); empty = base models of --preset")
    preset: str = arg("tiny", "'tiny' (random weights, offline) or 'real' (Qwen2.5-VL-3B + SD3.5-large)")
    encoder: str = arg("", "override the encoder path / hub id")
    decoder: str = arg("", "override the decoder path / hub id")
    dtype: str = arg("auto", "auto | fp32 | bf16 (auto: bf16 on GPU, fp32 on CPU)")
    preset_sampling: str = arg("", "named sampling settings for the flags below left at their defaults: 'released' "
                                   "= the released demo's (1024 px, 40 steps, CFG 5; see released.SAMPLING)")
    resolution: int = arg(0, "image size in px, a multiple of 16; 0 = the decoder's native size (1024 for SD3.5)")
    steps: int = arg(40, "decoder sampling steps")
    cfg: float = arg(5.0, "classifier-free guidance scale")
    seed: int = arg(0, "base seed; sample k of a prompt uses seed_of(seed, benchmark, output name, k)")


# ----------------------------------------------------------------------------------------------
# Prompt files: read in full and checked before anything loads. An item is
# {"name": output name, "prompt": text, "line": the source bytes (geneval's metadata.jsonl)}.

def _lines(raw):
    """bytes -> [(line number, line bytes with its b"\\n")], a UTF-8 byte order mark dropped (the GenEval
    scorer's json.load would refuse it in metadata.jsonl)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    parts = raw.split(b"\n")
    out = [(i, p + b"\n") for i, p in enumerate(parts[:-1], 1)]
    return out + ([(len(parts), parts[-1])] if parts[-1] else [])


def _text(path, ln, b):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        at = ln + b[:e.start].count(b"\n")
        raise runs.UsageError(f"{path}:{at}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(path, ln, b, keys):
    """A JSON line -> dict with a non-empty string under each of `keys`; UsageError naming file:line otherwise."""
    try:
        d = json.loads(_text(path, ln, b))
    except ValueError as e:
        raise runs.UsageError(f"{path}:{ln}: not a JSON line ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})") from None
    if not isinstance(d, dict):
        raise runs.UsageError(f"{path}:{ln}: expected a JSON object, got {type(d).__name__}")
    for k in keys:
        if not isinstance(d.get(k), str) or not d[k].strip():
            raise runs.UsageError(f"{path}:{ln}: no {k!r} string (the line has {', '.join(map(repr, d)) or 'no keys'})")
    return d


def _read(path):
    if not os.path.isfile(path):
        raise runs.UsageError(f"--prompts {path}: no such file" + (" (a folder: that is dpg's input)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        return f.read()


def read_geneval(path):
    """evaluation_metadata.jsonl: every line a JSON object with 'prompt' and 'tag' (the scorer reads both);
    output <index:05d>, index = the line's position (the official generator and scorer count every line,
    so a blank one is refused)."""
    items = []
    for ln, b in _lines(_read(path)):
        if not b.strip():
            raise runs.UsageError(f"{path}:{ln}: blank line (GenEval numbers every line of the file: remove it)")
        d = _json_object(path, ln, b, ("prompt", "tag"))
        items.append({"name": f"{len(items):05d}", "prompt": d["prompt"], "line": b})
    return items


def read_genevalpp(path):
    """Geneval++.jsonl (blank lines skipped, as its scorer does) or Geneval++.txt (one prompt a line, blank
    lines refused): output <n>.jpg, n = 1 + the prompt's index."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".txt"):
        raise runs.UsageError(f"--prompts {path}: expected Geneval++.jsonl or Geneval++.txt")
    items = []
    for ln, b in _lines(_read(path)):
        if ext == ".jsonl":
            if not b.strip():
                continue
            p = _json_object(path, ln, b, ("prompt",))["prompt"]
        else:
            p = _text(path, ln, b).strip()
            if not p:
                raise runs.UsageError(f"{path}:{ln}: blank line (GenEval++ numbers images by line: remove it)")
        items.append({"name": str(len(items) + 1), "prompt": p.strip()})
    return items


def read_dpg(path):
    """The folder of <id>.txt files (hidden files, sub-folders and other extensions ignored): output <id>.png.
    The scorer looks an image up by its name up to the first '.', so an id with a dot is refused."""
    if not os.path.isdir(path):
        raise runs.UsageError(f"--prompts {path}: not a folder (expected ELLA's dpg_bench/prompts, one <id>.txt a prompt)")
    items = []
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if name.startswith(".") or not name.lower().endswith(".txt") or os.path.isdir(f):
            continue
        if not os.path.isfile(f):
            raise runs.UsageError(f"{f}: not a regular file")
        pid = name[:-4]
        if "." in pid:
            raise runs.UsageError(f"{f}: the id {pid!r} has a '.', which the DPG scorer cuts its image names at")
        text = _text(f, 1, _read(f)).strip()
        if not text:
            raise runs.UsageError(f"{f}:1: empty prompt")
        items.append({"name": pid, "prompt": text})
    if not items:
        raise runs.UsageError(f"--prompts {path}: no <id>.txt prompt files in this folder")
    return items


READERS = {"geneval": read_geneval, "geneval++": read_genevalpp, "dpg": read_dpg}


def prompts_digest(items):
    return hashlib.sha256(json.dumps([[it["name"], it["prompt"], it.get("line", b"").decode("utf-8")] for it in items],
                                     ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The output folder.

def output_name(bench, name):
    return {"geneval": name, "geneval++": f"{name}.jpg", "dpg": f"{name}.png"}[bench]


def ours(bench, entry):
    """An entry of <out> this script writes (or a leftover of its writes, or the DPG scorer's results)."""
    pat = {"geneval": r"\d+", "geneval++": r"\d+\.jpg", "dpg": r"[^.]+\.png"}[bench]
    return (entry == MARKER or entry.startswith(LEFTOVER) or re.fullmatch(pat, entry) is not None
            or (bench in SCORER_FILES and SCORER_FILES[bench].fullmatch(entry) is not None))


def finished(out, bench, name, n):
    p = os.path.join(out, output_name(bench, name))
    if bench != "geneval":
        return os.path.isfile(p)
    return os.path.isfile(os.path.join(p, "metadata.jsonl")) and \
        all(os.path.isfile(os.path.join(p, "samples", f"{k:04d}.png")) for k in range(n))


def record(args, bench, n, items):
    return {"written_by": "eval_t2i.py", "benchmark": bench, "n_samples": n, "prompts": os.path.abspath(args.prompts),
            "prompts_sha256": prompts_digest(items), "settings": {k: getattr(args, k) for k in SETTINGS},
            "checkpoint": ck.checkpoint_id(args.init)}


def check_out(out, rec):
    """Refuse an --out that is not a folder this script wrote for the same benchmark, prompts, image count and
    settings (all differences named), or that holds anything else (named). Reads only."""
    bench = rec["benchmark"]
    if not os.path.exists(out):
        return
    runs.need(os.path.isdir(out), f"--out {out}: exists and is not a folder")
    names = sorted(os.listdir(out))
    if not names:
        return
    listing = lambda xs: ", ".join(xs[:6]) + (f" and {len(xs) - 6} more" if len(xs) > 6 else "")
    mp = os.path.join(out, MARKER)
    runs.need(os.path.isfile(mp), f"--out {out} holds files this script did not write ({listing(names)}): "
                               "use a new or empty folder")
    try:
        old = json.load(open(mp, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        old = None
    runs.need(isinstance(old, dict) and old.get("written_by") == "eval_t2i.py",
           f"{mp} is damaged or not this script's: use a new folder")
    runs.need(old.get("benchmark") == bench, f"--out {out} holds {old.get('benchmark')} images, not {bench}: use another folder")
    diff = [f"{k} {old.get(k)!r} (now {rec[k]!r})" for k in ("n_samples", "checkpoint") if old.get(k) != rec[k]]
    diff += [f"--{k} {old.get('settings', {}).get(k)!r} (now {v!r})" for k, v in rec["settings"].items()
             if old.get("settings", {}).get(k) != v]
    if old.get("prompts_sha256") != rec["prompts_sha256"]:
        diff.append(f"the prompts (was {old.get('prompts')}, now {rec['prompts']}, different content)")
    runs.need(not diff, f"--out {out} holds images made with other settings: {'; '.join(diff)}; "
                     "rerun with those, or use another folder")
    foreign = [x for x in names if not ours(bench, x)]
    runs.need(not foreign, f"--out {out} holds files this script did not write: {listing(foreign)}; move them away")


def claim(out, rec):
    """Make <out> this script's: a new (or empty) folder is replaced by one that already holds the marker, in one
    rename, so that no folder of ours ever lacks it. A folder that has it keeps it (check_out compared it)."""
    if os.path.isfile(os.path.join(out, MARKER)):
        return
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        f.write(json.dumps(rec, indent=1) + "\n")
    ck.fsync(os.path.join(tmp, MARKER))
    os.replace(tmp, out)  # rename(2) replaces an empty folder


def clean_leftovers(out):
    """What a killed run left: half-written prompts (.tmp-*) and folders being replaced (.old-*)."""
    for x in os.listdir(out):
        p = os.path.join(out, x)
        if not x.startswith(LEFTOVER):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def grid2x2(ims):
    """4 images (3, S, S) -> (3, 2S, 2S), image k at row k // 2, column k % 2, no gaps."""
    return torch.cat([torch.cat([ims[0], ims[1]], 2), torch.cat([ims[2], ims[3]], 2)], 1)


def _phase(name, item):
    """Fault-injection point (tests set _crash_hook to stop a run here, as a kill would)."""
    if _crash_hook is not None:
        _crash_hook(name, item)


_crash_hook = None


def publish(out, bench, item, ims):
    """A prompt's files, written in a temporary folder of <out>, then published by one rename."""
    tmp = tempfile.mkdtemp(prefix=f".tmp-{item['name']}-", dir=out)
    dest = os.path.join(out, output_name(bench, item["name"]))
    if bench == "geneval":
        with open(os.path.join(tmp, "metadata.jsonl"), "wb") as f:
            f.write(item["line"])
        os.makedirs(os.path.join(tmp, "samples"))
        files = [os.path.join(tmp, "metadata.jsonl")]
        for k, im in enumerate(ims):
            files.append(os.path.join(tmp, "samples", f"{k:04d}.png"))
            images.save_png(files[-1], im)
    else:  # geneval++: JPEG at PIL's default quality (the scorer re-encodes it so anyway); dpg: the grid
        files = [os.path.join(tmp, os.path.basename(dest))]
        images.save_png(files[0], ims[0] if bench == "geneval++" else grid2x2(ims))
    for f in files:
        ck.fsync(f)
    _phase("written", item)
    if bench == "geneval":
        ck.fsync(os.path.join(tmp, "samples"), is_dir=True)
        images.atomic_publish(tmp, dest)  # an incomplete folder of an earlier version is replaced whole
    else:
        os.replace(files[0], dest)
        os.rmdir(tmp)
    ck.fsync(out, is_dir=True)
    _phase("published", item)


def noise_for(m, bench, name, n, size, seed):
    """(n, C, h, w): sample k's initial noise from its own seed, whatever else is generated with it."""
    shape = m.latent_shape(size, size)
    return torch.stack([torch.randn(shape, generator=T.generator(seed, bench, name, k)) for k in range(n)])


@torch.no_grad()
def generate(m, bench, item, n, size, args, rel=None):
    """A prompt's n images (n, 3, S, S) in [0, 1]: sample.py generate's path, one call for the prompt. rel: the
    authors' calls (--preset_sampling released: tools/released.py Sampling.draw, the padded pair condition), sample
    k's noise from its own seed on the device's generator (the demo's one seed would make the n samples one)."""
    if rel is not None:
        return torch.stack([dataclasses.replace(rel, seed=T.seed_of(args.seed, bench, item["name"], k)).draw(m, item["prompt"])
                            for k in range(n)])
    noise = noise_for(m, bench, item["name"], n, size, args.seed).to(m.device)
    return m.generate_images([item["prompt"]] * n, noise=noise, steps=args.steps, cfg=args.cfg)


def scorer_line(bench, out, size):
    return {"geneval": f"python evaluation/evaluate_images.py {out} --outfile results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>",
            "geneval++": f"Eval-gpt-4.1-geneval++.py with image_dir = Path({out!r})",
            "dpg": f"bash dpg_bench/dist_eval.sh {out} {size}"}[bench]


def main(argv=None):
    from tqdm import tqdm
    p = runs.arg_parser(Args)
    p.add_argument("benchmark", choices=BENCHMARKS, help=" | ".join(BENCHMARKS))
    args, ns, rest = p.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    runs.need(not rest, f"unknown argument(s): {' '.join(rest)} (see --help)")
    bench = ns.benchmark
    runs.need(args.preset_sampling in ("",) + tuple(released.SAMPLING),
           f"--preset_sampling {args.preset_sampling!r}: known presets are {', '.join(released.SAMPLING)}")
    released.apply_sampling_preset(args, args.preset_sampling, released.flags_given(argv))
    # every check before anything loads or is written
    runs.one_of(args, "preset", ("tiny", "real"))
    runs.one_of(args, "dtype", ("auto", "fp32", "bf16"))
    runs.at_least(args, 1, "steps")
    runs.at_least(args, 0, "resolution", "n_samples", "limit")
    runs.finite(args, "cfg")
    runs.need(args.resolution % 16 == 0, f"--resolution {args.resolution}: must be a multiple of 16 (VAE factor 8 x DiT patch 2)")
    n = args.n_samples or PROTOCOL_N[bench]
    runs.need(bench == "geneval" or n == PROTOCOL_N[bench],
           f"--n_samples {n}: {bench}'s scorer reads {PROTOCOL_N[bench]} image(s) a prompt" +
           (" (the 2x2 grid)" if bench == "dpg" else ""))
    runs.need(bool(args.prompts), f"--prompts is required: {Args.__dataclass_fields__['prompts'].metadata['help']}")
    for flag in ("encoder", "decoder"):
        runs.check_local(flag, getattr(args, flag))
    if args.init:
        runs.check_init(args.init)
    items = READERS[bench](args.prompts)
    out = args.out or os.path.join("out", "t2i", bench.replace("+", "p"))
    rec = record(args, bench, n, items)
    check_out(out, rec)
    chosen = items[:args.limit] if args.limit else items
    todo = [it for it in chosen if not finished(out, bench, it["name"], n)]  # before any rank writes (dist_setup waits for all)

    rank, world, device = T.dist_setup(args.seed)
    if rank == 0:
        claim(out, rec)
        clean_leftovers(out)
        print(f"{bench}: {len(chosen)} prompts, {len(chosen) - len(todo)} already written, {len(todo)} to generate "
              f"({n} image(s) each) on {world} rank(s) -> {out}", flush=True)
    if world > 1:
        torch.distributed.barrier()
    mine, size = todo[rank::world], args.resolution
    if mine:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
        m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                           decoder=args.decoder or None, dtype=dtype, device=device)
        size = args.resolution or m.transformer.config.sample_size * 2 ** (len(m.vae.config.block_out_channels) - 1)
        rel = released.Sampling.from_args(args) if args.preset_sampling == "released" else None
        if rel is not None and rank == 0:
            print(rel.describe(m), flush=True)
        t0 = time.time()
        for item in tqdm(mine, desc=f"{bench} (rank 0: {len(mine)} of {len(todo)})" if world > 1 else bench,
                         unit="prompt", disable=rank != 0):
            publish(out, bench, item, generate(m, bench, item, n, size, args, rel))
        if rank == 0:
            dt = time.time() - t0
            print(f"rank 0: {len(mine)} prompts x {n} image(s) of {size} px in {dt:.1f} s, {dt / len(mine):.2f} s a prompt "
                  f"({args.steps} steps, CFG {args.cfg:g}; model load not counted)", flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"done: {out}; score it with {scorer_line(bench, out, size or '<image size>')} (docs/t2i.md)")


if __name__ == "__main__":
    runs.cli(main)
