"""Seconds per image of each sampler at equal steps: ours (MindSpore) against diffusers on the same weights.

    python tools/benchmark_sampling.py --model tiny --size 128 --steps 20

One image per sampler run, classifier-free guidance 7.5 (the UNet sees a batch of 2), timed from token
ids to uint8 image: text encoder, the sampler's UNet evaluations, VAE decode. Both sides start from the
same initial latents and token ids, and each sampler's images are compared (max abs uint8 difference),
so the two sides are checked to do the same work.

Weights: `--weights` (a diffusers folder, e.g. models/tiny-sd), else random weights that the torch side
creates as a diffusers folder for the model's config (`tiny` = configs/tiny-inference.yaml, `sd15` =
configs/v1-inference.yaml). Without torch/diffusers in `--torch-python` (or with `--no-baseline`), only
our side runs, on random weights of our own.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_train_step import (TORCH_PYTHON, diffusers_configs, model_config, scratch_dir,  # noqa: E402
                                  torch_available)

SAMPLERS = ("ddim", "plms", "dpm_solver", "uni_pc")
PROMPT = "a photo of a purple star on a yellow background"
GUIDANCE = 7.5
# SD's scheduler_config.json (a PNDMScheduler); the others are made from its config as pipelines do
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)


def diffusers_vae_config(cfg):
    v = cfg.vae
    channels = [v.ch * m for m in v.ch_mult]
    return dict(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                block_out_channels=channels, layers_per_block=v.num_res_blocks, norm_num_groups=v.norm_num_groups,
                down_block_types=["DownEncoderBlock2D"] * len(channels),
                up_block_types=["UpDecoderBlock2D"] * len(channels), sample_size=v.resolution,
                scaling_factor=cfg.scale_factor)


# ---------------------------------------------------------------------------------------------- torch side

def make_folder(spec):
    """A diffusers folder with random weights of the spec's architecture."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    folder = spec["folder"]
    UNet2DConditionModel(**spec["unet"]).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(**spec["vae"]).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**spec["text"])).save_pretrained(os.path.join(folder, "text_encoder"))
    PNDMScheduler(**SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))


def torch_side(spec_path, out_path):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler)
    from transformers import CLIPTextModel

    spec = json.load(open(spec_path))
    folder = spec["folder"]
    inputs = np.load(spec["inputs"])
    fp32 = dict(torch_dtype=torch.float32)   # folders may hold fp16 weights
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **fp32).eval()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), **fp32), text_encoder=text, tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), **fp32), scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = PNDMScheduler(**SCHEDULER)
    # SD's released config says clip_sample false; PNDM has no such setting, DDIM defaults it to true
    schedulers = {"ddim": DDIMScheduler.from_config(base.config, clip_sample=False),
                  "plms": PNDMScheduler.from_config(base.config),
                  "dpm_solver": DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++"),
                  "uni_pc": UniPCMultistepScheduler.from_config(base.config)}
    cond_ids, uncond_ids = torch.from_numpy(inputs["cond"]).long(), torch.from_numpy(inputs["uncond"]).long()

    def generate(steps):
        with torch.no_grad():
            cond = text(cond_ids).last_hidden_state
            uncond = text(uncond_ids).last_hidden_state
            image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=torch.from_numpy(inputs["latents"]),
                         num_inference_steps=steps, guidance_scale=GUIDANCE, height=spec["size"], width=spec["size"],
                         output_type="np").images
        return (image * 255).round().astype(np.uint8)

    result = {"seconds": {}, "images": {}}
    for name in spec["samplers"]:
        pipe.scheduler = schedulers[name]
        generate(2)
        start = time.perf_counter()
        image = generate(spec["steps"])
        result["seconds"][name] = time.perf_counter() - start
        result["images"][name] = image.tolist()
    with open(out_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------- our side

def ours(args, folder, version, inputs):
    from ldm.models import build_models
    from ldm.pipeline import StableDiffusion
    from ldm.tokenizer import load_tokenizer

    if folder:
        sd = StableDiffusion.load(version, folder)
    else:
        cfg = model_config(args.model)
        sd = StableDiffusion(cfg, *build_models(cfg), load_tokenizer(None, pad_token=cfg.text_encoder.pad_token))
    seconds, images = {}, {}
    for name in args.samplers:
        sd.sample([PROMPT], inputs["latents"], sampler=name, steps=2, scale=GUIDANCE)
        start = time.perf_counter()
        images[name] = sd.sample([PROMPT], inputs["latents"], sampler=name, steps=args.steps, scale=GUIDANCE)
        seconds[name] = time.perf_counter() - start
    return seconds, images, sd.token_ids([PROMPT]), sd.token_ids([""])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--mode", type=int, choices=(0, 1), default=0, help="0 graph, 1 PyNative")
    parser.add_argument("--weights", help="a diffusers folder (default: random weights)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--torch-python", default=TORCH_PYTHON)
    parser.add_argument("--work", help="folder for the random-weight diffusers folder (default: a temporary one)")
    parser.add_argument("--torch-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--make-folder", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        return torch_side(*args.torch_side)
    if args.make_folder:
        return make_folder(json.load(open(args.make_folder)))

    import mindspore as ms

    from ldm.pipeline import initial_latents

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    cfg = model_config(args.model)
    version = {"tiny": "tiny", "sd15": "1.5"}[args.model]
    baseline = not args.no_baseline and torch_available(args.torch_python)
    latents = initial_latents(0, 1, args.size, args.size, cfg.unet.in_channels)
    with scratch_dir(args.work) as work:
        folder = args.weights or (os.path.join(work, "model") if baseline else None)
        theirs = None
        if baseline and not args.weights:
            unet, text = diffusers_configs(cfg)
            spec = dict(folder=folder, unet=unet, text=text, vae=diffusers_vae_config(cfg))
            with open(os.path.join(work, "make.json"), "w") as f:
                json.dump(spec, f)
            subprocess.run([args.torch_python, os.path.abspath(__file__), "--make-folder",
                            os.path.join(work, "make.json")], check=True)
        # token ids come from our tokenizer: our side runs first
        seconds, images, cond, uncond = ours(args, folder, version, dict(latents=latents))
        if baseline:
            inputs_path = os.path.join(work, "inputs.npz")
            np.savez(inputs_path, latents=latents, cond=cond, uncond=uncond)
            spec = dict(folder=folder, inputs=inputs_path, size=args.size, steps=args.steps,
                        samplers=args.samplers)
            spec_path, out_path = os.path.join(work, "spec.json"), os.path.join(work, "torch_result.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side", spec_path, out_path],
                           check=True)
            with open(out_path) as f:
                theirs = json.load(f)

    print(f"\n{args.model} {args.size} px, {args.steps} steps, CFG {GUIDANCE}, 1 image, mode {args.mode}"
          f"{', weights ' + args.weights if args.weights else ', random weights'}")
    print("| sampler | ours s/image | diffusers s/image | ours / diffusers | image max abs diff (uint8) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.samplers:
        row = f"| {name} | {seconds[name]:.2f} |"
        if theirs:
            t = theirs["seconds"][name]
            diff = np.abs(images[name].astype(int) - np.array(theirs["images"][name])).max()
            row += f" {t:.2f} | {seconds[name] / t:.2f} | {diff} |"
        else:
            row += " - | - | - |"
        print(row)


if __name__ == "__main__":
    main()
