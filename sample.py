"""
Try a UAE model by hand: caption an image, draw from a prompt, or reconstruct an image through
its caption (image -> caption -> image), writing files a person can open.

    python sample.py caption     --image photo.jpg --out caps/        # prints + writes caps/photo.txt
    python sample.py generate    --prompt "a red fox" --out fox.png
    python sample.py reconstruct --image photo.jpg --out recon/      # photo_caption.txt, _recon.png, _pair.png
Model: a checkpoint directory (--init out/stage3) or base models (--preset tiny|real; tiny is the default).
Tiny and fast (random weights, offline): add --steps 2 --max_new_tokens 8, e.g.
    python sample.py reconstruct --image data/shapes/val/00000.png --out out/sample --steps 2 --max_new_tokens 8
Sampling defaults are the released demo's temperature, caption length, steps and CFG, with this project's calls
(the image center-cropped to --resolution, the caption's own masked condition). The authors' inference exactly
(their generation config, native-size input, seed, padded pair condition; docs/released.md):
    python sample.py reconstruct --init released:weights/UAE --preset_sampling released --image photo.jpg --out recon/
A folder --out holds uae_outputs.json, the files this script wrote there: it writes only into a new or empty
folder or one it wrote (a training run's folder, or one with other files, is refused by name); a file --out is
overwritten, unless it is in a training run's folder.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import images
import model
import runs
from runs import arg
from tools import released

COMMANDS = ("caption", "generate", "reconstruct")



@dataclass
class Args:
    image: str = arg("", "input image (caption, reconstruct)")
    prompt: str = arg("", "caption to draw from (generate)")
    out: str = arg("samples", "output: a folder, or a file (.txt for caption, .png for generate)")
    init: str = arg("", "UAE checkpoint directory, or released:DIR for the authors' release (released.py; --decoder "
                        "then names SD3.5-large); empty = base models of --preset")
    preset: str = arg("tiny", "'tiny' (random weights, offline) or 'real' (Qwen2.5-VL-3B + SD3.5-large)")
    encoder: str = arg("", "override the encoder path / hub id")
    decoder: str = arg("", "override the decoder path / hub id")
    dtype: str = arg("auto", "auto | fp32 | bf16 (auto: bf16 on GPU, fp32 on CPU)")
    preset_sampling: str = arg("", "'released': the authors' inference demo, call for call (tools/released.Sampling, "
                                   "docs/released.md); its settings for the flags below not given")
    instruction: str = arg("", "captioning instruction ('' = model.INSTRUCTION, 'released' = the release's)")
    instruction_first: bool = arg(False, "put the instruction before the image in the user turn (the released demo's order)")
    resolution: int = arg(0, "output image size in px (and the caption input's, center-cropped, except under "
                             "--preset_sampling released: native size); 0 = the decoder's native size")
    temperature: float = arg(0.7, "caption sampling temperature (0 = greedy)")
    top_p: Optional[float] = arg(None, "caption nucleus sampling (unset: 1, or under --preset_sampling released the "
                                       "checkpoint's generation_config.json)")
    top_k: Optional[int] = arg(None, "caption top-k (unset: off, or as --top_p)")
    repetition_penalty: Optional[float] = arg(None, "caption repetition penalty (--preset_sampling released only; "
                                                    "unset: as --top_p)")
    max_new_tokens: int = arg(512, "caption length limit")
    steps: int = arg(40, "decoder sampling steps")
    cfg: float = arg(5.0, "classifier-free guidance scale")
    seed: int = arg(0, "seed for the caption sampling and the initial noise (under --preset_sampling released: the "
                       "demo's, on the device's generator)")
    max_pixels: int = arg(images.MAX_PIXELS, "refuse images of more pixels (read from the header, never decoded)")


TOOL = "sample.py"


def out_path(out, ext, stem):
    """--out is a file when it ends in `ext`, else a folder that gets `stem + ext`."""
    return out if out.lower().endswith(ext) else os.path.join(out, stem + ext)


def outputs(command, args):
    """The files this command writes -> (their folder when --out is one, else None; [paths])."""
    if command == "generate":
        stem = re.sub(r"[^a-zA-Z0-9]+", "_", args.prompt)[:40].strip("_") or "image"
    else:
        stem = os.path.splitext(os.path.basename(args.image))[0]
    if command == "reconstruct":  # --out is a folder
        base = os.path.join(args.out, stem)
        return args.out, [base + "_caption.txt", base + "_recon.png", base + "_pair.png"]
    ext = ".txt" if command == "caption" else ".png"
    path = out_path(args.out, ext, stem)
    return (None if path == args.out else args.out), [path]


def check_out(command, args):
    """--out, before anything loads: a folder of results that is new, empty or this script's (runs.check_own_folder:
    never a training run's, never one with files it did not write), or a file named by the user (overwritten, not
    in a training run's folder). -> (folder or None, [paths])."""
    folder, paths = outputs(command, args)
    if folder is None:
        runs.check_file_out("out", paths[0])
    else:
        runs.check_own_folder("out", folder, TOOL)
    return folder, paths


