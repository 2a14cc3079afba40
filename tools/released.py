"""
Start from the authors' released UAE (https://huggingface.co/zhiyuanyan1/UAE, inference code at
github.com/PKU-YuanGroup/UAE): read its checkpoint layout once and write this project's own
checkpoint, which every script then loads like one of ours.

    python tools/released.py weights/UAE weights/uae-released     # convert once (docs/released.md)
    python eval_unified.py --init weights/uae-released --preset_sampling released --src data/unified_bench \
        --out_dir out/bench_released --longclip_path weights/longclip-L.safetensors      # then any script
    python eval_unified.py --init released:weights/UAE --preset_sampling released --src data/unified_bench \
        --out_dir out/bench_released --longclip_path weights/longclip-L.safetensors
        # or convert on first use into $UAE_HOME/released-<hash>/ (reused afterwards; ranks wait on a file lock)

The release (the demo's Checkpoints/ names; llm_model/ and SD3/ as other loaders name them also work):
    llm/                     Qwen2.5-VL-3B subclass saved with save_pretrained; its state dict also holds
                             the projector g: projector.0 Linear(2048, 8192), GELU, projector.2 Linear(8192, 4096)
    llm_lora/model-0000{1,2,3}-of-00003.safetensors
                             the state dict after peft wrapped the LLM's inner .model (LoRA r 32, alpha 64,
                             "all-linear"): lora_A/lora_B, and maybe base weights and the projector too
    llm_model_preprocessor/  the processor (none with a complete tokenizer: the base model's, BASE_PROCESSOR,
                             as third-party loaders of the release fall back; printed)
    dit/                     a full SD3Transformer2DModel;  dit_lora/: a peft adapter folder on it
    SD3/                     SD3.5-large (VAE, scheduler, text encoders), used when present; --decoder wins

What is written (OUT):
    encoder/  Qwen2.5-VL folder: llm weights, overridden by llm_lora's base weights (the demo's
              load_state_dict order), llm_lora merged (W += 64/32 B A, in fp32, saved in llm's dtype),
              projector keys removed, + the released processor, + llm/generation_config.json as it is
              (the demo's generate() merges it; --preset_sampling released does too)
    decoder/  links: transformer -> the released dit/, everything else -> the SD3.5 folder
    ckpt/     uae.json + weights.safetensors in this project's format: the projector, the pooled
              embedding load_uae computes from decoder/, and dit_lora as layer 0 (merged when loaded,
              exactly as a stage's earlier LoRA is), base = encoder/ + decoder/
Every released tensor is accounted for: unknown, missing or shape-mismatched keys raise CheckpointError
naming the file and the keys. Why a converter rather than a loader: the converted folder is a plain
checkpoint, so stage 2/3 save, resume and chain on it unchanged, and the 8B DiT is linked, not copied.

Reproducing the demo's inference (--preset_sampling released in sample.py and eval_unified.py; docs/released.md):
Sampling holds its settings and makes its calls (qwen_image: the image input; Sampling.caption, Sampling.draw),
SAMPLING["released"] the same settings for a script's flags left at their defaults.
"""
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image
from transformers import GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/released.py`
    sys.path.insert(0, ROOT)
import checkpoint as ck  # noqa: E402
import images  # noqa: E402
import model  # noqa: E402

CONVERTER = "uae-released-v3"  # v3: llm/generation_config.json kept as it is, the processor fallback
LLM_LORA = {"r": 32, "alpha": 64}  # the demo's set_lora(rank=32, alpha=64, target_modules="all-linear")
RELEASED_INSTRUCTION = model.RELEASED_INSTRUCTION  # the demo's question, before the image (instruction_first)
BASE_PROCESSOR = model.REAL_ENCODER  # the processor third-party loaders fall back to when the release has none
SD3_FILES = ["model_index.json", "vae/*", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"]
PEFT_DEFAULTS = {"use_dora": (False, None), "use_rslora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                 "modules_to_save": (None, []), "layers_to_transform": (None,), "fan_in_fan_out": (False, None),
                 "lora_bias": (False, None), "bias": ("none", None), "exclude_modules": (None,), "target_parameters": (None, [])}
Error = images.CheckpointError


# ----------------------------------------------------------------------------------------------
# The demo's inference, call for call (its gen_prompt, get_prompt_embeds, gen_image; docs/released.md).

# qwen_vl_utils (qwen-vl-utils on PyPI, vision_process.py), the demo's image input for Qwen2.5-VL: sides to
# multiples of its patch x spatial merge, between IMAGE_MIN_TOKEN_NUM and IMAGE_MAX_TOKEN_NUM merged tokens.
QWEN_FACTOR = 14 * 2
QWEN_MIN_PIXELS = 4 * QWEN_FACTOR ** 2
QWEN_MAX_PIXELS = 16384 * QWEN_FACTOR ** 2
QWEN_MAX_RATIO = 200


def smart_resize(height, width, factor=QWEN_FACTOR, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS):
    """qwen_vl_utils' smart_resize: (height, width) -> the size both sides of which are multiples of `factor`,
    of min_pixels to max_pixels pixels, with the aspect ratio kept as closely as that allows. Python's round()."""
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise images.ImageError(f"{height} x {width}: aspect ratio over {QWEN_MAX_RATIO}, which Qwen's resize refuses")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:  # shrink by beta = sqrt(HW / max_pixels), each side floored to the factor
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:  # grow by beta = sqrt(min_pixels / HW), each side ceiled to the factor
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image(path, max_pixels=None):
    """The demo's image input: the file as qwen_vl_utils' fetch_image reads a path (PIL, RGBA on white, any other
    mode by convert("RGB"), no EXIF rotation: unlike images.read_image), resized with PIL's default (bicubic)
    to smart_resize of its size. Checked first (images.check_image: a FIFO, a non-image or an oversized file is
    one line). -> PIL RGB image."""
    images.check_image(path, max_pixels)
    try:
        with Image.open(path) as im:
            if im.mode == "RGBA":
                rgb = Image.new("RGB", im.size, (255, 255, 255))
                rgb.paste(im, mask=im.split()[3])
            else:
                rgb = im.convert("RGB")
    except Exception as e:  # truncated after its header
        raise images.ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    h, w = smart_resize(rgb.height, rgb.width)
    return rgb.resize((w, h))


def transformers_defaults():
    """What generate() uses for a field neither the call nor the generation config sets."""
    get = getattr(GenerationConfig, "_get_default_generation_params", None)  # transformers >= 5
    return get() if get else GenerationConfig().to_dict()


@dataclass
class Sampling:
    """The demo's inference settings, each a flag of sample.py and eval_unified.py (--preset_sampling released
    sets those left at their defaults); None = not passed to generate(), so the checkpoint's
    generation_config.json decides, else transformers' default. Its methods make the demo's calls."""
    temperature: float = 0.7          # the temperature gen_prompt passes to generate() with do_sample; 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 512
    instruction: str = RELEASED_INSTRUCTION
    instruction_first: bool = True
    resolution: int = 0               # output side; 0 = the decoder's native size (SD3.5-large: the demo's)
    steps: int = 40
    cfg: float = 5.0
    seed: int = 42                    # the seed the demo's generate_from_input gives every image's noise

    @classmethod
    def from_args(cls, args):
        """From a script's Args (fields of the same names; missing ones keep the demo's value)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def generate_kwargs(self):
        """The demo's generate() keyword arguments, with each set flag added."""
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kw["temperature"] = self.temperature
        for k in ("top_k", "top_p", "repetition_penalty"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        return kw

    def effective(self, file_config):
        """{field: (value, where from)} of what generate() runs with: the call's kwargs > the checkpoint's
        generation_config.json (file_config) > transformers' defaults, as transformers merges them."""
        kw, own, dflt = self.generate_kwargs(), file_config.to_diff_dict(), transformers_defaults()
        out = {}
        for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "eos_token_id"):
            out[k] = ((kw[k], "call") if k in kw else (own[k], "generation_config.json") if own.get(k) is not None
                      else (dflt.get(k), "transformers default"))
        return out

    def size(self, m):
        return self.resolution or m.transformer.config.sample_size * 2 ** (len(m.vae.config.block_out_channels) - 1)

    def describe(self, m):
        """One line: the settings the preset runs with (printed at start)."""
        eff = self.effective(m.checkpoint_generation_config)
        gen = ", ".join(f"{k}={v!r} ({src})" for k, (v, src) in eff.items())
        greedy = not eff["do_sample"][0] or eff["top_k"][0] == 1
        S = self.size(m)
        return (f"released sampling: captions generate({gen}){': greedy' if greedy else ''}; input at native size, "
                f"Qwen's resize (multiples of {QWEN_FACTOR}, {QWEN_MIN_PIXELS} to {QWEN_MAX_PIXELS} px); "
                f"instruction {'before' if self.instruction_first else 'after'} the image; output {S}x{S} px, "
                f"{self.steps} steps, CFG {self.cfg}, seed {self.seed} on the {m.device.type} generator, "
                "the padded (negative, caption) pair")

    def caption(self, m, path):
        """gen_prompt: an image file -> its caption (seed torch beforehand where the config samples)."""
        return m.caption_like_release(qwen_image(path), model.instruction_text(self.instruction),
                                      self.instruction_first, **self.generate_kwargs())

    def draw(self, m, prompt):
        """gen_image: a caption or prompt -> (3, S, S) in [0, 1], S = size(m), noise seeded with self.seed."""
        c, c_neg = m.pair_condition(prompt)
        S = self.size(m)
        return m.sample_like_release(c, c_neg, S, S, self.steps, self.cfg, self.seed)[0]


SAMPLING = {"released": {k: v for k, v in dataclasses.asdict(Sampling()).items() if v is not None}}


def flags_given(argv=None):
    """The --flags named on a command line (argv None: sys.argv), so that a preset never overrides one."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0] for a in argv if isinstance(a, str) and a.startswith("--")}


def apply_sampling_preset(args, name, given=()):
    """Set args' sampling fields from SAMPLING[name] where they were not named on the command line (`given`,
    flags_given) and still hold their dataclass default. '' leaves args as they are."""
    if not name:
        return args
    if name not in SAMPLING:
        raise SystemExit(f"error: --preset_sampling {name!r}: known presets are {', '.join(SAMPLING)}")
    default = {f.name: f.default for f in dataclasses.fields(args)}
    for k, v in SAMPLING[name].items():
        if k in default and k not in given and getattr(args, k) == default[k]:
            setattr(args, k, v)
    return args


def _check(where, unknown=(), missing=(), mismatched=()):
    """Raise one CheckpointError listing every problem (first 10 of each kind, and the count)."""
    parts = []
    for label, items in (("unknown", unknown), ("missing", missing), ("shape-mismatched", mismatched)):
        items = sorted(map(str, items))
        if items:
            parts.append(f"{len(items)} {label}: " + ", ".join(items[:10]) + (", ..." if len(items) > 10 else ""))
    if parts:
        raise Error(f"{where}: " + "; ".join(parts))


def complete_processor(folder):
    """A processor folder whose tokenizer loads: tokenizer_config.json and tokenizer.json or vocab.json + merges.txt."""
    has = lambda f: os.path.isfile(os.path.join(folder, f))
    return has("tokenizer_config.json") and (has("tokenizer.json") or (has("vocab.json") and has("merges.txt")))


def locate(release_dir, sd3=None, processor=None):
    """The release's component folders -> {llm, llm_lora, processor, dit, dit_lora, sd3 (may be a hub id)}.
    processor: the one to use when the release has none with a complete tokenizer (default BASE_PROCESSOR)."""
    d = release_dir
    if not os.path.isdir(d) and re.fullmatch(r"[\w.-]+/[\w.-]+", d):  # a hub repo id, e.g. zhiyuanyan1/UAE
        from huggingface_hub import snapshot_download
        try:
            d = snapshot_download(d)
        except Exception as e:  # offline and not in the cache, no such repo, no network
            raise Error(f"released:{release_dir}: not a folder, and the hub repo cannot be fetched "
                        f"({type(e).__name__}: {e}); download it: hf download {release_dir} --local-dir DIR") from None
    if not os.path.isdir(d):
        raise Error(f"released:{release_dir}: not a folder (expected the downloaded release: llm/, llm_lora/, dit/, dit_lora/)")
    roots = [os.path.join(d, "Checkpoints"), d]

    def find(names, marker):
        return next((os.path.join(r, n) for r in roots for n in names if os.path.exists(os.path.join(r, n, marker))), None)
    want = {"llm": (("llm", "llm_model"), "config.json"), "llm_lora": (("llm_lora",), ""),
            "dit": (("dit",), "config.json"), "dit_lora": (("dit_lora",), "adapter_config.json")}
    p = {k: find(*v) for k, v in want.items()}
    lost = [f"{k} (" + " or ".join(f"{n}/{want[k][1]}" for n in want[k][0]) + ")" for k in p if not p[k]]
    if lost:
        raise Error(f"{d}: not the released UAE layout, cannot find " + "; ".join(lost) + f" (looked in {' and '.join(roots)})")
    names = ("llm_model_preprocessor", "llm_processor", "llm_model_processor", "llm", "llm_model")
    p["processor"] = next((os.path.join(r, n) for r in roots for n in names if complete_processor(os.path.join(r, n))),
                          None)
    if p["processor"] is None:
        p["processor"] = processor or BASE_PROCESSOR
        print(f"released: no processor with a complete tokenizer in {d} (tokenizer_config.json with tokenizer.json, "
              f"or vocab.json + merges.txt, in {', '.join(names)}): using {p['processor']}, the base model's, as "
              "third-party loaders of the release do", flush=True)
    p["sd3"] = sd3 or find(("SD3", "SD3_model", "stable-diffusion-3.5-large"), "vae") or model.REAL_DECODER
    p["root"] = d
    return p


def _local_sd3(sd3):
    """SD3.5-large as a local folder (a hub id is looked up in the hub cache, without its 16 GB DiT)."""
    if not os.path.isdir(sd3):
        from huggingface_hub import snapshot_download
        try:
            sd3 = snapshot_download(sd3, allow_patterns=SD3_FILES)
        except Exception as e:
            raise Error(f"SD3.5 base {sd3!r}: not a folder and not in the hub cache ({type(e).__name__}: {e}). Get it "
                        f"(gated: accept the licence, hf auth login): hf download {model.REAL_DECODER} "
                        + "--include " + " ".join(f'"{f}"' for f in SD3_FILES) + " --local-dir DIR, then pass --decoder DIR") from None
    for sub in ("vae", "scheduler"):
        if not os.path.isdir(os.path.join(sd3, sub)):
            raise Error(f"SD3.5 base {sd3}: no {sub}/ folder (expected a diffusers SD3.5-large folder)")
    return os.path.abspath(sd3)


def _safetensors(folder):
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise Error(f"{folder}: no .safetensors files (pickled weights are not loaded)")
    return files


def _lora_shards(folder):
    files = _safetensors(folder)
    for f in files:  # NAME-0000i-of-0000N: all N must be there
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.safetensors", os.path.basename(f))
        if m:
            want = {f"{m[1]}-{i:0{len(m[2])}d}-of-{m[3]}.safetensors" for i in range(1, int(m[3]) + 1)}
            _check(folder, missing=want - {os.path.basename(x) for x in files})
    return files


def encoder_key(key):
    """A released llm_lora key -> (kind, name): 'lora_A' / 'lora_B' (name = the Linear's path),
    'projector' (name inside the projector) or 'param' (the parameter's path), with peft's wrapper
    prefixes (model.base_model.model., model.base_model., base_model.model.) and .base_layer removed."""
    for pre, rep in (("base_model.model.", ""), ("model.base_model.model.", "model."), ("model.base_model.", "model.")):
        if key.startswith(pre):
            key = rep + key[len(pre):]
            break
    if key.startswith("projector."):
        return "projector", key[len("projector."):]
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
    if m:
        return f"lora_{m[2]}", m[1]
    return "param", key.replace(".base_layer.", ".")


def to_model_name(name, names):
    """Legacy (model.layers.*, visual.*) or current (model.language_model.*, model.visual.*) Qwen2.5-VL
    naming -> the name in `names` (the loaded model's), or None."""
    for cand in (name, re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", name),
                 re.sub(r"^visual\.", "model.visual.", name), re.sub(r"^model\.language_model\.", "model.", name),
                 re.sub(r"^model\.visual\.", "visual.", name)):
        if cand in names:
            return cand
    return None


def convert_encoder(p, out, projector_shapes):
    """llm + llm_lora -> out (merged Qwen2.5-VL + processor). -> (projector state dict, info)."""
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of the projector keys as unexpected: they are accounted for below
    try:
        enc, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(p["llm"], dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    proj, dtypes = {}, []
    for f in _safetensors(p["llm"]):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if k.startswith("projector."):
                    proj[k[len("projector."):]] = st.get_tensor(k)
                else:
                    dtypes.append(st.get_slice(k).get_dtype())
    _check(p["llm"], unknown=set(info["unexpected_keys"]) - {f"projector.{k}" for k in proj},
           missing=info["missing_keys"], mismatched=info["mismatched_keys"])
    save_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(max(set(dtypes), key=dtypes.count), torch.float32)

    # llm_lora, one shard at a time (a full fp32 state dict is 15 GB): base weights are copied into enc
    # at once (the demo's load_state_dict after from_pretrained: they win), LoRA and projector kept
    sd, seen = enc.state_dict(), set()
    linears = {n: m for n, m in enc.named_modules() if isinstance(m, nn.Linear)}
    base, lora, unknown, bad, from_shards, differ = set(), {}, [], [], {}, 0
    for f in _lora_shards(p["llm_lora"]):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if k in seen:
                    raise Error(f"{f}: {k} is also in another shard")
                seen.add(k)
                v, (kind, name) = st.get_tensor(k), encoder_key(k)
                if kind == "projector":
                    from_shards[name] = v
                    continue
                tgt = to_model_name(name, linears if kind != "param" else sd)
                if tgt is None:
                    unknown.append(k)
                    continue
                if kind == "param":
                    want = tuple(sd[tgt].shape)
                else:
                    lin = linears[tgt]
                    want = (LLM_LORA["r"], lin.in_features) if kind == "lora_A" else (lin.out_features, LLM_LORA["r"])
                if tuple(v.shape) != want:
                    bad.append(f"{k} {tuple(v.shape)} != {want}")
                elif kind == "param":
                    differ += not torch.equal(sd[tgt], v.to(sd[tgt].dtype))
                    sd[tgt].copy_(v)
                    base.add(tgt)
                else:
                    lora.setdefault(tgt, {})[kind] = v
    # "all-linear" on the inner .model: every Linear of the language model, and of the vision tower when the
    # release's transformers had it inside .model (then some of its LoRA keys are there)
    vision = any(n.startswith("model.visual.") for n in lora)
    expect = {n for n in linears if n.startswith("model.") and (vision or not n.startswith("model.visual."))}
    missing = [f"{n}.lora_{x}" for n in sorted(expect | set(lora)) for x in "AB" if f"lora_{x}" not in lora.get(n, {})]
    if base:  # a full state dict: every parameter (one name per tied group) must be there
        groups = {}
        for k, t in sd.items():
            groups.setdefault(t.data_ptr(), []).append(k)
        missing += [" = ".join(g) for g in groups.values() if not any(k in base for k in g)]
    _check(f"{p['llm_lora']} (against {p['llm']})", unknown, missing, bad)

    proj.update(from_shards)  # the demo loads llm_lora after llm: its tensors win
    _check(f"projector in {p['llm']} / {p['llm_lora']}", unknown=[f"projector.{k}" for k in set(proj) - set(projector_shapes)],
           missing=[f"projector.{k}" for k in set(projector_shapes) - set(proj)],
           mismatched=[f"projector.{k} {tuple(v.shape)} != {projector_shapes[k]}" for k, v in proj.items()
                       if k in projector_shapes and tuple(v.shape) != projector_shapes[k]])
    model.add_lora(enc, LLM_LORA["r"], LLM_LORA["alpha"], sorted(lora))
    enc.load_state_dict({f"{n}.lora_{x}.default.weight": t[f"lora_{x}"] for n, t in lora.items() for x in "AB"}, strict=False)
    model.merge_lora(enc)
    enc.to(save_dtype).save_pretrained(out)
    gc_file = os.path.join(p["llm"], "generation_config.json")
    if os.path.isfile(gc_file):  # as it is: what the demo's generate() merges (save_pretrained may rewrite it)
        shutil.copyfile(gc_file, os.path.join(out, "generation_config.json"))
    try:
        Qwen2_5_VLProcessor.from_pretrained(p["processor"]).save_pretrained(out)
    except (OSError, ValueError) as e:
        raise Error(f"processor {p['processor']}: cannot load it ({type(e).__name__}: {str(e)[:200]}); download it "
                    f"(hf download {BASE_PROCESSOR} --include '*.json' '*.txt' --local-dir DIR) and pass "
                    "--processor DIR to tools/released.py") from None
    return proj, {"tensors": len(seen), "lora_modules": len(lora), "vision_lora": vision, "base_tensors": len(base),
                  "base_differing_from_llm": differ, "projector_from_llm_lora": sorted(from_shards), "dtype": str(save_dtype)}


def read_dit_lora(folder):
    """dit_lora/ (a peft adapter folder) -> (layer config {r, alpha, targets}, {lora_state name: tensor})."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    odd = {k: cfg[k] for k, ok in PEFT_DEFAULTS.items() if k in cfg and cfg[k] not in ok}
    if cfg.get("peft_type", "LORA") != "LORA" or odd:
        raise Error(f"{folder}/adapter_config.json: unsupported adapter settings {odd or cfg.get('peft_type')} (plain LoRA expected)")
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise Error(f"{folder}: no adapter_model.safetensors (pickled adapters are not loaded)")
    tensors, names, unknown = {}, {}, []
    for k, v in load_file(path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m:
            tensors[f"{m[1]}.lora_{m[2]}.default.weight"] = v
            names[f"{m[1]}.lora_{m[2]}.default.weight"] = k
        else:
            unknown.append(k)
    _check(path, unknown=unknown)
    targets = cfg["target_modules"]
    return {"r": cfg["r"], "alpha": cfg["lora_alpha"], "targets": sorted(targets) if isinstance(targets, list) else targets}, tensors, names


def convert(release_dir, out_dir, sd3=None, processor=None):
    """Write out_dir/{encoder, decoder, ckpt} from the release (see the module docstring). -> out_dir."""
    p = locate(release_dir, sd3, processor)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise Error(f"{out_dir} exists and is not empty: choose a new output folder")
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    try:
        hidden = json.load(open(os.path.join(p["llm"], "config.json")))
        hidden = hidden.get("text_config", {}).get("hidden_size") or hidden["hidden_size"]
        jd = json.load(open(os.path.join(p["dit"], "config.json")))["joint_attention_dim"]
        shapes = {"0.weight": (2 * jd, hidden), "0.bias": (2 * jd,), "2.weight": (jd, 2 * jd), "2.bias": (jd,)}
        dit_cfg, dit_t, dit_names = read_dit_lora(p["dit_lora"])  # cheap checks first
        print(f"released: merging {p['llm_lora']} into {p['llm']} ...", flush=True)
        proj, enc_info = convert_encoder(p, os.path.join(out, "encoder"), shapes)
        sd3_dir, dec = _local_sd3(p["sd3"]), os.path.join(out, "decoder")
        os.makedirs(dec)
        for name in sorted(os.listdir(sd3_dir)):
            if name != "transformer" and not name.startswith("."):
                os.symlink(os.path.join(sd3_dir, name), os.path.join(dec, name))
        os.symlink(os.path.abspath(p["dit"]), os.path.join(dec, "transformer"))
        dtype = getattr(torch, enc_info["dtype"].split(".")[-1])
        m = model.load_uae(os.path.join(out, "encoder"), dec, dtype=dtype)
        m.projector.load_state_dict(proj)
        model.add_lora(m.transformer, dit_cfg["r"], dit_cfg["alpha"], dit_cfg["targets"])  # for the key check only
        want = {k: tuple(v.shape) for k, v in model.lora_state(m.transformer).items()}
        _check(f"{p['dit_lora']} (against {p['dit']})", unknown=[dit_names[k] for k in set(dit_t) - set(want)],
               missing=set(want) - set(dit_t), mismatched=[f"{dit_names[k]} {tuple(v.shape)} != {want[k]}"
                                                           for k, v in dit_t.items() if k in want and tuple(v.shape) != want[k]])
        m.layers.append(({"encoder": None, "transformer": dit_cfg}, {f"transformer.{k}": v for k, v in dit_t.items()}))
        gcp = os.path.join(out, "encoder", "generation_config.json")  # the file: load_uae replaces the object
        gcf = json.load(open(gcp)) if os.path.isfile(gcp) else {}
        gen = {k: gcf.get(k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
        info = {"source": os.path.abspath(release_dir), "sd3": sd3_dir, "paths": p, "llm_lora": enc_info,
                "dit_lora": {**dit_cfg, "tensors": len(dit_t)}, "llm_generation_config": gen}
        ck.save_checkpoint(os.path.join(out, "ckpt"), m, {"stage": "released", "converter": CONVERTER, "released": info})
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"released: wrote {out} (llm_lora: {enc_info['lora_modules']} LoRA modules merged, vision tower "
          f"{'included' if enc_info['vision_lora'] else 'not included'}, {enc_info['base_tensors']} base tensors of which "
          f"{enc_info['base_differing_from_llm']} differ from llm/; dit_lora r {dit_cfg['r']} kept as layer 0)", flush=True)
    if gen.get("top_k") not in (None, 0) or gen.get("top_p") not in (None, 1.0) or gen.get("repetition_penalty") not in (None, 1.0):
        print(f"released: note: the demo's generate() also applies llm/generation_config.json {gen}: "
              "--preset_sampling released does too, this project's own captioning (training) does not", flush=True)
    return out


def converted(release_dir, sd3=None, processor=None):
    """`--init released:DIR`: the converted checkpoint, made once under $UAE_HOME (keyed by the release's
    files and the SD3.5 base) and reused; concurrent callers (ranks) wait on a file lock. -> ckpt dir."""
    if os.path.isfile(os.path.join(release_dir, "ckpt", "uae.json")):  # already a converted folder
        return os.path.join(release_dir, "ckpt")
    p = locate(release_dir, sd3, processor)
    d = p["root"]
    files = sorted((os.path.relpath(os.path.join(r, f), d), os.stat(os.path.join(r, f)).st_size,
                    os.stat(os.path.join(r, f)).st_mtime_ns) for r, _, fs in os.walk(d) for f in fs)
    what = [CONVERTER, os.path.abspath(d), p["sd3"], p["processor"], files]
    key = hashlib.sha1(json.dumps(what).encode()).hexdigest()[:12]
    out = os.path.join(images.UAE_HOME, f"released-{key}")
    os.makedirs(images.UAE_HOME, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "ckpt", "uae.json")):
            shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion
            convert(d, out, sd3, processor)
    return os.path.join(out, "ckpt")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("release", help="the downloaded release (a folder, or a hub id such as zhiyuanyan1/UAE)")
    ap.add_argument("out", help="new folder for the converted model; then pass --init OUT to any script")
    ap.add_argument("--decoder", default=None, help=f"SD3.5-large folder or hub id (default: SD3/ in the release, else {model.REAL_DECODER})")
    ap.add_argument("--processor", default=None, help="the processor when the release has none with a complete "
                                                      f"tokenizer (default: {BASE_PROCESSOR}, from the hub cache)")

    def error(message):
        raise Error(f"{message} (see --help)")
    ap.error = error
    a = ap.parse_args(argv)
    hub_id = not a.release.startswith(("/", ".", "~")) and re.fullmatch(r"[\w.-]+/[\w.-]+", a.release)
    for ok, msg in (
            (os.path.isdir(a.release) or hub_id, f"release {a.release}: no such folder (expected the downloaded "
                                                 "release: llm/, llm_lora/, dit/, dit_lora/; or a hub id)"),
            (not a.decoder or not a.decoder.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(a.decoder)),
             f"--decoder {a.decoder}: no such folder"),
            (not a.processor or os.path.isdir(os.path.expanduser(a.processor)), f"--processor {a.processor}: no such folder"),
            (not (os.path.isdir(a.out) and os.listdir(a.out)), f"out {a.out} exists and is not empty: choose a new folder"),
            (not os.path.exists(a.out) or os.path.isdir(a.out), f"out {a.out} exists and is not a folder")):
        if not ok:
            raise Error(msg)
    parent = os.path.abspath(a.out)
    while not os.path.lexists(parent):  # the nearest existing folder on the way up: where the first write happens
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise Error(f"out {a.out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Error(f"out {a.out}: cannot write in {parent} (no write permission, or a read-only file system)")
    convert(a.release, a.out, a.decoder, a.processor)


if __name__ == "__main__":
    try:  # as runs.cli, which this module cannot import (runs imports it): a user error is one line, exit 2
        main()
    except Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
