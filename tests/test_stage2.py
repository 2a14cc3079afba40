"""Stage 2 (GRPO on the encoder): the math, the first on-policy pass, gradients, learning, DDP, resume."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoint as ck
import images
import model as M
import stage2_grpo_und as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_known_values():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = S.group_advantages(r, 4, scale="group", std_floor=0.0, eps=0.0)
    s = torch.tensor([1.0, 2, 3, 4]).std()
    assert torch.allclose(a[:4], (torch.tensor([1.0, 2, 3, 4]) - 2.5) / s)
    assert torch.equal(a[4:], torch.zeros(4))                    # a flat group gives zeros, not NaN
    assert torch.isfinite(S.group_advantages(torch.full((8,), 0.3), 4)).all()
    assert torch.allclose(S.group_advantages(r, 4, scale="none"), torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]))
    b = S.group_advantages(r, 4, scale="batch", std_floor=0.0, eps=0.0)
    assert torch.allclose(b[:4], (torch.tensor([1.0, 2, 3, 4]) - 2.5) / r.std())
    # the floor keeps nearly-flat CLIP groups from blowing up tiny differences
    tiny = torch.tensor([0.9000, 0.9001, 0.9000, 0.9001])
    assert S.group_advantages(tiny, 4, std_floor=1e-2).abs().max() < 0.01
    with pytest.raises(ValueError, match="scale_rewards"):
        S.group_advantages(r, 4, scale="groups")


def test_k3_kl_and_clip():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    assert torch.equal(S.k3_kl(lp, lp), torch.zeros(1, 2))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    kl = S.k3_kl(lp, ref)
    d = ref - lp
    assert torch.allclose(kl, d.exp() - d - 1) and (kl > 0).all()
    # positive advantage: the ratio is capped at 1 + eps_high; negative: at 1 - eps_low
    logp, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    loss, ratio, _ = S.grpo_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5]]))
    loss, _, _ = S.grpo_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8]]))


def test_aggregation_modes_are_micro_batch_invariant():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).float()
    nt = mask.sum()
    full = {m: S.aggregate(loss, mask, m, 6, nt, 5) for m in ("dapo", "grpo", "dr_grpo")}
    assert torch.allclose(full["dapo"], (loss * mask).sum() / nt)
    assert torch.allclose(full["grpo"], ((loss * mask).sum(1) / mask.sum(1)).mean())
    assert torch.allclose(full["dr_grpo"], (loss * mask).sum() / 30)
    for m in full:
        parts = sum(S.aggregate(loss[i:i + 2], mask[i:i + 2], m, 6, nt, 5) for i in range(0, 6, 2))
        assert torch.allclose(parts, full[m]), m
    with pytest.raises(ValueError, match="loss_agg"):
        S.aggregate(loss, mask, "sum", 6, nt, 5)


@pytest.fixture()
def rollout_with_fresh_adapter(tiny_uae, images):
    m = tiny_uae
    M.add_lora(m.encoder, 4, 8, M.ENCODER_LORA_TARGETS)
    torch.manual_seed(0)
    return m, m.sample_captions(images, G=4, max_new_tokens=12)


def test_first_on_policy_pass_ratio_one_kl_zero(rollout_with_fresh_adapter):
    m, r = rollout_with_fresh_adapter
    logp = m.completion_logprobs(r)
    with torch.no_grad(), M.adapters_disabled(m.encoder):
        ref = m.completion_logprobs(r)
    loss, ratio, kl = S.grpo_token_loss(logp, logp.detach(), torch.randn(8), 0.2, 0.2, ref, 0.04)
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(kl, torch.zeros_like(kl))


def _lora_grads(m):
    return torch.cat([p.grad.flatten() for n, p in m.encoder.named_parameters() if "lora_" in n])


def test_unclipped_gradient_is_reinforce_with_baseline(rollout_with_fresh_adapter):
    m, r = rollout_with_fresh_adapter
    for n, p in m.encoder.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    adv = S.group_advantages(torch.randn(8, generator=torch.Generator().manual_seed(1)), 4)
    mask = r.completion_mask
    logp = m.completion_logprobs(r)
    loss_tok, ratio, _ = S.grpo_token_loss(logp, logp.detach(), adv, 0.2, 0.2)
    S.aggregate(loss_tok, mask, "dapo", 8, mask.sum(), 12).backward()
    g_grpo = _lora_grads(m)
    m.encoder.zero_grad()
    logp = m.completion_logprobs(r)   # REINFORCE with baseline: -sum_i A_i sum_t grad log pi / tokens
    (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()
    g_reinforce = _lora_grads(m)
    assert g_grpo.abs().max() > 0
    assert torch.allclose(g_grpo, g_reinforce, atol=1e-7, rtol=1e-5)


def test_tokens_after_eos_get_no_gradient(rollout_with_fresh_adapter):
    m, r = rollout_with_fresh_adapter
    r.completion_mask[:, 5:] = 0          # pretend every caption ended at token 4
    logp = m.completion_logprobs(r)
    logp.retain_grad()
    loss_tok, _, _ = S.grpo_token_loss(logp, logp.detach(), torch.ones(8), 0.2, 0.2)
    S.aggregate(loss_tok, r.completion_mask, "dapo", 8, r.completion_mask.sum(), 12).backward()
    assert logp.grad[:, 5:].abs().max() == 0 and logp.grad[:, :5].abs().min() > 0
    g1 = _lora_grads(m).clone()
    m.encoder.zero_grad()
    r.completion_ids[:, 5:] = torch.randint(0, 200, r.completion_ids[:, 5:].shape)   # junk after "EOS"
    logp = m.completion_logprobs(r)
    loss_tok, _, _ = S.grpo_token_loss(logp, logp.detach(), torch.ones(8), 0.2, 0.2)
    S.aggregate(loss_tok, r.completion_mask, "dapo", 8, r.completion_mask.sum(), 12).backward()
    assert torch.allclose(_lora_grads(m), g1, atol=1e-7)


def _image_dir(path, n=1):
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        a = (torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(a).resize((64, 64), Image.NEAREST).save(path / f"{i}.png")
    return str(path)


def _args(tmp_path, data, **kw):
    base = dict(preset="tiny", data=data, out_dir=str(tmp_path / "out"), reward="pixel", resolution=64, G=4,
                batch_size=2, micro_batch=4, max_new_tokens=8, sample_steps=2, cfg=1.0, lr=1e-3, steps=2,
                sample_every=0, save_every=1000, log_every=1)
    base.update(kw)
    return S.Args(**base)


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_grpo_raises_the_reward_of_an_environment_that_reads_captions(tmp_path, monkeypatch):
    """A real learning check of the GRPO loop. The tiny *random* DiT barely reads its text (two
    captions change its velocity by ~0.4%), so here the environment is a decoder that does: the
    more of a caption's characters are ASCII letters, the more of the source shows through."""
    distractor = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    distractor = torch.nn.functional.interpolate(distractor, size=64, mode="nearest")   # a layout, not noise

    def reading_env(m, texts, noise, neg, args):
        q = torch.tensor([sum(c.isascii() and c.isalpha() for c in t) / max(len(t), 1) for t in texts])[:, None, None, None]
        src = images.load_image(os.path.join(args.data, "0.png"), args.resolution)[None]
        return q * src + (1 - q) * distractor

    monkeypatch.setattr(S, "reconstruct", reading_env)
    data = _image_dir(tmp_path / "img", 1)
    S.main(_args(tmp_path, data, G=8, batch_size=1, micro_batch=8, steps=16, lr=2e-2, beta=0.0, max_new_tokens=8))
    r = [d["reward/mean"] for d in _log(str(tmp_path / "out"))]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert 1 - last < 0.5 * (1 - first), (first, last, r)     # at least half of the gap to 1 closed


