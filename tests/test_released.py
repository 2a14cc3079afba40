"""The authors' release (released.py): a synthetic release -- the tiny model written in the released
layout and key names, as the demo's code would save and load it -- gives the same weights, seeded
captions and images as the same weights in this project's own checkpoint; a renamed, dropped or
reshaped key is an error naming it; eval and stages 2 and 3 run from `--init released:DIR`, the RL stages
on the release's own prompt. `sample.py --preset_sampling released` gives the captions and images of the
authors' inference demo, re-implemented here with plain transformers, diffusers and peft (DemoRelease)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import runs
import training as T
import images
import checkpoint as ck
import model as M
from tools import released as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Qwen2.5-VL-3B-Instruct's first published generation_config.json (its sampling fields): near-greedy
QWEN_GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def write_release(m, tiny_encoder, tiny_decoder, out):
    """m: a tiny UAE with a DiT, a projector and live LoRAs (encoder: all-linear on .model, r 32, alpha 64;
    DiT: any) -> the release layout under out/Checkpoints, written the way the released code would, with
    a Qwen-style llm/generation_config.json and SD3/ (the base's VAE, scheduler, CLIP text encoders)."""
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
    tc = cfg["text_config"]  # as Qwen's file: bos/pad <|endoftext|>, eos <|im_end|> and <|endoftext|>
    json.dump({"bos_token_id": tc["bos_token_id"], "pad_token_id": tc["pad_token_id"],
               "eos_token_id": [tc["eos_token_id"], tc["bos_token_id"]], **QWEN_GENERATION_CONFIG},
              open(f"{ck}/llm/generation_config.json", "w"), indent=1)
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
    # SD3/: the base's folder as the demo loads it (StableDiffusion3Pipeline.from_pretrained); the tiny base has
    # no T5 (the demo reads only the CLIP pooled embedding of "" from the text encoders)
    for sub in ("vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(tiny_decoder, sub), f"{ck}/SD3/{sub}")
    diffusers_classes = ("AutoencoderKL", "FlowMatchEulerDiscreteScheduler", "SD3Transformer2DModel")
    lib = lambda name: ["diffusers" if name in diffusers_classes else "transformers", name]
    json.dump({"_class_name": "StableDiffusion3Pipeline", "vae": lib("AutoencoderKL"),
               "scheduler": lib("FlowMatchEulerDiscreteScheduler"), "transformer": lib("SD3Transformer2DModel"),
               "text_encoder": lib("CLIPTextModelWithProjection"), "text_encoder_2": lib("CLIPTextModelWithProjection"),
               "tokenizer": lib("CLIPTokenizer"), "tokenizer_2": lib("CLIPTokenizer"), "text_encoder_3": [None, None],
               "tokenizer_3": [None, None]},
              open(f"{ck}/SD3/model_index.json", "w"), indent=1)
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


def test_locate_uses_sd3_inside_and_falls_back_to_the_base_processor(release, tiny_paths, tmp_path, monkeypatch,
                                                                      capsys):
    rel, _, sd3 = release
    p = R.locate(rel)
    assert p["sd3"] == os.path.join(rel, "Checkpoints", "SD3") and p["processor"].endswith("llm_model_preprocessor")
    assert R.locate(rel, sd3=sd3)["sd3"] == sd3                                 # --decoder wins
    assert "base model" not in capsys.readouterr().out
    copy = shutil.copytree(rel, tmp_path / "UAE")                               # a processor without its tokenizer
    os.remove(copy / "Checkpoints" / "llm_model_preprocessor" / "tokenizer.json")
    monkeypatch.setattr(R, "BASE_PROCESSOR", tiny_paths[0])                     # the hub's Qwen, offline
    out = R.convert(str(copy), str(tmp_path / "out"))
    said = capsys.readouterr().out
    assert f"using {tiny_paths[0]}, the base model's" in said and "llm_model_preprocessor" in said
    assert os.path.isfile(os.path.join(out, "encoder", "tokenizer.json"))
    # the llm's generation_config.json travels as it is: the preset merges it as the demo's generate() does
    rel_gc = open(copy / "Checkpoints" / "llm" / "generation_config.json").read()
    assert open(os.path.join(out, "encoder", "generation_config.json")).read() == rel_gc
    assert json.loads(rel_gc)["top_k"] == QWEN_GENERATION_CONFIG["top_k"]


def test_qwen_resize_rule_is_the_published_one(tmp_path):
    """qwen_vl_utils' constants and smart_resize (values its published smart_resize(h, w, factor=28) returns),
    and qwen_image: that size, alpha on white, no crop."""
    assert (R.QWEN_FACTOR, R.QWEN_MIN_PIXELS, R.QWEN_MAX_PIXELS, R.QWEN_MAX_RATIO) == (28, 3136, 12845056, 200)
    cases = {(48, 48): (56, 56), (40, 100): (28, 112), (4000, 6000): (2912, 4368), (21, 13): (84, 56),
             (64, 96): (56, 84), (1080, 1920): (1092, 1932), (50, 70): (56, 56), (28, 5000): (28, 5012)}
    assert {hw: R.smart_resize(*hw) for hw in cases} == cases
    with pytest.raises(images.ImageError, match="aspect ratio"):
        R.smart_resize(10, 2500)
    im = Image.new("RGBA", (100, 40), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 50, 40))
    im.save(tmp_path / "a.png")
    q = R.qwen_image(str(tmp_path / "a.png"))
    assert q.mode == "RGB" and q.size == (112, 28)                              # (w, h): the whole image, resized
    assert q.getpixel((100, 14)) == (255, 255, 255) and q.getpixel((10, 14)) == (0, 0, 255)


QWEN_NOW = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06}  # the hub file today (sampling fields)


