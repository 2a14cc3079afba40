"""Real runs train what tiny runs train: fp32 trainable weights under bf16, rollouts drawn from the
distribution that is scored whatever the checkpoint's generation config, exact resume at CFG 5 and bf16,
SD3's pooled embedding of "", fp32 timesteps, and the README's real launch flags on the tiny preset."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import runs
import checkpoint as ck
import training as T
import stage1_coldstart as S1
import stage2_grpo_und as S2
import stage3_grpo_gen as S3
from test_stage1 import make_jsonl
from test_stage2 import _image_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _capture_steps(monkeypatch):
    """Wrap training.optimizer_step: after each step, a copy of every trainable tensor and whether it had a
    gradient (the last DiT block's add_q_proj feeds only the discarded text stream: its LoRA gets none)."""
    snaps, real = [], T.optimizer_step

    def step(params, *a, **kw):
        live = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
        out = real(params, *a, **kw)
        snaps.append(([p.detach().clone() for p in params], live))
        return out
    monkeypatch.setattr(T, "optimizer_step", step)
    return snaps


def _changed_fraction(before, after):
    """Fraction of the elements that had a gradient which the step moved."""
    (b, _), (a, live) = before, after
    n = sum(x.numel() for x, ok in zip(b, live) if ok)
    assert n > 0.9 * sum(x.numel() for x in b)
    return sum((x != y).sum().item() for x, y, ok in zip(a, b, live) if ok) / n


@pytest.mark.parametrize("what", ["stage1-lora", "stage1-dit_full", "stage2"])
def test_bf16_updates_are_not_rounded_away(what, tmp_path, monkeypatch):
    """lr 1e-5 on trainable weights of ~0.03: in bf16 most updates would round away (4% of lora_A moved);
    trainable tensors live in fp32, so a second step moves (nearly) every element, and checkpoints hold fp32."""
    snaps = _capture_steps(monkeypatch)
    out = str(tmp_path / "out")
    if what.startswith("stage1"):
        data = make_jsonl(str(tmp_path / "d"), n=4)
        S1.main(S1.Args(preset="tiny", objective="fm", data=data, out_dir=out, resolution=64, batch_size=2, steps=2,
                        lr=1e-5, warmup=0, schedule="constant", sample_every=0, dtype="bf16", lora_r=4, lora_alpha=8,
                        dit_full=what.endswith("full"), weight_decay=0.0))
    else:
        S2.main(S2.Args(preset="tiny", data=_image_dir(tmp_path / "img", 2), out_dir=out, reward="pixel", resolution=64,
                        G=4, batch_size=2, micro_batch=8, max_new_tokens=8, sample_steps=2, cfg=5.0, lr=1e-5, steps=2,
                        sample_every=0, dtype="bf16"))
    assert len(snaps) == 2 and all(p.dtype == torch.float32 for p in snaps[1][0])
    frac = _changed_fraction(snaps[0], snaps[1])
    assert frac >= 0.99, f"the second step moved only {frac:.1%} of the trainable elements"
    w = load_file(os.path.join(out, "ckpt", "weights.safetensors"))
    trained = [k for k in w if "lora_" in k or k.startswith("projector.") or k.startswith("transformer.")]
    assert trained and all(w[k].dtype == torch.float32 for k in trained)


POISON = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.5,
          "no_repeat_ngram_size": 2, "min_p": 0.5, "typical_p": 0.5, "epsilon_cutoff": 0.01, "eta_cutoff": 0.01,
          "min_new_tokens": 6, "renormalize_logits": True, "bad_words_ids": [[5], [6]]}


