"""Convert a Textual Inversion embedding between ours/mindone `_ti.ckpt`, diffusers, A1111/kohya files and A1111 cards.

    python -m tools.convert_embedding learned_embeds.safetensors cat_toy_ti.ckpt --to ti_ckpt --version 1.5
    python -m tools.convert_embedding cat_toy_ti.ckpt learned_embeds.safetensors --to diffusers
    python -m tools.convert_embedding cat_toy_ti.ckpt cat-toy.safetensors --to a1111
    python -m tools.convert_embedding cat_toy_ti.ckpt cat-toy.png --to a1111_card --image preview.png

SDXL embeddings (clip_l + clip_g) convert between the same formats except cards (A1111 trains no SDXL
embeddings): `--to a1111` writes kohya's `{"clip_l", "clip_g"}` .safetensors, `--to diffusers` diffusers'
pair `learned_embeds.safetensors` + `learned_embeds_2.safetensors` (give the first name; either file of a
pair is read as the whole embedding), `--to ti_ckpt` both sets under mindone's SDXL names (version xl).

    python -m tools.convert_embedding learned_embeds.safetensors cat-toy.safetensors --to a1111
    python -m tools.convert_embedding cat-toy.safetensors cat_toy_ti.ckpt --to ti_ckpt

Any supported format is read (A1111 `.pt`, A1111 PNG cards, diffusers `.bin` and hub concept repo ids
such as sd-concepts-library/cat-toy included); the output is written atomically and an existing file is
only replaced with --overwrite.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

from ldm import embeddings
from ldm.errors import UserInputError
from ldm.pretrained import VERSIONS

# the text encoder widths of each version, to catch a --version that does not fit the vectors
_VERSION_DIMS = {"1.5": (768,), "2.0": (1024,), "2.1": (1024,), "2.0-v": (1024,), "2.1-v": (1024,),
                 "xl": (768, 1280)}
_DEFAULT_VERSION = {(768,): "1.5", (1024,): "2.1", (768, 1280): "xl"}
# a card's preview when no --image is given
_PLAIN_PREVIEW = np.full((512, 512, 3), 128, np.uint8)


def _describe(embedding):
    if embedding.is_sdxl:
        return f"{embedding.dims[0]}-d clip_l and {embedding.dims[1]}-d clip_g vectors"
    return f"{embedding.dim}-d vectors"


def _version_for(embedding, version, src):
    if version is None:
        if embedding.dims not in _DEFAULT_VERSION:
            raise embeddings.EmbeddingError(
                f"{src} holds {_describe(embedding)}, not SD 1.x/2.x or SDXL; pass --version ({', '.join(VERSIONS)})"
            )
        return _DEFAULT_VERSION[embedding.dims]
    if version not in VERSIONS:
        raise embeddings.EmbeddingError(f"unknown --version {version!r}; valid versions: {', '.join(VERSIONS)}")
    dims = _VERSION_DIMS.get(version)
    if dims and embedding.dims != dims:
        encoders = (f"SDXL's text encoders are {dims[0]}-d and {dims[1]}-d" if len(dims) == 2
                    else f"SD {version} has a {dims[0]}-d text encoder")
        raise embeddings.EmbeddingError(f"{src} holds {_describe(embedding)}; {encoders}")
    return version


def _preview(image):
    try:
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise embeddings.EmbeddingError(f"--image {image}: not a readable image ({err})") from None


def convert(src, dst, to, token=None, version=None, overwrite=False, image=None):
    """Convert `src` into `dst` in format `to` (`image`: a card's preview file); returns what was written."""
    embedding = embeddings.load_embedding(src, token=token)
    # an SDXL diffusers embedding is written as a pair
    outputs = embeddings.diffusers_pair(dst) if to == "diffusers" and embedding.is_sdxl else None
    for path in outputs or (dst,):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    vectors, vectors_2 = embedding.vectors, embedding.vectors_2
    if to == "ti_ckpt":
        embeddings.save_ti_ckpt(dst, vectors, embedding.token, _version_for(embedding, version, src),
                                vectors_2=vectors_2)
    elif to == "diffusers":
        embeddings.save_diffusers(dst, embedding.token, vectors, vectors_2)
    elif to == "a1111":
        embeddings.save_a1111_safetensors(dst, embedding.token, vectors, vectors_2)
    elif to == "a1111_card":
        if embedding.is_sdxl:
            raise embeddings.EmbeddingError(f"{src} is an SDXL embedding: A1111 cards hold SD 1.x/2.x embeddings "
                                            "only; write --to a1111 (clip_l/clip_g .safetensors) instead")
        preview = _preview(image) if image else _PLAIN_PREVIEW
        embeddings.save_png_card(dst, preview, embedding.token, vectors, None, None)
    else:
        raise ValueError(f"unknown output format {to!r}; valid: {', '.join(embeddings.FORMATS)}")
    return embedding


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.convert_embedding", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="embedding file in any supported format")
    parser.add_argument("output", help="file to write (.ckpt for ti_ckpt, .png for a1111_card, else .safetensors)")
    parser.add_argument("--to", required=True, choices=embeddings.FORMATS, help="output format")
    parser.add_argument("--token", help="placeholder token (default: the one stored in the input, or its file name)")
    parser.add_argument(
        "--version",
        help="SD version stored in a ti_ckpt (default: 1.5 for 768-d vectors, 2.1 for 1024-d, xl for SDXL's)",
    )
    parser.add_argument("--image", help="the preview image of an a1111_card (default: plain gray, 512 px)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        embedding = convert(args.input, args.output, args.to, args.token, args.version, args.overwrite, args.image)
    except (OSError, UserInputError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"{args.output}: {args.to}, token {embedding.token!r}, {embedding.num_vectors} x {_describe(embedding)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
