"""
The shapes-world demo: the whole UAE recipe on CPU in minutes, where the "aha moment" can be seen.

    python tools/demo.py                    # ./run.sh demo does this; writes out/demo/report.md (+ pictures)
    python tools/demo.py --seed 1 --out_dir out/demo-s1
    python tools/demo.py --rounds 2 --reuse # then: Unified-GRPO as a loop, stage 1 reused -> out/demo/rounds2/report.md
    python tools/demo.py --quick            # a shortened run that only checks that everything is produced

It runs the real scripts, unchanged, each in a process of its own (stages with --overwrite: a rerun replaces the
last one). On Linux that process is a fork of this one, which has imported torch, transformers, diffusers and
open_clip once, not once a phase (4-8 s each on 2 cores; the same weights, bit for bit: tests/test_demo.py);
--spawn starts a new python for each:
  data/shapes/prepare.py      images of 1-3 coloured shapes + complete captions (train / 256 held-out)
  data/shapes/standins.py     stand-ins for what a real user downloads, trained here (about 40 % of the demo): a
                              tiny CLIP (the semantic reward), a tiny VAE, a tiny captioner fine-tuned on
                              *terse* captions (it starts under-describing, as the paper's does)
  stage1_coldstart.py         fm (the DiT learns to read the LVLM, full captions), then fm+sem (cold start)
  stage2_grpo_und.py          GRPO on the captioner          -> captions should grow, reward rise
  stage3_grpo_gen.py          Flow-GRPO on the decoder       -> reconstructions more faithful
  eval_unified.py             held-out Unified-Bench-style score after every stage
and writes a report: reward / caption-length / stage-3 curves, the same held-out sources redrawn before and
after stage 3, a grid of held-out sources with their reconstructions after each stage (and captions), the
score table with what the captions name, the five checks below, and wall time per phase.

--rounds K runs stage 2 and stage 3 in turns, K rounds of 1/K of their steps each, every run --init from the
one before and --step_offset so that round k draws the batches the sequential run draws then; its stages,
benches and report go to <out_dir>/rounds<K>/. --reuse skips the phases already done by the same command
(a .demo_done file in each phase's folder), so a rounds run after a plain one trains no stand-ins again.

The checks (report.md, "What it shows"; report.json "checks"), each a paired statistic over the held-out scenes
(256; the same image, caption seed and initial noise before and after; the bench after stage 3 redraws from the very
captions of the bench after stage 2, so its difference is the decoder's alone): the per-scene difference's mean
± standard error, PASS when mean - 2 s.e. > 0 (docs/demo.md):
  1. over stage 2, captions name the background more often     (the aha moment)
  2. over stage 2, words per caption rise
  3. over stage 2, the held-out tiny-CLIP score rises             (the captioner's part)
  4. over stage 3, the held-out tiny-CLIP score rises             (the decoder's part)
  5. at the end the held-out tiny-CLIP score is above stage 1's
(with rounds: a stage's part is the sum of its rounds' parts). The stage 2 / stage 3 fixed evals and the
training-batch rewards are plotted, not checked: the first two see 16 and 32 images, the last mostly shows which
images were drawn that step. --fresh N measures the checks again on N scenes of another world.

What had to change in the world for the effect to show (each measured; docs/demo.md, data/shapes/standins.py):
  - The tiny CLIP scores mostly the background (it fills the picture), and terse captions name it about a third of
    the time: the reward for saying more is mostly the reward for naming the background. That is the aha moment
    here: the captioner learns to say "on a blue background".
  - The decoder is a 4 x 128 DiT trained in full (--dit_full), not build_tiny's 2 x 32 one with LoRA, whose
    flow-matching loss stalls near the unconditional one.
  - The stand-in LVLM also learns a text-only task (restate the caption, background first) so that its
    hidden states carry what the caption says; without it the DiT never read the caption.
  - Stage 1's cold start is fm+sem: sem alone, on the captioner's terse captions, teaches the decoder to guess the
    background they leave out, and naming it then hardly pays (docs/demo.md).
  - CFG 1 everywhere: stage 1's flow matching never sees the negative prompt, so guidance against it only
    adds noise at this scale.
  - Stage 3 samples with noise on its first 3 of 8 steps only (--sde_window 3), 8 images a caption, 4 captions a
    step: with noise on all of them it learnt what only the noisy SDE samples reward, and its ODE images (the
    eval's, the benchmark's) got little better or worse (docs/demo.md, "Stage 3 in the shapes world"; probe.py).
"""
import argparse
import atexit
import gc
import importlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
BACKGROUND = re.compile(r"\bon an? (\w+) background\b")

