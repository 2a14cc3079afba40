"""
Where the time and memory go: the stage-2 and stage-3 training steps cut down for measurement
(nanoGPT's bench.py). Not a second implementation: every phase calls the functions the stage scripts
call (model.UAE, stage2_grpo_und, stage3_grpo_gen) with their Args defaults; no data loader, logs or
checkpoints. Synthetic source images; medians over --iters steps after --warmup. Stage 3 runs as its script does
by default, with the caption cache, and without it in alternate rounds.
--vs trl: stage 2 side by side with TRL's GRPOTrainer on the same work, step for step in one process (vs_trl):
the paired ratio project / TRL per round, on the machine that runs it (TRL: requirements-bench.txt, never needed
to train).

  python tools/bench.py --preset tiny --stage all  # the default workloads (CPU, 2 threads)
  python tools/bench.py --preset tiny --threads 1  # steadier when other jobs share the CPUs
  python tools/bench.py --vs trl [--threads 1]     # stage 2 next to TRL's GRPOTrainer: paired ratios, phases
  python tools/bench.py --preset tiny --sweep      # + step time vs G, caption length, SDE steps, resolution; cache vs K
  python tools/bench.py --preset small             # random LVLM 256 x 4 layers, DiT 4 x 4 heads x 32, 128 px
  python tools/bench.py --preset real              # GPU only: Qwen2.5-VL-3B + SD3.5-large sizes, random, bf16
  python tools/bench.py --quick [--sweep]          # CI: 1 warm-up + 2 steps (2-point sweeps of 1 step)
  python tools/bench.py --preset real --plan       # CPU: the memory plan of the real launches (docs/operations.md)

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/bench.py`
    sys.path.insert(0, ROOT)
import caption_cache as CC  # noqa: E402
import images  # noqa: E402
import model as M  # noqa: E402
import reward as R  # noqa: E402
import runs  # noqa: E402
import stage2_grpo_und as S2  # noqa: E402
import stage3_grpo_gen as S3  # noqa: E402
import training as T  # noqa: E402
from tools import tiny  # noqa: E402

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
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model sizes (random weights)")
p.add_argument("--stage", default="all", choices=["2", "3", "all"], help="which training step to measure")
p.add_argument("--B", type=int, default=2, help="stage 2: source images per step")
p.add_argument("--groups", type=int, default=2, help="stage 3: groups (source images) per step")
p.add_argument("--G", type=int, default=4, help="group size (captions per image / samples per caption)")
p.add_argument("--max_new_tokens", type=int, default=32, help="caption length cap")
p.add_argument("--sample_steps", type=int, default=6, help="Euler (stage 2) / SDE (stage 3) steps")
p.add_argument("--resolution", type=int, default=0, help="image side (0 = the preset's)")
p.add_argument("--captions_per_image", type=int, default=S3.Args.captions_per_image,
               help="stage 3's caption cache K (its default); > 0: also the step without the cache, in alternate rounds")
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
p.add_argument("--vs", default="", choices=["", "trl"], help="trl: stage 2 side by side with TRL's GRPOTrainer, "
               "--iters alternating rounds (needs TRL: requirements-bench.txt)")
p.add_argument("--plan", action="store_true", help="memory plan (CPU, no GPU): per-GPU memory of each stage's README real "
               "launch under DDP and FSDP, with a fit verdict (use with --preset real)")
p.add_argument("--gpus", type=int, default=8, help="--plan: GPUs the launch is spread over")
p.add_argument("--gpu_gib", type=float, default=79.2, help="--plan: memory per GPU in GiB (an 80 GB card: ~79.2 GiB)")


# ----------------------------------------------------------------------------------------------
# models

def build_sized(c, res, device="cpu", dtype=torch.float32):
    """Random-weight (encoder, processor, DiT, VAE, scheduler) of sizes c; the tiny preset's tokenizer
    (vocab rows beyond it are suppressed by model.UAE, as the tiny preset's padding rows are)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    tok = Qwen2_5_VLProcessor.from_pretrained(tiny.tiny_paths()[0]).tokenizer
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
        return runs.load_model(preset="tiny", dtype=dtype, device=device)
    if a.preset == "small":  # saved once under $UAE_HOME, loaded through the stages' load_uae
        d = os.path.join(images.UAE_HOME, "bench-small-v1")
        if not os.path.exists(os.path.join(d, "decoder", "scheduler")):
            from transformers.utils import logging
            logging.disable_progress_bar()
            tmp = d + f".tmp{os.getpid()}"
            subs = ("encoder", "encoder", "decoder/transformer", "decoder/vae", "decoder/scheduler")
            for obj, sub in zip(build_sized(c, c["res"]), subs):  # encoder dir: weights + processor
                obj.save_pretrained(os.path.join(tmp, sub))
            images.atomic_publish(tmp, d)
        return runs.load_model(encoder=f"{d}/encoder", decoder=f"{d}/decoder", dtype=dtype, device=device)
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
    return R.load_backbone(a.reward, runs.reward_path(a.reward, a.reward_path) if a.reward != "pixel" else None, device=device)


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
        sargs = S3.Args(groups=a.groups, captions_per_image=a.captions_per_image, **kw)
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
    return ck.d, {"images": N, "caption_tokens": n_tok, "condition_tokens": condition_tokens(m, roll.texts)}


def condition_tokens(m, texts):
    """Tokens of the captions as the environment re-reads them (caption length sets its DiT's text tokens)."""
    return sum(len(ids) for ids in m.tokenizer(texts, add_special_tokens=False).input_ids)


def stage3_step(m, bb, opt, params, neg, x, s3, step, cache=None):
    """One Flow-GRPO step on the DiT (stage3_grpo_gen.main) -> (phase seconds, counters). cache: {image b: its cached
    captions} (--captions_per_image K > 0): every step is a new epoch of the len(x) images, so image b uses its caption
    caption_pick(seed, b, step, K), as the stage does. None: a fresh caption every step."""
    ck, G, sig, gids = clock(m.device), s3.G, m.sigmas(s3.sample_steps), range(len(x))
    if cache is not None:
        caps = CC.pick_captions(cache, gids, [step] * len(x), s3)
    else:
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


class CachedStage3:
    """stage3_step as the stage runs with the caption cache (a caption looked up, not sampled), on equal work with the
    step without it: the cache holds the very captions that step samples at the same step index (made outside the
    timed step), so the two differ in the captioning only: caption length sets the DiT's text tokens, and a cache of
    other captions would change the work. What the cache costs to make: cache_build_cost."""

    def __call__(self, m, bb, opt, params, neg, x, s3, step):
        caps = S3.caption_groups(m, x, [T.seed_of(s3.seed, step, g, "caption") for g in range(len(x))], s3)
        return stage3_step(m, bb, opt, params, neg, x, s3, step, cache={b: [c] for b, c in enumerate(caps)})


def cache_build_cost(m, sargs, Ks, rounds):
    """Seconds per image of stage3_grpo_gen.cache_captions (K captions of one image in one generate call) for each
    K, in rounds that alternate the order of the Ks.
    -> {K: {"s_per_image", "vs_K1" (median of the paired ratios to the smallest K)}}."""
    x = synthetic_images(sargs, m.device)[:1]
    for K in Ks:  # warm-up
        CC.cache_captions(m, x, [0], replace(sargs, captions_per_image=K))
    t = {K: [] for K in Ks}
    for r in range(rounds):
        for K in (Ks if r % 2 == 0 else Ks[::-1]):
            t0 = time.perf_counter()
            CC.cache_captions(m, x, [r + 1], replace(sargs, captions_per_image=K))
            t[K].append(time.perf_counter() - t0)
    return {K: {"s_per_image": statistics.median(t[K]),
                "vs_K1": statistics.median(a / b for a, b in zip(t[K], t[Ks[0]]))} for K in Ks}


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


def synthetic_images(sargs, device):
    """The bench's source images: (B, 3, res, res) uniform noise, seed 0 (B = batch_size or groups)."""
    B = getattr(sargs, "batch_size", None) or sargs.groups
    return torch.rand((B, 3, sargs.resolution, sargs.resolution), generator=torch.Generator().manual_seed(0)).to(device)


def measure(step_fn, setup, sargs, warmup, iters):
    """One variant: measure_paired with a single (step_fn, sargs)."""
    return measure_paired([(step_fn, sargs)], setup, warmup, iters)[0]


def measure_paired(variants, setup, warmup, iters):
    """variants: [(step_fn, sargs)]. Warm-up steps, then `iters` rounds of one step of each variant, in an order that
    alternates by round (neither always runs first). -> per variant: medians of every phase, of the step total and
    of the counters; the per-round step totals (step_s_all) so that variants can be compared round by round."""
    dev = setup[0].device
    xs = [synthetic_images(s, dev) for _, s in variants]
    for k in range(warmup):
        for (fn, s), x in zip(variants, xs):
            fn(*setup, x, s, k)
    runs, cpu = [[] for _ in variants], [[] for _ in variants]
    for r in range(iters):
        for v in (range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))):
            (fn, s), x = variants[v], xs[v]
            c0 = time.process_time()  # CPU seconds of this process, all threads
            runs[v].append(fn(*setup, x, s, warmup + r))
            cpu[v].append(time.process_time() - c0)
    out = []
    for rv, cv in zip(runs, cpu):
        tot = [sum(d.values()) for d, _ in rv]
        med = lambda i, k: statistics.median(run[i][k] for run in rv)
        out.append({"step_s": statistics.median(tot), "step_s_min": min(tot), "step_s_all": tot,
                    "step_cpu_s": statistics.median(cv), "phases_s": {k: med(0, k) for k in rv[0][0]},
                    **{k: med(1, k) for k in rv[0][1]}})
    return out


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


