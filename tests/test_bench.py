"""bench.py: the --quick run writes a well-formed JSON for both stages (timings are not asserted),
the sweeps' linear fit, the real preset's clear refusal without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = {"stage2": ["generate", "condition+reconstruct", "reward", "reference", "policy fwd+bwd", "optimizer"],
          "stage3": ["caption+condition", "sde sample", "decode", "reward", "reference", "policy fwd+bwd", "optimizer"]}


def run_bench(tmp_path, *extra):
    out = tmp_path / "b.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # UAE_HOME: the session's, where conftest built the tiny preset
    p = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--quick", "--out", str(out), *extra],
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
        assert r["target"]["unit"] == bench.TARGETS[stage][0] and isinstance(r["target"]["pass"], bool)
        assert stage in stdout and ("PASS" in stdout or "MISS" in stdout)
    assert d["stage2"]["caption_tokens"] > 0 and d["stage2"]["caption_tokens"] <= 8 * 32
    assert d["stage3"]["dit_train_tokens"] > 0 and 0 < d["stage3"]["dit_mfu"] < 1


@pytest.mark.slow
def test_quick_sweep_tables(tmp_path, tiny_paths):
    d, stdout = run_bench(tmp_path, "--stage", "3", "--sweep")
    assert "stage2" not in d and set(d["sweeps"]) == {"stage3/G", "stage3/sample_steps", "stage3/resolution"}
    for s in d["sweeps"].values():
        assert len(s["values"]) == len(s["step_s"]) == len(s["step_s_min"]) == 2 and all(t > 0 for t in s["step_s_min"])
        assert s["ratio"][0] == 1.0 and s["verdict"] in stdout
    assert d["sweeps"]["stage3/resolution"]["x"] == [32 * 32, 64 * 64]  # time is fitted against pixels


def test_linear_fit():
    a, b, r2 = bench.linear_fit([1, 2, 4], [1.5, 2.0, 3.0])
    assert abs(a - 1) < 1e-9 and abs(b - 0.5) < 1e-9 and abs(r2 - 1) < 1e-9
    assert bench.is_linear([2, 4, 8], [1.0, 2.1, 3.9])
    assert bench.is_linear([2, 4, 8], [1.0, 1.5, 2.5])  # a fixed cost + linear
    assert bench.linear_fit([2, 4, 8], [4, 16, 64])[2] > 0.97  # a quadratic fits a line well on 3 points,
    assert not bench.is_linear([2, 4, 8], [4, 16, 64])           # but grows faster than x
    assert not bench.is_linear([2, 4, 8], [1.0, 1.1, 1.9]) and not bench.is_linear([2, 4, 8], [2.0, 1.5, 1.2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_real_preset_refuses_cpu(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--preset", "real", "--out", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr and not (tmp_path / "r.json").exists()
