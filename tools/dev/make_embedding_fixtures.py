"""Write the embedding fixtures of tests/test_embeddings.py in each tool's own format (run with a Python with torch).

The tests never import torch: they read these files with our readers and compare them with the same
numbers stored in expected.npz. Every file is written the way the tool that makes it in the wild does:

- fixture-a1111.pt, a1111-fp16.pt: A1111's `Embedding.save` (`string_to_token`, `string_to_param`, `name`,
  `step`, `sd_checkpoint`, `sd_checkpoint_name`); the second with fp16 vectors and a `name` that is not
  the file's stem (A1111 names a .pt after its file).
- learned_embeds.bin, learned_embeds_1d.bin: diffusers' textual_inversion script, `{token: [n, dim]}`, and
  its releases before multi-vector support, `{token: [dim]}`.
- cat-toy/: an sd-concepts-library repo (`learned_embeds.bin` with one `[768]` tensor, `token_identifier.txt`).
- kohya-1d.safetensors: `emb_params` as a 1-d fp16 tensor, through safetensors' torch API.
- a1111-card.png, a1111-card-pixels-only.png: A1111 embedding cards (the preview image with the embedding
  inside), made by the re-implementation of A1111's modules/textual_inversion/image_embedding.py below:
  the `sd-ti-embedding` text chunk plus the data in the pixels, and the pixels alone (a card whose text
  chunk was stripped, as image hosts do). The card's data is what our trainer writes for the same
  vectors (`sd_checkpoint` None: A1111 leaves it None when it has no checkpoint hash), so the tests can
  compare our card's text chunk and data stripes with these byte for byte.
- SDXL (two sets, clip_l [N, 768] and clip_g [N, 1280]):
  - kohya-xl.safetensors, kohya-xl.pt: kohya's sdxl_train_textual_inversion.py `save_weights`,
    `{"clip_l", "clip_g"}` through safetensors' torch API (bf16, its --save_precision bf16) and torch.save
    (fp16); A1111 and ComfyUI read both.
  - diffusers-xl/: diffusers' textual_inversion_sdxl.py `save_progress` (diffusers has no library function
    for it), `learned_embeds.safetensors` (text_encoder) and `learned_embeds_2.safetensors` (text_encoder_2),
    each `{placeholder: [N, dim]}` with metadata {"format": "pt"}.

    python -m tools.dev.make_embedding_fixtures              # write the fixtures
    python -m tools.dev.make_embedding_fixtures --read X.png # what A1111's loader finds in a card
"""

import argparse
import base64
import json
import os
import zlib
from math import cos

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from safetensors.torch import save_file

from tools import ROOT

DIM = 8
SD1_DIM = 768
XL_G_DIM = 1280
# the card's vectors are narrow so the PNGs stay a few KB; the format does not depend on the width
CARD_DIM = 32
CARD_SIZE = 64
OUT = os.path.join(ROOT, "tests", "fixtures", "embeddings")


# --- A1111's image_embedding.py, followed closely (only the font differs: A1111 ships its own TTF) --------

class EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


class EmbeddingDecoder(json.JSONDecoder):
    def __init__(self, *args, **kwargs):
        json.JSONDecoder.__init__(self, *args, object_hook=self.object_hook, **kwargs)

    def object_hook(self, d):
        if "TORCHTENSOR" in d:
            return torch.from_numpy(np.array(d["TORCHTENSOR"]))
        return d


def embedding_to_b64(data):
    return base64.b64encode(json.dumps(data, cls=EmbeddingEncoder).encode())


def embedding_from_b64(data):
    return json.loads(base64.b64decode(data), cls=EmbeddingDecoder)


def lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def xor_block(block):
    g = lcg()
    randblock = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), randblock & 0x0F)


def style_block(block, sequence):
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 0
            if yi % 2 == 0:
                offset = 4
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def insert_image_data_embed(image, data):
    d = 3
    data_compressed = zlib.compress(json.dumps(data, cls=EmbeddingEncoder).encode(), level=9)
    data_np_ = np.frombuffer(data_compressed, np.uint8).copy()
    data_np_high = data_np_ >> 4
    data_np_low = data_np_ & 0x0F

    h = image.size[1]
    next_size = data_np_low.shape[0] + (h - (data_np_low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))

    data_np_low = np.resize(data_np_low, next_size)
    data_np_low = data_np_low.reshape((h, -1, d))
    data_np_high = np.resize(data_np_high, next_size)
    data_np_high = data_np_high.reshape((h, -1, d))

    edge_style = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge_style = (np.abs(edge_style) / np.max(np.abs(edge_style)) * 255).astype(np.uint8)

    data_np_low = style_block(data_np_low, sequence=edge_style)
    data_np_low = xor_block(data_np_low)
    data_np_high = style_block(data_np_high, sequence=edge_style[::-1])
    data_np_high = xor_block(data_np_high)

    im_low = Image.fromarray(data_np_low, mode="RGB")
    im_high = Image.fromarray(data_np_high, mode="RGB")

    background = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    background.paste(im_low, (0, 0))
    background.paste(image, (im_low.size[0] + 1, 0))
    background.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return background


