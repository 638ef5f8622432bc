"""Sample images from Stable Diffusion, optionally with learned Textual Inversion embeddings.

    python text_to_image.py --version 1.5 --prompt "a <cat-toy> backpack" --ti_ckpt_path X_ti.ckpt

`--ti_ckpt_path` takes ours/mindone `_ti.ckpt`, diffusers `learned_embeds.safetensors`/`.bin`,
A1111/kohya `.pt`/`.safetensors` files, A1111 PNG embedding cards and hub concept repo ids
(sd-concepts-library/cat-toy), several at once. Seeds are framework independent: iteration j
draws its batch of initial latents from `numpy.random.default_rng(seed + j)` (see ldm/pipeline.py).
Images go to `{output_path}/samples/NNNNN.png` (numbering continues after existing files, nothing is
overwritten), with the generation parameters in a `parameters` PNG text chunk (A1111 convention).
"""

import argparse
import glob
import logging
import os
import sys

import mindspore as ms
import numpy as np
from PIL import Image, PngImagePlugin

from ldm.checkpoint_io import atomic_write
from ldm.embeddings import check_fits, load_embedding
from ldm.errors import USER_ERRORS, UserInputError
from ldm.pipeline import StableDiffusion, image_grid, initial_latents
from ldm.pretrained import VERSIONS, get_version

logger = logging.getLogger("text_to_image")

SAMPLER_FLAGS = {"ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM++ 2M", "uni_pc": "UniPC"}
# SDXL's size conditioning, diffusers' names: (default, metavar)
SIZE_FLAGS = {"original_size": ("the image size", ("H", "W")), "crops_coords_top_left": ("0 0", ("TOP", "LEFT")),
              "target_size": ("the image size", ("H", "W"))}


