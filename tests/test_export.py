"""export.py: the exported encoder, decoder and adapters, loaded with plain transformers / diffusers / peft,
give what the run's own model gives (seeded captions exactly; images to 1e-4 in fp32)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import runs
import checkpoint as ck
from tools import export
import images
import model as M

STEPS, MAX_NEW = 4, 16
TOL = 1e-4  # fp32, max abs difference of images in [0, 1] and of latents


def randomize_lora(mod, seed):
    """peft initialises lora_B to 0 (a no-op adapter): give it weights that change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in mod.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def stage(path, init, seed, transformer_full=False):
    """A stage's checkpoint: load `init` (earlier layers merged), add a fresh encoder + DiT LoRA, save it live."""
    m = runs.load_model(init=init) if init else runs.load_model(preset="tiny")
    if transformer_full:  # a --dit_full lineage: the DiT's own weights are trained too
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.transformer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    torch.manual_seed(seed)
    cfg = {"encoder": M.add_lora(m.encoder, 4, 8, M.ENCODER_LORA_TARGETS),
           "transformer": M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)}
    randomize_lora(m.encoder, seed + 100)
    randomize_lora(m.transformer, seed + 200)
    os.makedirs(path, exist_ok=True)
    ck.save_checkpoint(os.path.join(path, "ckpt"), m, {"stage": f"s{seed}", "step": seed}, cfg, transformer_full)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_paths):
    """Two stages: layer 0 (encoder + DiT LoRA) is merged when loaded, layer 1 (encoder + DiT LoRA) is live."""
    d = tmp_path_factory.mktemp("run")
    return stage(d / "s2", stage(d / "s1", None, 1), 2)


def do_export(tmp_path_factory, init, *flags):
    out = str(tmp_path_factory.mktemp("export") / "out")
    assert export.main(["--init", init, "--out", out, "--max_new_tokens", str(MAX_NEW), "--steps", str(STEPS),
                        *flags]) == 0
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".export-")]  # temp folder gone
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory, run):
    return do_export(tmp_path_factory, run, "--cfg", "1")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, run):
    return do_export(tmp_path_factory, run, "--keep_adapters", "--cfg", "5")


@pytest.fixture(scope="module")
def pics():
    """Two 64-px images as uint8 (what a PNG holds) and as the [0, 1] floats UAE takes."""
    u8 = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return u8, u8.float() / 255


def plain_encoder(d, adapter=False):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{d}/encoder")
    if adapter:
        from peft import PeftModel
        enc = PeftModel.from_pretrained(enc, f"{d}/encoder/adapter")
    return enc, AutoProcessor.from_pretrained(f"{d}/encoder")


def plain_captions(enc, proc, u8, seeds):
    """Plain transformers: chat template, processor on PIL images, generate() with the exported config."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": M.INSTRUCTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    out = []
    for im, seed in zip(u8, seeds):
        inputs = proc(text=[text], images=[Image.fromarray(im.permute(1, 2, 0).numpy())], return_tensors="pt")
        torch.manual_seed(seed)
        out.append(enc.generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def same_ids(plain, r):
    """plain generate() rows == the Rollout's completions up to and including the first EOS."""
    for b, ids in enumerate(plain):
        n = int(r.completion_mask[b].sum())
        assert ids == r.completion_ids[b, :n].tolist(), b


NONE = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"])


def pipeline(d, adapter=False):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    if not adapter:
        return StableDiffusion3Pipeline.from_pretrained(f"{d}/decoder", **NONE)
    from peft import PeftModel
    tr = SD3Transformer2DModel.from_pretrained(f"{d}/decoder", subfolder="transformer")
    tr = PeftModel.from_pretrained(tr, f"{d}/decoder/transformer_lora").get_base_model()
    return StableDiffusion3Pipeline.from_pretrained(f"{d}/decoder", transformer=tr, **NONE)


def draw(pipe, cond, neg=None, cfg=1.0, seed=7, **kw):
    """The pipeline from our condition; the same noise as UAE.generate_images(seed=seed) (CPU generator)."""
    extra = dict(negative_prompt_embeds=neg.emb, negative_pooled_prompt_embeds=neg.pooled) if neg else {}
    return pipe(prompt_embeds=cond.emb, pooled_prompt_embeds=cond.pooled, guidance_scale=cfg, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type=kw.pop("output_type", "pt"),
                **extra, **kw).images


