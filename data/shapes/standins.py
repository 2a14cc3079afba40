"""
Stand-ins for the pretrained parts a real user downloads, trained here in minutes on a
2-core CPU on the shapes world, so that the tiny demo means something (a random CLIP scores every pair ~0.999 and
a random captioner writes noise; docs/algorithm.md §9):

    python data/shapes/prepare.py
    python data/shapes/standins.py --data data/shapes --out out/standins --seed 0
    # model.load_uae("out/standins/encoder", "out/standins/decoder")
    # reward.load_backbone("clip", "out/standins/clip")

writes <out>/encoder      Qwen2.5-VL captioner (save_pretrained model + processor)
       <out>/decoder/{transformer,vae,scheduler}   the DiT is random (stage 1's fm trains it), --dit_* sized
       <out>/clip         open_clip local dir (open_clip_config.json + open_clip_model.safetensors)
       <out>/standins.json   the arguments and the report

1. vae: diffusers AutoencoderKL of build_tiny's family (16 latent channels, 8x down: 64 px -> 8x8), trained
   as an autoencoder (MSE + a tiny KL); scaling/shift factors from the latent statistics (SD3 convention:
   z = (mean - shift) * scale has unit std).
2. clip: an open_clip CLIP trained contrastively on (image, FULL caption) pairs, half of the images
   replaced by their VAE reconstructions, so that the reward cos(f(x), f(x~)) tracks scene content
   (shapes, colours, sizes, positions, background) and not the VAE's blur. Text side: open_clip's default
   BPE (SimpleTokenizer, shipped inside the package), so `open_clip.get_tokenizer("local-dir:<out>/clip")` works.
   What it measures, mostly: the background (it fills most of the picture). Same scene with another
   background: cos ~0.1; one shape dropped: ~0.85; the VAE's own reconstruction: ~0.86.
3. encoder: the tiny Qwen2.5-VL with build_tiny's tokenizer trained on the shapes captions (one token a
   word), a larger language model than build_tiny's default (width 128, rope base 10 instead of 10000: with
   head_dim 32 and base 10000 the height/width sections of M-RoPE barely turn across a 4x4 image grid, and
   positions were not learnt), trained with teacher forcing in model.UAE.caption_inputs' chat template and
   instruction, loss on the caption tokens and the final <|im_end|>: first on FULL captions in reading order
   (--cap_full_frac of the steps: three times the grounded words a step, so it learns to see), then on the
   TERSE ones (prepare.py: the first shape in reading order, sometimes more, the background a third of the time). It starts
   out under-describing, as the paper's captioner does before RL, with some probability of saying more.
   Each step also trains a text-only task (--cap_text_batch): the caption in the decoder's own text-only
   template (UAE.encode_text), reply: the scene restated, background first (restate()). The decoder reads
   this template's last hidden states; a real LVLM's carry what the text says after language pre-training,
   this tiny one's did not (measured: a 2.3M DiT trained 800 fm steps on them ignored the caption; its loss
   with a shuffled caption was the same to 0.1%). With the task, the same DiT learns to read the caption in
   a few hundred steps.
   What it learns in its steps: the background (~0.95 right when named), colours and size above chance;
   shape names and positions stay near chance (a longer --cap_steps helps).
4. decoder: an untrained SD3 DiT, 4 joint blocks x 128 wide (--dit_*). build_tiny's 2 x 32 one cannot learn
   this world (its flow-matching loss stalls near the unconditional one); stage 1's fm trains this one in full.
Deterministic given --seed (and the thread count).
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # prepare.py, then the repo root (model.py, reward.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import images  # noqa: E402
import model  # noqa: E402
import training as T  # noqa: E402
import prepare  # noqa: E402
from tools import tiny  # noqa: E402
from reward import CLIP_MEAN, CLIP_STD  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=HERE, help="folder with train/ and val/ written by prepare.py")
    a("--out", default="out/standins", help="output folder (replaced atomically)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)), help="torch threads (default: "
      "OMP_NUM_THREADS, else 2; results depend on it through float summation order)")
    a("--resolution", dest="size", type=int, default=64, help="image side in pixels")
    a("--n_train", type=int, default=0, help="use the first n training images (0: all)")
    # vae
    a("--vae_steps", type=int, default=250)
    a("--vae_batch", type=int, default=16)
    a("--vae_lr", type=float, default=2e-3)
    a("--vae_kl", type=float, default=1e-4, help="weight of the KL per latent dim (the MSE is per pixel)")
    a("--vae_channels", default="8,16,32,32", help="block_out_channels; 4 blocks = 8x downsampling")
    a("--vae_groups", type=int, default=2, help="norm_num_groups (divides every channel count)")
    # clip
    a("--clip_steps", type=int, default=150)
    a("--clip_batch", type=int, default=128)
    a("--clip_lr", type=float, default=2e-3)
    a("--clip_width", type=int, default=64, help="vision and text width; embed_dim too")
    a("--clip_layers", type=int, default=2, help="vision and text layers")
    a("--clip_recon", type=float, default=0.5, help="fraction of training images replaced by their VAE reconstruction")
    # captioner
    a("--cap_steps", type=int, default=500)
    a("--cap_batch", type=int, default=16)
    a("--cap_lr", type=float, default=3e-3)
    a("--cap_full_frac", type=float, default=0.6, help="first fraction of the steps on FULL captions (in reading "
      "order): 3x the grounded tokens a step, so the captioner learns to see before it learns to be terse")
    a("--cap_hidden", type=int, default=128, help="language model width (build_tiny: 64)")
    a("--cap_layers", type=int, default=2, help="language model layers (build_tiny: 2)")
    a("--cap_vision_hidden", type=int, default=64, help="vision tower width (build_tiny: 32)")
    a("--cap_vision_depth", type=int, default=2, help="vision tower blocks (build_tiny: 2)")
    a("--cap_rope_theta", type=float, default=10.0, help="language model rope base (build_tiny: 10000)")
    a("--cap_text_batch", type=int, default=32, help="text-only 'restate' examples a step (0: off): the caption in "
      "the decoder's text-only template, the reply restates the scene, background first (see restate())")
    # decoder: an untrained SD3 DiT (stage 1's fm trains it, --dit_full), larger than build_tiny's 2 x 32-wide one,
    # which cannot learn this world (its flow-matching loss stalls near the unconditional one)
    a("--dit_layers", type=int, default=4, help="SD3 DiT joint blocks (build_tiny: 2)")
    a("--dit_heads", type=int, default=4, help="attention heads of 32 channels (build_tiny: 2 of 16)")
    a("--dit_joint", type=int, default=64, help="joint_attention_dim: the projector's output width (build_tiny: 32)")
    # report
    a("--eval_n", type=int, default=64, help="val images for the captioner and similarity report")
    a("--eval_G", type=int, default=4, help="captions sampled per val image (temperature 1.0)")
    return p.parse_args(argv)


def load_split(d, size, seed=0):
    """-> images (N, 3, S, S) in [0, 1], records (prepare.py's captions.jsonl lines)."""
    recs = [json.loads(line) for line in open(os.path.join(d, "captions.jsonl")) if line.strip()]
    rng = random.Random(seed)
    for r in recs:  # data written before prepare.py had terse captions
        r.setdefault("terse", prepare.terse_caption(r, rng))
    return torch.stack([images.load_image(os.path.join(d, r["image"]), size) for r in recs]), recs


def schedule(opt, step, lr, total):
    for g in opt.param_groups:
        g["lr"] = T.lr_at(step, lr, max(1, total // 20), total)


def batches(n, B, steps, seed):
    """Seeded index batches, a fresh permutation each epoch (no repeats within a batch)."""
    g, perm, pos = torch.Generator().manual_seed(seed), None, n
    for _ in range(steps):
        idx = []
        while len(idx) < min(B, n):
            if pos >= n:
                perm, pos = torch.randperm(n, generator=g), 0
            take = perm[pos:pos + min(B, n) - len(idx)]
            idx += take.tolist()
            pos += len(take)
        yield torch.tensor(idx)


# ----------------------------------------------------------------------------------------------
# 1. VAE

def build_vae(channels, groups, size):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
                         layers_per_block=1, latent_channels=16, norm_num_groups=groups, sample_size=size,
                         use_quant_conv=False, use_post_quant_conv=False)


def train_vae(X, a):
    torch.manual_seed(a.seed)
    vae = build_vae([int(c) for c in a.vae_channels.split(",")], a.vae_groups, a.size)
    with torch.no_grad():  # log-variance starts at -6 (std 0.05): the decoder sees signal, not noise, from step 0
        vae.encoder.conv_out.bias[vae.config.latent_channels:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 11)
    for step, idx in enumerate(batches(len(X), a.vae_batch, a.vae_steps, a.seed)):
        schedule(opt, step, a.vae_lr, a.vae_steps)
        x = X[idx] * 2 - 1  # (B, 3, S, S) in [-1, 1]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)  # (B, 16, S/8, S/8)
        mse = F.mse_loss(vae.decode(z).sample, x)
        kl = post.kl().mean() / z[0].numel()  # per latent dim
        loss = mse + a.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():  # SD3 convention: z = (mean - shift) * scale has zero mean, unit std over the data
        Z = torch.cat([vae.encode(X[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(X), 256)])
        shift = Z.mean().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (Z - shift).std().item())
    return vae, {"mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def reconstruct(vae, X, bs=256):
    """Posterior mean -> decode, images in [0, 1] (what the DiT's latents decode through)."""
    out = [vae.decode(vae.encode(X[i:i + bs] * 2 - 1).latent_dist.mean).sample for i in range(0, len(X), bs)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def build_dit(a):
    """The decoder's DiT, random (seeded): build_tiny's family, --dit_* wide/deep."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(a.seed + 3)
    return SD3Transformer2DModel(sample_size=a.size // 8, patch_size=2, in_channels=16, out_channels=16,
                                 num_layers=a.dit_layers, attention_head_dim=32, num_attention_heads=a.dit_heads,
                                 joint_attention_dim=a.dit_joint, caption_projection_dim=32 * a.dit_heads,
                                 pooled_projection_dim=32, pos_embed_max_size=a.size // 8, qk_norm="rms_norm")


# ----------------------------------------------------------------------------------------------
# 2. CLIP

def clip_config(a):
    w = a.clip_width
    return dict(embed_dim=w, quick_gelu=True,
                vision_cfg=dict(image_size=a.size, patch_size=8, width=w, layers=a.clip_layers, head_width=32),
                text_cfg=dict(context_length=40, vocab_size=49408, width=w, heads=max(1, w // 32), layers=a.clip_layers))


def train_clip(X, R, captions, a):
    """Contrastive (InfoNCE both ways) on (image or its VAE reconstruction, full caption)."""
    import open_clip
    cfg = clip_config(a)
    torch.manual_seed(a.seed + 1)
    clip = open_clip.CLIP(**cfg)
    T = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])(captions)  # (N, 40)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(clip.parameters(), lr=a.clip_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 12)
    for step, idx in enumerate(batches(len(X), a.clip_batch, a.clip_steps, a.seed + 1)):
        schedule(opt, step, a.clip_lr, a.clip_steps)
        x = X[idx]
        if R is not None and a.clip_recon > 0:
            use = torch.rand(len(idx), generator=g) < a.clip_recon
            x = torch.where(use[:, None, None, None], R[idx], x)
        fi = F.normalize(clip.encode_image((x - mean) / std), dim=-1)  # (B, D)
        ft = F.normalize(clip.encode_text(T[idx]), dim=-1)              # (B, D)
        logits = clip.logit_scale.exp() * fi @ ft.T                   # (B, B)
        y = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, 4.6052)  # <= 100, as CLIP
    clip.eval()
    return clip, cfg, {"loss": loss.item()}


def save_clip(clip, cfg, path):
    from safetensors.torch import save_file
    os.makedirs(path)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": dict(mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
                                                            resize_mode="shortest")}, f, indent=1)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, os.path.join(path, "open_clip_model.safetensors"))


# ----------------------------------------------------------------------------------------------
# 3. Captioner

def captioner_config(base_encoder, a):
    """build_tiny's encoder config (its tokenizer ids) with a larger language model / vision tower."""
    from transformers import Qwen2_5_VLConfig
    cfg = Qwen2_5_VLConfig.from_pretrained(base_encoder)
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = a.cap_hidden, 2 * a.cap_hidden, a.cap_layers
    t.layer_types = ["full_attention"] * a.cap_layers
    hd = a.cap_hidden // t.num_attention_heads  # docs/algorithm.md §9: mrope_section sums to head_dim / 2 (Qwen: 16, 24, 24 of 64)
    t.rope_parameters = {**t.rope_parameters, "mrope_section": [hd // 2 - 2 * (3 * hd // 16), 3 * hd // 16, 3 * hd // 16],
                         "rope_theta": a.cap_rope_theta}
    v.hidden_size, v.intermediate_size, v.depth = a.cap_vision_hidden, 2 * a.cap_vision_hidden, a.cap_vision_depth
    v.out_hidden_size, v.fullatt_block_indexes = a.cap_hidden, [a.cap_vision_depth - 1]
    return cfg


def caption_batch(proc, images, captions):
    """Processor batch of <chat prompt: image + model.INSTRUCTION> + caption + <|im_end|> (right-padded) and
    labels (-100 but on the caption tokens and the <|im_end|>). images: (B, 3, H, W) uint8, one size."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": model.INSTRUCTION}]}]]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)[0]  # = UAE.caption_inputs'
    P = proc(text=[prompt], images=[images[0]], return_tensors="pt")["input_ids"].shape[1]  # the same for every row
    b = proc(text=[prompt + c + "<|im_end|>" for c in captions], images=list(images), return_tensors="pt",
             padding=True, padding_side="right")
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    labels[:, :P] = -100  # (B, P + T)
    return b, labels


def restate(rec):
    """The reply of the text-only task: the scene in a fixed order, background first ("blue background; large red
    circle top left; ..."). Read from a FULL caption, so every part is known. It starts right after the template's
    "assistant\n" with no space, so the tokenizer (it learnt words with their leading space, "Ġblue") splits the
    colour into pieces ("b|l|u|e", "b|l|ack"): the template's last position predicts the first piece, the reply's
    next positions the rest. A leading space (the whole colour word as the first token) was tried and measured
    worse on seed 0: the DiT trained 800 fm steps on it scored 0.10 for a redraw from the full caption, 0.31 with
    this one (one run each; the DiT's reading of the caption varies from run to run)."""
    shapes = [f"{p['size']} {p['color']} {p['shape']} {p['position']}" for p in prepare.reading_order(rec["shapes"])]
    return "; ".join([f"{rec['background']} background"] + shapes) + "."


def restate_batch(proc, captions, replies):
    """Tokenized <model.UAE.encode_text's template over the caption> + reply + <|im_end|>, labels on the reply and
    the <|im_end|>. The decoder reads this template's last hidden states (docs/algorithm.md §2); a stand-in whose language
    model never learnt to read text leaves them without the caption's content at the end of the template."""
    tok = proc.tokenizer
    msgs = [[{"role": "generate", "content": [{"type": "text", "text": c}]}] for c in captions]
    prompts = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    P = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in prompts]
    b = tok([t + r + "<|im_end|>" for t, r in zip(prompts, replies)], return_tensors="pt", padding=True,
            padding_side="right", add_special_tokens=False)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    for i, n in enumerate(P):
        labels[i, :n] = -100
    b["mm_token_type_ids"] = torch.zeros_like(b["input_ids"])
    return b, labels


def train_captioner(base_encoder, X, full, terse, a, text=None):
    """Teacher forcing on <chat prompt with the image and model.INSTRUCTION> + caption + <|im_end|>, loss on
    the caption tokens and the <|im_end|> only: full captions for the first cap_full_frac of the steps, then
    the terse ones. With text = (captions, replies) (and --cap_text_batch > 0), every step also trains the text-only task: read a
    full caption in the decoder's template (model.UAE.encode_text's) and restate the scene, background first.
    A real LVLM's hidden states carry what its text says after language pre-training; this tiny one's would not
    (measured: a DiT trained on them for 800 flow-matching steps ignores the caption entirely), so the demo's
    decoder could not learn to read it in CPU minutes."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    proc = Qwen2_5_VLProcessor.from_pretrained(base_encoder)
    torch.manual_seed(a.seed + 2)
    enc = Qwen2_5_VLForConditionalGeneration(captioner_config(base_encoder, a))
    enc.train()
    u8 = (X * 255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(a.seed + 13)
    opt = torch.optim.AdamW(enc.parameters(), lr=a.cap_lr, weight_decay=0.0)
    for step, idx in enumerate(batches(len(X), a.cap_batch, a.cap_steps, a.seed + 2)):
        schedule(opt, step, a.cap_lr, a.cap_steps)
        caps = full if step < a.cap_full_frac * a.cap_steps else terse
        b, labels = caption_batch(proc, u8[idx], [caps[i] for i in idx])
        loss = enc(**b, labels=labels).loss
        if text is not None and a.cap_text_batch > 0:
            j = torch.randint(len(text[0]), (a.cap_text_batch,), generator=g).tolist()
            tb, tl = restate_batch(proc, [text[0][i] for i in j], [text[1][i] for i in j])
            loss = loss + enc(**tb, labels=tl).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    return enc, proc, {"loss": loss.item()}


PHRASE = re.compile(r"a (small|large) (\w+) (circle|square|triangle) (?:at|in) the "
                    r"(top left|top right|bottom left|bottom right|center)")


def parse_caption(text):
    """-> (background or None, [shape dicts]) if the text is a caption of the shapes grammar, else None."""
    shapes = [dict(size=m[0], color=m[1], shape=m[2], position=m[3]) for m in PHRASE.findall(text)]
    bg = re.search(r" on an? (\w+) background\.$", text)
    bg = bg.group(1) if bg else None
    if not shapes or (bg and bg not in prepare.COLORS) or prepare.describe(bg, shapes) != text:
        return None
    return bg, shapes


def caption_stats(texts, recs):
    """Accuracy and length of captions (texts[i] describes recs[i]). correct: every mentioned shape (size,
    colour, shape, position) and the background, if mentioned, are in the image; per attribute: the fraction of
    mentioned shapes whose colour (shape, ...) some shape in the image has."""
    n, well, ok, mentioned, full, multi, bgs, bg_ok = len(texts), 0, 0, 0, 0, 0, 0, 0
    attr = dict.fromkeys(("size", "color", "shape", "position"), 0)
    for t, r in zip(texts, recs):
        p = parse_caption(t)
        if p is None:
            continue
        bg, shapes = p
        well += 1
        ok += all(s in r["shapes"] for s in shapes) and bg in (None, r["background"])
        mentioned += len(shapes)
        for k in attr:
            attr[k] += sum(any(s[k] == q[k] for q in r["shapes"]) for s in shapes)
        multi += len(r["shapes"]) > 1
        full += len(r["shapes"]) > 1 and len(shapes) == len(r["shapes"])
        bgs += bg is not None
        bg_ok += bg == r["background"]
    return {"correct": ok / n, "well_formed": well / n, "words": sum(len(t.split()) for t in texts) / max(n, 1),
            "shapes_mentioned": mentioned / max(well, 1), "all_shapes": full / max(multi, 1),
            "background": bgs / max(well, 1), "background_correct": bg_ok / max(bgs, 1),
            **{f"{k}_correct": v / max(mentioned, 1) for k, v in attr.items()}}


# ----------------------------------------------------------------------------------------------
# Report

def pil_tensor(im):
    import numpy as np
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


@torch.no_grad()
def clip_report(clip, bb, vae, Xv, recs, seed):
    """Retrieval on val (image -> its caption among all) and the image-image similarity ladder."""
    import open_clip
    n = len(recs)
    tok = open_clip.SimpleTokenizer(context_length=clip.context_length)
    ft = F.normalize(clip.encode_text(tok([r["caption"] for r in recs])), dim=-1)
    fi = bb(Xv)  # through reward.Backbone: the reward's own preprocessing
    top1 = ((fi @ ft.T).argmax(1) == torch.arange(n)).float().mean().item()
    rng = random.Random(seed)
    size = Xv.shape[-1]
    render = lambda bg, shapes: pil_tensor(prepare.render(bg, shapes, size))
    other_bg, drop_one, one_shape = [], [], []
    for r in recs:
        bgs = [c for c in prepare.COLORS if c != r["background"] and all(c != s["color"] for s in r["shapes"])]
        other_bg.append(render(rng.choice(bgs), r["shapes"]))
        drop_one.append(render(r["background"], r["shapes"][:-1]) if len(r["shapes"]) > 1 else None)
        one_shape.append(render(rng.choice(bgs), r["shapes"][:1]))  # what a one-shape terse caption pins down
    sim = lambda Y: (fi * bb(Y)).sum(-1)
    sim_at = lambda idx, Y: (fi[idx] * bb(Y)).sum(-1)
    keep = [i for i, d in enumerate(drop_one) if d is not None]  # scenes with 2+ shapes
    return {"retrieval_top1": top1, "n": n,
            "sim_vae_recon": sim(reconstruct(vae, Xv)).mean().item(),
            "sim_drop_one_shape": (sim_at(keep, torch.stack([drop_one[i] for i in keep])).mean().item()
                                   if keep else float("nan")),
            "sim_other_background": sim(torch.stack(other_bg)).mean().item(),
            "sim_one_shape_other_bg": sim(torch.stack(one_shape)).mean().item(),
            "sim_other_scene": sim(Xv.roll(1, 0)).mean().item()}


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # Adam's second moments go denormal on tiny models: 10x slower steps without it
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t_all = time.time()
    X, recs = load_split(os.path.join(a.data, "train"), a.size, a.seed)
    if a.n_train:
        X, recs = X[:a.n_train], recs[:a.n_train]
    Xv, vrecs = load_split(os.path.join(a.data, "val"), a.size, a.seed + 1)
    Xv, vrecs = Xv[:a.eval_n], vrecs[:a.eval_n]
    parent = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".standins-")
    rep, times = {}, {}

    t = time.time()  # build_tiny: the tokenizer trained on the shapes captions, the processor, the DiT, the scheduler
    corpus = tiny.TINY_CORPUS + sorted({r["caption"] for r in recs})
    tiny.build_tiny(f"{tmp}/base", seed=a.seed, corpus=corpus, image_size=a.size)
    os.makedirs(f"{tmp}/decoder")
    shutil.move(f"{tmp}/base/decoder/scheduler", f"{tmp}/decoder/scheduler")
    build_dit(a).save_pretrained(f"{tmp}/decoder/transformer", safe_serialization=True)
    times["build_tiny"] = time.time() - t

    t = time.time()
    vae, rep["vae"] = train_vae(X, a)
    vae.save_pretrained(f"{tmp}/decoder/vae")
    times["vae"] = time.time() - t
    print(f"vae:  mse {rep['vae']['mse']:.4f}  kl/dim {rep['vae']['kl']:.3f}  scale {vae.config.scaling_factor:.3f} "
          f"shift {vae.config.shift_factor:.3f}  ({times['vae']:.0f} s)", flush=True)

    t = time.time()
    R = reconstruct(vae, X) if a.clip_recon > 0 else None
    clip, cfg, rep["clip"] = train_clip(X, R, [r["caption"] for r in recs], a)
    save_clip(clip, cfg, f"{tmp}/clip")
    times["clip"] = time.time() - t
    print(f"clip: loss {rep['clip']['loss']:.3f}  ({times['clip']:.0f} s)", flush=True)

    t = time.time()
    full = [prepare.describe(r["background"], prepare.reading_order(r["shapes"])) for r in recs]
    text = (full + [r["caption"] for r in recs], [restate(r) for r in recs] * 2)  # both orders the decoder reads
    enc, proc, rep["captioner"] = train_captioner(f"{tmp}/base/encoder", X, full, [r["terse"] for r in recs], a, text)
    enc.save_pretrained(f"{tmp}/encoder")
    proc.save_pretrained(f"{tmp}/encoder")
    shutil.rmtree(f"{tmp}/base")
    times["captioner"] = time.time() - t
    print(f"captioner: loss {rep['captioner']['loss']:.3f}  ({times['captioner']:.0f} s)", flush=True)

    # report, through the very loaders the stage scripts use
    import reward
    t = time.time()
    m = model.load_uae(f"{tmp}/encoder", f"{tmp}/decoder")
    torch.manual_seed(a.seed)
    texts = m.sample_captions(Xv, G=a.eval_G, temperature=1.0, max_new_tokens=64).texts
    rep["captions"] = caption_stats(texts, [r for r in vrecs for _ in range(a.eval_G)])
    rep["captions"]["terse_data"] = caption_stats([r["terse"] for r in vrecs], vrecs)
    rep["captions"]["examples"] = texts[:: a.eval_G][:4]
    k = min(8, len(Xv))  # a picture to look at: source | VAE reconstruction, one sampled caption under each row
    images.save_grid(f"{tmp}/samples.png", [Xv[:k], reconstruct(vae, Xv[:k])], labels=texts[:: a.eval_G][:k], size=128)
    rep["clip"].update(clip_report(clip, reward.load_backbone("clip", f"{tmp}/clip"), vae, Xv, vrecs, a.seed))
    times["report"] = time.time() - t
    times["total"] = time.time() - t_all
    rep["seconds"] = times
    with open(f"{tmp}/standins.json", "w") as f:
        json.dump({"args": vars(a), "report": rep}, f, indent=1)
    images.atomic_publish(tmp, a.out)

    c, k, d = rep["captions"], rep["clip"], rep["captions"]["terse_data"]
    print(f"captions (val, T=1.0, {len(texts)}): correct {c['correct']:.2f} (colour {c['color_correct']:.2f} shape "
          f"{c['shape_correct']:.2f} size {c['size_correct']:.2f} position {c['position_correct']:.2f} background "
          f"{c['background_correct']:.2f})  well-formed {c['well_formed']:.2f}\n"
          f"    length: words {c['words']:.1f}  shapes {c['shapes_mentioned']:.2f}  all shapes {c['all_shapes']:.2f}  "
          f"background {c['background']:.2f}   (terse data: {d['words']:.1f}, {d['shapes_mentioned']:.2f}, "
          f"{d['all_shapes']:.2f}, {d['background']:.2f})")
    for e in c["examples"]:
        print("   ", e)
    print(f"clip (val, {k['n']}): image->caption top-1 {k['retrieval_top1']:.2f} (chance {1 / k['n']:.2f});  cos(x, .): "
          f"vae recon {k['sim_vae_recon']:.3f}  drop one shape {k['sim_drop_one_shape']:.3f}  other background "
          f"{k['sim_other_background']:.3f}  one shape + other bg {k['sim_one_shape_other_bg']:.3f}  other scene "
          f"{k['sim_other_scene']:.3f}")
    print("seconds: " + "  ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"  -> {a.out}")
    return rep


if __name__ == "__main__":
    main()
