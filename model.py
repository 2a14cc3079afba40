"""
UAE: image -> encoder E (Qwen2.5-VL) -> caption -> E re-reads the caption (text only) ->
projector g -> decoder D (SD3 DiT + VAE + flow-matching scheduler) -> image.

One code path for the real checkpoints and the offline `tiny` preset (built from configs with
random weights, saved with save_pretrained, loaded back with from_pretrained).

Flow convention (docs/algorithm.md §2), used everywhere in this repo:
    x_s = (1 - s) x0 + s eps,  s in [0, 1],  s = 1 is noise, s = 0 is data,
    the DiT predicts v = eps - x0,  x0_hat = x_s - s v,  DiT timestep = 1000 s.
"""
import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (CLIPTextModelWithProjection, CLIPTokenizer, DynamicCache, GenerationConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as hf_logging

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INSTRUCTION = ("You are an expert vision-language model. Your task is: Given an input image, generate a "
               "textual description of the image. If there is text in the image, transcribe it inside "
               "double quotes. Now, carefully analyze the input image and output the full description.")
# the released demo's captioning question, verbatim (its gen_prompt puts it before the image: instruction_first)
RELEASED_INSTRUCTION = ("You are an expert vision-language model.  \nYour task is: Given an input image, generate a "
                        "**textual description** of the image. If there is text in the image, transcribe it inside "
                        "double quotes \"\".  \nNow, carefully analyze the input image and output the full "
                        "description. ")
NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
REAL_ENCODER = "Qwen/Qwen2.5-VL-3B-Instruct"
REAL_DECODER = "stabilityai/stable-diffusion-3.5-large"

# Qwen2.5-VL's chat template and special tokens (the tiny tokenizer carries the same ones).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def instruction_text(flag):
    """--instruction: '' = INSTRUCTION (this project's), 'released' = RELEASED_INSTRUCTION, else the text itself."""
    return {"": INSTRUCTION, "released": RELEASED_INSTRUCTION}.get(flag, flag)


# LoRA targets. Encoder: every linear layer of the language model (released UAE). DiT: Flow-GRPO's.
ENCODER_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DIT_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


# ----------------------------------------------------------------------------------------------
# Masked joint attention: SD3's processor attends to every text token; ours masks padded ones,
# so a batch of captions of different lengths gives what each caption alone would.

class MaskedJointAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        B, N = hidden_states.shape[:2]
        def heads(x):  # (B, T, h*d) -> (B, h, T, d)
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        mask = None
        if encoder_hidden_states is not None:
            cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                          heads(attn.add_v_proj(encoder_hidden_states)))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            if attention_mask is not None:  # (B, L) text mask -> (B, 1, 1, N + L) key mask
                keep = torch.cat([attention_mask.new_ones(B, N), attention_mask], 1).bool()
                mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, -1, q.shape[1] * q.shape[-1])
        out = out.to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](out)), ctx


# ----------------------------------------------------------------------------------------------
# LoRA through peft, injected in place (the modules keep their classes, generate() still works).

def add_lora(module, r, alpha, targets):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian", lora_dropout=0.0)
    inject_adapter_in_model(cfg, module, adapter_name="default")
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return {"r": r, "alpha": alpha, "targets": targets}


def lora_state(module):
    return {n: p.detach() for n, p in module.named_parameters() if "lora_" in n}


