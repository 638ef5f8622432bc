"""Write tests/fixtures/pipelines.npz: diffusers' StableDiffusionPipeline images for tests/test_text_to_image.py.

Run with an interpreter that has torch and diffusers (not a project dependency):
    python -m tools.dev.make_pipeline_fixtures

For each tiny reference model (`tiny-sd1`: eps, `tiny-sd2-v`: v-prediction) and each sampler, the pipeline
is fed the project's documented initial latents (`ldm.pipeline.initial_latents`: iteration j of seed s
draws `numpy.random.default_rng(s + j).standard_normal((n, 4, H // f, W // f), dtype=float32)`, f being
the VAE's downsampling factor: 2 for these tiny models, 8 for SD), a prompt, a negative prompt and a
guidance scale; the decoded images (uint8, rounded as diffusers' `numpy_to_pil`) and the final latents are
stored. One more case samples with a 2-vector Textual Inversion embedding that diffusers'
`load_textual_inversion` reads from `tests/fixtures/tiny-embeddings/learned_embeds.bin`; the same vectors
go to an A1111 `.pt` there, so the tests can load both torch formats without torch.

Also tests/fixtures/clip-skip.npz, for tests/test_clip_skip.py: `encode_prompt`'s prompt embeddings with
diffusers' `clip_skip` None and 1 (the project's 1 and 2, A1111's numbering) for a few prompts, the
embedding's prompt among them on tiny-sd1.

Each sampler's scheduler is made as users make one for a model folder, `Scheduler.from_pretrained(folder,
subfolder="scheduler")`: `from_config` of the folder's scheduler_config.json, whose keys win over each class's
defaults. The tiny folders' file is a DDIMScheduler's saved by diffusers: it spells out "leading" spacing with
steps_offset 1, which DPM-Solver++ and UniPC follow too, and lacks skip_prk_steps, so PLMS (PNDMScheduler)
takes F-PNDM's Runge-Kutta warm-up, which needs 4 steps or more.
The tokenizer is ldm.tokenizer's, built from the shipped BPE (the tiny folders hold only pad settings).
"""

import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm.tokenizer import load_tokenizer
from tools import ROOT
from tools.dev.make_sampler_fixtures import SCHEDULERS

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT_PATH = os.path.join(FIXTURES, "pipelines.npz")
CLIP_SKIP_PATH = os.path.join(FIXTURES, "clip-skip.npz")
EMBEDDINGS = os.path.join(FIXTURES, "tiny-embeddings")

# model folder -> guidance scale (text_to_image's defaults for 1.x and 2.x)
MODELS = {"tiny-sd1": 7.5, "tiny-sd2-v": 9.0}
# the CLI test runs text_to_image with these (default sampler dpm_solver, default seed) and compares
# its PNGs with the tiny-sd1 dpm_solver case
PROMPT = "a red circle on a blue background"
NEGATIVE_PROMPT = "blurry, text"
STEPS = 4  # the fewest the tiny folders' PLMS (with Runge-Kutta steps) takes
SEED = 42
N_SAMPLES = 2
# 32 px, not 64: these VAEs downsample by 2 only, and 64 px images with their 32x32 latents would make
# a ~500 KB fixture
SIZE = 32
TI_TOKEN = "<tiny-toy>"
TI_PROMPT = f"a {TI_TOKEN} on a blue background"
TI_SEED = 7
TI_SAMPLER = "dpm_solver"  # text_to_image's default: the CLI test samples this case


def load_pipeline(folder):
    folder = os.path.join(FIXTURES, folder)
    with open(os.path.join(folder, "tokenizer", "special_tokens_map.json")) as f:
        pad = json.load(f)["pad_token"]
    unet_dir = os.path.join(folder, "unet")
    # tiny-sd2 ships its UNet only under the fp16 variant file name
    variant = "fp16" if any(".fp16." in name for name in os.listdir(unet_dir)) else None
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=torch.float32),
        tokenizer=load_tokenizer(pad_token=pad),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=variant,
                                                  torch_dtype=torch.float32),
        # replaced per case; the constructor needs one
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def set_scheduler(pipe, sampler, folder):
    scheduler_class = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = scheduler_class.from_pretrained(os.path.join(FIXTURES, folder), subfolder="scheduler")


