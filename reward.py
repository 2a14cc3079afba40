"""
Rewards and the image-similarity backbones f_I behind them, shared by the RL stages, the cold-start
loss (with gradients) and Unified-Bench (docs/algorithm.md §2, §7). Imports nothing from this repository.

THE REWARD CONTRACT (stages 2 and 3 call nothing else):
    scores = reward(src, rec, captions)   src, rec: (N, 3, H, W) float in [0, 1] (sources, reconstructions;
                                          row i of rec was redrawn from captions[i] to match src[i]);
                                          captions: list of N str -> scores (N,) float, higher = better
It is called under torch.no_grad, once per step with the rank's whole batch. Built-in: a backbone's
cosine R(x, x~) = cos(f_I(x), f_I(x~)) (load_reward("clip", path)); your own: any importable function
with that signature, `--reward mymodule:my_reward` (docs/operations.md, "Add your own reward").

    bb = load_backbone("clip", path)          # a folder / file of weights (tools/tiny.py builds tiny ones)
    f = bb(x)                                 # (B, 3, H, W) in [0, 1], any H, W -> (B, D), unit norm
    r = bb.similarity(x, x_rec)               # (B,) R(x, x~) = cos(f_I(x), f_I(x~))

Preprocessing runs in torch on tensors, so gradients reach the image. docs/algorithm.md §7:
| name     | real weights (default)                    | preprocessing                                   | feature                   |
| clip     | open_clip ViT-L-14 'openai' (QuickGELU):  | short side 224 bicubic, center crop 224,        | projected image embedding |
|          | timm/vit_large_patch14_clip_224.openai    | CLIP mean/std                                   | (CLIP.encode_image)       |
| longclip | LongCLIP-L vision tower, OpenAI format,   | resize 224 bicubic (short side), center crop    | ln_post(CLS) @ proj       |
|          | QuickGELU: a .safetensors of visual.*     | 224, CLIP mean/std                              |                           |
| dinov2   | facebook/dinov2-large                     | short side 256 bicubic, center crop 224,        | last_hidden_state[:, 0]   |
|          |                                           | ImageNet mean/std                               |                           |
| dinov3   | facebook/dinov3-vitl16-pretrain-lvd1689m  | resize 224x224 bilinear, ImageNet mean/std      | last_hidden_state[:, 0]   |
| pixel    | none: a weight-free baseline, not benched | average-pool to an 8x8 grid                     | pooled pixels - 0.5       |
Resizes are antialiased (as PIL / torchvision) and clamped to [0, 1] (PIL works in uint8).
224 is the input size of the real models; a tiny model uses its own (`bb.size`, e.g. 32 px, read
from its config) and scales the resize with it (DINOv2: short side = size * 256 / 224).

Nothing here loads pickles (.pt/.pth/.bin): weights are safetensors only.
"""
import importlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.constants import is_offline_mode
import open_clip
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
from safetensors.torch import load_file
from transformers import DINOv3ViTModel, Dinov2Model
from transformers.utils.logging import disable_progress_bar



class RewardError(RuntimeError):
    """A reward that cannot be used: weights missing, pickled or foreign; a module:function that does not
    import or breaks the contract. Scripts print it as one line."""

BENCH_BACKBONES = ("clip", "longclip", "dinov2", "dinov3")
BACKBONES = BENCH_BACKBONES + ("pixel",)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PICKLE_EXTS = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"  # open_clip's ViT-L-14 'openai' weights, safetensors
TO_SAFETENSORS = (  # run once, on a file you trust
    'import torch; from safetensors.torch import save_file\n'
    'sd = torch.load("longclip-L.pt", map_location="cpu", weights_only=True); sd = sd.get("state_dict", sd)\n'
    'save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}, "longclip-L.safetensors")')