# step counts: (full run, --quick)
PLAN = {
    "n_train": (2000, 64), "n_val": (256, 4), "eval_every": (10, 1),
    "fm_steps": (800, 4), "sem_steps": (20, 2), "s2_steps": (60, 2), "s3_steps": (60, 2),
}


DONE = ".demo_done"  # in a phase's output folder: the command that produced it (--reuse)
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # every phase's
# What every phase imports, 4-8 s a process on 2 cores: imported once here, then each phase is a fork of this process.
WARM = ["numpy", "PIL.Image", "safetensors.torch", "tqdm", "torch", "peft", "open_clip",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "transformers.models.qwen2_5_vl.processing_qwen2_5_vl",
        "transformers.generation.utils", "diffusers.models.transformers.transformer_sd3",
        "diffusers.models.autoencoders.autoencoder_kl", "diffusers.schedulers.scheduling_flow_match_euler_discrete",
        "images", "model", "reward", "training", "checkpoint", "runs", "tools.tiny"]


def can_fork():
    return sys.platform == "linux" and hasattr(os, "fork")


def warm_up():
    """Import WARM in this process (no torch op runs here before the forks: a forked child must not inherit a
    started OpenMP pool). The environment is set first: huggingface_hub reads HF_HUB_OFFLINE at import."""
    os.environ.update(ENV)
    if ROOT not in sys.path:  # demo imported, not run (a test)
        sys.path.insert(0, ROOT)
    for m in WARM:
        importlib.import_module(m)


