"""FSDP2 (--fsdp) and multi-node launches, on CPU with gloo and the tiny preset:
- stage 1 fm --dit_full --fsdp on 2 ranks (with activation checkpointing) equals the unsharded 1-rank run with the
  same global batch (final weights within 1e-5);
- an FSDP checkpoint written on 2 ranks resumes on 1 rank, and one written on 1 rank on 2 ranks, to the same result
  as the uninterrupted run;
- two torchrun launchers (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1) equal one launcher with 2
  processes, bit for bit;
- the pieces: the clip over sharded + plain gradients, the checkpoint's contents, the global-batch check."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import images
import checkpoint as ck
import runs
import training as T
import stage1_coldstart as S
from test_stage1 import ROOT, args_for, cli, env, free_port, make_jsonl, read_log

# the runs compared below: 4 steps of 2 micro-steps, global micro-batch 2 (1 rank x 2 or 2 ranks x 1)
RUN = dict(objective="fm", dit_full=True, steps=4, grad_accum=2, lr=1e-4, save_every=100)


def torchrun(a, out, nproc=2, extra=(), launcher=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or [f"--nproc_per_node={nproc}",
                                                                          f"--master_port={free_port()}"]),
           os.path.join(ROOT, "stage1_coldstart.py")] + cli(a) + ["--out_dir", out, *extra]
    return subprocess.Popen(cmd, env=env(), cwd=os.path.dirname(out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait(*procs):
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-4000:]


def weights(out):
    return {k: v for k, v in load_file(f"{out}/ckpt/weights.safetensors").items() if not k.startswith("optim.")}


def max_diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_paths):
    """one: 1 rank, unsharded (no --fsdp), batch 2. two: 2 ranks --fsdp --grad_ckpt, batch 1 (torchrun).
    part2: two's first 2 steps (--stop_after 2); part1: one's first 2 steps with --fsdp (the FSDP format)."""
    d = tmp_path_factory.mktemp("fsdp")
    data = make_jsonl(str(d / "data"), 8)
    a1 = args_for(data=data, batch_size=2, **RUN)
    a2 = args_for(data=data, batch_size=1, fsdp=True, grad_ckpt=True, **RUN)
    r = {k: str(d / k) for k in ("one", "two", "part2", "part1")}
    p_two, p_part2 = torchrun(a2, r["two"]), torchrun(a2, r["part2"], extra=["--stop_after", "2"])
    S.main(args_for(**{**vars(a1), "out_dir": r["one"]}))
    S.main(args_for(**{**vars(a1), "fsdp": True, "stop_after": 2, "out_dir": r["part1"]}))
    wait(p_two, p_part2)
    return {**r, "a1": a1, "a2": a2, "init": weights(r["part1"])}


@pytest.mark.slow
def test_fsdp_two_ranks_equal_unsharded_one_rank(fsdp_runs):
    l1, l2 = read_log(fsdp_runs["one"]), read_log(fsdp_runs["two"])
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for r1, r2 in zip(l1, l2):
        for k in ("loss/total", "loss/fm", "grad_norm"):
            assert abs(r1[k] - r2[k]) <= 1e-5 * max(1.0, abs(r1[k])), (r1["step"], k, r1[k], r2[k])
    w1, w2 = weights(fsdp_runs["one"]), weights(fsdp_runs["two"])
    assert any(k.startswith("transformer.transformer_blocks.1.") for k in w2) and any(k.startswith("projector.") for k in w2)
    d = max_diff(w1, w2)
    print(f"\n2 ranks --fsdp vs 1 rank unsharded: max |dw| = {d:.2e}")
    assert d <= 1e-5
    assert max_diff(w1, fsdp_runs["init"]) > 1e-4  # the weights did move (the comparison is not vacuous)
    meta = json.load(open(f"{fsdp_runs['two']}/ckpt/uae.json"))
    assert meta["optim_sharded"] and meta["world"] == 2 and meta["transformer_full"]
    assert not any(k.startswith("optim.") for k in load_file(f"{fsdp_runs['two']}/ckpt/weights.safetensors"))
    assert os.path.isfile(f"{fsdp_runs['two']}/ckpt/sharded/.metadata")
    assert not [n for n in os.listdir(fsdp_runs["two"]) if n.startswith(".ckpt")]   # the staging folder moved in
    back = runs.load_model(init=fsdp_runs["two"])  # what every downstream script does: the full checkpoint loads unchanged
    assert torch.equal(back.transformer.transformer_blocks[0].attn.to_q.weight,
                       w2["transformer.transformer_blocks.0.attn.to_q.weight"])


@pytest.mark.slow
def test_fsdp_resume_two_ranks_to_one(fsdp_runs):
    part = fsdp_runs["part2"]
    assert [r["step"] for r in read_log(part)] == [1, 2]
    S.main(args_for(**{**vars(fsdp_runs["a1"]), "fsdp": True, "resume": True, "out_dir": part}))
    assert [r["step"] for r in read_log(part)] == [1, 2, 3, 4]
    d = max_diff(weights(part), weights(fsdp_runs["two"]))
    print(f"\nresumed 2 -> 1 rank vs uninterrupted 2 ranks: max |dw| = {d:.2e}")
    assert d <= 1e-5
    for ra, rb in zip(read_log(part), read_log(fsdp_runs["two"])):
        assert abs(ra["loss/total"] - rb["loss/total"]) <= 1e-5, ra["step"]


@pytest.mark.slow
def test_fsdp_resume_one_rank_to_two(fsdp_runs):
    part = fsdp_runs["part1"]
    wait(torchrun(fsdp_runs["a2"], part, extra=["--resume", "true"]))
    assert [r["step"] for r in read_log(part)] == [1, 2, 3, 4]
    d = max_diff(weights(part), weights(fsdp_runs["one"]))
    print(f"\nresumed 1 -> 2 ranks vs uninterrupted 1 rank: max |dw| = {d:.2e}")
    assert d <= 1e-5


@pytest.mark.slow
def test_two_launchers_nnodes_2_equal_one_launcher(fsdp_runs):
    """The README's multi-node lines on one machine: torchrun --nnodes 2 --node_rank i --rdzv_backend c10d
    --rdzv_endpoint 127.0.0.1:PORT, one process per launcher; the result is bit-identical to one launcher with
    --nproc_per_node 2 (the `two` run)."""
    out, port = os.path.join(os.path.dirname(fsdp_runs["two"]), "nnodes"), free_port()
    launchers = [torchrun(fsdp_runs["a2"], out, launcher=["--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                                                     "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                                     "--rdzv_id=uae-test"]) for i in (0, 1)]
    wait(*launchers)
    a, b = weights(out), weights(fsdp_runs["two"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss/total"] for r in read_log(out)] == [r["loss/total"] for r in read_log(fsdp_runs["two"])]


# ---------------------------------------------------------------------------------------------- pieces

def test_clip_without_sharded_params_is_torchs():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        q.grad = p.grad.clone()
    n_want = torch.nn.utils.clip_grad_norm_(qs, 1.0).item()
    assert T.fsdp_clip_grad_norm_(ps, 1.0) == n_want
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


def test_resume_on_another_rank_count_needs_fsdp_and_the_global_batch():
    meta = {"path": "x", "world": 2, "optim_sharded": True, "args": {"batch_size": 1, "grad_accum": 2}}
    a = args_for(fsdp=True, batch_size=2, grad_accum=2)                   # 1 rank x 2 x 2 = 2 ranks x 1 x 2
    assert runs.resharded_resume(a, meta, 1, "stage1") == {"batch_size", "grad_accum"}
    assert runs.resharded_resume(args_for(fsdp=True, batch_size=1, grad_accum=4), meta, 1, "stage1")
    with pytest.raises(runs.UsageError, match="global batch of 4"):
        runs.resharded_resume(args_for(fsdp=True, batch_size=1, grad_accum=2), meta, 1, "stage1")
    with pytest.raises(runs.UsageError, match="same number of ranks"):
        runs.resharded_resume(args_for(fsdp=False, batch_size=2, grad_accum=2), meta, 1, "stage1")
    with pytest.raises(runs.UsageError, match="same number of ranks"):
        runs.resharded_resume(a, {**meta, "optim_sharded": False}, 1, "stage1")


def test_fsdp_checkpoint_needs_fsdp_to_resume(tmp_path, tiny_paths):
    data = make_jsonl(str(tmp_path / "d"), 4)
    a = args_for(data=data, out_dir=str(tmp_path / "o"), objective="fm", steps=2, stop_after=1, fsdp=True)
    S.main(a)
    assert os.path.isdir(tmp_path / "o" / "ckpt" / "sharded")
    with pytest.raises(runs.UsageError, match=r"--fsdp True \(given False\)"):      # named before anything loads
        S.main(args_for(**{**vars(a), "fsdp": False, "resume": True, "stop_after": 0}))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])                  # and load_train_state's own guard
    with pytest.raises(images.CheckpointError, match="resume with --fsdp"):
        ck.load_train_state(str(tmp_path / "o"), opt, 0, 1)


# ---------------------------------------------------------------------------------------------- stages 2 and 3

@pytest.mark.slow
def test_stage3_fsdp_two_ranks_equal_one_rank(tmp_path):
    """stage 3 --fsdp (the DiT's frozen base and LoRA sharded) on 2 ranks x 1 group == 1 rank x 2 groups unsharded."""
    import stage3_grpo_gen as S3
    from test_stage2 import _image_dir, lora_disagreement
    from test_stage3 import TINY, lora_of, train_logs
    data = _image_dir(tmp_path / "img", 4)
    common = TINY + ["--data", data, "--steps", "3", "--eval_every", "3", "--eval_images", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                          os.path.join(ROOT, "stage3_grpo_gen.py"), *common, "--groups", "1", "--fsdp", "--out_dir", two],
                         env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    S3.main(common + ["--groups", "2", "--out_dir", one])
    wait(p)
    a, b = train_logs(one), train_logs(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("reward/mean", "loss/total", "loss/kl", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    off, n = lora_disagreement(lora_of(one), lora_of(two))  # test_stage3.test_two_ranks_equal_one_rank: why
    assert off <= 0.05 * n, f"{off} of {n} LoRA coordinates differ by more than 1e-5"
    assert os.path.isdir(os.path.join(two, "ckpt", "sharded"))


@pytest.mark.slow
def test_stage2_fsdp_two_ranks_equal_one_rank(tmp_path):
    """stage 2 --fsdp (the environment's frozen DiT sharded, the encoder LoRA all-reduced) on 2 ranks == 1 rank, one
    step (test_stage2.assert_two_ranks_equal_one: what is compared, how closely and why)."""
    from test_stage2 import _image_dir, assert_two_ranks_equal_one
    data = _image_dir(tmp_path / "img", 4)
    common = ["--preset", "tiny", "--data", data, "--reward", "pixel", "--resolution", "64", "--G", "4", "--micro_batch", "4",
              "--max_new_tokens", "8", "--sample_steps", "2", "--cfg", "5.0", "--lr", "1e-2", "--steps", "1",
              "--sample_every", "0", "--seed_per_group", "--eval_every", "1", "--eval_images", "2", "--eval_G", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                          os.path.join(ROOT, "stage2_grpo_und.py"), *common, "--batch_size", "1", "--fsdp", "--out_dir", two],
                         env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    q = subprocess.Popen([sys.executable, os.path.join(ROOT, "stage2_grpo_und.py"), *common, "--batch_size", "2",
                          "--out_dir", one], env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    wait(p, q)
    assert_two_ranks_equal_one(one, two)  # test_stage2: what is compared, and how closely