REAL = {  # name -> (default weights, how to get them for offline use, what to pass)
    "clip": (CLIP_REPO, f"hf download {CLIP_REPO} open_clip_config.json open_clip_model.safetensors --local-dir DIR", "DIR"),
    "longclip": (None, "download longclip-L.pt (huggingface.co/BeichenZhang/LongCLIP-L) and convert it to "
                       "safetensors once, in python:\n" + TO_SAFETENSORS, "longclip-L.safetensors"),
    "dinov2": ("facebook/dinov2-large", "hf download facebook/dinov2-large --local-dir DIR", "DIR"),
    "dinov3": ("facebook/dinov3-vitl16-pretrain-lvd1689m", "accept the licence on the model page, then "
               "hf download facebook/dinov3-vitl16-pretrain-lvd1689m --local-dir DIR", "DIR"),
}


def _missing(name, path, err=None):
    why = f" ({type(err).__name__}: {err})" if err is not None else ""
    get, what = REAL[name][1:]
    return RewardError(f"{name} backbone: cannot load weights from {path!r}{why}.\nTo get them: {get}\n"
                           f"then pass it: --reward_path {what} in a stage script, --{name}_path {what} in eval_unified.py.")


def _refuse_pickle(name, path):
    if str(path).lower().endswith(PICKLE_EXTS):
        raise RewardError(f"{name} backbone: {path!r} is a pickle checkpoint; nothing here loads pickles "
                              f"(safetensors only). Get safetensors weights: {REAL[name][1]}")
    if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
        pickles = [f for f in os.listdir(path) if f.lower().endswith(PICKLE_EXTS)]
        raise RewardError(f"{name} backbone: no .safetensors weights in {path!r}"
                              + (f" (pickles {pickles} are refused)" if pickles else "") + f". To get them: {REAL[name][1]}")


