"""Your own reward (reward.py's contract): `--reward module:function` plugs into tiny stage 2 and stage 3 runs
without an edit to them; the scores a run logs are the function's; a broken spec or a broken contract is one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import reward
import stage2_grpo_und as S2
import stage3_grpo_gen as S3
from test_stage2 import _image_dir
from test_stage3 import TINY as TINY3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A reward of one's own: how close the mean colour of the redraw is to the source's; every call is recorded
# (N, the captions, the scores) in the file $REWARD_CALLS, so the test sees what the stage passed and got.
MODULE = '''
import json, os
import torch

def colour(src, rec, captions):
    score = -(src.mean((2, 3)) - rec.mean((2, 3))).abs().sum(1)          # (N,)
    with open(os.environ["REWARD_CALLS"], "a") as f:
        f.write(json.dumps({"n": len(src), "captions": list(captions), "scores": score.tolist()}) + "\\n")
    return score

def wrong_shape(src, rec, captions):
    return torch.zeros(len(src), 2)
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(MODULE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_CALLS", str(calls))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield calls
    sys.modules.pop("my_reward", None)


def read(path):
    return [json.loads(line) for line in open(path)]


def steps(out_dir):
    return [d for d in read(os.path.join(out_dir, "log.jsonl")) if "reward/mean" in d]


def test_contract_is_checked():
    r = reward.Reward("t", lambda s, x, c: torch.ones(len(s)))
    assert torch.equal(r(torch.zeros(3, 3, 8, 8), torch.zeros(3, 3, 8, 8), ["a"] * 3), torch.ones(3))
    bad = reward.Reward("mod:bad", lambda s, x, c: torch.ones(len(s), 1))
    with pytest.raises(reward.RewardError, match=r"--reward mod:bad: returned Tensor \(3, 1\).*shape \(3,\)"):
        bad(torch.zeros(3, 3, 8, 8), torch.zeros(3, 3, 8, 8))
    with pytest.raises(reward.RewardError, match="cannot import no_such_module"):
        reward.find_function("no_such_module:f")
    with pytest.raises(reward.RewardError, match="expected a backbone"):
        reward.find_function("clip2")


def test_stage2_takes_your_reward(plugin, tmp_path):
    data = _image_dir(tmp_path / "data", 2)
    out = str(tmp_path / "s2")
    S2.main(["--preset", "tiny", "--data", data, "--out_dir", out, "--reward", "my_reward:colour", "--resolution", "64",
             "--G", "4", "--batch_size", "2", "--micro_batch", "4", "--max_new_tokens", "8", "--sample_steps", "2",
             "--cfg", "1.0", "--lr", "1e-3", "--steps", "2", "--sample_every", "0", "--save_every", "1000"])
    calls, logged = read(plugin), steps(out)
    assert len(calls) == 2 and all(c["n"] == 8 and len(c["captions"]) == 8 for c in calls)   # B 2 x G 4 per step
    assert all(isinstance(t, str) for c in calls for t in c["captions"])
    for c, d in zip(calls, logged):   # the run's reward is the function's, score for score
        assert d["reward/mean"] == pytest.approx(sum(c["scores"]) / 8, abs=1e-6)


def test_stage3_takes_your_reward(plugin, tmp_path):
    data = _image_dir(tmp_path / "data", 2)
    out = str(tmp_path / "s3")
    S3.main([*TINY3, "--data", data, "--out_dir", out, "--reward", "my_reward:colour", "--steps", "2", "--groups", "2"])
    calls, logged = read(plugin), steps(out)
    assert len(calls) == 2 and all(c["n"] == 8 for c in calls)             # 2 groups x G 4
    for c in calls:   # a group's G samples share its image's caption
        assert all(c["captions"][k] == c["captions"][k - k % 4] for k in range(8))
    for c, d in zip(calls, logged):
        assert d["reward/mean"] == pytest.approx(sum(c["scores"]) / 8, abs=1e-6)


@pytest.mark.parametrize("spec,msg", [("my_reward:nothing", "my_reward has no function 'nothing'"),
                                      ("no_such_module:f", "cannot import no_such_module"),
                                      ("clip2", "must be one of clip")])
def test_a_bad_spec_is_one_line_before_anything_loads(plugin, tmp_path, spec, msg):
    data = _image_dir(tmp_path / "data", 1)
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "stage2_grpo_und.py"), "--preset", "tiny", "--data", data, "--out_dir", str(out),
                        "--reward", spec], cwd=str(tmp_path), capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_a_broken_contract_is_one_line(plugin, tmp_path):
    data = _image_dir(tmp_path / "data", 1)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "stage3_grpo_gen.py"), *TINY3, "--data", data,
                        "--out_dir", str(tmp_path / "s3"), "--reward", "my_reward:wrong_shape", "--steps", "1"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    errors = [ln for ln in r.stderr.splitlines() if "error: " in ln]   # (after the progress bar's carriage return)
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: --reward my_reward:wrong_shape: returned Tensor (4, 2)" in errors[0]
