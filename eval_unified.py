"""
Unified-Bench (docs/algorithm.md §7): caption each source image with the encoder, redraw it from that caption
alone with the decoder, and score how similar the redrawing is to the source under four frozen
backbones (CLIP, LongCLIP, DINOv2, DINOv3). Score = cosine similarity x 100 per pair; per
backbone the mean over pairs; overall = the unweighted mean of the backbone means.

Tiny (CPU, random tiny backbones; the shapes world's held-out images after README.md's tiny chain):
    python eval_unified.py --init out/stage3 --src data/shapes/val --out_dir out/bench --steps 4 --max_new_tokens 16 \
        --batch_captions --batch_size 25 --clip_path tiny --longclip_path tiny --dinov2_path tiny --dinov3_path tiny
Real benchmark (the 100 source images flat in data/unified_bench/; the weights: README.md, "The path to a real run"):
    torchrun --nproc_per_node=8 eval_unified.py --init out/stage3 --src data/unified_bench --out_dir out/bench \
        --longclip_path weights/longclip-L.safetensors
  (--clip_path, --dinov2_path, --dinov3_path empty: the real weights from the Hugging Face cache; --longclip_path:
  longclip-L.pt converted once to safetensors.)
Score any system's reconstructions (pairs matched by file name stem, no model loaded):
    python eval_unified.py --score_only --src data/unified_bench --recon their_recons/ --out_dir out/bench_theirs

Outputs under --out_dir: captions/<stem>.txt and captions.jsonl, recon/<stem>.png, unified_bench.json
(per-image scores, per-backbone mean/std/n, summary, problems) and a Markdown table on stdout with
the paper's rows beside ours; uae_outputs.json names what this script writes there: it writes only into a new or
empty folder or one it wrote (a training run's folder, or one with other files, is refused by name). Re-running
reuses every reconstruction whose caption and PNG exist, if the generation settings and the checkpoint are the ones
that made them (settings.json); otherwise it refuses.
Unreadable images, non-image files and missing pairs are listed in `problems` and the run goes on.
If no pair at all could be scored (e.g. an empty folder) the JSON is still written (n = 0) and the
script exits with status 2 and an `error:` line.

Departures from the released benchmark script (and demo), numbered (--preset_sampling released makes the demo's
calls instead, tools/released.Sampling: none of 2 and 3, the source as qwen_vl_utils reads it for the caption):
 1. Backbone preprocessing runs on torch tensors (reward.py: antialiased torch resizes, the
    released mean/std and crops) instead of PIL / HF image processors: pixel values differ by
    about one grey level after resizing, scores by ~1e-3. CLIP ViT-L/14 runs through open_clip
    (the same OpenAI weights as HF's openai/clip-vit-large-patch14), LongCLIP from safetensors.
 2. The source is center-cropped to a square and resized to --resolution before captioning (the demo
    hands the PIL image at native resolution to the processor). Scoring uses the native file.
 3. Sampling is seeded per image from its file name (caption: torch.manual_seed; generation: the
    initial noise), so a result does not depend on batch composition, rank count or order. By
    default captions are sampled one image at a time for that reason (--batch_captions is faster).
 4. Pairs are matched by file name stem (a.jpg <-> a.png), not by the full name; two sources with
    the same stem are reported and the first (sorted) is kept.
 5. Files are read by data.read_image, as training reads them (the released script: PIL's
    .convert("RGB")): EXIF orientation applied, 16-bit / float images scaled instead of clipped
    white, alpha composited on white instead of dropped; only regular files are opened and images
    over --max_pixels are refused from their header. Unreadable files and missing partners are
    reported, never fatal.
 6. overall = mean over the selected backbones among CLIP/LongCLIP/DINOv2/DINOv3 (extra ones such
    as 'pixel' are shown but not averaged in); std is over pairs with ddof = 0.
"""
import gc
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint as ck
import images
import model
import reward
import runs
import training as T
from runs import arg
from tools import released

