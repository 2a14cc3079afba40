"""data/shapes/standins.py: a shortened run writes stand-ins that model.load_uae and reward.load_backbone
load; the pieces that decide what the captioner learns (terse captions, the loss mask, the caption parser)."""
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shapes"))
import prepare  # noqa: E402
import standins  # noqa: E402

import model  # noqa: E402
import reward  # noqa: E402

SHORT = ["--vae_steps", "2", "--vae_batch", "4", "--clip_steps", "2", "--clip_batch", "8", "--cap_steps", "2",
         "--cap_batch", "4", "--cap_text_batch", "2", "--eval_n", "3", "--eval_G", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    prepare.write_split(str(d / "train"), 12, 0)
    prepare.write_split(str(d / "val"), 3, 1)
    return d


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("standins") / "out"
    rep = standins.main(["--data", str(data), "--out", str(out), "--seed", "0"] + SHORT)
    return out, rep


@pytest.fixture(scope="module")
def uae(built):
    out, _ = built
    return model.load_uae(f"{out}/encoder", f"{out}/decoder")


def test_artifacts_load_through_the_stage_loaders(built, uae):
    out, rep = built
    m = uae
    assert m.encoder.config.text_config.hidden_size == 128  # the larger captioner
    assert m.latent_shape(64, 64) == (16, 8, 8) and m.transformer.config.sample_size == 8  # DiT matches the VAE
    c = m.transformer.config  # the --dit_* decoder, and the projector feeds it
    assert (c.num_layers, c.num_attention_heads * c.attention_head_dim, c.joint_attention_dim) == (4, 128, 64)
    assert m.condition(["a small red circle in the center."]).emb.shape[-1] == 64
    for w in ("circle", "triangle", "background", "purple", "bottom"):  # the tokenizer learnt the shapes words
        assert len(m.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    torch.manual_seed(0)
    r = m.sample_captions(torch.rand(2, 3, 64, 64), G=2, temperature=1.0, max_new_tokens=6)
    assert len(r.texts) == 4
    x = m.generate_images(["a small red circle in the center."], steps=2, cfg=1.0)
    assert x.shape == (1, 3, 64, 64)
    bb = reward.load_backbone("clip", str(out / "clip"))
    a = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(bb.similarity(a, a.clone()), torch.ones(2), atol=1e-5, rtol=0)
    assert bb.size == 64
    import open_clip  # the text side's tokenizer comes from the same folder, offline
    ids = open_clip.get_tokenizer(f"local-dir:{out}/clip")(["a large green square at the top left."])
    assert ids.shape == (1, 40) and int(ids.max()) < 49408
    saved = json.load(open(out / "standins.json"))
    assert saved["args"]["seed"] == 0 and set(saved["report"]) >= {"vae", "clip", "captioner", "captions", "seconds"}
    assert 0 <= rep["captions"]["correct"] <= 1 and -1 <= rep["clip"]["sim_other_scene"] <= 1


def test_vae_latents_have_unit_std_on_the_training_images(uae, data):
    m = uae
    X, _ = standins.load_split(str(data / "train"), 64)
    with torch.no_grad():
        z = m.vae_encode(X)  # SD3 convention: (mean - shift) * scale
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-3


def test_terse_captions_are_deterministic_true_subsets(data, tmp_path):
    prepare.write_split(str(tmp_path / "again"), 12, 0)
    a = open(data / "train" / "captions.jsonl").read()
    assert open(tmp_path / "again" / "captions.jsonl").read() == a
    recs = [json.loads(line) for line in a.splitlines()]
    for r in recs:
        assert prepare.describe(r["background"], r["shapes"]) == r["caption"]  # the full caption is unchanged
        bg, shapes = standins.parse_caption(r["terse"])
        assert bg in (None, r["background"]) and shapes and all(s in r["shapes"] for s in shapes)
    # over 400 scenes: mostly one shape, the background a third of the time (p_background 0.35, binomial s.e. 0.024),
    # sometimes everything
    rng = random.Random(0)
    parts = [prepare.draw_scene(rng)[2] for _ in range(400)]
    trng = random.Random(1)
    got = [standins.parse_caption(prepare.terse_caption(p, trng)) for p in parts]
    one = sum(len(s) == 1 for _, s in got) / len(got)
    bgf = sum(b is not None for b, _ in got) / len(got)
    multi = [(s, p) for (_, s), p in zip(got, parts) if len(p["shapes"]) > 1]
    full = sum(len(s) == len(p["shapes"]) for s, p in multi) / len(multi)
    assert 0.7 < one < 0.9 and 0.25 < bgf < 0.45 and 0.1 < full < 0.4


def test_caption_batch_targets_only_the_caption_and_im_end(built, uae):
    out, _ = built
    from transformers import Qwen2_5_VLProcessor
    proc = Qwen2_5_VLProcessor.from_pretrained(f"{out}/encoder")
    caps = ["a small red circle in the center.", "a large blue square at the top left on a white background."]
    b, labels = standins.caption_batch(proc, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), caps)
    for i, c in enumerate(caps):
        tgt = labels[i][labels[i] != -100]
        assert proc.tokenizer.decode(tgt) == c + "<|im_end|>"
        start = int((labels[i] != -100).nonzero()[0])  # targets follow the generation prompt directly
        assert proc.tokenizer.decode(b["input_ids"][i, :start]).endswith("<|im_start|>assistant\n")
    # the prompt part is what UAE.caption_inputs builds for sampling
    ci = uae.caption_inputs(torch.zeros(1, 3, 64, 64))
    P = ci["input_ids"].shape[1]
    assert torch.equal(ci["input_ids"][0], b["input_ids"][0, :P]) and (labels[:, :P] == -100).all()


def test_restate_batch_reads_the_decoders_template_and_targets_the_reply(built, uae):
    """The text-only task trains exactly the template UAE.encode_text feeds the decoder; loss on the reply only,
    which starts with the background colour (what the template's last position must begin to predict)."""
    out, _ = built
    from transformers import Qwen2_5_VLProcessor
    proc = Qwen2_5_VLProcessor.from_pretrained(f"{out}/encoder")
    rec = {"background": "white", "shapes": [{"size": "small", "color": "red", "shape": "circle", "position": "center"},
                                             {"size": "large", "color": "blue", "shape": "square", "position": "top left"}]}
    reply = standins.restate(rec)
    assert reply == "white background; large blue square top left; small red circle center."  # reading order
    caps = [prepare.describe("white", rec["shapes"]), "a small red circle in the center."]
    b, labels = standins.restate_batch(proc, caps, [reply, "black background; small red circle center."])
    msgs = [[{"role": "generate", "content": [{"type": "text", "text": c}]}] for c in caps]  # = UAE.encode_text's
    prompts = uae.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    for i, (pr, rp) in enumerate(zip(prompts, [reply, "black background; small red circle center."])):
        ids = uae.tokenizer(pr, add_special_tokens=False)["input_ids"]
        assert b["input_ids"][i, :len(ids)].tolist() == ids and (labels[i, :len(ids)] == -100).all()
        assert proc.tokenizer.decode(labels[i][labels[i] != -100]) == rp + "<|im_end|>"
        first = proc.tokenizer.decode(labels[i][labels[i] != -100][:1])  # the reply starts with the colour
        assert first and ("white", "black")[i].startswith(first)
    assert labels[1][b["attention_mask"][1] == 0].eq(-100).all()  # padding is not a target


def test_caption_stats_scores_what_it_should():
    r = {"background": "white", "shapes": [{"size": "large", "color": "purple", "shape": "square", "position": "top left"},
                                           {"size": "small", "color": "red", "shape": "circle", "position": "center"}]}
    full = prepare.describe("white", r["shapes"])
    s = standins.caption_stats([full, "a large purple square at the top left.", "a large green square at the top left.",
                                "a small red circle in the center on a black background.", "purple square, nice"], [r] * 5)
    assert s["correct"] == pytest.approx(2 / 5) and s["well_formed"] == pytest.approx(4 / 5)
    assert s["all_shapes"] == pytest.approx(1 / 4) and s["background"] == pytest.approx(2 / 4)


def test_parts_train_deterministically(data):
    X, recs = standins.load_split(str(data / "train"), 64)
    a = standins.parse_args(["--seed", "3", "--vae_steps", "2", "--vae_batch", "4", "--clip_steps", "2", "--clip_batch", "6"])
    v1, _ = standins.train_vae(X, a)
    v2, _ = standins.train_vae(X, a)
    c1, _, _ = standins.train_clip(X, None, [r["caption"] for r in recs], a)
    c2, _, _ = standins.train_clip(X, None, [r["caption"] for r in recs], a)
    for m1, m2 in ((v1, v2), (c1, c2)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert v1.config.scaling_factor == v2.config.scaling_factor
