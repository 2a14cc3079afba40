"""What happens when things go wrong (issue #15): user errors are one line and exit 2 before anything
is loaded or written; a previous run is never destroyed; a checkpoint write killed at any phase
leaves a checkpoint that resumes bit-exactly (or is refused); resume refuses changed flags and trims
the log; one image reader (EXIF, 16-bit, float, alpha, FIFOs, pixel cap) for training, eval, sample."""
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import runs
import checkpoint as ck
import images
import eval_unified as ev
import stage1_coldstart as S1
import stage2_grpo_und as S2
import stage3_grpo_gen as S3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# stage 3, as tests/test_stage3.py runs it: 32 px, 4 SDE steps, short captions, no eval / pictures
TINY3 = ["--preset", "tiny", "--resolution", "32", "--G", "4", "--groups", "2", "--sample_steps", "4", "--eval_steps", "4",
         "--max_new_tokens", "8", "--reward", "pixel", "--lr", "1e-2", "--eval_every", "0", "--sample_every", "0"]


from test_stage3 import data, one_thread  # noqa: E402,F401  (the same 4 images, one intra-op thread)


def logs(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "log.jsonl"))]


def train_logs(out):
    return [{k: v for k, v in d.items() if not k.startswith("time/")} for d in logs(out) if "reward/mean" in d]


def live_lora(out):
    meta, t = ck.read_checkpoint(out)
    live = f"layer{len(meta['layers']) - 1}."
    return {k: v for k, v in t.items() if k.startswith(live)}


