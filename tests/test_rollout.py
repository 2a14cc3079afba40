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


def _policy(dtype, eos_bias=0.0):
    """The tiny preset with a stage-2 LoRA (r 32, every LM linear) whose B is not zero: the adapter changes the logits.
    eos_bias > 0: EOS made likely, so that rows finish early (pad fed back) or all of them do before the cap."""
    m = runs.load_model(preset="tiny", dtype=dtype)
    torch.manual_seed(0)
    M.add_lora(m.encoder, 32, 64, M.ENCODER_LORA_TARGETS)
    with torch.no_grad():
        for n, p in m.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        if eos_bias:
            head = m.encoder.lm_head
            m.encoder.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
            m.encoder.lm_head.weight.copy_(head.weight)
            m.encoder.lm_head.bias.zero_()[m.eos_id] = eos_bias
    return m.precision(dtype).eval()


@pytest.fixture(scope="module")
def policies(tiny_paths):
    return {"fp32": _policy(torch.float32), "bf16": _policy(torch.bfloat16), "eos": _policy(torch.float32, 6.0),
            "stop": _policy(torch.float32, 7.0)}


CASES = [("fp32", dict(temperature=1.0)), ("fp32", dict(temperature=0.7)), ("fp32", dict(temperature=0.0)),
         ("fp32", dict(temperature=1.0, top_p=0.9)), ("fp32", dict(temperature=1.0, top_k=5)),
         ("bf16", dict(temperature=1.0)), ("bf16", dict(temperature=0.0)), ("eos", dict(temperature=1.0)),
         ("stop", dict(temperature=1.0))]


@pytest.mark.parametrize("dtype,kw", CASES, ids=[d + "-" + "-".join(f"{k}{v}" for k, v in kw.items())
                                                  for d, kw in CASES])
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
        if dtype == "eos":    # some rows finished early (pad fed back), others ran to the cap
            assert 0 < int(r.truncated.sum()) < 8, (seed, r.truncated)
        if dtype == "stop":   # every row sampled EOS: the decode stopped before the cap
            assert want.shape[1] < MAX_NEW and not r.truncated.any(), (seed, want.shape)


@pytest.mark.parametrize("B,G", [(1, 8), (2, 1)])
def test_sampler_draws_what_generate_drew_one_image_or_one_row_each(policies, images, B, G):
    """The prompt runs once per image and its cache is repeated G times: the same draws at other shapes (one image,
    as sample_captions_seeded calls it; one caption per image, as stage 1 and the eval)."""
    m = policies["fp32"]
    for seed in (3, 4):
        torch.manual_seed(seed)
        want, want_scores = legacy_sample(m, images[:B], G=G, max_new_tokens=MAX_NEW)
        torch.manual_seed(seed)
        r, scores = m.sample_captions(images[:B], G=G, max_new_tokens=MAX_NEW, output_scores=True)
        assert torch.equal(scores, want_scores) and torch.equal(r.completion_ids, want), seed