BENCH = ("clip", "longclip", "dinov2", "dinov3")   # docs/algorithm.md §7, the four averaged into `overall`
DISPLAY = {"clip": "CLIP", "longclip": "LongCLIP", "dinov2": "DINOv2", "dinov3": "DINOv3", "pixel": "pixel"}
PAPER = [  # arXiv 2509.09666, Unified-Bench table (x100)
    {"system": "UAE (paper)", "clip": 90.50, "longclip": 94.35, "dinov2": 81.98, "dinov3": 77.54, "overall": 86.09, "n": 100},
    {"system": "GPT-4o-Image (paper)", "overall": 85.95, "n": 100},
]



# --dist_timeout's default, in minutes: the gather after generation waits for the slowest rank's whole share of the
# images (a rerun that reuses one rank's share and redraws another's), longer than a training step's collectives do.
EVAL_DIST_TIMEOUT_MIN = 30.0
TOOL = "eval_unified.py"
WRITES = ("captions", "recon", "captions.jsonl", "settings.json", "unified_bench.json")  # in --out_dir


@dataclass
class Args:
    src: str = arg("", "folder of source images (top level only)")
    out_dir: str = arg("out/unified_bench", "output folder: captions/, recon/, captions.jsonl, unified_bench.json")
    score_only: bool = arg(False, "only score --src against --recon (no model): any system's reconstructions")
    recon: str = arg("", "folder of reconstructions for --score_only (paired with --src by file name stem)")
    init: str = arg("", "UAE checkpoint directory (a stage script's ckpt), or released:DIR for the authors' release "
                        "(released.py; --decoder then names SD3.5-large); empty = base models")
    preset: str = arg("tiny", "base models when --init is empty: 'tiny' (random, offline) or 'real'")
    encoder: str = arg("", "override the encoder path / hub id")
    decoder: str = arg("", "override the decoder path / hub id")
    dtype: str = arg("auto", "auto | fp32 | bf16 (auto: bf16 on GPU, fp32 on CPU)")
    preset_sampling: str = arg("", "'released': the authors' inference demo, call for call (tools/released.Sampling, "
                                   "docs/released.md); its settings for the flags below not given")
    instruction: str = arg("", "captioning instruction ('' = model.INSTRUCTION, 'released' = the release's)")
    instruction_first: bool = arg(False, "put the instruction before the image in the user turn (the released demo's order)")
    resolution: int = arg(0, "generation size in px, and the caption input's (center-cropped) except under "
                             "--preset_sampling released (native size); 0 = the decoder's native size")
    temperature: float = arg(0.7, "caption sampling temperature (released demo: 0.7; 0 = greedy)")
    top_p: Optional[float] = arg(None, "caption nucleus sampling (unset: 1, or under --preset_sampling released the "
                                       "checkpoint's generation_config.json)")
    top_k: Optional[int] = arg(None, "caption top-k (unset: off, or as --top_p)")
    repetition_penalty: Optional[float] = arg(None, "caption repetition penalty (--preset_sampling released only; "
                                                    "unset: as --top_p)")
    max_new_tokens: int = arg(512, "caption length limit (released demo: 512)")
    steps: int = arg(40, "decoder sampling steps (released demo: 40)")
    cfg: float = arg(5.0, "classifier-free guidance scale (released demo: 5.0)")
    seed: int = arg(0, "base seed; each image's seed = f(file stem, seed) (under --preset_sampling released: the "
                       "caption's; the noise of every image is seeded with it, as the demo's)")
    batch_size: int = arg(4, "images per generation / scoring batch")
    batch_captions: bool = arg(False, "caption a whole batch in one generate call (faster; captions then depend on batching)")
    captions: str = arg("", "redraw from the captions of an earlier run of this script instead of captioning (its "
                            "out_dir: captions/<stem>.txt): a checkpoint whose encoder is that run's (stage 3 freezes "
                            "stage 2's) is then scored on the same captions and noise, so a paired difference measures "
                            "the decoder alone")
    backbones: str = arg(",".join(BENCH), "comma list of scoring backbones (clip, longclip, dinov2, dinov3, pixel)")
    clip_path: str = arg("", "CLIP checkpoint (empty = reward.py's default, 'tiny' = random tiny)")
    longclip_path: str = arg("", "LongCLIP-L checkpoint (empty = reward.py's default, 'tiny' = random tiny)")
    dinov2_path: str = arg("", "DINOv2 checkpoint (empty = reward.py's default, 'tiny' = random tiny)")
    dinov3_path: str = arg("", "DINOv3 checkpoint (empty = reward.py's default, 'tiny' = random tiny)")
    max_pixels: int = arg(images.MAX_PIXELS, "refuse images of more pixels (read from the header, never decoded)")
    dist_timeout: float = arg(EVAL_DIST_TIMEOUT_MIN, "torchrun: minutes the one collective waits for every rank (each "
                                                     "rank's whole share of the generation); then the job ends")