def gen_name(stage):
    return "generate" if stage == "stage2" else "caption+condition"


def report(stage, r, sargs, setup, a, device):
    """Throughput and MFU into r; the phase table on stdout."""
    N, t = r["images"], r["step_s"]
    gen = r["phases_s"][gen_name(stage)]
    r.update(images_per_s=N / t, ms_per_image=1000 * t / N,  # captions generated per second (none with the cache)
             caption_tokens_per_s=None if "workload_note" in r else r["caption_tokens"] / gen)
    if stage == "stage2":
        r["workload"] = (f"B {sargs.batch_size} x G {sargs.G}, {sargs.max_new_tokens} new tokens, "
                         f"{sargs.sample_steps} Euler steps")
    else:
        r["workload"] = f"{sargs.groups} groups x G {sargs.G}, {sargs.sample_steps} SDE steps"
        r["dit_params"] = sum(q.numel() for q in setup[0].transformer.parameters())
        r["dit_train_tflops"] = 6 * r["dit_params"] * r["dit_train_tokens"] / r["phases_s"]["policy fwd+bwd"] / 1e12
        r["dit_mfu"] = r["dit_train_tflops"] / a.peak_tflops
    r["workload"] += f", cfg {sargs.cfg}, beta {sargs.beta}, {sargs.resolution} px, {sargs.dtype}"
    if "workload_note" in r:
        r["workload"] += ", " + r["workload_note"]
    where = device.type if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\n{stage} ({a.preset}, {where}): {r['workload']} | median of {a.iters} after {a.warmup} warm-up")
    print(f"{'phase':<24}{'median s':>10}{'share':>8}")
    for k, v in r["phases_s"].items():
        print(f"{k:<24}{v:10.4f}{100 * v / sum(r['phases_s'].values()):7.1f}%")
    print(f"{'step (median of totals)':<24}{t:10.4f}   (fastest {r['step_s_min']:.4f} s, "
          f"process CPU time {r['step_cpu_s']:.3f} s)")
    tok = "" if r["caption_tokens_per_s"] is None else (
        f" | rollout {r['caption_tokens_per_s']:.0f} caption tokens/s ({r['caption_tokens']:.0f} per step / its "
        f"{gen_name(stage)})")
    print(f"peak memory {r['peak_mem_mb']:.0f} MB ({r['mem_kind']}) | {r['images_per_s']:.1f} images/s, "
          f"{r['ms_per_image']:.1f} ms/image{tok}")
    if "dit_mfu" in r:
        print(f"DiT policy pass: {r['dit_train_tflops']:.3g} TFLOP/s, MFU {100 * r['dit_mfu']:.2f}% "
              f"of {a.peak_tflops:g}")


def cache_summary(r, r0, build, sargs):
    """Stage 3 with the caption cache (r) against without (r0), round by round, and what the cache costs once."""
    K = sargs.captions_per_image
    ratio = statistics.median(a / b for a, b in zip(r["step_s_all"], r0["step_s_all"]))
    share = r0["phases_s"]["caption+condition"] / sum(r0["phases_s"].values())
    b = build[K]["s_per_image"]
    saved = (r0["phases_s"]["caption+condition"] - r["phases_s"]["caption+condition"]) / sargs.groups
    d = {"K": K, "paired_ratio": ratio, "step_drop": 1 - ratio, "caption_share_without": share,
         "build_s_per_image": b, "build_vs_K1": build[K]["vs_K1"], "build_over_step_caption": b / max(saved, 1e-9),
         "build": {str(k): v for k, v in build.items()}}
    print(f"\nstage3 caption cache, K {K}: step with / without the cache {ratio:.2f} (median of {len(r['step_s_all'])} "
          f"paired rounds): -{100 * (1 - ratio):.0f}% per step; captioning+condition was {100 * share:.0f}% of the step "
          f"without it.\n  One-off: {1000 * b:.0f} ms per image for K {K} ({build[K]['vs_K1']:.2f} x K 1), "
          f"= {d['build_over_step_caption']:.1f} visits' worth of on-the-fly captioning")
    if len(build) > 2:
        print(f"  {'K':>4} {'ms/image':>9} {'vs K 1':>7}")
        for k, v in build.items():
            print(f"  {k:>4} {1000 * v['s_per_image']:9.1f} {v['vs_K1']:7.2f}")
    return d


def usage_error(message):
    raise runs.UsageError(f"{message} (see --help)")


p.error = usage_error  # argparse's errors: one line under runs.cli, not its usage block


