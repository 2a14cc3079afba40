"""
Stage 3's caption cache (--captions_per_image K): the encoder is frozen during stage 3, so the captions of an
image need not be sampled again at every visit. Before step 1 the frozen encoder captions every image the run
will visit K times (one generate call of K rows per image, sharded over ranks) into out_dir/captions.jsonl,
which --resume and reruns read back (a file from other data, K, sampling or encoder is refused); a visit uses
one of its image's K, each once in any K consecutive epochs. Every caption comes from a seed of (seed, dataset
index), never of a step, a rank or a batch, so the cache and every draw from it are the same for any rank count
and across --resume. What it changes and costs: docs/performance.md.
"""
import hashlib
import json
import os
import time

import torch
from tqdm import tqdm

import images
import model as M
import training as T

CAPTION_CACHE = "captions.jsonl"
CAPTION_CACHE_FORMAT = "uae-caption-cache-v1"
HEADER_SINCE = {"instruction_first": False}  # header keys added since: the value a file without them was made with


class CaptionCacheError(images.CheckpointError):
    """out_dir/captions.jsonl belongs to another run (data, K, sampling or encoder) or is unreadable: one line."""


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
                                     temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                     instruction=M.instruction_text(args.instruction),
                                     instruction_first=args.instruction_first).texts
    return {k: texts[b * K:(b + 1) * K] for b, k in enumerate(keys)}


def caption_pick(seed, key, epoch, K):
    """Which of image `key`'s K cached captions its visit in `epoch` uses: a fresh permutation of the K for every
    K epochs, so K consecutive epochs use each caption once (an image is visited once per epoch)."""
    return int(torch.randperm(K, generator=T.generator(seed, key, epoch // K, "caption_pick"))[epoch % K])


def pick_captions(cache, keys, epochs, args):
    """The caption of each visit: image keys[b] in epochs[b] -> [caption]."""
    return [cache[k][caption_pick(args.seed, k, e, len(cache[k]))] for k, e in zip(keys, epochs)]


def args_header(args, items):
    """The part of the cache header that args and the dataset's items [(path, caption)] decide (known before the
    model loads: stage 3's validation compares it)."""
    paths = "\n".join(os.path.abspath(p) for p, _ in items)
    return {"format": CAPTION_CACHE_FORMAT, "captions_per_image": args.captions_per_image, "seed": args.seed,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "instruction": M.instruction_text(args.instruction), "instruction_first": args.instruction_first,
            "n_images": len(items), "images_sha256": hashlib.sha256(paths.encode()).hexdigest()[:16]}


def caption_cache_header(m, ds, args):
    """What the cached captions depend on; a cache file with another header is refused, not reused."""
    enc = hashlib.sha256()  # the encoder LoRA of every earlier stage, merged into the base encoder
    for _, tensors in m.layers:
        for k in sorted(t for t in tensors if t.startswith("encoder.")):
            enc.update(k.encode())
            enc.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {**args_header(args, ds.items), "encoder": m.base.get("encoder"), "encoder_layers": enc.hexdigest()[:16]}


def is_caption_cache(path):
    """Does the file at path begin with a caption cache's header line (whatever follows)?"""
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and head.get("format") == CAPTION_CACHE_FORMAT


def read_caption_cache(path, header):
    """{dataset index: [K captions]} from a cache file written for this header (the keys of `header` are compared:
    stage 3's validation passes args_header's); {} when there is none. CaptionCacheError naming the file and what
    to do otherwise."""
    if not os.path.exists(path):
        return {}
    redo = ("delete it and run the same command again: stage 3 captions the images again before step 1 (or pass "
            "--captions_per_image 0: a fresh caption at every visit, no cache)")
    try:
        lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        head, rows = lines[0], {int(d["i"]): list(d["captions"]) for d in lines[1:]}
        if head.get("format") != CAPTION_CACHE_FORMAT:
            raise ValueError(f"the first line is not a {CAPTION_CACHE_FORMAT} header")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CaptionCacheError(f"{path} is unreadable as a caption cache ({type(e).__name__}: {e}); {redo}") from None
    was = {k: head.get(k, HEADER_SINCE.get(k)) for k in header}
    diff = {k: (was[k], v) for k, v in header.items() if was[k] != v}
    if diff:
        raise CaptionCacheError(
            f"{path} holds captions of another run (this file's value, this run's): {diff}. Delete it to caption "
            "again, or use another --out_dir (--captions_per_image 0 captions at every visit and ignores it)")
    if any(len(c) != header["captions_per_image"] for c in rows.values()):
        raise CaptionCacheError(f"{path}: an image has a number of captions other than "
                                f"{header['captions_per_image']}; {redo}")
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