# ----------------------------------------------------------------------------------------------
# Pure pieces (imported by the tests).

def list_images(folder, ignored=None):
    """Top-level image files of `folder` (an image extension: images.IMAGE_EXTS) -> ({stem: path}, problems).
    Hidden files and sub-folders are skipped; files of other extensions (captions.jsonl, notes) are not
    sources: appended to `ignored` when given. Non-regular files with an image extension (a FIFO is never
    opened) and duplicate stems are problems."""
    files, problems = {}, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        stem, ext = os.path.splitext(name)
        if ext.lower() not in images.IMAGE_EXTS:
            if ignored is not None:
                ignored.append(path)
        elif not os.path.isfile(path):
            problems.append({"file": path, "reason": "not a regular file (a FIFO, socket, device or broken link)"})
        elif stem in files:
            problems.append({"file": path, "reason": f"same stem as {files[stem]} (kept that one)"})
        else:
            files[stem] = path
    return files, problems


def pair_by_stem(src, recon):
    """({stem: path}, {stem: path}) -> ([(stem, src_path, recon_path)] sorted by stem, problems)."""
    pairs = [(s, src[s], recon[s]) for s in sorted(src) if s in recon]
    problems = [{"file": src[s], "reason": "no reconstruction with this stem"} for s in sorted(src) if s not in recon]
    problems += [{"file": recon[s], "reason": "no source image with this stem"} for s in sorted(recon) if s not in src]
    return pairs, problems


def image_seed(stem, seed=0):
    """A per-image seed from its file name: independent of batching, ranks and order."""
    return T.seed_of(seed, stem)


def summarize(per_image, backbones):
    """per_image: [{"scores": {backbone: score x100}}] -> per-backbone {mean, std (ddof 0), n} and
    overall = unweighted mean of the backbone means over the Unified-Bench four that are present
    (over all present backbones if none of the four is)."""
    stats = {}
    for b in backbones:
        v = torch.tensor([r["scores"][b] for r in per_image if b in r.get("scores", {})], dtype=torch.float64)
        stats[b] = {"mean": v.mean().item() if len(v) else None,
                    "std": v.std(correction=0).item() if len(v) else None, "n": len(v)}
    over = [b for b in backbones if b in BENCH and stats[b]["n"]] or [b for b in backbones if stats[b]["n"]]
    overall = sum(stats[b]["mean"] for b in over) / len(over) if over else None
    return stats, {"overall": overall, "overall_over": over, "n": len(per_image)}


def markdown_table(stats, summary, label="ours", backbones=BENCH, paper=True):
    """Ours, x100, below the paper's rows (paper=True: only when the scores are comparable with them)."""
    cols = list(BENCH) + [b for b in backbones if b not in BENCH]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"
    lines = ["| system | " + " | ".join(DISPLAY.get(c, c) for c in cols) + " | overall | n |",
             "|---" * (len(cols) + 3) + "|"]
    for row in PAPER if paper else []:
        lines.append(f"| {row['system']} | " + " | ".join(fmt(row.get(c)) for c in cols) + f" | {fmt(row['overall'])} | {row['n']} |")
    ours = [fmt(stats[c]["mean"]) if c in stats else "—" for c in cols]
    lines.append(f"| {label} | " + " | ".join(ours) + f" | {fmt(summary['overall'])} | {summary['n']} |")
    return "\n".join(lines)