def preprocess(x, size, short=None, interp="bicubic", mean=CLIP_MEAN, std=CLIP_STD):
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalized. short: torchvision Resize(short) (the short
    side) then CenterCrop(size); short=None: resize to size x size. Differentiable."""
    H, W = x.shape[-2:]
    if short is None:
        hw = (size, size)
    else:  # torchvision: the long side is int(short * long / short_side)
        hw = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    if hw != (H, W):
        x = F.interpolate(x, size=hw, mode=interp, align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((hw[0] - size) / 2)), int(round((hw[1] - size) / 2))
    x = x[..., top:top + size, left:left + size]  # (B, 3, size, size)
    mean, std = x.new_tensor(mean).view(1, 3, 1, 1), x.new_tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


class Backbone(nn.Module):
    """f_I: images (B, 3, H, W) in [0, 1] -> (B, D) unit-norm features. Frozen, always in eval mode;
    gradients flow to the input image."""

    def __init__(self, name, net, size, short=None, interp="bicubic", mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.name, self.net, self.size, self.short, self.interp = name, net, size, short, interp
        self.mean, self.std = mean, std
        if net is not None:
            net.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):  # a reward model never leaves eval mode (dropout, DINOv3's pos-embed jitter)
        return super().train(False)

    def embed(self, x):  # (B, 3, size, size) normalized -> (B, D)
        if self.name in ("dinov2", "dinov3"):
            return self.net(pixel_values=x).last_hidden_state[:, 0]  # CLS after the final norm
        return self.net(x)  # open_clip VisionTransformer: ln_post(x[:, 0]) @ proj (= CLIP.encode_image)

    def forward(self, x):
        p = next(self.net.parameters())
        x = preprocess(x.to(p.device, torch.float32), self.size, self.short, self.interp, self.mean, self.std)
        return F.normalize(self.embed(x.to(p.dtype)).float(), dim=-1)  # (B, D)

    def similarity(self, a, b):
        """(B,) cosine between the features of two image batches (their sizes may differ)."""
        return (self(a) * self(b)).sum(-1)


class PixelBackbone(Backbone):
    """A weight-free baseline, not a benchmark backbone: the image average-pooled to a grid x grid
    colour layout, centred (- 0.5), flattened and unit-normalised. A random-weight CLIP scores every pair
    ~0.999 (docs/algorithm.md §9); this one gives identical images 1 and different colours/layouts clearly less,
    so it is a usable learning signal for the tiny preset. One small constant entry keeps a flat grey
    image (all zeros after centring) at similarity 1 with itself."""

    def __init__(self, grid=8):
        super().__init__("pixel", None, size=grid)

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x.float(), self.size) - 0.5  # (B, 3, grid, grid)
        f = torch.cat([f.flatten(1), f.new_full((len(f), 1), 0.01)], 1)  # (B, 3 grid^2 + 1)
        return F.normalize(f, dim=-1)


def _load_clip(path, device, dtype):
    real, repo = path is None, path or CLIP_REPO
    path = repo[len("local-dir:"):] if repo.startswith("local-dir:") else repo
    if not os.path.exists(path):  # a hub id (default: OpenAI's ViT-L/14), from the HF cache or the hub
        try:
            path = snapshot_download(path.removeprefix("hf-hub:"),
                                     allow_patterns=["open_clip_config.json", "open_clip_model.safetensors"])
        except Exception as e:
            raise _missing("clip", repo, e) from e
    _refuse_pickle("clip", path)
    if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
        raise _missing("clip", path, FileNotFoundError("no open_clip_config.json"))
    model = open_clip.create_model("local-dir:" + path, require_pretrained=True,
                                   force_quick_gelu=real)  # OpenAI's CLIP uses QuickGELU
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Backbone("clip", model.visual.to(device, dtype), size, short=size, interp=cfg.get("interpolation", "bicubic"),
                    mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _load_longclip(path, device, dtype):
    if path is None:
        raise _missing("longclip", path, ValueError("LongCLIP has no default download"))
    _refuse_pickle("longclip", path)
    if not os.path.isfile(path):
        raise _missing("longclip", path, FileNotFoundError("expected a .safetensors file"))
    sd = {k[len("visual."):]: v for k, v in load_file(path).items() if k.startswith("visual.")}
    if not sd:
        raise RewardError(f"longclip backbone: no visual.* tensors in {path!r} (expected the OpenAI-format state dict)")
    # The architecture from tensor shapes, as open_clip's build_model_from_openai_state_dict does.
    width, patch = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
    net = VisionTransformer(image_size=patch * grid, patch_size=patch, width=width, layers=layers,
                            heads=max(1, width // 64),  # OpenAI ViTs: head width 64
                            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                            output_dim=sd["proj"].shape[1], act_layer=QuickGELU, norm_layer=LayerNorm)
    net.load_state_dict(sd)  # strict
    size = patch * grid
    return Backbone("longclip", net.to(device, dtype), size, short=size, interp="bicubic")


def _load_dino(name, path, device, dtype):
    disable_progress_bar()  # transformers 5 prints weight-loading bars
    path = path or REAL[name][0]
    _refuse_pickle(name, path)
    try:
        net = (Dinov2Model if name == "dinov2" else DINOv3ViTModel).from_pretrained(path, dtype=dtype, use_safetensors=True)
    except Exception as e:
        raise _missing(name, path, e) from e
    img = net.config.image_size
    size = min(224, img if isinstance(img, int) else img[0])  # 224, or a tiny model's own input size
    if name == "dinov2":  # short side 256 bicubic, crop 224
        return Backbone(name, net.to(device), size, short=size * 256 // 224, interp="bicubic",
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Backbone(name, net.to(device), size, short=None, interp="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def load_backbone(name, path=None, device="cpu", dtype=torch.float32):
    """name in BACKBONES; path: None = the real default weights (docs/algorithm.md §7), else a local directory or hub id (clip: an open_clip dir, 'local-dir:' accepted;
    dinov2/dinov3: a save_pretrained dir) or, for longclip, a .safetensors file. Weights: safetensors only."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    if name == "pixel":
        return PixelBackbone().to(device)
    path = os.path.expanduser(str(path)) if path is not None else None
    if path and (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):
        raise _missing(name, path, FileNotFoundError("no such file or directory"))
    if name == "clip":
        return _load_clip(path, device, dtype)
    if name == "longclip":
        return _load_longclip(path, device, dtype)
    return _load_dino(name, path, device, dtype)


