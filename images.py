"""
Images and files, shared by every script: the one image reader (read_image: training, eval and
sample read every file the same way), datasets (a folder of images or a .jsonl of pairs), sample
grids, the errors a user can fix in a file (DataError, CheckpointError), the cache home of the
offline presets, and atomic publishing of a folder. Imports nothing from this repository.
"""
import json
import os
import shutil
import stat
import tempfile
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

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
# The pixel cap, checked from the header before anything is decoded (--max_pixels on every script sets it,
# as PIL's own Image.MAX_IMAGE_PIXELS is a module setting). 64 MP = 8192 x 8192: above every camera most
# people own (45-61 MP full frame), well under PIL's decompression-bomb warning (89 MP) and error (179 MP);
# decoded it is 192 MB as RGB bytes, 768 MB as the float tensor eval scores at native size.
MAX_PIXELS = 1 << 26


class DataError(ValueError):
    """A --data / --src problem the user can fix: a missing file, a malformed .jsonl line, no images."""


class DataNotFound(DataError, FileNotFoundError):
    """--data (or an image it names) does not exist."""


class ImageError(DataError):
    """One image file that cannot be read: not a regular file, over the pixel cap, not an image, truncated."""


def check_image_file(path):
    """os.stat + S_ISREG: a FIFO, socket or device named x.png is refused before anything opens it
    (opening a FIFO blocks forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"{path}: cannot read image ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file (a FIFO, socket or device is never opened)")


def _open_checked(path, max_pixels):
    """PIL image with only its header read, after the regular-file and pixel-cap checks."""
    check_image_file(path)
    cap = int(max_pixels or MAX_PIXELS)
    pil_cap = Image.MAX_IMAGE_PIXELS
    try:  # our cap decides, by name, just below (PIL's own check would word it otherwise, or undercut a raised cap)
        Image.MAX_IMAGE_PIXELS = None
        im = Image.open(path)  # reads the header only
    finally:
        Image.MAX_IMAGE_PIXELS = pil_cap
    w, h = im.size
    if w * h > cap:
        im.close()
        raise ImageError(f"{path}: {w} x {h} = {w * h / 1e6:.1f} MP is over the pixel cap of {cap / 1e6:.1f} MP "
                         f"(not decoded; raise --max_pixels to read it)")
    return im


def check_image(path, max_pixels=None):
    """A cheap check that `path` is an image we will read: regular file, header, pixel cap, PIL verify()
    (no decoding of the pixels for most formats). -> (width, height); ImageError otherwise."""
    try:
        with _open_checked(path, max_pixels) as im:
            size = im.size
            im.verify()
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return size


def _scale_of(mode, a):
    """The full-scale value of a high-bit-depth image, so that it maps to [0, 1] without stretching:
    I;16* -> 65535; I (32-bit int: what older PILs and TIFF give for 16-bit data) -> 65535 when any
    value is above 255, else 255 (8-bit data widened); F (float) -> 1 when every value is <= 1 (the
    usual [0, 1] float TIFF), else 255 when <= 255, else 65535."""
    if mode.startswith("I;16"):
        return 65535.0
    hi = float(np.nanmax(a)) if a.size else 0.0
    if mode == "I":
        return 65535.0 if hi > 255 else 255.0
    return 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0


def _to_rgb(im):
    """Any PIL mode -> 8-bit RGB, the same rule everywhere: 16-bit / 32-bit int / float grey scaled by
    _scale_of (never min-max stretched); alpha (RGBA, LA, PA, La, RGBa, P or L/RGB with a transparency
    key) composited on white; CMYK, YCbCr, 1, L, P, ... by PIL's convert."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        a = np.clip(a / _scale_of(mode, a), 0.0, 1.0)
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def read_image(path, size=None, max_pixels=None):
    """The one image reader of this repository (training, eval, sample). -> (3, H, W) float in [0, 1].
    Refused with ImageError naming the file: not a regular file (checked with os.stat before opening),
    over the pixel cap (max_pixels, default MAX_PIXELS; read from the header, nothing decoded), not an
    image, truncated. EXIF orientation is applied (a phone photo stands upright); modes by _to_rgb.
    size None: native size (eval's scoring); size S: center-cropped to a square, resized to S x S
    (bicubic), large JPEGs decoded at a reduced scale first (draft)."""
    try:
        with _open_checked(path, max_pixels) as im:
            if size:
                im.draft("RGB", (size * 2, size * 2))  # JPEG: decode huge files at reduced size
            im = _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except Exception as e:  # truncated, not an image, unknown mode, ...
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if size:
        w, h = im.size
        c = min(w, h)
        im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def load_image(path, size, max_pixels=None):
    """read_image at a training size: (3, size, size) float in [0, 1]."""
    return read_image(path, size, max_pixels)