def crop_black(img, tol=0):
    mask = (img > tol).all(2)
    mask0, mask1 = mask.any(0), mask.any(1)
    col_start, col_end = mask0.argmax(), mask.shape[1] - mask0[::-1].argmax()
    row_start, row_end = mask1.argmax(), mask.shape[0] - mask1[::-1].argmax()
    return img[row_start:row_end, col_start:col_end]


def extract_image_data_embed(image):
    d = 3
    # A1111 reshapes getdata() (deprecated in Pillow 13) to [h, w, 3]: the same array
    outarr = crop_black(np.array(image.convert("RGB")).reshape(image.size[1], image.size[0], d).astype(np.uint8)) & 0x0F
    black_cols = np.where(np.sum(outarr, axis=(0, 2)) == 0)
    if black_cols[0].shape[0] < 2:
        return None

    data_block_lower = outarr[:, :black_cols[0].min(), :].astype(np.uint8)
    data_block_upper = outarr[:, black_cols[0].max() + 1:, :].astype(np.uint8)
    data_block_lower = xor_block(data_block_lower)
    data_block_upper = xor_block(data_block_upper)

    data_block = (data_block_upper << 4) | (data_block_lower)
    data_block = data_block.flatten().tobytes()
    data = zlib.decompress(data_block)
    return json.loads(data, cls=EmbeddingDecoder)


def caption_image_overlay(srcimage, title, footerLeft, footerMid, footerRight):
    image = srcimage.copy()
    fontsize = 32
    factor = 1.5
    gradient = Image.new("RGBA", (1, image.size[1]), color=(0, 0, 0, 0))
    for y in range(image.size[1]):
        mag = 1 - cos(y / image.size[1] * factor)
        mag = max(mag, 1 - cos((image.size[1] - y) / image.size[1] * factor * 1.1))
        gradient.putpixel((0, y), (0, 0, 0, int(mag * 255)))
    image = Image.alpha_composite(image.convert("RGBA"), gradient.resize(image.size))

    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(fontsize)
    padding = 10

    _, _, w, h = draw.textbbox((0, 0), title, font=font)
    fontsize = min(int(fontsize * (((image.size[0] * 0.75) - (padding * 4)) / w)), 72)
    font = ImageFont.load_default(fontsize)
    draw.text((padding, padding), title, anchor="lt", font=font, fill=(255, 255, 255, 230))

    _, _, w, h = draw.textbbox((0, 0), footerLeft, font=font)
    fontsize_left = min(int(fontsize * (((image.size[0] / 3) - (padding)) / w)), 72)
    _, _, w, h = draw.textbbox((0, 0), footerMid, font=font)
    fontsize_mid = min(int(fontsize * (((image.size[0] / 3) - (padding)) / w)), 72)
    _, _, w, h = draw.textbbox((0, 0), footerRight, font=font)
    fontsize_right = min(int(fontsize * (((image.size[0] / 3) - (padding)) / w)), 72)

    font = ImageFont.load_default(min(fontsize_left, fontsize_mid, fontsize_right))
    draw.text((padding, image.size[1] - padding), footerLeft, anchor="ls", font=font, fill=(255, 255, 255, 230))
    draw.text((image.size[0] / 2, image.size[1] - padding), footerMid, anchor="ms", font=font,
              fill=(255, 255, 255, 230))
    draw.text((image.size[0] - padding, image.size[1] - padding), footerRight, anchor="rs", font=font,
              fill=(255, 255, 255, 230))
    return image


def load_card(path):
    """A1111's EmbeddingDatabase.load_from_file for an image: the text chunk first, else the pixels."""
    embed_image = Image.open(path)
    if hasattr(embed_image, "text") and "sd-ti-embedding" in embed_image.text:
        return embedding_from_b64(embed_image.text["sd-ti-embedding"])
    return extract_image_data_embed(embed_image)


# --- fixtures ----------------------------------------------------------------------------------------------

