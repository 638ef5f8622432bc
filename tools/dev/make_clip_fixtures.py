"""Build the tiny random CLIP and its reference embeddings under tests/fixtures/.

Run with an interpreter that has torch and transformers (the dev venv of requirements-dev.txt):

    .venv-dev/bin/python -m tools.dev.make_clip_fixtures

- `tiny-clip/`: a transformers `CLIPModel` folder (config.json, fp16 model.safetensors) with the real
  49408-token vocabulary, so real token ids work, and tiny widths (32 px images, 8 px patches); its
  preprocessor_config.json is written in the openai repos' style (`size` and `crop_size` as plain numbers)
  with a resize (40) larger than the crop (32), so that both steps are exercised. No tokenizer files: the
  vocabulary is the one shipped in ldm/.
- `tiny-clip-reference.npz`: images of several sizes and prompts, and what transformers makes of them: the
  CLIPProcessor's pixel values and token ids, the projected features and the normalised
  `image_embeds` / `text_embeds` of `CLIPModel`. Weights are rounded to fp16 before the references are
  computed in fp32, so a loader that upcasts must reproduce them to float32 rounding.
"""
import json
import os
import shutil

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from tools.dev.make_reference_fixtures import FIXTURES, make_tokenizer, randomize

FOLDER = os.path.join(FIXTURES, "tiny-clip")
CONFIG = CLIPConfig(
    # the 49408-row token table dominates the fixture size: the text tower is the narrower one
    text_config=dict(vocab_size=49408, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, hidden_act="quick_gelu",
                       # at CLIP's init scale the class token barely sees the patches (any two images' embeddings
                       # have cosine > 0.99); ten times it, they differ (0.7 - 0.99)
                       initializer_factor=10.0),
    projection_dim=6)
# openai/clip-vit-large-patch14's file, with this model's sizes
PREPROCESSOR = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3, "size": 40}
PROMPTS = [
    "a photo of a cat",
    "a photo of on the beach",        # what the scorer makes of "a photo of <cat-toy> <cat-toy>_1 on the beach"
    "an oil painting of a red car, in the snow",
    "",
]


def images(gen):
    """Landscape, portrait, square and smaller-than-the-resize images; noise and smooth gradients (bicubic's
    overshoot must be clipped the same way)."""
    out = []
    for h, w in ((48, 64), (70, 41), (40, 40), (21, 30)):
        noise = torch.randint(0, 256, (h, w, 3), generator=gen)
        ramp = torch.linspace(0, 255, w)[None, :, None].expand(h, w, 3)
        out.append(torch.where(torch.rand(h, w, 1, generator=gen) < 0.5, noise.float(), ramp).round().to(torch.uint8))
    return [im.numpy() for im in out]


def main():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = randomize(CLIPModel(CONFIG), gen)
    shutil.rmtree(FOLDER, ignore_errors=True)
    model.half().save_pretrained(FOLDER)
    model.float()
    with open(os.path.join(FOLDER, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)

    processor = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(FOLDER),
                              tokenizer=make_tokenizer("<|endoftext|>"))
    pictures = images(gen)
    inputs = processor(text=PROMPTS, images=pictures, return_tensors="pt", padding="max_length", max_length=77,
                       truncation=True)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_features = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
    arrays = dict(prompts=np.array(PROMPTS), input_ids=inputs["input_ids"].numpy().astype(np.int32),
                  pixel_values=inputs["pixel_values"].numpy(), image_features=image_features.numpy(),
                  text_features=text_features.numpy(), image_embeds=out.image_embeds.numpy(),
                  text_embeds=out.text_embeds.numpy(), **{f"image_{i}": im for i, im in enumerate(pictures)})
    np.savez_compressed(os.path.join(FIXTURES, "tiny-clip-reference.npz"), **arrays)
    size = sum(os.path.getsize(os.path.join(FOLDER, f)) for f in os.listdir(FOLDER))
    print(f"{FOLDER}: {sorted(os.listdir(FOLDER))}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