def snapshot(d):
    """Every entry under d: file -> sha1 + mtime, link -> its target."""
    out = {}
    for r, dirs, fs in os.walk(d):
        for n in dirs + fs:
            p = os.path.join(r, n)
            rel = os.path.relpath(p, d)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[rel] = (hashlib.sha1(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def ref3(data, tmp_path_factory):
    """A finished stage-3 run: 3 steps, a checkpoint after every step."""
    out = str(tmp_path_factory.mktemp("rel-ref") / "run")
    S3.main(TINY3 + ["--data", data, "--steps", "3", "--save_every", "1", "--out_dir", out])
    return out


# ---------------------------------------------------------------------------------------------- images

def _png_header_only(path, w, h):
    """A PNG that claims w x h pixels and holds none: the cap must refuse it from the header alone."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_one_reader_for_every_mode(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = images.read_image(str(tmp_path / "g16.png"))
    want = torch.from_numpy(np.round(ramp / 65535 * 255) / 255).float()
    assert torch.allclose(x[0], want, atol=1e-6) and torch.equal(x[0], x[2])       # scaled, not clipped white
    # 'I' (32-bit int): 16-bit data scaled by 65535, 8-bit data widened scaled by 255
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i16.tif")
    Image.fromarray((ramp // 257).astype(np.int32)).save(tmp_path / "i8.tif")
    assert Image.open(tmp_path / "i16.tif").mode == "I"
    assert torch.allclose(images.read_image(str(tmp_path / "i16.tif"))[0], want, atol=1e-6)
    assert torch.allclose(images.read_image(str(tmp_path / "i8.tif"))[0], torch.from_numpy(ramp // 257).float() / 255)
    # float TIFF in [0, 1]
    f = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert torch.allclose(images.read_image(str(tmp_path / "f.tif"))[1], torch.from_numpy(f), atol=0.5 / 255 + 1e-6)
    # alpha on white: RGBA, LA, palette with a transparent index; CMYK converted
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (8, 8), 3)
    p.putpalette([0, 0, 0] * 256)
    p.save(tmp_path / "p.png", transparency=3)
    for name in ("rgba.png", "la.png", "p.png"):
        assert torch.equal(images.read_image(str(tmp_path / name)), torch.ones(3, 8, 8)), name
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    c = images.read_image(str(tmp_path / "c.jpg"))[:, 4, 4]
    assert c[0] > 0.9 and c[1] < 0.1 and c[2] < 0.1                                  # red
    # EXIF orientation 6 (rotate 90 CW to view): a landscape-stored phone photo stands upright
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)                                                          # stored: red left, blue right
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = images.read_image(str(tmp_path / "phone.jpg"))
    assert up.shape == (3, 40, 20)
    assert up[0, 5, 10] > 0.8 and up[2, 35, 10] > 0.8                                # red on top, blue below
    # training (load_image at a size), eval (read_rgb at native size) and read_image agree
    for name in ("g16.png", "f.tif", "rgba.png", "phone.jpg"):
        path = str(tmp_path / name)
        assert torch.equal(ev.read_rgb(path), images.read_image(path)), name
        assert torch.equal(images.load_image(path, 16), images.read_image(path, 16)), name
    assert images.load_image(str(tmp_path / "phone.jpg"), 16)[0, 2, 8] > 0.8              # upright in training too


def test_fifo_and_pixel_cap_are_refused_by_name(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    signal.alarm(20)  # a regression would block in open(); fail instead of hanging the suite
    try:
        for f in (images.read_image, images.check_image):
            with pytest.raises(images.ImageError, match=r"x\.png: not a regular file"):
                f(str(fifo))
        with pytest.raises(images.DataError, match=r"x\.png is not a regular file"):
            images.ImageDataset(str(tmp_path), 16)
        Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
        files, problems = ev.list_images(str(tmp_path))
        assert list(files) == ["ok"] and "not a regular file" in problems[0]["reason"]
        rec = tmp_path / "rec"
        rec.mkdir()
        Image.new("RGB", (8, 8)).save(rec / "ok.png")
        os.mkfifo(rec / "x.png")
        status = ev.main(["--score_only", "--src", str(tmp_path), "--recon", str(rec), "--out_dir", str(tmp_path / "o"),
                          "--backbones", "pixel"])
        assert status == 0
        res = json.load(open(tmp_path / "o" / "unified_bench.json"))
        assert res["summary"]["n"] == 1 and sum("not a regular file" in p["reason"] for p in res["problems"]) == 2
    finally:
        signal.alarm(0)
    # the cap is read from the header: a PNG claiming 20000 x 20000 with no pixel data is refused as too
    # large (not as truncated), and the default cap sits well under PIL's own decompression-bomb limits
    _png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(images.ImageError, match=r"huge\.png: 20000 x 20000 = 400\.0 MP is over the pixel cap of 67\.1 MP"):
        images.read_image(str(tmp_path / "huge.png"))
    with pytest.raises(images.ImageError, match=r"ok\.png: 8 x 8 = 0\.0 MP is over the pixel cap"):
        images.read_image(str(tmp_path / "ok.png"), max_pixels=63)
    assert images.MAX_PIXELS < Image.MAX_IMAGE_PIXELS < 2 * Image.MAX_IMAGE_PIXELS


def test_jsonl_is_parsed_in_full_with_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cases = {'{"image": 5}': r"d\.jsonl:2: \"image\" must be a non-empty string",
             '["a.png"]': r"d\.jsonl:2: expected a JSON object",
             '{"image": "a.png", "caption": 3}': r"d\.jsonl:2: \"caption\" must be a string",
             '{"image": "gone.png"}': r"d\.jsonl:2: image 'gone\.png' does not exist",
             '{"image": "a.png"': r"d\.jsonl:2: not JSON"}
    for line, msg in cases.items():
        (tmp_path / "d.jsonl").write_text('{"image": "a.png", "caption": "x"}\n' + line + "\n\n")
        with pytest.raises(images.DataError, match=msg):
            images.ImageDataset(str(tmp_path / "d.jsonl"), 8)
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "a.png"}\n')
    assert len(images.ImageDataset(str(tmp_path / "d.jsonl"), 8)) == 2


def test_trim_log(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps({"step": s, "v": s}) + "\n" for s in (0, 1, 2, 2, 3)) + '{"step": 4, "v"')
    ck.trim_log(str(p), 2)
    assert [json.loads(ln)["step"] for ln in p.read_text().splitlines()] == [0, 1, 2, 2]
    before = p.stat().st_mtime_ns
    ck.trim_log(str(p), 2)
    assert p.stat().st_mtime_ns == before                                  # nothing to drop: not rewritten


# ---------------------------------------------------------------------------------------------- user errors

def _uerr(fn, *args, match=None):
    with pytest.raises(runs.USER_ERRORS) as e:
        fn(*args)
    assert "\n" not in runs.one_line(e.value)
    if match:
        assert match in str(e.value), str(e.value)
    return str(e.value)


def test_what_cannot_learn_is_refused(tmp_path, data):
    out = str(tmp_path / "fresh")
    s2 = lambda **kw: S2.Args(**{"data": data, "out_dir": out, "reward": "pixel", "resolution": 32, **kw})
    s3 = lambda **kw: S3.Args(**{"data": data, "out_dir": out, "reward": "pixel", "resolution": 32, **kw})
    s1 = lambda **kw: S1.Args(**{"data": data, "out_dir": out, "objective": "sem", "reward": "pixel", **kw})
    for args, flag in [(s2(G=1), "--G 1"), (s2(batch_size=0), "--batch_size 0"), (s2(steps=0), "--steps 0"),
                       (s2(loss_agg="bogus"), "--loss_agg 'bogus'"), (s2(temperature=0.0), "--temperature 0"),
                       (s2(scale_rewards="x"), "--scale_rewards"), (s2(micro_batch=0), "--micro_batch 0"),
                       (s2(resolution=50), "--resolution 50"), (s2(reward="nope"), "--reward 'nope'"),
                       (s2(lr=float("nan")), "--lr nan"), (s2(dtype="fp16"), "--dtype 'fp16'"),
                       (s3(G=1), "--G 1"), (s3(sample_steps=1), "--sample_steps 1"), (s3(groups=0), "--groups 0"),
                       (s3(noise_level=0.0), "--noise_level 0"), (s3(train_frac=0.0), "--train_frac 0"),
                       (s1(grad_accum=0), "--grad_accum 0"), (s1(w_sem=0.0), "weight 0"),
                       (s1(objective="fm"), "have no caption"), (s1(sem_steps_k=11), "--sem_steps_k 11"),
                       (s2(data=""), "python data/shapes/prepare.py"), (s2(init=str(tmp_path)), "no uae.json"),
                       (s2(encoder="/no/such/dir"), "--encoder /no/such/dir")]:
        mod = {S1.Args: S1, S2.Args: S2, S3.Args: S3}[type(args)]
        _uerr(mod.main, args, match=flag)
    assert not os.path.exists(out)                                         # nothing was written


def test_a_failed_run_changes_nothing(ref3, data, tmp_path):
    """Every refused command below leaves the finished run's files byte for byte (and mtime) as they were."""
    before = snapshot(ref3)
    assert {"log.jsonl", "ckpt"} <= set(before) and len(logs(ref3)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n{"image": 5}\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"image": f"gone{i}.png"}) + "\n" for i in range(3)))
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    base = TINY3 + ["--steps", "3", "--out_dir", ref3]
    for extra, msg in [([], "already holds a run"), (["--steps", "0"], "--steps 0"), (["--G", "0"], "--G 0"),
                       (["--groups", "0"], "--groups 0"), (["--scale_rewards", "bogus"], "--scale_rewards"),
                       (["--data", str(bad)], "bad.jsonl:1: image 'x.png' does not exist"),
                       (["--data", str(missing)], "missing.jsonl:1"),
                       (["--resume", "--lora_r", "4", "--G", "8"], "--G 4 (given 8), --lora_r 32 (given 4)"),
                       (["--resume", "--dtype", "bf16"], "--dtype 'fp32' (given 'bf16')"),
                       (["--resume", "--resolution", "64"], "--resolution 32 (given 64)"),
                       (["--resume", "--groups", "1"], "--groups 2 (given 1)"),
                       (["--resume", "--data", other], f"--data {data!r} (given {other!r})"),
                       (["--resume", "--steps", "2"], "--steps 2 is below the checkpoint's step 3"),
                       (["--resume", "--overwrite"], "contradict")]:
        _uerr(S3.main, base + (["--data", data] if "--data" not in extra else []) + extra, match=msg)
    _uerr(S2.main, ["--data", data, "--reward", "pixel", "--resolution", "32", "--out_dir", ref3, "--resume"],
          match="written by 'stage3', not stage2")
    _uerr(S1.main, ["--data", data, "--objective", "sem", "--reward", "pixel", "--out_dir", ref3, "--resume"],
          match="written by 'stage3', not stage1")
    assert snapshot(ref3) == before
    # harmless flags may change on resume
    ok = runs.parse_args(S3.Args, base + ["--data", data, "--resume", "--save_every", "7", "--log_every", "5", "--steps", "9",
                                       "--eval_every", "3", "--wandb", ""])
    assert S3.validate(ok).resume


