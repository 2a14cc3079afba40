"""The authors' release (released.py): a synthetic release -- the tiny model written in the released
layout and key names, as the demo's code would save and load it -- gives the same weights, seeded
captions and images as the same weights in this project's own checkpoint; a renamed, dropped or
reshaped key is an error naming it; eval and stages 2 and 3 run from `--init released:DIR`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import runs
import images
import checkpoint as ck
import model as M
from tools import released as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_release(m, tiny_encoder, tiny_decoder, out):
    """m: a tiny UAE with a DiT, a projector and live LoRAs (encoder: all-linear on .model, r 32, alpha 64;
    DiT: any) -> the release layout under out/Checkpoints, written the way the released code would."""
    from peft import LoraConfig, get_peft_model
    from diffusers import SD3Transformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    ck = os.path.join(out, "Checkpoints")
    # llm: Qwen2.5-VL saved with save_pretrained (legacy key names), the projector in the same state dict
    llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_encoder)
    llm.save_pretrained(f"{ck}/llm")
    t = load_file(f"{ck}/llm/model.safetensors")
    t.update({f"projector.{k}": v.clone() for k, v in m.projector.state_dict().items()})
    for k in ("model.norm.weight", "projector.0.bias"):  # llm_lora's copies must win, as in the demo's load order
        t[k] = t[k] + 1
    save_file(t, f"{ck}/llm/model.safetensors", metadata={"format": "pt"})
    cfg = json.load(open(f"{ck}/llm/config.json"))
    json.dump({**cfg, "architectures": ["Qwen2_5_VLWithLongContext"]}, open(f"{ck}/llm/config.json", "w"))
    # llm_lora: the whole state dict after get_peft_model wrapped the inner .model, in 3 shards
    llm.model = get_peft_model(llm.model, LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules="all-linear"))
    llm.projector = m.projector
    ours = M.lora_state(m.encoder)
    theirs = {k: v for k, v in llm.state_dict().items() if "lora_" in k}
    assert {k.replace("model.base_model.model.", "model.") for k in theirs} == set(ours)  # the same LoRA modules
    llm.load_state_dict({k: ours[k.replace("model.base_model.model.", "model.")] for k in theirs}, strict=False)
    sd = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    keys = sorted(sd)
    os.makedirs(f"{ck}/llm_lora")
    for i in range(3):
        save_file({k: sd[k] for k in keys[i::3]}, f"{ck}/llm_lora/model-0000{i + 1}-of-00003.safetensors", metadata={"format": "pt"})
    Qwen2_5_VLProcessor.from_pretrained(tiny_encoder).save_pretrained(f"{ck}/llm_model_preprocessor")
    # dit: the full DiT; dit_lora: a peft adapter folder on it
    dit = SD3Transformer2DModel.from_pretrained(tiny_decoder, subfolder="transformer")
    dit.load_state_dict({k.replace(".base_layer", ""): v for k, v in m.transformer.state_dict().items() if "lora_" not in k})
    dit.save_pretrained(f"{ck}/dit")
    cfg = m.layers_cfg["transformer"]
    pm = get_peft_model(dit, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"], init_lora_weights="gaussian"))
    ours = M.lora_state(m.transformer)
    pm.load_state_dict({f"base_model.model.{k}": v for k, v in ours.items()}, strict=False)
    assert {k[len("base_model.model."):] for k in pm.state_dict() if "lora_" in k} == set(ours)
    pm.save_pretrained(f"{ck}/dit_lora")
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_paths):
    """(release dir, native checkpoint dir, SD3 base dir) holding one set of random weights."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(1)
    m = runs.load_model(preset="tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a released DiT and projector unlike the base's
        for p in list(m.transformer.parameters()) + list(m.projector.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    linears = [f"model.{n}" for n, mod in m.encoder.model.named_modules() if isinstance(mod, nn.Linear)]
    m.layers_cfg = {"encoder": M.add_lora(m.encoder, 32, 64, linears), "transformer": M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)}
    with torch.no_grad():  # non-zero adapters (B starts at 0)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    native = str(root / "native")
    ck.save_checkpoint(native, m, {"stage": "test"}, m.layers_cfg, transformer_full=True)
    return write_release(m, *tiny_paths, str(root / "UAE")), native, tiny_paths[1]


def test_keys_of_every_known_spelling():
    k = R.encoder_key
    assert k("model.base_model.model.language_model.layers.3.self_attn.q_proj.lora_A.default.weight") == \
        ("lora_A", "model.language_model.layers.3.self_attn.q_proj")            # peft on .model, transformers >= 4.52
    assert k("model.base_model.model.layers.3.mlp.up_proj.lora_B.default.weight") == ("lora_B", "model.layers.3.mlp.up_proj")  # < 4.52
    assert k("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight") == ("lora_A", "model.layers.0.mlp.up_proj")  # peft file
    assert k("model.base_model.model.visual.blocks.0.attn.qkv.base_layer.bias") == ("param", "model.visual.blocks.0.attn.qkv.bias")
    assert k("projector.2.bias") == ("projector", "2.bias") and k("lm_head.weight") == ("param", "lm_head.weight")
    names = {"model.language_model.layers.3.mlp.up_proj", "model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"}
    assert R.to_model_name("model.layers.3.mlp.up_proj", names) == "model.language_model.layers.3.mlp.up_proj"
    assert R.to_model_name("visual.blocks.0.attn.qkv.weight", names) == "model.visual.blocks.0.attn.qkv.weight"
    assert R.to_model_name("lm_head.weight", names) == "lm_head.weight" and R.to_model_name("model.layers.9.x", names) is None


def test_release_equals_native(release, images):
    rel, native, sd3 = release
    a = runs.load_model(init=native)
    b = runs.load_model(init=f"released:{rel}", decoder=sd3)
    for part in ("encoder", "projector", "transformer"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert torch.equal(a.pooled, b.pooled)
    base = runs.load_model(preset="tiny")  # the release is not the base model: both LoRAs and the DiT are in
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.encoder.state_dict()[q], b.encoder.state_dict()[q])
    kw = dict(temperature=1.0, max_new_tokens=12)
    ca, cb = a.sample_captions_seeded(images, [3, 4], **kw).texts, b.sample_captions_seeded(images, [3, 4], **kw).texts
    assert ca == cb and any(ca)
    noise = torch.randn(2, *a.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.generate_images(ca, noise=noise, steps=2, cfg=3.0), b.generate_images(cb, noise=noise, steps=2, cfg=3.0))
    ckpt = R.converted(rel, sd3)  # the second use reuses the conversion
    stamp = os.stat(os.path.join(ckpt, "weights.safetensors")).st_mtime_ns
    assert R.converted(rel, sd3) == ckpt and os.stat(os.path.join(ckpt, "weights.safetensors")).st_mtime_ns == stamp
    meta = json.load(open(os.path.join(ckpt, "uae.json")))
    info = meta["released"]["llm_lora"]
    assert meta["stage"] == "released" and info["vision_lora"] and info["base_differing_from_llm"] == 1


def _edit(path, fn):
    t = load_file(path)
    fn(t)
    save_file(t, path, metadata={"format": "pt"})


def _rename(t, pick, new):
    k = next(k for k in sorted(t) if pick in k)
    t[k.replace(pick, new)] = t.pop(k)


LORA1, LORA2, LORA3 = (f"Checkpoints/llm_lora/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
DITL = "Checkpoints/dit_lora/adapter_model.safetensors"
BROKEN = {  # what is changed -> the words the error must contain
    "renamed LLM LoRA key": (LORA2, lambda t: _rename(t, "q_proj.lora_A", "q_prj.lora_A"), ["unknown", "q_prj.lora_A", "missing"]),
    "dropped LLM LoRA key": (LORA2, lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k)), ["missing", ".lora_B"]),
    "dropped base weight": (LORA2, lambda t: t.pop(next(k for k in sorted(t) if "norm" in k)), ["missing", "norm"]),
    "reshaped LoRA": (LORA2, lambda t: t.update({k: t[k][:8] for k in [k for k in sorted(t) if "lora_A" in k][:1]}), ["shape-mismatched", "(8,"]),
    "dropped projector": (["Checkpoints/llm/model.safetensors", LORA1, LORA2, LORA3], lambda t: t.pop("projector.2.bias", None),
                          ["missing", "2.bias"]),  # llm_lora holds the projector too (and wins)
    "renamed DiT LoRA key": (DITL, lambda t: _rename(t, "to_q.lora_B", "to_qq.lora_B"), ["unknown", "to_qq", "missing"]),
    "dropped DiT LoRA key": (DITL, lambda t: t.pop(sorted(t)[0]), ["missing", "transformer_blocks.0"]),
    "lost shard": (LORA3, None, ["missing", "model-00003-of-00003.safetensors"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_every_key_is_accounted_for(release, tmp_path, case):
    rel, _, sd3 = release
    path, edit, words = BROKEN[case]
    copy = shutil.copytree(rel, tmp_path / "UAE")
    for p in [path] if isinstance(path, str) else path:
        _edit(os.path.join(copy, p), edit) if edit else os.remove(os.path.join(copy, p))
    with pytest.raises(images.CheckpointError) as e:
        R.convert(str(copy), str(tmp_path / "out"), sd3)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not os.path.exists(tmp_path / "out")  # nothing half-written is left


@pytest.mark.slow
def test_scripts_run_from_release(release, tmp_path):
    rel, _, sd3 = release
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 48), (200, 40 * i, 30)).save(src / f"im{i}.png")
    def run(*args):
        p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    init = ["--init", f"released:{rel}", "--decoder", sd3]
    run("eval_unified.py", *init, "--src", src, "--out_dir", tmp_path / "bench", "--preset_sampling", "released",
        "--resolution", 64, "--steps", 2, "--max_new_tokens", 8, "--backbones", "pixel")
    settings = json.load(open(tmp_path / "bench" / "settings.json"))  # the preset, and the flags given win
    assert (settings["temperature"], settings["cfg"], settings["resolution"], settings["steps"]) == (0.7, 5.0, 64, 2)
    assert settings["instruction"] == R.RELEASED_INSTRUCTION
    assert json.load(open(tmp_path / "bench" / "unified_bench.json"))["summary"]["n"] == 2
    run("sample.py", "caption", *init, "--image", src / "im0.png", "--preset_sampling", "released", "--resolution", 64,
        "--max_new_tokens", 8, "--out", tmp_path / "caps")
    assert (tmp_path / "caps" / "im0.txt").is_file()
    tiny = ["--data", src, "--resolution", 32, "--G", 2, "--max_new_tokens", 8, "--sample_steps", 2, "--reward", "pixel",
            "--steps", 2, "--eval_every", 0, "--sample_every", 0, "--save_every", 100]
    run("stage2_grpo_und.py", *init, *tiny, "--batch_size", 1, "--micro_batch", 2, "--cfg", 1.0, "--out_dir", tmp_path / "s2")
    run("stage3_grpo_gen.py", *init, *tiny, "--groups", 1, "--eval_steps", 2, "--out_dir", tmp_path / "s3")
    for s in ("s2", "s3"):
        meta, _ = ck.read_checkpoint(str(tmp_path / s))
        assert meta["step"] == 2 and meta["base"]["encoder"].startswith(images.UAE_HOME), meta["base"]
