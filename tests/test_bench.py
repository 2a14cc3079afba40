"""bench.py: the --quick run writes a well-formed JSON for both stages (timings are not asserted),
the sweeps' linear fit, the real preset's clear refusal without a GPU, --vs trl side by side with TRL's GRPOTrainer
(where TRL is installed: it is an optional benchmark dependency, requirements-bench.txt) or its clear refusal."""
import importlib.util
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
        assert stage in stdout
    assert d["stage2"]["caption_tokens"] > 0 and d["stage2"]["caption_tokens"] <= 8 * 32
    assert d["stage2"]["caption_tokens_per_s"] > 0 and "rollout" in stdout and d["stage2"]["condition_tokens"] > 0
    assert d["stage3"]["dit_train_tokens"] > 0 and 0 < d["stage3"]["dit_mfu"] < 1
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_real_preset_refuses_cpu(tmp_path):
    p = subprocess.run([sys.executable, "tools/bench.py", "--preset", "real", "--out", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr and not (tmp_path / "r.json").exists()


HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed (an optional benchmark dependency: pip install -r "
                    "requirements-bench.txt in a virtual environment of its own)")
def test_vs_trl_runs_both_sides_on_the_same_work(tmp_path, tiny_paths):
    """--vs trl --quick: 2 alternating rounds after 1 warm-up; both sides' phases, paired ratios, the same caption
    token count (the same model, prompt, sampling and stopping on both sides: random weights rarely sample EOS)."""
    d, stdout = run_bench(tmp_path, "--vs", "trl", "--threads", "1")
    assert d["rounds"] == 2 and len(d["ratios"]) == 2 and all(r > 0 for r in d["ratios"])
    assert d["ratio_min"] <= d["ratio_median"] <= d["ratio_max"] and d["trl"]
    assert all(abs(r - p / t) < 1e-9 for r, p, t in zip(d["ratios"], d["project_step_s"], d["trl_step_s"]))
    assert list(d["project_phases_s"]) == PHASES["stage2"]
    assert list(d["trl_phases_s"]) == PHASES["stage2"] + ["other"]
    assert all(v > 0 for k, v in d["trl_phases_s"].items() if k != "other"), d["trl_phases_s"]
    assert all(v > 0 for v in d["project_phases_s"].values()), d["project_phases_s"]
    tok, cond = d["caption_tokens"], d["condition_tokens"]
    assert 0 < tok["trl"] <= 8 * 32 and 0 < tok["project"] <= 8 * 32 and abs(tok["trl"] - tok["project"]) <= 16
    assert cond["trl"] > 0 and cond["project"] > 0
    assert len(d["load_avg_before"]) == 3 and "x TRL (median of 2 rounds)" in stdout


@pytest.mark.skipif(HAS_TRL, reason="checks the refusal without TRL")
def test_vs_trl_without_trl_says_how_to_get_it(tmp_path):
    p = subprocess.run([sys.executable, "tools/bench.py", "--vs", "trl", "--out", str(tmp_path / "t.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "needs TRL" in p.stderr and "requirements-bench.txt" in p.stderr
    assert not (tmp_path / "t.json").exists()