def test_resume_refuses_a_checkpoint_without_rng_and_other_changes(tmp_path, data):
    out = str(tmp_path / "r")
    common = TINY3 + ["--data", data, "--out_dir", out]
    S3.main(common + ["--steps", "1"])
    os.remove(os.path.join(ck.ckpt_dir(out), "rng0.safetensors"))
    before = snapshot(out)
    _uerr(S3.main, common + ["--steps", "2", "--resume"], match="no RNG state for rank 0")
    with pytest.raises(images.CheckpointError, match="no RNG state for rank 0"):   # and the loader itself, were it reached
        ck.load_train_state(out, torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), 0, 1)
    assert snapshot(out) == before


def test_stage1_resume_names_dit_full_and_objective(tmp_path, data):
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"image": os.path.join(data, f"img{i}.png"), "caption": f"a picture {i}"}) + "\n"
                          for i in range(4)))
    out = str(tmp_path / "s1")
    base = ["--data", str(jl), "--lora_r", "4", "--batch_size", "2", "--warmup", "0", "--sample_every", "0",
            "--max_new_tokens", "8", "--reward", "pixel", "--out_dir", out]
    S1.main(base + ["--steps", "1"])
    before = snapshot(out)
    _uerr(S1.main, base + ["--steps", "2", "--resume", "--dit_full", "true"], match="--dit_full False (given True)")
    _uerr(S1.main, base + ["--steps", "2", "--resume", "--objective", "fm+sem", "--batch_size", "4"],
          match="--objective 'fm' (given 'fm+sem')")
    _uerr(S1.main, base + ["--steps", "2", "--resume", "--batch_size", "4"], match="--batch_size 2 (given 4)")
    assert snapshot(out) == before


