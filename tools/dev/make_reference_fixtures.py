"""Build the tiny reference models and their outputs under tests/fixtures/.

Run with an interpreter that has torch and diffusers (the dev venv of requirements-dev.txt):

    .venv-dev/bin/python -m tools.dev.make_reference_fixtures

Random-weight SD1-layout and SD2-layout models (diffusers UNet2DConditionModel / AutoencoderKL,
transformers CLIPTextModel) small enough to ship, with the real CLIP vocabulary size so real token ids
work. Weights are stored as fp16; the references are computed in fp32 from the fp16-rounded weights, so
a loader that upcasts must reproduce them to float32 rounding.

Written per flavour (`tiny-sd1`, `tiny-sd2`):
- `<name>/`: a diffusers folder (SD2's uses the fp16 variant name for the UNet and a torch `.bin`
  text encoder, to cover those file names); `tokenizer/` holds only the token settings, the vocabulary
  being the one shipped in ldm/;
- `<name>.safetensors`: the original single-file layout, made with ldm.convert's diffusers->CompVis maps
  plus the OpenCLIP packing below, and checked here by converting it back with diffusers' own
  original->diffusers functions; SD2's also carries the 24th-layer-style extra OpenCLIP block that SD2
  drops, `text_projection`, and its VAE attention as linear `[C, C]` weights;
- `tiny-sd1.ckpt`: the same original SD1 dict saved with `torch.save` (`{"state_dict": ...}`);
- `tiny-sd2-v/`: the SD2 folder with a v-prediction scheduler (the other parts are symlinks);
- `<name>-reference.npz`: token ids and text-encoder states for a few prompts, a UNet output and the
  VAE posterior / decode;
- `torch-dtypes.pt` + `torch-dtypes-expected.npz`: tensors of the storage kinds and strided views the
  pickle reader must handle (bf16 expected as float32).
"""
import gzip
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.convert import unet_from_diffusers, vae_from_diffusers
from tools import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PROMPTS = [
    "a photo of a cat",
    "",
    # longer than 77 tokens: truncated to 75 plus the start and end tokens
    " ".join(["a watercolor painting of a lighthouse on a rocky coast at sunset, dramatic clouds"] * 6),
]

