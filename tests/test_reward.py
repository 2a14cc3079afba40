"""reward.py: every backbone (tiny versions of the four bench ones + the pixel baseline) behind one interface."""
import os

import pytest
import torch

import reward
from reward import RewardError as CheckpointError
from tools import tiny

ALL = reward.BACKBONES  # clip, longclip, dinov2, dinov3, pixel


@pytest.fixture(scope="session")
def backbones():
    """name -> tiny backbone, built once under the test session's $UAE_HOME."""
    paths = tiny.tiny_backbone_paths()
    return {n: reward.load_backbone(n, paths.get(n)) for n in ALL}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two fresh builds with different seeds: seed -> name -> path."""
    root = tmp_path_factory.mktemp("tiny-bb")
    return {s: tiny.build_tiny_backbones(str(root / f"seed{s}"), seed=s) for s in (0, 1)}


def pair(seed=0, H=48, W=80):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, H, W, generator=g), torch.rand(2, 3, H, W, generator=g)


def halves(left, right, H=64, W=64):
    """(1, 3, H, W): colour `left` on the left half, `right` on the right."""
    x = torch.empty(1, 3, H, W)
    x[..., :W // 2], x[..., W // 2:] = torch.tensor(left).view(1, 3, 1, 1), torch.tensor(right).view(1, 3, 1, 1)
    return x


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_identical_images_score_one(backbones, name, hw):
    a, _ = pair(H=hw[0], W=hw[1])
    s = backbones[name].similarity(a, a.clone())
    assert s.shape == (2,)
    torch.testing.assert_close(s, torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_features_unit_norm_and_image_dependent(backbones, name):
    a, b = pair()
    fa, fb = backbones[name](a), backbones[name](b)
    assert fa.ndim == 2 and fa.shape[0] == 2 and fa.dtype == torch.float32
    torch.testing.assert_close(fa.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    assert (fa - fb).abs().max() > 1e-4  # features depend on the image


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_image_not_weights(backbones, name):
    bb = backbones[name]
    bb.train()  # must stay in eval mode
    assert not bb.training and all(not m.training for m in bb.modules())
    a, b = pair()
    x = a.clone().requires_grad_(True)
    bb.similarity(x, b).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert all(not p.requires_grad and p.grad is None for p in bb.parameters())


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
def test_tiny_save_load_round_trip(backbones, built, name):
    a, _ = pair(seed=3)
    f1 = reward.load_backbone(name, built[0][name])(a)
    f2 = reward.load_backbone(name, built[0][name])(a)
    assert torch.equal(f1, f2)  # loading twice from the saved files gives identical features
    assert torch.equal(f1, backbones[name](a))  # seeded: the same seed builds the same weights
    if name == "clip":  # open_clip's local-dir: schema is accepted too
        assert torch.equal(f1, reward.load_backbone(name, "local-dir:" + built[0][name])(a))
    f_other = reward.load_backbone(name, built[1][name])(a)
    assert (f1 - f_other).abs().max() > 1e-3  # the weights come from the files, not a fixed init


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
def test_tiny_is_small_and_safetensors_only(built, name):
    bb = reward.load_backbone(name, built[0][name])
    assert sum(p.numel() for p in bb.parameters()) < 300_000
    assert bb.size <= 64  # a tiny model reads its own small input size from its config
    p = built[0][name]
    files = os.listdir(p) if os.path.isdir(p) else [os.path.basename(p)]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith(reward.PICKLE_EXTS) for f in files)


def test_spec_preprocessing_per_backbone(backbones):
    """docs/algorithm.md §7: resize mode, interpolation and normalisation of each backbone."""
    c, lc, d2, d3 = (backbones[n] for n in reward.BENCH_BACKBONES)
    for bb in (c, lc):
        assert (bb.short, bb.interp, bb.mean, bb.std) == (bb.size, "bicubic", reward.CLIP_MEAN, reward.CLIP_STD)
    assert (d2.short, d2.interp, d2.mean) == (d2.size * 256 // 224, "bicubic", reward.IMAGENET_MEAN)
    assert (d3.short, d3.interp, d3.mean) == (None, "bilinear", reward.IMAGENET_MEAN)


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (150, 200), (224, 224), (227, 224)])
@pytest.mark.parametrize("size,short,interp", [(224, 224, "bicubic"), (224, 256, "bicubic"), (224, None, "bilinear")])
def test_preprocess_matches_torchvision(hw, size, short, interp):
    """Our tensor preprocessing == torchvision's Resize(short, antialias) + CenterCrop + Normalize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    mode = InterpolationMode.BICUBIC if interp == "bicubic" else InterpolationMode.BILINEAR
    ref = TF.resize(x, short if short else [size, size], interpolation=mode, antialias=True)
    ref = ref if ref.shape[-2:] == x.shape[-2:] else ref.clamp(0, 1)
    ref = TF.normalize(TF.center_crop(ref, [size, size]), list(reward.IMAGENET_MEAN), list(reward.IMAGENET_STD))
    out = reward.preprocess(x, size, short, interp, reward.IMAGENET_MEAN, reward.IMAGENET_STD)
    assert out.shape == (2, 3, size, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_pixel_baseline_discriminates():
    bb = reward.load_backbone("pixel")
    x = halves((0.9, 0.1, 0.1), (0.1, 0.1, 0.9))
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    swapped = halves((0.1, 0.1, 0.9), (0.9, 0.1, 0.1))  # same colours, other layout
    green = halves((0.1, 0.8, 0.1), (0.1, 0.8, 0.1))  # other colour
    s_noisy, s_swap, s_green = (bb.similarity(x, y).item() for y in (noisy, swapped, green))
    assert s_noisy > 0.99 and s_swap < 0.5 and s_green < 0.5
    grey = torch.full((1, 3, 16, 16), 0.5)  # all zeros after centring: still 1 with itself
    assert abs(bb.similarity(grey, grey).item() - 1) < 1e-5


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
def test_missing_checkpoint_names_backbone(tmp_path, name):
    missing = str(tmp_path / ("missing.safetensors" if name == "longclip" else "missing-dir"))
    with pytest.raises(CheckpointError, match=rf"{name} backbone.*missing.*\n.*To get them"):
        reward.load_backbone(name, missing)
    if name != "longclip":  # a directory without weights
        with pytest.raises(CheckpointError, match=f"{name} backbone"):
            reward.load_backbone(name, str(tmp_path))


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
def test_default_real_weights_offline_error(name):
    """HF_HUB_OFFLINE=1 and no cache: the real default fails with what to download and which flag to pass."""
    from huggingface_hub import try_to_load_from_cache
    repo = reward.REAL[name][0]
    if repo and isinstance(try_to_load_from_cache(repo, "config.json" if name.startswith("dino")
                                                  else "open_clip_config.json"), str):
        pytest.skip(f"{repo} is in the local HF cache")
    with pytest.raises(CheckpointError, match=rf"(?s){name} backbone.*To get them.*--{name}_path"):
        reward.load_backbone(name)


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
@pytest.mark.parametrize("ext", [".pt", ".bin"])
def test_pickle_checkpoints_refused(tmp_path, monkeypatch, backbones, name, ext):
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")
    f = tmp_path / f"weights{ext}"
    torch.save({"visual.proj": torch.zeros(2, 2)}, f)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=f"{name} backbone.*pickle"):
        reward.load_backbone(name, str(f))
    if name == "clip":  # an open_clip dir whose only weights are a pickle
        d = tmp_path / "clipdir"
        d.mkdir()
        tiny_clip = tiny.tiny_backbone_paths()["clip"]
        (d / "open_clip_config.json").write_text(open(os.path.join(tiny_clip, "open_clip_config.json")).read())
        os.rename(f, d / f"open_clip_pytorch_model{ext}")
        with pytest.raises(CheckpointError, match="clip backbone: no .safetensors.*refused"):
            reward.load_backbone("clip", str(d))


@pytest.mark.parametrize("name", reward.BENCH_BACKBONES)
def test_bf16_close_to_fp32(backbones, name):
    a, _ = pair()
    bb16 = reward.load_backbone(name, tiny.tiny_backbone_paths()[name], dtype=torch.bfloat16)
    f16 = bb16(a)
    assert f16.dtype == torch.float32 and next(bb16.parameters()).dtype == torch.bfloat16
    assert (f16 * backbones[name](a)).sum(-1).min() > 0.98


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        reward.load_backbone("siglip")