def validate(a):
    """Every flag and the --out path, before anything is built or written; a user error raises runs.UsageError."""
    runs.at_least(a, 1, "iters", "B", "groups", "max_new_tokens", "threads", "gpus")
    runs.at_least(a, 0, "warmup", "captions_per_image", "resolution")
    runs.at_least(a, 2, "G", why="a group of one has advantage 0")
    runs.at_least(a, 2, "sample_steps", why="stage 3 never trains the last sampler step")
    runs.above(a, 0, "peak_tflops", "gpu_gib")
    runs.need(a.resolution % 16 == 0, f"--resolution {a.resolution}: must be 0 (the preset's) or a positive multiple "
                                      "of 16 (VAE factor 8 x DiT patch 2)")
    runs.need(a.reward in ("", *R.BACKBONES), f"--reward {a.reward!r}: must be '' or one of {' | '.join(R.BACKBONES)}")
    if a.reward and a.reward != "pixel" and a.reward_path != "tiny":
        runs.check_local("reward_path", a.reward_path, "file or folder")
        R.check_weights(a.reward, a.reward_path or None)
    runs.check_file_out("out", a.out)
    runs.need(a.plan or a.preset != "real" or torch.cuda.is_available(),
              "bench.py --preset real needs a CUDA GPU: it builds random-weight Qwen2.5-VL-3B + SD3.5-large in bf16 "
              "(~24 GB of weights). On CPU use --preset tiny or --preset small (or --plan for the memory plan).")