CAPTION = "a red circle at the top left of a blue background"


def test_encoder_round_trip(run, merged, pics):
    """The merged encoder, loaded with plain transformers, samples the run's seeded captions token for token."""
    u8, x = pics
    m = runs.load_model(init=run)
    r = m.sample_captions_seeded(x, [3, 4], temperature=0.7, max_new_tokens=MAX_NEW)
    enc, proc = plain_encoder(merged)
    same_ids(plain_captions(enc, proc, u8, [3, 4]), r)
    assert all(r.texts) and r.texts[0] != r.texts[1]
    base = runs.load_model(preset="tiny")  # and it is not the base model: the LoRAs are in it
    k = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(enc.state_dict()[k], base.encoder.state_dict()[k])
    assert torch.equal(enc.state_dict()[k], m.encoder.state_dict()[k])


def test_decoder_round_trip_cfg1(run, merged):
    """StableDiffusion3Pipeline (SD3's own attention) given our condition == UAE.generate_images at CFG 1:
    the same sigmas, Euler steps and VAE decode; latents and images compared."""
    m = runs.load_model(init=run)
    pipe = pipeline(merged)
    assert "Masked" not in type(next(iter(pipe.transformer.attn_processors.values()))).__name__
    cond = m.condition([CAPTION])
    ref = m.generate_images([CAPTION], steps=STEPS, cfg=1.0, seed=7)
    assert (draw(pipe, cond) - ref).abs().max() < TOL
    noise = torch.randn((1,) + m.latent_shape(64, 64), generator=torch.Generator().manual_seed(7))
    lat = draw(pipe, cond, output_type="latent")
    assert (lat - m.sample_ode(noise, cond, None, STEPS, 1.0)).abs().max() < TOL


def n_tokens(m, text):
    msgs = [[{"role": "generate", "content": [{"type": "text", "text": text}]}]]
    t = m.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)[0]
    return len(m.tokenizer(t, add_special_tokens=False)["input_ids"])


def test_decoder_round_trip_cfg(run, merged):
    """CFG 5: the pipeline stacks [negative, caption], which must have equal lengths.
    (a) equal token lengths, SD3's own attention: == UAE; (b) different lengths padded, our masked
    processor + the mask as joint_attention_kwargs: == UAE; (c) padded with SD3's own attention: differs."""
    m = runs.load_model(init=run)
    pipe = pipeline(merged)
    neg = m.condition([M.NEGATIVE_PROMPT])
    same = "a red circle"
    while n_tokens(m, same) < neg.emb.shape[1]:
        same += " a"
    assert n_tokens(m, same) == neg.emb.shape[1]
    cond = m.condition([same])
    assert (draw(pipe, cond, neg, 5.0) - m.generate_images([same], steps=STEPS, cfg=5.0, seed=7)).abs().max() < TOL

    cond = m.condition([CAPTION])
    assert cond.emb.shape[1] < neg.emb.shape[1]
    both = M.cat_conds(neg, cond)  # [negative, caption], zero-padded to one length, with the mask
    pc, pn = M.Cond(both.emb[1:], both.mask[1:], cond.pooled), M.Cond(both.emb[:1], both.mask[:1], neg.pooled)
    ref = m.generate_images([CAPTION], steps=STEPS, cfg=5.0, seed=7)
    plain = draw(pipe, pc, pn, 5.0)
    pipe.transformer.set_attn_processor(M.MaskedJointAttnProcessor())
    masked = draw(pipe, pc, pn, 5.0, joint_attention_kwargs={"attention_mask": both.mask})
    assert (masked - ref).abs().max() < TOL
    assert (plain - ref).abs().max() > 1e-3  # why README says: mask the padding, or keep CFG 1 / equal lengths


