"""Stage 3's caption cache (--captions_per_image K): a cached run and an on-the-fly run given the same caption
per image train to the same weights; the cache holds K captions of exactly the images the run visits, is read
back instead of recomputed, refuses another run's file, and each image's K captions are used once per K epochs.
(2 ranks == 1 rank with the cache on, the default: tests/test_stage3.py::test_two_ranks_equal_one_rank.)"""
import json
import os

import pytest
import torch
from PIL import Image

from tools import tiny
import model as M
import caption_cache as CC
import stage3_grpo_gen as S
import training as T
from test_stage3 import TINY, lora_of, train_logs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 small PNGs (3 steps x 2 groups visit every one of them once)."""
    d = tmp_path_factory.mktemp("cache-data")
    for i in range(6):
        im = Image.new("RGB", (64, 64), (230, 30 + 30 * i, 30))
        im.paste((250, 220, 40), (5 + 8 * i, 40, 30 + 8 * i, 60))
        im.save(d / f"img{i}.png")
    return str(d)


def read_cache(out):
    lines = [json.loads(l) for l in open(os.path.join(out, CC.CAPTION_CACHE))]
    return lines[0], {d["i"]: d["captions"] for d in lines[1:]}


def test_cached_greedy_captions_train_to_the_same_weights(data, tmp_path):
    """Greedy captions (--temperature 0): the on-the-fly caption of an image is its cached one, so the two runs
    see the same conditions, samples and rewards and end bit-identical."""
    run = TINY + ["--data", data, "--groups", "2", "--steps", "3", "--temperature", "0"]
    a, b = str(tmp_path / "fly"), str(tmp_path / "cached")
    S.main(run + ["--captions_per_image", "0", "--out_dir", a])
    S.main(run + ["--captions_per_image", "1", "--out_dir", b])
    assert not os.path.exists(os.path.join(a, CC.CAPTION_CACHE))
    head, caps = read_cache(b)
    assert head["captions_per_image"] == 1 and sorted(caps) == list(range(6))
    la, lb = lora_of(a), lora_of(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert train_logs(a) == train_logs(b)
    assert any(v.abs().sum() > 0 for k, v in lb.items() if "lora_B" in k)   # it did train


def test_cached_k_captions_train_like_the_same_captions_on_the_fly(data, tmp_path, monkeypatch):
    """K = 3 sampled captions per image, the pick path included: an on-the-fly run whose caption source returns,
    at each visit, the caption the cache hands that visit trains to the same weights."""
    args = ["--data", data, "--groups", "2", "--steps", "4"]
    cached = str(tmp_path / "cached")
    S.main(TINY + args + ["--captions_per_image", "3", "--out_dir", cached])
    _, caps = read_cache(cached)
    assert all(len(c) == 3 for c in caps.values()) and len({t for c in caps.values() for t in c}) > 6
    ds_items = sorted(os.path.join(data, f) for f in os.listdir(data))
    seen = []

    def from_the_cache(m, x, seeds, args):  # the visits of step s, in the order main draws them
        step = len(seen)
        idx = T.batch_indices(len(ds_items), args.groups, step, args.seed)
        gids = [step * args.groups + k for k in range(args.groups)]
        seen.append(idx)
        return CC.pick_captions(caps, idx, [g // len(ds_items) for g in gids], args)

    monkeypatch.setattr(S, "caption_groups", from_the_cache)
    fly = str(tmp_path / "fly")
    S.main(TINY + args + ["--captions_per_image", "0", "--out_dir", fly])
    assert len(seen) == 4
    la, lb = lora_of(cached), lora_of(fly)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert train_logs(cached) == train_logs(fly)


def test_cache_is_read_back_extended_on_resume_and_refuses_another_run(data, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run = TINY + ["--data", data, "--groups", "2", "--captions_per_image", "2", "--out_dir", out]
    S.main(run + ["--steps", "1"])                                  # 2 of the 6 images visited: only they are captioned
    head, caps = read_cache(out)
    visited = CC.visited_images(6, 2, 1, 0)
    assert sorted(caps) == visited and len(visited) == 2 and all(len(c) == 2 for c in caps.values())
    assert head["n_images"] == 6 and head["temperature"] == 0.7 and head["encoder"] == tiny.tiny_paths()[0]
    S.main(run + ["--steps", "3", "--resume"])                     # 6 visited by step 3: the rest are added
    _, caps3 = read_cache(out)
    assert sorted(caps3) == list(range(6)) and all(caps3[i] == caps[i] for i in caps)

    def no_captioning(*a, **k):
        raise AssertionError("captioned again although the cache holds every visited image")

    monkeypatch.setattr(M.UAE, "sample_captions_seeded", no_captioning)
    S.main(run + ["--steps", "3", "--overwrite"])                  # a rerun in the same out_dir reads it back
    for flag, value in (("--captions_per_image", "3"), ("--temperature", "1.0"), ("--seed", "1"),
                        ("--instruction", "released"), ("--instruction_first", "true")):
        with pytest.raises(CC.CaptionCacheError, match=flag.lstrip("-")):
            S.main(run + ["--steps", "3", flag, value, "--overwrite"])
    path = os.path.join(out, CC.CAPTION_CACHE)                   # a file written before the header named the order
    lines = open(path).read().splitlines()
    head = json.loads(lines[0])
    assert head.pop("instruction_first") is False
    open(path, "w").write("\n".join([json.dumps(head)] + lines[1:]) + "\n")
    S.main(run + ["--steps", "3", "--overwrite"])                  # read back: it was made with the image first
    with pytest.raises(CC.CaptionCacheError, match="instruction_first"):
        S.main(run + ["--steps", "3", "--instruction_first", "true", "--overwrite"])
    monkeypatch.undo()
    other = tmp_path / "other-data"                                # another image list, same out_dir
    other.mkdir()
    Image.open(os.path.join(data, "img0.png")).save(other / "img0.png")
    with pytest.raises(CC.CaptionCacheError, match="n_images"):
        S.main(TINY + ["--data", str(other), "--groups", "2", "--captions_per_image", "2", "--out_dir", out, "--steps", "1",
                       "--overwrite"])
    with open(os.path.join(out, CC.CAPTION_CACHE), "a") as f:
        f.write("{not json\n")
    with pytest.raises(CC.CaptionCacheError, match="unreadable"):
        S.main(run + ["--steps", "3", "--overwrite"])


def test_visited_images_are_the_batches_of_the_run():
    for n, g, steps, off in ((10, 2, 3, 0), (10, 4, 3, 0), (7, 3, 5, 0), (5, 1, 5, 0), (10, 3, 2, 2), (10, 2, 3, 4),
                             (9, 4, 1, 2), (7, 3, 2, 1)):  # with --step_offset: within an epoch and across two
        want = sorted({i for s in range(off, off + steps) for i in T.batch_indices(n, g, s, 0)})
        assert CC.visited_images(n, g, steps, 0, off) == want, (n, g, steps, off)


def test_each_of_k_captions_once_per_k_epochs():
    for K in (1, 3, 8):
        for key in (0, 5):
            picks = [CC.caption_pick(0, key, e, K) for e in range(3 * K)]
            for c in range(3):
                assert sorted(picks[c * K:(c + 1) * K]) == list(range(K))
    assert [CC.caption_pick(0, 0, e, 8) for e in range(8)] != [CC.caption_pick(0, 1, e, 8) for e in range(8)]
    assert [CC.caption_pick(0, 0, e, 8) for e in range(8)] != list(range(8))


def test_an_unreadable_image_uses_the_captions_of_the_one_that_replaces_it(data, tmp_path):
    d = tmp_path / "with-bad"
    d.mkdir()
    for i in (0, 2, 3):
        Image.open(os.path.join(data, f"img{i}.png")).save(d / f"img{i}.png")
    (d / "img1.png").write_bytes(b"not an image")               # index 1: ds.batch hands image 2 instead
    out = str(tmp_path / "run")
    S.main(TINY + ["--data", str(d), "--groups", "2", "--steps", "2", "--captions_per_image", "2", "--out_dir", out])
    _, caps = read_cache(out)
    assert sorted(caps) == [0, 2, 3]
    assert len(train_logs(out)) == 2 and train_logs(out)[-1]["data/bad_files"] == 1