def test_resume_equals_uninterrupted(tmp_path):
    data = _image_dir(tmp_path / "img", 4)
    S.main(_args(tmp_path, data, steps=4, out_dir=str(tmp_path / "a")))
    S.main(_args(tmp_path, data, steps=2, out_dir=str(tmp_path / "b"), save_every=2))
    S.main(_args(tmp_path, data, steps=4, out_dir=str(tmp_path / "b"), resume=True))
    a, b = _log(str(tmp_path / "a")), _log(str(tmp_path / "b"))
    assert [d["step"] for d in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("reward/mean", "loss/policy", "loss/kl", "caption/tokens_mean", "grad_norm"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), (k, x["step"])


def test_fixed_eval_sees_the_policy_not_the_draw(tmp_path):
    """eval/* is measured on the same images, caption seeds and noise every time: with the policy frozen (lr 0)
    every evaluation is identical, while the training batches (other images each step) are not."""
    data = _image_dir(tmp_path / "img", 4)
    S.main(_args(tmp_path, data, steps=3, lr=0.0, beta=0.0, eval_every=1, eval_images=3, eval_G=2,
                 eval_data=_image_dir(tmp_path / "val", 3)))
    log = _log(str(tmp_path / "out"))
    ev = [d for d in log if "eval/reward" in d]
    assert [d["step"] for d in ev] == [0, 1, 2, 3]
    for d in ev[1:]:
        for k in ("eval/reward", "eval/words_mean", "eval/tokens_mean"):
            assert d[k] == ev[0][k], k
    assert -1 <= ev[0]["eval/reward"] <= 1 and ev[0]["eval/tokens_mean"] > 0
    train = [d["reward/mean"] for d in log if "reward/mean" in d]
    assert len(train) == 3 and len(set(train)) > 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_disagreement(wa, wb, tol=1e-5):
    """Two checkpoints' live LoRA weights -> (coordinates that differ by more than tol, coordinates)."""
    lora = [k for k in wa if "lora_" in k]
    assert lora and set(lora) == {k for k in wb if "lora_" in k}
    return sum(((wa[k] - wb[k]).abs() > tol).sum().item() for k in lora), sum(wa[k].numel() for k in lora)


def assert_two_ranks_equal_one(one, two, std_floor=1e-2, lr=1e-2):
    """One step on 2 ranks and on 1 rank with the same global batch, compared where float noise is understood. The
    two runs batch the same forward passes differently (4 rows a rank or 8 in one, a sharded DiT or not), so matrix
    products round differently, ~1e-7 relative, and every CPU rounds them its own way (MKL_CBWR=COMPATIBLE,
    ATEN_CPU_CAPABILITY=avx2 move these digits as another CPU would).
    - Before the update (the eval at step 0, step 1's rollout): the same captions to the token, rewards to 1e-5.
      A redraw's velocity carries the products' rounding, times ~2 cfg with CFG, through the Euler steps, the VAE
      and a cosine: ~1e-6.
    - Step 1's gradient norm (the all-reduced LoRA gradient) to 0.2 std_floor relative (2e-3): an advantage divides
      reward differences by max(std, std_floor) >= std_floor, so a reward noise of 1e-5 moves it by at most
      ~2e-5 / std_floor against advantages of size ~1. A missing rank's gradient changes the norm by tens of percent.
    - The LoRA weights after the step, per coordinate: at most 5% differ by more than 1e-5. AdamW's first step moves
      every coordinate by lr g / |g| whatever the size of g, and the B gradient of a coordinate is a sum of terms
      that nearly cancel for some: where the sum is within float noise of 0 the coordinate moves the other way, 2 lr
      apart (measured: under 1% of them, no two CPUs alike). A missing rank's gradient moves most coordinates
      differently. A second step would not compare: its rollout samples from the updated policy, where one flipped
      coordinate can flip a sampled token, and from there the runs are different runs.
    - The eval after the step samples from the updated policy too: compared to 0.05 (one caption's reward of the
      handful), a sanity check; the eval's all-reduce is checked at step 0."""
    a, b = _log(one), _log(two)
    assert [sorted(d) for d in a] == [sorted(d) for d in b]
    assert [(x["step"], "eval/reward" in x) for x in a] == [(0, True), (1, False), (1, True)]
    for x, y in zip(a[:2], b[:2]):                                       # before the update
        for k in ("reward/mean", "eval/reward"):
            if k in x:
                assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)
        for k in ("caption/tokens_mean", "eval/tokens_mean", "eval/words_mean"):
            if k in x:
                assert x[k] == y[k], (x["step"], k)
    assert a[1]["grad_norm"] > 0 and a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=0.2 * std_floor)
    assert a[2]["eval/reward"] == pytest.approx(b[2]["eval/reward"], abs=0.05)
    wa, wb = ck.read_checkpoint(one)[1], ck.read_checkpoint(two)[1]
    off, n = lora_disagreement(wa, wb)
    assert off <= 0.05 * n, f"{off} of {n} LoRA coordinates differ by more than 1e-5"
    Bs = [k for k in wa if "lora_B" in k]                                # B starts at 0: the step moved it
    assert sum((wa[k].abs() > 0.5 * lr).sum().item() for k in Bs) > 0.5 * sum(wa[k].numel() for k in Bs)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path):
    data = _image_dir(tmp_path / "img", 4)
    common = ["--preset", "tiny", "--data", data, "--reward", "pixel", "--resolution", "64", "--G", "4",
              "--micro_batch", "4", "--max_new_tokens", "8", "--sample_steps", "2", "--cfg", "1.0", "--lr", "1e-2",
              "--steps", "1", "--sample_every", "0", "--seed_per_group", "--beta", "0.04", "--scale_rewards", "batch",
              "--eval_every", "1", "--eval_images", "3", "--eval_G", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "stage2_grpo_und.py", *common, "--batch_size", "2", "--out_dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                          "stage2_grpo_und.py", *common, "--batch_size", "1", "--out_dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_two_ranks_equal_one(str(tmp_path / "one"), str(tmp_path / "two"))