def comparability(args, names):
    """'' when the scores can stand beside the paper's row: the four backbones, none of them the seeded random
    tiny one; else why not."""
    missing = [b for b in BENCH if b not in names]
    tiny = [b for b in BENCH if b in names and getattr(args, f"{b}_path", "") == "tiny"]
    if missing:
        return "backbones " + ", ".join(missing) + " not scored"
    return f"random tiny weights for {', '.join(tiny)}" if tiny else ""


def read_rgb(path):
    """A file at native size -> (3, H, W) in [0, 1], read as training reads it (data.read_image; departure 5)."""
    return images.read_image(path)


@torch.no_grad()
def embed(bb, ims, device):
    """List of (3, H, W) of any sizes -> (N, D) features; images of one size go in one call."""
    groups, out = {}, [None] * len(ims)
    for i, x in enumerate(ims):
        groups.setdefault(tuple(x.shape), []).append(i)
    for idx in groups.values():
        f = bb(torch.stack([ims[i] for i in idx]).to(device)).float().cpu()
        for i, fi in zip(idx, f):
            out[i] = fi
    return torch.stack(out)


def score_pairs(bbs, pairs, device):
    """[(stem, src, recon)] -> ([{name, source, reconstruction, scores}], problems). docs/algorithm.md §7: cos x 100."""
    rows, problems, A, B = [], [], [], []
    for stem, s, r in pairs:
        try:
            a = read_rgb(s)
        except Exception as e:
            problems.append({"file": s, "reason": f"unreadable source ({type(e).__name__}: {e})"})
            continue
        try:
            b = read_rgb(r)
        except Exception as e:
            problems.append({"file": r, "reason": f"unreadable reconstruction ({type(e).__name__}: {e})"})
            continue
        rows.append({"name": stem, "source": s, "reconstruction": r, "scores": {}})
        A.append(a)
        B.append(b)
    for name, bb in bbs.items():
        if rows:
            cos = F.cosine_similarity(embed(bb, A, device), embed(bb, B, device), dim=-1)  # (N,)
            for row, c in zip(rows, cos.tolist()):
                row["scores"][name] = 100 * c
    return rows, problems


# ----------------------------------------------------------------------------------------------

def write_atomic(path, write):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    write(tmp)
    os.replace(tmp, path)


GEN_KEYS = ("init", "preset", "encoder", "decoder", "dtype", "resolution", "temperature", "top_p", "top_k",
            "max_new_tokens", "steps", "cfg", "seed", "batch_captions", "instruction", "instruction_first",
            "preset_sampling", "repetition_penalty", "captions")


def check_settings(args, rank, write=True):
    """Resume only what the same settings and the same checkpoint made: <out>/settings.json pins the generation
    arguments and the checkpoint's identity (checkpoint.checkpoint_id); other ones are a UsageError. write: rank 0
    writes the file when there is none."""
    path = os.path.join(args.out_dir, "settings.json")
    cur = {**{k: getattr(args, k) for k in GEN_KEYS}, "checkpoint": ck.checkpoint_id(args.init)}
    if os.path.isfile(path):
        try:
            old = json.load(open(path, encoding="utf-8"))
        except ValueError:
            old = None
        runs.need(isinstance(old, dict), f"{path} is unreadable: delete {args.out_dir} (or use another --out_dir) to "
                                         "make the reconstructions again")
        # a key an older settings.json lacks had its default; a missing checkpoint id matches no checkpoint
        default = {**{f.name: f.default for f in fields(Args)}, "checkpoint": "unknown"}
        diff = {k: (old.get(k, default[k]), cur[k]) for k in cur if old.get(k, default[k]) != cur[k]}
        if diff:
            raise runs.UsageError(f"{args.out_dir} holds reconstructions made with other settings (was, now): {diff}; "
                                  "use another --out_dir or delete that folder")
    elif rank == 0 and write:
        write_atomic(path, lambda p: Path(p).write_text(json.dumps(cur, indent=1)))