def a1111_embedding(vec, name, step, sd_checkpoint, sd_checkpoint_name):
    """The dict A1111's Embedding.save pickles; the vector is a leaf being trained, hence requires_grad."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.from_numpy(vec).requires_grad_(True)},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def write_cards(out, vectors, rng):
    data = a1111_embedding(vectors, "tiny-card-500", 500, None, "tiny-sd1")
    # a smooth preview (a real image compresses like this, noise would not) with A1111's caption
    y, x = np.mgrid[0:CARD_SIZE, 0:CARD_SIZE] / CARD_SIZE
    preview = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.uniform(0, 40, (CARD_SIZE, CARD_SIZE, 3))
    image = Image.fromarray(preview.astype(np.uint8))
    # A1111's trainer: footer left the model name, middle its hash, right "{vectors}v {steps}s"
    captioned = caption_image_overlay(image, f"<{data['name']}>", "tiny-sd1", "[]", f"{len(vectors)}v 500s")
    card = insert_image_data_embed(captioned, data)
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", embedding_to_b64(data))
    card.save(os.path.join(out, "a1111-card.png"), "PNG", pnginfo=info)
    card.save(os.path.join(out, "a1111-card-pixels-only.png"), "PNG")
    for name in ("a1111-card.png", "a1111-card-pixels-only.png"):
        back = load_card(os.path.join(out, name))
        assert back["name"] == data["name"], name
        assert np.array_equal(back["string_to_param"]["*"].numpy().astype(np.float32), vectors), name


def write_sdxl(out, rng):
    """The SDXL fixtures; returns their vectors for expected.npz."""
    kohya = {"clip_l": rng.standard_normal((2, SD1_DIM)), "clip_g": rng.standard_normal((2, XL_G_DIM))}
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in kohya.items()},
              os.path.join(out, "kohya-xl.safetensors"))
    kohya_pt = {"clip_l": rng.standard_normal((1, SD1_DIM)), "clip_g": rng.standard_normal((1, XL_G_DIM))}
    torch.save({k: torch.from_numpy(v).half() for k, v in kohya_pt.items()}, os.path.join(out, "kohya-xl.pt"))
    pair = [rng.standard_normal((2, dim)).astype(np.float32) for dim in (SD1_DIM, XL_G_DIM)]
    os.makedirs(os.path.join(out, "diffusers-xl"), exist_ok=True)
    for name, vectors in zip(("learned_embeds.safetensors", "learned_embeds_2.safetensors"), pair):
        save_file({"<cat-toy>": torch.from_numpy(vectors)}, os.path.join(out, "diffusers-xl", name),
                  metadata={"format": "pt"})
    # as the tests read them: float32, the values the files hold
    return {
        "kohya_xl_l": torch.from_numpy(kohya["clip_l"]).to(torch.bfloat16).float().numpy(),
        "kohya_xl_g": torch.from_numpy(kohya["clip_g"]).to(torch.bfloat16).float().numpy(),
        "kohya_xl_pt_l": kohya_pt["clip_l"].astype(np.float16), "kohya_xl_pt_g": kohya_pt["clip_g"].astype(np.float16),
        "diffusers_xl_l": pair[0], "diffusers_xl_g": pair[1],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--read", metavar="CARD", help="print what A1111's loader reads from an embedding card")
    args = parser.parse_args()
    if args.read:
        data = load_card(args.read)
        if data is None:
            raise SystemExit(f"{args.read}: no embedding in the text chunk or the pixels")
        vec = list(data["string_to_param"].values())[0]
        print(f"{args.read}: name {data.get('name')!r}, vectors {tuple(vec.shape)}, step {data.get('step')}, "
              f"sd_checkpoint_name {data.get('sd_checkpoint_name')!r}")
        return
    out = args.out
    os.makedirs(os.path.join(out, "cat-toy"), exist_ok=True)
    rng = np.random.default_rng(1234)
    a1111 = rng.standard_normal((2, DIM)).astype(np.float32)
    diffusers = rng.standard_normal((3, DIM)).astype(np.float32)
    diffusers_1d = rng.standard_normal(DIM).astype(np.float32)
    sd_concepts = rng.standard_normal(SD1_DIM).astype(np.float32)
    a1111_fp16 = rng.standard_normal((2, SD1_DIM)).astype(np.float16)
    kohya_1d = rng.standard_normal(SD1_DIM).astype(np.float16)
    card = rng.standard_normal((2, CARD_DIM)).astype(np.float32)

    torch.save(a1111_embedding(a1111, "name-inside-the-file", 42, "cc6cb27103", "v1-5-pruned-emaonly"),
               os.path.join(out, "fixture-a1111.pt"))
    torch.save(a1111_embedding(a1111_fp16, "my-style-1500", 1500, "e1441589a6", "v1-5-pruned"),
               os.path.join(out, "a1111-fp16.pt"))
    # diffusers' train_textual_inversion.py: {placeholder: [n, dim]}; releases before multi-vector support saved [dim]
    torch.save({"<fixture-bin>": torch.from_numpy(diffusers)}, os.path.join(out, "learned_embeds.bin"))
    torch.save({"<old-bin>": torch.from_numpy(diffusers_1d)}, os.path.join(out, "learned_embeds_1d.bin"))
    # the sd-concepts-library repos were trained with that early script
    torch.save({"<cat-toy>": torch.from_numpy(sd_concepts)}, os.path.join(out, "cat-toy", "learned_embeds.bin"))
    with open(os.path.join(out, "cat-toy", "token_identifier.txt"), "w") as f:
        f.write("<cat-toy>")
    save_file({"emb_params": torch.from_numpy(kohya_1d)}, os.path.join(out, "kohya-1d.safetensors"))
    write_cards(out, card, rng)
    sdxl = write_sdxl(out, rng)
    np.savez(os.path.join(out, "expected.npz"), a1111=a1111, diffusers=diffusers, diffusers_1d=diffusers_1d,
             sd_concepts=sd_concepts, a1111_fp16=a1111_fp16, kohya_1d=kohya_1d, card=card, **sdxl)
    print(f"wrote fixtures to {out}")


if __name__ == "__main__":
    main()
