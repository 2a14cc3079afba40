"""Unified-Bench (eval_unified.py) and sample.py on the tiny preset: scoring arithmetic, pairing,
bad inputs, the end-to-end run, resume, sharding under torchrun, and the three sample commands."""
import json
import os
import shutil
import subprocess
import time
import sys

import pytest
import torch
from PIL import Image

import runs
import checkpoint as ck
import eval_unified as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BB = ["--clip_path", "tiny", "--longclip_path", "tiny", "--dinov2_path", "tiny", "--dinov3_path", "tiny"]
FAST = ["--steps", "2", "--max_new_tokens", "8"]


def run(script, *args, torchrun=0, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UAE_HOME": os.environ["UAE_HOME"], "PYTHONIOENCODING": "utf-8"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
              if torchrun else [sys.executable])
    return subprocess.run(launch + [os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def make_images(folder, names, size=(64, 64)):
    """Distinct pictures: a colour gradient and a coloured square placed by the image's index."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        W, H = size
        x = torch.linspace(0, 1, W)[None, :, None].expand(H, W, 3).clone()
        x[..., i % 3] = torch.rand(1, generator=g).item()
        x[8 + 4 * i:24 + 4 * i, 8:24] = torch.tensor([1.0, 0.2 * i, 0.0])
        Image.fromarray((x * 255).byte().numpy()).save(os.path.join(folder, name))


def load_json(out):
    return json.load(open(os.path.join(out, "unified_bench.json")))


# ---------------------------------------------------------------- pure pieces

def test_summary_arithmetic_and_table():
    rows = [{"scores": {"clip": 90.0, "longclip": 80.0, "dinov2": 70.0, "dinov3": 60.0, "pixel": 10.0}},
            {"scores": {"clip": 100.0, "longclip": 90.0, "dinov2": 50.0, "dinov3": 40.0, "pixel": 30.0}}]
    names = ["clip", "longclip", "dinov2", "dinov3", "pixel"]
    stats, summary = ev.summarize(rows, names)
    assert {b: stats[b]["mean"] for b in names} == pytest.approx({"clip": 95, "longclip": 85, "dinov2": 60, "dinov3": 50, "pixel": 20})
    assert stats["clip"]["std"] == pytest.approx(5.0) and stats["dinov2"]["std"] == pytest.approx(10.0)  # ddof 0
    assert all(stats[b]["n"] == 2 for b in names)
    assert summary["overall"] == pytest.approx((95 + 85 + 60 + 50) / 4)  # the four bench backbones, pixel not averaged
    assert summary["n"] == 2 and summary["overall_over"] == ["clip", "longclip", "dinov2", "dinov3"]
    # a pair without one backbone's score counts only where it has one
    stats, _ = ev.summarize(rows + [{"scores": {"clip": 80.0}}], ["clip", "dinov3"])
    assert stats["clip"] == pytest.approx({"mean": 90.0, "std": (200 / 3) ** 0.5, "n": 3})
    assert stats["dinov3"]["n"] == 2
    # only a non-bench backbone: overall is its mean; nothing scored: None
    assert ev.summarize(rows, ["pixel"])[1]["overall"] == pytest.approx(20)
    assert ev.summarize([], ["clip"])[1] == {"overall": None, "overall_over": [], "n": 0}
    table = ev.markdown_table(*ev.summarize(rows, names), label="ours: test", backbones=names)
    lines = table.splitlines()
    assert lines[0].startswith("| system | CLIP | LongCLIP | DINOv2 | DINOv3 | pixel | overall | n |")
    assert "| UAE (paper) | 90.50 | 94.35 | 81.98 | 77.54 | — | 86.09 | 100 |" in lines
    assert any(l.startswith("| GPT-4o-Image (paper)") and "85.95" in l for l in lines)
    assert lines[-1] == "| ours: test | 95.00 | 85.00 | 60.00 | 50.00 | 20.00 | 72.50 | 2 |"


def test_pairing_by_stem(tmp_path):
    for n in ("a.jpg", "b.png", "c.png", "b.jpeg", "notes.txt", ".hidden.png"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    ignored = []
    src, problems = ev.list_images(str(tmp_path), ignored)
    assert sorted(src) == ["a", "b", "c"] and src["b"].endswith("b.jpeg")  # sorted: b.jpeg before b.png
    assert {os.path.basename(p["file"]): p["reason"][:12] for p in problems} == {"b.png": "same stem as"}
    assert [os.path.basename(p) for p in ignored] == ["notes.txt"]   # not a source, not a problem
    pairs, problems = ev.pair_by_stem({"a": "s/a.jpg", "b": "s/b.png", "c": "s/c.png"}, {"a": "r/a.png", "b": "r/b.png", "d": "r/d.png"})
    assert pairs == [("a", "s/a.jpg", "r/a.png"), ("b", "s/b.png", "r/b.png")]
    assert {p["file"]: p["reason"] for p in problems} == {"s/c.png": "no reconstruction with this stem",
                                                          "r/d.png": "no source image with this stem"}
    assert ev.image_seed("a") == ev.image_seed("a") != ev.image_seed("b") and ev.image_seed("a", 1) != ev.image_seed("a")


# ---------------------------------------------------------------- the script

def test_identical_folders_score_100(tmp_path):
    src = str(tmp_path / "src")
    make_images(src, ["a.png", "b.png"])
    make_images(src, ["c.jpg"], size=(80, 56))  # non-square: each backbone's own resize/crop
    shutil.copytree(src, tmp_path / "copy")
    out = str(tmp_path / "out")
    r = run("eval_unified.py", "--score_only", "--src", src, "--recon", tmp_path / "copy", "--out_dir", out,
            "--backbones", "clip,longclip,dinov2,dinov3,pixel", *TINY_BB)
    assert r.returncode == 0, r.stderr
    res = load_json(out)
    assert res["summary"]["n"] == 3 and res["problems"] == []
    for b in ("clip", "longclip", "dinov2", "dinov3", "pixel"):
        assert res["backbones"][b]["n"] == 3
        assert res["backbones"][b]["mean"] == pytest.approx(100, abs=1e-3), b
        assert all(row["scores"][b] == pytest.approx(100, abs=1e-3) for row in res["per_image"])
    assert res["summary"]["overall"] == pytest.approx(100, abs=1e-3)
    assert "| ours: recon: " in r.stdout and "| UAE (paper)" not in r.stdout   # tiny backbones: not comparable
    assert "note: not comparable with the paper's Unified-Bench (86.09): random tiny weights for clip" in r.stdout
    assert not res["comparable_with_paper"]


def test_bad_inputs_are_reported_not_fatal(tmp_path):
    src, rec, out = str(tmp_path / "src"), str(tmp_path / "rec"), str(tmp_path / "out")
    make_images(src, ["good1.png", "good2.jpg", "lonely.png", "badrec.png"])
    make_images(rec, ["good1.png", "good2.png", "garbage.png", "orphan.png"])
    open(os.path.join(src, "garbage.png"), "wb").write(b"this is not a png")
    open(os.path.join(src, "notes.txt"), "w").write("a text file")
    open(os.path.join(rec, "badrec.png"), "wb").write(b"\x89PNG\r\n\x1a\n truncated")
    r = run("eval_unified.py", "--score_only", "--src", src, "--recon", rec, "--out_dir", out, "--backbones", "pixel")
    assert r.returncode == 0, r.stderr
    res = load_json(out)
    assert res["summary"]["n"] == 2 and sorted(row["name"] for row in res["per_image"]) == ["good1", "good2"]
    reasons = {os.path.basename(p["file"]): p["reason"] for p in res["problems"]}
    assert set(reasons) == {"garbage.png", "lonely.png", "orphan.png", "badrec.png"}
    assert [os.path.basename(p) for p in res["ignored"]] == ["notes.txt"] and res["summary"]["n_ignored"] == 1
    assert reasons["garbage.png"].startswith("unreadable source") and reasons["badrec.png"].startswith("unreadable reconstruction")
    assert "no reconstruction" in reasons["lonely.png"]
    assert "no source" in reasons["orphan.png"] and res["summary"]["n_problems"] == 4
    for name in reasons:
        assert name in r.stdout
    assert "2 pairs scored, 4 problems" in r.stdout


def test_empty_folder_writes_json_and_exits_2(tmp_path):
    src, out = tmp_path / "empty", str(tmp_path / "out")
    src.mkdir()
    r = run("eval_unified.py", "--src", src, "--out_dir", out, "--backbones", "pixel", *FAST)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error: no (source, reconstruction) pair could be scored" in r.stderr
    res = load_json(out)
    assert res["summary"]["n"] == 0 and res["summary"]["overall"] is None
    assert res["problems"] == [{"file": str(src), "reason": "no image files in this folder"}]


@pytest.mark.slow
def test_end_to_end_tiny_then_resume_under_torchrun(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    stems = ["cat", "dog", "owl"]
    make_images(src, [s + ".png" for s in stems])
    open(os.path.join(src, "broken.png"), "wb").write(b"garbage")
    args = ["--src", src, "--out_dir", out, "--backbones", "dinov3,pixel", "--dinov3_path", "tiny", "--batch_size", "2", *FAST]
    r = run("eval_unified.py", *args)
    assert r.returncode == 0, r.stderr
    assert "generated 3, reused 0" in r.stdout
    res = load_json(out)
    assert res["summary"]["n"] == 3 and [row["name"] for row in res["per_image"]] == stems
    assert [os.path.basename(p["file"]) for p in res["problems"]] == ["broken.png"] and "broken.png" in r.stdout
    jsonl = [json.loads(l) for l in open(os.path.join(out, "captions.jsonl"))]
    assert [d["name"] for d in jsonl] == stems
    for row, d in zip(res["per_image"], jsonl):
        txt = open(os.path.join(out, "captions", row["name"] + ".txt")).read()
        assert txt == row["caption"] == d["caption"] and len(txt) > 0
        assert row["reconstruction"] == os.path.join(out, "recon", row["name"] + ".png")
        assert Image.open(row["reconstruction"]).size == (64, 64)
        assert -100 <= row["scores"]["pixel"] < 99  # a random model does not copy the image
    assert res["backbones"]["dinov3"]["n"] == 3 and res["summary"]["overall_over"] == ["dinov3"]
    assert "| ours: preset tiny |" in r.stdout

    # Resume under torchrun with 2 ranks (rank r takes items r::2 of broken, cat, dog, owl): cat is
    # reused untouched; dog (rank 0) and owl (rank 1) are redrawn in other batches and processes from
    # their per-image seeds: the same captions, the same pictures up to float noise, the same scores.
    mtime = os.path.getmtime(os.path.join(out, "recon", "cat.png"))
    for s in ("dog", "owl"):
        os.rename(os.path.join(out, "recon", s + ".png"), tmp_path / f"{s}_before.png")
    r = run("eval_unified.py", *args, torchrun=2)
    assert r.returncode == 0, r.stderr
    assert "[rank 0] reconstructions: generated 1, reused 0" in r.stdout
    assert "[rank 1] reconstructions: generated 1, reused 1" in r.stdout
    assert os.path.getmtime(os.path.join(out, "recon", "cat.png")) == mtime
    res2 = load_json(out)
    assert res2["world"] == 2 and res2["summary"]["n"] == 3 and res2["problems"] == res["problems"]
    assert [row["caption"] for row in res2["per_image"]] == [row["caption"] for row in res["per_image"]]
    for s in ("dog", "owl"):
        new, old = ev.read_rgb(os.path.join(out, "recon", s + ".png")), ev.read_rgb(tmp_path / f"{s}_before.png")
        assert (new - old).abs().mean() < 2 / 255, s  # another image's seed: ~0.13
    assert res2["summary"]["overall"] == pytest.approx(res["summary"]["overall"], abs=0.05)
    assert res2["summary"]["reused"] == 1 and res2["summary"]["generated"] == 2


def test_resume_refuses_other_settings(tmp_path):
    args = ev.Args(src="x", out_dir=str(tmp_path), steps=2)
    ev.check_settings(args, rank=0)  # first run: pins the settings
    ev.check_settings(ev.Args(src="x", out_dir=str(tmp_path), steps=2, batch_size=7), rank=0)  # scoring/batching may change
    with pytest.raises(runs.UsageError, match="other settings.*steps"):
        ev.check_settings(ev.Args(src="x", out_dir=str(tmp_path), steps=3), rank=0)


def test_resume_refuses_a_rewritten_checkpoint(tmp_path):
    """A stage rerun into the same out_dir publishes a new checkpoint under the same path: a bench folder made from
    the old one must not be reused for it (it was, silently, before settings.json pinned the checkpoint)."""
    run_dir, out = tmp_path / "run", str(tmp_path / "bench")
    run_dir.mkdir()
    os.makedirs(out)
    ck.save_checkpoint(str(run_dir / "ckpt"), runs.load_model(preset="tiny"), {"stage": "test"})
    ev.check_settings(ev.Args(src="x", out_dir=out, init=str(run_dir)), rank=0)
    ev.check_settings(ev.Args(src="x", out_dir=out, init=str(run_dir)), rank=0)  # the same checkpoint: resumes
    time.sleep(0.01)
    ck.save_checkpoint(str(run_dir / "ckpt"), runs.load_model(preset="tiny"), {"stage": "test"})
    with pytest.raises(runs.UsageError, match="other settings.*checkpoint"):
        ev.check_settings(ev.Args(src="x", out_dir=out, init=str(run_dir)), rank=0)


# ---------------------------------------------------------------- sample.py

def test_sample_caption(tmp_path):
    make_images(str(tmp_path), ["x.png"])
    r = run("sample.py", "caption", "--image", tmp_path / "x.png", "--out", tmp_path / "caps", "--max_new_tokens", "8")
    assert r.returncode == 0, r.stderr
    text = open(tmp_path / "caps" / "x.txt").read()
    assert text.strip() and text.strip() in r.stdout


def test_sample_generate(tmp_path):
    r = run("sample.py", "generate", "--prompt", "a red square", "--out", tmp_path / "a.png", "--steps", "2")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a.png")
    assert im.size == (64, 64) and im.mode == "RGB"


def test_sample_reconstruct(tmp_path):
    make_images(str(tmp_path), ["x.png"])
    r = run("sample.py", "reconstruct", "--image", tmp_path / "x.png", "--out", tmp_path / "rec", *FAST)
    assert r.returncode == 0, r.stderr
    caption = open(tmp_path / "rec" / "x_caption.txt").read().strip()
    assert caption and caption in r.stdout
    assert Image.open(tmp_path / "rec" / "x_recon.png").size == (64, 64)
    pair = Image.open(tmp_path / "rec" / "x_pair.png")
    assert pair.size[0] == 128 and pair.size[1] > 64  # source | reconstruction, caption below