@pytest.mark.parametrize("file, top_k", [(QWEN_GENERATION_CONFIG, 1), (QWEN_NOW, 50), ({}, 50)],
                         ids=["first", "now", "none"])
def test_generation_settings_are_what_transformers_merges(tiny_paths, file, top_k):
    """Sampling.effective (the start line) = the config transformers' generate() runs with, for the demo's call
    and with flags; which generation_config.json the release carries decides whether its captions are greedy."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_paths[0])
    enc.generation_config = GenerationConfig(**file)
    flags = R.Sampling(temperature=0.3, top_k=5, top_p=0.9, repetition_penalty=1.2)
    for s in (R.Sampling(), flags, R.Sampling(temperature=0)):
        got = enc._prepare_generation_config(None, **s.generate_kwargs())[0]
        eff = s.effective(enc.generation_config)
        assert {k: v for k, (v, _) in eff.items()} == {k: getattr(got, k) for k in eff}, (file, s)
    eff = R.Sampling().effective(enc.generation_config)  # the demo's call: greedy only under the first file
    assert eff["top_k"][0] == top_k and eff["temperature"] == (0.7, "call") and eff["do_sample"] == (True, "call")
    assert eff["repetition_penalty"][0] == file.get("repetition_penalty", 1.0)


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
    # the same calls in both scripts (the release's generation config is greedy: the caption seeds do not matter)
    assert open(tmp_path / "caps" / "im0.txt").read() == open(tmp_path / "bench" / "captions" / "im0.txt").read() + "\n"
    tiny = ["--data", src, "--resolution", 32, "--G", 2, "--max_new_tokens", 8, "--sample_steps", 2, "--reward", "pixel",
            "--steps", 2, "--eval_every", 0, "--sample_every", 0, "--save_every", 100,
            "--instruction", "released", "--instruction_first", "true"]          # RL on the release's own prompt
    s2 = [*init, *tiny, "--batch_size", 1, "--micro_batch", 2, "--cfg", 1.0, "--out_dir", tmp_path / "s2"]
    run("stage2_grpo_und.py", *s2)
    run("stage3_grpo_gen.py", *init, *tiny, "--groups", 1, "--eval_steps", 2, "--out_dir", tmp_path / "s3")
    for s in ("s2", "s3"):
        meta, _ = ck.read_checkpoint(str(tmp_path / s))
        assert meta["step"] == 2 and meta["base"]["encoder"].startswith(images.UAE_HOME), meta["base"]
        assert (meta["args"]["instruction"], meta["args"]["instruction_first"]) == ("released", True)
    head = json.loads(open(tmp_path / "s3" / "captions.jsonl").readline())
    assert (head["instruction"], head["instruction_first"]) == (M.RELEASED_INSTRUCTION, True)
    for flag, value in (("--instruction", ""), ("--instruction_first", "false")):  # --resume keeps the prompt
        p = subprocess.run([sys.executable, "stage2_grpo_und.py", *map(str, s2), "--steps", "3", "--resume", flag,
                            value], capture_output=True, text=True, cwd=ROOT, timeout=600)
        said = p.stderr
        assert p.returncode == 2 and f"{flag} " in said and "trained with other settings" in said, said[-2000:]


def test_rl_stages_caption_on_the_prompt_they_are_given(tmp_path, monkeypatch):
    """--instruction / --instruction_first reach every captioning call of stages 2 and 3 (rollouts, the caption
    cache, fresh captions, the fixed evals)."""
    import stage2_grpo_und as S2
    import stage3_grpo_gen as S3
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (200, 60 * i, 30)).save(src / f"im{i}.png")
    seen, orig = [], M.UAE.caption_inputs
    monkeypatch.setattr(M.UAE, "caption_inputs", lambda self, x, instruction=M.INSTRUCTION, instruction_first=False:
                        seen.append((instruction, instruction_first)) or orig(self, x, instruction, instruction_first))
    tiny = ["--preset", "tiny", "--data", str(src), "--resolution", "32", "--G", "2", "--max_new_tokens", "4",
            "--sample_steps", "2", "--reward", "pixel", "--steps", "1", "--eval_every", "1", "--eval_images", "1",
            "--sample_every", "0", "--instruction", "released", "--instruction_first", "true"]
    S2.main(tiny + ["--eval_G", "2", "--cfg", "1.0", "--out_dir", str(tmp_path / "s2")])
    n2 = len(seen)
    for k in ("2", "0"):  # the cache, and a fresh caption at every visit
        S3.main(tiny + ["--eval_steps", "2", "--captions_per_image", k, "--out_dir", str(tmp_path / f"s3-{k}")])
    assert n2 >= 2 and len(seen) >= n2 + 4 and set(seen) == {(M.RELEASED_INSTRUCTION, True)}


# ---------------------------------------------------------------------------------------------- the demo, exactly
# The authors' inference demo (github.com/PKU-YuanGroup/UAE: load_models, gen_prompt, get_prompt_embeds, gen_image),
# its calls re-implemented with plain transformers, diffusers and peft, none of this repository's code; the tiny
# model's sizes in place of the real ones (projector width, 64 px output instead of 1024).

def qwen_fetch_image(path):
    """qwen_vl_utils.process_vision_info for one {"image": path}: fetch_image (PIL, alpha on white, smart_resize to
    multiples of patch x merge within its published minimum and maximum token counts, PIL's default resize)."""
    im = Image.open(path)
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[3])
        im = bg
    else:
        im = im.convert("RGB")
    f, lo, hi = 28, 4 * 28 * 28, 16384 * 28 * 28
    w, h = im.size
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > hi:
        beta = (h * w / hi) ** 0.5
        hb, wb = int(h / beta // f) * f, int(w / beta // f) * f
    elif hb * wb < lo:
        beta = (lo / (h * w)) ** 0.5
        hb, wb = -(-h * beta // f) * f, -(-w * beta // f) * f
    return im.resize((int(wb), int(hb)))


class DemoRelease:
    """load_models + gen_prompt + get_prompt_embeds + gen_image of the demo, on a release folder."""

    def __init__(self, release, size, dtype=torch.float32):
        from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import (AutoProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                  Qwen2_5_VLForConditionalGeneration)
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
        c = os.path.join(release, "Checkpoints")
        jd = json.load(open(f"{c}/dit/config.json"))["joint_attention_dim"]

        class LongContext(Qwen2_5_VLForConditionalGeneration):  # Qwen2_5_VLWithLongContext: the projector inside
            def __init__(self, config):
                super().__init__(config)
                h = config.text_config.hidden_size
                self.projector = nn.Sequential(nn.Linear(h, 2 * jd), nn.GELU(), nn.Linear(2 * jd, jd))

            def get_projected_embeddings(self, input_ids=None, attention_mask=None, **kw):
                out = super().forward(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                      return_dict=True, **kw)
                return self.projector(out.hidden_states[-1])

        # the transformers of the demo's time read the legacy key names save_pretrained writes into a subclass too;
        # transformers >= 5 does only for classes registered so (without it: a random LLM, and a warning)
        register_checkpoint_conversion_mapping(
            "LongContext", get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"), overwrite=True)
        self.llm = LongContext.from_pretrained(f"{c}/llm", dtype=dtype)
        self.llm.model = get_peft_model(self.llm.model, LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian",
                                                                   target_modules="all-linear"))
        sd = {}
        for i in range(1, 4):
            sd.update(load_file(f"{c}/llm_lora/model-0000{i}-of-00003.safetensors"))
        self.llm.load_state_dict(sd, strict=False)
        self.llm.eval()
        self.processor = AutoProcessor.from_pretrained(f"{c}/llm_model_preprocessor")
        transformer = SD3Transformer2DModel.from_pretrained(f"{c}/dit", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(f"{c}/SD3", subfolder="vae", torch_dtype=dtype)
        pooled = []  # encode_prompt(..., prompt="") -> pooled: CLIP-L and CLIP-G text_embeds of "", concatenated
        for te, tk in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            tok = CLIPTokenizer.from_pretrained(f"{c}/SD3", subfolder=tk)
            enc = CLIPTextModelWithProjection.from_pretrained(f"{c}/SD3", subfolder=te, torch_dtype=dtype)
            ids = tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                pooled.append(enc(ids, output_hidden_states=True)[0])
        self.pooled = torch.cat(pooled, -1)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            f"{c}/SD3", vae=vae, transformer=transformer, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
            tokenizer_3=None, torch_dtype=dtype)  # tokenizer_3: the tiny SD3/ has no T5 (unused with prompt_embeds)
        self.pipe.transformer = PeftModel.from_pretrained(self.pipe.transformer, f"{c}/dit_lora")
        self.pipe.set_progress_bar_config(disable=True)
        self.size = size

    @torch.no_grad()
    def gen_prompt(self, path):
        messages = [{"role": "user", "content": [{"type": "text", "text": M.RELEASED_INSTRUCTION},
                                                 {"type": "image", "image": path}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[qwen_fetch_image(path)], videos=None, return_tensors="pt",
                                padding=True)
        ids = self.llm.generate(**inputs, max_new_tokens=512, do_sample=True, temperature=0.7)
        new = [o[len(i):] for i, o in zip(inputs.input_ids, ids)]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]

    @torch.no_grad()
    def get_prompt_embeds(self, prompt):
        def input_ids(p):
            msgs = [{"role": "generate", "content": [{"type": "text", "text": p}]}]
            text = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.processor.tokenizer.encode(text, return_tensors="pt")[0]
        pad = self.processor.tokenizer.pad_token_id
        ids = nn.utils.rnn.pad_sequence([input_ids(M.NEGATIVE_PROMPT), input_ids(prompt)], batch_first=True,
                                        padding_value=pad)
        return self.llm.get_projected_embeddings(input_ids=ids, attention_mask=ids.ne(pad)).chunk(2, dim=0)

    @torch.no_grad()
    def gen_image(self, text, seed=42):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        neg, pos = self.get_prompt_embeds(text)
        return self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=self.pooled,
                         negative_pooled_prompt_embeds=self.pooled, height=self.size, width=self.size,
                         num_inference_steps=40, guidance_scale=5.0, generator=generator).images[0]


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """A non-square image, a square one and noise, at small sizes."""
    d = tmp_path_factory.mktemp("demo-images")
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 72), indexing="ij")
    wide = torch.stack([xx, yy, 1 - xx * yy]) * 255
    Image.fromarray(wide.permute(1, 2, 0).round().byte().numpy()).save(d / "wide.png")
    sq = Image.new("RGB", (48, 48), (30, 90, 200))
    sq.paste((240, 200, 20), (8, 12, 30, 40))
    sq.save(d / "square.png")
    Image.fromarray(torch.randint(0, 256, (52, 36, 3), generator=g, dtype=torch.uint8).numpy()).save(d / "noise.png")
    return {k: str(d / f"{k}.png") for k in ("wide", "square", "noise")}


