"""bench.py: the --quick run writes a well-formed JSON for both stages (timings are not asserted),
the sweeps' linear fit, the real preset's clear refusal without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import bench
import stage3_grpo_gen as S3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = {"stage2": ["generate", "condition+reconstruct", "reward", "reference", "policy fwd+bwd", "optimizer"],
          "stage3": ["caption+condition", "sde sample", "decode", "reward", "reference", "policy fwd+bwd", "optimizer"]}


def run_bench(tmp_path, *extra):
    out = tmp_path / "b.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # UAE_HOME: the session's, where conftest built the tiny preset
    p = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny", "--quick", "--out", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.load(open(out)), p.stdout


def test_quick_writes_both_stages(tmp_path, tiny_paths):
    d, stdout = run_bench(tmp_path)
    assert d["preset"] == "tiny" and d["sweeps"] == {}
    for stage, phases in PHASES.items():
        r = d[stage]
        assert list(r["phases_s"]) == phases
        assert all(v > 0 for v in r["phases_s"].values()), r["phases_s"]
        assert r["step_s"] > 0 and len(r["step_s_all"]) == 2 and r["step_cpu_s"] > 0
        assert r["peak_mem_mb"] > 0 and r["mem_kind"]
        assert r["images"] == 8 and r["images_per_s"] > 0 and r["ms_per_image"] > 0  # B*G and groups*G = 2*4
        assert r["target"]["unit"] == bench.TARGETS[2][stage][0] and isinstance(r["target"]["pass"], bool)
        assert stage in stdout and ("PASS" in stdout or "MISS" in stdout)
    assert d["stage2"]["caption_tokens"] > 0 and d["stage2"]["caption_tokens"] <= 8 * 32
    assert d["stage3"]["dit_train_tokens"] > 0 and 0 < d["stage3"]["dit_mfu"] < 1
    # calibrated verdicts: every step paired with the calibration workload timed around it
    for stage in ("stage2", "stage3", "stage3_no_cache"):
        r = d[stage]
        assert len(r["calib_s_all"]) == 2 and r["calib_s"] > 0 and r["step_over_calib"] > 0
        t = r["target"]
        assert t["calib_ref_s"] == bench.CALIB_REF_S[2] and t["peer"] and t["peer_value"] > 0 and t["factor"] > 0
        assert t["measured"] > 0 and t["measured_raw"] > 0 and t["pass"] == (t["measured"] <= t["target"])
        assert t["measured_iqr"][0] <= t["measured"] <= t["measured_iqr"][1] and isinstance(t["clear"], bool)
    # stage 3 measured with its caption cache (the stage's default) and without, in alternate rounds
    c = d["stage3_cache"]
    assert c["K"] == S3.Args.captions_per_image > 0 and c["paired_ratio"] > 0 and 0 < c["caption_share_without"] < 1
    assert c["build_s_per_image"] > 0 and set(c["build"]) == {"1", str(c["K"])}
    assert d["stage3_no_cache"]["phases_s"].keys() == d["stage3"]["phases_s"].keys() and "caption cache" in stdout


@pytest.mark.slow
def test_quick_sweep_tables(tmp_path, tiny_paths):
    d, stdout = run_bench(tmp_path, "--stage", "3", "--sweep")
    assert "stage2" not in d and set(d["sweeps"]) == {"stage3/G", "stage3/sample_steps", "stage3/resolution"}
    for s in d["sweeps"].values():
        assert len(s["values"]) == len(s["step_s"]) == len(s["step_s_min"]) == 2 and all(t > 0 for t in s["step_s_min"])
        assert s["ratio"][0] == 1.0 and s["verdict"] in stdout
    assert d["sweeps"]["stage3/resolution"]["x"] == [32 * 32, 64 * 64]  # time is fitted against pixels
    assert set(d["stage3_cache"]["build"]) == {"1", "8", str(S3.Args.captions_per_image)}   # the cache's cost vs K


def test_linear_fit():
    a, b, r2 = bench.linear_fit([1, 2, 4], [1.5, 2.0, 3.0])
    assert abs(a - 1) < 1e-9 and abs(b - 0.5) < 1e-9 and abs(r2 - 1) < 1e-9
    assert bench.is_linear([2, 4, 8], [1.0, 2.1, 3.9])
    assert bench.is_linear([2, 4, 8], [1.0, 1.5, 2.5])  # a fixed cost + linear
    assert bench.linear_fit([2, 4, 8], [4, 16, 64])[2] > 0.97  # a quadratic fits a line well on 3 points,
    assert not bench.is_linear([2, 4, 8], [4, 16, 64])           # but grows faster than x
    assert not bench.is_linear([2, 4, 8], [1.0, 1.1, 1.9]) and not bench.is_linear([2, 4, 8], [2.0, 1.5, 1.2])


def test_verdict_is_calibrated():
    """The verdict divides the step by the calibration timed next to it: a machine twice as slow (both twice as
    long) gets the same verdict; a step twice as long against the same calibration can flip it."""
    a = bench.p.parse_args([])
    unit, target = bench.TARGETS[2]["stage2"]
    calib = 0.5 * bench.CALIB_REF_S[2]
    ok = {"images": 8, "step_s": 0.9 * target * calib / bench.CALIB_REF_S[2], "calib_s": calib}
    for slow in (1.0, 2.0, 7.0):
        r = {**ok, "step_s": ok["step_s"] * slow, "calib_s": calib * slow}
        r["step_over_calib"] = r["step_s"] / r["calib_s"]
        bench.verdict("stage2", r, a, torch.device("cpu"))
        assert r["target"]["pass"] and abs(r["target"]["measured"] - 0.9 * target) < 1e-9
        assert abs(r["target"]["measured_raw"] - r["step_s"]) < 1e-12
    r = {**ok, "step_s": 2 * ok["step_s"]}
    r["step_over_calib"] = r["step_s"] / r["calib_s"]
    bench.verdict("stage2", r, a, torch.device("cpu"))
    assert not r["target"]["pass"]
    assert bench.calibration(torch.device("cpu")) > 0
    for threads in (1, 2):  # each target is factor x the peer figure it comes from, the reference pinned by the as-is
        for stage, (u, t) in bench.TARGETS[threads].items():
            peer = bench.PEERS[threads][stage]
            assert u == peer["unit"] and abs(t - peer["factor"] * peer["peer_value"]) < 1e-3 and peer["source"]
        as_is_s2 = bench.AS_IS[threads]["stage2"] * bench.CALIB_REF_S[threads]   # the as-is stage 2 there, seconds
        assert abs(as_is_s2 / bench.PEERS[threads]["stage2"]["peer_value"] - bench.PEER_RATIOS[threads]["stage2"]) < 1e-9


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_real_preset_refuses_cpu(tmp_path):
    p = subprocess.run([sys.executable, "tools/bench.py", "--preset", "real", "--out", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr and not (tmp_path / "r.json").exists()