def run_forked(cmd, log):
    """`python <cmd>` as a fork of this warmed-up process: the script runs as __main__ (runpy), its argv,
    sys.path[0] and working directory as a fresh interpreter's would be, stdout and stderr to the open file log.
    -> the exit code, as the interpreter would give it (SystemExit with a message: printed, 1)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:  # the child: never returns
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # not an inherited
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                           closefd=False)  # wrapper (a test runner's capture, say)
        os.chdir(ROOT)
        script = os.path.join(ROOT, cmd[0])
        sys.argv, sys.path[0] = [script, *cmd[1:]], os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:  # what an interpreter does at exit (atexit, this process's handlers too: loggers' flushes; gc: files
        # left open), then leave
        try:
            atexit._run_exitfuncs()
            gc.collect()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


class Runner:
    """Runs the phases in order, each a process of its own (forked, or spawned) logged to demo.log, timed. With
    reuse, a phase whose folder holds the DONE file of the very same command is skipped, until the first phase
    that does run: every phase after it runs too (its inputs changed)."""

    def __init__(self, log, reuse, fork):
        self.log, self.reuse, self.fork, self.times, self.cpu, self.reused = log, reuse, fork, {}, {}, []

    def __call__(self, cmd, name, folder, fresh=False):
        """fresh: the folder is emptied first (a benchmark resumes what its folder holds: a bench of a retrained
        checkpoint must start over; eval_unified would refuse the old folder)."""
        done, key = os.path.join(folder, DONE), json.dumps(cmd)
        if self.reuse and os.path.exists(done) and open(done).read() == key:
            print(f"=== {name}: reused ({folder})", flush=True)
            self.reused.append(name)
            return
        self.reuse = False
        if os.path.exists(done):
            os.remove(done)
        if fresh and os.path.isdir(folder):
            shutil.rmtree(folder)
        t0, c0 = time.time(), os.times()
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        with open(self.log, "a") as f:
            f.write(f"\n=== {name}: {' '.join(cmd)}\n")
            f.flush()
            if self.fork:
                rc = run_forked(cmd, f)
            else:
                rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **ENV}).returncode
        self.times[name], c = time.time() - t0, os.times()
        self.cpu[name] = c.children_user + c.children_system - c0.children_user - c0.children_system  # all threads
        if rc != 0:
            tail = open(self.log).read()[-3000:]
            sys.exit(f"{name} failed (exit {rc}); the end of {self.log}:\n{tail}")
        os.makedirs(folder, exist_ok=True)
        with open(done, "w") as f:
            f.write(key)
        print(f"    {name}: {self.times[name]:.1f}s", flush=True)


def read_log(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def user_error(message):
    """The scripts' user error (runs.cli's, without importing runs here): one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_writable(path, given):
    """--out_dir: a folder (or nothing yet, under a folder) this process may write in (runs.check_writable's rule)."""
    d = path
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        user_error(f"--out_dir {given}: " + ("exists and is not a folder" if d == path else
                                             f"{d} is a file, not a folder"))
    if not os.access(d, os.W_OK | os.X_OK):
        user_error(f"--out_dir {given}: cannot write in {d} (no write permission, or a read-only file system)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/demo", help="everything goes here; report.md + report.png at the top")
    p.add_argument("--seed", type=int, default=0, help="one seed for the world, the stand-ins and every stage")
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the artifacts, shows nothing")
    p.add_argument("--rounds", type=int, default=1, help=(
        "Unified-GRPO as a loop: K rounds of (stage 2, stage 3), each 1/K of the steps, chained by --init and "
        "--step_offset, in <out_dir>/rounds<K>/ with its own report (1: stage 2 then stage 3, the paper's order)"))
    p.add_argument("--reuse", action="store_true", help=(
        "skip the phases already in out_dir from the same command (e.g. --rounds 2 after a plain run: the "
        "stand-ins and stage 1 are not trained again); everything after the first phase that runs is run"))
    p.add_argument("--spawn", action="store_true", help=(
        "run each phase as a new python process (default on Linux: a fork of this one, which has imported torch, "
        "transformers, diffusers and open_clip once; the same scripts and results, 4-8 s less start-up a phase on 2 cores)"))
    p.error = lambda message: user_error(f"{message} (see --help)")
    p.add_argument("--fresh", type=int, default=0, metavar="N", help=(
        "then measure the checks again on N fresh held-out scenes of another world (seed + 1000), every checkpoint "
        "benched on them (with --reuse on a finished run: only that) -> <out_dir>/fresh<N>/checks.json"))
    a = p.parse_args(argv)
    q = int(a.quick)
    n = {k: v[q] for k, v in PLAN.items()}
    K = a.rounds
    if K < 1 or n["s2_steps"] % K or n["s3_steps"] % K:
        p.error(f"--rounds {K}: must divide the stage 2 and stage 3 steps ({n['s2_steps']}, {n['s3_steps']})")
    if a.fresh < 0:
        p.error(f"--fresh {a.fresh}: must be >= 0 (0: no fresh scenes)")
    out = os.path.abspath(a.out_dir)
    check_writable(out, a.out_dir)
    rep = out if K == 1 else os.path.join(out, f"rounds{K}")  # where this schedule's stages and report go
    os.makedirs(rep, exist_ok=True)
    log, t_start = os.path.join(rep, "demo.log"), time.time()
    open(log, "w").close()
    fork = can_fork() and not a.spawn
    if fork:
        warm_up()
    run = Runner(log, a.reuse, fork)
    data, S = os.path.join(out, "shapes"), os.path.join(out, "standins")
    train, val = os.path.join(data, "train", "captions.jsonl"), os.path.join(data, "val")
    seed = ["--seed", str(a.seed)]
    base = ["--encoder", f"{S}/encoder", "--decoder", f"{S}/decoder"]
    reward = ["--reward", "clip", "--reward_path", f"{S}/clip"]
    run(["data/shapes/prepare.py", "--out", data, "--n_train", str(n["n_train"]), "--n_val", str(n["n_val"]), *seed],
        "prepare", data)
    quick = ["--vae_steps", "4", "--clip_steps", "4", "--cap_steps", "4", "--eval_n", "4", "--eval_G", "2"] if q else []
    run(["data/shapes/standins.py", "--data", data, "--out", S, *seed, *quick], "standins", S)
    run(["stage1_coldstart.py", *base, "--resolution", "64", "--data", train, "--objective", "fm", "--steps", str(n["fm_steps"]),
         "--dit_full", "true", "--batch_size", "16", "--lr", "2e-3", "--sample_every", "0", "--save_every", "100000",
         "--out_dir", f"{out}/stage1_fm", "--overwrite", *seed], "stage1 fm", f"{out}/stage1_fm")
    run(["stage1_coldstart.py", "--init", f"{out}/stage1_fm", "--resolution", "64", "--data", train, "--objective", "fm+sem", *reward,
         "--steps", str(n["sem_steps"]), "--batch_size", "8", "--max_new_tokens", "40", "--lr", "3e-4", "--sample_every", "0",
         "--save_every", "100000", "--out_dir", f"{out}/stage1", "--overwrite", *seed], "stage1 sem", f"{out}/stage1")
    def bench_args(src, bench_seed):  # Unified-Bench-style: caption (T 0.7, one a scene), redraw (ODE, 10 steps)
        return ["--src", src, "--steps", "10", "--cfg", "1.0", "--max_new_tokens", "40", "--temperature", "0.7",
                "--backbones", "clip,pixel", "--clip_path", f"{S}/clip", "--batch_size", "64", "--batch_captions",
                "--seed", str(bench_seed)]
    bench = bench_args(val, a.seed)
    run(["eval_unified.py", "--init", f"{out}/stage1", "--out_dir", f"{out}/bench_stage1", *bench], "bench after 1",
        f"{out}/bench_stage1", fresh=True)
    s2, s3, prev = n["s2_steps"] // K, n["s3_steps"] // K, f"{out}/stage1"
    for k, (d2, d3) in enumerate(phases(K), 1):
        off = ["--step_offset", str((k - 1) * s2)]  # round k draws the batches the sequential run draws then
        run(["stage2_grpo_und.py", "--init", prev, "--resolution", "64", "--data", train, *reward, "--steps", str(s2),
             "--G", "8", "--batch_size", "4", "--micro_batch", "32", "--max_new_tokens", "40", "--sample_steps", "8",
             "--cfg", "1.0", "--lr", "1e-3", "--beta", "0.04", "--sample_every", "10", "--save_every", "100000",
             "--out_dir", f"{rep}/{d2}", "--overwrite", *seed, *off, "--eval_every", str(n["eval_every"]),
             "--eval_data", val, "--eval_images", "16", "--eval_G", "4"], label(d2), f"{rep}/{d2}")
        run(["eval_unified.py", "--init", f"{rep}/{d2}", "--out_dir", f"{rep}/bench_{d2}", *bench], f"bench after {label(d2)}",
            f"{rep}/bench_{d2}", fresh=True)
        off = ["--step_offset", str((k - 1) * s3)]
        run(["stage3_grpo_gen.py", "--init", f"{rep}/{d2}", "--resolution", "64", "--data", train, *reward, "--steps", str(s3),
             "--G", "8", "--groups", "4", "--sample_steps", "8", "--eval_steps", "10", "--cfg", "1.0", "--max_new_tokens", "40",
             "--lr", "1e-3", "--sample_every", "10", "--save_every", "100000", "--out_dir", f"{rep}/{d3}", "--overwrite", *seed,
             *off, "--eval_every", str(n["eval_every"]), "--eval_data", val, "--eval_images", "32", "--sde_window", "3",
             "--captions_per_image", "0"], label(d3), f"{rep}/{d3}")  # a visit per image: a caption cache would not pay
        run(["eval_unified.py", "--init", f"{rep}/{d3}", "--out_dir", f"{rep}/bench_{d3}", *bench, "--captions",
             f"{rep}/bench_{d2}"], f"bench after {label(d3)}", f"{rep}/bench_{d3}", fresh=True)  # stage 2's captions
        prev = f"{rep}/{d3}"
    times = dict(run.times, total=time.time() - t_start)
    cpu = dict(run.cpu, total=sum(run.cpu.values()))
    if a.fresh:  # before the report: a phase forked after this process ran torch ops (the report's) can hang
        fresh(run, out, rep, K, a.fresh, a.seed, bench_args)
    report(out, rep, val, times, a.seed, K, run.reused, cpu)


