"""The shapes-world demo, shortened: every stage runs and every artifact is produced and well-formed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "demo.py", "--quick", "--out_dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("report.md", "report.json", "report_curves.png", "report_grid.png", "demo.log"):
        assert (out / f).stat().st_size > 0, f
    rep = json.load(open(out / "report.json"))
    assert set(rep["bench"]) == {"stage1", "stage2", "stage3"}
    for k, b in rep["bench"].items():
        assert 0 < b["clip"]["mean"] <= 100 and b["clip"]["n"] == 4, k
    assert rep["stage2"]["first"] and "caption/words_mean" in rep["stage2"]["first"][0]
    assert [d["step"] for d in rep["stage2"]["eval"]] == [0, 1, 2] and set(rep["checks"]) == {
        "stage2_caption_length_rises", "stage2_reward_rises", "heldout_stage3_above_stage1"}
    assert all(isinstance(c["pass"], bool) and c["first"] is not None for c in rep["checks"].values())
    assert rep["seed"] == 0 and set(rep["captions"]["stage1"]) >= {"words", "background_any", "background_any_right", "well_formed"}
    assert all(t > 0 for t in rep["times"].values())
    md = open(out / "report.md").read()
    assert "| stage3 |" in md and "Wall time" in md
    for d in ("stage1_fm/ckpt", "stage1/ckpt", "stage2/ckpt", "stage3/ckpt", "standins/clip", "standins/encoder"):
        assert os.path.isdir(out / d), d