def _bare(r):
    """r without the rollout's vision output: completion_logprobs then runs one pass per row on the pixels."""
    b = M.Rollout(*[getattr(r, f) for f in ("prompt_ids", "prompt_mask", "mm_token_type_ids", "pixel_values",
                                             "image_grid_thw", "completion_ids", "completion_mask", "texts",
                                             "truncated")])
    assert b.image_embeds is None
    return b


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_share_the_prompt_and_equal_one_pass_per_row(policies, images, dtype):
    """completion_logprobs reuses the rollout's vision output and runs each image's prompt once for its G rows: the
    log-probs of one pass per row on the repeated pixels (to rounding), in full and in micro-batches that cut a group;
    the no-grad (reference, old) and the grad (policy) pass give the same bits (the first ratio is exactly 1)."""
    m = policies[dtype]
    tol = 2e-5 if dtype == "fp32" else 0.1
    torch.manual_seed(0)
    r = m.sample_captions(images, G=4, max_new_tokens=MAX_NEW)
    assert r.image_embeds is not None and len(r.image_embeds) == 8 and r.image_embeds[0] is r.image_embeds[3]
    bare = _bare(r)
    mk = r.completion_mask.bool()
    with torch.no_grad():
        lp, one = m.completion_logprobs(r), m.completion_logprobs(bare)
        assert (lp - one)[mk].abs().max() < tol and (lp != one).any() or dtype == "bf16"   # another rounding (fp32)
        assert torch.equal(lp[~mk], torch.zeros_like(lp[~mk]))
        part = m.completion_logprobs(r.rows(2, 7), 0.7)
        assert (part - m.completion_logprobs(bare.rows(2, 7), 0.7))[mk[2:7]].abs().max() < tol
        with M.adapters_disabled(m.encoder):
            ref, ref_one = m.completion_logprobs(r), m.completion_logprobs(bare)
        assert (ref - ref_one)[mk].abs().max() < tol and (ref - lp)[mk].abs().max() > 10 * tol  # the LoRA counts
    m.train()
    try:
        a, ea = m.completion_logprobs(r, with_entropy=True)
        assert a.requires_grad and torch.equal(a.detach(), lp) and torch.isfinite(ea).all()
        a[mk].sum().backward()
        g = [p.grad for n, p in m.encoder.named_parameters() if "lora_" in n]
        assert all(x is not None for x in g) and any(x.abs().max() > 0 for x in g)
    finally:
        m.encoder.zero_grad(set_to_none=True)
        m.eval()
    both = M.Rollout.cat([r.rows(0, 3), r.rows(3, 8)], m.pad_id)
    with torch.no_grad():
        assert len(both.image_embeds) == 8 and torch.equal(m.completion_logprobs(both), lp)


def test_shared_prompt_gradient_is_the_per_row_gradient(policies, images):
    """The policy gradient through the shared prompt (its KV gathered to G rows) is the sum of the rows' own: the
    same LoRA gradient as one pass per row, to rounding."""
    m = policies["fp32"]
    torch.manual_seed(1)
    r = m.sample_captions(images, G=4, max_new_tokens=8)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)) * r.completion_mask
    grads = []
    m.train()
    try:
        for roll in (r, _bare(r)):
            (m.completion_logprobs(roll) * w).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for n, p in m.encoder.named_parameters() if "lora_" in n]))
            m.encoder.zero_grad(set_to_none=True)
    finally:
        m.eval()
    assert grads[1].abs().max() > 0 and (grads[0] - grads[1]).abs().max() < 1e-5 * grads[1].abs().max()


def test_gradient_checkpointing_takes_one_pass_for_every_log_prob(tiny_paths, images):
    """Gradient checkpointing drops KV caches in the policy pass: then every pass (reference, old, policy) runs one
    pass per row, so that they stay the same function (first ratio exactly 1)."""
    m = _policy(torch.float32)
    m.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    r = m.sample_captions(images, G=4, max_new_tokens=8)
    with torch.no_grad():
        old = m.completion_logprobs(r)
        assert torch.equal(old, m.completion_logprobs(_bare(r)))
    m.train()
    new = m.completion_logprobs(r)
    assert new.requires_grad and torch.equal(new.detach(), old)
    new.sum().backward()


def test_shared_prompt_log_probs_with_left_padded_prompts(policies, images):
    """Rollouts of prompts of different lengths, concatenated (the shorter left-padded): the shared-prompt pass still
    gives the log-probs of one pass per row."""
    m = policies["fp32"]
    torch.manual_seed(5)
    a = m.sample_captions(images[:1], G=2, max_new_tokens=8)
    b = m.sample_captions(images[1:], G=3, max_new_tokens=6, instruction="Describe the image in detail.")
    r = M.Rollout.cat([a, b], m.pad_id)
    assert not r.prompt_mask.bool().all() and r.completion_ids.shape == (5, 8)
    with torch.no_grad():
        lp, one = m.completion_logprobs(r), m.completion_logprobs(_bare(r))
    mk = r.completion_mask.bool()
    assert (lp - one)[mk].abs().max() < 2e-5 and torch.equal(lp[~mk], torch.zeros_like(lp[~mk]))
