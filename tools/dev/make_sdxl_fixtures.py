"""Build the tiny SDXL reference model, its outputs, and the full-size SDXL key lists under tests/fixtures/.

Run with an interpreter that has torch and diffusers (the dev venv of requirements-dev.txt):

    python -m tools.dev.make_sdxl_fixtures

Tiny SDXL (random weights, stored as fp16; every reference is computed in fp32 from the fp16-rounded
weights, as tools/dev/make_reference_fixtures.py does for SD 1.x/2.x): a diffusers UNet2DConditionModel
with SDXL's features (a first level without attention, one transformer depth per level, linear
projections, constant head width, the "text_time" added conditioning), an AutoencoderKL that downsamples
by 8 as SD's, and transformers' CLIPTextModel (quick_gelu, like CLIP ViT-L) and
CLIPTextModelWithProjection (gelu, like OpenCLIP bigG) with the real 49408-token vocabulary and small
widths. Both text configs say eos_token_id 49407, so transformers pools at each row's first
<|endoftext|>; SDXL's released configs say 2, with which transformers pools at the argmax of the ids,
i.e. at a placeholder token (id > 49407) when the prompt has one.

Written:
- `tiny-sdxl/`: a StableDiffusionXLPipeline folder (unet, vae, text_encoder, text_encoder_2, a DDIM
  scheduler with SDXL's scheduler settings, model_index.json with force_zeros_for_empty_prompt as SDXL
  base); `tokenizer/` and `tokenizer_2/` hold only the pad settings, the vocabulary ships in ldm/;
- `tiny-sdxl.safetensors`: the sgm single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
  `conditioner.embedders.0.transformer.*` with position_ids, `conditioner.embedders.1.model.*` with
  packed q/k/v, `text_projection` [width, projection] and logit_scale), made with ldm.convert's maps and
  checked here by converting it back with diffusers' own single-file functions;
- `tiny-sdxl-cat-toy.safetensors`: a 2-vector placeholder `<cat-toy>` as kohya/A1111 SDXL embeddings,
  `{"clip_l": [2, 6], "clip_g": [2, 8]}`, random normal vectors. diffusers loads it as its docs show:
  `load_textual_inversion(sd["clip_l"], token="<cat-toy>", text_encoder=text_encoder, tokenizer=tokenizer)`
  and the same with clip_g, text_encoder_2, tokenizer_2: each tokenizer gets the tokens `<cat-toy>`,
  `<cat-toy>_1` (ids 49408, 49409), each encoder's token table is resized to 49410 rows holding the vectors,
  and the pipeline expands `<cat-toy>` in a prompt to `<cat-toy> <cat-toy>_1` (maybe_convert_prompt);
- `tiny-sdxl-reference.npz` (see `references` and `sample` for the keys): token ids of a few prompts for
  both tokenizers, each encoder's penultimate hidden state, their concatenation (the context) and bigG's
  pooled output; a UNet output with the added conditioning; the VAE posterior and decode; two whole
  StableDiffusionXLPipeline DDIM runs with numpy-seeded latents, one plain and one with `<cat-toy>`,
  with every setting needed to reproduce them; and for the placeholder `ti.token`, `ti.token_ids`,
  `ti.vectors_l` [2, 6], `ti.vectors_g` [2, 8], and the encoders' keys of `references` for the
  `<cat-toy>` prompt (`ti.input_ids`, `ti.text_hidden`, `ti.input_ids_2`, `ti.text_hidden_2`,
  `ti.pooled`, `ti.context`);
- `checkpoint-keys/sdxl_original.txt.gz`, `sdxl_diffusers.txt.gz`, `sdxl_diffusers_configs.json`: the
  names and shapes of SDXL base 1.0's single file and diffusers folder, from diffusers/transformers models
  with the release's configs built on the meta device (no memory), the single file derived with the same
  maps and checked with diffusers' single-file functions like the tiny one; and the folder's config files.
"""
import gzip
import json
import os
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.convert import unet_from_diffusers, vae_from_diffusers
from ldm.tokenizer import load_tokenizer
from tools import ROOT
from tools.dev.make_reference_fixtures import PROMPTS, randomize, save_half, text_state, to_openclip

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
KEY_LISTS = os.path.join(FIXTURES, "checkpoint-keys")
FOLDER = os.path.join(FIXTURES, "tiny-sdxl")
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}