def generate(args, items, rank, device, dtype):
    """Caption + redraw `items` [(stem, path)] unless already done -> (pairs, captions, problems, counts)."""
    cap_dir, rec_dir = os.path.join(args.out_dir, "captions"), os.path.join(args.out_dir, "recon")
    pairs, captions, problems, todo = [], {}, [], []
    for stem, path in items:
        cp, rp = os.path.join(cap_dir, stem + ".txt"), os.path.join(rec_dir, stem + ".png")
        if os.path.isfile(cp) and os.path.isfile(rp):  # resume: reuse, never regenerate
            captions[stem] = open(cp).read()
            pairs.append((stem, path, rp))
            continue
        try:  # a cheap header check, so that a run left with only bad files never loads the model
            images.check_image(path)
            todo.append((stem, path))
        except images.ImageError as e:
            problems.append({"file": path, "reason": str(e).replace(f"{path}: ", "", 1)})
            tqdm.write(f"warning: {e} (skipped)")
    n_reused, m = len(pairs), None

    def keep(stem, path, text, im):  # caption and reconstruction (3, S, S) in [0, 1] -> files, each atomically
        cp, rp = os.path.join(cap_dir, stem + ".txt"), os.path.join(rec_dir, stem + ".png")
        write_atomic(cp, lambda p: Path(p).write_text(text))
        arr = (im.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        write_atomic(rp, lambda p: Image.fromarray(arr).save(p, format="PNG"))
        captions[stem] = text
        pairs.append((stem, path, rp))
    demo = released.Sampling.from_args(args) if args.preset_sampling == "released" else None
    if todo:
        m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                           decoder=args.decoder or None, dtype=dtype, device=device)
        size = args.resolution or m.transformer.config.sample_size * 2 ** (len(m.vae.config.block_out_channels) - 1)
        if demo and rank == 0:
            print(demo.describe(m), flush=True)
    for stem, path in tqdm(todo if demo else [], desc="caption+generate (released)", disable=rank != 0 or not demo):
        try:  # the demo's calls, one image at a time
            torch.manual_seed(image_seed(stem, args.seed))  # the caption's draws, where the generation config samples
            text = demo.caption(m, path)
        except images.ImageError as e:
            problems.append({"file": path, "reason": str(e).replace(f"{path}: ", "", 1)})
            tqdm.write(f"warning: {e} (skipped)")
            continue
        im = demo.draw(m, text)  # (3, S, S) in [0, 1], noise seeded with args.seed
        keep(stem, path, text, im)
    for i in tqdm(range(0, len(todo) if not demo else 0, args.batch_size), desc="caption+generate",
                  disable=rank != 0 or not todo):
        batch, ims = [], []
        for stem, path in todo[i:i + args.batch_size]:
            try:  # truncated files pass verify() and fail here
                ims.append(images.load_image(path, size))
                batch.append((stem, path))
            except images.ImageError as e:
                problems.append({"file": path, "reason": str(e).replace(f"{path}: ", "", 1)})
                tqdm.write(f"warning: {e} (skipped)")
        if not batch:
            continue
        x = torch.stack(ims).to(device)  # (B, 3, S, S)
        kw = dict(G=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                  instruction=model.instruction_text(args.instruction), instruction_first=args.instruction_first)
        if args.captions:  # another run's captions (--captions)
            texts = [Path(args.captions, "captions", stem + ".txt").read_text() for stem, _ in batch]
        elif args.batch_captions:
            torch.manual_seed(image_seed(batch[0][0], args.seed))
            texts = m.sample_captions(x, **kw).texts
        else:  # one image at a time, seeded by its name (departure 3)
            texts = []
            for (stem, _), xi in zip(batch, x):
                torch.manual_seed(image_seed(stem, args.seed))
                texts += m.sample_captions(xi[None], **kw).texts
        shape = m.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(s, args.seed)))
                             for s, _ in batch]).to(device)  # (B, C, h, w), per-image seed
        recon = m.generate_images(texts, noise=noise, steps=args.steps, cfg=args.cfg)  # (B, 3, S, S) in [0, 1]
        for (stem, path), text, im in zip(batch, texts, recon):
            keep(stem, path, text, im)
    if m is not None:
        del m
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return sorted(pairs), captions, problems, {"reused": n_reused, "generated": len(pairs) - n_reused}