def test_check_checkpoint_names_what_is_wrong(ref3, tmp_path):
    ck.check_checkpoint(ref3)
    ck.check_checkpoint(os.path.join(ref3, "ckpt"))
    bad = tmp_path / "c"
    shutil.copytree(ck.ckpt_dir(ref3), bad)
    meta = json.load(open(bad / "uae.json"))
    w = (bad / "weights.safetensors").read_bytes()
    cases = [("uae.json", "{garbage", "is corrupt"), ("uae.json", json.dumps({**meta, "layers": None}), "no 'layers'"),
             ("uae.json", json.dumps({k: v for k, v in meta.items() if k != "layers"}), "no 'layers'"),
             ("uae.json", json.dumps({**meta, "format": "x"}), "format 'x'"),
             ("uae.json", json.dumps({**meta, "layers": meta["layers"] + [{"encoder": {"r": 4, "alpha": 8, "targets": "x"}}]}),
              "its LoRA tensors are missing"),
             ("weights.safetensors", w[: len(w) // 2], "truncated"), ("weights.safetensors", b"", "truncated")]
    for name, content, msg in cases:
        shutil.rmtree(bad)
        shutil.copytree(ck.ckpt_dir(ref3), bad)
        (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        _uerr(ck.check_checkpoint, str(bad), match=msg)


# ---------------------------------------------------------------------------------------------- checkpoints

class Killed(BaseException):
    """kill -9 in-process: nothing catches it, nothing cleans up after it."""


PHASES = ["weights-partial", "weights-unpublished", "weights", "rng0", "link", "link-made", "published", "done"]


def _crash_at(monkeypatch, phase, save_no):
    """Kill the save_no-th checkpoint write of the next run at `phase`."""
    import safetensors.torch as st
    n = {"saves": 0}
    real_save = st.save_file

    def hook(name):
        if name == "begin":
            n["saves"] += 1
        if n["saves"] == save_no and name == phase:
            raise Killed(phase)

    def partial_save(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        if path.endswith("weights.safetensors") and n["saves"] == save_no:
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 3])
            raise Killed(phase)

    def unpublished(tmp, path):
        raise Killed(phase)

    monkeypatch.setattr(ck, "_crash_hook", hook)
    if phase == "weights-partial":
        monkeypatch.setattr(ck, "save_file", partial_save)
    if phase == "weights-unpublished":
        monkeypatch.setattr(ck, "atomic_publish", lambda tmp, path: unpublished(tmp, path) if n["saves"] == save_no
                            else images.atomic_publish(tmp, path))


@pytest.mark.parametrize("phase,save_no", [(p, 2) for p in PHASES] + [("weights", 1), ("published", 1)])
def test_checkpoint_write_killed_at_every_phase(phase, save_no, ref3, data, tmp_path, monkeypatch):
    """Kill the write of checkpoint `save_no` (after step save_no) at `phase`: a valid checkpoint is always
    there (the old one or the new one), and --resume from it ends bit for bit where the uninterrupted run did."""
    out = str(tmp_path / "run")
    common = TINY3 + ["--data", data, "--save_every", "1", "--out_dir", out]
    _crash_at(monkeypatch, phase, save_no)
    with pytest.raises(Killed):
        S3.main(common + ["--steps", "3"])
    monkeypatch.undo()
    cur = ck.ckpt_dir(out)
    if cur is None:                                                       # the first write died before its publish
        assert save_no == 1 and phase != "published"
    else:
        meta, _ = ck.read_checkpoint(out)
        assert meta["step"] in (save_no - 1, save_no) and meta["step"] >= 1
        assert meta["step"] == (save_no if phase in ("published", "done") else save_no - 1)
        ck.check_checkpoint(out)
    S3.main(common + ["--steps", "3", "--resume"])
    assert train_logs(out) == train_logs(ref3)                            # every logged number, exactly
    la, lb = live_lora(ref3), live_lora(out)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert _listing(out) == ["ckpt", "ckpt.000003", "log.jsonl"]   # leftovers cleaned


def _listing(out):
    """The run folder's entries, less stage 3's caption cache (captions.jsonl: not part of a checkpoint)."""
    return sorted(f for f in os.listdir(out) if f != "captions.jsonl")


def test_checkpoint_folder_of_an_earlier_version_and_the_gap(tmp_path, ref3, data):
    """A ckpt/ that is a real folder (written before links) resumes; the next save moves it aside and links;
    killed between those two renames (no ckpt, a ckpt.legacy), the checkpoint is still found."""
    out = str(tmp_path / "old")
    common = TINY3 + ["--data", data, "--save_every", "1", "--out_dir", out]
    S3.main(common + ["--steps", "2"])
    target = ck.ckpt_dir(out)
    os.remove(os.path.join(out, "ckpt"))
    os.rename(target, os.path.join(out, "ckpt.legacy"))                   # the gap: no ckpt, a ckpt.legacy
    assert ck.read_checkpoint(ck.ckpt_dir(out))[0]["step"] == 2            # ckpt_dir finishes the publish
    os.remove(os.path.join(out, "ckpt"))
    os.rename(os.path.join(out, "ckpt.legacy"), os.path.join(out, "ckpt"))   # a real folder, as before links
    S3.main(common + ["--steps", "3", "--resume"])
    assert os.path.islink(os.path.join(out, "ckpt")) and _listing(out) == ["ckpt", "ckpt.000003", "log.jsonl"]
    assert train_logs(out) == train_logs(ref3)


def test_overwrite_replaces_the_run(tmp_path, data):
    out = str(tmp_path / "o")
    S3.main(TINY3 + ["--data", data, "--steps", "2", "--out_dir", out, "--sample_every", "1"])
    os.makedirs(os.path.join(out, ".ckpt-stale"))
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    S3.main(TINY3 + ["--data", data, "--steps", "1", "--out_dir", out, "--overwrite"])
    assert [d["step"] for d in logs(out)] == [1] and ck.read_checkpoint(out)[0]["step"] == 1
    assert _listing(out) == ["ckpt", "ckpt.000001", "log.jsonl", "notes.txt"]   # other files are left alone


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_resume_trims_the_log_in_every_stage(stage, tmp_path, data):
    """Lines written after the checkpoint (a crash between them) are dropped, so no step appears twice."""
    out = str(tmp_path / stage)
    if stage == "stage1":
        jl = tmp_path / "d.jsonl"
        jl.write_text("".join(json.dumps({"image": os.path.join(data, f"img{i}.png"), "caption": f"a picture {i}"}) + "\n"
                              for i in range(4)))
        mod, args = S1, ["--data", str(jl), "--lora_r", "4", "--batch_size", "2", "--warmup", "0", "--sample_every", "0",
                         "--max_new_tokens", "8"]
    elif stage == "stage2":
        mod, args = S2, ["--data", data, "--reward", "pixel", "--resolution", "32", "--G", "2", "--batch_size", "1",
                         "--max_new_tokens", "6", "--sample_steps", "2", "--cfg", "1.0", "--sample_every", "0", "--eval_every", "1",
                         "--eval_images", "1", "--eval_G", "2"]
    else:
        mod, args = S3, TINY3 + ["--data", data, "--groups", "1"]
    args += ["--out_dir", out, "--save_every", "100"]
    mod.main(args + ["--steps", "2"])                                     # checkpoint at step 2 (the end)
    with open(os.path.join(out, "log.jsonl"), "a") as f:                  # killed after logging step 3, before its save
        f.write(json.dumps({"step": 3, "fake": True}) + "\n" + '{"step": 3, "tor')
    mod.main(args + ["--steps", "3", "--resume"])
    again = logs(out)
    assert not any("fake" in d for d in again)
    train = [d["step"] for d in again if not any(k.startswith("eval/") for k in d)]
    assert train == [1, 2, 3]                                             # step 3 once, not twice
    if stage == "stage2":
        assert [d["step"] for d in again if "eval/reward" in d] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- the command line

def _run(script, *args, cwd=None, torchrun=0, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    pre = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
           f"--master_port={_free_port()}"] if torchrun else [sys.executable]
    return subprocess.run(pre + [os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout


def test_user_errors_are_one_line_exit_2(tmp_path, data):
    r = _run("stage2_grpo_und.py", cwd=str(tmp_path))                       # the bare command on a fresh clone
    _one_line(r, "--data is required")
    assert "python data/shapes/prepare.py && python stage2_grpo_und.py --data data/shapes/train/captions.jsonl" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 5}\n')
    _one_line(_run("stage3_grpo_gen.py", "--data", bad, "--out_dir", tmp_path / "o"), 'bad.jsonl:1: "image" must be')
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "uae.json").write_text("{not json")
    _one_line(_run("stage1_coldstart.py", "--data", data, "--init", ck, "--out_dir", tmp_path / "o"), "uae.json is corrupt")
    os.mkfifo(tmp_path / "fifo.png")
    _one_line(_run("sample.py", "caption", "--image", tmp_path / "fifo.png", timeout=60), "fifo.png: not a regular file")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_bare_commands_and_torchrun(tmp_path):
    for script in ("stage1_coldstart.py", "stage3_grpo_gen.py"):
        r = _run(script, cwd=str(tmp_path))
        _one_line(r, f"python data/shapes/prepare.py && python {script} --data data/shapes/train/captions.jsonl")
    _one_line(_run("stage2_grpo_und.py", "--bogus_flag", "1"), "unknown argument(s): --bogus_flag 1")
    _one_line(_run("stage2_grpo_und.py", "--G", "two"), "argument --G: invalid int value: 'two'")
    r = _run("stage2_grpo_und.py", torchrun=2, cwd=str(tmp_path))              # 2 ranks: one line from rank 0, both exit 2
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(ours) == 1 and "--data is required" in ours[0]
    assert "exitcode  : 2" in r.stderr and 'File "' + os.path.join(ROOT, "stage2") not in r.stderr


KILLER = """import os, signal, sys
sys.path.insert(0, {root!r})
import checkpoint as ck
import runs
n = [0]
def hook(name):
    n[0] += name == "begin"
    if n[0] == 2 and name == os.environ["KILL_AT"]:
        os.kill(os.getpid(), signal.SIGKILL)
ck._crash_hook = hook
import stage3_grpo_gen as S
runs.cli(S.main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["rng0", "link-made"])
def test_kill_9_during_a_checkpoint_write(phase, ref3, data, tmp_path):
    """A real SIGKILL in the second checkpoint write, then the plain command line with --resume."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=ROOT))
    out = str(tmp_path / "run")
    common = [*TINY3, "--data", data, "--save_every", "1", "--out_dir", out, "--steps", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KILL_AT": phase}
    p = subprocess.run([sys.executable, str(killer), *common], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert ck.read_checkpoint(out)[0]["step"] == 1 and any(n.startswith(".ckpt-link") for n in os.listdir(out)) == (phase == "link-made")
    r = _run("stage3_grpo_gen.py", *common, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert train_logs(out) == train_logs(ref3)
    assert _listing(out) == ["ckpt", "ckpt.000003", "log.jsonl"]


@pytest.mark.slow
def test_two_ranks_checkpoint_every_rng_and_resume(data, tmp_path):
    """2 ranks: both ranks' RNG states are in the one folder; resume under torchrun continues exactly; a
    missing rank-1 state is refused by one line."""
    one, two = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = [*TINY3, "--data", data, "--groups", "1", "--save_every", "1"]
    for out, steps in ((one, 3), (two, 2)):
        r = _run("stage3_grpo_gen.py", *common, "--out_dir", out, "--steps", steps, torchrun=2, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(f for f in os.listdir(ck.ckpt_dir(two)) if f.startswith("rng")) == ["rng0.safetensors", "rng1.safetensors"]
    r = _run("stage3_grpo_gen.py", *common, "--out_dir", two, "--steps", 3, "--resume", torchrun=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_logs(one) == train_logs(two)
    os.remove(os.path.join(ck.ckpt_dir(two), "rng1.safetensors"))
    r = _run("stage3_grpo_gen.py", *common, "--out_dir", two, "--steps", 4, "--resume", torchrun=2, timeout=300)
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode != 0 and len(ours) == 1 and "no RNG state for rank 1" in ours[0]
