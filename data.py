"""
Images and files, shared by every script: the one image reader, datasets, sample grids, the
cache home for the offline stand-ins, and atomic publishing of a directory.
Imports nothing from this repository (model.py, reward.py and training.py import it).
"""
import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

UAE_HOME = os.path.expanduser(os.environ.get("UAE_HOME", "~/.cache/uae"))


class CheckpointError(RuntimeError):
    """A checkpoint or weights folder that cannot be used (missing, truncated, foreign, pickled)."""


def atomic_publish(tmp, path):
    """Replace directory `path` by `tmp` so that a reader never sees a half-written one."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)) or ".", prefix=".old-")
        os.rmdir(old)
        try:
            os.replace(path, old)
        except FileNotFoundError:
            old = None
    try:
        os.replace(tmp, path)
    except OSError:  # another process published it first (e.g. two ranks building the tiny preset)
        shutil.rmtree(tmp, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)



# ----------------------------------------------------------------------------------------------
# Images and data: a folder of images or a JSONL of {"image": path, "caption": text}.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    pass


def load_image(path, size):
    """Any readable image -> (3, size, size) float in [0, 1]: RGBA/LA/P composited on white,
    16-bit and float modes rescaled, center-cropped to a square, resized (bicubic)."""
    import numpy as np
    from PIL import Image
    try:
        im = Image.open(path)
        im.draft("RGB", (size * 2, size * 2))  # JPEG: decode huge files at reduced size
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            im = Image.fromarray((a * 255).astype(np.uint8)).convert("RGB")
        elif im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.split()[-1])
        else:
            im = im.convert("RGB")
    except Exception as e:  # truncated, not an image, decompression bomb, ...
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    w, h = im.size
    c = min(w, h)
    im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


class ImageDataset:
    """Items are (name, caption or None). Unreadable images are reported by file name and
    dropped from the draw (never a crash); `bad` keeps them for the run's log."""

    def __init__(self, path, size, need_captions=False):
        self.size, self.bad = size, {}
        if os.path.isdir(path):
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
            self.items = [(f, None) for f in files]
        elif os.path.isfile(path) and path.endswith(".jsonl"):
            root, self.items = os.path.dirname(os.path.abspath(path)), []
            for ln, line in enumerate(open(path), 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    img = d["image"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{ln}: expected a JSON object with an \"image\" key ({e})") from None
                self.items.append((img if os.path.isabs(img) else os.path.join(root, img), d.get("caption")))
        else:
            raise FileNotFoundError(f"--data {path!r}: expected a folder of images or a .jsonl of {{image, caption}}")
        if not self.items:
            raise ValueError(f"--data {path!r}: no images found (extensions {', '.join(IMAGE_EXTS)})")
        if need_captions:
            miss = [p for p, c in self.items if not c]
            if miss:
                raise ValueError(f"--data {path!r}: {len(miss)} images have no caption (e.g. {miss[0]}); the 'fm' "
                                 "objective needs a .jsonl with {\"image\": ..., \"caption\": ...} lines")

    def __len__(self):
        return len(self.items)

    def batch(self, idx):
        """Load items idx -> (images (B, 3, S, S), captions, names); a bad file is replaced by the
        next good one in order and recorded in self.bad."""
        ims, caps, names = [], [], []
        for i in idx:
            for j in range(len(self.items)):
                path, cap = self.items[(i + j) % len(self.items)]
                if path in self.bad:
                    continue
                try:
                    ims.append(load_image(path, self.size))
                except ImageError as e:
                    self.bad[path] = str(e)
                    print(f"warning: {e} (skipped; {len(self.bad)} bad files so far)")
                    continue
                caps.append(cap)
                names.append(path)
                break
            else:
                raise ValueError("every image in the dataset is unreadable: " + "; ".join(list(self.bad.values())[:3]))
        return torch.stack(ims), caps, names


def save_grid(path, columns, labels=None, size=None):
    """A PNG a person can open: one row per item, columns = list of image batches (B, 3, H, W) in
    [0, 1] (e.g. source | reconstructions), a text label under each row."""
    import textwrap
    from PIL import Image, ImageDraw
    B = columns[0].shape[0]
    H = size or columns[0].shape[-1]
    rows = []
    for b in range(B):
        ims = [F.interpolate(c[b:b + 1].float().cpu(), size=(H, H), mode="bilinear")[0] for c in columns]
        row = Image.fromarray((torch.cat(ims, 2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        if labels:
            lines = textwrap.wrap(str(labels[b]), width=max(20, row.width // 6))[:6]
            canvas = Image.new("RGB", (row.width, H + 12 * len(lines) + 4), "white")
            canvas.paste(row, (0, 0))
            ImageDraw.Draw(canvas).multiline_text((2, H + 2), "\n".join(lines), fill="black")
            row = canvas
        rows.append(row)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)