def validate(args, given=()):
    """Every flag and path, before anything is loaded or written: the sampling preset and settings, the backbones and
    where their weights are, --init, --src / --recon, and --out_dir (writable, and new, empty or a folder this script
    wrote: never a training run's; its settings.json pins a rerun's). given: the flags named on the command line (a
    preset never overrides one). A user error raises runs.UsageError (or a CheckpointError / RewardError).
    -> the backbone names."""
    runs.need(args.preset_sampling in ("", *released.SAMPLING),
              f"--preset_sampling {args.preset_sampling!r}: known presets are {', '.join(released.SAMPLING)}")
    released.apply_sampling_preset(args, args.preset_sampling, given)
    if args.preset_sampling != "released":  # this project's captioning: the untruncated distribution unless asked
        runs.need(args.repetition_penalty is None, "--repetition_penalty: only with --preset_sampling released "
                                                   "(this project's captioning samples without one)")
        args.top_p = 1.0 if args.top_p is None else args.top_p
        args.top_k = 0 if args.top_k is None else args.top_k
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not args.src or not os.path.isdir(args.src):
        raise runs.UsageError(f"--src {args.src!r} is not a folder of source images")
    if args.score_only and (not args.recon or not os.path.isdir(args.recon)):
        raise runs.UsageError(f"--score_only needs --recon, a folder of reconstructions (got {args.recon!r})")
    runs.check_sampling(args)
    runs.at_least(args, 1, "batch_size")
    runs.above(args, 0, "dist_timeout")
    runs.need(not (set(names) - set(reward.BACKBONES)) and names,
              f"--backbones {args.backbones!r}: choose from {', '.join(reward.BACKBONES)}")
    for b in names:  # where each backbone's weights are, found now: not after hours of generation
        path = getattr(args, f"{b}_path", "")
        if path != "tiny":
            runs.check_local(f"{b}_path", path, "file or folder")
            reward.check_weights(b, path or None)
    if not args.score_only:
        if args.init:
            runs.check_init(args.init)
        for flag in ("encoder", "decoder"):
            runs.check_local(flag, getattr(args, flag))
    if args.captions and not args.score_only:  # every source image has its caption there, found now
        missing = [s for s in list_images(args.src)[0]
                   if not os.path.isfile(os.path.join(args.captions, "captions", s + ".txt"))]
        runs.need(not missing, f"--captions {args.captions}: no captions/<stem>.txt for {len(missing)} source "
                               f"image(s), e.g. {missing[:3]}")
    runs.check_own_folder("out_dir", args.out_dir, TOOL, WRITES)
    if not args.score_only:
        check_settings(args, rank=0, write=False)
    return names