HUB_FILES = {"clip": (("open_clip_config.json",), ("open_clip_model.safetensors",)),  # each: one of these files
             "dinov2": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
             "dinov3": (("config.json",), ("model.safetensors", "model.safetensors.index.json"))}


def check_weights(name, path=None):
    """Can load_backbone(name, path) find its weights? Checked without loading or downloading anything, so that a
    script says so before its models load: a local path must exist; a hub id (the default when path is None) must
    be in the local Hugging Face cache when the hub is offline (HF_HUB_OFFLINE); online, the loader downloads it.
    RewardError with the download command and the flag to pass otherwise."""
    if name == "pixel":
        return
    path = os.path.expanduser(str(path)) if path else None
    if name == "longclip" and path is None:
        raise _missing("longclip", path, ValueError("LongCLIP has no default download"))
    repo = (path or REAL[name][0]).removeprefix("local-dir:")
    if os.path.exists(repo):
        return
    if os.path.isabs(repo) or repo.startswith(".") or name == "longclip":
        raise _missing(name, path, FileNotFoundError("no such file or directory"))
    if not is_offline_mode():
        return
    repo = repo.removeprefix("hf-hub:")
    for alternatives in HUB_FILES[name]:
        if not any(isinstance(try_to_load_from_cache(repo, f), str) for f in alternatives):
            raise _missing(name, repo, FileNotFoundError(f"{alternatives[0]} is not in the local Hugging Face cache "
                                                         "and HF_HUB_OFFLINE is set"))


# ----------------------------------------------------------------------------------------------
# Rewards: the contract above, for a backbone or for your own function.

class Reward:
    """reward(src, rec, captions=None) -> (N,) fp32 scores, checked against the contract. .backbone is the
    backbone of a built-in reward (None for your own)."""

    def __init__(self, name, fn, backbone=None):
        self.name, self.fn, self.backbone = name, fn, backbone

    def __call__(self, src, rec, captions=None):
        r = self.fn(src, rec, captions)
        n = src.shape[0]
        if not torch.is_tensor(r) or tuple(r.shape) != (n,) or not r.is_floating_point():
            got = f"{type(r).__name__} {tuple(r.shape)} {r.dtype}" if torch.is_tensor(r) else type(r).__name__
            raise RewardError(f"--reward {self.name}: returned {got}; the contract is a float tensor of shape ({n},), "
                              "one score per (source, reconstruction) pair")
        return r.float()

    def to(self, device):
        if self.backbone is not None:
            self.backbone.to(device)
        return self


def find_function(spec):
    """'module:function' (module importable from the working directory or sys.path, or a path/to/file.py)
    -> the function. RewardError naming what is missing."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise RewardError(f"--reward {spec!r}: expected a backbone ({' | '.join(BACKBONES)}) or module:function")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise FileNotFoundError(mod_name)
            loc = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
            mod = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            mod = importlib.import_module(mod_name)
    except Exception as e:
        raise RewardError(f"--reward {spec}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(f"--reward {spec}: {mod_name} has no function {fn_name!r}")
    return fn


def load_reward(spec, path=None, device="cpu", dtype=torch.float32):
    """spec: a backbone name (BACKBONES; path as in load_backbone) or 'module:function' (your own reward, the
    contract above; path is not used). -> Reward."""
    if spec in BACKBONES:
        bb = load_backbone(spec, path, device=device, dtype=dtype)
        return Reward(spec, lambda src, rec, captions: bb.similarity(src.float(), rec.float()), bb)
    return Reward(spec, find_function(spec))