FRESH_WORLD = 1000  # --fresh: the scenes' world seed (and the benches' seed) is the demo's seed + this


def fresh(run, out, rep, K, n, seed, bench_args):
    """The checks measured again on n fresh held-out scenes of another world (prepare.py with seed + FRESH_WORLD;
    the benches seeded with it too): every checkpoint benched on them, stage 3 on its stage 2's captions, as in the
    report. -> <rep>/fresh<n>/checks.json, printed."""
    world = seed + FRESH_WORLD
    d = os.path.join(out, f"fresh{n}")
    run(["data/shapes/prepare.py", "--out", d, "--n_train", "0", "--n_val", str(n), "--seed", str(world - 1)],
        f"fresh scenes ({n})", os.path.join(d, "val"))  # prepare.py writes val with its seed + 1
    src, names = os.path.join(d, "val"), ["stage1"] + [x for r in phases(K) for x in r]
    folder = {k: (out if k == "stage1" else rep) for k in names}
    where = {k: os.path.join(d if k == "stage1" else os.path.join(rep, f"fresh{n}"), f"bench_{k}") for k in names}
    for p, k in zip([None] + names, names):
        extra = ["--captions", where[p]] if k.startswith("stage3") else []
        run(["eval_unified.py", "--init", f"{folder[k]}/{k}", "--out_dir", where[k], *bench_args(src, world), *extra],
            f"fresh bench after {label(k)}", where[k], fresh=True)
    benches, caps, stems = read_benches(where)
    checks = measure_checks(names, benches, caps, stems)
    json.dump({"seed": seed, "world_seed": world, "n": n, "rounds": K, "checks": checks},
              open(os.path.join(rep, f"fresh{n}", "checks.json"), "w"), indent=1)
    print(f"\n{n} fresh held-out scenes (world seed {world}): per-scene difference, mean ± s.e.")
    for k, c in checks.items():
        dg = CHECKS[k][2]
        print(f"  {CHECKS[k][0]}: {c['before']:.{dg}f} -> {c['after']:.{dg}f}, {c['mean']:+.{dg}f} ± {c['se']:.{dg}f} "
              f"{'PASS' if c['pass'] else 'FAIL'}")