# SDXL base 1.0 as the config files of stabilityai/stable-diffusion-xl-base-1.0 describe it
XL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
XL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_XL_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
XL_CLIP_L = dict(_XL_TOKENS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
XL_BIGG = dict(_XL_TOKENS, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               hidden_act="gelu", projection_dim=1280)
# scheduler/scheduler_config.json (an EulerDiscreteScheduler's); the tiny folder's DDIMScheduler takes the
# settings DDIM has
XL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
                    set_alpha_to_one=False, sample_max_value=1.0, interpolation_type="linear",
                    skip_prk_steps=True, use_karras_sigmas=False)

# Tiny: 3 UNet levels as SDXL's (the first without attention); depths (1, 2, 1) tell a per-level depth
# from one depth for all and the middle block's (the last level's, 1) from the deepest (2); heads 4 wide.
WIDTH, WIDTH_2, PROJECTION_2, SIZE_DIM = 6, 8, 10, 8   # the two 49408-row token tables dominate the size
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
    down_block_types=XL_UNET["down_block_types"], up_block_types=XL_UNET["up_block_types"],
    attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 1), cross_attention_dim=WIDTH + WIDTH_2,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SIZE_DIM,
    projection_class_embeddings_input_dim=PROJECTION_2 + 6 * SIZE_DIM, norm_num_groups=4)
TINY_VAE = dict(XL_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
_TINY_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
TINY_CLIP_L = dict(_TINY_TOKENS, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=3,
                   num_attention_heads=2, hidden_act="quick_gelu", projection_dim=WIDTH, pad_token_id=49407)
TINY_BIGG = dict(_TINY_TOKENS, hidden_size=WIDTH_2, intermediate_size=4 * WIDTH_2, num_hidden_layers=3,
                 num_attention_heads=2, hidden_act="gelu", projection_dim=PROJECTION_2, pad_token_id=0)

# the placeholder and the two sampling runs (StableDiffusionXLPipeline with the tiny folder's DDIM)
TI_TOKEN, TI_VECTORS, TI_SEED = "<cat-toy>", 2, 3
RUNS = {
    # negative_prompt None: with force_zeros_for_empty_prompt the negative context and pooled are zeros
    "plain": dict(prompt=["a photo of a cat", "a watercolor painting of a lighthouse"], negative_prompt=None,
                  height=64, width=64, original_size=(64, 64), crops_coords_top_left=(0, 0), target_size=(64, 64),
                  num_inference_steps=5, guidance_scale=5.0, eta=0.0, seed=42),
    "ti": dict(prompt=[f"a photo of a {TI_TOKEN} on a table"], negative_prompt=["blurry, low quality"],
               height=64, width=96, original_size=(128, 192), crops_coords_top_left=(16, 8), target_size=(64, 96),
               num_inference_steps=5, guidance_scale=5.0, eta=0.0, seed=7),
}

REAL_FILE_NOTE = (
    "# real-file evidence: 2515 keys = 1680 unet + 248 vae + 197 CLIP ViT-L (with position_ids) + 390 OpenCLIP bigG "
    "(32 blocks, text_projection, logit_scale), no schedule buffers and no denoiser.sigmas: this list is exactly, "
    "names and shapes, arenasys/stable-diffusion-webui-model-toolkit's SD-XL components (UNET-XL-SD, VAE-v1-SD, "
    "CLIP-XL-SD, CLIP-XL-AUX-SD = CLIP-v1-SD under conditioner.embedders.0.transformer.text_model.) @e19dd46e, and a "
    "user's check of the downloaded 6.5 GB sd_xl_base_1.0.safetensors reports '2515 keys'")


def tiny_models(seed=4):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return (randomize(UNet2DConditionModel(**TINY_UNET), gen), randomize(AutoencoderKL(**TINY_VAE), gen),
            randomize(CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L)), gen),
            randomize(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_BIGG)), gen))


