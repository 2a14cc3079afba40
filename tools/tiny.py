"""
The offline `tiny` preset (a tool, not the method): an encoder and a decoder folder with random weights
(seeded), built from configs and written with save_pretrained, so that every test and the demo load them
through the same from_pretrained code that loads Qwen2.5-VL-3B and SD3.5-large (model.load_uae; tiny_paths
builds them once under $UAE_HOME). It carries what a real checkpoint folder carries: a BPE tokenizer with
Qwen2.5-VL's special tokens and chat template, a processor, an SD3 DiT, VAE and scheduler, and SD3's two
CLIP text encoders (for the pooled embedding of ""). Also the tiny versions of the four benchmark
backbones (reward.py), in the formats the real ones load from.
"""
import json
import os
import tempfile

import torch

import open_clip
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, DINOv3ViTConfig, DINOv3ViTModel,
                          Dinov2Config, Dinov2Model, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
from transformers.utils.logging import disable_progress_bar
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from images import UAE_HOME, atomic_publish
from model import CHAT_TEMPLATE, INSTRUCTION, NEGATIVE_PROMPT, SPECIAL_TOKENS
from reward import CLIP_MEAN, CLIP_STD

TINY_CORPUS = [INSTRUCTION, NEGATIVE_PROMPT, "You are a helpful assistant.",
               "a photo of a red circle at the top left of a blue background, next to a small green square",
               "the image shows two yellow triangles and a large purple star in the center on a white background",
               "there is text in the image that reads \"hello world\" written in black letters",
               "A dog, a cat, a tree, a house, a car and a person stand near the bottom right corner."]


def tiny_paths(seed=0):
    """The tiny preset's (encoder, decoder) directories, built once per seed under $UAE_HOME."""
    d = os.path.join(UAE_HOME, f"tiny-v3-seed{seed}")
    if not os.path.exists(os.path.join(d, "decoder", "scheduler")):
        os.makedirs(UAE_HOME, exist_ok=True)
        build_tiny(d, seed=seed)
    return os.path.join(d, "encoder"), os.path.join(d, "decoder")


def build_tiny(out_dir, seed=0, corpus=None, image_size=64, vocab_size=512):
    """Build the tiny encoder/decoder with random weights (seeded) and save_pretrained them."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator((corpus or TINY_CORPUS) * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe_json["merges"]]
    tok = Qwen2Tokenizer(vocab=bpe_json["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    patch = 8
    improc = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                   min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    proc = Qwen2_5_VLProcessor(image_processor=improc, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                               video_processor=Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2))
    vocab = (len(tok) + 63) // 64 * 64  # padded vocab rows, as in the real model
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=32, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    enc = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # realistic logit scale: at init std 0.02 sampling is near-uniform and
        enc.lm_head.weight.normal_(0, 0.25)  # no adapter inside the 2 layers can move it
    dit = SD3Transformer2DModel(sample_size=image_size // 8, patch_size=2, in_channels=16, num_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                                pos_embed_max_size=image_size // 8, qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=image_size,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # SD3's two CLIP text encoders, only for the pooled embedding of "" (docs/algorithm.md §2); proj dims sum to P
    chars = [chr(i) for i in range(33, 127)]
    clip_vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    torch.manual_seed(seed + 1)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=len(clip_vocab) - 2, eos_token_id=len(clip_vocab) - 1,
        pad_token_id=len(clip_vocab) - 1)) for _ in range(2)]
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".", prefix=".tiny-")
    enc.save_pretrained(f"{tmp}/encoder")
    proc.save_pretrained(f"{tmp}/encoder")
    dit.save_pretrained(f"{tmp}/decoder/transformer")
    vae.save_pretrained(f"{tmp}/decoder/vae")
    sched.save_pretrained(f"{tmp}/decoder/scheduler")
    for sub, clip in (("", clips[0]), ("_2", clips[1])):
        clip.save_pretrained(f"{tmp}/decoder/text_encoder{sub}")
        clip_tok.save_pretrained(f"{tmp}/decoder/tokenizer{sub}")
    atomic_publish(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Tiny random-weight versions (<= ~120K parameters each, 32 px input, patch 8), built offline:
#   $UAE_HOME/tiny-backbones-v1-seed0/clip/{open_clip_config.json, open_clip_model.safetensors}
#                                    /longclip-visual.safetensors   (OpenAI-format visual.* tensors)
#                                    /dinov2/{config.json, model.safetensors}
#                                    /dinov3/{config.json, model.safetensors}

TINY_FILES = {"clip": "clip", "longclip": "longclip-visual.safetensors", "dinov2": "dinov2", "dinov3": "dinov3"}


def build_tiny_backbones(root, seed=0):
    """Write tiny seeded random-weight versions of the four bench backbones under `root` (published
    atomically) in the formats the real ones load from; returns name -> path."""
    disable_progress_bar()
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny-backbones-")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # clip: an open_clip local-dir (open_clip_config.json + open_clip_model.safetensors)
        model_cfg = dict(embed_dim=32, quick_gelu=True,
                         vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                         text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
        clip = open_clip.CLIP(**model_cfg)
        os.makedirs(f"{tmp}/clip")
        with open(f"{tmp}/clip/open_clip_config.json", "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": dict(mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
                                                                      resize_mode="shortest")}, f, indent=1)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, f"{tmp}/clip/open_clip_model.safetensors")
        # longclip: the OpenAI-format vision tower (visual.*), width 64 -> 1 head of 64 as OpenAI's
        vit = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=1, mlp_ratio=4.0,
                                output_dim=32, act_layer=QuickGELU, norm_layer=LayerNorm)
        save_file({"visual." + k: v.contiguous() for k, v in vit.state_dict().items()}, f"{tmp}/{TINY_FILES['longclip']}")
        # dinov2 / dinov3: transformers save_pretrained (config.json + model.safetensors)
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                 image_size=32, patch_size=8)).save_pretrained(f"{tmp}/dinov2")
        DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, num_register_tokens=1)).save_pretrained(f"{tmp}/dinov3")
    atomic_publish(tmp, root)
    return {k: os.path.join(root, v) for k, v in TINY_FILES.items()}


def tiny_backbone_paths(seed=0):
    """name -> path of the tiny backbones, built once per seed under $UAE_HOME/tiny-backbones-v1-seed{seed}."""
    root = os.path.join(UAE_HOME, f"tiny-backbones-v1-seed{seed}")
    if not os.path.exists(root):
        build_tiny_backbones(root, seed)
    return {k: os.path.join(root, v) for k, v in TINY_FILES.items()}