def test_rollouts_ignore_a_poisoned_generation_config(tiny_paths, tmp_path, images):
    """The checkpoint's generation_config.json (Qwen2.5-VL-Instruct ships top_k 1 and repetition_penalty 1.05)
    must not change what is sampled: generate's processed scores are exactly what completion_logprobs scores."""
    enc = tmp_path / "encoder"
    shutil.copytree(tiny_paths[0], enc)
    cfg = json.load(open(enc / "generation_config.json")) if (enc / "generation_config.json").exists() else {}
    json.dump({**cfg, **POISON}, open(enc / "generation_config.json", "w"))
    m = runs.load_model(preset="tiny", encoder=str(enc))
    torch.manual_seed(0)
    r, scores = m.sample_captions(images, G=4, max_new_tokens=12, output_scores=True)
    lp_sample = torch.log_softmax(scores.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    mk = r.completion_mask.bool()
    assert (m.completion_logprobs(r) - lp_sample)[mk].abs().max() < 1e-5
    assert len(set(r.texts)) > 1                                  # top_k 1 would make every caption identical


def _stage2_args(tmp_path, data, out, **kw):
    base = dict(preset="tiny", data=data, out_dir=out, reward="pixel", resolution=64, G=4, batch_size=2, micro_batch=4,
                max_new_tokens=8, sample_steps=2, cfg=5.0, lr=1e-3, steps=4, sample_every=0, save_every=1000,
                dtype="bf16")
    base.update(kw)
    return S2.Args(**base)


def _weights(out):
    return ck.read_checkpoint(out)[1]


def _same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def _logs(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "log.jsonl"))]


