"""Seconds per image of each sampler at equal steps: ours (MindSpore) against diffusers on the same weights.

    python -m tools.benchmark_sampling --model tiny --size 128 --steps 20 --torch-python PY

One image per sampler run, classifier-free guidance 7.5 (the UNet sees a batch of 2), timed from token
ids to uint8 image: text encoder, the sampler's UNet evaluations, VAE decode; the median of `--runs`
runs per sampler after a warm-up run on each side. Both sides start from the same initial latents and
token ids, and each sampler's images are compared (max abs uint8 difference).

The diffusers side runs in a child process of an interpreter with torch (`--torch-python` or
TORCH_PYTHON, see tools/torch_baseline.py), on as many threads as ours. A sampler's ratio is printed
only if both sides ran their matmul on the same number of threads and its images are within
IMAGE_TOLERANCE / 255 of each other.

Weights: `--weights` (a diffusers folder, e.g. models/tiny-sd), else random weights that the torch side
creates as a diffusers folder for the model's config (`tiny` = configs/tiny-inference.yaml, `sd15` =
configs/v1-inference.yaml). Without a baseline (no interpreter, or `--no-baseline`), only our side runs,
on random weights of our own.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np

from tools.benchmark_train_step import diffusers_configs, mindspore_matmul_peak, model_config, scratch_dir
from tools.torch_baseline import (add_arguments, machine_load, matmul_peak, run_child, set_torch_threads,
                                  thread_mismatch, torch_python)

SAMPLERS = ("ddim", "plms", "dpm_solver", "uni_pc")
PROMPT = "a photo of a purple star on a yellow background"
GUIDANCE = 7.5
# SD's scheduler_config.json (a PNDMScheduler that also says clip_sample false, as the SD 1.5 hub file does);
# both sides make every sampler from the folder's file, as pipelines do
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
# the fewest steps every sampler takes on any folder (PLMS with Runge-Kutta warm-up steps needs 4)
WARMUP_STEPS = 4
# "same work": uint8 images may differ by rounding at a .5 boundary, a wrong sampler by far more
IMAGE_TOLERANCE = 1


def diffusers_vae_config(cfg):
    v = cfg.vae
    channels = [v.ch * m for m in v.ch_mult]
    return dict(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                block_out_channels=channels, layers_per_block=v.num_res_blocks, norm_num_groups=v.norm_num_groups,
                down_block_types=["DownEncoderBlock2D"] * len(channels),
                up_block_types=["UpDecoderBlock2D"] * len(channels), sample_size=v.resolution,
                scaling_factor=cfg.scale_factor)


def median_run(sample, runs, *args, **kwargs):
    """(median seconds of `runs` calls of `sample(*args, **kwargs)`, the last call's image)."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        image = sample(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), image


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
    config_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "clip_sample": False}, f, indent=2)


def torch_side(spec_path, out_path):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler)
    from transformers import CLIPTextModel

    result = {"torch_threads": set_torch_threads(), "seconds": {}, "images": {}}
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
    # what a user gets from `X.from_config(pipe.scheduler.config)`: the folder's file, each class's defaults
    config = PNDMScheduler.load_config(folder, subfolder="scheduler")
    schedulers = {"ddim": DDIMScheduler.from_config(config), "plms": PNDMScheduler.from_config(config),
                  "dpm_solver": DPMSolverMultistepScheduler.from_config(config),
                  "uni_pc": UniPCMultistepScheduler.from_config(config)}
    cond_ids, uncond_ids = torch.from_numpy(inputs["cond"]).long(), torch.from_numpy(inputs["uncond"]).long()

    def generate(steps):
        with torch.no_grad():
            cond = text(cond_ids).last_hidden_state
            uncond = text(uncond_ids).last_hidden_state
            image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=torch.from_numpy(inputs["latents"]),
                         num_inference_steps=steps, guidance_scale=GUIDANCE, height=spec["size"], width=spec["size"],
                         output_type="np").images
        return (image * 255).round().astype(np.uint8)

    for name in spec["samplers"]:
        pipe.scheduler = schedulers[name]
        generate(WARMUP_STEPS)
        result["seconds"][name], image = median_run(generate, spec["runs"], spec["steps"])
        result["images"][name] = image.tolist()
    peak = matmul_peak(torch.mm, torch.from_numpy)
    result["matmul_peak"], result["threads"] = peak["flops"], peak["threads"]
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
        sd.sample([PROMPT], inputs["latents"], sampler=name, steps=WARMUP_STEPS, scale=GUIDANCE)
        seconds[name], images[name] = median_run(sd.sample, args.runs, [PROMPT], inputs["latents"], sampler=name,
                                                  steps=args.steps, scale=GUIDANCE)
    return seconds, images, sd.token_ids([PROMPT]), sd.token_ids([""])


