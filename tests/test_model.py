"""Foundation: model.py's encoder / projector / decoder, LoRA, checkpoints, data loading."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import runs
import checkpoint as ck
import images
import model as M
import training as T


def test_tiny_preset_round_trip_is_exact(tiny_paths, tmp_path):
    """build -> save_pretrained -> from_pretrained gives bit-identical weights for every part."""
    a, b = runs.load_model(preset="tiny"), runs.load_model(preset="tiny")
    for part in ("encoder", "transformer", "vae"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    # the same code path re-saves and reloads a model (what a real checkpoint goes through)
    a.encoder.save_pretrained(tmp_path / "enc")
    a.processor.save_pretrained(tmp_path / "enc")
    c = runs.load_model(encoder=str(tmp_path / "enc"), preset="tiny")
    assert all(torch.equal(v, c.encoder.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    assert c.tokenizer.convert_tokens_to_ids("<|im_end|>") == a.eos_id


def test_g_samples_differ_and_logprobs_match_sampling(tiny_uae, images):
    torch.manual_seed(1)
    r, scores = tiny_uae.sample_captions(images, G=4, max_new_tokens=16, output_scores=True)
    assert r.completion_ids.shape[0] == 8
    for b in range(2):  # the G captions of one image are not all the same
        assert len(set(r.texts[b * 4:(b + 1) * 4])) > 1
    lp_sample = torch.log_softmax(scores.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    lp = tiny_uae.completion_logprobs(r)
    mk = r.completion_mask.bool()
    assert (lp - lp_sample)[mk].abs().max() < 1e-4
    # no suppressed token (image pad, other specials, padded vocab rows) is ever sampled
    assert not tiny_uae.suppress[r.completion_ids[mk]].any()


def test_temperature_is_applied_in_logprobs(tiny_uae, images):
    torch.manual_seed(2)
    r, scores = tiny_uae.sample_captions(images[:1], G=2, max_new_tokens=8, temperature=0.5, output_scores=True)
    lp_sample = torch.log_softmax(scores.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    mk = r.completion_mask.bool()
    assert (tiny_uae.completion_logprobs(r, 0.5) - lp_sample)[mk].abs().max() < 1e-4
    assert (tiny_uae.completion_logprobs(r, 1.0) - lp_sample)[mk].abs().max() > 1e-3


def test_mask_stops_after_first_eos(tiny_uae, images):
    # make EOS likely so that most rows stop early
    head = tiny_uae.encoder.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    new.weight.data.copy_(head.weight.data)
    new.bias.data.zero_()
    new.bias.data[tiny_uae.eos_id] = 4.0
    tiny_uae.encoder.lm_head = new
    torch.manual_seed(0)
    r = tiny_uae.sample_captions(images, G=4, max_new_tokens=24)
    eos = r.completion_ids == tiny_uae.eos_id
    assert eos.any(1).sum() >= 4 and not r.truncated[eos.any(1)].any()
    for row, mk, e in zip(r.completion_ids, r.completion_mask, eos):
        if e.any():
            first = int(e.float().argmax())
            assert mk[:first + 1].eq(1).all() and mk[first + 1:].eq(0).all()
            assert row[first + 1:].eq(tiny_uae.pad_id).all()
        else:
            assert mk.eq(1).all()
    # the decoded text ends before EOS
    assert all("<|im_end|>" not in t for t in r.texts)


def test_condition_sees_only_the_caption(tiny_uae, images):
    caps = ["a red circle at the top left", "two yellow triangles and a large purple star in the center"]
    with torch.no_grad():
        c1 = tiny_uae.condition(caps)
        tiny_uae.sample_captions(images, G=2, max_new_tokens=4)      # captioning other images changes nothing
        c2 = tiny_uae.condition(caps)
        single = tiny_uae.condition(caps[:1])                         # batch of one, no padding
    assert torch.equal(c1.emb, c2.emb)
    L = single.emb.shape[1]
    assert torch.allclose(c1.emb[0, :L], single.emb[0], atol=1e-5)
    assert c1.mask[0, L:].eq(0).all() and c1.emb[0, L:].eq(0).all()
    # the signature of the condition path has no image input at all
    import inspect
    assert list(inspect.signature(tiny_uae.condition).parameters) == ["captions", "max_tokens"]


def test_padding_does_not_change_the_velocity(tiny_uae):
    """Masked joint attention: a caption batched with a longer one gives what it gives alone."""
    caps = ["a cat", "a very long caption about a dog and a house and a tree near the bottom right corner"]
    with torch.no_grad():
        c = tiny_uae.condition(caps)
        c0 = tiny_uae.condition(caps[:1])
        neg = tiny_uae.condition([M.NEGATIVE_PROMPT])
        z = torch.randn(2, 16, 8, 8)
        v = tiny_uae.velocity(z, 0.7, c, neg, 4.5)
        v0 = tiny_uae.velocity(z[:1], 0.7, c0, neg, 4.5)
    assert torch.allclose(v[0], v0[0], atol=1e-5)


def test_ode_sampler_and_vae_shapes(tiny_uae):
    sig = tiny_uae.sigmas(6)
    assert sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    with torch.no_grad():
        x = tiny_uae.generate_images(["a red circle"], steps=3, cfg=4.5, seed=3)
        y = tiny_uae.generate_images(["a red circle"], steps=3, cfg=4.5, seed=3)
        z = tiny_uae.vae_encode(x)
    assert x.shape == (1, 3, 64, 64) and 0 <= x.min() and x.max() <= 1 and torch.equal(x, y)
    assert z.shape == (1, 16, 8, 8)


def test_gradients_reach_lora_and_projector_only(tiny_uae):
    m = tiny_uae
    M.add_lora(m.encoder, 4, 8, M.ENCODER_LORA_TARGETS)
    M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)
    m.projector.requires_grad_(True)
    for n, p in m.named_parameters():  # LoRA starts with B = 0: perturb it so A gets gradient too
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    cond = m.condition(["a small green square"])
    v = m.velocity(torch.randn(1, 16, 8, 8), 0.5, cond)
    x = m.vae_decode(cond.emb.mean() + v)
    x.mean().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("encoder" in n and "lora_" in n for n in got)
    assert any("transformer" in n and "lora_" in n for n in got)
    assert any(n.startswith("projector") for n in got)
    assert all("lora_" in n or n.startswith("projector") for n in got), sorted(got)[:5]
    assert not any(p.requires_grad for n, p in m.vae.named_parameters())


def test_reference_is_the_adapter_off_model(tiny_uae):
    m = tiny_uae
    caps = ["a red circle"]
    with torch.no_grad():
        base = m.condition(caps).emb
        M.add_lora(m.encoder, 4, 8, M.ENCODER_LORA_TARGETS)
        assert torch.equal(m.condition(caps).emb, base)            # fresh adapter == base (B = 0)
        for n, p in m.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        assert not torch.allclose(m.condition(caps).emb, base)
        with M.adapters_disabled(m.encoder):
            assert torch.equal(m.condition(caps).emb, base)
        live = m.condition(caps).emb
        M.merge_lora(m.encoder)
        assert not M.has_lora(m.encoder)
        assert torch.allclose(m.condition(caps).emb, live, atol=1e-5)
    assert all(p.requires_grad for n, p in m.encoder.named_parameters() if "lora_" in n) or not M.has_lora(m.encoder)


def _perturbed(m, scale=0.05):
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, scale)
    m.projector[0].weight.data.add_(0.01)


def test_checkpoint_round_trip_resume_and_merge(tiny_uae, tmp_path):
    m = tiny_uae
    enc_cfg = M.add_lora(m.encoder, 4, 8, M.ENCODER_LORA_TARGETS)
    dit_cfg = M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)
    _perturbed(m)
    ck.save_checkpoint(str(tmp_path / "s1"), m, {"stage": "stage1", "args": {}}, {"encoder": enc_cfg, "transformer": dit_cfg})
    files = sorted(os.listdir(tmp_path / "s1"))
    assert files == ["uae.json", "weights.safetensors"]
    caps, z = ["a red circle"], torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        want = m.velocity(z, 0.5, m.condition(caps))
        live = runs.load_model(init=str(tmp_path / "s1"), resume=True)     # adapters live: bit-exact
        assert M.has_lora(live.encoder) and M.has_lora(live.transformer)
        assert torch.equal(live.velocity(z, 0.5, live.condition(caps)), want)
        merged = runs.load_model(init=str(tmp_path / "s1"))                # next stage: adapters merged
        assert not M.has_lora(merged.encoder)
        assert torch.allclose(merged.velocity(z, 0.5, merged.condition(caps)), want, atol=1e-4)
    # a stage-2 checkpoint on top carries stage 1's layer along: self-contained
    e2 = M.add_lora(merged.encoder, 4, 8, M.ENCODER_LORA_TARGETS)
    _perturbed(merged)
    ck.save_checkpoint(str(tmp_path / "s2"), merged, {"stage": "stage2"}, {"encoder": e2})
    meta = json.load(open(tmp_path / "s2" / "uae.json"))
    assert len(meta["layers"]) == 2 and meta["layers"][0]["transformer"] is not None
    with torch.no_grad():
        want2 = merged.velocity(z, 0.5, merged.condition(caps))
        again = runs.load_model(init=str(tmp_path / "s2"), resume=True)
        assert torch.equal(again.velocity(z, 0.5, again.condition(caps)), want2)
    # only what was trained is stored: far smaller than the models
    assert os.path.getsize(tmp_path / "s2" / "weights.safetensors") < 2e6


def test_bad_checkpoints_give_clear_errors(tiny_uae, tmp_path):
    with pytest.raises(images.CheckpointError, match="no uae.json"):
        runs.load_model(init=str(tmp_path))
    ck.save_checkpoint(str(tmp_path / "c"), tiny_uae, {"stage": "x"})
    w = tmp_path / "c" / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.CheckpointError, match="truncated"):
        runs.load_model(init=str(tmp_path / "c"))
    ck.save_checkpoint(str(tmp_path / "d"), tiny_uae, {"stage": "x"})
    meta = json.load(open(tmp_path / "d" / "uae.json"))
    meta["arch"]["hidden"] = 2048
    json.dump(meta, open(tmp_path / "d" / "uae.json", "w"))
    with pytest.raises(images.CheckpointError, match="another architecture"):
        runs.load_model(init=str(tmp_path / "d"))


def test_checkpoint_write_is_atomic(tiny_uae, tmp_path, monkeypatch):
    ck.save_checkpoint(str(tmp_path / "c"), tiny_uae, {"stage": "a"})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(str(tmp_path / "c"), tiny_uae, {"stage": "b"})
    assert json.load(open(tmp_path / "c" / "uae.json"))["stage"] == "a"   # the old one is intact
    ck.read_checkpoint(str(tmp_path / "c"))


def test_load_image_modes_and_errors(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.new("P", (20, 20)).save(tmp_path / "p.gif")
    Image.new("L", (20, 20), 128).save(tmp_path / "l.jpg")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    for f in ("rgba.png", "g16.png", "p.gif", "l.jpg"):
        x = images.load_image(str(tmp_path / f), 32)
        assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1, f
    assert torch.allclose(images.load_image(str(tmp_path / "rgba.png"), 8), torch.ones(3, 8, 8))  # transparent -> white
    assert images.load_image(str(tmp_path / "g16.png"), 32).std() > 0.1                           # 16-bit rescaled
    with pytest.raises(images.ImageError, match="bad.png"):
        images.load_image(str(tmp_path / "bad.png"), 32)
    ds = images.ImageDataset(str(tmp_path), 16)
    x, caps, names = ds.batch(range(len(ds)))
    assert len(names) == len(ds) and str(tmp_path / "bad.png") in ds.bad
    with pytest.raises(FileNotFoundError, match="nowhere"):
        images.ImageDataset(str(tmp_path / "nowhere"), 16)


def test_jsonl_dataset_and_missing_captions(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n" + json.dumps({"image": "a.png"}) + "\n")
    ds = images.ImageDataset(str(tmp_path / "d.jsonl"), 8)
    assert ds.items[0][1] == "red"
    with pytest.raises(ValueError, match="no caption"):
        images.ImageDataset(str(tmp_path / "d.jsonl"), 8, need_captions=True)
    (tmp_path / "e.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="e.jsonl:1"):
        images.ImageDataset(str(tmp_path / "e.jsonl"), 8)


def test_batch_indices_split_the_global_batch():
    one = T.batch_indices(10, 4, 3, seed=0)
    two = T.batch_indices(10, 2, 3, seed=0, rank=0, world=2) + T.batch_indices(10, 2, 3, seed=0, rank=1, world=2)
    assert one == two
    epoch = sum((T.batch_indices(10, 5, s, 0) for s in range(2)), [])
    assert sorted(epoch) == list(range(10))


def test_full_dit_lineage_survives_later_lora_stages(tiny_uae, tmp_path):
    """A stage that trains the whole DiT, then a stage with a DiT LoRA on top: loading the
    second checkpoint gives the full weights once, plus the LoRA once."""
    m = tiny_uae
    e1 = M.add_lora(m.transformer, 4, 8, M.DIT_LORA_TARGETS)
    _perturbed(m)
    M.merge_lora(m.transformer)
    m.layers.append(({"encoder": None, "transformer": e1}, {}))   # as if an earlier stage's layer
    with torch.no_grad():
        for p in m.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ck.save_checkpoint(str(tmp_path / "full"), m, {"stage": "s1"}, transformer_full=True)
    z, caps = torch.randn(1, 16, 8, 8), ["a red circle"]
    with torch.no_grad():
        want = m.velocity(z, 0.5, m.condition(caps))
        a = runs.load_model(init=str(tmp_path / "full"))
        assert torch.equal(a.velocity(z, 0.5, a.condition(caps)), want)
    e2 = M.add_lora(a.transformer, 4, 8, M.DIT_LORA_TARGETS)
    _perturbed(a)
    ck.save_checkpoint(str(tmp_path / "s3"), a, {"stage": "s3"}, {"transformer": e2})
    assert json.load(open(tmp_path / "s3" / "uae.json"))["transformer_full"]
    with torch.no_grad():
        want = a.velocity(z, 0.5, a.condition(caps))
        b = runs.load_model(init=str(tmp_path / "s3"), resume=True)
        assert torch.equal(b.velocity(z, 0.5, b.condition(caps)), want)


def test_instruction_first_puts_the_instruction_before_the_image(tiny_uae, images):
    """The released demo's user turn is instruction then image; ours image then instruction by default."""
    tok = tiny_uae.tokenizer
    for first in (False, True):
        ids = tiny_uae.caption_inputs(images[:1], "describe it", instruction_first=first)["input_ids"][0].tolist()
        text = tok.decode(ids)
        assert (text.index("describe it") < text.index("<|vision_start|>")) == first