def has_lora(module):
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextlib.contextmanager
def adapters_disabled(module):
    """The reference policy: the same module with its LoRA switched off (docs/algorithm.md §4, §5)."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(module):
    """Fold the adapter into the base weights and remove it, so a next stage can add a fresh one."""
    for name, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


# ----------------------------------------------------------------------------------------------

@dataclass
class Cond:
    """Decoder condition: prompt embeddings c = g(H) (N, L, D), text mask (N, L), pooled (N, P)."""
    emb: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def repeat_interleave(self, G):
        return Cond(self.emb.repeat_interleave(G, 0), self.mask.repeat_interleave(G, 0), self.pooled.repeat_interleave(G, 0))

    def expand(self, N):
        return Cond(self.emb.expand(N, -1, -1), self.mask.expand(N, -1), self.pooled.expand(N, -1))


def cat_conds(a, b):
    """Stack two conditions along the batch, right-padding the shorter one (masked anyway)."""
    L = max(a.emb.shape[1], b.emb.shape[1])
    pe = lambda x: F.pad(x, (0, 0, 0, L - x.shape[1]))
    pm = lambda m: F.pad(m, (0, L - m.shape[1]))
    return Cond(torch.cat([pe(a.emb), pe(b.emb)]), torch.cat([pm(a.mask), pm(b.mask)]), torch.cat([a.pooled, b.pooled]))


@dataclass
class Rollout:
    """G captions for each of B images, N = B*G rows, everything needed to recompute log-probs."""
    prompt_ids: torch.Tensor       # (N, P) left-padded chat prompt with the image tokens
    prompt_mask: torch.Tensor      # (N, P)
    mm_token_type_ids: torch.Tensor  # (N, P) 1 on image tokens
    pixel_values: torch.Tensor     # (sum of patches over N rows, D) flattened patches, repeated per image
    image_grid_thw: torch.Tensor   # (N, 3)
    completion_ids: torch.Tensor   # (N, T) sampled tokens, pad after the first EOS
    completion_mask: torch.Tensor  # (N, T) float, 1 up to and including the first EOS
    texts: list                    # N decoded captions
    truncated: torch.Tensor        # (N,) bool, no EOS within max_new_tokens
    image_embeds: tuple = None     # N x (image tokens, hidden): the vision tower's output, computed once per image
                                   # (G rows share one tensor); None: completion_logprobs runs the tower on pixel_values

    def rows(self, i, j):
        """Rows i..j-1 (a micro-batch); pixel patches are sliced by each row's grid size."""
        per = self.image_grid_thw.prod(-1)
        start, stop = int(per[:i].sum()), int(per[:j].sum())
        return Rollout(self.prompt_ids[i:j], self.prompt_mask[i:j], self.mm_token_type_ids[i:j],
                       self.pixel_values[start:stop], self.image_grid_thw[i:j], self.completion_ids[i:j],
                       self.completion_mask[i:j], self.texts[i:j], self.truncated[i:j],
                       None if self.image_embeds is None else self.image_embeds[i:j])

    @staticmethod
    def cat(parts, pad_id):
        """Rollouts one after another: prompts left-padded, completions right-padded to a common length."""
        T = max(p.completion_ids.shape[1] for p in parts)
        P = max(p.prompt_ids.shape[1] for p in parts)
        padr = lambda t, n, v: F.pad(t, (0, n - t.shape[1]), value=v)
        padl = lambda t, n, v: F.pad(t, (n - t.shape[1], 0), value=v)
        return Rollout(torch.cat([padl(p.prompt_ids, P, pad_id) for p in parts]),
                       torch.cat([padl(p.prompt_mask, P, 0) for p in parts]),
                       torch.cat([padl(p.mm_token_type_ids, P, 0) for p in parts]),
                       torch.cat([p.pixel_values for p in parts]), torch.cat([p.image_grid_thw for p in parts]),
                       torch.cat([padr(p.completion_ids, T, pad_id) for p in parts]),
                       torch.cat([padr(p.completion_mask, T, 0) for p in parts]),
                       sum((p.texts for p in parts), []), torch.cat([p.truncated for p in parts]),
                       None if any(p.image_embeds is None for p in parts) else sum((p.image_embeds for p in parts), ()))