@pytest.mark.slow
def test_sample_py_released_is_the_demo(release, demo_images, tmp_path, capsys):
    """sample.py caption | reconstruct | generate --init released:DIR --preset_sampling released, no other flag:
    the demo's captions exactly and its images within 2/255 (the release carries Qwen's first published
    generation_config.json and SD3/)."""
    import sample
    rel = release[0]
    demo = DemoRelease(rel, 64)
    init = ["--init", f"released:{rel}", "--preset_sampling", "released"]
    for name, path in demo_images.items():
        sample.main(["caption", *init, "--image", path, "--out", str(tmp_path / "caps")])
        want = demo.gen_prompt(path)
        assert open(tmp_path / "caps" / f"{name}.txt").read() == want + "\n", name
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("released sampling:"))
    assert "top_k=1 (generation_config.json)" in line and "repetition_penalty=1.05 (generation_config.json)" in line
    assert "temperature=0.7 (call)" in line and ": greedy" in line
    sample.main(["reconstruct", *init, "--image", demo_images["wide"], "--out", str(tmp_path / "rec")])
    text = open(tmp_path / "rec" / "wide_caption.txt").read()[:-1]
    assert text == demo.gen_prompt(demo_images["wide"]) and text
    ours = np.asarray(Image.open(tmp_path / "rec" / "wide_recon.png"), dtype=np.int16)
    theirs = np.asarray(demo.gen_image(text), dtype=np.int16)
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 2
    prompt = "a red circle at the top left of a blue background"
    sample.main(["generate", *init, "--prompt", prompt, "--out", str(tmp_path / "gen.png")])
    ours = np.asarray(Image.open(tmp_path / "gen.png"), dtype=np.int16)
    theirs = np.asarray(demo.gen_image(prompt), dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 2 and theirs.std() > 5  # an image, not a flat field
    # eval_t2i.py makes the same call, each sample under its own seed (the demo's one seed would repeat it)
    import eval_t2i
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [], "prompt": prompt}) + "\n")
    eval_t2i.main(["geneval", *init, "--prompts", str(meta), "--out", str(tmp_path / "t2i"), "--n_samples", "2"])
    for k in range(2):
        ours = np.asarray(Image.open(tmp_path / "t2i" / "00000" / "samples" / f"{k:04d}.png"), dtype=np.int16)
        theirs = np.asarray(demo.gen_image(prompt, seed=T.seed_of(42, "geneval", "00000", k)), dtype=np.int16)
        assert np.abs(ours - theirs).max() <= 2, k