def report(args, mine, theirs, load):
    """Print the table; a sampler's ratio only when the threads are equal and its images agree."""
    print(f"\n{load}\n{args.model} {args.size} px, {args.steps} steps, CFG {GUIDANCE}, 1 image, "
          f"median of {args.runs} runs, mode {args.mode}"
          f"{', weights ' + args.weights if args.weights else ', random weights'}")
    print(f"fp32 matmul peak 2048^3, GFLOP/s (threads): MindSpore {mine['matmul_peak'] / 1e9:.1f} ({mine['threads']})"
          + (f", PyTorch {theirs['matmul_peak'] / 1e9:.1f} ({theirs['threads']}; torch.get_num_threads() "
             f"{theirs['torch_threads']})" if theirs else ""))
    threads = theirs and thread_mismatch(mine, theirs)
    print("| sampler | ours s/image | diffusers s/image | ours / diffusers | image max abs diff (uint8) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.samplers:
        row = f"| {name} | {mine['seconds'][name]:.2f} |"
        if theirs:
            t = theirs["seconds"][name]
            diff = np.abs(mine["images"][name].astype(int) - np.array(theirs["images"][name])).max()
            ratio = "-" if threads or diff > IMAGE_TOLERANCE else f"{mine['seconds'][name] / t:.2f}"
            row += f" {t:.2f} | {ratio} | {diff} |"
        else:
            row += " - | - | - |"
        print(row)
    if threads:
        print(f"no ratio: {threads}")
    elif theirs:
        print(f"ratios: both sides on {mine['threads']} threads, for the samplers whose images differ by at most "
              f"{IMAGE_TOLERANCE}/255")


def main():
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per image")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per sampler and side (the median is shown)")
    parser.add_argument("--mode", type=int, choices=(0, 1), default=0, help="0 graph, 1 PyNative")
    parser.add_argument("--weights", help="a diffusers folder (default: random weights)")
    add_arguments(parser)
    parser.add_argument("--work", help="folder for the random-weight diffusers folder (default: a temporary one)")
    parser.add_argument("--torch-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--make-folder", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        return torch_side(*args.torch_side)
    if args.make_folder:
        return make_folder(json.load(open(args.make_folder)))
    load, python = machine_load(), torch_python(args)

    import mindspore as ms

    from ldm.pipeline import initial_latents

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    cfg = model_config(args.model)
    version = {"tiny": "tiny", "sd15": "1.5"}[args.model]
    latents = initial_latents(0, 1, args.size, args.size, cfg.unet.in_channels)
    # measured before the baseline runs: its thread count is the baseline's
    peak = mindspore_matmul_peak()
    mine = {"matmul_peak": peak["flops"], "threads": peak["threads"]}
    with scratch_dir(args.work) as work:
        folder = args.weights or (os.path.join(work, "model") if python else None)
        theirs = None
        if python and not args.weights:
            unet, text = diffusers_configs(cfg)
            spec = dict(folder=folder, unet=unet, text=text, vae=diffusers_vae_config(cfg))
            with open(os.path.join(work, "make.json"), "w") as f:
                json.dump(spec, f)
            run_child(python, ["-m", "tools.benchmark_sampling", "--make-folder", os.path.join(work, "make.json")],
                      mine["threads"])
        # token ids come from our tokenizer: our side runs first
        mine["seconds"], mine["images"], cond, uncond = ours(args, folder, version, dict(latents=latents))
        if python:
            inputs_path = os.path.join(work, "inputs.npz")
            np.savez(inputs_path, latents=latents, cond=cond, uncond=uncond)
            spec = dict(folder=folder, inputs=inputs_path, size=args.size, steps=args.steps, runs=args.runs,
                        samplers=args.samplers)
            spec_path, out_path = os.path.join(work, "spec.json"), os.path.join(work, "torch_result.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            run_child(python, ["-m", "tools.benchmark_sampling", "--torch-side", spec_path, out_path], mine["threads"])
            with open(out_path) as f:
                theirs = json.load(f)
    report(args, mine, theirs, load)


if __name__ == "__main__":
    main()