class UAE(nn.Module):
    def __init__(self, encoder, processor, transformer, vae, scheduler, pooled=None, base=None):
        super().__init__()
        self.encoder, self.processor, self.tokenizer = encoder, processor, processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.base = base or {}
        hidden, jd = encoder.config.text_config.hidden_size, transformer.config.joint_attention_dim
        # docs/algorithm.md §2 projector g: Linear(hidden, 2*jd) -> GELU -> Linear(2*jd, jd), jd = DiT joint_attention_dim
        with torch.random.fork_rng(devices=[]):  # the same initial projector in every process/rank
            torch.manual_seed(0)
            self.projector = nn.Sequential(nn.Linear(hidden, 2 * jd), nn.GELU(), nn.Linear(2 * jd, jd))
        P = transformer.config.pooled_projection_dim
        # docs/algorithm.md §2: constant pooled projection (SD3's CLIP pooled embedding of ""; zeros when absent)
        self.register_buffer("pooled", torch.zeros(P) if pooled is None else pooled.reshape(P))
        self.transformer.set_attn_processor(MaskedJointAttnProcessor())
        for m in (self.encoder, self.transformer, self.vae, self.projector):  # stages unfreeze what they train
            m.requires_grad_(False)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id
        # Random LVLMs sample special tokens (<|image_pad|> breaks a re-fed sequence): forbid every
        # special token but EOS, and the padded vocab rows, in sampling and in log-prob recomputation.
        V = encoder.get_output_embeddings().weight.shape[0]
        banned = [i for i in self.tokenizer.all_special_ids if i != self.eos_id]
        banned += [self.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != "<|im_end|>"]
        banned += list(range(len(self.tokenizer), V))
        self.register_buffer("suppress", torch.zeros(V, dtype=torch.bool).index_fill_(0, torch.tensor(sorted(set(banned))), True), persistent=False)
        self.layers = []   # adapters of earlier stages merged into the weights: [(meta, tensors)], kept for saving
        # Rollouts must not depend on the checkpoint's generation_config.json (Qwen2.5-VL-Instruct: top_k 1,
        # repetition_penalty 1.05, ...): generate() fills every field left unset from it. Replace it by an empty one;
        # the file's stays here for caption_like_release, which runs generate() as the released demo does.
        self.checkpoint_generation_config = encoder.generation_config
        encoder.generation_config = GenerationConfig(bos_token_id=encoder.config.text_config.bos_token_id,
                                                     eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        # the KV cache's keyword in the encoder's forward (transformers renamed past_key_values to cache)
        self._cache_kw = "cache" if "cache" in inspect.signature(encoder.forward).parameters else "past_key_values"
        self.compute_dtype = torch.float32

    @property
    def device(self):
        return self.projector[0].weight.device

    @property
    def dtype(self):
        """The compute dtype (--dtype): frozen weights are stored in it, every forward runs in it."""
        return self.compute_dtype

    def precision(self, dtype=None):
        """docs/algorithm.md §8, the one precision policy: trainable parameters (requires_grad: LoRA, projector,
        a fully trained DiT) and the projector are held in fp32 (AdamW steps of ~lr vanish against bf16 weights of
        ~0.03); frozen weights in `dtype`; every forward of this class runs under autocast(dtype)."""
        self.compute_dtype = dtype or self.compute_dtype
        for name, p in self.named_parameters():
            keep32 = p.requires_grad or name.startswith("projector.")
            p.data = p.data.float() if keep32 else p.data.to(self.compute_dtype)
        return self

    def autocast(self):
        """Forward passes in the compute dtype while fp32 weights (trainable ones) stay fp32: autocast casts
        each matmul's inputs; with fp32 it is off. Sampling and training go through it alike (one dtype)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    # ---------------- encoder: captions ----------------
    def caption_inputs(self, images, instruction=INSTRUCTION, instruction_first=False):
        """images (B, 3, H, W) in [0, 1] -> processor batch (left-padded) on device. The user turn is image then
        instruction (instruction_first: the released demo's order)."""
        parts = [{"type": "image"}, {"type": "text", "text": instruction}]
        msgs = [[{"role": "user", "content": parts[::-1] if instruction_first else parts}]] * len(images)
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        pix = [(im.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu() for im in images]
        return self.processor(text=text, images=pix, return_tensors="pt", padding=True).to(self.device)

    @torch.no_grad()
    def sample_captions(self, images, G=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=512,
                        instruction=INSTRUCTION, output_scores=False, instruction_first=False):
        """B images -> B*G captions in one batched decode (rows i*G..i*G+G-1 belong to image i). The vision tower
        and the prompt run once per image, not per row (decode); the tower's output rides in the Rollout for
        completion_logprobs."""
        b = self.caption_inputs(images, instruction, instruction_first)
        per_img = b["image_grid_thw"].prod(-1).tolist()
        pix = torch.cat([p for p in b["pixel_values"].split(per_img) for _ in range(G)])  # repeat per image
        with self.autocast():
            feats = self.encoder.model.get_image_features(b["pixel_values"], b["image_grid_thw"], return_dict=True)
            comp, scores = self.sample_tokens(b["input_ids"], b["attention_mask"], b["mm_token_type_ids"],
                                              b["image_grid_thw"], feats.pooler_output, G, temperature, top_p, top_k,
                                              max_new_tokens, output_scores)
        is_eos = comp == self.eos_id
        # mask: 1 up to and including the first EOS, 0 after (docs/algorithm.md §4)
        cmask = (is_eos.cumsum(1) - is_eos.long()) == 0
        comp = comp.masked_fill(~cmask, self.pad_id)
        texts = self.tokenizer.batch_decode(comp.masked_fill(is_eos, self.pad_id), skip_special_tokens=True)
        rep = lambda t: t.repeat_interleave(G, 0)
        emb = tuple(e for e in feats.pooler_output for _ in range(G))  # N x (image tokens, hidden), shared per image
        r = Rollout(rep(b["input_ids"]), rep(b["attention_mask"]), rep(b["mm_token_type_ids"]), pix,
                    rep(b["image_grid_thw"]), comp, cmask.float(), [t.strip() for t in texts], ~is_eos.any(1), emb)
        if output_scores:
            return r, scores  # (N, T, V) processed scores of the sampling pass
        return r

    def sample_tokens(self, ids, mask, mm, grid, image_embeds, G=1, temperature=1.0, top_p=1.0, top_k=0,
                      max_new_tokens=512, output_scores=False):
        """G samples of each of B prompts: the KV-cached sampling loop of transformers' generate
        (GenerationMixin._sample) over the B*G repeated rows, with what a rollout needs and nothing else; every draw
        is generate's under the same torch seed, token for token (tests/test_rollout.py). The prompt (prefill) runs
        once per image and its KV cache is repeated G times; the decode steps run the language model and the head
        (the image is in the cache). Each step: logits of the last position in fp32; suppressed ids -> -inf;
        / temperature; top-k, top-p (off in stage 2: completion_logprobs scores the untruncated distribution);
        softmax; one multinomial draw over all N rows (finished rows too, as generate: the random stream advances
        alike); a finished row gets pad. Greedy (temperature 0): argmax after the suppression. Stops when every row
        has sampled EOS. ids, mask, mm (B, P) left-padded prompts; grid (B, 3); image_embeds B x (image tokens,
        hidden). -> (tokens (N, T), processed scores (N, T, V) or None), N = B*G, T <= max_new_tokens."""
        enc, lm = self.encoder, self.encoder.model.language_model
        cache = DynamicCache(config=enc.config)
        # generate's position ids: row 0 the text positions (what the causal mask reads), rows 1-3 Qwen's 3D
        # rotary positions (get_rope_index); each decoded token one further on every row
        text_pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)                      # (B, P)
        pos = torch.cat([text_pos[None], enc.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                                  attention_mask=mask)[0]])   # (4, B, P)
        padded = not bool(mask.all())  # generate drops an all-ones mask (the causal mask alone is then exact)
        h = enc.model(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid, position_ids=pos,
                      attention_mask=mask if padded else None, use_cache=True,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=image_embeds)},
                      **{self._cache_kw: cache}).last_hidden_state[:, -1:]                # (B, 1, hidden)
        cache.batch_repeat_interleave(G)                                                   # (N, heads, P, d) per layer
        logits = enc.lm_head(h.repeat_interleave(G, 0))  # (N, 1, V): the head over N rows, as generate's
        mask, pos, N = mask.repeat_interleave(G, 0), pos[..., -1:].repeat_interleave(G, 1), len(logits)
        sample, warp = temperature > 0, []  # generate's warpers, in its order, only where they change something
        if sample and temperature != 1:
            warp.append(TemperatureLogitsWarper(temperature))
        if sample and top_k > 0:
            warp.append(TopKLogitsWarper(top_k=top_k))
        if sample and top_p < 1:
            warp.append(TopPLogitsWarper(top_p=top_p))
        unfinished = torch.ones(N, dtype=torch.bool, device=ids.device)
        tokens, scores = [], []
        while True:
            s = logits[:, -1].float().masked_fill(self.suppress, float("-inf"))                # (N, V)
            for w in warp:
                s = w(None, s)
            nxt = torch.multinomial(s.softmax(-1), 1).squeeze(1) if sample else s.argmax(-1)         # (N,)
            nxt = torch.where(unfinished, nxt, self.pad_id)
            unfinished &= nxt != self.eos_id
            tokens.append(nxt)
            if output_scores:
                scores.append(s)
            if not unfinished.any() or len(tokens) == max_new_tokens:
                break
            pos = pos + 1                                                                      # (4, N, 1)
            mask = torch.cat([mask, mask.new_ones(N, 1)], 1) if padded else mask
            h = lm(input_ids=nxt[:, None], position_ids=pos, attention_mask=mask if padded else None, use_cache=True,
                   **{self._cache_kw: cache}).last_hidden_state                            # (N, 1, hidden)
            logits = enc.lm_head(h)                                                            # (N, 1, V)
        return torch.stack(tokens, 1), torch.stack(scores, 1) if output_scores else None

    def sample_captions_seeded(self, images, seeds, **gen):
        """sample_captions one image at a time, image b under torch seed seeds[b] (CPU and CUDA streams restored
        afterwards): captions that do not depend on how images are batched or split over ranks. -> Rollout."""
        parts = []
        for b, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                parts.append(self.sample_captions(images[b:b + 1], **gen))
        return Rollout.cat(parts, self.pad_id)

    def completion_logprobs(self, r, temperature=1.0, with_entropy=False):
        """Per-token log pi(y_t | x, y_<t), (N, T) fp32, exactly as sampled: suppressed ids masked,
        logits / temperature, selective log-softmax (gather - logsumexp, one row at a time, never
        the full (N, T, V) log-softmax), on completion_logits."""
        logits = self.completion_logits(r)  # (N, T, V)
        lps, ents = [], []
        for row, tgt in zip(logits, r.completion_ids):  # row (T, V)
            row = row.float().masked_fill(self.suppress, float("-inf")) / max(temperature, 1e-6)
            lse = row.logsumexp(-1)
            lps.append(row.gather(-1, tgt[:, None]).squeeze(-1) - lse)
            if with_entropy:
                with torch.no_grad():
                    p = (row - lse[:, None]).exp()
                    ents.append(lse - (p * row.nan_to_num(neginf=0.0)).sum(-1))
        # positions after the first EOS hold pad (a suppressed id, log-prob -inf): zero them
        lp = torch.where(r.completion_mask.bool(), torch.stack(lps), 0.0)
        return (lp, torch.stack(ents)) if with_entropy else lp

    def completion_logits(self, r):
        """The logits that score y_1..y_T, (N, T, V) in the compute dtype. The vision tower is frozen (no LoRA): the
        rollout's output of it is reused when the Rollout carries it (the same numbers as running the tower again).
        Then rows that share a prompt (the G captions of an image: one vision output, the same prompt ids) run it
        once: its KV cache is computed once and gathered to its rows, and the completions run against it (the same
        function as one pass over each row's prompt + completion, in other float roundings; reference, old and
        policy log-probs all take this path, so the first ratio is exactly 1 and the KL of an adapter that changes
        nothing exactly 0). One pass per row without the rollout's vision output, and under gradient checkpointing
        (it drops KV caches in the policy pass; every pass of the run then takes the one-pass path alike)."""
        enc, (N, P), T = self.encoder, r.prompt_ids.shape, r.completion_ids.shape[1]
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)                                # (N, P + T)
        attn = torch.cat([r.prompt_mask, torch.ones_like(r.completion_ids)], 1)
        mm = torch.cat([r.mm_token_type_ids, torch.zeros_like(r.completion_ids)], 1)  # zeros over the completion
        ckpt = any(getattr(layer, "gradient_checkpointing", False) for layer in enc.model.language_model.layers)
        if r.image_embeds is None or ckpt:
            vision = dict(pixel_values=r.pixel_values) if r.image_embeds is None else dict(
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=r.image_embeds)})
            with self.autocast():
                return enc(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, image_grid_thw=r.image_grid_thw,
                           logits_to_keep=T + 1, **vision).logits[:, :-1]                 # (N, T, V)
        # group g = a run of rows with the same vision output and prompt; first[g] its first row, of[i] row i's group
        starts = [i == 0 or not (r.image_embeds[i] is r.image_embeds[i - 1] and torch.equal(
            r.prompt_ids[i], r.prompt_ids[i - 1]) and torch.equal(r.prompt_mask[i], r.prompt_mask[i - 1])) for i in range(N)]
        first = [i for i in range(N) if starts[i]]
        of = torch.tensor(starts, device=ids.device).cumsum(0) - 1                                      # (N,)
        u = torch.tensor(first, device=ids.device)
        # Qwen's 3D rotary positions of prompt + completion, as one pass over the row computes them
        pos = enc.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=r.image_grid_thw,
                                       attention_mask=attn)[0]                                # (3, N, P + T)
        cache = DynamicCache(config=enc.config)
        with self.autocast():
            h = enc.model(input_ids=r.prompt_ids[u], attention_mask=r.prompt_mask[u], mm_token_type_ids=
                          r.mm_token_type_ids[u], image_grid_thw=r.image_grid_thw[u], position_ids=pos[:, u, :P],
                          mm_encoder_outputs={"image": BaseModelOutputWithPooling(
                              pooler_output=tuple(r.image_embeds[i] for i in first))},
                          use_cache=True, **{self._cache_kw: cache}).last_hidden_state[:, -1:][of]  # (N, 1, hidden)
            if T > 1:  # y_2..y_T from the completion's own positions, against the prompt's cache
                cache.batch_select_indices(of)                                              # (N, heads, P, d) per layer
                hc = enc.model.language_model(input_ids=r.completion_ids[:, :-1], position_ids=pos[:, :, P:-1],
                                              attention_mask=attn[:, :-1], use_cache=True,
                                              **{self._cache_kw: cache}).last_hidden_state  # (N, T - 1, hidden)
                h = torch.cat([h, hc], 1)
            return enc.lm_head(h)                                                              # (N, T, V)

    # ---------------- condition: caption text only -> H -> g ----------------
    def encode_text(self, captions, max_tokens=1024):
        """Caption -> the LVLM re-reads it in a text-only template (role "generate") -> last hidden
        states H (N, L, hidden) of every template token, right-padded, + mask (N, L). No image here:
        the caption is the bottleneck (docs/algorithm.md §2)."""
        msgs = [[{"role": "generate", "content": [{"type": "text", "text": c}]}] for c in captions]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        b = self.tokenizer(text, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                           max_length=max_tokens, add_special_tokens=False).to(self.device)
        with self.autocast():
            out = self.encoder.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     mm_token_type_ids=torch.zeros_like(b["input_ids"]))
        return out.last_hidden_state, b["attention_mask"].bool()

    def condition(self, captions, max_tokens=1024):
        H, mask = self.encode_text(captions, max_tokens)
        with self.autocast():
            emb = self.projector(H)  # docs/algorithm.md §2: c = g(H), (N, L, D)
        emb = emb * mask[..., None]
        return Cond(emb, mask, self.pooled.to(emb.dtype).expand(len(captions), -1))

    # ---------------- decoder ----------------
    def velocity(self, z, s, cond, neg=None, cfg=1.0, transformer=None):
        """v = D(z_s, s, c), with classifier-free guidance v_neg + cfg (v_pos - v_neg) when neg is
        given (pos and neg in one batched call). z (N, C, h, w), s scalar or (N,)."""
        D = transformer or self.transformer
        N = z.shape[0]
        s = torch.as_tensor(s, device=z.device, dtype=torch.float32).reshape(-1).expand(N)
        if neg is not None and cfg != 1.0:
            c = cat_conds(cond, neg.expand(N) if neg.emb.shape[0] == 1 else neg)
            z, s = torch.cat([z, z]), torch.cat([s, s])
        else:
            c = cond
        with self.autocast():  # timesteps stay fp32, as in the diffusers pipeline (bf16 would round 790.37 to 792)
            v = D(hidden_states=z, encoder_hidden_states=c.emb, pooled_projections=c.pooled,
                  timestep=s * 1000, joint_attention_kwargs={"attention_mask": c.mask}, return_dict=False)[0]
        if c is not cond:
            v_pos, v_neg = v.chunk(2)
            v = v_neg + cfg * (v_pos - v_neg)
        return v

    def sigmas(self, steps):
        """s_0 = 1 > ... > s_N = 0 from the checkpoint's FlowMatchEulerDiscreteScheduler (its shift)."""
        self.scheduler.set_timesteps(steps)
        return self.scheduler.sigmas.float().cpu()

    @torch.no_grad()
    def sample_ode(self, noise, cond, neg=None, steps=40, cfg=5.0):
        """Euler ODE from s = 1 to 0 in fp32: x <- x + (s_{i+1} - s_i) v."""
        sig = self.sigmas(steps)
        x = noise.float()
        for i in range(steps):
            v = self.velocity(x, sig[i], cond, neg, cfg).float()
            x = x + v * (sig[i + 1] - sig[i])
        return x

    def latent_shape(self, H, W):
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, H // f, W // f)

    def vae_encode(self, x):
        """x (B, 3, H, W) in [0, 1] -> latents (B, C, H/8, W/8), VAE posterior mean, SD3 scale/shift."""
        with self.autocast():
            z = self.vae.encode((x * 2 - 1).to(self.vae.dtype)).latent_dist.mean.float()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def vae_decode(self, z):
        with self.autocast():
            x = self.vae.decode((z / self.vae.config.scaling_factor + self.vae.config.shift_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate_images(self, captions, noise=None, steps=40, cfg=5.0, size=None, negative=NEGATIVE_PROMPT, seed=0):
        cond = self.condition(captions)
        neg = self.condition([negative]) if cfg != 1.0 else None
        if noise is None:
            size = size or self.transformer.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn((len(captions),) + self.latent_shape(size, size), generator=g).to(self.device)
        return self.vae_decode(self.sample_ode(noise, cond, neg, steps, cfg))

    # ---------------- the released demo's calls (tools/released.py; docs/released.md) ----------------
    # Separate from the methods above, which training uses: no suppressed tokens, the checkpoint's generation
    # config, the negative prompt and the caption padded together and unmasked, the diffusers pipeline's loop.

    @torch.no_grad()
    def caption_like_release(self, image, instruction=RELEASED_INSTRUCTION, instruction_first=True, **generate_kwargs):
        """The demo's gen_prompt: one PIL image, already at the size Qwen's resize rule gives it
        (tools/released.qwen_image) -> its caption, decoded as the demo decodes it (special tokens skipped,
        not stripped). generate() runs under the checkpoint's own generation_config.json with
        generate_kwargs over it, so transformers merges them as in the demo: kwargs > the file > its defaults."""
        parts = [{"type": "image"}, {"type": "text", "text": instruction}]
        msgs = [{"role": "user", "content": parts[::-1] if instruction_first else parts}]
        text = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        b = self.processor(text=[text], images=[image], return_tensors="pt", padding=True).to(self.device)
        own, self.encoder.generation_config = self.encoder.generation_config, self.checkpoint_generation_config
        try:
            with self.autocast():
                out = self.encoder.generate(**b, **generate_kwargs)  # (1, P + T)
        finally:
            self.encoder.generation_config = own
        return self.processor.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    @torch.no_grad()
    def pair_condition(self, caption, negative=NEGATIVE_PROMPT):
        """The demo's get_prompt_embeds: the negative prompt and the caption, each in the text-only "generate"
        template, right-padded together to one length L and read by the LVLM as one batch; every position goes
        through g, padding included (SD3 then attends to all of them). -> (c, c_neg), each (1, L, D)."""
        ids = []
        for t in (negative, caption):
            msgs = [{"role": "generate", "content": [{"type": "text", "text": t}]}]
            text = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids.append(self.tokenizer.encode(text, return_tensors="pt")[0])
        ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_id).to(self.device)  # (2, L)
        with self.autocast():
            H = self.encoder.model(input_ids=ids, attention_mask=ids.ne(self.pad_id)).last_hidden_state  # (2, L, h)
            emb = self.projector(H)  # docs/algorithm.md §2: c = g(H), here at every position, (2, L, D)
        return emb[1:], emb[:1]

    @torch.no_grad()
    def sample_like_release(self, c, c_neg, height, width, steps=40, cfg=5.0, seed=42):
        """The demo's gen_image: StableDiffusion3Pipeline's loop on the pair condition, attention over every
        text position, the constant pooled embedding for both halves. Noise from a generator on this device
        seeded with `seed`, latents in the condition's dtype between steps, each Euler step in fp32 (the
        scheduler's step). c, c_neg (1, L, D) -> image (1, 3, height, width) in [0, 1]."""
        g = torch.Generator(self.device).manual_seed(seed)
        x = torch.randn((1,) + self.latent_shape(height, width), generator=g, device=self.device, dtype=c.dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        sig, ts = self.scheduler.sigmas, self.scheduler.timesteps  # (steps + 1,), (steps,): DiT timesteps of sig[:-1]
        guided = cfg > 1  # the pipeline's do_classifier_free_guidance
        emb = torch.cat([c_neg, c]) if guided else c  # (2 or 1, L, D)
        pooled = self.pooled.to(c.dtype).expand(emb.shape[0], -1)
        for i in range(steps):
            with self.autocast():
                v = self.transformer(hidden_states=torch.cat([x] * emb.shape[0]), timestep=ts[i].expand(emb.shape[0]),
                                     encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0]
            if guided:
                v_neg, v_pos = v.chunk(2)
                v = v_neg + cfg * (v_pos - v_neg)  # CFG, in the DiT's output dtype
            x = (x.float() + (sig[i + 1] - sig[i]) * v).to(v.dtype)  # Euler: x <- x + (s_{i+1} - s_i) v, fp32
        with self.autocast():
            im = self.vae.decode(x / self.vae.config.scaling_factor + self.vae.config.shift_factor).sample
        return (im / 2 + 0.5).clamp(0, 1).float()  # the pipeline's postprocess


# ----------------------------------------------------------------------------------------------
# Loading: the same from_pretrained path for the real checkpoints and the tiny preset's folders.

def load_uae(encoder, decoder, dtype=torch.float32, device="cpu", train_full=(), pooled=True):
    """The base models: encoder = a Qwen2.5-VL folder or hub id, decoder = an SD3 diffusers folder or hub id
    (transformer/, vae/, scheduler/, and text_encoder*/ for the pooled embedding of ""). Frozen weights load in
    `dtype`; the parts named in train_full (e.g. ("transformer",) for a full DiT fine-tune) in fp32
    (docs/algorithm.md §8). pooled=False skips computing the pooled embedding (a checkpoint brings its own).
    Safetensors only; no remote code. A checkpoint of this project is applied by runs.load_model."""
    hf_logging.disable_progress_bar()
    kw = dict(dtype=dtype, use_safetensors=True)
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(encoder, **kw)
    proc = Qwen2_5_VLProcessor.from_pretrained(encoder)
    dkw = dict(torch_dtype=torch.float32 if "transformer" in train_full else dtype, use_safetensors=True)
    dit = SD3Transformer2DModel.from_pretrained(decoder, subfolder="transformer", **dkw)
    vae = AutoencoderKL.from_pretrained(decoder, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(decoder, subfolder="scheduler")
    emb = sd3_empty_pooled(decoder) if pooled else None
    if pooled and emb is None:
        print(f"note: {decoder} has no SD3 text encoders (text_encoder, text_encoder_2): the pooled projection is zeros")
    m = UAE(enc, proc, dit, vae, sched, pooled=emb, base={"encoder": encoder, "decoder": decoder}).to(device)
    m.compute_dtype = dtype
    m.eval()
    return m


@torch.no_grad()
def sd3_empty_pooled(decoder):
    """docs/algorithm.md §2: SD3's pooled text embedding of "" from the decoder folder's two CLIP text encoders,
    as StableDiffusion3Pipeline.encode_prompt makes it (77-token padded ids, text_embeds, CLIP-L then CLIP-G,
    concatenated). -> (P,) fp32, or None when the folder has no text encoders."""
    parts = []
    for te, tk in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        try:
            tok = CLIPTokenizer.from_pretrained(decoder, subfolder=tk)
            clip = CLIPTextModelWithProjection.from_pretrained(decoder, subfolder=te, use_safetensors=True)
        except (OSError, ValueError, EnvironmentError):
            return None
        ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        parts.append(clip(ids, output_hidden_states=True)[0][0].float())
        del clip
    return torch.cat(parts)
