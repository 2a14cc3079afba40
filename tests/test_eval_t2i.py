"""eval_t2i.py on the tiny preset: each benchmark's folder exactly as its official scorer reads it (the
scorers' own lookup rules, restated here: djghosh13/geneval evaluation/evaluate_images.py, Echo-4o's
Eval-gpt-4.1-geneval++.py, ELLA's dpg_bench/compute_dpg_bench.py), resume after a kill, 2 ranks = 1
rank byte for byte, malformed prompt files and foreign output folders refused by name before anything
loads."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_t2i as ev
import model
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--preset", "tiny", "--steps", "2"]
# GenEval lines as a file may hold them: a byte order mark, CRLF, raw UTF-8 and \u escapes, odd spacing
# and key order, no newline after the last line. Each must reach <index>/metadata.jsonl unchanged.
GENEVAL_LINES = [
    b'{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n',
    b'{"tag":"colors","include":[{"class":"cat","count":1,"color":"red"}],"prompt":"a photo of a red cat \\u00e9"}\r\n',
    '{"prompt":  "two dogs, caf\u00e9",   "tag": "counting", "exclude": [{"class": "dog", "count": 3}]}'.encode(),
]


def tree(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def geneval_file(folder):
    p = os.path.join(folder, "evaluation_metadata.jsonl")
    with open(p, "wb") as f:
        f.write(b"\xef\xbb\xbf" + b"".join(GENEVAL_LINES))
    return p


@pytest.fixture(scope="module")
def ge_one(tmp_path_factory, tiny_paths):
    """The GenEval prompts above, 2 samples each, one uninterrupted run in this process."""
    d = tmp_path_factory.mktemp("ge")
    prompts = geneval_file(str(d))
    argv = ["geneval", "--prompts", prompts, "--n_samples", "2", *FAST]
    ev.main(argv + ["--out", str(d / "one")])
    return {"prompts": prompts, "out": str(d / "one"), "argv": argv}


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model or starting ranks fails the test: what is checked must be checked before."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(model, "load_uae", boom)


# ---------------------------------------------------------------- layouts

def test_geneval_layout_as_its_scorer_reads_it(ge_one):
    out = ge_one["out"]
    assert sorted(os.listdir(out)) == [".eval_t2i.json", "00000", "00001", "00002"]
    found = {}
    for sub in os.listdir(out):  # evaluate_images.py: digit-named folders, metadata.jsonl, samples/\d+.png
        if not os.path.isdir(os.path.join(out, sub)) or not sub.isdigit():
            continue
        with open(os.path.join(out, sub, "metadata.jsonl")) as fp:
            meta = json.load(fp)
        names = sorted(x for x in os.listdir(os.path.join(out, sub, "samples")) if re.match(r"\d+\.png", x))
        found[sub] = (meta, names)
    assert sorted(found) == ["00000", "00001", "00002"]
    ims = {}
    for i, line in enumerate(GENEVAL_LINES):
        sub = f"{i:05d}"
        assert open(os.path.join(out, sub, "metadata.jsonl"), "rb").read() == line  # byte for byte (BOM dropped)
        meta, names = found[sub]
        assert meta == json.loads(line)
        assert names == ["0000.png", "0001.png"] and os.listdir(os.path.join(out, sub)) != ["grid.png"]
        assert sorted(os.listdir(os.path.join(out, sub))) == ["metadata.jsonl", "samples"]
        for k, name in enumerate(names):
            im = Image.open(os.path.join(out, sub, "samples", name))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            ims[i, k] = np.asarray(im)
    # a seed per (prompt, sample): no two images alike
    keys = sorted(ims)
    assert all(not np.array_equal(ims[a], ims[b]) for a in keys for b in keys if a < b)


def test_genevalpp_names_from_jsonl_and_txt_as_its_scorer_reads_them(tmp_path, tiny_paths):
    prompts = ["A photo of a brown bus, a green truck, and a red skateboard", "A photo of six clocks",
               "A photo of a larger cat on the above and a smaller laptop on the below"]
    jl = tmp_path / "Geneval++.jsonl"  # the scorer skips blank lines when it numbers prompts
    jl.write_text(json.dumps({"tag": "color_attr", "prompt": prompts[0]}) + "\n\n" +
                  "".join(json.dumps({"tag": "counting", "prompt": p}) + "\n" for p in prompts[1:]))
    txt = tmp_path / "Geneval++.txt"
    txt.write_text("\n".join(prompts) + "\n")
    outs = []
    for src in (jl, txt):
        outs.append(str(tmp_path / f"out_{src.suffix[1:]}"))
        ev.main(["geneval++", "--prompts", str(src), "--out", outs[-1], *FAST])
    image_dir = outs[0]  # Eval-gpt-4.1-geneval++.py: image_dir / f"{idx + 1}.jpg" over the non-blank lines
    lines = [json.loads(x.strip()) for x in open(jl) if x.strip()]
    for idx, meta in enumerate(lines):
        im = Image.open(os.path.join(image_dir, f"{idx + 1}.jpg"))
        assert im.format == "JPEG" and im.size == (64, 64)
    assert sorted(os.listdir(image_dir)) == [".eval_t2i.json", "1.jpg", "2.jpg", "3.jpg"]
    a, b = tree(outs[0]), tree(outs[1])
    assert {k: v for k, v in a.items() if k.endswith(".jpg")} == {k: v for k, v in b.items() if k.endswith(".jpg")}


def test_dpg_grid_as_its_scorer_crops_it(tmp_path, tiny_paths):
    src = tmp_path / "prompts"
    src.mkdir()
    (src / "whoops7.txt").write_text("An astronaut riding a horse in a snowy forest, photographed at dusk.")
    (src / "README.md").write_text("not a prompt")
    out = str(tmp_path / "dpg")
    ev.main(["dpg", "--prompts", str(src), "--out", out, *FAST])
    assert sorted(os.listdir(out)) == [".eval_t2i.json", "whoops7.png"]
    torch.manual_seed(0)
    m = runs.load_model(preset="tiny")
    args = runs.parse_args(ev.Args, ["--steps", "2"])
    res = 64  # compute_dpg_bench.py --resolution: one sample's size
    crops = [(0, 0, res, res), (res, 0, res * 2, res), (0, res, res, res * 2), (res, res, res * 2, res * 2)]
    for pid in ("whoops7",):
        grid = Image.open(os.path.join(out, f"{pid}.png"))
        assert grid.format == "PNG" and grid.size == (2 * res, 2 * res)
        assert os.path.basename(os.path.join(out, f"{pid}.png")).split(".")[0] == pid  # the scorer's key
        item = {"name": pid, "prompt": open(src / f"{pid}.txt").read().strip()}
        ims = ev.generate(m, "dpg", item, 4, res, args)
        for k, box in enumerate(crops):  # sample k is the scorer's k-th crop
            want = (ims[k].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            assert np.array_equal(np.asarray(grid.crop(box)), want), (pid, k)


# ---------------------------------------------------------------- resume, ranks

class Killed(BaseException):
    pass


def test_resume_after_a_kill_writes_the_remaining_prompts_only(tmp_path, ge_one, monkeypatch):
    out = str(tmp_path / "resumed")
    argv = ge_one["argv"] + ["--out", out]

    def kill(phase, item):  # prompt 00001's files are written, not yet published: the process dies here
        if phase == "written" and item["name"] == "00001":
            raise Killed
    monkeypatch.setattr(ev, "_crash_hook", kill)
    with pytest.raises(Killed):
        ev.main(argv)
    names = sorted(os.listdir(out))  # the marker, a leftover, prompt 00000
    assert len(names) == 3 and names[0] == ".eval_t2i.json" and names[1].startswith(".tmp-00001-") and names[2] == "00000"
    before = {f: (os.stat(os.path.join(out, "00000", f)).st_mtime_ns, os.stat(os.path.join(out, "00000", f)).st_ino)
              for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")}

    published = []
    monkeypatch.setattr(ev, "_crash_hook", lambda phase, item: phase == "published" and published.append(item["name"]))
    ev.main(argv)
    assert published == ["00001", "00002"]
    assert before == {f: (os.stat(os.path.join(out, "00000", f)).st_mtime_ns, os.stat(os.path.join(out, "00000", f)).st_ino)
                      for f in before}
    assert tree(out) == tree(ge_one["out"])  # the leftover is gone; same bytes as the uninterrupted run

    # a prompt whose output lost a file is generated again, and only it; a finished folder loads no model
    os.remove(os.path.join(out, "00002", "samples", "0001.png"))
    published.clear()
    ev.main(argv)
    assert published == ["00002"] and tree(out) == tree(ge_one["out"])
    monkeypatch.setattr(model, "load_uae", lambda *a, **k: pytest.fail("nothing was left to generate"))
    ev.main(argv)


@pytest.mark.slow
def test_two_ranks_write_the_same_bytes_as_one(tmp_path, ge_one):
    out = str(tmp_path / "two")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "eval_t2i.py"), *ge_one["argv"], "--out", out],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(rank 0: 2 of 3)" in r.stderr  # the prompts were split: rank 1 drew 00001
    one, two = tree(ge_one["out"]), tree(out)
    assert sorted(two) == sorted(one) and all(two[k] == one[k] for k in one), \
        [k for k in one if two.get(k) != one[k]]


# ---------------------------------------------------------------- refusals

BAD = [  # (benchmark, file name, content, what the one-line error must say right after the file's path)
    ("geneval", "meta.jsonl", b'{"tag": "a", "prompt": "x"}\n{"tag": "b", "prompt": "y",}\n', ":2: not a JSON line"),
    ("geneval", "meta.jsonl", b'{"tag": "a", "prompt": "x"}\n{"tag": "b"}\n{"tag": "c", "prompt": "z"}\n', ":2: no 'prompt' string"),
    ("geneval", "meta.jsonl", b'{"tag": "a", "prompt": "x"}\n\n{"tag": "c", "prompt": "z"}\n', ":2: blank line"),
    ("geneval", "meta.jsonl", b'{"tag": "a", "prompt": "x"}\n{"prompt": "y"}\n', ":2: no 'tag' string"),
    ("geneval", "meta.jsonl", b'["a photo of a bench"]\n', ":1: expected a JSON object"),
    ("geneval", "meta.jsonl", b'{"tag": "a", "prompt": "x"}\n{"tag": "b", "prompt": "caf\xe9"}\n', ":2: not UTF-8"),
    ("geneval++", "Geneval++.jsonl", b'{"prompt": "x"}\n\n{"prompt": 3}\n', ":3: no 'prompt' string"),
    ("geneval++", "Geneval++.txt", b"a photo of a cat\n\na photo of a dog\n", ":2: blank line"),
    ("dpg", "prompts/empty.txt", b"  \n", ":1: empty prompt"),
    ("dpg", "prompts/a.b.txt", b"a photo", ": the id 'a.b' has a '.'"),
]


@pytest.mark.parametrize("bench,name,content,want", BAD, ids=[f"{b}-{w.strip(':0123456789 ')[:16]}" for b, _, _, w in BAD])
def test_malformed_prompt_file_refused_by_file_and_line_before_loading(tmp_path, no_model, bench, name, content, want):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    if bench == "dpg":
        (path.parent / "fine.txt").write_text("a photo of a dog")
    prompts = str(path.parent if bench == "dpg" else path)
    with pytest.raises(runs.UsageError) as e:
        ev.main([bench, "--prompts", prompts, "--out", str(tmp_path / "out"), *FAST])
    msg = runs.one_line(e.value)
    assert f"{path}{want}" in msg, msg
    assert not (tmp_path / "out").exists()


def test_malformed_line_is_one_error_line_exit_2(tmp_path):
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_bytes(b'{"tag": "a", "prompt": "x"}\n{"tag": "b", "prompt": y}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval_t2i.py"), "geneval", "--prompts", str(bad),
                        "--out", str(tmp_path / "out"), *FAST], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {bad}:2: not a JSON line (Expecting value, column 24)"], r.stderr


def test_out_not_written_by_this_script_refused_by_name(tmp_path, ge_one, no_model):
    run = tmp_path / "stage3"  # a training run folder
    (run / "ckpt.000010").mkdir(parents=True)
    (run / "log.jsonl").write_text("{}\n")
    base = ge_one["argv"]
    with pytest.raises(runs.UsageError, match=r"stage3 holds files this script did not write \(ckpt.000010, log.jsonl\)"):
        ev.main(base + ["--out", str(run)])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(runs.UsageError, match="exists and is not a folder"):
        ev.main(base + ["--out", str(tmp_path / "afile")])
    ours = str(tmp_path / "ours")
    shutil.copytree(ge_one["out"], ours)
    with pytest.raises(runs.UsageError, match=r"other settings: --steps 2 \(now 3\)"):
        ev.main(base + ["--out", ours, "--steps", "3"])
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "p1.txt").write_text("a photo of a dog")
    with pytest.raises(runs.UsageError, match=r"holds geneval images, not dpg"):
        ev.main(["dpg", "--prompts", str(tmp_path / "dpg"), "--out", ours, *FAST])
    other = tmp_path / "other.jsonl"
    other.write_bytes(GENEVAL_LINES[0])
    with pytest.raises(runs.UsageError, match=r"other settings: .*the prompts \(was .*evaluation_metadata.jsonl, now .*other.jsonl"):
        ev.main(["geneval", "--prompts", str(other), "--n_samples", "2", *FAST, "--out", ours])
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    with pytest.raises(runs.UsageError, match=r"holds files this script did not write: notes.txt"):
        ev.main(base + ["--out", ours])
    # what ELLA's scorer writes into the image folder by default does not block a rerun there; elsewhere it does
    assert ev.ours("dpg", "dpg-bench_20250101-120000_results.txt") and ev.ours("dpg", "dpg-bench_x_results_detail.txt")
    assert not ev.ours("geneval", "dpg-bench_20250101-120000_results.txt") and not ev.ours("dpg", "notes.txt")


@pytest.mark.parametrize("bench,extra,want", [
    ("geneval", ["--bogus", "1"], "unknown argument(s): --bogus 1"),
    ("dpg", ["--n_samples", "2"], "--n_samples 2: dpg's scorer reads 4 image(s) a prompt"),
    ("geneval++", ["--n_samples", "4"], "--n_samples 4: geneval++'s scorer reads 1 image(s) a prompt"),
    ("geneval", ["--resolution", "50"], "--resolution 50: must be a multiple of 16"),
    ("geneval", ["--preset_sampling", "paper"], "--preset_sampling 'paper': known presets are released"),
])
def test_bad_flags_refused_before_loading(tmp_path, no_model, bench, extra, want):
    with pytest.raises(runs.UsageError) as e:
        ev.main([bench, "--prompts", str(tmp_path), "--out", str(tmp_path / "out"), *FAST, *extra])
    assert want in str(e.value)
