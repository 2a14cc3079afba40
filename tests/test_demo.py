"""The shapes-world demo, shortened: every stage runs and every artifact is produced and well-formed."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def demo(*args):
    r = subprocess.run([sys.executable, "tools/demo.py", "--quick", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


CHECKS = {"stage2_names_background", "stage2_words_rise", "stage2_heldout_rises", "stage3_heldout_rises", "end_above_stage1"}


@pytest.mark.slow
def test_quick_demo_writes_the_report_then_rounds_reuse_stage1(tmp_path):
    out = tmp_path / "demo"
    demo("--out_dir", str(out))
    for f in ("report.md", "report.json", "report_curves.png", "report_grid.png", "report_stage3.png", "demo.log"):
        assert (out / f).stat().st_size > 0, f
    rep = json.load(open(out / "report.json"))
    assert set(rep["bench"]) == {"stage1", "stage2", "stage3"} and rep["rounds"] == 1 and rep["reused"] == []
    for k, b in rep["bench"].items():
        assert 0 < b["clip"]["mean"] <= 100 and b["clip"]["n"] == 4, k
    assert [d["step"] for d in rep["stage2"]["eval"]] == [0, 1, 2] and [d["step"] for d in rep["stage3"]["eval"]] == [0, 1, 2]
    assert set(rep["checks"]) == CHECKS
    assert all(isinstance(c["pass"], bool) and c["n"] == 4 and c["se"] >= 0 for c in rep["checks"].values())
    # the bench after stage 3 redraws from the very captions of the bench after stage 2 (its part is the decoder's)
    caps = lambda k: {f: open(out / f"bench_{k}" / "captions" / f).read() for f in os.listdir(out / f"bench_{k}" / "captions")}
    assert caps("stage3") == caps("stage2") and len(caps("stage2")) == 4
    own = rep["bench"]["stage3"]["clip"]["mean"] - rep["bench"]["stage2"]["clip"]["mean"]
    assert abs(rep["stage3_own_part"] - own) < 1e-9
    assert rep["seed"] == 0 and set(rep["captions"]["stage1"]) >= {"words", "background_any", "background_any_right", "well_formed"}
    assert all(t > 0 for t in rep["times"].values())
    md = open(out / "report.md").read()
    assert "| stage3 |" in md and "Wall time" in md and "per-scene difference, mean ± s.e." in md
    for d in ("stage1_fm/ckpt", "stage1/ckpt", "stage2/ckpt", "stage3/ckpt", "standins/clip", "standins/encoder"):
        assert os.path.isdir(out / d), d

    # the demo's phases run as forks of its warmed-up process: the same phase as a fresh `python` process
    # (--spawn's way) trains the same weights, bit for bit
    log = open(out / "demo.log").read()
    cmd = re.search(r"^=== stage1 fm: (.*)$", log, re.M).group(1).split()
    i = cmd.index("--out_dir")
    cmd[i + 1] = str(tmp_path / "fm_spawned")
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    forked, spawned = (load_file(str(d / "ckpt" / "weights.safetensors")) for d in (out / "stage1_fm", tmp_path / "fm_spawned"))
    assert forked.keys() == spawned.keys() and len(forked) > 0
    assert all(torch.equal(forked[k], spawned[k]) for k in forked), [k for k in forked if not torch.equal(forked[k], spawned[k])]

    # data/shapes/probe.py (README's stage-3 measurements) runs on the finished run
    sys.path.insert(0, os.path.join(ROOT, "data", "shapes"))
    import probe
    res = probe.main(["--run", str(out), "--n", "2", "--G", "1", "--stages", "stage2,stage3", "--ode_steps", "3",
                      "--sde_steps", "3", "--windows", "0,1"])
    assert res["reward"]["background only"] < 1 and set(res["stage3"]) == {"own captions", "full captions"}
    assert set(res["stage3"]["own captions"]) == {"ODE 3 steps", "SDE 3 steps a=0.7", "SDE 3 steps a=0.7 window 1"}
    assert json.load(open(out / "probe.json"))["stage2"] == res["stage2"]

    # --fresh N on the finished run (--reuse: no phase runs again): the checks on N scenes of another world
    r = demo("--out_dir", str(out), "--reuse", "--fresh", "3")
    fr = json.load(open(out / "fresh3" / "checks.json"))
    assert fr["world_seed"] == 1000 and set(fr["checks"]) == CHECKS and all(c["n"] == 3 for c in fr["checks"].values())
    assert "3 fresh held-out scenes" in r.stdout
    scenes = lambda d: [json.loads(line)["caption"] for line in open(d / "captions.jsonl")]
    assert len(scenes(out / "fresh3" / "val")) == 3 and scenes(out / "fresh3" / "val") != scenes(out / "shapes" / "val")[:3]

    # --rounds 2 --reuse in the same out_dir: the world, stand-ins and stage 1 are reused, the rounds chain
    r = demo("--out_dir", str(out), "--rounds", "2", "--reuse")
    rr = out / "rounds2"
    rep2 = json.load(open(rr / "report.json"))
    assert rep2["reused"] == ["prepare", "standins", "stage1 fm", "stage1 sem", "bench after 1"], r.stdout[-2000:]
    assert set(rep2["bench"]) == {"stage1", "stage2_r1", "stage3_r1", "stage2_r2", "stage3_r2"}
    assert rep2["bench"]["stage1"] == rep["bench"]["stage1"] and set(rep2["checks"]) == CHECKS
    own = sum(rep2["bench"][f"stage3_r{k}"]["clip"]["mean"] - rep2["bench"][f"stage2_r{k}"]["clip"]["mean"] for k in (1, 2))
    assert abs(rep2["stage3_own_part"] - own) < 1e-9
    assert [d["step"] for d in rep2["stage2"]["eval"]] == [0, 1, 0, 1]  # 1 step a round, an eval before and after
    cfg = lambda d: json.load(open(rr / d / "ckpt" / "uae.json"))["args"]
    inits = {d: cfg(d)["init"] for d in ("stage2_r1", "stage3_r1", "stage2_r2", "stage3_r2")}
    assert inits == {"stage2_r1": str(out / "stage1"), "stage3_r1": str(rr / "stage2_r1"),
                     "stage2_r2": str(rr / "stage3_r1"), "stage3_r2": str(rr / "stage2_r2")}
    assert [cfg(d)["step_offset"] for d in ("stage2_r1", "stage2_r2", "stage3_r1", "stage3_r2")] == [0, 1, 0, 1]
    md = open(rr / "report.md").read()
    assert "2 rounds" in md and "| stage2 (round 2) |" in md and "reused from an earlier run" in md
    assert (out / "report.md").stat().st_size > 0  # the plain schedule's report is still there


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the demo forks its phases on Linux only")
def test_a_forked_phase_runs_as_a_fresh_interpreter_would(tmp_path):
    """demo.run_forked: the script runs as __main__ with its own argv, sys.path[0] and the repo root as working
    directory, writes to the log, and its exit code is the interpreter's (a message: printed, 1; a traceback: 1)."""
    sys.path.insert(0, ROOT)
    from tools import demo
    script = tmp_path / "phase.py"
    script.write_text("import os, sys\n"
                      "print('argv', sys.argv[1:], 'cwd', os.getcwd(), 'path0', sys.path[0], 'main', __name__)\n"
                      "what = sys.argv[1]\n"
                      "if what == 'message': sys.exit('phase.py: --x must be positive')\n"
                      "if what == 'code': sys.exit(3)\n"
                      "if what == 'raise': raise ValueError('deep inside')\n")
    got, cwd0, argv0 = {}, os.getcwd(), list(sys.argv)
    for what in ("ok", "message", "code", "raise"):
        with open(tmp_path / f"{what}.log", "w") as f:
            got[what] = demo.run_forked([str(script), what, "--flag"], f)
        text = open(tmp_path / f"{what}.log").read()
        assert f"argv ['{what}', '--flag'] cwd {ROOT} path0 {tmp_path} main __main__" in text, text
    assert got == {"ok": 0, "message": 1, "code": 3, "raise": 1}
    assert "phase.py: --x must be positive" in open(tmp_path / "message.log").read()
    assert "ValueError: deep inside" in open(tmp_path / "raise.log").read()
    assert os.getcwd() == cwd0 and sys.argv == argv0  # it ran in a child: the parent is untouched


