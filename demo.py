"""
The shapes-world demo: the whole UAE recipe on CPU in minutes, where the "aha moment" can be seen.

    python demo.py                    # ./run.sh demo does this; writes out/demo/report.{md,png}
    python demo.py --seed 1 --out_dir out/demo-s1
    python demo.py --quick            # a shortened run that only checks that everything is produced

It runs the real scripts, unchanged, as subprocesses (stages with --overwrite: a rerun replaces the last one):
  data/shapes/prepare.py      images of 1-3 coloured shapes + complete captions (train / held-out val)
  data/shapes/standins.py     stand-ins for what a real user downloads, trained here in ~2.5 minutes: a
                              tiny CLIP (the semantic reward), a tiny VAE, a tiny captioner fine-tuned on
                              *terse* captions (it starts under-describing, as the paper's does)
  stage1_coldstart.py         fm (the DiT learns to read the LVLM, full captions), then sem (cold start)
  stage2_grpo_und.py          GRPO on the captioner          -> captions should grow, reward rise
  stage3_grpo_gen.py          Flow-GRPO on the decoder       -> reconstructions more faithful
  eval_unified.py             held-out Unified-Bench-style score after stages 1, 2 and 3
and writes a report: reward / caption-length curves, a grid of held-out sources with their
reconstructions after each stage (and captions), the score table with what the captions name, the
three checks below, and wall time per phase.

The checks (report.md, "What it shows"; report.json "checks"):
  1. over stage 2, words per caption rise     (fixed held-out eval: same images, seeds, noise; step 0 -> last)
  2. over stage 2, the reward rises           (the same eval)
  3. held-out tiny-CLIP score after stage 3 > after stage 1   (eval_unified on the val split)
The training-batch reward is plotted too, but it mostly shows which images were drawn that step.

What had to change in the world for the effect to show (each measured; see data/shapes/standins.py):
  - The tiny CLIP scores mostly the background (it fills the picture), and terse captions name it ~20% of
    the time: the reward for saying more is mostly the reward for naming the background. That is the aha
    moment here: the captioner learns to say "on a blue background".
  - The decoder is a 4 x 128 DiT trained in full (--dit_full), not build_tiny's 2 x 32 one with LoRA, whose
    flow-matching loss stalls near the unconditional one.
  - The stand-in LVLM also learns a text-only task (restate the caption, background first) so that its
    hidden states carry what the caption says; without it the DiT never read the caption (loss with a
    shuffled caption equal to 0.1% after 800 steps).
  - CFG 1 everywhere: stage 1's flow matching never sees the negative prompt, so guidance against it only
    adds noise at this scale.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKGROUND = re.compile(r"\bon an? (\w+) background\b")

# step counts: (full run, --quick)
PLAN = {
    "n_train": (2000, 64), "n_val": (32, 4), "eval_every": (5, 1),
    "fm_steps": (800, 4), "sem_steps": (20, 2), "s2_steps": (30, 2), "s3_steps": (30, 2),
}


def run(cmd, log, times, name):
    t0 = time.time()
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n=== {name}: {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    times[name] = time.time() - t0
    if p.returncode != 0:
        tail = open(log).read()[-3000:]
        sys.exit(f"{name} failed (exit {p.returncode}); the end of {log}:\n{tail}")
    print(f"    {name}: {times[name]:.1f}s", flush=True)


def read_log(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/demo", help="everything goes here; report.md + report.png at the top")
    p.add_argument("--seed", type=int, default=0, help="one seed for the world, the stand-ins and every stage")
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the artifacts, shows nothing")
    a = p.parse_args()
    q = int(a.quick)
    n = {k: v[q] for k, v in PLAN.items()}
    out = os.path.abspath(a.out_dir)
    os.makedirs(out, exist_ok=True)
    log, times, t_start = os.path.join(out, "demo.log"), {}, time.time()
    open(log, "w").close()
    data, S = os.path.join(out, "shapes"), os.path.join(out, "standins")
    train, val = os.path.join(data, "train", "captions.jsonl"), os.path.join(data, "val")
    seed = ["--seed", str(a.seed)]
    base = ["--encoder", f"{S}/encoder", "--decoder", f"{S}/decoder"]
    reward = ["--reward", "clip", "--reward_path", f"{S}/clip"]
    run(["data/shapes/prepare.py", "--out", data, "--n_train", str(n["n_train"]), "--n_val", str(n["n_val"]), *seed], log, times, "prepare")
    quick = ["--vae_steps", "4", "--clip_steps", "4", "--cap_steps", "4", "--eval_n", "4", "--eval_G", "2"] if q else []
    run(["data/shapes/standins.py", "--data", data, "--out", S, *seed, *quick], log, times, "standins")
    run(["stage1_coldstart.py", *base, "--resolution", "64", "--data", train, "--objective", "fm", "--steps", str(n["fm_steps"]),
         "--dit_full", "true", "--batch_size", "16", "--lr", "2e-3", "--sample_every", "0", "--save_every", "100000", "--out_dir", f"{out}/stage1_fm", "--overwrite", *seed],
        log, times, "stage1 fm")
    run(["stage1_coldstart.py", "--init", f"{out}/stage1_fm", "--resolution", "64", "--data", train, "--objective", "sem", *reward,
         "--steps", str(n["sem_steps"]), "--batch_size", "8", "--max_new_tokens", "40", "--lr", "3e-4", "--sample_every", "0",
         "--save_every", "100000", "--out_dir", f"{out}/stage1", "--overwrite", *seed], log, times, "stage1 sem")
    bench = ["--src", val, "--steps", "10", "--cfg", "1.0", "--max_new_tokens", "40", "--temperature", "0.7",
             "--backbones", "clip,pixel", "--clip_path", f"{S}/clip", "--batch_size", "8", *seed]
    run(["eval_unified.py", "--init", f"{out}/stage1", "--out_dir", f"{out}/bench_stage1", *bench], log, times, "bench after 1")
    run(["stage2_grpo_und.py", "--init", f"{out}/stage1", "--resolution", "64", "--data", train, *reward, "--steps", str(n["s2_steps"]),
         "--G", "8", "--batch_size", "4", "--micro_batch", "32", "--max_new_tokens", "40", "--sample_steps", "8", "--cfg", "1.0",
         "--lr", "1e-3", "--beta", "0.04", "--sample_every", "10", "--save_every", "100000", "--out_dir", f"{out}/stage2", "--overwrite", *seed,
         "--eval_every", str(n["eval_every"]), "--eval_data", val, "--eval_images", "16", "--eval_G", "4"],
        log, times, "stage2")
    run(["eval_unified.py", "--init", f"{out}/stage2", "--out_dir", f"{out}/bench_stage2", *bench], log, times, "bench after 2")
    run(["stage3_grpo_gen.py", "--init", f"{out}/stage2", "--resolution", "64", "--data", train, *reward, "--steps", str(n["s3_steps"]),
         "--G", "4", "--groups", "2", "--sample_steps", "8", "--eval_steps", "10", "--cfg", "1.0", "--max_new_tokens", "40",
         "--lr", "1e-3", "--sample_every", "10", "--save_every", "100000", "--out_dir", f"{out}/stage3", "--overwrite", *seed,
         "--eval_every", str(n["eval_every"]), "--eval_images", "8",
         "--captions_per_image", "0"], log, times, "stage3")  # 60 visits of 2000 images: a caption cache would not pay
    run(["eval_unified.py", "--init", f"{out}/stage3", "--out_dir", f"{out}/bench_stage3", *bench], log, times, "bench after 3")
    times["total"] = time.time() - t_start
    report(out, val, times, a.seed)


def smooth(v, k=5):
    """Trailing moving average (the training batches differ in difficulty step to step)."""
    return [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]


def report(out, val, times, seed=0):
    """report.png (curves + held-out grid), report.md (checks, tables, times), report.json (the numbers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import data as D
    sys.path.insert(0, os.path.join(ROOT, "data", "shapes"))
    from standins import caption_stats
    L2, L3 = read_log(f"{out}/stage2/log.jsonl"), read_log(f"{out}/stage3/log.jsonl")
    s2, e2 = [d for d in L2 if "reward/mean" in d], [d for d in L2 if "eval/reward" in d]
    s3, e3 = [d for d in L3 if "reward/mean" in d], [d for d in L3 if "eval/reward" in d]
    names = ["stage1", "stage2", "stage3"]
    benches = {k: json.load(open(f"{out}/bench_{k}/unified_bench.json")) for k in names}
    vrecs = {os.path.splitext(r["image"])[0]: r for r in map(json.loads, open(os.path.join(val, "captions.jsonl")))}
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(f"{out}/bench_stage3/recon"))
    caps = {k: {s: open(f"{out}/bench_{k}/captions/{s}.txt").read().strip() for s in stems} for k in names}
    cstats = {k: caption_stats([caps[k][s] for s in stems], [vrecs[s] for s in stems]) for k in names}
    for k in names:  # "on a <colour> background" anywhere, also in captions the strict grammar parse rejects
        said = [BACKGROUND.search(caps[k][s]) for s in stems]
        cstats[k]["background_any"] = sum(m is not None for m in said) / len(stems)
        cstats[k]["background_any_right"] = sum(m is not None and m.group(1) == vrecs[s]["background"]
                                                for m, s in zip(said, stems)) / len(stems)

    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    col = lambda part, key: [d[key] for d in part]
    ax[0].plot(col(s2, "step"), col(s2, "reward/mean"), color="C0", alpha=0.25, lw=1, label="training batch")
    ax[0].plot(col(s2, "step"), smooth(col(s2, "reward/mean")), color="C0", label="training batch, 5-step mean")
    ax[0].plot(col(e2, "step"), col(e2, "eval/reward"), "o-", color="C3", label="fixed held-out eval")
    ax[0].set(title="stage 2 (GRPO on the captioner): reward", xlabel="step", ylabel="tiny-CLIP cosine")
    ax[1].plot(col(s2, "step"), smooth(col(s2, "caption/words_mean")), color="C0", label="words, training batch (5-step mean)")
    ax[1].plot(col(e2, "step"), col(e2, "eval/words_mean"), "o-", color="C3", label="words, fixed held-out eval")
    ax[1].plot(col(e2, "step"), col(e2, "eval/tokens_mean"), "s--", color="C1", label="tokens, fixed held-out eval")
    ax[1].set(title="stage 2: caption length", xlabel="step")
    ax[2].plot(col(s3, "step"), col(s3, "reward/mean"), color="C2", alpha=0.25, lw=1, label="training batch")
    ax[2].plot(col(s3, "step"), smooth(col(s3, "reward/mean")), color="C2", label="training batch, 5-step mean")
    ax[2].plot(col(e3, "step"), col(e3, "eval/reward"), "o-", color="C3", label="fixed eval (ODE)")
    ax[2].set(title="stage 3 (Flow-GRPO on the DiT): reward", xlabel="step")
    clip = [benches[k]["backbones"]["clip"]["mean"] for k in names]
    ax[3].bar(["after 1", "after 2", "after 3"], clip, color=["C7", "C0", "C2"])
    ax[3].set(title="held-out score (tiny-CLIP x100)", ylim=(min(0, min(clip) - 2), max(clip) * 1.15 + 1))
    for a_ in ax[:3]:
        a_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/report_curves.png", dpi=100)
    # grid: held-out source | reconstruction after stage 1 | 2 | 3, captions after stage 1 and 2 below
    show = stems[:8]
    load = lambda p: D.load_image(p, 64)[None]
    cols = [torch.cat([load(os.path.join(val, s + ".png")) for s in show])]
    cols += [torch.cat([load(f"{out}/bench_{k}/recon/{s}.png") for s in show]) for k in names]
    D.save_grid(f"{out}/report_grid.png", cols, [f"1: {caps['stage1'][s]}  |  2: {caps['stage2'][s]}" for s in show], size=96)

    # the effect the demo is about, measured
    first, last = (e2[0], e2[-1]) if e2 else ({}, {})
    checks = {
        "stage2_caption_length_rises": {"first": first.get("eval/words_mean"), "last": last.get("eval/words_mean")},
        "stage2_reward_rises": {"first": first.get("eval/reward"), "last": last.get("eval/reward")},
        "heldout_stage3_above_stage1": {"first": clip[0], "last": clip[2]},
    }
    for c in checks.values():
        c["pass"] = c["first"] is not None and c["last"] is not None and c["last"] > c["first"]
    fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"
    rows = {"stage2_caption_length_rises": ("stage 2: words per caption (fixed held-out eval, step 0 -> last)", 1),
            "stage2_reward_rises": ("stage 2: reward (fixed held-out eval, step 0 -> last)", 3),
            "heldout_stage3_above_stage1": ("held-out tiny-CLIP score x100, after stage 1 -> after stage 3", 2)}
    L = ["# UAE shapes-world demo", "", f"Seed {seed}. Total wall time: {times['total']:.0f} s. Every command and its output: "
         "demo.log.", "",
         "## What it shows", "", "| check | before | after | |", "|---|---|---|---|"]
    L += [f"| {label} | {fmt(checks[k]['first'], d)} | {fmt(checks[k]['last'], d)} | {'PASS' if checks[k]['pass'] else 'FAIL'} |"
          for k, (label, d) in rows.items()]
    L += [f"| (not a check) held-out score x100, after stage 2 -> after stage 3: stage 3's own part | {clip[1]:.2f} | "
          f"{clip[2]:.2f} | |", "",
         "![curves](report_curves.png)", "",
         "Held-out sources | reconstruction after stage 1 | after stage 2 | after stage 3 (captions after stage 1 | 2; "
         "stage 3 keeps stage 2's captioner):", "", "![grid](report_grid.png)", "",
         f"## Held-out Unified-Bench-style table ({len(stems)} images)", "",
         "| after | " + " | ".join(f"{b} x100" for b in benches["stage1"]["backbones"]) +
         " | words | names the background | names the right one | caption well-formed | shapes named* |",
         "|---|" + "---|" * (len(benches["stage1"]["backbones"]) + 5)]
    for k in names:
        b, c = benches[k]["backbones"], cstats[k]
        L.append(f"| {k} | " + " | ".join(f"{v['mean']:.2f}" for v in b.values()) +
                 f" | {c['words']:.1f} | {c['background_any']:.0%} | {c['background_any_right']:.0%} | {c['well_formed']:.0%} | "
                 f"{c['shapes_mentioned']:.2f} |")
    L += ["", "(pixel: a weight-free 8x8 colour-layout similarity, a sanity check beside the learnt CLIP. "
          "Captions are sampled at temperature 0.7 and read against the scene's ground truth: the background columns "
          "count every caption that says 'on a <colour> background'; well-formed: parses as the world's grammar; "
          "*: per well-formed caption.)"]
    L += ["", "## Wall time per phase", "", "| phase | s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    open(f"{out}/report.md", "w").write("\n".join(L) + "\n")
    k5 = max(1, len(s2) // 5)
    summary = {"seed": seed, "times": times, "checks": checks, "bench": {k: benches[k]["backbones"] for k in names},
               "captions": cstats, "stage2": {"eval": e2, "first": s2[:k5], "last": s2[-k5:]},
               "stage3": {"eval": e3}}
    json.dump(summary, open(f"{out}/report.json", "w"), indent=1)
    print(open(f"{out}/report.md").read())


if __name__ == "__main__":
    main()
