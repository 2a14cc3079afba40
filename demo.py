"""
The shapes-world demo: the whole UAE recipe on CPU in minutes, where the "aha moment" can be seen.

    python demo.py                    # ./run.sh demo does this; writes out/demo/report.{md,png}
    python demo.py --seed 1 --out_dir out/demo-s1
    python demo.py --quick            # a shortened run that only checks that everything is produced

It runs the real scripts, unchanged, as subprocesses:
  data/shapes/prepare.py      images of 1-3 coloured shapes + complete captions (train / held-out val)
  data/shapes/standins.py     stand-ins for what a real user downloads, trained here in seconds: a tiny
                              CLIP (the semantic reward), a tiny VAE, a tiny captioner fine-tuned on
                              *terse* captions (it starts under-describing, as the paper's does)
  stage1_coldstart.py         fm (the DiT learns to read the LVLM, full captions), then sem (cold start)
  stage2_grpo_und.py          GRPO on the captioner          -> captions should grow, reward rise
  stage3_grpo_gen.py          Flow-GRPO on the decoder       -> reconstructions more faithful
  eval_unified.py             held-out Unified-Bench-style score after stages 1, 2 and 3
and writes a report: reward / caption-length curves, a grid of held-out sources with their
reconstructions after each stage (and captions), the score table, and wall time per phase.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))

# step counts: (full run, --quick)
PLAN = {
    "n_train": (2000, 64), "n_val": (16, 4),
    "fm_steps": (600, 4), "sem_steps": (20, 2), "s2_steps": (40, 2), "s3_steps": (30, 2),
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
    run(["stage1_coldstart.py", *base, "--image_size", "64", "--data", train, "--objective", "fm", "--steps", str(n["fm_steps"]),
         "--batch_size", "16", "--lr", "1e-3", "--sample_every", "0", "--save_every", "100000", "--out_dir", f"{out}/stage1_fm", *seed],
        log, times, "stage1 fm")
    run(["stage1_coldstart.py", "--init", f"{out}/stage1_fm", "--image_size", "64", "--data", train, "--objective", "sem", *reward,
         "--steps", str(n["sem_steps"]), "--batch_size", "8", "--max_new_tokens", "40", "--lr", "3e-4", "--sample_every", "0",
         "--save_every", "100000", "--out_dir", f"{out}/stage1", *seed], log, times, "stage1 sem")
    bench = ["--src", val, "--steps", "10", "--cfg", "2.0", "--max_new_tokens", "40", "--temperature", "0.7",
             "--backbones", "clip,pixel", "--clip_path", f"{S}/clip", "--batch_size", "8", *seed]
    run(["eval_unified.py", "--init", f"{out}/stage1", "--out_dir", f"{out}/bench_stage1", *bench], log, times, "bench after 1")
    run(["stage2_grpo_und.py", "--init", f"{out}/stage1", "--resolution", "64", "--data", train, *reward, "--steps", str(n["s2_steps"]),
         "--G", "8", "--batch_size", "2", "--micro_batch", "16", "--max_new_tokens", "40", "--sample_steps", "8", "--cfg", "2.0",
         "--lr", "3e-3", "--beta", "0.01", "--sample_every", "10", "--save_every", "100000", "--out_dir", f"{out}/stage2", *seed],
        log, times, "stage2")
    run(["eval_unified.py", "--init", f"{out}/stage2", "--out_dir", f"{out}/bench_stage2", *bench], log, times, "bench after 2")
    run(["stage3_grpo_gen.py", "--init", f"{out}/stage2", "--resolution", "64", "--data", train, *reward, "--steps", str(n["s3_steps"]),
         "--G", "4", "--groups", "2", "--sample_steps", "8", "--eval_steps", "10", "--cfg", "2.0", "--max_new_tokens", "40",
         "--lr", "1e-3", "--sample_every", "10", "--save_every", "100000", "--out_dir", f"{out}/stage3", *seed], log, times, "stage3")
    run(["eval_unified.py", "--init", f"{out}/stage3", "--out_dir", f"{out}/bench_stage3", *bench], log, times, "bench after 3")
    times["total"] = time.time() - t_start
    report(out, val, times)


def report(out, val, times):
    """report.png (curves + held-out grid) and report.md (table, numbers, times)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import model as M
    s2 = [d for d in read_log(f"{out}/stage2/log.jsonl") if "reward/mean" in d]
    s3 = [d for d in read_log(f"{out}/stage3/log.jsonl") if "reward/mean" in d]   # (eval lines have eval/*)
    benches = {k: json.load(open(f"{out}/bench_{k}/unified_bench.json")) for k in ("stage1", "stage2", "stage3")}
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [d["step"] for d in s2]
    ax[0].plot(steps, [d["reward/mean"] for d in s2], label="stage 2 (GRPO on the captioner)")
    ax[0].plot([d["step"] for d in s3], [d["reward/mean"] for d in s3], label="stage 3 (Flow-GRPO on the DiT)")
    ax[0].set(title="reward (tiny-CLIP cosine)", xlabel="step")
    ax[0].legend(fontsize=7)
    ax[1].plot(steps, [d["caption/tokens_mean"] for d in s2], label="tokens")
    ax[1].plot(steps, [d["caption/words_mean"] for d in s2], label="words")
    ax[1].set(title="stage 2 caption length", xlabel="step")
    ax[1].legend(fontsize=7)
    names = ["stage1", "stage2", "stage3"]
    clip = [benches[k]["backbones"]["clip"]["mean"] for k in names]
    ax[2].bar(names, clip)
    ax[2].set(title="held-out tiny-CLIP score x100", ylim=(min(clip) - 5, max(clip) + 2))
    fig.tight_layout()
    fig.savefig(f"{out}/report_curves.png", dpi=100)
    # grid: held-out source | reconstruction after stage 1 | 2 | 3, caption after stage 3 below
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(f"{out}/bench_stage3/recon"))[:8]
    load = lambda p: M.load_image(p, 64)[None]
    cols = [torch.cat([load(os.path.join(val, s + ".png")) for s in stems])]
    for k in names:
        cols.append(torch.cat([load(f"{out}/bench_{k}/recon/{s}.png") for s in stems]))
    caps = {k: {s: open(f"{out}/bench_{k}/captions/{s}.txt").read().strip() for s in stems} for k in names}
    labels = [f"1: {caps['stage1'][s]} | 2: {caps['stage2'][s]}" for s in stems]
    M.save_grid(f"{out}/report_grid.png", cols, labels, size=96)
    # markdown
    L = ["# UAE shapes-world demo", "", f"Total wall time: {times['total']:.0f} s", "", "![curves](report_curves.png)", "",
         "Held-out sources | reconstruction after stage 1 | after stage 2 | after stage 3 (captions after stage 1 | 2):", "",
         "![grid](report_grid.png)", "", "## Held-out score (x100)", "", "| after | " + " | ".join(benches["stage1"]["backbones"]) + " | words/caption |",
         "|---|" + "---|" * (len(benches["stage1"]["backbones"]) + 1)]
    for k in names:
        b = benches[k]["backbones"]
        words = sum(len(c.split()) for c in caps[k].values()) / max(1, len(caps[k])) if k in caps else float("nan")
        L.append(f"| {k} | " + " | ".join(f"{v['mean']:.2f}" for v in b.values()) + f" | {words:.1f} |")
    if s2:
        k = max(1, len(s2) // 5)
        f2 = lambda key, part: sum(d[key] for d in part) / len(part)
        L += ["", "## Stage 2 (first vs last fifth of the steps)", "", "| | reward | tokens | words |", "|---|---|---|---|",
              f"| first | {f2('reward/mean', s2[:k]):.4f} | {f2('caption/tokens_mean', s2[:k]):.1f} | {f2('caption/words_mean', s2[:k]):.1f} |",
              f"| last | {f2('reward/mean', s2[-k:]):.4f} | {f2('caption/tokens_mean', s2[-k:]):.1f} | {f2('caption/words_mean', s2[-k:]):.1f} |"]
    L += ["", "## Wall time per phase", "", "| phase | s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    open(f"{out}/report.md", "w").write("\n".join(L) + "\n")
    summary = {"times": times, "bench": {k: benches[k]["backbones"] for k in names},
               "stage2": {"first": s2[:max(1, len(s2) // 5)], "last": s2[-max(1, len(s2) // 5):]} if s2 else {}}
    json.dump(summary, open(f"{out}/report.json", "w"), indent=1)
    print(open(f"{out}/report.md").read())


if __name__ == "__main__":
    main()
