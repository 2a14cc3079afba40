"""How far this project's sampling is from the authors' inference demo, and which of the four differences does
it, on the synthetic release of tests/test_released.py (tiny random weights, CPU). Not a test: the numbers for
docs/released.md, which quotes them with this command.

    python tests/released_vs_demo.py              # fp32: the preset, and each difference alone
    python tests/released_vs_demo.py --dtype bf16 # the preset at --dtype bf16 against the demo loaded in bf16

DemoRelease is the demo re-implemented with plain transformers, diffusers and peft (tests/test_released.py).
"""
import argparse
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("UAE_HOME", tempfile.mkdtemp(prefix="uae-released-vs-demo-"))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository and tests/ (run as a script)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402

import images  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
import test_released as TR  # noqa: E402
from tools import released as R, tiny  # noqa: E402


def synthetic_release(root):
    """The `release` fixture of tests/test_released.py, and its three images (non-square, square, noise)."""
    torch.manual_seed(1)
    m = runs.load_model(preset="tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(m.transformer.parameters()) + list(m.projector.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    linears = [f"model.{n}" for n, mod in m.encoder.model.named_modules() if isinstance(mod, nn.Linear)]
    m.layers_cfg = {"encoder": M.add_lora(m.encoder, 32, 64, linears),
                    "transformer": M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    rel = TR.write_release(m, *tiny.tiny_paths(), os.path.join(root, "UAE"))
    d = os.path.join(root, "imgs")
    os.makedirs(d)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 72), indexing="ij")
    wide = torch.stack([xx, yy, 1 - xx * yy]) * 255
    Image.fromarray(wide.permute(1, 2, 0).round().byte().numpy()).save(f"{d}/wide.png")
    sq = Image.new("RGB", (48, 48), (30, 90, 200))
    sq.paste((240, 200, 20), (8, 12, 30, 40))
    sq.save(f"{d}/square.png")
    noise = torch.randint(0, 256, (52, 36, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(f"{d}/noise.png")
    return rel, {k: f"{d}/{k}.png" for k in ("wide", "square", "noise")}


def pixels(im):
    if isinstance(im, Image.Image):
        return np.asarray(im, dtype=np.int16)
    return (im.float().cpu().clamp(0, 1) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()


def diff(a, b):
    d = np.abs(pixels(a) - pixels(b))
    return f"max {d.max()}/255, mean {d.mean():.2f}/255"


def same_words(a, b):
    """Words in common before the first difference, of the demo's caption b."""
    n = next((i for i, (x, y) in enumerate(zip(a.split(), b.split())) if x != y), min(len(a.split()), len(b.split())))
    return f"{'identical' if a == b else 'differs'} ({n} of {len(b.split())} words first)"


def crop_pil(path, size):
    """The image as this project's own captioning sees it: center-cropped, resized to the output size."""
    return Image.fromarray((images.load_image(path, size) * 255).round().byte().permute(1, 2, 0).numpy())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ap.parse_args().dtype]
    torch.set_num_threads(2)
    rel, paths = synthetic_release(tempfile.mkdtemp(prefix="released-"))
    demo = TR.DemoRelease(rel, 64, dtype)
    u = runs.load_model(init=f"released:{rel}", dtype=dtype)
    S = R.Sampling()
    print(S.describe(u))
    caps = {k: demo.gen_prompt(p) for k, p in paths.items()}
    for k, p in paths.items():
        print(f"preset, caption of {k}: {same_words(S.caption(u, p), caps[k])}")
    text = caps["wide"]
    want = demo.gen_image(text)
    c, c_neg = u.pair_condition(text)
    print(f"preset, image of the wide image's caption: {diff(u.sample_like_release(c, c_neg, 64, 64)[0], want)}")
    if dtype != torch.float32:
        print(f"the demo itself, fp32 against {ap.parse_args().dtype}: "
              f"{diff(TR.DemoRelease(rel, 64).gen_image(text), want)}")
        merged = TR.DemoRelease(rel, 64)  # its LLM LoRA merged in fp32, then cast, as the converter does
        merged.llm.model = merged.llm.model.merge_and_unload()
        rope = merged.llm.model.language_model.rotary_emb
        inv_freq = rope.inv_freq.clone()
        merged.llm.to(dtype)
        rope.inv_freq.data = inv_freq  # fp32, as from_pretrained(dtype=...) keeps it
        for k, p in paths.items():
            print(f"the demo with its LLM LoRA merged, caption of {k}: {same_words(merged.gen_prompt(p), caps[k])}")
        return
    # each difference alone, the rest as the demo
    for k, p in paths.items():
        torch.manual_seed(0)
        ours = u.caption_like_release(R.qwen_image(p), M.RELEASED_INSTRUCTION, True, max_new_tokens=512, do_sample=True,
                                      temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0)
        print(f"1. generation config not merged (top_k 0, top_p 1, no penalty), {k}: {same_words(ours, caps[k])}")
    for k, p in paths.items():
        ours = u.caption_like_release(crop_pil(p, 64), M.RELEASED_INSTRUCTION, True, **S.generate_kwargs())
        logits = []
        for im in (R.qwen_image(p), crop_pil(p, 64)):
            parts = [{"type": "text", "text": M.RELEASED_INSTRUCTION}, {"type": "image"}]
            t = u.processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                add_generation_prompt=True)
            with torch.no_grad():
                logits.append(u.encoder(**u.processor(text=[t], images=[im], return_tensors="pt")).logits[0, -1])
        print(f"2. input center-cropped to the output size, {k}: {same_words(ours, caps[k])}; first-token logits "
              f"max |diff| {(logits[0] - logits[1]).abs().max().item():.3f}")
    print(f"3. noise seed 0 instead of 42: {diff(u.sample_like_release(c, c_neg, 64, 64, seed=0)[0], want)}")
    noise = torch.randn((1,) + u.latent_shape(64, 64), generator=torch.Generator().manual_seed(42))
    masked = u.generate_images([text], noise=noise)[0]
    print(f"4. this project's masked condition (the demo's noise): {diff(masked, want)}")
    torch.manual_seed(0)
    old = u.sample_captions(images.load_image(paths["wide"], 64)[None], temperature=0.7, max_new_tokens=512,
                            instruction=M.RELEASED_INSTRUCTION, instruction_first=True).texts[0]
    print(f"all four (this project's calls, the demo's settings): caption {same_words(old, text)}; image "
          f"{diff(u.generate_images([old], seed=0, size=64)[0], want)}")


if __name__ == "__main__":
    main()
