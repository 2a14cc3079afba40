"""Nothing lost, nothing silent (issue #27): every script checks its flags and paths before anything loads or is
written and ends a user error in one line (exit 2), leaving an existing run as it was (file hashes and mtimes);
eval_unified.py and sample.py write only into folders of their own; a corrupt caption cache is refused on resume
with what to do; a stalled rank ends a torchrun job within --dist_timeout, named; run-wide counts are summed over
ranks. tests/test_reliability.py holds the earlier cases and the helpers reused here."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

import caption_cache as CC
import eval_unified as ev
import model as M
import reward
import runs
import sample
import stage1_coldstart as S1
import stage2_grpo_und as S2
import stage3_grpo_gen as S3
import training as T
from tools import bench, demo, export, released
from test_reliability import ROOT, TINY3, _one_line, _run, logs, snapshot
from test_stage3 import data, one_thread  # noqa: F401  (the same 4 images, one intra-op thread)


@pytest.fixture(scope="module")
def run3(data, tmp_path_factory):
    """A finished stage-3 run (2 steps, its caption cache, a checkpoint)."""
    out = str(tmp_path_factory.mktemp("refusals") / "run")
    S3.main(TINY3 + ["--data", data, "--steps", "2", "--out_dir", out])
    assert {"ckpt", "log.jsonl", CC.CAPTION_CACHE} <= set(os.listdir(out))
    return out


@pytest.fixture()
def no_load(monkeypatch):
    """Any model or backbone load fails the test: the refusals below come before them."""
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the check")
    for mod, name in ((runs, "load_model"), (M, "load_uae"), (reward, "load_backbone"), (T, "dist_setup")):
        monkeypatch.setattr(mod, name, loaded)


def refused(fn, argv, match):
    """fn(argv) stops with a user error whose one line contains `match` -> that line."""
    with pytest.raises(runs.USER_ERRORS) as e:
        fn(argv)
    line = runs.one_line(e.value)
    assert match in line, line
    return line


def stage_argv(data, out):
    """The tiny command of each training script, into out."""
    return {S1.main: ["--data", data, "--objective", "sem", "--reward", "pixel", "--out_dir", out],
            S2.main: ["--data", data, "--reward", "pixel", "--resolution", "32", "--out_dir", out],
            S3.main: TINY3 + ["--data", data, "--out_dir", out]}


def test_out_dir_under_a_file(data, tmp_path, no_load):
    f = tmp_path / "a-file"
    f.write_text("mine")
    before = snapshot(tmp_path)
    under = str(f / "run")
    for fn, argv in stage_argv(data, under).items():
        refused(fn, argv, f"--out_dir {under}: {f} is a file, not a folder")
    refused(ev.main, ["--src", data, "--out_dir", under, "--backbones", "pixel"], f"{f} is a file, not a folder")
    refused(ev.main, ["--src", data, "--out_dir", str(f), "--backbones", "pixel"], "exists and is not a folder")
    img = os.path.join(data, "img0.png")
    for out in (under, under + ".txt"):   # --out a folder, or a file, under the file
        refused(sample.main, ["caption", "--image", img, "--out", out], f"{f} is a file, not a folder")
    assert snapshot(tmp_path) == before


def deny_writes_under(monkeypatch, root):
    """os.access says no write under root, as on a read-only file system (root's writes are not stopped by chmod)."""
    real, root = os.access, os.path.realpath(root)

    def access(path, mode, *a, **k):
        p = os.path.realpath(path)
        if mode & os.W_OK and (p == root or p.startswith(root + os.sep)):
            return False
        return real(path, mode, *a, **k)
    monkeypatch.setattr(os, "access", access)


def test_unwritable_out_dir(run3, data, tmp_path, monkeypatch, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    before, run_before = snapshot(tmp_path), snapshot(run3)
    deny_writes_under(monkeypatch, ro)
    deny_writes_under(monkeypatch, run3)
    fresh = str(ro / "new")
    for fn, argv in stage_argv(data, fresh).items():
        refused(fn, argv, f"--out_dir {fresh}: cannot write in {ro}")
    refused(S3.main, TINY3 + ["--data", data, "--out_dir", run3, "--steps", "3", "--resume"],
            f"--out_dir {run3}: cannot write in {run3}")
    refused(S2.main, ["--data", data, "--reward", "pixel", "--out_dir", run3, "--overwrite"], "cannot write in")
    refused(ev.main, ["--src", data, "--out_dir", fresh, "--backbones", "pixel"], "cannot write in")
    refused(sample.main, ["caption", "--image", os.path.join(data, "img0.png"), "--out", fresh], "cannot write in")
    refused(sample.main, ["generate", "--prompt", "x", "--out", str(ro / "x.png")], "cannot write in")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and snapshot(run3) == run_before


@pytest.mark.slow
def test_read_only_mount(run3, data, tmp_path):
    """The real thing: the run folder bind-mounted read-only in a private mount namespace (unshare; skipped where
    that is not allowed), then --resume into it: one line, exit 2, the run as it was."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {tmp_path} {tmp_path} && mount -o "
                            f"remount,ro,bind {tmp_path} && ! touch {tmp_path}/x"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no unshare / read-only bind mounts here")
    before = snapshot(run3)
    cmd = [sys.executable, os.path.join(ROOT, "stage3_grpo_gen.py"), *TINY3, "--data", data, "--out_dir", run3,
           "--steps", "3", "--resume"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && '
                        'exec "$@"', run3, *cmd], capture_output=True, text=True, env=env, timeout=300)
    _one_line(r, f"--out_dir {run3}: cannot write in")
    assert snapshot(run3) == before


@pytest.mark.parametrize("holds", ["ckpt", "log.jsonl", "captions.jsonl", "the run"])
def test_eval_and_sample_refuse_a_training_run(holds, run3, data, tmp_path, no_load):
    """What would have overwritten stage 3's caption cache (captions.jsonl) is refused, whichever part of a run
    the folder holds; the run itself stays as it was."""
    if holds == "the run":
        folder = run3
    else:
        folder = str(tmp_path / "part")
        os.makedirs(folder)
        src = os.path.join(run3, holds)
        if holds == "ckpt":
            shutil.copytree(src, os.path.join(folder, "ckpt"))
        else:
            shutil.copy(src, folder)
    before = snapshot(folder)
    name = holds if holds != "the run" else "ckpt"
    refused(ev.main, ["--src", data, "--out_dir", folder, "--backbones", "pixel"], "holds a training run (")
    line = refused(ev.main, ["--score_only", "--src", data, "--recon", data, "--out_dir", folder, "--backbones", "pixel"],
                   "holds a training run")
    assert name in line
    img = os.path.join(data, "img0.png")
    refused(sample.main, ["caption", "--image", img, "--out", folder], "holds a training run")
    refused(sample.main, ["caption", "--image", img, "--out", os.path.join(folder, "x.txt")], "holds a training run")
    assert snapshot(folder) == before


def test_eval_and_sample_write_only_their_own_folders(data, tmp_path):
    """A rerun of the same command into its own folder works (and resumes); a folder with anything else is
    refused by name; neither script writes into the other's folder."""
    out = str(tmp_path / "bench")
    score = ["--score_only", "--src", data, "--recon", data, "--out_dir", out, "--backbones", "pixel"]
    assert ev.main(score) == 0 and ev.main(score) == 0
    assert runs.read_outputs(out)["tool"] == "eval_unified.py"
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    before = snapshot(out)
    refused(ev.main, score, "holds files that eval_unified.py did not write (notes.txt)")
    assert snapshot(out) == before
    mine = tmp_path / "photos"
    mine.mkdir()
    Image.new("RGB", (8, 8)).save(mine / "holiday.png")
    refused(ev.main, score[:-4] + ["--out_dir", str(mine), "--backbones", "pixel"], "did not write (holiday.png)")
    img = os.path.join(data, "img0.png")
    cap = ["caption", "--image", img, "--max_new_tokens", "4"]
    refused(sample.main, cap + ["--out", str(mine)], "did not write (holiday.png)")
    refused(sample.main, cap + ["--out", out], "holds what eval_unified.py wrote, not sample.py")
    caps = str(tmp_path / "caps")
    sample.main(cap + ["--out", caps])
    sample.main(cap + ["--out", caps])                                      # the same command again: overwritten
    sample.main(["caption", "--image", os.path.join(data, "img1.png"), "--max_new_tokens", "4", "--out", caps])
    assert sorted(os.listdir(caps)) == ["img0.txt", "img1.txt", runs.OUTPUTS]
    assert runs.read_outputs(caps) == {"tool": "sample.py", "written": ["img0.txt", "img1.txt"]}
    refused(ev.main, score[:-4] + ["--out_dir", caps, "--backbones", "pixel"], "holds what sample.py wrote")


def test_eval_settings_and_sampling_flags(data, tmp_path, no_load):
    out = str(tmp_path / "bench")
    base = ["--src", data, "--out_dir", out, "--backbones", "pixel"]
    for flags, msg in ((["--resolution", "-16"], "--resolution -16: must be >= 0"),
                       (["--resolution", "20"], "--resolution 20: must be 0"), (["--top_p", "0"], "--top_p 0"),
                       (["--temperature", "-1"], "--temperature -1"), (["--cfg", "nan"], "--cfg nan"),
                       (["--dtype", "fp16"], "--dtype 'fp16'"), (["--preset_sampling", "demo"], "--preset_sampling"),
                       (["--dist_timeout", "0"], "--dist_timeout 0"), (["--encoder", "/no/such"], "--encoder /no/such"),
                       (["--captions", str(tmp_path)], "no captions/<stem>.txt for 4 source image(s)")):
        refused(ev.main, base + flags, msg)
    for flags, msg in ((["--resolution", "-16"], "--resolution -16"), (["--top_p", "2"], "--top_p 2"),
                       (["--preset_sampling", "demo"], "--preset_sampling")):
        refused(sample.main, ["generate", "--prompt", "x", "--out", str(tmp_path / "g")] + flags, msg)
    assert sorted(os.listdir(tmp_path)) == []                               # nothing was created
    os.makedirs(out)
    ev.check_settings(ev.Args(src=data, out_dir=out, steps=2), rank=0)      # a first run pinned its settings
    runs.record_outputs(out, ev.TOOL, ev.WRITES)
    refused(ev.main, base + ["--steps", "3"], "holds reconstructions made with other settings")
    open(os.path.join(out, "settings.json"), "w").write("{torn")
    refused(ev.main, base + ["--steps", "2"], "settings.json is unreadable")


def test_default_reward_weights_are_looked_for_offline(data, tmp_path, monkeypatch, no_load):
    """--reward clip without --reward_path: its default weights must be in the local cache when the hub is offline;
    else one line with the flag to pass and the download command, before any model loads."""
    monkeypatch.setattr(reward, "is_offline_mode", lambda: True)
    monkeypatch.setattr(reward, "try_to_load_from_cache", lambda repo, f: None)
    out = str(tmp_path / "o")
    for fn, argv in ((S2.main, ["--data", data, "--reward", "clip", "--out_dir", out]),
                     (S3.main, ["--data", data, "--reward", "clip", "--out_dir", out]),
                     (S1.main, ["--data", data, "--objective", "sem", "--reward", "dinov2", "--out_dir", out])):
        line = refused(fn, argv, "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        assert "--reward_path DIR" in line and "hf download " in line
    refused(S2.main, ["--data", data, "--reward", "longclip", "--out_dir", out], "LongCLIP has no default download")
    line = refused(ev.main, ["--src", data, "--out_dir", out, "--backbones", "clip,pixel"], "--clip_path DIR")
    assert f"hf download {reward.CLIP_REPO}" in line
    assert not os.path.exists(out)
    monkeypatch.setattr(reward, "try_to_load_from_cache", lambda repo, f: f"/cache/{repo}/{f}")   # cached: fine
    assert S2.validate(runs.parse_args(S2.Args, ["--data", data, "--reward", "clip", "--out_dir", out])).reward == "clip"
    monkeypatch.setattr(reward, "is_offline_mode", lambda: False)                                   # online: fine
    monkeypatch.setattr(reward, "try_to_load_from_cache", lambda repo, f: None)
    assert S3.validate(runs.parse_args(S3.Args, ["--data", data, "--reward", "clip", "--out_dir", out]))


def corrupt_cache_run(run3, tmp_path):
    """A copy of run3 whose captions.jsonl eval_unified.py overwrote (what it did before it refused run folders)."""
    run = str(tmp_path / "run")
    shutil.copytree(run3, run, symlinks=True)
    with open(os.path.join(run, CC.CAPTION_CACHE), "w") as f:
        f.write(json.dumps({"name": "img0", "source": "img0.png", "caption": "a red square"}) + "\n")
    return run


def test_a_corrupt_caption_cache_is_refused_on_resume_with_what_to_do(run3, data, tmp_path, monkeypatch):
    run = corrupt_cache_run(run3, tmp_path)
    before = snapshot(run)
    resume = TINY3 + ["--data", data, "--out_dir", run, "--steps", "3", "--resume"]
    other = str(tmp_path / "other")                                     # a good cache of other sampling (--seed)
    shutil.copytree(run3, other, symlinks=True)
    with monkeypatch.context() as mp:
        mp.setattr(runs, "load_model", lambda *a, **k: pytest.fail("loaded before the cache was checked"))
        line = refused(S3.main, resume, f"{os.path.join(run, CC.CAPTION_CACHE)} is unreadable as a caption cache")
        assert "delete it and run the same command again" in line
        refused(S3.main, TINY3 + ["--data", data, "--out_dir", other, "--steps", "3", "--overwrite", "--seed", "1"],
                "holds captions of another run (this file's value, this run's): {'seed': (0, 1)}")
    assert snapshot(run) == before
    os.remove(os.path.join(run, CC.CAPTION_CACHE))                        # what the line says to do
    S3.main(resume)
    assert [d["step"] for d in logs(run)] == [1, 2, 3] and CC.is_caption_cache(os.path.join(run, CC.CAPTION_CACHE))


def test_tools_check_flags_and_paths_first(run3, tmp_path, capsys, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("mine")
    under = str(f / "x")
    # export: main returns the status after one line; --out a run (or a folder holding --init) is never replaced
    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    for argv, msg in ((["--init", run3, "--out", under], f"{f} is a file, not a folder"),
                      (["--init", run3, "--out", run3, "--overwrite"], "holds a training run"),
                      (["--init", run3, "--out", os.path.dirname(run3), "--overwrite"], "holds --init"),
                      (["--init", run3, "--out", str(tmp_path / "e"), "--top_p", "0"], "--top_p 0"),
                      (["--init", run3, "--out", str(tmp_path / "e"), "--bogus"], "unknown argument")):
        capsys.readouterr()
        assert export.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    # bench, demo, released: runs.cli's one line and exit 2 (demo's own, without importing runs)
    for fn, msg in ((lambda: bench.main(bench.p.parse_args(["--out", under + ".json"])), "is a file, not a folder"),
                    (lambda: bench.main(bench.p.parse_args(["--G", "1"])), "--G 1"),
                    (lambda: bench.main(bench.p.parse_args(["--iters", "x"])), "--iters: invalid int value"),
                    (lambda: bench.main(bench.p.parse_args(["--reward", "nope"])), "--reward 'nope'"),
                    (lambda: released.main([str(tmp_path / "nope"), str(tmp_path / "conv")]), "no such folder"),
                    (lambda: released.main([str(tmp_path), under]), "is a file, not a folder"),
                    (lambda: demo.main(["--out_dir", under]), "is a file, not a folder"),
                    (lambda: demo.main(["--rounds", "x"]), "--rounds: invalid int value"),
                    (lambda: demo.main(["--fresh", "-1", "--out_dir", str(tmp_path / "d")]), "--fresh -1: must be >= 0")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            runs.cli(fn)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["a-file"] and f.read_text() == "mine"


def test_sample_caption_under_a_file_is_one_line_before_the_caption(data, tmp_path):
    """The script itself: no caption printed, then a traceback; one line, exit 2."""
    f = tmp_path / "a-file"
    f.write_text("mine")
    r = _run("sample.py", "caption", "--image", os.path.join(data, "img0.png"), "--out", f / "caps",
             "--max_new_tokens", "4")
    _one_line(r, f"--out {f / 'caps'}: {f} is a file, not a folder")
    assert r.stdout == "" and f.read_text() == "mine"


def test_dist_timeout_is_checked_and_harmless_on_resume(data, tmp_path, no_load):
    out = str(tmp_path / "o")
    for fn, argv in stage_argv(data, out).items():
        refused(fn, argv + ["--dist_timeout", "0"], "--dist_timeout 0")
    assert "dist_timeout" in runs.RESUME_HARMLESS and not os.path.exists(out)


# ---------------------------------------------------------------------------------------------- two ranks

def sorted_images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


STALLER = """import os, sys, time
sys.path.insert(0, {root!r})
import images, runs
real, calls = images.ImageDataset.batch, [0]
def batch(self, idx):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:   # rank 1 blocks at its second batch (step 2), as in dead I/O
        open(os.environ["STALLED_AT"], "w").write(repr(time.time()))
        time.sleep(600)
    return real(self, idx)
images.ImageDataset.batch = batch
import stage3_grpo_gen as S
runs.cli(S.main)
"""


def test_a_stalled_rank_ends_the_job_named_and_bad_files_count_every_rank(data, tmp_path, tiny_paths):
    """2 gloo ranks; rank 1 meets an unreadable image at step 1 (rank 0 does not), then blocks at step 2. Step 1's
    log counts the bad file (every rank's); rank 0's collective of step 2 waits --dist_timeout, then the job ends
    with one line that names rank 1, within the timeout and a few seconds (torchrun stops rank 1). The tiny preset
    is built first (tiny_paths): two ranks building it at once can read it mid-publish."""
    imgs = str(tmp_path / "imgs")
    shutil.copytree(data, imgs)
    n, timeout_min = len(os.listdir(imgs)), 0.1
    bad = T.batch_indices(n, 1, 0, 0, rank=1, world=2)[0]                 # the image rank 1 draws at step 1
    assert bad not in T.batch_indices(n, 1, 0, 0, rank=0, world=2)
    open(sorted_images(imgs)[bad], "wb").write(b"not a png")
    script, stalled_at, out = tmp_path / "staller.py", tmp_path / "stalled_at", str(tmp_path / "run")
    script.write_text(STALLER.format(root=ROOT))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "STALLED_AT": str(stalled_at)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                        *TINY3, "--data", imgs, "--groups", "1", "--captions_per_image", "0", "--steps", "3",
                        "--dist_timeout", str(timeout_min), "--out_dir", out], capture_output=True, text=True, env=env,
                       timeout=300)
    end = time.time()
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode != 0 and len(ours) == 1, r.stderr[-3000:]
    assert ours[0].startswith("error: [rank 0] a collective of the 2 ranks failed after waiting up to --dist_timeout "
                              f"{timeout_min:g} min: rank 1 had not reached it (stalled or dead)"), ours[0]
    assert 'File "' + os.path.join(ROOT, "stage3") not in r.stderr                 # no traceback of ours
    waited = end - float(stalled_at.read_text())
    print(f"stalled-rank job: {end - t0:.1f} s in all, {waited:.1f} s from the stall to the end")
    assert waited < 60 * timeout_min + 30, waited
    assert [d.get("data/bad_files") for d in logs(out)] == [1]               # step 1, rank 1's bad file counted