def test_peft_adapters_round_trip(run, merged, adapters, pics):
    """--keep_adapters: encoder/ and decoder/ hold the earlier layers merged, the last stage's LoRA is a peft
    folder; PeftModel.from_pretrained on them gives the run's live-adapter outputs and the merged export's."""
    from peft import PeftModel
    u8, x = pics
    for sub in ("encoder/adapter", "decoder/transformer_lora"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(f"{adapters}/{sub}"))
    live = runs.load_model(init=run, resume=True)  # the run with its last layer live, as training left it
    assert M.has_lora(live.encoder) and M.has_lora(live.transformer)
    enc, proc = plain_encoder(adapters, adapter=True)
    assert isinstance(enc, PeftModel)
    r = live.sample_captions_seeded(x, [3, 4], temperature=0.7, max_new_tokens=MAX_NEW)
    got = plain_captions(enc, proc, u8, [3, 4])
    same_ids(got, r)
    menc, _ = plain_encoder(merged)
    assert got == plain_captions(menc, proc, u8, [3, 4])  # == the merged export's captions
    inputs = proc(text=["a red circle"], return_tensors="pt")
    with torch.no_grad():
        assert (enc(**inputs).logits - menc(**inputs).logits).abs().max() < TOL
        base = plain_encoder(adapters)[0]  # without the adapter: the earlier layers only
        assert (base(**inputs).logits - menc(**inputs).logits).abs().max() > 1e-2

    cond = live.condition([CAPTION])
    ref = live.generate_images([CAPTION], steps=STEPS, cfg=1.0, seed=7)
    img = draw(pipeline(adapters, adapter=True), cond)
    assert (img - ref).abs().max() < TOL
    assert (img - draw(pipeline(merged), cond)).abs().max() < TOL
    assert (draw(pipeline(adapters), cond) - ref).abs().max() > 1e-3  # the adapter matters


def test_transformer_full_lineage(tmp_path_factory, run):
    """A checkpoint holding the DiT's full weights (--dit_full) plus a live LoRA on top exports both."""
    d = tmp_path_factory.mktemp("full")
    full = stage(d / "s3", run, 3, transformer_full=True)
    assert ck.read_checkpoint(full)[0]["transformer_full"]
    m = runs.load_model(init=full)
    cond = m.condition([CAPTION])
    ref = m.generate_images([CAPTION], steps=STEPS, cfg=1.0, seed=7)
    for flags, adapter in (((), False), (("--keep_adapters",), True)):
        out = do_export(tmp_path_factory, full, *flags)
        assert (draw(pipeline(out, adapter), cond) - ref).abs().max() < TOL


@pytest.mark.parametrize("which", ["merged", "adapters"])
def test_readme_lines_run(which, request, run, pics, tmp_path, monkeypatch):
    """The exported README's Python lines, run as written, caption x.png as the run does (seed 0) and draw
    sample.py's image for that caption (seed 0; PNG values, so to one grey level)."""
    d = request.getfixturevalue(which)
    text = open(f"{d}/README.md").read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3 and f'D = "{d}"' in blocks[0]
    u8 = pics[0]
    monkeypatch.chdir(tmp_path)
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save("x.png")
    ns = {}
    exec("\n".join(blocks), ns)
    m = runs.load_model(init=run, resume=which == "adapters")
    x0 = images.load_image("x.png", 64)[None]
    cap = m.sample_captions_seeded(x0, [0], temperature=0.7, max_new_tokens=MAX_NEW).texts[0]
    assert ns["caption"] == cap
    cfg = 1.0 if which == "merged" else 5.0
    ref = m.generate_images([cap], steps=STEPS, cfg=cfg, seed=0)[0]
    ref = (ref * 255).round().byte().permute(1, 2, 0).int()
    got = torch.from_numpy(__import__("numpy").asarray(ns["image"]).copy()).int()
    assert (got - ref).abs().max() <= 1


def test_user_errors(run, pics, tmp_path, capsys):
    """A user error is one `error:` line on stderr and exit status 2; --overwrite replaces the folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    for argv, msg in ((["--out", str(out)], "--init is required"),
                      (["--init", run], "--out is required"),
                      (["--init", run, "--out", str(out)], "is not empty"),
                      (["--init", str(tmp_path), "--out", str(tmp_path / "o2")], "not a UAE checkpoint")):
        assert export.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert export.main(["--init", run, "--out", str(out), "--overwrite", "--max_new_tokens", "6",
                        "--temperature", "0"]) == 0
    assert not (out / "stale.txt").exists() and (out / "decoder" / "model_index.json").exists()
    u8, x = pics  # greedy captions (a generation config without sampling fields) match too
    r = runs.load_model(init=run).sample_captions_seeded(x[:1], [0], temperature=0, max_new_tokens=6)
    same_ids(plain_captions(*plain_encoder(out), u8[:1], [0]), r)
    # the script itself: status 2, no traceback
    p = subprocess.run([sys.executable, "tools/export.py", "--out", str(out)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: --init is required: a run directory "
                                                                   "(or its ckpt/) written by a stage script"]
