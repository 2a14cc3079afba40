"""stage1_coldstart.py: the pure pieces, loss goes down, only the intended weights move, NaN steps
are skipped, resume == uninterrupted, 2 ranks == 1 rank with the double batch, data errors."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import runs
import checkpoint as ck
import model as M
import training as T
import stage1_coldstart as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_jsonl(d, n=4, captions=True):
    """n small coloured images + a JSONL of {image, caption} in folder d."""
    os.makedirs(d, exist_ok=True)
    cols = [(230, 30, 30), (30, 200, 60), (40, 60, 220), (240, 220, 30), (150, 40, 160), (250, 250, 250)]
    with open(os.path.join(d, "data.jsonl"), "w") as f:
        for i in range(n):
            a = np.zeros((64, 64, 3), np.uint8)
            a[:] = cols[i % len(cols)]
            a[8 + 4 * i:40 + 4 * i, 16:48] = cols[(i + 2) % len(cols)]
            Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
            rec = {"image": f"{i}.png"}
            if captions:
                rec["caption"] = f"a square of colour {(i + 2) % 6} on a background of colour {i % 6}"
            f.write(json.dumps(rec) + "\n")
    return os.path.join(d, "data.jsonl")


def args_for(**kw):
    base = dict(preset="tiny", objective="fm", reward="pixel", temperature=0.0, max_new_tokens=8, lora_r=4,
                lora_alpha=8, batch_size=2, steps=2, lr=1e-3, warmup=0, schedule="constant", sample_every=0,
                save_every=100, seed=0)
    base.update(kw)
    return S.Args(**base)


def read_log(out_dir):
    return [json.loads(ln) for ln in open(os.path.join(out_dir, "log.jsonl"))]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("RANK", None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(a):
    """Args -> the command-line flags that reproduce them."""
    out = []
    for k, v in vars(a).items():
        if v is None or v == "":
            continue
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


# ---------------------------------------------------------------------------------------------- pure pieces

def test_logit_normal_and_noise_split_invariant():
    s = S.logit_normal(4000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert ((s > 0) & (s < 1)).all() and abs(s.median().item() - 0.5) < 0.03
    assert S.logit_normal(4000, 1.0, 1.0, torch.Generator().manual_seed(0)).median() > 0.7
    s_all, e_all = S.sample_noise(3, 5, [0, 1, 2, 3], (2, 4, 4))          # one rank, 4 samples
    s_a, e_a = S.sample_noise(3, 5, [0, 1], (2, 4, 4))                    # rank 0 of 2
    s_b, e_b = S.sample_noise(3, 5, [2, 3], (2, 4, 4))                    # rank 1 of 2
    assert torch.equal(s_all, torch.cat([s_a, s_b], 1)) and torch.equal(e_all, torch.cat([e_a, e_b], 1))
    assert not torch.equal(s_all[0], s_all[1])                             # fm and sem draws differ


def test_flow_matching_and_one_step_oracle():
    g = torch.Generator().manual_seed(0)
    z0, eps, s = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g), torch.rand(3, generator=g)
    oracle = lambda z, t: eps - z0                                       # the exact velocity
    assert S.flow_matching_loss(oracle, z0, s, eps).abs().max() < 1e-12
    assert torch.allclose(S.one_step_x0(oracle, z0, s, eps), z0, atol=1e-6)
    zero = lambda z, t: torch.zeros_like(z)
    assert torch.allclose(S.flow_matching_loss(zero, z0, s, eps), ((eps - z0) ** 2).flatten(1).mean(1))
    sig = torch.linspace(1, 0, 5)
    assert torch.allclose(S.last_k_x0(oracle, eps, sig, 2), z0, atol=1e-5)  # straight path: Euler is exact
    sums, cnt = S.loss_bins(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.05, 0.07, 0.55, 1.0]))
    assert cnt.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1] and sums[0] == 3 and sums[9] == 4


def test_semantic_loss():
    import reward
    f = reward.load_backbone("pixel")
    x = torch.rand(2, 3, 32, 32)
    assert S.semantic_loss(f, x, x).abs().max() < 1e-6
    y = x.clone().requires_grad_(True)
    l = S.semantic_loss(f, x, 1 - y)
    assert (l > 0.1).all()
    l.sum().backward()
    assert y.grad.abs().sum() > 0                                        # differentiable w.r.t. x~


# ---------------------------------------------------------------------------------------------- in-process training

def train_fixed(a, x, caps, n):
    """n updates on one fixed batch and fixed noise (micro-step 0); -> losses, m, params."""
    m, params, _ = S.setup(a, torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    backbone = None
    if "sem" in a.objective:
        import reward
        backbone = reward.load_backbone("pixel")
    losses = []
    for _ in range(n):
        loss, st = S.micro_losses(m, a, backbone, x, caps, 0, list(range(len(x))))
        loss.backward()
        _, skipped = T.optimizer_step(params, opt, 1, a.grad_clip)
        assert not skipped
        losses.append(st)
    return losses, m, params


@pytest.mark.parametrize("objective", ["fm", "sem"])
def test_loss_goes_down(tiny_paths, images, objective):
    a = args_for(objective=objective, lr=3e-2, train_encoder_lora=True)
    caps = ["a red circle on a blue background", "two yellow triangles"]
    st, _, _ = train_fixed(a, images, caps, 6)
    first, last = st[0][objective], st[-1][objective]
    assert math.isfinite(last) and last < 0.95 * first, [s[objective] for s in st]


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_only_intended_parameters_change(tiny_paths, images):
    a = args_for(objective="fm+sem", train_encoder_lora=True)
    m, params, cfg = S.setup(a, torch.device("cpu"))
    assert cfg["encoder"] and cfg["transformer"]
    before = _snapshot(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "lora_" in n or n.startswith("projector.")}
    opt = torch.optim.AdamW(params, lr=1e-3)
    import reward
    for k in range(2):
        loss, _ = S.micro_losses(m, a, reward.load_backbone("pixel"), images, ["a cat", "a dog"], k, [0, 1])
        loss.backward()
        assert not T.optimizer_step(params, opt, 1, 1.0)[1]
    after = _snapshot(m)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = [n for n in before if n not in trainable]
    assert not changed & set(frozen), sorted(changed & set(frozen))[:5]  # encoder/VAE/DiT base bit-identical
    assert any(n.startswith("encoder.") and "lora_B" in n for n in changed)
    assert any(n.startswith("transformer.") and "lora_B" in n for n in changed)
    assert any(n.startswith("projector.") for n in changed)
    assert any(n.startswith("vae.") for n in frozen) and any(n.startswith("encoder.") and "lora_" not in n for n in frozen)


def test_dit_full_trains_dit_not_encoder(tiny_paths, images):
    a = args_for(objective="fm", dit_full=True)
    m, params, cfg = S.setup(a, torch.device("cpu"))
    assert cfg == {"encoder": None, "transformer": None} and not M.has_lora(m.transformer) and not M.has_lora(m.encoder)
    before = _snapshot(m)
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, _ = S.micro_losses(m, a, None, images, ["a cat", "a dog"], 0, [0, 1])
    loss.backward()
    T.optimizer_step(params, opt, 1, 1.0)
    after = _snapshot(m)
    changed = {n.split(".")[0] for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"transformer", "projector"}


def test_dit_full_on_top_of_dit_lora_saves_faithfully(tmp_path, tiny_paths):
    """--dit_full after a stage with a DiT LoRA: the checkpoint holds the full (merged + trained)
    DiT once, and loading it gives the same velocity (the earlier LoRA is not merged twice)."""
    m, _, cfg = S.setup(args_for(objective="fm"), torch.device("cpu"))
    for n, p in m.transformer.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    ck.save_checkpoint(str(tmp_path / "ck"), m, {}, cfg)
    m2, _, _ = S.setup(args_for(objective="fm", dit_full=True, init=str(tmp_path / "ck")), torch.device("cpu"))
    with torch.no_grad():
        for p in m2.transformer.parameters():
            p.add_(0.01)
    ck.save_checkpoint(str(tmp_path / "full"), m2, {}, transformer_full=True)
    z, caps = torch.randn(1, 16, 8, 8), ["a red circle"]
    with torch.no_grad():
        want = m2.velocity(z, 0.5, m2.condition(caps))
        back = runs.load_model(init=str(tmp_path / "full"))
        assert torch.allclose(back.velocity(z, 0.5, back.condition(caps)), want, atol=1e-5)


def test_nonfinite_step_is_skipped(tiny_paths, images):
    a = args_for(objective="fm")
    m, params, _ = S.setup(a, torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = _snapshot(m)
    x = images.clone()
    x[0, 0, 0, 0] = float("nan")
    loss, _ = S.micro_losses(m, a, None, x, ["a cat", "a dog"], 0, [0, 1])
    assert not torch.isfinite(loss)
    assert T.optimizer_step(params, opt, 1, 1.0, bad=True) == (None, True)
    loss, _ = S.micro_losses(m, a, None, images, ["a cat", "a dog"], 0, [0, 1])
    loss.backward()
    params[0].grad[0] = float("inf")                                     # finite loss, non-finite gradient
    gn, skipped = T.optimizer_step(params, opt, 1, 1.0)
    assert skipped and gn is None and not opt.state
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())
    assert all(p.grad is None for p in params)


def test_grad_ckpt_same_loss_and_grads(tiny_paths, images):
    import reward
    res = []
    for gc in (False, True):
        a = args_for(objective="sem", grad_ckpt=gc, train_encoder_lora=True)   # LVLM, DiT and VAE decoder
        m, params, _ = S.setup(a, torch.device("cpu"))
        loss, _ = S.micro_losses(m, a, reward.load_backbone("pixel"), images, None, 0, [0, 1])
        loss.backward()
        res.append((loss.item(), [p.grad.clone() for p in params]))
    assert abs(res[0][0] - res[1][0]) < 1e-5
    assert all(torch.allclose(g0, g1, atol=1e-6, rtol=1e-4) for g0, g1 in zip(res[0][1], res[1][1]))


@pytest.mark.parametrize("variant", [dict(sem_steps_k=2, sem_sample_steps=3), dict(cond_source="captioning_pass")])
def test_sem_variants_reach_every_trained_part(tiny_paths, images, variant):
    import reward
    a = args_for(objective="sem", train_encoder_lora=True, **variant)
    m, params, _ = S.setup(a, torch.device("cpu"))
    loss, st = S.micro_losses(m, a, reward.load_backbone("pixel"), images, None, 0, [0, 1])
    loss.backward()
    assert math.isfinite(st["sem"])
    for part in ("encoder", "projector", "transformer"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in getattr(m, part).named_parameters() if p.requires_grad), part


def test_help_renders():
    from transformers import HfArgumentParser
    h = HfArgumentParser(S.Args).format_help()
    assert "--objective" in h and "--train_encoder_lora" in h


# ---------------------------------------------------------------------------------------------- end to end

def test_missing_captions_clear_error(tmp_path, tiny_paths):
    data = make_jsonl(str(tmp_path / "d"), 2, captions=False)
    with pytest.raises(ValueError, match=r"data\.jsonl.*no caption.*0\.png"):
        S.main(args_for(objective="fm", data=data, out_dir=str(tmp_path / "o")))


def test_bad_images_reported_and_skipped(tmp_path, tiny_paths):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "corrupt.png").write_bytes(b"this is not a png \x00\x01\x02" * 10)
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode.startswith("I")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[16:48, 16:48, 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    out = str(tmp_path / "o")
    S.main(args_for(objective="sem", data=str(d), out_dir=out, steps=1, batch_size=3))
    log = read_log(out)
    assert len(log) == 1 and all(math.isfinite(r["loss/sem"]) for r in log)
    bad = [f for r in log for f in r.get("data/bad_files", [])]
    assert [os.path.basename(f) for f in bad] == ["corrupt.png"]
    assert os.path.exists(os.path.join(out, "ckpt", "weights.safetensors"))


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, tiny_paths):
    data = make_jsonl(str(tmp_path / "d"), 6)
    a = args_for(objective="fm+sem", temperature=0.7, data=data, steps=4, save_every=2, train_encoder_lora=True,
                 schedule="cosine", warmup=1)
    run = lambda extra, out: subprocess.Popen([sys.executable, os.path.join(ROOT, "stage1_coldstart.py")] + cli(a) +
                                              ["--out_dir", out] + extra, env=env(), cwd=str(tmp_path),
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    straight, part = str(tmp_path / "straight"), str(tmp_path / "part")
    p1, p2 = run([], straight), run(["--steps", "4", "--stop_after", "2"], part)
    for p in (p1, p2):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_log(part)] == [1, 2]
    p3 = run(["--resume"], part)
    out = p3.communicate(timeout=300)[0]
    assert p3.returncode == 0, out[-3000:]
    la, lb = read_log(straight), read_log(part)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        for k in ("loss/total", "loss/fm", "loss/sem", "grad_norm", "lr"):
            assert abs(ra[k] - rb[k]) <= 1e-6, (ra["step"], k, ra[k], rb[k])
    wa, wb = load_file(f"{straight}/ckpt/weights.safetensors"), load_file(f"{part}/ckpt/weights.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_double_batch(tmp_path, tiny_paths):
    data = make_jsonl(str(tmp_path / "d"), 8)
    a2 = args_for(objective="fm+sem", data=data, steps=2, batch_size=1, train_encoder_lora=True, temperature=0.0)
    out2 = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "stage1_coldstart.py")] + cli(a2) + ["--out_dir", out2]
    p = subprocess.run(cmd, env=env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out1 = str(tmp_path / "one")
    a1 = args_for(**{**vars(a2), "batch_size": 2, "out_dir": out1})
    S.main(a1)
    l1, l2 = read_log(out1), read_log(out2)
    assert len(l1) == len(l2) == 2
    for r1, r2 in zip(l1, l2):
        for k in ("loss/total", "loss/fm", "loss/sem", "grad_norm"):
            assert abs(r1[k] - r2[k]) <= 1e-4 * max(1.0, abs(r1[k])), (r1["step"], k, r1[k], r2[k])
    w1, w2 = load_file(f"{out1}/ckpt/weights.safetensors"), load_file(f"{out2}/ckpt/weights.safetensors")
    weights = [k for k in w1 if not k.startswith("optim.")]
    # Adam turns float noise in near-zero gradients into up to ~lr-sized steps: allow 0.1 lr
    assert weights and all(torch.allclose(w1[k], w2[k], atol=0.1 * a2.lr, rtol=1e-4) for k in weights)