def write_out(folder, path, write):
    """write(path) one output, recorded first in its folder's runs.OUTPUTS (when --out is a folder, or a file in a
    folder this script already writes into: a later command into that folder then finds it its own)."""
    if folder is None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        if (runs.read_outputs(parent) or {}).get("tool") == TOOL:
            runs.record_outputs(parent, TOOL, [os.path.basename(path)])
    else:
        runs.record_outputs(folder, TOOL, [os.path.basename(path)])
    write(path)


def main(argv=None):
    p = runs.arg_parser(Args)
    p.add_argument("command", choices=COMMANDS, help="caption | generate | reconstruct")
    args, ns = p.parse_args_into_dataclasses(argv)
    runs.need(args.preset_sampling in ("", *released.SAMPLING),
              f"--preset_sampling {args.preset_sampling!r}: known presets are {', '.join(released.SAMPLING)}")
    released.apply_sampling_preset(args, args.preset_sampling, released.flags_given(argv))
    exact = args.preset_sampling == "released"  # the demo's calls (tools/released.Sampling)
    runs.need(exact or args.repetition_penalty is None, "--repetition_penalty: only with --preset_sampling released "
                                                        "(this project's captioning samples without one)")
    if ns.command in ("caption", "reconstruct") and not args.image:
        raise runs.UsageError(f"{ns.command} needs --image")
    if ns.command == "generate" and not args.prompt:
        raise runs.UsageError("generate needs --prompt")
    runs.check_sampling(args)
    images.MAX_PIXELS = args.max_pixels
    if ns.command in ("caption", "reconstruct"):
        images.check_image(args.image)  # a FIFO, a non-image or an oversized file: refused before any model loads
    if args.init:
        runs.check_init(args.init)
    for flag in ("encoder", "decoder"):
        runs.check_local(flag, getattr(args, flag))
    folder, paths = check_out(ns.command, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    torch.manual_seed(args.seed)  # caption sampling
    m = runs.load_model(init=args.init or None, preset=args.preset, encoder=args.encoder or None,
                        decoder=args.decoder or None, dtype=dtype, device=device)
    demo = released.Sampling.from_args(args)
    size = demo.size(m)
    if exact:
        print(demo.describe(m), flush=True)

    if ns.command in ("caption", "reconstruct"):
        x = images.load_image(args.image, size)[None].to(device)  # (1, 3, S, S); an ImageError is one line (runs.cli)
        if exact:  # native size, Qwen's resize, the checkpoint's generation config
            torch.manual_seed(args.seed)  # where that config samples
            text = demo.caption(m, args.image)
        else:
            text = m.sample_captions(x, temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                                     top_k=args.top_k or 0, max_new_tokens=args.max_new_tokens,
                                     instruction=model.instruction_text(args.instruction),
                                     instruction_first=args.instruction_first).texts[0]
        print(text)
    draw = (lambda t: demo.draw(m, t)[None]) if exact else (
        lambda t: m.generate_images([t], steps=args.steps, cfg=args.cfg, size=size, seed=args.seed))  # (1, 3, S, S)
    if ns.command == "caption":
        write_out(folder, paths[0], lambda p: Path(p).write_text(text + "\n"))
        print(f"wrote {paths[0]}")
    elif ns.command == "generate":
        im = draw(args.prompt)[0]
        write_out(folder, paths[0], lambda p: images.save_png(p, im))
        print(f"wrote {paths[0]}")
    else:  # reconstruct: image -> caption -> image, and a side-by-side source | reconstruction
        im = draw(text)  # (1, 3, S, S)
        cap, rec, pair = paths
        write_out(folder, cap, lambda p: Path(p).write_text(text + "\n"))
        write_out(folder, rec, lambda p: images.save_png(p, im[0]))
        write_out(folder, pair, lambda p: images.save_grid(p, [x.float().cpu(), im.cpu()], labels=[text]))
        print(f"wrote {cap}, {rec}, {pair} (source | reconstruction)")


if __name__ == "__main__":
    runs.cli(main)
