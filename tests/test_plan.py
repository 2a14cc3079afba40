"""bench.py --plan: the two measurements it rests on (bytes autograd saves, per unit; the peak of live tensors),
its estimate against the measured peak of a small DiT's forward + backward on CPU, its per-GPU arithmetic, and
(slow) the real plan end to end with docs/operations.md's table equal to what it prints."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tools import bench
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_saved_by_unit_books_each_storage_once():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    x = torch.randn(2, 4, requires_grad=True)
    params = list(lin1.parameters()) + list(lin2.parameters())
    r = bench.saved_by_unit(lambda: lin2(torch.relu(lin1(x))), [lin1, lin2], params)
    # lin1 keeps its input x (2x4 fp32) for its weight's gradient; relu keeps its output (2x8), outside any unit;
    # lin2's input is that same storage (booked once); the weights are parameters (not counted)
    assert r == {"outside": 2 * 8 * 4, "saved": [2 * 4 * 4, 0], "inputs": [2 * 4 * 4, 2 * 8 * 4]}


def test_live_peak_counts_allocations_not_views():
    x, lin = torch.randn(10, 1000), torch.nn.Linear(1000, 1000)
    with torch.no_grad():
        assert bench.live_peak(lambda: lin(x)) == 10 * 1000 * 4          # the weight's .t() view is no allocation
        assert bench.live_peak(lambda: (lin(x) * 2 + 1).relu()) == 2 * 10 * 1000 * 4


def test_estimate_brackets_the_measured_peak_of_a_small_dit(tiny_paths):
    """The plan's activation estimate (saved bytes per block, affine in tokens, scaled to depth; with checkpointing:
    block inputs + one block recomputed) against the live-tensor peak of a real forward + backward of a small LoRA
    DiT at another size: the estimate <= the peak <= the estimate + the LoRA gradients (which the plan adds)."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    d = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                              attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                              caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=16, qk_norm="rms_norm")
    d.set_attn_processor(M.MaskedJointAttnProcessor())
    d.requires_grad_(False)
    bench._as_lora(d, M.DIT_LORA_TARGETS)
    kw = lambda side, L: dict(hidden_states=torch.randn(1, 16, side, side), encoder_hidden_states=torch.randn(1, L, 64),
                              pooled_projections=torch.zeros(1, 32), timestep=torch.full((1,), 500.0), return_dict=False,
                              joint_attention_kwargs={"attention_mask": torch.ones(1, L, dtype=torch.bool)})
    ms = []
    for side, L in ((8, 4), (12, 9)):
        k = kw(side, L)
        ms.append(bench.saved_by_unit(lambda: d(**k)[0], d.transformer_blocks, list(d.parameters())))
    f = bench._fit(*ms, 16 + 4, 36 + 9)
    grads = sum(4 * q.numel() for q in d.parameters() if q.requires_grad)
    for ckpt in (False, True):
        if ckpt:
            d.enable_gradient_checkpointing()
        k = kw(16, 16)
        est = bench._act(f, 1, 64 + 16, 4, ckpt)
        peak = bench.live_peak(lambda: d(**k)[0].pow(2).mean().backward())
        for q in d.parameters():
            q.grad = None
        assert est <= peak <= 1.1 * (est + grads), (ckpt, est, peak, grads)


def test_plan_arithmetic():
    """16 bytes per trainable parameter without FSDP (fp32 weight, gradient, 2 AdamW moments), divided by the
    GPU count with it; frozen parts in bf16; FSDP adds its gathered blocks."""
    P = {"dit": 1000, "projector": 10, "encoder": 500, "vae": 20, "dit_block": 50, "dit_layers": 2}
    zero = {"outside": (0, 0), "block": (0, 0), "last": (0, 0), "inputs": (0, 0), "max": (0, 0)}
    st = next(s for s in bench.PLAN_STAGES if s["key"] == "stage1_fm")
    st = {**st, "train": lambda *a: 0.0, "rollout": lambda *a: 0.0}
    ddp = bench.plan_stage(st, P, {"dit full32": zero}, 8, False, 2, True)
    assert ddp["params"] == 4 * 1010 + 2 * 520 and ddp["grads"] == 4 * 1010 and ddp["optim"] == 8 * 1010
    assert ddp["peak_phase"] == "step" and ddp["peak"] == ddp["params"] + ddp["optim"] + 3 * ddp["grads"]  # + flat copy + sqrt(v)
    fs = bench.plan_stage(st, P, {"dit full16": zero}, 8, True, 2, True)
    assert fs["params"] == 4 * 1010 / 8 + 2 * 520 + 2 * 2 * 50 and fs["grads"] == 4 * 1010 / 8 and fs["optim"] == 8 * 1010 / 8


@pytest.mark.slow
def test_real_plan_and_its_table_in_the_docs(tmp_path, tiny_paths):
    """bench.py --preset real --plan on CPU (a few minutes on 2 cores): a verdict per stage; docs/operations.md shows
    its table as printed (rerun it and paste the table when the models or the launch lines change), and the README's
    real stage 1 `fm` launches use --fsdp, the only mode the plan says fits."""
    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, "tools/bench.py", "--preset", "real", "--plan", "--out", str(out)], cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    plan = json.load(open(out))
    assert set(plan["stages"]) == {"stage1_fm", "stage1_sem", "stage2", "stage3"}
    assert len(re.findall(r"^verdict: ", p.stdout, re.M)) == 4
    assert not plan["stages"]["stage1_fm"]["fits"]["ddp"] and plan["stages"]["stage1_fm"]["fits"]["fsdp"]
    assert 7.9e9 < plan["params"]["dit"] < 8.2e9 and 3.7e9 < plan["params"]["encoder"] < 3.8e9
    ops = open(os.path.join(ROOT, "docs", "operations.md")).read()
    missing = [ln for ln in bench.plan_table(plan) if ln not in ops]
    assert not missing, "docs/operations.md's plan table differs from the plan:\n" + "\n".join(missing)
    readme = open(os.path.join(ROOT, "README.md")).read()
    cmds = [c for c in readme.replace("\\\n", " ").splitlines() if "torchrun" in c and "--preset real" in c]
    fm = [c for c in cmds if "stage1_coldstart.py" in c and "--objective fm" in c]
    assert fm and all("--dit_full" in c and "--fsdp" in c for c in fm), fm   # the plan: only --fsdp fits


def test_bf16_products_in_fp32_leave_the_bytes_unchanged():
    """The plan computes bf16 products in fp32 (CPUs without bf16 kernels run them ~100x slower): the outputs keep
    bf16 dtypes and both measuring helpers book exactly the bytes of the plain bf16 run."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(1, 4, 32, 16, dtype=torch.bfloat16)
    conv = torch.nn.Conv2d(4, 8, 3).to(torch.bfloat16)

    def f():
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return net(x).sum() + a.float().sum() + conv(q).float().sum()

    plain = bench.live_peak(f), bench.saved_by_unit(f, list(net), list(net.parameters()))
    with bench.bf16_products_in_fp32():
        fast = bench.live_peak(f), bench.saved_by_unit(f, list(net), list(net.parameters()))
        assert net(x).dtype == conv(q).dtype == torch.bfloat16
    assert fast == plain and plain[0] > 0