def test_stage2_resume_is_exact_at_cfg5_bf16(tmp_path):
    """The negative condition comes from the pre-stage encoder (adapter off) on a resume as on a fresh start."""
    data = _image_dir(tmp_path / "img", 4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    S2.main(_stage2_args(tmp_path, data, a))
    S2.main(_stage2_args(tmp_path, data, b, steps=2, save_every=2))
    S2.main(_stage2_args(tmp_path, data, b, resume=True))
    _same(_weights(a), _weights(b))
    assert [d["reward/mean"] for d in _logs(a)] == [d["reward/mean"] for d in _logs(b)][-4:]


def test_stage3_resume_is_exact_at_cfg5_bf16(tmp_path):
    data = _image_dir(tmp_path / "img", 4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny = ["--preset", "tiny", "--data", data, "--resolution", "32", "--G", "4", "--groups", "1", "--sample_steps", "3",
            "--max_new_tokens", "8", "--reward", "pixel", "--lr", "1e-2", "--cfg", "5.0", "--dtype", "bf16",
            "--eval_every", "0", "--sample_every", "0"]
    S3.main(tiny + ["--steps", "3", "--out_dir", a])
    S3.main(tiny + ["--steps", "2", "--out_dir", b])
    S3.main(tiny + ["--steps", "3", "--out_dir", b, "--resume"])
    _same(_weights(a), _weights(b))


def test_stage1_resume_is_exact_dit_full_bf16(tmp_path):
    """--dit_full in bf16: the full DiT is held in fp32 and comes back from the checkpoint bit for bit."""
    data = make_jsonl(str(tmp_path / "d"), n=4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(preset="tiny", objective="fm", data=data, resolution=64, batch_size=2, lr=1e-3, warmup=0,
              schedule="constant", dtype="bf16", dit_full=True, cfg=5.0, sample_every=2, sample_steps=2, max_new_tokens=8)
    S1.main(S1.Args(out_dir=a, steps=3, **kw))
    S1.main(S1.Args(out_dir=b, steps=3, stop_after=2, **kw))
    S1.main(S1.Args(out_dir=b, steps=3, resume=True, **kw))
    _same(_weights(a), _weights(b))


def test_pooled_embedding_is_sd3s_own_encode_prompt_of_empty(tiny_paths, tmp_path, capsys):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    dec = tiny_paths[1]
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(dec, subfolder="transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(dec, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(dec, subfolder="vae"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(dec, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(dec, subfolder="tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(dec, subfolder="text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(dec, subfolder="tokenizer_2"),
        text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        _, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, device="cpu",
                                             do_classifier_free_guidance=False)
    m = runs.load_model(preset="tiny")
    assert pooled.shape == (1, m.pooled.numel()) and pooled.abs().sum() > 0
    assert torch.allclose(m.pooled, pooled[0].float(), atol=1e-6)
    # saved with a checkpoint, and back
    ck.save_checkpoint(str(tmp_path / "ck"), m, {})
    assert torch.equal(runs.load_model(init=str(tmp_path / "ck")).pooled, m.pooled)
    # a decoder folder without SD3's text encoders: zeros, and one line says so
    bare = tmp_path / "bare"
    for sub in ("transformer", "vae", "scheduler"):
        shutil.copytree(os.path.join(dec, sub), bare / sub)
    capsys.readouterr()
    z = runs.load_model(preset="tiny", decoder=str(bare))
    assert z.pooled.abs().sum() == 0 and "pooled projection is zeros" in capsys.readouterr().out


def test_timesteps_reach_the_dit_in_fp32(tiny_uae):
    seen = []
    tiny_uae.precision(torch.bfloat16)
    h = tiny_uae.transformer.time_text_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    cond = tiny_uae.condition(["a red square"])
    tiny_uae.velocity(torch.randn(1, *tiny_uae.latent_shape(64, 64)), torch.tensor(0.79037), cond)
    h.remove()
    assert seen[0].dtype == torch.float32 and seen[0].item() == pytest.approx(790.37, abs=1e-3)


def _real_lines():
    """The README's real launch lines, its "3. Launch, 8 x 80 GB" block (torchrun --nproc_per_node=8 stageN ...),
    as (script, [flags])."""
    text = open(os.path.join(ROOT, "README.md")).read().split("\n**3. Launch", 1)[1].split("\n**4.", 1)[0]
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*torchrun --nproc_per_node=8 (stage\d_\w+\.py) (.*)", line)
        if m:
            out.append((m.group(1), m.group(2).split()))
    return out


def _override(flags, new):
    """Replace the value of each flag named in `new` (drop it when the value is None), keep the rest."""
    out, i = [], 0
    while i < len(flags):
        f = flags[i]
        takes = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if f in new:
            i += 2 if takes else 1
            continue
        out += flags[i:i + (2 if takes else 1)]
        i += 2 if takes else 1
    for k, v in new.items():
        if v is not None:
            out += [k] + ([] if v is True else [str(v)])
    return out


@pytest.mark.slow
def test_readme_real_launch_flags_run_on_tiny(tmp_path):
    """Each README real launch keeps its precision/CFG/checkpointing/micro-batch flags (bf16, CFG 5,
    --grad_ckpt, micro-batches, accumulation) and runs 2 steps on the tiny preset; sizes and paths are tiny."""
    lines = _real_lines()
    assert [s for s, _ in lines] == ["stage1_coldstart.py", "stage1_coldstart.py", "stage2_grpo_und.py", "stage3_grpo_gen.py"]
    data = make_jsonl(str(tmp_path / "d"), n=4)
    mods = {"stage1_coldstart.py": S1, "stage2_grpo_und.py": S2, "stage3_grpo_gen.py": S3}
    prev = None
    for k, (script, flags) in enumerate(lines):
        assert "--dtype" in flags and "bf16" in flags and "--grad_ckpt" in flags, script
        out = str(tmp_path / f"run{k}")
        new = {"--data": data, "--out_dir": out, "--steps": 2, "--resolution": 32, "--max_new_tokens": 8,
               "--reward_path": None, "--reward": "pixel", "--init": prev, "--preset": "tiny" if prev is None else None,
               "--save_every": 2, "--eval_steps": 2, "--eval_images": 2}
        if script == "stage3_grpo_gen.py" or script == "stage2_grpo_und.py":
            new["--sample_steps"] = 3
        if script != "stage3_grpo_gen.py":
            new.pop("--eval_steps"), new.pop("--eval_images")
        if script == "stage1_coldstart.py":
            new["--sample_every"] = 0
        mods[script].main(_override(flags, new))
        assert os.path.isfile(os.path.join(out, "ckpt", "uae.json")), script
        prev = out