def phases(K):
    """The stage folders of each round: [(stage 2's, stage 3's)]; one round keeps the plain names."""
    return [("stage2", "stage3")] if K == 1 else [(f"stage2_r{k}", f"stage3_r{k}") for k in range(1, K + 1)]


def label(d):
    """stage2 -> 'stage2'; stage2_r1 -> 'stage2 (round 1)'."""
    return d if "_r" not in d else d.replace("_r", " (round ") + ")"


def smooth(v, k=5):
    """Trailing moving average (the training batches differ in difficulty step to step)."""
    return [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]


# The checks: (label, what is compared per scene, digits, the stage whose runs' parts are summed; None: the end
# against stage 1). "before" / "after": the means over the scenes at the start and the end of what it measures.
CHECKS = {
    "stage2_names_background": ("stage 2: captions that name the background (the aha moment), fraction", "background",
                                2, "stage2"),
    "stage2_words_rise": ("stage 2: words per caption", "words", 2, "stage2"),
    "stage2_heldout_rises": ("stage 2: held-out tiny-CLIP x100 (the captioner's part)", "clip", 2, "stage2"),
    "stage3_heldout_rises": ("stage 3: held-out tiny-CLIP x100, the same captions and noise (the decoder's part)",
                             "clip", 2, "stage3"),
    "end_above_stage1": ("held-out tiny-CLIP x100, after stage 1 -> at the end", "clip", 2, None),
}


def read_benches(where):
    """{checkpoint name: its eval_unified.py out_dir}, in order -> (benches {name: its unified_bench.json},
    caps {name: {stem: caption}}, stems: the scenes the last one scored, sorted)."""
    benches = {k: json.load(open(os.path.join(d, "unified_bench.json"))) for k, d in where.items()}
    caps = {k: {r["name"]: r["caption"].strip() for r in b["per_image"]} for k, b in benches.items()}
    return benches, caps, sorted(caps[list(where)[-1]])


