"""
Where the time and memory go: the stage-2 and stage-3 training steps cut down for measurement
(nanoGPT's bench.py). Not a second implementation: every phase calls the functions the stage scripts
call (model.UAE, stage2_grpo_und, stage3_grpo_gen) with their Args defaults; no data loader, logs or
checkpoints. Synthetic source images; medians over --iters steps after --warmup.

  python bench.py --preset tiny --stage all        # the issue's target workloads (CPU, 2 threads)
  python bench.py --preset tiny --sweep            # + step time vs G, caption length, SDE steps, resolution
  python bench.py --preset small                   # random LVLM 256 x 4 layers, DiT 4 x 4 heads x 32, 128 px
  python bench.py --preset real                    # GPU only: Qwen2.5-VL-3B + SD3.5-large sizes, random, bf16
  python bench.py --quick [--sweep]                # CI: 1 warm-up + 2 steps (2-point sweeps of 1 step)

Memory: CPU = the process's peak RSS (resource.getrusage; its high-water mark is reset per stage via
/proc/self/clear_refs where Linux allows), GPU = torch.cuda.max_memory_allocated per stage.
MFU (stage 3) = 6 * DiT params * DiT tokens of the policy pass / its time / --peak_tflops. With LoRA the
backward skips the frozen weights' gradients (~4x, not 6x), so this overstates the work done.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch

import data as D
import model as M
import training as T
import reward as R
import stage2_grpo_und as S2
import stage3_grpo_gen as S3

PRESETS = {  # random-weight sizes built here (tiny: tiny.build_tiny's); res: image side
    "tiny": dict(res=64),
    "small": dict(res=128, hidden=256, layers=4, heads=4, kv=2, inter=512, vocab=None, tie=False, patch=8,
                  vdepth=2, vhidden=64, vheads=2, vinter=128, window=64, fullatt=[1], dit_layers=4, dit_heads=4,
                  head_dim=32, joint=256, cap_proj=128, pooled=64, pos_max=16, vae=(32, 64, 64, 64), vae_layers=1),
    "real": dict(res=512, hidden=2048, layers=36, heads=16, kv=2, inter=11008, vocab=151936, tie=True, patch=14,
                 vdepth=32, vhidden=1280, vheads=16, vinter=3420, window=112, fullatt=[7, 15, 23, 31],  # Qwen2.5-VL-3B
                 dit_layers=38, dit_heads=38, head_dim=64, joint=4096, cap_proj=2432, pooled=2048, pos_max=192,
                 vae=(128, 256, 512, 512), vae_layers=2),                                         # SD3.5-large
}
SWEEPS = {"stage2": [("G", [2, 4, 8]), ("max_new_tokens", [16, 32, 64])],  # --quick: the first two points
          "stage3": [("G", [2, 4, 8]), ("sample_steps", [3, 6, 12]), ("resolution", [0.5, 1, 2])]}  # x preset res
TARGETS = {"stage2": ("s/step", 0.15), "stage3": ("ms/image", 49.0)}  # tiny, default workload, 2 CPU threads

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model sizes (random weights)")
p.add_argument("--stage", default="all", choices=["2", "3", "all"], help="which training step to measure")
p.add_argument("--B", type=int, default=2, help="stage 2: source images per step")
p.add_argument("--groups", type=int, default=2, help="stage 3: groups (source images) per step")
p.add_argument("--G", type=int, default=4, help="group size (captions per image / samples per caption)")
p.add_argument("--max_new_tokens", type=int, default=32, help="caption length cap")
p.add_argument("--sample_steps", type=int, default=6, help="Euler (stage 2) / SDE (stage 3) steps")
p.add_argument("--resolution", type=int, default=0, help="image side (0 = the preset's)")
p.add_argument("--reward", default="", help="backbone (reward.py); '' = pixel, or a random ViT-L/14 clip for real")
p.add_argument("--reward_path", default="tiny", help="its weights ('tiny' = the seeded tiny version)")
p.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
p.add_argument("--sweep", action="store_true", help="also the scaling sweeps (slower)")
p.add_argument("--quick", action="store_true", help="CI: 1 warm-up, 2 timed steps; 2-point sweeps of 1 step")
p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (always on for --preset real)")
p.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense: 989)")
p.add_argument("--out", default="out/bench.json", help="JSON results")


# ----------------------------------------------------------------------------------------------
# models

def build_sized(c, res, device="cpu", dtype=torch.float32):
    """Random-weight (encoder, processor, DiT, VAE, scheduler) of sizes c; the tiny preset's tokenizer
    (vocab rows beyond it are suppressed by model.UAE, as the tiny preset's padding rows are)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    tok = Qwen2_5_VLProcessor.from_pretrained(M.tiny_paths()[0]).tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS}
    pp = dict(patch_size=c["patch"], merge_size=2, temporal_patch_size=2)
    improc = Qwen2VLImageProcessor(**pp, min_pixels=res ** 2, max_pixels=res ** 2)
    proc = Qwen2_5_VLProcessor(image_processor=improc, tokenizer=tok, chat_template=M.CHAT_TEMPLATE,
                               video_processor=Qwen2VLVideoProcessor(**pp))
    h = c["hidden"] // c["heads"] // 2  # mrope sections of head_dim / 2, as Qwen's 16/24/24 of 64
    text = dict(vocab_size=c["vocab"] or (len(tok) + 63) // 64 * 64, hidden_size=c["hidden"],
                intermediate_size=c["inter"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                num_key_value_heads=c["kv"], max_position_embeddings=32768, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [h // 4, h * 3 // 8, h * 3 // 8]})
    vision = dict(depth=c["vdepth"], hidden_size=c["vhidden"], intermediate_size=c["vinter"], num_heads=c["vheads"],
                  patch_size=c["patch"], spatial_merge_size=2, temporal_patch_size=2, window_size=c["window"],
                  out_hidden_size=c["hidden"], fullatt_block_indexes=c["fullatt"])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=c["tie"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            enc = Qwen2_5_VLForConditionalGeneration(cfg)
            with torch.no_grad():  # the tiny preset's logit scale (not near-uniform sampling)
                enc.lm_head.weight.normal_(0, 0.25)
            dit = SD3Transformer2DModel(sample_size=res // 8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=c["dit_layers"], attention_head_dim=c["head_dim"],
                                        num_attention_heads=c["dit_heads"], joint_attention_dim=c["joint"],
                                        caption_projection_dim=c["cap_proj"], pooled_projection_dim=c["pooled"],
                                        pos_embed_max_size=c["pos_max"], qk_norm="rms_norm")
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=c["vae"],
                                layers_per_block=c["vae_layers"], latent_channels=16, sample_size=res,
                                norm_num_groups=8 if c["vae"][0] < 128 else 32, use_quant_conv=False,
                                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    finally:
        torch.set_default_dtype(default)
    return enc, proc, dit, vae, FlowMatchEulerDiscreteScheduler(shift=3.0)


def load_model(a, device, dtype):
    c = PRESETS[a.preset]
    if a.preset == "tiny":
        return M.load_uae(preset="tiny", dtype=dtype, device=device)
    if a.preset == "small":  # saved once under $UAE_HOME, loaded through the stages' load_uae
        d = os.path.join(M.UAE_HOME, "bench-small-v1")
        if not os.path.exists(os.path.join(d, "decoder", "scheduler")):
            from transformers.utils import logging
            logging.disable_progress_bar()
            tmp = d + f".tmp{os.getpid()}"
            subs = ("encoder", "encoder", "decoder/transformer", "decoder/vae", "decoder/scheduler")
            for obj, sub in zip(build_sized(c, c["res"]), subs):  # encoder dir: weights + processor
                obj.save_pretrained(os.path.join(tmp, sub))
            D.atomic_publish(tmp, d)
        return M.load_uae(encoder=f"{d}/encoder", decoder=f"{d}/decoder", dtype=dtype, device=device)
    # real: ~12B random parameters built straight on the GPU in bf16 (saving them would write ~24 GB)
    enc, proc, dit, vae, sched = build_sized(c, c["res"], device, dtype)
    base = {"encoder": f"random:{M.REAL_ENCODER}", "decoder": f"random:{M.REAL_DECODER}"}
    m = M.UAE(enc, proc, dit, vae, sched, base=base)
    return m.to(device).precision(dtype).eval()


def load_reward(a, device):
    a.reward = a.reward or ("clip" if a.preset == "real" else "pixel")
    if a.preset == "real" and a.reward == "clip":  # ViT-L/14 sized, random (open_clip's bundled config)
        import open_clip
        return R.Backbone("clip", open_clip.create_model("ViT-L-14").visual.to(device), 224, short=224)
    return R.load_backbone(a.reward, a.reward_path if a.reward != "pixel" else None, device=device)


def setup_stage(stage, a, device, dtype):
    """The model, reward, optimizer and frozen negative condition as the stage's main() sets them up."""
    m = load_model(a, device, dtype)
    kw = dict(preset=a.preset, G=a.G, max_new_tokens=a.max_new_tokens, sample_steps=a.sample_steps,
              resolution=a.resolution or PRESETS[a.preset]["res"], grad_ckpt=a.grad_ckpt,
              dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    if stage == "stage2":  # a fresh encoder LoRA
        sargs = S2.Args(batch_size=a.B, **kw)
        M.add_lora(m.encoder, sargs.lora_r, sargs.lora_alpha, M.ENCODER_LORA_TARGETS)
        m.precision(dtype)
        if sargs.grad_ckpt:
            m.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [q for q in m.encoder.parameters() if q.requires_grad]
    else:  # a fresh DiT LoRA kept in fp32; encoder and projector frozen
        sargs = S3.Args(groups=a.groups, **kw)
        M.add_lora(m.transformer, sargs.lora_r, sargs.lora_alpha, M.DIT_LORA_TARGETS)
        m.projector.requires_grad_(False)
        m.precision(dtype)
        params = [q for q in m.transformer.parameters() if q.requires_grad]
        if sargs.grad_ckpt:
            m.transformer.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=sargs.lr, weight_decay=sargs.weight_decay)
    with torch.no_grad():  # the frozen CFG negative (stage 3: only when cfg != 1)
        neg = m.condition([getattr(sargs, "negative_prompt", M.NEGATIVE_PROMPT)])
    neg = neg if stage == "stage2" or sargs.cfg != 1.0 else None
    return (m, load_reward(a, device), opt, params, neg), sargs


# ----------------------------------------------------------------------------------------------
# the two steps, phase by phase: the stage scripts' loop bodies (mu = 1, one rank), in their order

def clock(device):
    """ck(phase) adds the time since the previous call to phase; ck.d holds the totals."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    def ck(phase):
        t = now()
        ck.d[phase], ck.t = ck.d.get(phase, 0.0) + t - ck.t, t
    ck.d, ck.t = {}, now()
    return ck


def stage2_step(m, bb, opt, params, neg, x, s2, step):
    """One GRPO step on the encoder (stage2_grpo_und.main) -> (phase seconds, counters)."""
    ck, G = clock(m.device), s2.G
    m.eval()
    roll = m.sample_captions(x, G=G, temperature=s2.temperature, top_p=s2.top_p, top_k=s2.top_k,
                             max_new_tokens=s2.max_new_tokens)                                   # N = B*G rows
    ck("generate")
    noise = S2.group_noise(m.latent_shape(s2.resolution, s2.resolution), s2.seed, step, range(len(x)), m.device)
    recon = S2.reconstruct(m, roll.texts, noise.repeat_interleave(G, 0), neg, s2)                # (N, 3, H, W)
    ck("condition+reconstruct")
    with torch.no_grad():
        r = bb.similarity(x.repeat_interleave(G, 0).float(), recon.float()).float()               # (N,)
    ck("reward")
    adv = S2.group_advantages(r, G, scale=s2.scale_rewards, std_floor=s2.std_floor)
    N, n_tok = len(r), roll.completion_mask.sum().item()
    mbs = [(i, min(i + s2.micro_batch, N)) for i in range(0, N, s2.micro_batch)]
    with torch.no_grad(), M.adapters_disabled(m.encoder):
        ref = [m.completion_logprobs(roll.rows(i, j), s2.temperature) for i, j in mbs]
    ck("reference")
    m.train()
    opt.zero_grad(set_to_none=True)
    for (i, j), ref_k in zip(mbs, ref):
        sub = roll.rows(i, j)
        logp, _ = m.completion_logprobs(sub, s2.temperature, with_entropy=True)  # the stage logs the entropy
        loss_tok, _, _ = S2.grpo_token_loss(logp, logp.detach(), adv[i:j], s2.eps_low, s2.eps_high, ref_k, s2.beta)
        S2.aggregate(loss_tok, sub.completion_mask, s2.loss_agg, N, n_tok, s2.max_new_tokens).backward()
    ck("policy fwd+bwd")
    torch.nn.utils.clip_grad_norm_(params, s2.grad_clip)
    opt.step()
    ck("optimizer")
    return ck.d, {"images": N, "caption_tokens": n_tok}


def stage3_step(m, bb, opt, params, neg, x, s3, step):
    """One Flow-GRPO step on the DiT (stage3_grpo_gen.main) -> (phase seconds, counters)."""
    ck, G, sig, gids = clock(m.device), s3.G, m.sigmas(s3.sample_steps), range(len(x))
    caps = S3.caption_groups(m, x, [T.seed_of(s3.seed, step, g, "caption") for g in gids], s3)
    with torch.no_grad():
        cond = m.condition(caps).repeat_interleave(G)                                            # (N, L, D)
    ck("caption+condition")
    gens = [T.generator(s3.seed, step, g, "sde_noise") for g in gids]
    noise = S3._randn((len(x) * G,) + m.latent_shape(s3.resolution, s3.resolution), gens, m.device)
    z, traj, logp_old = S3.sde_sample(m, noise, cond, neg, sig, s3.noise_level, s3.cfg, gens)
    ck("sde sample")
    with torch.no_grad():
        recon = m.vae_decode(z)                                                                   # (N, 3, H, W)
    ck("decode")
    with torch.no_grad():
        r = bb.similarity(x.float().repeat_interleave(G, 0), recon.float()).float()
    ck("reward")
    adv = S3.group_advantages(r, G, scale=s3.scale_rewards, std_floor=s3.std_floor, clip=s3.adv_clip)
    js = S3.trained_steps(s3.sample_steps, s3.train_frac, s3.seed, step)
    at = lambda j: (traj[:, j].contiguous(), j, sig, cond, neg, s3.noise_level, s3.cfg)
    with torch.no_grad(), M.adapters_disabled(m.transformer):  # the stage interleaves these with the policy pass
        mean_ref = {j: S3.transition(m, *at(j), prev_sample=traj[:, j + 1])[2] for j in js}
    ck("reference")
    opt.zero_grad(set_to_none=True)
    for j in js:
        _, logp, mean, std = S3.transition(m, *at(j), prev_sample=traj[:, j + 1].contiguous())
        loss, _ = S3.flow_grpo_loss(logp, logp_old[:, j], adv, s3.eps_clip, S3.sde_kl(mean, mean_ref[j], std), s3.beta)
        (loss / len(js)).backward()
    ck("policy fwd+bwd")
    torch.nn.utils.clip_grad_norm_(params, s3.grad_clip)
    opt.step()
    ck("optimizer")
    rows = len(z) * (2 if neg is not None and s3.cfg != 1.0 else 1)                    # CFG doubles the DiT batch
    ph, L = m.transformer.config.patch_size, max(cond.emb.shape[1], neg.emb.shape[1] if neg is not None else 0)
    return ck.d, {"images": len(z), "caption_tokens": sum(len(m.tokenizer(c).input_ids) for c in caps),
                  "dit_train_tokens": rows * ((z.shape[-2] // ph) * (z.shape[-1] // ph) + L) * len(js)}


# ----------------------------------------------------------------------------------------------
# measurement and report

def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: reset the RSS high-water mark that getrusage reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(step_fn, setup, sargs, warmup, iters):
    """warm-up + timed steps -> medians of every phase, of the step total and of the counters."""
    B = getattr(sargs, "batch_size", None) or sargs.groups
    x = torch.rand((B, 3, sargs.resolution, sargs.resolution), generator=torch.Generator().manual_seed(0))
    runs, cpu = [], []
    for k in range(warmup + iters):
        c0 = time.process_time()  # CPU seconds of this process, all threads: less sensitive to a loaded machine
        runs.append(step_fn(*setup, x.to(setup[0].device), sargs, k))
        cpu.append(time.process_time() - c0)
    runs, cpu = runs[warmup:], cpu[warmup:]
    tot = [sum(d.values()) for d, _ in runs]
    med = lambda i, k: statistics.median(run[i][k] for run in runs)
    return {"step_s": statistics.median(tot), "step_s_min": min(tot), "step_s_all": tot,
            "step_cpu_s": statistics.median(cpu), "phases_s": {k: med(0, k) for k in runs[0][0]},
            **{k: med(1, k) for k in runs[0][1]}}


def linear_fit(xs, ts):
    """Least squares t = a + b x -> (a, b, R^2)."""
    mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    b = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    a0, sst = mt - b * mx, sum((t - mt) ** 2 for t in ts)
    return a0, b, 1 - sum((t - a0 - b * x) ** 2 for x, t in zip(xs, ts)) / sst if sst > 0 else 1.0


def is_linear(xs, ts):
    """~linear: a good straight-line fit (R^2 >= 0.98, slope > 0) that grows no faster than x (ratio of
    ratios <= 1.25: a quadratic passes the R^2 test on 3 doubling points, not this one)."""
    a0, b, r2 = linear_fit(xs, ts)
    return r2 >= 0.98 and b > 0 and (ts[-1] / ts[0]) / (xs[-1] / xs[0]) <= 1.25


def sweep(stage, key, values, setup, sargs, step_fn, a):
    """Step time at each value of one knob; fit t = a + b x (x = pixels for resolution) and judge it. The fit
    uses each point's fastest step: a loaded machine only adds time, and medians of 3 steps are noisy."""
    warm, iters = (0, 1) if a.quick else (1, 3)
    runs = [measure(step_fn, setup, replace(sargs, **{key: v}), warm, iters) for v in values]
    ts, xs = [r["step_s_min"] for r in runs], [v * v if key == "resolution" else v for v in values]
    a0, b, r2 = linear_fit(xs, ts)
    rr = (ts[-1] / ts[0]) / (xs[-1] / xs[0])  # ratio of ratios: 1 proportional, < 1 fixed costs, > 1 super-linear
    unit = "pixels" if key == "resolution" else key
    verdict = (f"{'~linear' if is_linear(xs, ts) else 'NOT linear'} in {unit}: t = {a0:.3f} + {b:.3g} x s, "
               f"R^2 {r2:.3f}; " if len(xs) > 2 else f"2 points, no linearity test, in {unit}: ")
    verdict += f"time x{ts[-1] / ts[0]:.2f} for x x{xs[-1] / xs[0]:.2f} (ratio of ratios {rr:.2f})"
    print(f"\n{stage}: step time vs {key}\n{key:>14} {'min s':>8} {'ratio':>7} {'x ratio':>8} {'median s':>9} "
          f"{'caption tok':>12}")
    for v, x, t, r in zip(values, xs, ts, runs):
        print(f"{v:>14} {t:8.3f} {t / ts[0]:7.2f} {x / xs[0]:8.2f} {r['step_s']:9.3f} {r['caption_tokens']:12.0f}")
    print(f"  -> {verdict}")
    return {"param": key, "values": values, "x": xs, "step_s_min": ts, "step_s": [r["step_s"] for r in runs],
            "ratio": [t / ts[0] for t in ts], "caption_tokens": [r["caption_tokens"] for r in runs],
            "fit": {"a": a0, "b": b, "r2": r2}, "ratio_of_ratios": rr, "linear": is_linear(xs, ts),
            "verdict": verdict}


def report(stage, r, sargs, setup, a, device):
    """Throughput, MFU and the target into r; the phase table on stdout."""
    N, t = r["images"], r["step_s"]
    gen = r["phases_s"]["generate" if stage == "stage2" else "caption+condition"]
    r.update(images_per_s=N / t, ms_per_image=1000 * t / N, caption_tokens_per_s=r["caption_tokens"] / gen)
    if stage == "stage2":
        r["workload"] = (f"B {sargs.batch_size} x G {sargs.G}, {sargs.max_new_tokens} new tokens, "
                         f"{sargs.sample_steps} Euler steps")
    else:
        r["workload"] = f"{sargs.groups} groups x G {sargs.G}, {sargs.sample_steps} SDE steps"
        r["dit_params"] = sum(q.numel() for q in setup[0].transformer.parameters())
        r["dit_train_tflops"] = 6 * r["dit_params"] * r["dit_train_tokens"] / r["phases_s"]["policy fwd+bwd"] / 1e12
        r["dit_mfu"] = r["dit_train_tflops"] / a.peak_tflops
    r["workload"] += f", cfg {sargs.cfg}, beta {sargs.beta}, {sargs.resolution} px, {sargs.dtype}"
    where = device.type if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\n{stage} ({a.preset}, {where}): {r['workload']} | median of {a.iters} after {a.warmup} warm-up")
    print(f"{'phase':<24}{'median s':>10}{'share':>8}")
    for k, v in r["phases_s"].items():
        print(f"{k:<24}{v:10.4f}{100 * v / sum(r['phases_s'].values()):7.1f}%")
    print(f"{'step (median of totals)':<24}{t:10.4f}   (fastest {r['step_s_min']:.4f} s, "
          f"process CPU time {r['step_cpu_s']:.3f} s)")
    print(f"peak memory {r['peak_mem_mb']:.0f} MB ({r['mem_kind']}) | {r['images_per_s']:.1f} images/s, "
          f"{r['ms_per_image']:.1f} ms/image | {r['caption_tokens_per_s']:.0f} caption tokens/s")
    if "dit_mfu" in r:
        print(f"DiT policy pass: {r['dit_train_tflops']:.3g} TFLOP/s, MFU {100 * r['dit_mfu']:.2f}% "
              f"of {a.peak_tflops:g}")
    unit, target = TARGETS[stage]
    knobs = ("B", "groups", "G", "max_new_tokens", "sample_steps", "resolution", "threads")
    if a.preset == "tiny" and device.type == "cpu" and all(getattr(a, k) == p.get_default(k) for k in knobs):
        val = t if unit == "s/step" else r["ms_per_image"]
        r["target"] = {"unit": unit, "target": target, "measured": val, "pass": val <= target}
        print(f"target <= {target:g} {unit}: measured {val:.3f} -> {'PASS' if val <= target else 'MISS'}")


def main(a):
    if a.quick:
        a.warmup, a.iters = 1, 2
    if a.preset == "real":
        if not torch.cuda.is_available():
            sys.exit("bench.py --preset real needs a CUDA GPU: it builds random-weight Qwen2.5-VL-3B + SD3.5-large "
                     "in bf16 (~24 GB of weights). On CPU use --preset tiny or --preset small.")
        a.grad_ckpt = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if a.preset == "real" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    out = {"preset": a.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(a), "sweeps": {}}
    for stage in ["stage2", "stage3"] if a.stage == "all" else [f"stage{a.stage}"]:
        reset_peak(device)
        setup, sargs = setup_stage(stage, a, device, dtype)
        step_fn = stage2_step if stage == "stage2" else stage3_step
        r = out[stage] = measure(step_fn, setup, sargs, a.warmup, a.iters)
        r["peak_mem_mb"] = peak_mb(device)
        r["mem_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS"
        report(stage, r, sargs, setup, a, device)
        for key, vals in SWEEPS[stage] if a.sweep else []:
            vals = [int(v * sargs.resolution) if key == "resolution" else v for v in vals[:2 if a.quick else 3]]
            out["sweeps"][f"{stage}/{key}"] = sweep(stage, key, vals, setup, sargs, step_fn, a)
        del setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {a.out}")
    return out


if __name__ == "__main__":
    main(p.parse_args())