def run(pipe, prompt, seed, scale):
    # ldm.pipeline.initial_latents, restated because importing ldm.pipeline needs MindSpore
    f = pipe.vae_scale_factor
    latents = np.random.default_rng(seed).standard_normal((N_SAMPLES, 4, SIZE // f, SIZE // f), dtype=np.float32)
    final = {}

    def keep_latents(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return {}

    images = pipe([prompt] * N_SAMPLES, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=scale,
                  negative_prompt=[NEGATIVE_PROMPT] * N_SAMPLES, latents=torch.from_numpy(latents),
                  output_type="np", callback_on_step_end=keep_latents).images
    return (images * 255).round().astype(np.uint8), final["latents"]


def write_embeddings(vectors):
    """The TI vectors as diffusers' learned_embeds.bin and A1111's .pt (named after its file)."""
    os.makedirs(EMBEDDINGS, exist_ok=True)
    tensor = torch.from_numpy(vectors)
    torch.save({TI_TOKEN: tensor}, os.path.join(EMBEDDINGS, "learned_embeds.bin"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensor.clone().requires_grad_(True)},
                "name": "tiny-toy", "step": 10}, os.path.join(EMBEDDINGS, "tiny-toy.pt"))
    return os.path.join(EMBEDDINGS, "learned_embeds.bin")


@torch.no_grad()
def main():
    arrays = {"prompt": np.array(PROMPT), "negative_prompt": np.array(NEGATIVE_PROMPT), "steps": np.int64(STEPS),
              "seed": np.int64(SEED), "ti_prompt": np.array(TI_PROMPT), "ti_seed": np.int64(TI_SEED),
              "ti_sampler": np.array(TI_SAMPLER), "diffusers_version": np.array(diffusers.__version__)}
    for model, scale in MODELS.items():
        pipe = load_pipeline(model)
        arrays[f"{model}.scale"] = np.float64(scale)
        for sampler in SCHEDULERS:
            set_scheduler(pipe, sampler, model)
            images, latents = run(pipe, PROMPT, SEED, scale)
            key = f"{model}.{sampler}"
            arrays.update({f"{key}.images": images, f"{key}.latents": latents})
            print(f"{key:22s} image mean {images.mean():6.1f} std {images.std():5.1f}")
        if model == "tiny-sd1":
            vectors = np.random.default_rng(5).standard_normal((2, pipe.text_encoder.config.hidden_size),
                                                               dtype=np.float32)
            pipe.load_textual_inversion(write_embeddings(vectors), tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder)
            # diffusers must have split the placeholder into its two new ids, whose rows hold the vectors
            ids = pipe.tokenizer(pipe.maybe_convert_prompt(TI_PROMPT, pipe.tokenizer))["input_ids"]
            assert ids[2:4] == [49408, 49409], ids
            table = pipe.text_encoder.get_input_embeddings().weight
            assert np.array_equal(table[49408:].numpy(), vectors)
            set_scheduler(pipe, TI_SAMPLER, model)
            images, latents = run(pipe, TI_PROMPT, TI_SEED, scale)
            arrays.update({"ti.vectors": vectors, "ti.images": images, "ti.latents": latents})
    np.savez_compressed(OUT_PATH, **arrays)
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")
    write_clip_skip()


@torch.no_grad()
def write_clip_skip():
    """`{model}.clip_skip_{k}`: encode_prompt's embeddings with our clip_skip k (diffusers' k - 1)."""
    arrays = {}
    for model in ("tiny-sd1", "tiny-sd2"):
        pipe = load_pipeline(model)
        if not hasattr(pipe.text_encoder, "text_model"):
            # diffusers' clip_skip path reads `text_encoder.text_model.final_layer_norm`, a level transformers
            # >= 5.6 removed (diffusers issue #14124); point it at the model, which now holds that norm
            object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
        prompts = [PROMPT, ""]
        if model == "tiny-sd1":
            pipe.load_textual_inversion(os.path.join(EMBEDDINGS, "learned_embeds.bin"), tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder)
            prompts.append(TI_PROMPT)
        arrays[f"{model}.prompts"] = np.array(prompts)
        for k in (1, 2):
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=k - 1 or None)
            arrays[f"{model}.clip_skip_{k}"] = embeds.numpy()
    np.savez_compressed(CLIP_SKIP_PATH, **arrays)
    print(f"wrote {CLIP_SKIP_PATH} ({os.path.getsize(CLIP_SKIP_PATH)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