# Tiny but structurally complete: 3 UNet levels (attention on the first two, so both upsampler slots
# `.1.conv` and `.2.conv` occur), resnets that change width (skip connections / nin_shortcut), 2 VAE
# levels with the mid attention.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           norm_num_groups=4, sample_size=16)
WIDTH = 6  # the 49408-row token table dominates the fixture size
FLAVOURS = {
    # SD1: OpenAI CLIP (quick_gelu, pad with <|endoftext|>), fixed head count, 1x1-conv projections
    "tiny-sd1": dict(unet=dict(attention_head_dim=2, cross_attention_dim=WIDTH, use_linear_projection=False),
                     text=dict(hidden_act="quick_gelu"), pad="<|endoftext|>", seed=1),
    # SD2: OpenCLIP (gelu, pad with "!"), fixed head width (4 here, 64 in SD2), linear projections
    "tiny-sd2": dict(unet=dict(attention_head_dim=(2, 4, 4), cross_attention_dim=WIDTH, use_linear_projection=True),
                     text=dict(hidden_act="gelu"), pad="!", seed=2),
}
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def bytes_to_unicode():
    """OpenAI CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer(pad_token):
    """transformers' CLIPTokenizer with vocab/merges built from ldm/bpe_simple_vocab_16e6.txt.gz."""
    with gzip.open(os.path.join(ROOT, "ldm", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token)
    shutil.rmtree(folder)
    ids = tokenizer("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    return tokenizer


def randomize(model, gen):
    """Perturb the constant-initialized parameters (norm scales/offsets, zero biases) so that a mapping
    that swaps two of them cannot go unnoticed, then round everything to fp16."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and float(p.std()) == 0.0 or p.numel() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())
    return model.eval()


def text_state(text):
    """The text encoder's weights under the names released files use (`text_model.` first): transformers
    5 dropped that level from CLIPTextModel, transformers 4 and every SD file on the hub have it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.state_dict().items()}


def save_half(model, folder, **kwargs):
    model.half().save_pretrained(folder, **kwargs)
    model.float()


def to_openclip(text_sd, width, gen):
    """Our (HF) text-encoder names -> OpenCLIP original names with packed q/k/v, plus the parts SD2 files
    carry that SD2 does not use: one more block, `text_projection`, `logit_scale`."""
    out = {"token_embedding.weight": text_sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": text_sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": text_sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": text_sd["text_model.final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[3]) for k in text_sd if k.startswith("text_model.encoder.layers."))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}.{p}"] = text_sd[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [text_sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    extra = {k.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}."): torch.randn(v.shape, generator=gen).half()
             for k, v in out.items() if k.startswith(f"transformer.resblocks.{layers - 1}.")}
    out.update(extra)
    out["text_projection"] = torch.randn(width, width, generator=gen).half()
    out["logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    return out


def original_layout(unet, vae, text, openclip, gen, linear_vae_attention=False):
    """The CompVis/Stability single-file dict (fp16 torch tensors)."""
    half = lambda sd: {k: v.detach().half() for k, v in sd.items()}  # noqa: E731
    sd = {"model.diffusion_model." + k: v for k, v in half(unet_from_diffusers(unet.state_dict())).items()}
    vae_sd = half(vae_from_diffusers(vae.state_dict()))
    if linear_vae_attention:
        # some released files keep the VAE attention as linear weights
        vae_sd = {k: (v[:, :, 0, 0] if v.ndim == 4 and ".attn_1." in k else v) for k, v in vae_sd.items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    if openclip:
        converted = to_openclip(half(text_state(text)), text.config.hidden_size, gen)
        sd.update({"cond_stage_model.model." + k: v for k, v in converted.items()})
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in half(text_state(text)).items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    # schedule buffers every released file carries; loaders ignore them
    sd["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return sd


def check_against_diffusers(sd, unet, vae, text, openclip):
    """Convert the original dict back with diffusers' functions: it must give our models' weights exactly."""
    def same(converted, model, what, allowed_extra=()):
        expected = text_state(model) if model is text else model.state_dict()
        extra = set(converted) - set(expected) - set(allowed_extra)
        assert set(expected) <= set(converted) and not extra, (what, set(expected) - set(converted), extra)
        for k, v in expected.items():
            assert torch.equal(converted[k].float().reshape(v.shape), v.float()), (what, k)

    same(sfu.convert_ldm_unet_checkpoint(sd, dict(unet.config)), unet, "unet")
    same(sfu.convert_ldm_vae_checkpoint(sd, dict(vae.config)), vae, "vae")
    if openclip:
        # diffusers drops OpenCLIP block 23 by name; a tiny model's dropped block is its last one
        last = text.config.num_hidden_layers
        kept = {k: v for k, v in sd.items() if f"resblocks.{last}." not in k}
        same(sfu.convert_open_clip_checkpoint(text, kept), text, "text", allowed_extra={"text_projection.weight"})
    else:
        converted = sfu.convert_ldm_clip_checkpoint(sd)
        same(converted, text, "text", allowed_extra={"text_model.embeddings.position_ids"})


def write_folder(folder, unet, vae, text, flavour, pad):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    sd2 = flavour == "tiny-sd2"
    save_half(unet, os.path.join(folder, "unet"), **({"variant": "fp16"} if sd2 else {}))
    save_half(vae, os.path.join(folder, "vae"))
    # the text encoder is written by hand: SD1's as hub folders have it (safetensors, `text_model.` names),
    # SD2's as a torch .bin with the transformers-5 names
    os.makedirs(os.path.join(folder, "text_encoder"))
    text.config.to_json_file(os.path.join(folder, "text_encoder", "config.json"))
    if sd2:
        torch.save({k: v.half() for k, v in text.state_dict().items()},
                   os.path.join(folder, "text_encoder", "pytorch_model.bin"))
    else:
        save_file({k: v.half().contiguous() for k, v in text_state(text).items()},
                  os.path.join(folder, "text_encoder", "model.safetensors"), metadata={"format": "pt"})
    DDIMScheduler(**SCHEDULER, prediction_type="epsilon").save_pretrained(os.path.join(folder, "scheduler"))
    os.makedirs(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "tokenizer", "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}, f, indent=2)
    write_model_index(folder)


def write_model_index(folder):
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def write_v_folder():
    """tiny-sd2-v: the SD2 weights under a v-prediction scheduler."""
    folder = os.path.join(FIXTURES, "tiny-sd2-v")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(os.path.join("..", "tiny-sd2", part), os.path.join(folder, part))
    DDIMScheduler(**SCHEDULER, prediction_type="v_prediction").save_pretrained(os.path.join(folder, "scheduler"))
    write_model_index(folder)


@torch.no_grad()
def references(unet, vae, text, tokenizer, gen):
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    hidden = text(ids).last_hidden_state
    # the shapes tests/test_text_to_image.py samples at (2 images of 32 px: a guided batch of 4 at 16x16, 2
    # latents to decode), so that tests/test_reference_models.py runs the graphs those tests compiled
    latents = torch.randn(4, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([1, 981, 500, 250])
    context = torch.cat([hidden, hidden[:1]])
    eps = unet(latents, timesteps, encoder_hidden_states=context).sample
    image = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    posterior = vae.encode(image).latent_dist
    z = posterior.mean
    decoded = vae.decode(z).sample
    arrays = dict(prompts=np.array(PROMPTS), input_ids=ids.numpy().astype(np.int32), text_hidden=hidden,
                  unet_x=latents, unet_t=timesteps.numpy().astype(np.int32), unet_context=context, unet_out=eps,
                  vae_x=image, vae_mean=posterior.mean, vae_logvar=posterior.logvar, vae_z=z, vae_decoded=decoded)
    return {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in arrays.items()}


def build(flavour, spec):
    gen = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    unet = randomize(UNet2DConditionModel(**UNET, **spec["unet"]), gen)
    vae = randomize(AutoencoderKL(**VAE), gen)
    text = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=WIDTH, **spec["text"])), gen)
    tokenizer = make_tokenizer(spec["pad"])

    write_folder(os.path.join(FIXTURES, flavour), unet, vae, text, flavour, spec["pad"])
    sd2 = flavour == "tiny-sd2"
    original = original_layout(unet, vae, text, sd2, gen, linear_vae_attention=sd2)
    check_against_diffusers(original, unet, vae, text, sd2)
    save_file({k: v.contiguous() for k, v in original.items()}, os.path.join(FIXTURES, flavour + ".safetensors"))
    if flavour == "tiny-sd1":
        torch.save({"state_dict": original, "global_step": 0}, os.path.join(FIXTURES, flavour + ".ckpt"))
    np.savez_compressed(os.path.join(FIXTURES, flavour + "-reference.npz"),
                        **references(unet, vae, text, tokenizer, gen))


def write_pickle_fixture():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=gen)
    tensors = {
        "bf16": base.bfloat16(),
        "fp16_transposed": base.half().t(),                 # non-contiguous strides
        "int64_offset_view": torch.arange(24).view(4, 6)[1:, 2:5],   # storage offset and row stride
        "parameter": torch.nn.Parameter(base[0].clone()),
        "bool": base > 0,
        "empty": torch.zeros(0, 3),
    }
    torch.save({"state_dict": tensors, "epoch": 3, "name": "dtypes"}, os.path.join(FIXTURES, "torch-dtypes.pt"))
    np.savez(os.path.join(FIXTURES, "torch-dtypes-expected.npz"),
             **{k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in tensors.items()})


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    write_pickle_fixture()
    for flavour, spec in FLAVOURS.items():
        build(flavour, spec)
        print(f"{flavour}: written and checked against diffusers' original->diffusers conversion")
    write_v_folder()


if __name__ == "__main__":
    main()
