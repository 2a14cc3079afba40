"""
What stage 3 can gain in the shapes world, measured on a finished demo run (docs/demo.md, "Stage 3 in the shapes world"):

    python data/shapes/probe.py --run out/demo                 # -> out/demo/probe.json + a printed table

1. The reward itself: tiny-CLIP cos(f(source), f(edit)) for edits of held-out scenes drawn by prepare.render:
   the VAE's reconstruction (the ceiling a decoder can reach), the background alone, each shape recoloured,
   moved, re-shaped, resized, one shape dropped, another background. How much does drawing the shapes right
   move the reward, next to drawing the background right?
2. The samplers: for each checkpoint (after stage 1, 2, 3), the held-out images captioned once by its captioner
   (temperature 0.7, one seed per image), then redrawn from the same caption and the same initial noise by the
   ODE (Euler, the benchmark's and stage 3's eval sampler) and by stage 3's SDE at noise levels a, with noise on
   every step or only in a window of the first W (--sde_window), --G draws each.
   Also the redraw from the ground-truth FULL caption: how well the decoder follows a caption that names
   everything.
"""
import argparse
import json
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import images  # noqa: E402
import prepare  # noqa: E402
import reward as R  # noqa: E402
import runs  # noqa: E402
import training as T  # noqa: E402
from standins import pil_tensor  # noqa: E402
from stage3_grpo_gen import sde_sample  # noqa: E402


def edits(rec, rng):
    """Scenes that differ from rec in one thing each -> {name: PIL image}."""
    bg, shapes = rec["background"], rec["shapes"]
    others = lambda used: [c for c in prepare.COLORS if c not in used]
    free = lambda: [p for p in prepare.POSITIONS if p not in {s["position"] for s in shapes}]
    out = {"background only": prepare.render(bg, [])}
    out["shapes recoloured"] = prepare.render(bg, [{**s, "color": rng.choice(others({bg, s["color"]}))} for s in shapes])
    if free():
        moved = list(shapes)
        k = rng.randrange(len(moved))
        moved[k] = {**moved[k], "position": rng.choice(free())}
        out["one shape moved"] = prepare.render(bg, moved)
    out["shapes re-shaped"] = prepare.render(bg, [{**s, "shape": rng.choice([x for x in prepare.SHAPES if x != s["shape"]])}
                                                 for s in shapes])
    out["shapes resized"] = prepare.render(bg, [{**s, "size": "small" if s["size"] == "large" else "large"} for s in shapes])
    if len(shapes) > 1:
        out["one shape dropped"] = prepare.render(bg, shapes[1:])
    out["other background"] = prepare.render(rng.choice(others({bg} | {s["color"] for s in shapes})), shapes)
    return out


@torch.no_grad()
def reward_probe(clip, m, val, recs, size):
    rng, acc = random.Random(0), {}
    X = torch.stack([images.load_image(os.path.join(val, r["image"]), size) for r in recs])
    acc["VAE reconstruction"] = clip.similarity(X, m.vae_decode(m.vae_encode(X))).tolist()
    for i, r in enumerate(recs):
        for k, im in edits(r, rng).items():
            acc.setdefault(k, []).append(clip.similarity(X[i:i + 1], pil_tensor(im)[None]).item())
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def sampler_probe(m, clip, X, caps, args):
    """-> {sampler: mean reward} for one set of captions (one per image), the same initial noise for every sampler."""
    n, G = len(caps), args.G
    cond = m.condition(caps).repeat_interleave(G)
    noise = torch.cat([torch.randn((G,) + m.latent_shape(args.resolution, args.resolution),
                                   generator=T.generator(args.seed, i, "probe_noise")) for i in range(n)])
    src = X.repeat_interleave(G, 0)
    out = {}
    for steps in args.ode_steps:
        out[f"ODE {steps} steps"] = clip.similarity(src, m.vae_decode(m.sample_ode(noise, cond, None, steps, 1.0))).mean().item()
    sig = m.sigmas(args.sde_steps)
    for a in args.noise_levels:
        for w in args.windows:
            z, _, _ = sde_sample(m, noise, cond, None, sig, a, 1.0, T.generator(args.seed, "probe_sde"), window=w)
            name = f"SDE {args.sde_steps} steps a={a}" + (f" window {w}" if w else "")
            out[name] = clip.similarity(src, m.vae_decode(z)).mean().item()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="out/demo", help="a demo.py out_dir (shapes/, standins/, stage1/, stage2/, stage3/)")
    p.add_argument("--stages", default="stage1,stage2,stage3", help="checkpoints to probe: folders under --run, or paths")
    p.add_argument("--n", type=int, default=32, help="held-out images")
    p.add_argument("--G", type=int, default=4, help="draws per caption and sampler")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--ode_steps", default="10,8", help="Euler steps (the demo: 10 for the bench and stage 3's eval)")
    p.add_argument("--sde_steps", type=int, default=8, help="stage 3's --sample_steps in the demo")
    p.add_argument("--noise_levels", default="0.7", help="stage 3's --noise_level values to try")
    p.add_argument("--windows", default="0,3", help="stage 3's --sde_window values to try (0: noise on every step)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.ode_steps = [int(s) for s in a.ode_steps.split(",")]
    a.noise_levels = [float(s) for s in a.noise_levels.split(",")]
    a.windows = [int(s) for s in a.windows.split(",")]
    torch.manual_seed(a.seed)
    run, val = os.path.abspath(a.run), os.path.join(os.path.abspath(a.run), "shapes", "val")
    recs = [json.loads(line) for line in open(os.path.join(val, "captions.jsonl"))][:a.n]
    X = torch.stack([images.load_image(os.path.join(val, r["image"]), a.resolution) for r in recs])
    clip = R.load_backbone("clip", os.path.join(run, "standins", "clip"))
    res = {}
    for st in a.stages.split(","):
        m = runs.load_model(init=os.path.join(run, st))  # a name under --run, or any checkpoint folder's path
        m.eval()
        if not res:
            res["reward"] = reward_probe(clip, m, val, recs, a.resolution)
        caps = m.sample_captions_seeded(X, [T.seed_of(a.seed, i, "probe_caption") for i in range(len(recs))], G=1,
                                        temperature=0.7, max_new_tokens=40).texts
        res[st] = {"own captions": sampler_probe(m, clip, X, caps, a),
                   "full captions": sampler_probe(m, clip, X, [r["caption"] for r in recs], a)}
    json.dump(res, open(os.path.join(run, "probe.json"), "w"), indent=1)
    print("| edit of the source | tiny-CLIP cos |\n|---|---|")
    for k, v in res["reward"].items():
        print(f"| {k} | {v:.3f} |")
    samplers = list(res[a.stages.split(",")[0]]["own captions"])
    print("\n| checkpoint, captions | " + " | ".join(samplers) + " |\n|---|" + "---|" * len(samplers))
    for st in a.stages.split(","):
        for c in ("own captions", "full captions"):
            print(f"| {st}, {c} | " + " | ".join(f"{res[st][c][s]:.3f}" for s in samplers) + " |")
    return res


if __name__ == "__main__":
    main()