def test_checks_are_paired_statistics():
    """demo.paired: mean and standard error of per-scene differences, PASS when mean - 2 s.e. > 0; measure_checks:
    a stage's part summed over its runs (rounds), the parts add up to the end minus stage 1."""
    from tools import demo
    c = demo.paired([1.0, 2.0, 3.0, 4.0])
    assert c["mean"] == 2.5 and abs(c["se"] - (5 / 3 / 4) ** 0.5) < 1e-12 and c["pass"] and c["n"] == 4
    assert not demo.paired([1.0, -1.0, 2.0, -1.5])["pass"] and not demo.paired([0.1, 0.1, 0.1, -5.0])["pass"]
    names = ["stage1", "stage2_r1", "stage3_r1", "stage2_r2", "stage3_r2"]
    clip = {"stage1": [0, 10], "stage2_r1": [5, 12], "stage3_r1": [6, 15], "stage2_r2": [9, 15], "stage3_r2": [12, 18]}
    benches = {k: {"per_image": [{"name": s, "scores": {"clip": clip[k][i]}} for i, s in enumerate("ab")]} for k in names}
    caps = {k: {"a": "a small red circle at the top left.", "b": "a large blue square in the center."} for k in names}
    for k in names[1:]:
        caps[k]["a"] = "a small red circle at the top left on a white background."
    got = demo.measure_checks(names, benches, caps, ["a", "b"])
    assert [got["stage2_heldout_rises"]["mean"], got["stage3_heldout_rises"]["mean"]] == [(5 + 3 + 2 + 0) / 2, (1 + 3 + 3 + 3) / 2]
    assert got["end_above_stage1"]["mean"] == got["stage2_heldout_rises"]["mean"] + got["stage3_heldout_rises"]["mean"]
    assert got["stage2_names_background"]["mean"] == 0.5 and got["stage2_words_rise"]["mean"] == 2.0
    assert got["stage3_heldout_rises"]["before"] == (5 + 12) / 2   # the mean before stage 3's first run