def main(argv=None):
    args = runs.parse_args(Args, argv)
    names = validate(args, () if isinstance(argv, Args) else released.flags_given(argv))
    images.MAX_PIXELS = args.max_pixels
    rank, world, device = T.dist_setup(args.seed, args.dist_timeout)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    log = lambda msg: print(msg if world == 1 else f"[rank {rank}] {msg}", flush=True)
    if world > 1:
        dist.barrier()  # every rank has checked --out_dir before rank 0 writes in it
    if rank == 0:
        runs.record_outputs(args.out_dir, TOOL, WRITES)  # first: what this folder holds is this script's
    if world > 1:
        dist.barrier()
    for d in ("",) if args.score_only else ("", "captions", "recon"):
        os.makedirs(os.path.join(args.out_dir, d), exist_ok=True)

    # 1. the pairs: by stem from two folders (score_only), or by making the reconstructions.
    ignored = []
    src, shared = list_images(args.src, ignored)  # `shared` problems are the same on every rank: rank 0 reports them
    captions, counts, own = {}, {}, []
    if not src:
        shared.append({"file": args.src, "reason": "no image files in this folder"})
    bbs = {}  # loaded first: a missing backbone fails before hours of generation, not after
    for b in names if src else []:
        bbs[b] = reward.load_backbone(b, runs.reward_path(b, getattr(args, f"{b}_path", "")), device=str(device)).eval()
    if args.score_only:
        rec, p2 = list_images(args.recon, ignored)
        pairs, p3 = pair_by_stem(src, rec)
        shared += p2 + p3
        mine = pairs[rank::world]
    else:
        check_settings(args, rank)
        mine, captions, own, counts = generate(args, sorted(src.items())[rank::world], rank, device, dtype)
        log(f"reconstructions: generated {counts['generated']}, reused {counts['reused']} (of {len(mine)} on this rank)")
    problems = (shared if rank == 0 else []) + own

    # 2. score this rank's pairs under each backbone (docs/algorithm.md §7).
    rows, p4 = [], []
    for i in tqdm(range(0, len(mine), args.batch_size), desc="score", disable=rank != 0):
        r, p = score_pairs(bbs, mine[i:i + args.batch_size], device)
        rows += r
        p4 += p
    for row in rows:
        if row["name"] in captions:
            row["caption"] = captions[row["name"]]
    problems += p4

    # 3. gather on rank 0 and report.
    shard = {"rows": rows, "problems": problems, "captions": captions, "counts": counts}
    if world > 1:
        shards = [None] * world if rank == 0 else None
        dist.gather_object(shard, shards, dst=0)
    else:
        shards = [shard]
    status = 0
    if rank == 0:
        rows = sorted((r for s in shards for r in s["rows"]), key=lambda r: r["name"])
        problems = [p for s in shards for p in s["problems"]]
        captions = {k: v for s in shards for k, v in s["captions"].items()}
        stats, summary = summarize(rows, names)
        summary.update(n_sources=len(src), n_problems=len(problems), n_ignored=len(ignored),
                       generated=sum(s["counts"].get("generated", 0) for s in shards),
                       reused=sum(s["counts"].get("reused", 0) for s in shards))
        if captions:
            words = [len(c.split()) for c in captions.values()]
            summary["caption_words_mean"] = sum(words) / len(words)
            with open(os.path.join(args.out_dir, "captions.jsonl"), "w") as f:
                for stem in sorted(captions):
                    f.write(json.dumps({"name": stem, "source": src.get(stem), "caption": captions[stem]}) + "\n")
        label = "ours: " + (os.path.basename(os.path.normpath(args.init)) if args.init else
                            f"recon: {args.recon}" if args.score_only else f"preset {args.preset}")
        for p in problems:
            print(f"problem: {p['file']}: {p['reason']}")
        why_not = comparability(args, names)
        res = {"protocol": "Unified-Bench (docs/algorithm.md §7): cos(f(source), f(reconstruction)) x 100",
               "summary": summary, "backbones": stats, "problems": problems, "ignored": ignored, "per_image": rows,
               "comparable_with_paper": not why_not,
               "paper": PAPER, "args": asdict(args), "world": world}
        with open(os.path.join(args.out_dir, "unified_bench.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(markdown_table(stats, summary, label, names, paper=not why_not))
        if why_not:
            print(f"note: not comparable with the paper's Unified-Bench ({PAPER[0]['overall']}): {why_not}")
        print(f"{summary['n']} pairs scored, {len(problems)} problems; wrote {os.path.join(args.out_dir, 'unified_bench.json')}")
        if summary["n"] == 0:
            print("error: no (source, reconstruction) pair could be scored; see the problems above", file=sys.stderr)
            status = 2
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    runs.cli(main)