def main(a):
    validate(a)
    if a.plan:  # the memory plan: CPU only, nothing full-size is allocated (see plan_main)
        return plan_main(a)
    if a.quick:
        a.warmup, a.iters = 1, 2
    if a.vs:
        a.stage = "2" if a.stage == "all" else a.stage
        return vs_trl(a)
    if a.preset == "real":
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
        cached = stage == "stage3" and sargs.captions_per_image > 0
        if cached:  # the stage's default (the cache) and the step without it, in alternate rounds
            step_fn, s0 = CachedStage3(), replace(sargs, captions_per_image=0)
            r, r0 = measure_paired([(step_fn, sargs), (stage3_step, s0)], setup, a.warmup, a.iters)
            out[stage], out["stage3_no_cache"] = r, r0
        else:
            r = out[stage] = measure(step_fn, setup, sargs, a.warmup, a.iters)
        r["peak_mem_mb"] = peak_mb(device)
        r["mem_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS"
        if cached:
            r["workload_note"] = "caption cache (captions looked up: the ones the step without it samples)"
        report(stage, r, sargs, setup, a, device)
        if cached:
            r0.update(peak_mem_mb=r["peak_mem_mb"], mem_kind=r["mem_kind"])
            print("\nwithout the caption cache (--captions_per_image 0, a fresh caption every step):")
            report(stage, r0, s0, setup, a, device)
            Ks = ([1, 8] if a.quick else [1, 2, 4, 8, 16]) if a.sweep else [1]
            Ks = sorted(set(Ks) | {sargs.captions_per_image})
            build = cache_build_cost(setup[0], sargs, Ks, 1 if a.quick else 5)
            out["stage3_cache"] = cache_summary(r, r0, build, sargs)
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


# ----------------------------------------------------------------------------------------------
# --vs trl: stage 2 next to TRL's GRPOTrainer on the same work, step for step in one process. TRL's side: its own
# copy of the same random weights, the bench's prompt and images, B x G rows, new tokens, temperature, suppressed
# ids (its sampling draws from the distribution the project's does), LoRA (rank, alpha, targets, init), beta, eps,
# token-level ("dapo") loss, AdamW, lr, grad clip, fp32; its reward is the project's environment
# (stage2_grpo_und.reconstruct on its copy, adapter off, then the backbone), as stage2_step's. TRL is an optional
# benchmark dependency (requirements-bench.txt): imported here only.

TRL_PHASES = ["generate", "condition+reconstruct", "reward", "reference", "policy fwd+bwd", "optimizer"]


def trl_trainer(a, sargs, bb, x, device, dtype, on_step):
    """TRL's GRPOTrainer on the bench's stage-2 work; on_step(phases of the step just ended, its counters) is called
    at every step end (and by it the project's step runs, vs_trl). -> (trainer, the UAE whose encoder it trains).
    TRL's step = from the Trainer's on_step_begin to on_step_end: its training step (rollout, reward, reference,
    loss, backward), clip and optimizer; its data loader (before) and logging (after) are outside, as the
    project's step has none."""
    import tempfile  # here: TRL and datasets are optional benchmark dependencies, only --vs trl imports them
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    mt = load_model(a, device, dtype)
    with torch.no_grad():
        neg = mt.condition([M.NEGATIVE_PROMPT])  # the environment's negative: pre-stage weights (no LoRA yet)
    G, t, cur = sargs.G, {}, {"step": 0}
    now = time.perf_counter

    def add(phase, s):
        t[phase] = t.get(phase, 0.0) + s

    def reconstruction_reward(prompts, completions, idx, **_):  # TRL's reward function: rows grouped G at a time
        t0 = now()
        texts = cur["texts"] = [c[0]["content"].strip() for c in completions]   # as sample_captions strips them
        noise = S2.group_noise(mt.latent_shape(sargs.resolution, sargs.resolution), sargs.seed, cur["step"],
                               range(len(x)), device)[torch.tensor(idx)]       # one noise per source image
        recon = S2.reconstruct(mt, texts, noise, neg, sargs)                      # (N, 3, H, W)
        t1 = now()
        with torch.no_grad():
            r = bb.similarity(x[torch.tensor(idx)].float(), recon.float()).float()  # (N,)
        add("condition+reconstruct", t1 - t0)
        add("reward", now() - t1)
        return r.tolist()

    def timed(fn, phase):
        def run(*args, **kw):
            t0 = now()
            try:
                return fn(*args, **kw)
            finally:
                add(phase(), now() - t0)
        return run

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            t.clear()
            t["start"] = now()

        def on_step_end(self, args, state, control, **kw):
            total = now() - t.pop("start")
            d = {k: t.get(k, 0.0) for k in ("generate", "condition+reconstruct", "reward", "reference")}
            d["policy fwd+bwd"] = t["training_step"] - t["prepare"]
            d["optimizer"] = total - t["training_step"]
            d["other"] = t["prepare"] - sum(d[k] for k in ("generate", "condition+reconstruct", "reward", "reference"))
            cur["step"] += 1
            on_step(d, {"caption_tokens": tr._metrics["train"]["completions/mean_length"][-1] * len(x) * G,
                        "condition_tokens": condition_tokens(mt, cur["texts"])})

    pil = [Image.fromarray((im.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()) for im in x]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": M.INSTRUCTION}]}]
    ds = Dataset.from_dict({"prompt": [prompt] * len(x), "image": pil, "idx": list(range(len(x)))})
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=len(x) * G,
                     num_generations=G, max_completion_length=sargs.max_new_tokens, temperature=sargs.temperature,
                     top_p=sargs.top_p, top_k=sargs.top_k, beta=sargs.beta, epsilon=sargs.eps_low,
                     epsilon_high=sargs.eps_high, loss_type=sargs.loss_agg, scale_rewards=sargs.scale_rewards,
                     num_iterations=sargs.mu, learning_rate=sargs.lr, weight_decay=sargs.weight_decay,
                     max_grad_norm=sargs.grad_clip, lr_scheduler_type="constant", optim="adamw_torch",
                     max_steps=a.warmup + a.iters, logging_steps=a.warmup + a.iters + 1, report_to="none",
                     use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, save_strategy="no",
                     gradient_checkpointing=False, shuffle_dataset=False, disable_tqdm=True, seed=sargs.seed,
                     generation_kwargs={"suppress_tokens": mt.suppress.nonzero().flatten().tolist()})
    lora = LoraConfig(r=sargs.lora_r, lora_alpha=sargs.lora_alpha, target_modules=M.ENCODER_LORA_TARGETS,
                      lora_dropout=0.0, init_lora_weights="gaussian")
    tr = GRPOTrainer(model=mt.encoder, reward_funcs=[reconstruction_reward], args=cfg, train_dataset=ds,
                     processing_class=mt.processor, peft_config=lora, callbacks=[Steps()])
    assert M.has_lora(mt.encoder), "TRL's LoRA is not in the encoder the environment turns off"
    assert mt.eos_id in tr.eos_token_ids, "TRL would not stop where the project's sampler stops"
    mt.encoder.generate = timed(mt.encoder.generate, lambda: "generate")          # what TRL's rollout calls
    tr._prepare_inputs = timed(tr._prepare_inputs, lambda: "prepare")             # rollout + scoring, all of it
    tr.training_step = timed(tr.training_step, lambda: "training_step")
    tr._get_per_token_logps_and_entropies = timed(  # no grad: the reference pass; with grad: inside the policy pass
        tr._get_per_token_logps_and_entropies, lambda: "policy" if torch.is_grad_enabled() else "reference")
    return tr, mt


def vs_trl(a):
    """Stage 2 and TRL's GRPOTrainer, one step each per round, their order alternating by round (TRL first in even
    rounds), after --warmup steps of each; per round the ratio project / TRL. Prints the paired ratios' median
    [min-max], each side's median phases, and the load average before and after. -> the JSON dict."""
    try:
        import trl  # an optional benchmark dependency (requirements-bench.txt): only this mode needs it
    except ImportError:
        sys.exit("bench.py --vs trl needs TRL, an optional benchmark dependency: in a virtual environment of its own, "
                 "pip install -r requirements.txt -r requirements-bench.txt")
    if a.preset == "real" or a.stage != "2":
        sys.exit("--vs trl compares stage 2 on CPU: use --preset tiny or small with --stage 2 (its default here)")
    device, dtype = torch.device("cpu"), torch.float32
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    setup, sargs = setup_stage("stage2", a, device, dtype)
    x = synthetic_images(sargs, device)
    rows, k = [], {"project": 0, "trl": 0}   # rows[r] = {"trl": (phases, counters), "project": (phases, counters)}

    def project_step():
        k["project"] += 1
        return stage2_step(*setup, x, sargs, k["project"])

    def on_step(*trl):  # TRL's step just ended; the round r it belongs to (< 0: warm-up) sets what runs now
        r, k["trl"] = k["trl"] - a.warmup, k["trl"] + 1
        if r < 0:
            project_step()
        elif r % 2 == 0:   # even rounds: TRL, then the project; odd rounds: the project, then TRL
            rows.append({"trl": trl, "project": project_step()})
            if r + 1 < a.iters:
                rows.append({"project": project_step()})
        else:
            rows[-1]["trl"] = trl

    tr, _ = trl_trainer(a, sargs, setup[1], x, device, dtype, on_step)
    tr.train()
    load1 = os.getloadavg()
    tot = lambda side: [sum(r[side][0].values()) for r in rows]
    ratios = [p_ / t_ for p_, t_ in zip(tot("project"), tot("trl"))]
    med = lambda side, ph: statistics.median(r[side][0].get(ph, 0.0) for r in rows)
    tokens = lambda side, k="caption_tokens": statistics.median(r[side][1][k] for r in rows)
    out = {"preset": a.preset, "threads": torch.get_num_threads(), "rounds": len(rows), "warmup": a.warmup,
           "trl": trl.__version__, "torch": torch.__version__, "load_avg_before": load0, "load_avg_after": load1,
           "workload": f"B {sargs.batch_size} x G {sargs.G}, {sargs.max_new_tokens} new tokens, cfg {sargs.cfg}, "
                       f"{sargs.sample_steps} Euler steps, LoRA r {sargs.lora_r} on every LM linear, beta "
                       f"{sargs.beta}, {sargs.resolution} px, {sargs.dtype}",
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "ratios": ratios, "project_step_s": tot("project"), "trl_step_s": tot("trl"),
           "project_phases_s": {ph: med("project", ph) for ph in rows[0]["project"][0]},
           "trl_phases_s": {ph: med("trl", ph) for ph in rows[0]["trl"][0]},
           "caption_tokens": {"project": tokens("project"), "trl": tokens("trl")},
           "condition_tokens": {side: tokens(side, "condition_tokens") for side in ("project", "trl")}}
    print(f"\nstage 2 vs TRL {trl.__version__} GRPOTrainer ({a.preset}, cpu, {out['threads']} thread(s)): "
          f"{out['workload']}\n{len(rows)} alternating rounds after {a.warmup} warm-up; load average (1, 5, 15 min) "
          f"{' '.join(f'{v:.2f}' for v in load0)} before, {' '.join(f'{v:.2f}' for v in load1)} after")
    print(f"{'phase (median ms)':<28}{'project':>9}{'TRL':>9}")
    for ph in TRL_PHASES + ["other"]:
        p_, t_ = out["project_phases_s"].get(ph), out["trl_phases_s"].get(ph)
        cell = lambda v: f"{1000 * v:9.1f}" if v is not None else f"{'-':>9}"
        print(f"{ph:<28}{cell(p_)}{cell(t_)}")
    ps, ts = statistics.median(out["project_step_s"]), statistics.median(out["trl_step_s"])
    print(f"{'step (median)':<28}{1000 * ps:9.1f}{1000 * ts:9.1f}")
    print(f"per step (median): caption tokens sampled: project {out['caption_tokens']['project']:.0f}, TRL "
          f"{out['caption_tokens']['trl']:.0f}; as the environment re-reads them: project "
          f"{out['condition_tokens']['project']:.0f}, TRL {out['condition_tokens']['trl']:.0f}")
    print(f"paired ratio project / TRL per round: {' '.join(f'{v:.3f}' for v in ratios)}")
    print(f"stage 2 = {out['ratio_median']:.3f} x TRL (median of {len(rows)} rounds) "
          f"[{out['ratio_min']:.3f}-{out['ratio_max']:.3f}]")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")
    return out


# ----------------------------------------------------------------------------------------------
# --plan: the per-GPU memory of each stage's README real launch, under DDP (today's replicated training:
# every rank holds everything) and under FSDP (--fsdp: training.fsdp_shard) over --gpus GPUs, computed on
# the CPU of a laptop without allocating a full-size model.
#   measured:  parameter counts, from the real configs built on the meta device (+ LoRA injected with the
#              real target lists); activations, as the bytes autograd saves for backward (each storage
#              once, parameters excluded) while a few layers run at the real widths on CPU in bf16, at two
#              small sizes each (plan_measure): an affine fit a + b x size (b per token / pixel / row; a per
#              call, e.g. autocast's bf16 copies of fp32 weights) scaled to the real token count, rows and
#              depth; with checkpointing, what a checkpointed unit keeps (its inputs) + one unit recomputed.
#   estimated: the optimizer (AdamW: 2 fp32 moments + foreach's one-copy temporary at the step),
#              gradients (fp32, + training.allreduce_grads' flat copy under DDP), autocast's cache of bf16
#              copies of fp32 trainable weights (DDP --dit_full with checkpointing), FSDP's gathered
#              blocks (2 in bf16) and one block's unsharded gradients, the no-grad working sets of
#              rollouts (one DiT block / VAE stage live at a time, bounded by the same block's saved
#              bytes; KV cache; logits), and a 10 % margin for the CUDA context, fragmentation and what
#              the plan does not see. Not checked against a GPU here.

GiB = 2 ** 30
PLAN_TEXT = 20        # template tokens around a caption in UAE.encode_text
PLAN_PROMPT = 400     # stage 2's captioning prompt at 512 px: 324 image tokens (504 px / 14 / 2)^2 + template + instruction


def saved_by_unit(fn, units=(), params=()):
    """Runs fn() with autograd recording; books every tensor saved for backward (each storage once, `params`
    excluded) to the unit (module) running when it is saved, else to "outside", and records each unit's
    floating-point inputs (what gradient checkpointing keeps of a unit). -> {"outside", "saved": [per unit],
    "inputs": [per unit]} in bytes."""
    ex = {q.untyped_storage()._cdata for q in params}
    seen, keep, stack = set(), [], []
    r = {"outside": 0, "saved": [0] * len(units), "inputs": [0] * len(units)}

    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from tensors(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from tensors(y)

    def pre(i):
        def hook(mod, args, kwargs):
            stack.append(i)
            for t in tensors((args, kwargs)):
                k = t.untyped_storage()._cdata
                if t.is_floating_point() and k not in ex and ("in", k) not in seen:
                    seen.add(("in", k))
                    keep.append(t)
                    r["inputs"][i] += t.untyped_storage().nbytes()
        return hook

    def post(mod, args, kwargs, out):
        stack.pop()

    def pack(t):
        k = t.untyped_storage()._cdata
        if k not in ex and k not in seen:
            seen.add(k)
            keep.append(t)   # alive until the end: no storage address is reused while we count
            if stack:
                r["saved"][stack[-1]] += t.untyped_storage().nbytes()
            else:
                r["outside"] += t.untyped_storage().nbytes()
        return t

    hs = []
    for i, u in enumerate(units):
        hs += [u.register_forward_pre_hook(pre(i), with_kwargs=True), u.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in hs:
            h.remove()
    del out, keep
    return r


def live_peak(fn):
    """Peak bytes of the tensors alive at once while fn() runs (those it allocates; each storage once, freed when
    its last view dies): a TorchDispatchMode that books every op's output storages and a weakref.finalize per
    storage. What torch.cuda.max_memory_allocated would report above the start, minus allocator rounding."""
    import weakref
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        cur = peak = 0
        seen = {}

        def free(self, key, nb):
            self.cur -= nb
            self.seen.pop(key, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):   # a view or in-place result of an input (a weight's .t()) is no allocation
                    st = t.untyped_storage()
                    if st._cdata not in self.seen and st._cdata not in ins:
                        nb = st.nbytes()
                        self.cur += nb
                        self.peak = max(self.peak, self.cur)
                        self.seen[st._cdata] = weakref.finalize(st, self.free, st._cdata, nb)
            return out

    mode = Live()
    mode.seen = {}
    with mode:
        out = fn()
    del out
    return mode.peak


def _fit(m1, m2, s1, s2):
    """Two measurements -> {key: (a, b)} with bytes = a + b * size; units averaged: "block" = every unit but
    the last, "last", "inputs" (per unit)."""
    def ab(y1, y2):
        b = (y2 - y1) / (s2 - s1)
        return (max(0.0, y1 - b * s1), b)
    per = lambda m: {"outside": m["outside"], "block": sum(m["saved"][:-1]) / max(1, len(m["saved"]) - 1),
                     "last": m["saved"][-1], "inputs": sum(m["inputs"]) / len(m["inputs"]),
                     "max": max(m["saved"]), **({"nograd": m["nograd"]} if "nograd" in m else {})}
    p1, p2 = per(m1), per(m2)
    return {k: ab(p1[k], p2[k]) for k in p1}


def _bf16_default(build):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


def _as_lora(mod, targets):
    M.add_lora(mod, 32, 64, targets)   # the stages' r 32 / alpha 64, fp32 adapters (UAE.precision)
    for n, q in mod.named_parameters():
        if "lora_" in n:
            q.data = q.data.float()


def plan_measure_dit(sides=(16, 24)):
    """SD3.5-large's DiT, 3 joint blocks at the real width (38 heads x 64), under autocast(bf16), one row, built
    once: "full16" (every weight trainable, bf16: FSDP's param_dtype) and "full32" (trainable fp32 weights:
    --dit_full without FSDP, autocast's bf16 copies are saved) with stage 1 fm's text/image token ratio (512 / 4096),
    then "lora" (bf16 frozen base + fp32 LoRA; + a no-grad sampling call) with the 512-px stages' (532 / 1024).
    size = image + text tokens. -> {variant: fit}."""
    from diffusers import SD3Transformer2DModel
    c = PRESETS["real"]
    torch.manual_seed(0)
    dit = _bf16_default(lambda: SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=c["head_dim"],
        num_attention_heads=c["dit_heads"], joint_attention_dim=c["joint"], caption_projection_dim=c["cap_proj"],
        pooled_projection_dim=c["pooled"], pos_embed_max_size=c["pos_max"], qk_norm="rms_norm"))
    dit.set_attn_processor(M.MaskedJointAttnProcessor())

    def run(ratio, trained_cond, nograd=False):
        ms, sizes = [], []
        for side in sides:
            N, L = (side // 2) ** 2, max(1, round(ratio * (side // 2) ** 2))
            kw = dict(hidden_states=torch.randn(1, 16, side, side), pooled_projections=torch.zeros(1, c["pooled"]),
                      encoder_hidden_states=torch.randn(1, L, c["joint"], requires_grad=trained_cond),  # fm/sem: g trains
                      timestep=torch.full((1,), 500.0), return_dict=False,
                      joint_attention_kwargs={"attention_mask": torch.ones(1, L, dtype=torch.bool)})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ms.append(saved_by_unit(lambda: dit(**kw)[0], dit.transformer_blocks, list(dit.parameters())))
                if nograd:  # a sampling call: no grad, one block alive at a time
                    with torch.no_grad():
                        ms[-1]["nograd"] = live_peak(lambda: dit(**{**kw, "encoder_hidden_states": kw["encoder_hidden_states"].detach()})[0])
            sizes.append(N + L)
        return _fit(*ms, *sizes)

    out = {}
    dit.requires_grad_(True)
    out["full16"] = run(512 / 4096, True)
    for q in dit.parameters():
        q.data = q.data.float()
    out["full32"] = run(512 / 4096, True)
    for q in dit.parameters():
        q.data = q.data.to(torch.bfloat16)
    dit.requires_grad_(False)
    _as_lora(dit, M.DIT_LORA_TARGETS)
    out["lora"] = run((PLAN_TEXT + 512) / 1024, False, nograd=True)
    del dit
    gc.collect()
    return out


def plan_measure_lm(sizes=(128, 256)):
    """Qwen2.5-VL-3B's language model, 2 decoder layers at the real width (2048, 16 heads / 2 kv, 11008), bf16
    frozen + the encoder LoRA (r 32 on every linear layer), one row; size = tokens."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
    c = PRESETS["real"]
    h = c["hidden"] // c["heads"] // 2
    cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=1024, bos_token_id=0, eos_token_id=1, hidden_size=c["hidden"],
                                            intermediate_size=c["inter"],
                                            num_hidden_layers=2, num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
                                            max_position_embeddings=32768,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "mrope_section": [h // 4, h * 3 // 8, h * 3 // 8]}))
    torch.manual_seed(0)
    lm = _bf16_default(lambda: Qwen2_5_VLTextModel(cfg.text_config))
    lm.requires_grad_(False)
    _as_lora(lm, r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    ms = []
    for T in sizes:
        ids = torch.randint(0, 1024, (1, T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ms.append(saved_by_unit(lambda: lm(input_ids=ids).last_hidden_state, lm.layers, list(lm.parameters())))
            with torch.no_grad():  # a prefill / reference pass (without its KV cache and logits, counted apart)
                ms[-1]["nograd"] = live_peak(lambda: lm(input_ids=ids, use_cache=False).last_hidden_state)
    del lm
    gc.collect()
    return _fit(*ms, *sizes)


def plan_measure_vae(sides=(8, 16)):
    """SD3.5's VAE decoder (128/256/512/512 channels, 2 layers per block), bf16 frozen, gradient to the latent
    (stage 1 sem), one image; size = output pixels. Units: the mid block and the 4 up blocks (what diffusers
    checkpoints)."""
    from diffusers import AutoencoderKL
    c = PRESETS["real"]
    torch.manual_seed(0)
    vae = _bf16_default(lambda: AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=c["vae"],
                                              layers_per_block=c["vae_layers"], latent_channels=16, norm_num_groups=32,
                                              use_quant_conv=False, use_post_quant_conv=False))
    vae.requires_grad_(False)
    units = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    ms, sizes = [], []
    for side in sides:
        z = torch.randn(1, 16, side, side, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ms.append(saved_by_unit(lambda: vae.decode(z).sample, units, list(vae.parameters())))
            with torch.no_grad():
                ms[-1]["nograd"] = live_peak(lambda: vae.decode(z.detach()).sample)
        sizes.append((side * 8) ** 2)
    del vae
    gc.collect()
    return _fit(*ms, *sizes)


def plan_measure_clip(rows=(1, 2)):
    """The CLIP ViT-L/14 reward (fp32, as reward.load_backbone loads it), 2 of its 24 layers at 224 px, gradient
    to the input image (stage 1 sem); size = images."""
    import open_clip
    cfg = open_clip.get_model_config("ViT-L-14")
    torch.manual_seed(0)
    vis = open_clip.model._build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 2}, quick_gelu=True)
    vis.requires_grad_(False)
    ms = []
    for n in rows:
        x = torch.rand(n, 3, 224, 224, requires_grad=True)
        ms.append(saved_by_unit(lambda: vis(x), vis.transformer.resblocks, list(vis.parameters())))
    del vis
    gc.collect()
    return _fit(*ms, *rows)


def plan_measure_projector(sizes=(128, 256)):
    """The projector g (2048 -> 8192 -> 4096), fp32 trainable under autocast(bf16); size = tokens."""
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(2048, 8192), torch.nn.GELU(), torch.nn.Linear(8192, 4096))
    ms = []
    for L in sizes:
        H = torch.randn(1, L, 2048, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ms.append(saved_by_unit(lambda: g(H), [g], list(g.parameters())))
    return _fit(*ms, *sizes)


def plan_params():
    """Parameter counts of the real models, built on the meta device (no memory): Qwen2.5-VL-3B, SD3.5-large's
    DiT and VAE, the projector, CLIP ViT-L/14's image tower, and the stages' LoRAs (real target lists)."""
    import open_clip
    c = PRESETS["real"]
    enc, _, dit, vae, _ = build_sized(c, c["res"], device="meta", dtype=torch.bfloat16)
    n = lambda mod: sum(q.numel() for q in mod.parameters())
    out = {"encoder": n(enc), "encoder_vision": n(enc.model.visual), "dit": n(dit), "dit_block": n(dit.transformer_blocks[0]),
           "dit_layers": len(dit.transformer_blocks), "lm_layers": c["layers"], "vae": n(vae), "vocab": c["vocab"],
           "projector": c["hidden"] * 2 * c["joint"] + 2 * c["joint"] + 2 * c["joint"] * c["joint"] + c["joint"],
           "lm_kv": 2 * c["kv"] * c["hidden"] // c["heads"]}
    cfg = open_clip.get_model_config("ViT-L-14")
    with torch.device("meta"):
        out["clip"] = n(open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=True))
        M.add_lora(enc, 32, 64, M.ENCODER_LORA_TARGETS)
        M.add_lora(dit, 32, 64, M.DIT_LORA_TARGETS)
    lora = lambda mod: sum(q.numel() for k, q in mod.named_parameters() if "lora_" in k)
    out.update(encoder_lora=lora(enc), dit_lora=lora(dit))
    return out


def bf16_products_in_fp32():
    """A TorchDispatchMode for the plan's measurements: matrix products, convolutions and attention on bf16
    tensors computed in fp32 and rounded to the dtypes the bf16 call returns (read off the meta device). The plan
    counts bytes, not values, and a CPU without native bf16 kernels (torch.ops.mkldnn._is_mkldnn_bf16_supported()
    False: AVX2-only x86) runs a bf16 product about a hundred times slower than fp32. Entered outside the measuring
    modes (live_peak's), so they book each op's bf16 output, never the fp32 temporaries made here."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    slow = {"mm", "addmm", "bmm", "baddbmm", "convolution"}
    bf16 = lambda x: isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16
    to = lambda how: lambda x: how(x) if isinstance(x, torch.Tensor) else x   # a tensor map for tree_map

    class Bf16ViaFp32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if (not (name in slow or "scaled_dot_product" in name) or "out" in kwargs or name.endswith("_")
                    or not any(bf16(x) for x in (*args, *kwargs.values()))):
                return func(*args, **kwargs)
            try:  # the dtypes the bf16 call returns
                meta = func(*tree_map(to(lambda x: x.to("meta")), args), **tree_map(to(lambda x: x.to("meta")), kwargs))
            except Exception:  # no meta kernel: compute as asked
                return func(*args, **kwargs)
            up = to(lambda x: x.float() if x.dtype == torch.bfloat16 else x)
            out = func(*tree_map(up, args), **tree_map(up, kwargs))
            return tree_map(lambda o, m: o.to(m.dtype) if isinstance(o, torch.Tensor) else o, out, meta)

    return Bf16ViaFp32()


def plan_measure(a):
    """Every measurement the plan needs -> {name: fit}; prints what ran and how long."""
    with bf16_products_in_fp32():
        t0, meas = time.time(), {}
        jobs = [("dit", plan_measure_dit), ("lm lora", plan_measure_lm), ("vae decoder", plan_measure_vae),
                ("clip", plan_measure_clip), ("projector", plan_measure_projector)]
        for name, job in jobs:
            t = time.time()
            r = job()
            meas.update({f"dit {k}": v for k, v in r.items()} if name == "dit" else {name: r})
            print(f"  measured {name:<12} {time.time() - t:5.1f} s", flush=True)
        print(f"  measurements: {time.time() - t0:.0f} s on {torch.get_num_threads()} CPU threads")
        return meas


def _act(f, rows, size, units, ckpt):
    """Saved bytes of `units` layers for `rows` rows of `size` from a fit: without checkpointing every unit's
    saved tensors; with it, every unit's inputs + one unit recomputed in the backward. + the root ("outside")."""
    root = f["outside"][0] + f["outside"][1] * size * rows
    per = lambda k: f[k][0] + f[k][1] * size * rows
    if ckpt:
        return root + per("inputs") * units + per("max")
    return root + per("block") * (units - 1) + per("last")


def plan_stage(st, P, meas, gpus, fsdp, micro, ckpt):
    """One stage's per-GPU bytes -> {params, grads, optim, act, phases: {rollout, train, step}, peak, peak_phase}."""
    n = gpus if fsdp else 1
    shard = lambda part: n if (fsdp and part in st["fsdp"]) else 1
    params = sum(P[k] * b / shard(part) for k, b, part in st["parts"])
    trainable = [(P[k], part) for k, b, part in st["parts"] if k in st["trainable"]]
    tr_local = sum(x / shard(part) for x, part in trainable)
    grads, optim = 4 * tr_local, 8 * tr_local
    extra_train = extra_step = 0.0
    if fsdp and "transformer" in st["fsdp"]:
        blk = P["dit_block"]
        params += 2 * 2 * blk                                # 2 gathered blocks in bf16 (current + prefetch)
        if "dit" in st["trainable"]:
            extra_train += 6 * blk                           # one block's unsharded bf16 grads + their fp32 copy
    if not fsdp and gpus > 1:
        extra_step += 4 * tr_local                           # training.allreduce_grads' flat copy
    extra_step += 4 * tr_local                               # AdamW (foreach): a sqrt(v) temporary
    act = st["train"](P, meas, micro, ckpt, fsdp)
    roll = st["rollout"](P, meas, micro)
    phases = {"rollout": params + optim + roll, "train": params + optim + grads + act + extra_train,
              "step": params + optim + grads + extra_step}
    peak_phase = max(phases, key=phases.get)
    return {"params": params, "grads": grads, "optim": optim, "act": act, "rollout_ws": roll, "phases": phases,
            "peak": phases[peak_phase], "peak_phase": peak_phase}


def _dit_act(meas, P, variant, rows, N, L, ckpt):
    return _act(meas[variant], rows, N + L, P["dit_layers"], ckpt)


def _autocast_cache(n):
    """autocast keeps the bf16 copy of every fp32 leaf weight that requires grad until its region ends (one
    velocity call): with checkpointing these copies are not saved tensors, but all of them are alive at the end
    of the forward (without checkpointing the saved tensors already hold them). Estimated: 2 bytes x n."""
    return 2 * n


def _logits(P, rows, T, grad):
    """stage 2's completion_logprobs: the (rows, T, V) bf16 logits, and per row an fp32 copy that logsumexp
    keeps for backward (estimated from the code, not measured)."""
    return rows * T * P["vocab"] * (2 + (4 if grad else 0)) + (0 if grad else T * P["vocab"] * 4)


def _kv(P, rows, tokens):
    return rows * tokens * P["lm_layers"] * P["lm_kv"] * 2


def _nograd(f, rows, size):
    """a no-grad call's peak of live tensors (measured, affine in size)."""
    return f["nograd"][0] + f["nograd"][1] * rows * size


def _dit_nograd(meas, P, rows, N, L):
    return _nograd(meas["dit lora"], rows, N + L)


def _vae_nograd(meas, rows, pixels):
    return _nograd(meas["vae decoder"], rows, pixels)


def _prefill(meas, P, rows, tokens):
    """generate: the prompt's forward (measured) on top of the KV cache of prompt + completion (estimated)."""
    return _nograd(meas["lm lora"], rows, tokens) + _kv(P, rows, tokens + 512)


PLAN_STAGES = [
    dict(key="stage1_fm", title="stage 1 fm --dit_full", knob="--batch_size", micro=2, fsdp=("transformer", "projector"),
         launch="stage1_coldstart.py --preset real --objective fm --dit_full --resolution 1024 --batch_size 2 "
                "--grad_accum 4 --dtype bf16 --grad_ckpt",
         what="captions of 512 tokens (long captions), 4096 image tokens; samples: 4 images, CFG",
         parts=[("dit", 4, "transformer"), ("projector", 4, "projector"), ("encoder", 2, "encoder"), ("vae", 2, "vae")],
         trainable=("dit", "projector"),
         train=lambda P, m, b, ck, fs: _dit_act(m, P, "dit full16" if fs else "dit full32", b, 4096, 512, ck)
         + _act(m["projector"], b, 512, 1, False) + (0 if fs or not ck else _autocast_cache(P["dit"])),
         rollout=lambda P, m, b: max(_prefill(m, P, 4, PLAN_PROMPT), _dit_nograd(m, P, 8, 4096, 532), _vae_nograd(m, 4, 1024 ** 2))),
    dict(key="stage1_sem", title="stage 1 sem", knob="--batch_size", micro=2, fsdp=("transformer", "projector"),
         launch="stage1_coldstart.py --init out/stage1_fm --objective sem --reward clip --resolution 512 --batch_size 2 "
                "--dtype bf16 --grad_ckpt",
         what="full-DiT lineage + DiT LoRA, encoder LoRA, captions up to 512 tokens, 1024 image tokens, CLIP ViT-L/14",
         parts=[("dit", 2, "transformer"), ("dit_lora", 4, "transformer"), ("projector", 4, "projector"),
                ("encoder", 2, "encoder"), ("encoder_lora", 4, "encoder"), ("vae", 2, "vae"), ("clip", 4, "clip")],
         trainable=("dit_lora", "projector", "encoder_lora"),
         train=lambda P, m, b, ck, fs: _act(m["lm lora"], b, PLAN_TEXT + 512, P["lm_layers"], ck)
         + _act(m["projector"], b, PLAN_TEXT + 512, 1, False) + _dit_act(m, P, "dit lora", b, 1024, PLAN_TEXT + 512, ck)
         + _act(m["vae decoder"], b, 512 ** 2, 5, ck) + _act(m["clip"], b, 1, 24, False),
         rollout=lambda P, m, b: max(_prefill(m, P, b, PLAN_PROMPT), _dit_nograd(m, P, 8, 1024, 532), _vae_nograd(m, 4, 512 ** 2))),
    dict(key="stage2", title="stage 2", knob="--micro_batch", micro=4, fsdp=("transformer",),
         launch="stage2_grpo_und.py --init out/stage1 --reward clip --resolution 512 --G 8 --batch_size 1 --micro_batch 4 "
                "--max_new_tokens 512 --sample_steps 20 --cfg 5.0 --dtype bf16 --grad_ckpt",
         what="8 captions of up to 512 tokens after a ~400-token prompt; 16-row CFG redraws at 512 px",
         parts=[("encoder", 2, "encoder"), ("encoder_lora", 4, "encoder"), ("dit", 2, "transformer"), ("vae", 2, "vae"),
                ("projector", 4, "projector"), ("clip", 4, "clip")],
         trainable=("encoder_lora",),
         train=lambda P, m, b, ck, fs: _act(m["lm lora"], b, PLAN_PROMPT + 512, P["lm_layers"], ck) + _logits(P, b, 513, True),
         rollout=lambda P, m, b: max(_prefill(m, P, 8, PLAN_PROMPT), _dit_nograd(m, P, 16, 1024, 532),
                                     _vae_nograd(m, 8, 512 ** 2), _nograd(m["lm lora"], b, PLAN_PROMPT + 512)
                                     + _logits(P, b, 513, False))),
    dict(key="stage3", title="stage 3", knob="--groups", micro=1, fsdp=("transformer",),
         launch="stage3_grpo_gen.py --init out/stage2 --reward clip --resolution 512 --G 8 --dtype bf16 --grad_ckpt",
         what="1 group x G 8 x CFG 2 = 16 DiT rows per trained step, 1024 image + 532 text tokens, 10 SDE steps",
         parts=[("dit", 2, "transformer"), ("dit_lora", 4, "transformer"), ("encoder", 2, "encoder"), ("vae", 2, "vae"),
                ("projector", 4, "projector"), ("clip", 4, "clip")],
         trainable=("dit_lora",),
         train=lambda P, m, g, ck, fs: _dit_act(m, P, "dit lora", 16 * g, 1024, PLAN_TEXT + 512, ck),
         rollout=lambda P, m, g: max(_prefill(m, P, g, PLAN_PROMPT), _dit_nograd(m, P, 16 * g, 1024, 532),
                                     _vae_nograd(m, 8 * g, 512 ** 2)) + 8 * g * 11 * 16 * 64 * 64 * 4),
]


def plan_table(out):
    """The plan's markdown table (what the README shows) from plan_main's result (GiB per GPU)."""
    lines = [f"| stage (README real launch) | mode | params | grads | optimizer | activations | peak (phase) | "
             f"fits {out['gpu_gib']:g} GiB |", "|---|---|---|---|---|---|---|---|"]
    for st in out["stages"].values():
        for mode in ("ddp", "fsdp"):
            r = st[mode]
            lines.append(f"| {st['title']} | {'DDP' if mode == 'ddp' else 'FSDP x%d' % out['gpus']} | {r['params']:.1f} | "
                         f"{r['grads']:.1f} | {r['optim']:.1f} | {r['act']:.1f} | {r['peak']:.1f} ({r['peak_phase']}) | "
                         f"{'yes' if st['fits'][mode] else 'no'} |")
    return lines


def plan_main(a):
    """bench.py --preset real --plan: measure, then per stage a table (DDP and FSDP x gpus) and a verdict."""
    if a.preset != "real":
        sys.exit("--plan plans the real launches: use --preset real")
    torch.set_num_threads(a.threads)
    cap = a.gpu_gib * 0.9 * GiB   # 10 % for the CUDA context, fragmentation and what the plan does not see
    t0 = time.time()
    print(f"memory plan: the README's real launches on {a.gpus} x {a.gpu_gib:g} GiB; 'fits' = peak <= "
          f"{cap / GiB:.1f} GiB (90 %); GiB per GPU")
    P = plan_params()
    print(f"  parameters (meta device): encoder {P['encoder'] / 1e9:.2f}B (vision {P['encoder_vision'] / 1e9:.2f}B), DiT "
          f"{P['dit'] / 1e9:.2f}B ({P['dit_layers']} blocks of {P['dit_block'] / 1e6:.0f}M), VAE {P['vae'] / 1e6:.0f}M, projector "
          f"{P['projector'] / 1e6:.0f}M, CLIP image tower {P['clip'] / 1e6:.0f}M, LoRA: encoder {P['encoder_lora'] / 1e6:.1f}M, "
          f"DiT {P['dit_lora'] / 1e6:.1f}M ({time.time() - t0:.0f} s)")
    meas = plan_measure(a)
    f = meas["dit full16"]["block"]
    print(f"  DiT block: {f[1] / 2432 / 2:.1f} x (tokens x width x 2 bytes) saved per row and token, "
          f"+ {f[0] / 2 ** 20:.0f} MiB per call")
    out = {"gpus": a.gpus, "gpu_gib": a.gpu_gib, "cap_gib": cap / GiB, "params": P,
           "measured": {k: {kk: list(v) for kk, v in d.items()} for k, d in meas.items()}, "stages": {}}
    rows = []
    for st in PLAN_STAGES:
        res = {mode: plan_stage(st, P, meas, a.gpus, mode == "fsdp", st["micro"], True) for mode in ("ddp", "fsdp")}
        fit = {mode: r["peak"] <= cap for mode, r in res.items()}
        best = {}
        for mode in ("ddp", "fsdp"):
            for ck in (True, False):
                ok = [b for b in (1, 2, 4, 8, 16, 32) if plan_stage(st, P, meas, a.gpus, mode == "fsdp", b, ck)["peak"] <= cap]
                best[(mode, ck)] = max(ok) if ok else 0
        mode = "ddp" if fit["ddp"] else "fsdp"
        fl = "" if mode == "ddp" else " with --fsdp"
        if fit[mode]:
            verdict = (f"{st['title']}: fits in {a.gpu_gib:g} GiB {'without FSDP' if mode == 'ddp' else 'only with --fsdp'} at "
                       f"{st['knob']} {st['micro']} --grad_ckpt ({res[mode]['peak'] / GiB:.1f} GiB); largest {st['knob']} that "
                       f"fits{fl}: {best[(mode, True)]} with --grad_ckpt, {best[(mode, False)] or 'none'} without")
        else:
            verdict = (f"{st['title']}: does NOT fit in {a.gpu_gib:g} GiB at {st['knob']} {st['micro']} --grad_ckpt "
                       f"(DDP {res['ddp']['peak'] / GiB:.1f}, FSDP {res['fsdp']['peak'] / GiB:.1f} GiB); largest {st['knob']} "
                       f"that fits with --fsdp --grad_ckpt: {best[('fsdp', True)] or 'none'}")
        if fit["ddp"] and fit["fsdp"]:
            verdict += f"; --fsdp saves {(res['ddp']['peak'] - res['fsdp']['peak']) / GiB:.1f} GiB"
        out["stages"][st["key"]] = {"title": st["title"], "launch": st["launch"], "what": st["what"], "knob": st["knob"],
                                    "micro": st["micro"], "fits": fit, "recommended": mode, "verdict": verdict,
                                    "largest_micro": {f"{m}{'+ckpt' if c else ''}": v for (m, c), v in best.items()},
                                    **{m: {k: (v / GiB if not isinstance(v, (dict, str)) else
                                               {kk: vv / GiB for kk, vv in v.items()} if isinstance(v, dict) else v)
                                           for k, v in r.items()} for m, r in res.items()}}
        rows.append((st, res, verdict))
    print("\n" + "\n".join(plan_table(out)) + "\n")
    for st, _, verdict in rows:
        print(f"verdict: {verdict}")
    out["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\nplan done in {out['seconds']:.0f} s; wrote {a.out}")
    return out


if __name__ == "__main__":
    runs.cli(lambda: main(p.parse_args()))