def meta_models():
    """SDXL base 1.0's four models without parameter data."""
    with torch.device("meta"):
        return (UNet2DConditionModel(**XL_UNET), AutoencoderKL(**XL_VAE), CLIPTextModel(CLIPTextConfig(**XL_CLIP_L)),
                CLIPTextModelWithProjection(CLIPTextConfig(**XL_BIGG)))


def bigg_openclip(text_2):
    """bigG's weights under OpenCLIP names: to_openclip packs q/k/v; of the SD2 extras it adds, SDXL files
    have logit_scale only (no extra block), and their text_projection is the model's, applied as x @ P."""
    sd = {k: v.detach().half() for k, v in text_2.state_dict().items()}
    projection = sd.pop("text_projection.weight")
    out = to_openclip(sd, text_2.config.hidden_size, torch.Generator())
    extra = f"transformer.resblocks.{text_2.config.num_hidden_layers}."
    out = {k: v for k, v in out.items() if not k.startswith(extra)}
    out["text_projection"] = projection.t()
    return out


def original_layout(unet, vae, text, text_2):
    """The sgm single-file dict (fp16 torch tensors; HF's position_ids int64, as sd_xl_base_1.0 has them)."""
    half = lambda sd: {k: v.detach().half() for k, v in sd.items()}  # noqa: E731
    sd = {"model.diffusion_model." + k: v for k, v in half(unet_from_diffusers(unet.state_dict())).items()}
    sd.update({"first_stage_model." + k: v for k, v in half(vae_from_diffusers(vae.state_dict())).items()})
    sd.update({CLIP_L_PREFIX + k: v for k, v in half(text_state(text)).items()})
    sd[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update({BIGG_PREFIX + k: v for k, v in bigg_openclip(text_2).items()})
    return sd


def check_against_diffusers(sd, unet, vae, text, text_2):
    """Convert the single file back with diffusers' functions: it must give the models' names and shapes,
    and (unless the models are on the meta device) their values exactly."""
    def same(converted, expected, what, allowed_extra=()):
        extra = set(converted) - set(expected) - set(allowed_extra)
        assert set(expected) <= set(converted) and not extra, (what, set(expected) - set(converted), extra)
        for k, v in expected.items():
            assert tuple(converted[k].shape) == tuple(v.shape), (what, k, converted[k].shape, v.shape)
            assert v.is_meta or torch.equal(converted[k].float(), v.float()), (what, k)

    same(sfu.convert_ldm_unet_checkpoint(sd, dict(unet.config)), unet.state_dict(), "unet")
    same(sfu.convert_ldm_vae_checkpoint(sd, dict(vae.config)), vae.state_dict(), "vae")
    same(sfu.convert_ldm_clip_checkpoint(sd), text_state(text), "text_encoder",
         allowed_extra={"text_model.embeddings.position_ids"})
    same(sfu.convert_open_clip_checkpoint(text_2, sd, prefix=BIGG_PREFIX), text_2.state_dict(), "text_encoder_2")


def save_text_encoder(model, folder, state):
    """A transformers text encoder as hub folders have it: config.json and fp16 safetensors under the
    `text_model.` names (transformers 5 drops that level from CLIPTextModel; released files have it)."""
    os.makedirs(folder)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    save_file({k: v.detach().half().contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def write_folder(unet, vae, text, text_2):
    shutil.rmtree(FOLDER, ignore_errors=True)
    os.makedirs(FOLDER)
    save_half(unet, os.path.join(FOLDER, "unet"))
    save_half(vae, os.path.join(FOLDER, "vae"))
    save_text_encoder(text, os.path.join(FOLDER, "text_encoder"), text_state(text))
    save_text_encoder(text_2, os.path.join(FOLDER, "text_encoder_2"), text_2.state_dict())
    DDIMScheduler.from_config(XL_SCHEDULER).save_pretrained(os.path.join(FOLDER, "scheduler"))
    for name, pad in PADS.items():
        os.makedirs(os.path.join(FOLDER, name))
        with open(os.path.join(FOLDER, name, "special_tokens_map.json"), "w") as f:
            json.dump(special_tokens(pad), f, indent=2)
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(FOLDER, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def special_tokens(pad):
    return {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": pad}


def load_pipeline():
    """The tiny folder as diffusers loads it (fp32), with ldm.tokenizer's tokenizers (same ids as CLIP's)."""
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(FOLDER, subfolder="vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(FOLDER, "text_encoder"), dtype=torch.float32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(FOLDER, "text_encoder_2"),
                                                                   dtype=torch.float32),
        tokenizer=load_tokenizer(pad_token=PADS["tokenizer"]), tokenizer_2=load_tokenizer(pad_token=PADS["tokenizer_2"]),
        unet=UNet2DConditionModel.from_pretrained(FOLDER, subfolder="unet", torch_dtype=torch.float32),
        scheduler=DDIMScheduler.from_pretrained(FOLDER, subfolder="scheduler"),
        force_zeros_for_empty_prompt=True, add_watermarker=False).to("cpu")


def encode(pipe, prompts):
    """Per encoder the token ids (after the pipeline's placeholder expansion) and penultimate hidden
    state, and bigG's pooled output (its `text_embeds`)."""
    out = {}
    for suffix, tokenizer, encoder in (("", pipe.tokenizer, pipe.text_encoder),
                                       ("_2", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(pipe.maybe_convert_prompt(prompts, tokenizer), padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt")["input_ids"]
        result = encoder(ids, output_hidden_states=True)
        out[f"input_ids{suffix}"] = ids.numpy().astype(np.int32)
        out[f"text_hidden{suffix}"] = result.hidden_states[-2].numpy()
        if suffix:
            out["pooled"] = result.text_embeds.numpy()
            check_pooled_at_first_eos(encoder, ids, result)
    out["context"] = np.concatenate([out["text_hidden"], out["text_hidden_2"]], axis=-1)
    return out


def check_pooled_at_first_eos(encoder, ids, result):
    first_eos = (ids == 49407).int().argmax(-1)
    rows = result.last_hidden_state[torch.arange(len(ids)), first_eos]
    assert torch.allclose(result.text_embeds, encoder.text_projection(rows), atol=1e-6)


@torch.no_grad()
def references(pipe, gen):
    """Keys: prompts; input_ids / input_ids_2 [P, 77] int32 (CLIP-L pads with <|endoftext|>, bigG with "!");
    text_hidden [P, 77, 6] and text_hidden_2 [P, 77, 8] (hidden_states[-2]), context [P, 77, 14] (their
    concatenation), pooled [P, 10] (bigG's text_embeds); unet_x [2, 4, 8, 8], unet_t [2], unet_context,
    unet_text_embeds [2, 10], unet_time_ids [2, 6] (original h, w, crop top, left, target h, w), unet_y
    [2, 58] (= text_embeds ++ the time ids' sinusoids, diffusers' add_embeds), unet_out; vae_x [1, 3, 32, 32],
    vae_mean, vae_logvar, vae_z (the mean), vae_decoded."""
    unet, vae = pipe.unet, pipe.vae
    arrays = dict(prompts=np.array(PROMPTS), **encode(pipe, PROMPTS))
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([1, 981])
    context, text_embeds = torch.from_numpy(arrays["context"][:2]), torch.from_numpy(arrays["pooled"][:2])
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1360, 16, 32, 832, 1216]], dtype=torch.float32)
    out = unet(x, t, encoder_hidden_states=context,
               added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    y = torch.cat([text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    posterior = vae.encode(image).latent_dist
    arrays.update(unet_x=x, unet_t=t.numpy().astype(np.int32), unet_context=context, unet_text_embeds=text_embeds,
                  unet_time_ids=time_ids, unet_y=y, unet_out=out, vae_x=image, vae_mean=posterior.mean,
                  vae_logvar=posterior.logvar, vae_z=posterior.mean, vae_decoded=vae.decode(posterior.mean).sample)
    return {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in arrays.items()}


def add_placeholder(pipe):
    """Write the `<cat-toy>` embedding file and load it into both encoders as diffusers' docs do."""
    rng = np.random.default_rng(TI_SEED)
    vectors = {"clip_l": rng.standard_normal((TI_VECTORS, WIDTH), dtype=np.float32),
               "clip_g": rng.standard_normal((TI_VECTORS, WIDTH_2), dtype=np.float32)}
    path = os.path.join(FIXTURES, "tiny-sdxl-cat-toy.safetensors")
    save_file({k: torch.from_numpy(v) for k, v in vectors.items()}, path)
    sd = load_file(path)
    pipe.load_textual_inversion(sd["clip_l"], token=TI_TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=TI_TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for (key, v), encoder, tokenizer in zip(vectors.items(), (pipe.text_encoder, pipe.text_encoder_2),
                                            (pipe.tokenizer, pipe.tokenizer_2)):
        assert tokenizer.convert_tokens_to_ids([TI_TOKEN, TI_TOKEN + "_1"]) == [49408, 49409]
        assert np.array_equal(encoder.get_input_embeddings().weight[49408:].detach().numpy(), v), key
    return vectors


@torch.no_grad()
def sample(pipe, name, run):
    """Keys `<run>.*`: the settings (prompt, negative_prompt unless zeroed, zero_negative, height, width,
    original_size, crops_coords_top_left, target_size, time_ids, num_inference_steps, guidance_scale, eta,
    seed), the DDIM timesteps, `latents0` (the initial latents, `np.random.default_rng(seed).standard_normal(
    (n, 4, height // 8, width // 8), dtype=np.float32)`), `latents` (the last step's, before decoding) and
    `images` [n, height, width, 3] float32 in [0, 1] (output_type "np")."""
    n = len(run["prompt"])
    latents0 = np.random.default_rng(run["seed"]).standard_normal(
        (n, 4, run["height"] // pipe.vae_scale_factor, run["width"] // pipe.vae_scale_factor), dtype=np.float32)
    final = {}

    def keep_latents(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return {}

    settings = {k: v for k, v in run.items() if k != "seed"}
    images = pipe(**settings, latents=torch.from_numpy(latents0), output_type="np",
                  callback_on_step_end=keep_latents).images
    out = {k: np.array(v) for k, v in run.items() if v is not None}
    out.update(zero_negative=np.bool_(run["negative_prompt"] is None),
               time_ids=np.array(run["original_size"] + run["crops_coords_top_left"] + run["target_size"], np.float32),
               timesteps=pipe.scheduler.timesteps.numpy(), latents0=latents0, latents=final["latents"],
               images=images.astype(np.float32))
    print(f"{name}: images mean {images.mean():.3f} std {images.std():.3f}, "
          f"{(images <= 0).mean() + (images >= 1).mean():.1%} clipped")
    return {f"{name}.{k}": v for k, v in out.items()}


def build_tiny():
    unet, vae, text, text_2 = tiny_models()
    write_folder(unet, vae, text, text_2)
    original = original_layout(unet, vae, text, text_2)
    check_against_diffusers(original, unet, vae, text, text_2)
    save_file({k: v.contiguous() for k, v in original.items()}, os.path.join(FIXTURES, "tiny-sdxl.safetensors"))

    pipe = load_pipeline()
    arrays = references(pipe, torch.Generator().manual_seed(5))
    arrays.update(sample(pipe, "plain", RUNS["plain"]))
    vectors = add_placeholder(pipe)
    arrays.update({"ti.token": np.array(TI_TOKEN), "ti.token_ids": np.array([49408, 49409], np.int32),
                   "ti.vectors_l": vectors["clip_l"], "ti.vectors_g": vectors["clip_g"]})
    with torch.no_grad():
        arrays.update({f"ti.{k}": v for k, v in encode(pipe, RUNS["ti"]["prompt"]).items()})
    arrays.update(sample(pipe, "ti", RUNS["ti"]))
    arrays.update(diffusers_version=np.array(diffusers.__version__),
                  transformers_version=np.array(transformers.__version__))
    np.savez_compressed(os.path.join(FIXTURES, "tiny-sdxl-reference.npz"), **arrays)


def write_key_list(name, header, shapes):
    with gzip.open(os.path.join(KEY_LISTS, name + ".txt.gz"), "wt", encoding="utf-8") as f:
        f.write("".join(f"# {line}\n" for line in header))
        f.writelines(f"{key}\t{','.join(map(str, shape))}\n" for key, shape in sorted(shapes.items()))


def write_key_lists():
    unet, vae, text, text_2 = meta_models()
    original = original_layout(unet, vae, text, text_2)
    check_against_diffusers(original, unet, vae, text, text_2)
    made = (f"generated by tools/dev/make_sdxl_fixtures.py (diffusers {diffusers.__version__}, transformers "
            f"{transformers.__version__}): the models of stabilityai/stable-diffusion-xl-base-1.0's config files "
            "built on the meta device")
    write_key_list("sdxl_original", [
        f"source: {made}, in the sgm single-file layout by ldm.convert's maps (unet_from_diffusers, "
        "vae_from_diffusers; bigG packed as OpenCLIP); converting it back with diffusers' single-file functions "
        "(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, "
        "convert_open_clip_checkpoint) gives exactly the models' names and shapes",
        "variant: sd_xl_base_1.0.safetensors",
        REAL_FILE_NOTE[2:],
        "format: name<TAB>shape; empty shape = 0-d scalar (conditioner.embedders.1.model.logit_scale); position_ids "
        "int64, the rest fp16 in the real file"],
        {k: tuple(v.shape) for k, v in original.items()})
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_state(text),
             "text_encoder_2": text_2.state_dict()}
    write_key_list("sdxl_diffusers", [
        f"source: {made}; keys as the hub folder's files name them (`text_model.` level included; "
        "today's transformers saves no position_ids, a non-persistent buffer; files saved by older "
        "versions may have them)",
        "format: <part>/name<TAB>shape; configs: sdxl_diffusers_configs.json"],
        {f"{part}/{k}": tuple(v.shape) for part, sd in parts.items() for k, v in sd.items()})
    configs = {"unet/config.json": json.loads(unet.to_json_string()),
               "vae/config.json": json.loads(vae.to_json_string()),
               "text_encoder/config.json": text.config.to_dict(), "text_encoder_2/config.json": text_2.config.to_dict(),
               "scheduler/scheduler_config.json": dict(XL_SCHEDULER, _class_name="EulerDiscreteScheduler"),
               **{f"{name}/special_tokens_map.json": special_tokens(pad) for name, pad in PADS.items()}}
    with open(os.path.join(KEY_LISTS, "sdxl_diffusers_configs.json"), "w") as f:
        json.dump(configs, f, indent=1, sort_keys=True)
        f.write("\n")
    return len(original), sum(len(sd) for sd in parts.values())


def main():
    original, folder = write_key_lists()
    print(f"key lists: sdxl_original {original} keys, sdxl_diffusers {folder} keys; checked against diffusers' "
          "single-file conversion")
    build_tiny()
    sizes = {name: os.path.getsize(os.path.join(FIXTURES, name)) for name in
             ("tiny-sdxl.safetensors", "tiny-sdxl-reference.npz", "tiny-sdxl-cat-toy.safetensors")}
    sizes["tiny-sdxl/"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FOLDER) for f in fs)
    print("tiny-sdxl written and checked against diffusers' single-file conversion:",
          ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
