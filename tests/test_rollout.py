"""Stage 2's rollout: UAE.sample_captions draws, token for token and score for score, what the sampler it replaced
drew under the same torch seed: transformers' generate with the explicit GenerationConfig below (`legacy_sample`,
kept here as the reference). Several seeds, temperatures (greedy included), top-p / top-k, fp32 and bf16, with a
live LoRA (non-zero B) on every language-model linear as in stage 2."""
import pytest
import torch
from transformers import GenerationConfig

import model as M
import runs

MAX_NEW = 20


def legacy_sample(m, images, G=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=512):
    """The sampler before the lean decode loop: one transformers generate call over the B*G repeated rows.
    -> (completion ids (N, T) as generate returned them, processed scores (N, T, V))."""
    b = m.caption_inputs(images)
    per_img = b["image_grid_thw"].prod(-1).tolist()
    pix = torch.cat([p for p in b["pixel_values"].split(per_img) for _ in range(G)])
    rep = lambda t: t.repeat_interleave(G, 0)
    gc = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                          top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, min_length=0,
                          repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, min_p=0.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, encoder_repetition_penalty=1.0, length_penalty=1.0,
                          num_beams=1, renormalize_logits=False, remove_invalid_values=False,
                          eos_token_id=m.eos_id, pad_token_id=m.pad_id,
                          suppress_tokens=m.suppress.nonzero().flatten().tolist(),
                          output_scores=True, return_dict_in_generate=True)
    ids = rep(b["input_ids"])
    with torch.no_grad(), m.autocast():
        out = m.encoder.generate(input_ids=ids, attention_mask=rep(b["attention_mask"]),
                                 mm_token_type_ids=rep(b["mm_token_type_ids"]), pixel_values=pix,
                                 image_grid_thw=rep(b["image_grid_thw"]), generation_config=gc)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def _policy(dtype):
    """The tiny preset with a stage-2 LoRA (r 32, every LM linear) whose B is not zero: the adapter changes the logits."""
    m = runs.load_model(preset="tiny", dtype=dtype)
    torch.manual_seed(0)
    M.add_lora(m.encoder, 32, 64, M.ENCODER_LORA_TARGETS)
    with torch.no_grad():
        for n, p in m.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m.precision(dtype).eval()


@pytest.fixture(scope="module")
def policies(tiny_paths):
    return {"fp32": _policy(torch.float32), "bf16": _policy(torch.bfloat16)}


CASES = [("fp32", dict(temperature=1.0)), ("fp32", dict(temperature=0.7)), ("fp32", dict(temperature=0.0)),
         ("fp32", dict(temperature=1.0, top_p=0.9)), ("fp32", dict(temperature=1.0, top_k=5)),
         ("bf16", dict(temperature=1.0)), ("bf16", dict(temperature=0.0))]


@pytest.mark.parametrize("dtype,kw", CASES, ids=[f"{d}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for d, kw in CASES])
def test_sampler_draws_what_generate_drew(policies, images, dtype, kw):
    m = policies[dtype]
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        want, want_scores = legacy_sample(m, images, G=4, max_new_tokens=MAX_NEW, **kw)
        torch.manual_seed(seed)
        r, scores = m.sample_captions(images, G=4, max_new_tokens=MAX_NEW, output_scores=True, **kw)
        is_eos = want == m.eos_id
        keep = (is_eos.cumsum(1) - is_eos.long()) == 0                  # up to and including the first EOS
        assert r.completion_ids.shape == want.shape, (seed, r.completion_ids.shape, want.shape)
        assert torch.equal(r.completion_ids, want.masked_fill(~keep, m.pad_id)), seed
        assert torch.equal(r.completion_mask, keep.float()) and torch.equal(r.truncated, ~is_eos.any(1))
        assert torch.equal(scores, want_scores), seed                    # the processed scores, bit for bit
        assert len(set(r.texts)) > 1 or kw["temperature"] == 0