def paired(diffs):
    """Per-scene differences -> mean, standard error (sample std / sqrt n), n and the verdict: PASS when
    mean - 2 s.e. > 0 (the difference is positive beyond what the draw of the scenes explains)."""
    n = len(diffs)
    mean = sum(diffs) / n
    se = (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5 if n > 1 else float("inf")
    return {"mean": mean, "se": se, "n": n, "pass": bool(mean - 2 * se > 0)}


def measure_checks(names, benches, caps, stems):
    """names: the benched checkpoints in order (stage1, then each round's stage 2 and stage 3). Per scene: its
    tiny-CLIP score, its caption's words, whether the caption names a background. A stage's part is the sum over
    its runs of (after it - before it); the parts add up to the end minus stage 1. -> {check: paired() + before
    (the mean before the stage's first run), after (before + the mean part)}."""
    score = {k: {r["name"]: r["scores"]["clip"] for r in benches[k]["per_image"]} for k in names}
    value = {"clip": lambda k, s: score[k][s], "words": lambda k, s: len(caps[k][s].split()),
             "background": lambda k, s: float(BACKGROUND.search(caps[k][s]) is not None)}
    def part(stage, what, s):
        return sum(value[what](k, s) - value[what](p, s) for p, k in zip(names, names[1:]) if k.startswith(stage))
    out = {}
    for key, (_, what, _, stage) in CHECKS.items():
        if stage is None:  # the whole run
            start = names[0]
            d = [value[what](names[-1], s) - value[what](start, s) for s in stems]
        else:
            start = next(p for p, k in zip(names, names[1:]) if k.startswith(stage))
            d = [part(stage, what, s) for s in stems]
        c = paired(d)
        c["before"] = sum(value[what](start, s) for s in stems) / len(stems)  # before the stage's first run
        c["after"] = c["before"] + c["mean"]
        out[key] = c
    return out


def report(out, rep, val, times, seed=0, K=1, reused=(), cpu=None):
    """rep/report_curves.png, report_grid.png, report_stage3.png (pictures), report.md (checks, tables, times),
    report.json (the numbers). out: the run (shapes, stand-ins, stage 1); rep: this schedule's folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import images
    sys.path.insert(0, os.path.join(ROOT, "data", "shapes"))
    from standins import caption_stats
    rounds = phases(K)
    # the logs of every round, on one step axis: round k's steps follow round k-1's
    s2, e2, s3, e3 = [], [], [], []   # training-batch records, eval records: lists of rounds
    for d2, d3 in rounds:
        for d, st, ev in ((d2, s2, e2), (d3, s3, e3)):
            L = read_log(f"{rep}/{d}/log.jsonl")
            st.append([x for x in L if "reward/mean" in x])
            ev.append([x for x in L if "eval/reward" in x])
    def one_axis(parts):  # -> [(steps, records)] per round, round k's steps after round k-1's
        o, res = 0, []
        for part in parts:
            res.append(([x["step"] + o for x in part], part))
            o += max((x["step"] for x in part), default=0)
        return res
    g2, ge2, g3, ge3 = (one_axis(p) for p in (s2, e2, s3, e3))
    names = ["stage1"] + [d for r in rounds for d in r]
    folder = {k: (out if k == "stage1" else rep) for k in names}
    benches, caps, stems = read_benches({k: f"{folder[k]}/bench_{k}" for k in names})
    vrecs = {os.path.splitext(r["image"])[0]: r for r in map(json.loads, open(os.path.join(val, "captions.jsonl")))}
    last2, last3 = rounds[-1]
    cstats = {k: caption_stats([caps[k][s] for s in stems], [vrecs[s] for s in stems]) for k in names}
    for k in names:  # "on a <colour> background" anywhere, also in captions the strict grammar parse rejects
        said = [BACKGROUND.search(caps[k][s]) for s in stems]
        cstats[k]["background_any"] = sum(m is not None for m in said) / len(stems)
        cstats[k]["background_any_right"] = sum(m is not None and m.group(1) == vrecs[s]["background"]
                                                for m, s in zip(said, stems)) / len(stems)
    clip = {k: benches[k]["backbones"]["clip"]["mean"] for k in names}

    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    col = lambda part, key: [x[key] for x in part]
    for i, ((x, st), (xe, ev)) in enumerate(zip(g2, ge2)):
        one = i == 0  # one legend entry per curve
        ax[0].plot(x, col(st, "reward/mean"), color="C0", alpha=0.25, lw=1, label="training batch" if one else None)
        ax[0].plot(x, smooth(col(st, "reward/mean")), color="C0", label="training batch, 5-step mean" if one else None)
        ax[0].plot(xe, col(ev, "eval/reward"), "o-", color="C3", label="fixed held-out eval" if one else None)
        ax[1].plot(x, smooth(col(st, "caption/words_mean")), color="C0", label="words, training batch (5-step mean)" if one else None)
        ax[1].plot(xe, col(ev, "eval/words_mean"), "o-", color="C3", label="words, fixed held-out eval" if one else None)
        ax[1].plot(xe, col(ev, "eval/tokens_mean"), "s--", color="C1", label="tokens, fixed held-out eval" if one else None)
    for i, ((x, st), (xe, ev)) in enumerate(zip(g3, ge3)):
        one = i == 0
        ax[2].plot(x, col(st, "reward/mean"), color="C2", alpha=0.25, lw=1, label="training batch (SDE)" if one else None)
        ax[2].plot(x, smooth(col(st, "reward/mean")), color="C2", label="training batch, 5-step mean" if one else None)
        ax[2].plot(xe, col(ev, "eval/reward"), "o-", color="C3", label="fixed held-out eval (ODE)" if one else None)
    per = " per round" if K > 1 else ""
    ax[0].set(title=f"stage 2 (GRPO on the captioner): reward{per}", xlabel="step", ylabel="tiny-CLIP cosine")
    ax[1].set(title="stage 2: caption length", xlabel="step")
    ax[2].set(title="stage 3 (Flow-GRPO on the DiT): reward", xlabel="step")
    for a_, parts in ((ax[0], g2), (ax[1], g2), (ax[2], g3)):
        for x, _ in parts[:-1]:  # round boundaries
            a_.axvline(x[-1] if x else 0, color="k", ls=":", lw=1)
    short = {k: "after 1" if k == "stage1" else f"after {k[5]}" + (f"\nround {k[-1]}" if K > 1 else "") for k in names}
    ax[3].bar([short[k] for k in names], [clip[k] for k in names], color=["C7"] + ["C0", "C2"] * K)
    ax[3].set(title="held-out score (tiny-CLIP x100)", ylim=(min(0, min(clip.values()) - 2), max(clip.values()) * 1.15 + 1))
    for a_ in ax[:3]:
        a_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{rep}/report_curves.png", dpi=100)
    plt.close(fig)
    # grid: held-out source | reconstruction after stage 1 | after each later stage; captions after 1 and the last 2
    show = stems[:8]
    load = lambda p: images.load_image(p, 64)[None]
    recon = lambda k, s: load(f"{folder[k]}/bench_{k}/recon/{s}.png")
    cols = [torch.cat([load(os.path.join(val, s + ".png")) for s in show])]
    cols += [torch.cat([recon(k, s) for s in show]) for k in names]
    images.save_grid(f"{rep}/report_grid.png", cols, [f"1: {caps['stage1'][s]}  |  2: {caps[last2][s]}" for s in show], size=96)
    # stage 3's own part: the same held-out sources, captions and noise, redrawn before and after (the last) stage 3
    score = lambda k: {r["name"]: r["scores"]["clip"] for r in benches[k]["per_image"]}
    b2, b3 = score(last2), score(last3)
    strip = [torch.cat([load(os.path.join(val, s + ".png")), recon(last2, s), recon(last3, s)]) for s in show]
    images.save_grid(f"{rep}/report_stage3.png", strip, [
        "held-out sources", "before stage 3 (after stage 2), tiny-CLIP x100: " + " ".join(f"{b2[s]:.0f}" for s in show),
        "after stage 3, the same captions and noise: " + " ".join(f"{b3[s]:.0f}" for s in show)], size=96)

    # the effect the demo is about, measured: per held-out image, paired (the same image, caption seed and noise)
    checks = measure_checks(names, benches, caps, stems)
    own3 = checks["stage3_heldout_rises"]["mean"]  # held-out points stage 3 adds, over the rounds
    sched = "stage 2 then stage 3" if K == 1 else f"{K} rounds of (stage 2, stage 3), each 1/{K} of the steps"
    L = ["# UAE shapes-world demo", "", f"Seed {seed}. Schedule: {sched}. Total wall time: {times['total']:.0f} s"
         + (f" (reused from an earlier run: {', '.join(reused)})" if reused else "") + ". Every command and its output: "
         "demo.log.", "",
         "## What it shows", "",
         f"Each check is a paired statistic over the {len(stems)} held-out scenes: the per-scene difference (same image, "
         "same caption seed, same initial noise; after stage 3 the very captions of the stage 2 before it), its mean "
         "± standard error, PASS when mean - 2 s.e. > 0." + (" Over rounds: the sum of each round's part." if K > 1 else ""),
         "", "| check | before | after | per-scene difference, mean ± s.e. | |", "|---|---|---|---|---|"]
    L += [f"| {CHECKS[k][0]} | {c['before']:.{CHECKS[k][2]}f} | {c['after']:.{CHECKS[k][2]}f} | "
          f"{c['mean']:+.{CHECKS[k][2]}f} ± {c['se']:.{CHECKS[k][2]}f} | {'PASS' if c['pass'] else 'FAIL'} |"
          for k, c in checks.items()]
    L += ["", "![curves](report_curves.png)", "",
          "Stage 3 on its own: held-out sources, their redraws before and after stage 3 (the same captions and noise; "
          "tiny-CLIP x100 per image):", "", "![stage 3](report_stage3.png)", "",
          "Held-out sources | reconstruction after stage 1 | after each later stage (captions after stage 1 | after the "
          "last stage 2; stage 3 keeps the captioner it starts from):", "", "![grid](report_grid.png)", "",
          f"## Held-out Unified-Bench-style table ({len(stems)} images)", "",
          "| after | " + " | ".join(f"{b} x100" for b in benches["stage1"]["backbones"]) +
          " | words | names the background | names the right one | caption well-formed | shapes named* |",
          "|---|" + "---|" * (len(benches["stage1"]["backbones"]) + 5)]
    for k in names:
        b, c = benches[k]["backbones"], cstats[k]
        L.append(f"| {label(k)} | " + " | ".join(f"{v['mean']:.2f}" for v in b.values()) +
                 f" | {c['words']:.1f} | {c['background_any']:.0%} | {c['background_any_right']:.0%} | {c['well_formed']:.0%} | "
                 f"{c['shapes_mentioned']:.2f} |")
    L += ["", "(pixel: a weight-free 8x8 colour-layout similarity, a sanity check beside the learnt CLIP. "
          "Captions are sampled at temperature 0.7 and read against the scene's ground truth: the background columns "
          "count every caption that says 'on a <colour> background'; well-formed: parses as the world's grammar; "
          "*: per well-formed caption.)"]
    cpu = cpu or {}
    L += ["", "## Wall time per phase", "", "CPU s: the phase's processes' user + system time, all threads (on a machine "
          "shared with other work the wall time grows, the CPU time much less). Load average at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ".", "", "| phase | s | CPU s |", "|---|---|---|"]
    L += [f"| {k} | {v:.1f} | {cpu[k]:.1f} |" if k in cpu else f"| {k} | {v:.1f} | |" for k, v in times.items()]
    open(f"{rep}/report.md", "w").write("\n".join(L) + "\n")
    summary = {"seed": seed, "rounds": K, "times": times, "cpu_times": cpu, "load": os.getloadavg(), "reused": list(reused),
               "checks": checks,
               "bench": {k: benches[k]["backbones"] for k in names}, "stage3_own_part": own3, "captions": cstats,
               "stage2": {"eval": [x for ev in e2 for x in ev]}, "stage3": {"eval": [x for ev in e3 for x in ev]}}
    json.dump(summary, open(f"{rep}/report.json", "w"), indent=1)
    print(open(f"{rep}/report.md").read())


if __name__ == "__main__":
    main()