def _version_scales():
    """'7.5 for 1.5, tiny; 9.0 for 2.0, ...': each default guidance scale and the versions that have it."""
    scales = {}
    for v in VERSIONS.values():
        scales.setdefault(v.guidance_scale, []).append(v.name)
    return "; ".join(f"{scale} for {', '.join(names)}" for scale, names in scales.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", "-v", default="1.5", choices=list(VERSIONS), help="Stable Diffusion version")
    p.add_argument("--prompt", default=None, help="the prompt (or use --data_path)")
    p.add_argument("--negative_prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--data_path", default=None, help="text file of prompts, one per line")
    p.add_argument("--config", default=None, help="model YAML; unset = the version's config")
    p.add_argument("--ckpt_path", default=None, help="weights: a single-file checkpoint or a diffusers folder")
    p.add_argument("--extract_ema", action="store_true",
                   help="a single file holding EMA and non-EMA UNet weights (v1-5-pruned.ckpt): use the EMA ones "
                        "(default: the non-EMA ones, as diffusers and A1111 do)")
    p.add_argument("--ti_ckpt_path", action="append", default=[],
                   help="a Textual Inversion embedding: a file or a hub concept repo id (repeatable)")
    p.add_argument("--ti_token", action="append", default=[],
                   help="token name for the matching --ti_ckpt_path (default: the file's own, else its stem)")
    p.add_argument("--output_path", default="output", help="folder for samples/ and grids")
    p.add_argument("--n_samples", type=int, default=4, help="images per prompt per iteration (the batch)")
    p.add_argument("--n_iter", type=int, default=1, help="iterations per prompt")
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the version's)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (default: the version's)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"guidance scale (default: the version's, {_version_scales()})")
    for flag, (default, metavar) in SIZE_FLAGS.items():
        p.add_argument(f"--{flag}", type=int, nargs=2, default=None, metavar=metavar,
                       help=f"SDXL's {flag} conditioning (default: {default})")
    p.add_argument("--sampling_steps", type=int, default=20, help="denoising steps per image")
    group = p.add_mutually_exclusive_group()
    for flag, label in SAMPLER_FLAGS.items():
        group.add_argument(f"--{flag}", action="store_true", help=f"use the {label} sampler")
    p.add_argument("--ddim_eta", type=float, default=0.0,
                   help="DDIM's eta: 0 deterministic, 1 as noisy as DDPM (DDIM only)")
    p.add_argument("--seed", type=int, default=42,
                   help="initial noise seed: iteration j draws its batch of latents from seed + j (written in the PNG)")
    p.add_argument("--skip_grid", action="store_true", help="do not save the grid")
    p.add_argument("--skip_save", action="store_true", help="do not save the individual samples")
    p.add_argument("--mode", type=int, default=0, choices=(0, 1), help="0 graph mode, 1 PyNative")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="compute dtype of the models (on CPU fp32 is the fast one)")
    p.add_argument("--clip_skip", type=int, default=1,
                   help="text encoder layer to read, counted from the end as A1111's 'Clip skip': "
                        "1 = the last (no skip), 2 = the penultimate, ...")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.data_path is None):
        p.error("give exactly one of --prompt or --data_path")
    if len(args.ti_token) > len(args.ti_ckpt_path):
        p.error("--ti_token needs a matching --ti_ckpt_path")
    for name in ("n_samples", "n_iter", "sampling_steps", "clip_skip"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.data_path):
        raise FileNotFoundError(f"--data_path {args.data_path} does not exist; pass a text file with one prompt per line")
    with open(args.data_path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserInputError(f"--data_path {args.data_path} holds no prompts; write one prompt per line")
    return prompts


def next_index(folder, prefix="", digits=5):
    """First free number for `{prefix}NNNNN.png` in `folder`, so earlier images are never overwritten."""
    files = glob.glob(os.path.join(folder, prefix + "[0-9]" * digits + ".png"))
    return max((int(os.path.basename(f)[len(prefix):-4]) for f in files), default=-1) + 1


def save_png(path, image, parameters):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return generate(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def size_conditioning(args, sd, height, width):
    """SDXL's size ids from the size flags (None for SD 1.x/2.x, which refuse the flags)."""
    given = [f"--{flag}" for flag in SIZE_FLAGS if getattr(args, flag) is not None]
    if not sd.is_xl:
        if given:
            raise UserInputError(f"{', '.join(given)}: size conditioning is SDXL's; drop it or use --version xl")
        return None
    return sd.size_ids(args.n_samples, height, width, *(getattr(args, flag) for flag in SIZE_FLAGS))


def generate(args):
    ms.set_context(mode=args.mode)
    prompts = read_prompts(args)
    version = get_version(args.version)
    height, width = args.H or version.image_size, args.W or version.image_size
    scale = args.scale if args.scale is not None else version.guidance_scale
    sampler = next((flag for flag in SAMPLER_FLAGS if getattr(args, flag)), "dpm_solver")

    sd = StableDiffusion.load(args.version, args.ckpt_path, args.config, args.dtype, clip_skip=args.clip_skip,
                              use_ema=args.extract_ema)
    f = sd.latent_factor
    if height % f or width % f:
        raise UserInputError(f"--H/--W must be multiples of {f} (this VAE downsamples by {f}), got {height}x{width}")
    size_ids = size_conditioning(args, sd, height, width)
    used = []
    for i, path in enumerate(args.ti_ckpt_path):
        emb = load_embedding(path, args.ti_token[i] if i < len(args.ti_token) else None)
        check_fits(emb, sd.embedding_dims, path)
        sd.add_placeholder(emb.token, emb.all_vectors)
        used.append(f"{emb.token} ({emb.num_vectors} vectors, {os.path.basename(path)})")
        logger.info("loaded embedding %s: %d vectors from %s (%s)", emb.token, emb.num_vectors, path, emb.source_format)

    sample_dir = os.path.join(args.output_path, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    index = next_index(sample_dir)
    all_images = []
    for prompt in prompts:
        for j in range(args.n_iter):
            latents = initial_latents(args.seed + j, args.n_samples, height, width, factor=f)
            images = sd.sample([prompt] * args.n_samples, latents, sampler=sampler, steps=args.sampling_steps,
                               scale=scale, negative_prompt=args.negative_prompt, eta=args.ddim_eta,
                               rng=np.random.default_rng([args.seed + j, 1]) if args.ddim_eta > 0 else None,
                               size_ids=size_ids)
            all_images.extend(images)
            if args.skip_save:
                continue
            for b, image in enumerate(images):
                parameters = (f"{prompt}\nNegative prompt: {args.negative_prompt}\n"
                              f"Steps: {args.sampling_steps}, Sampler: {SAMPLER_FLAGS[sampler]}, CFG scale: {scale}, "
                              f"Seed: {args.seed + j}, Batch pos: {b}, Size: {width}x{height}, Model: {sd.name}, "
                              f"Version: {args.version}"
                              + (f", Clip skip: {args.clip_skip}" if args.clip_skip > 1 else "")
                              + (f", Embeddings: {'; '.join(used)}" if used else ""))
                path = os.path.join(sample_dir, f"{index:05d}.png")
                save_png(path, image, parameters)
                index += 1
    if not args.skip_grid:
        grid_path = os.path.join(args.output_path, f"grid-{next_index(args.output_path, 'grid-', 4):04d}.png")
        with atomic_write(grid_path) as tmp:
            Image.fromarray(image_grid(all_images, cols=args.n_samples)).save(tmp, format="PNG")
        logger.info("grid: %s", grid_path)
    logger.info("%d images in %s", len(all_images), sample_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
