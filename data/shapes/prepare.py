"""
The shapes world: deterministic 64-px images of 1-3 coloured shapes at named positions on a
coloured background, each with a complete ground-truth caption, a terse one (part of the scene,
as a captioner before RL writes; data/shapes/standins.py fine-tunes the tiny captioner on them),
and the structured parts (background, shapes) from which both are written.

    python data/shapes/prepare.py                # -> data/shapes/{train,val}/*.png + captions.jsonl
    python data/shapes/prepare.py --n_train 2000 --n_val 100 --seed 0

Like nanoGPT's data/*/prepare.py: run once, the stage scripts read the folders it writes.
"""
import argparse
import json
import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
SIZES = {"small": 0.14, "large": 0.22}


def render(background, shapes, size=64):
    """Draw a scene from its parts (background colour name, list of shape dicts) -> PIL image."""
    img = Image.new("RGB", (size, size), COLORS[background])
    d = ImageDraw.Draw(img)
    for p in shapes:
        cx, cy = (v * size for v in POSITIONS[p["position"]])
        r = SIZES[p["size"]] * size
        box = [cx - r, cy - r, cx + r, cy + r]
        if p["shape"] == "circle":
            d.ellipse(box, fill=COLORS[p["color"]])
        elif p["shape"] == "square":
            d.rectangle(box, fill=COLORS[p["color"]])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[p["color"]])
    return img


def describe(background, shapes):
    """The caption of the given parts; background=None leaves the background out."""
    phrases = [f"a {p['size']} {p['color']} {p['shape']} at the {p['position']}" for p in shapes]
    phrases = [p.replace("at the center", "in the center") for p in phrases]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if background is None:
        return body + "."
    art = "an" if background[0] in "aeiou" else "a"
    return f"{body} on {art} {background} background."


def reading_order(shapes):
    """Shapes sorted top to bottom, left to right (top left, top right, center, bottom left, bottom right)."""
    return sorted(shapes, key=lambda p: POSITIONS[p["position"]][::-1])


def terse_caption(parts, rng, p_one=0.6, p_background=0.35):
    """An under-describing caption, as a captioner before RL writes: the shapes in reading order, stopping
    after the first with probability p_one (else after a uniformly drawn number of them, possibly all);
    the background with probability p_background."""
    shapes = reading_order(parts["shapes"])
    k = 1 if rng.random() < p_one else rng.randint(1, len(shapes))
    return describe(parts["background"] if rng.random() < p_background else None, shapes[:k])


def draw_scene(rng, size=64):
    """-> (PIL image, caption, parts). Shapes never share a position."""
    bg = rng.choice(list(COLORS))
    parts = []
    for pos in rng.sample(list(POSITIONS), rng.randint(1, 3)):
        color = rng.choice([c for c in COLORS if c != bg])
        shape, sz = rng.choice(SHAPES), rng.choice(list(SIZES))
        parts.append({"size": sz, "color": color, "shape": shape, "position": pos})
    return render(bg, parts, size), describe(bg, parts), {"background": bg, "shapes": parts}


def write_split(out, n, seed, size=64):
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    trng = random.Random(seed + 1_000_003)  # terse captions: their own stream, so the scenes stay as they were
    with open(os.path.join(out, "captions.jsonl"), "w") as f:
        for i in range(n):
            img, cap, parts = draw_scene(rng, size)
            name = f"{i:05d}.png"
            img.save(os.path.join(out, name))
            terse = terse_caption(parts, trng)
            f.write(json.dumps({"image": name, "caption": cap, "terse": terse, **parts}) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="where train/ and val/ go")
    p.add_argument("--n_train", type=int, default=2000, help="training images")
    p.add_argument("--n_val", type=int, default=100, help="held-out images (the Unified-Bench-style split)")
    p.add_argument("--resolution", dest="size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (val uses seed + 1)")
    a = p.parse_args()
    write_split(os.path.join(a.out, "train"), a.n_train, a.seed, a.size)
    write_split(os.path.join(a.out, "val"), a.n_val, a.seed + 1, a.size)
    print(f"wrote {a.n_train} train and {a.n_val} val images to {a.out}/{{train,val}}")
