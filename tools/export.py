"""
Export a UAE run to the folders transformers, diffusers and peft load, so that what a stage trained
can be used without this repository's checkpoint format.

    python tools/export.py --init out/stage3 --out out/export                        # every LoRA merged
    python tools/export.py --init out/stage3 --out out/export_lora --keep_adapters   # the last LoRA as peft folders

Writes under --out (built in a temporary folder next to it, then renamed into place):
  encoder/                 Qwen2.5-VL + processor: Qwen2_5_VLForConditionalGeneration / AutoProcessor
                           .from_pretrained; generation_config.json = the sampling UAE captions with
  encoder/adapter/         --keep_adapters, when the run's last layer has an encoder LoRA: a peft folder
                           (PeftModel.from_pretrained on encoder/, which then holds only the earlier layers merged)
  decoder/                 a StableDiffusion3Pipeline folder: transformer, vae, scheduler; text encoders null
  decoder/transformer_lora/  --keep_adapters, the same for a DiT LoRA on decoder/transformer
  projector.safetensors    g (Linear -> GELU -> Linear, nn.Sequential keys) + "pooled" (pooled_prompt_embeds)
  projector.json           its shapes, the caption instruction, the negative prompt
  README.md                how to use each part: the exact lines (tests/test_export.py runs them)

The decoder in StableDiffusion3Pipeline gives UAE.generate_images' image for the same caption, seed, steps and
CFG (tests: within 1e-4 in fp32; measured on CPU: 0 at CFG 1 and masked CFG 5). SD3's own attention sees
every text token, UAE's masks padding: the two agree when nothing is padded (CFG 1, or caption and negative
prompt of one length). Otherwise README's lines set this repository's MaskedJointAttnProcessor and pass the mask (see there).
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/export.py`
    sys.path.insert(0, ROOT)
import checkpoint as ck  # noqa: E402
import images  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
from runs import arg  # noqa: E402



@dataclass
class Args:
    init: str = arg("", "run directory (or its ckpt/) written by a stage script")
    out: str = arg("", "folder to write (encoder/, decoder/, projector.*, README.md)", aliases=["--out_dir"])
    keep_adapters: bool = arg(False, "write the last stage's LoRA as peft adapter folders instead of merging it")
    overwrite: bool = arg(False, "replace a non-empty --out")
    dtype: str = arg("fp32", "fp32 | bf16: dtype to load, merge and write the weights in")
    temperature: float = arg(0.7, "caption sampling temperature written to encoder/generation_config.json (0 = greedy)")
    top_p: float = arg(1.0, "caption nucleus sampling, same")
    max_new_tokens: int = arg(512, "caption length limit, same")
    steps: int = arg(40, "decoder steps in README's lines")
    cfg: float = arg(5.0, "classifier-free guidance scale in README's lines (1 = none)")


def unload_lora(module):
    """Take the live (last stage's) LoRA out of `module` without merging it. -> its tensors."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    sd = M.lora_state(module)
    for name, mod in list(module.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, mod.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return sd


def save_peft(module, cfg, sd, path, base):
    """Wrap `module` (the base, LoRA-free) with peft, load the adapter tensors, peft's save_pretrained."""
    import warnings
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():  # transformers' is_gradient_checkpointing deprecation, from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(module, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"],
                                               lora_dropout=0.0))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    bad = list(unexpected) + [k for k in missing if "lora_" in k]
    if bad:
        raise images.CheckpointError(f"the adapter does not fit the peft model: e.g. {bad[0]}")
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(path, save_embedding_layers=False)  # no embedding targets; skips a look-up of `base`


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def generation_config(m, a):
    """The GenerationConfig UAE.sample_captions passes, merged over the base model's as generate() merges it."""
    from transformers import GenerationConfig
    sampling = dict(temperature=a.temperature, top_p=a.top_p, top_k=0) if a.temperature > 0 else {}
    gc = GenerationConfig(do_sample=a.temperature > 0, max_new_tokens=a.max_new_tokens, eos_token_id=m.eos_id,
                          pad_token_id=m.pad_id, suppress_tokens=m.suppress.nonzero().flatten().tolist(), **sampling)
    gc.update(**m.encoder.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    if not gc.do_sample:  # greedy: sampling-only fields (from the base's config) do nothing and fail validation
        gc.temperature = gc.top_p = gc.top_k = None
    return gc


def export(a):
    """-> {part: what was written}. Raises CheckpointError for a bad --init."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file
    meta, _ = ck.read_checkpoint(a.init)
    live = meta["layers"][-1] if a.keep_adapters and meta.get("live_layer") else {}
    m = runs.load_model(init=a.init, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype],
                   resume=a.keep_adapters)
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".export-")
    kept = lambda lora: "earlier layers merged" if lora is not None else "every LoRA merged" + (
        " (the last stage has no LoRA here to keep)" if a.keep_adapters else "")
    try:
        done = {}
        enc_lora = unload_lora(m.encoder) if live.get("encoder") else None
        m.encoder.generation_config = generation_config(m, a)
        m.encoder.save_pretrained(f"{tmp}/encoder")
        m.processor.save_pretrained(f"{tmp}/encoder")
        done["encoder"] = kept(enc_lora)
        if enc_lora:
            save_peft(m.encoder, live["encoder"], enc_lora, f"{tmp}/encoder/adapter", f"{out}/encoder")
            done["encoder/adapter"] = f"peft LoRA r {live['encoder']['r']}"
        dit_lora = unload_lora(m.transformer) if live.get("transformer") else None
        pipe = StableDiffusion3Pipeline(transformer=m.transformer, scheduler=m.scheduler, vae=m.vae,
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None)
        with quiet_diffusers():  # "text_encoder=None cannot be saved": written as null, as intended
            pipe.save_pretrained(f"{tmp}/decoder")
        done["decoder"] = kept(dit_lora)
        if dit_lora:
            save_peft(m.transformer, live["transformer"], dit_lora, f"{tmp}/decoder/transformer_lora",
                      f"{out}/decoder/transformer")
            done["decoder/transformer_lora"] = f"peft LoRA r {live['transformer']['r']}"
        save_file({**{k: v.contiguous() for k, v in m.projector.state_dict().items()}, "pooled": m.pooled.clone()},
                  f"{tmp}/projector.safetensors")
        proj = {"layout": "nn.Sequential(Linear(in, hidden), GELU(), Linear(hidden, out))",
                "in_features": m.projector[0].in_features, "hidden_features": m.projector[0].out_features,
                "out_features": m.projector[2].out_features, "pooled": "tensor 'pooled' (P,): pooled_prompt_embeds",
                "condition": "g(last hidden states of the encoder re-reading the caption in the text-only "
                             "template, role 'generate')",
                "instruction": M.INSTRUCTION, "negative_prompt": M.NEGATIVE_PROMPT,
                "source": meta["path"], "stage": meta.get("stage"), "step": meta.get("step"), "exported": done}
        with open(f"{tmp}/projector.json", "w") as f:
            json.dump(proj, f, indent=1)
        with open(f"{tmp}/README.md", "w") as f:
            f.write(readme(out, meta, done, a))
        images.atomic_publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done


def readme(out, meta, done, a):
    enc_peft, dit_peft = "encoder/adapter" in done, "decoder/transformer_lora" in done
    gen = "greedy" if a.temperature <= 0 else f"temperature {a.temperature}, top_p {a.top_p}"
    L = [f"# UAE export of `{meta['path']}` (stage {meta.get('stage')}, step {meta.get('step')})", "",
         "| part | what |", "|---|---|"]
    L += [f"| `{k}/` | {v} |" for k, v in done.items()]
    L += ["| `projector.safetensors`, `projector.json` | g: caption hidden states -> prompt_embeds; "
          "`pooled` -> pooled_prompt_embeds |", "",
          f"Captions sample with `encoder/generation_config.json` ({gen}, {a.max_new_tokens} new tokens, special "
          "tokens other than `<|im_end|>` suppressed), as `UAE.sample_captions`; seed torch right before "
          "`generate` for `UAE.sample_captions_seeded`'s caption. UAE captions the image center-cropped to a "
          "square at the decoder's size (`model.load_image`).",
          "", "## Caption an image (transformers)", "", "```python",
          "import json, torch", "from PIL import Image",
          "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration", f'D = "{out}"',
          'P = json.load(open(f"{D}/projector.json"))',
          'enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{D}/encoder")',
          'proc = AutoProcessor.from_pretrained(f"{D}/encoder")']
    if enc_peft:
        L += ["from peft import PeftModel  # the last stage's LoRA, live (not merged)",
              'enc = PeftModel.from_pretrained(enc, f"{D}/encoder/adapter").get_base_model()']
    L += ['msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": P["instruction"]}]}]',
          'inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)],',
          '              images=[Image.open("x.png").convert("RGB")], return_tensors="pt")',
          "torch.manual_seed(0)", "ids = enc.generate(**inputs)",
          'caption = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()',
          "```", "", "## The condition: caption text -> prompt_embeds, pooled_prompt_embeds", "", "```python",
          "from safetensors.torch import load_file", 'w = load_file(f"{D}/projector.safetensors")',
          'pooled = w.pop("pooled")',
          'g = torch.nn.Sequential(torch.nn.Linear(P["in_features"], P["hidden_features"]), torch.nn.GELU(),',
          '                        torch.nn.Linear(P["hidden_features"], P["out_features"]))', "g.load_state_dict(w)",
          "", "@torch.no_grad()", "def condition(text):  # the caption alone, no image: -> (1, L, D), (1, P)",
          '    msgs = [{"role": "generate", "content": [{"type": "text", "text": text}]}]',
          "    t = proc.tokenizer(proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),",
          '                       return_tensors="pt", add_special_tokens=False, truncation=True, max_length=1024)',
          '    H = enc.model(**t, mm_token_type_ids=torch.zeros_like(t["input_ids"])).last_hidden_state',
          "    return g(H), pooled[None]", "```", "", "## Draw from the condition (diffusers)", "", "```python",
          "from diffusers import StableDiffusion3Pipeline",
          "# SD3's three text encoders are null in model_index.json: UAE's condition replaces them",
          'none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", '
          '"tokenizer_3"])']
    if dit_peft:
        L += ["from diffusers import SD3Transformer2DModel", "from peft import PeftModel",
              'tr = SD3Transformer2DModel.from_pretrained(f"{D}/decoder", subfolder="transformer")',
              'tr = PeftModel.from_pretrained(tr, f"{D}/decoder/transformer_lora").get_base_model()',
              'pipe = StableDiffusion3Pipeline.from_pretrained(f"{D}/decoder", transformer=tr, **none)']
    else:
        L += ['pipe = StableDiffusion3Pipeline.from_pretrained(f"{D}/decoder", **none)']
    L += ["c, p = condition(caption)"]
    run = f"num_inference_steps={a.steps}, generator=torch.Generator().manual_seed(0)"
    if a.cfg == 1.0:
        L += [f"image = pipe(prompt_embeds=c, pooled_prompt_embeds=p, guidance_scale=1.0, {run}).images[0]", "```"]
    else:
        L += ['n, pn = condition(P["negative_prompt"])',
              "# CFG: the pipeline stacks [negative, caption], so both need L tokens. Pad with zeros and mask the",
              "# padding as UAE does (SD3's own attention would attend to it and draw another image):",
              "from model import MaskedJointAttnProcessor  # from the UAE repository",
              "pipe.transformer.set_attn_processor(MaskedJointAttnProcessor())",
              "n_len, c_len = n.shape[1], c.shape[1]",
              "pad = lambda e: torch.nn.functional.pad(e, (0, 0, 0, max(n_len, c_len) - e.shape[1]))",
              "mask = torch.arange(max(n_len, c_len))[None] < torch.tensor([[n_len], [c_len]])",
              "image = pipe(prompt_embeds=pad(c), pooled_prompt_embeds=p, negative_prompt_embeds=pad(n),",
              f"             negative_pooled_prompt_embeds=pn, guidance_scale={a.cfg}, {run},",
              '             joint_attention_kwargs={"attention_mask": mask}).images[0]', "```"]
    L += ["", f"This is `sample.py`'s image for that caption (seed 0, {a.steps} steps, CFG {a.cfg}) to ~1e-4 "
          "in fp32. Without `MaskedJointAttnProcessor` it is exact only when no padding is needed: CFG 1, or a "
          "caption and negative prompt of the same token length. On a GPU: `.to(\"cuda\")` each model and "
          "`inputs`/`c`/`p`."]
    return "\n".join(L) + "\n"


def validate(a):
    """Every flag and path, before anything loads or is written: --init a checkpoint (read, not loaded), --out a
    writable folder that is new, empty or (--overwrite) replaceable: never a training run's nor one that holds --init.
    A user error raises runs.UsageError or images.CheckpointError."""
    runs.need(bool(a.init), "--init is required: a run directory (or its ckpt/) written by a stage script")
    runs.need(bool(a.out), "--out is required: the folder to write")
    runs.one_of(a, "dtype", ("fp32", "bf16"))
    runs.at_least(a, 0, "temperature")
    runs.above(a, 0, "top_p")
    runs.need(a.top_p <= 1, f"--top_p {a.top_p}: must be in (0, 1]")
    runs.at_least(a, 1, "max_new_tokens", "steps")
    runs.finite(a, "cfg")
    ck.check_checkpoint(a.init, "--init")
    runs.check_writable("out", a.out)
    run = runs.training_run_entries(a.out)
    runs.need(not run, f"--out {a.out} holds a training run ({', '.join(run)}): export writes a new folder")
    out, init = os.path.realpath(a.out), os.path.realpath(a.init)
    runs.need(os.path.commonpath([out, init]) != out, f"--out {a.out} holds --init {a.init}: --overwrite would "
                                                      "delete it; write the export elsewhere")
    runs.need(not (os.path.isdir(a.out) and os.listdir(a.out)) or a.overwrite,
              f"--out {a.out} is not empty (pass --overwrite to replace it)")


def main(argv=None):
    """-> exit status: 0, or 2 after one `error:` line (a flag, --init or --out; or the export failing on a base
    model that cannot be found or a full disk)."""
    try:
        a = runs.parse_args(Args, argv)
        validate(a)
        done = export(a)
    except (*runs.USER_ERRORS, OSError) as e:
        print(f"error: {runs.one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: " + "; ".join(f"{k}/ ({v})" for k, v in done.items()) + "; projector.*; README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