def _image_path(root, img):
    img = os.path.expanduser(img)
    return img if os.path.isabs(img) else os.path.join(root, img)


def list_dataset(path, need_captions=False, flag="data"):
    """Parse --data (or the dataset flag named by `flag`) completely -> [(image path, caption or None)], or
    DataError naming the flag, file or line: a folder (recursive; every image-extension entry must be a regular file) or a .jsonl whose
    every non-blank line is a JSON object with a string "image" naming an existing regular file
    (relative to the .jsonl's folder) and an optional string "caption"."""
    if not path:
        raise DataError(f'--{flag} is required: a folder of images or a .jsonl of {{"image": path, "caption": text}} lines')
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
        items = [p for p in files if os.path.isfile(p)]
        odd = [p for p in files if not os.path.isfile(p)]
        if odd:
            raise DataError(f"--{flag} {path!r}: {odd[0]} is not a regular file (a FIFO, socket, device or broken link"
                            + (f"; {len(odd) - 1} more" if len(odd) > 1 else "") + "); move it out of the folder")
        items = [(p, None) for p in items]
    elif os.path.isfile(path) and path.endswith(".jsonl"):
        root, items = os.path.dirname(os.path.abspath(path)), []
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--data {path}: cannot read it ({type(e).__name__}: {e})") from None
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e}); expected an object with an \"image\" key") from None
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a JSON object with an \"image\" key, got {type(d).__name__}")
            img, cap = d.get("image"), d.get("caption")
            if not isinstance(img, str) or not img:
                raise DataError(f"{where}: \"image\" must be a non-empty string (a path), got {img!r}")
            if cap is not None and not isinstance(cap, str):
                raise DataError(f"{where}: \"caption\" must be a string, got {type(cap).__name__}")
            p = _image_path(root, img)
            try:
                st = os.stat(p)
            except OSError:
                raise DataNotFound(f"{where}: image {img!r} does not exist ({p})") from None
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{where}: image {img!r} is not a regular file ({p})")
            items.append((p, cap))
    elif os.path.exists(path):
        raise DataError(f"--{flag} {path!r}: expected a folder of images or a .jsonl of {{image, caption}}")
    else:
        raise DataNotFound(f"--{flag} {path!r}: no such file or folder (expected a folder of images or a .jsonl)")
    if not items:
        raise DataError(f"--{flag} {path!r}: no images found (extensions {', '.join(IMAGE_EXTS)})")
    if need_captions:
        miss = [p for p, c in items if not c]
        if miss:
            raise DataError(f"--{flag} {path!r}: {len(miss)} images have no caption (e.g. {miss[0]}); the 'fm' "
                            "objective needs a .jsonl with {\"image\": ..., \"caption\": ...} lines")
    return items


class ImageDataset:
    """Items are (name, caption or None), parsed and checked by list_dataset. Unreadable images are
    reported by file name and dropped from the draw (never a crash); `bad` keeps them for the run's log."""

    def __init__(self, path, size, need_captions=False, max_pixels=None):
        self.size, self.max_pixels, self.bad = size, max_pixels, {}
        self.items = list_dataset(path, need_captions)

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
                    ims.append(read_image(path, self.size, self.max_pixels))
                except ImageError as e:
                    self.bad[path] = str(e)
                    print(f"warning: {e} (skipped; {len(self.bad)} bad files so far)")
                    continue
                caps.append(cap)
                names.append(path)
                break
            else:
                raise DataError("every image in the dataset is unreadable: " + "; ".join(list(self.bad.values())[:3]))
        return torch.stack(ims), caps, names


def save_png(path, im):
    """im (3, H, W) in [0, 1] -> an 8-bit RGB PNG at path."""
    Image.fromarray((im.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


def save_grid(path, columns, labels=None, size=None):
    """A PNG a person can open: one row per item, columns = list of image batches (B, 3, H, W) in
    [0, 1] (e.g. source | reconstructions), a text label under each row."""
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
