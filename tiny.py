"""
The offline `tiny` preset: an encoder and a decoder folder with random weights (seeded), built from
configs and written with save_pretrained, so that every test and the demo load them through the same
from_pretrained code that loads Qwen2.5-VL-3B and SD3.5-large (model.load_uae; model.tiny_paths builds
them once under $UAE_HOME). It carries what a real checkpoint folder carries: a BPE tokenizer with
Qwen2.5-VL's special tokens and chat template, a processor, an SD3 DiT, VAE and scheduler, and SD3's two
CLIP text encoders (for the pooled embedding of "").
"""
import json
import os
import tempfile

import torch

from data import atomic_publish
from model import CHAT_TEMPLATE, INSTRUCTION, NEGATIVE_PROMPT, SPECIAL_TOKENS

TINY_CORPUS = [INSTRUCTION, NEGATIVE_PROMPT, "You are a helpful assistant.",
               "a photo of a red circle at the top left of a blue background, next to a small green square",
               "the image shows two yellow triangles and a large purple star in the center on a white background",
               "there is text in the image that reads \"hello world\" written in black letters",
               "A dog, a cat, a tree, a house, a car and a person stand near the bottom right corner."]


def build_tiny(out_dir, seed=0, corpus=None, image_size=64, vocab_size=512):
    """Build the tiny encoder/decoder with random weights (seeded) and save_pretrained them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
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
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
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


