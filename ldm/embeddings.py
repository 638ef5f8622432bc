"""Textual Inversion embedding files: read every common format, write ours, the two portable ones and A1111 cards.

An SD 1.x/2.x embedding is one set of vectors `[N, dim]`; an SDXL one is two sets with the same N, `[N, 768]`
for CLIP ViT-L (`clip_l`) and `[N, 1280]` for OpenCLIP ViT-bigG (`clip_g`). Formats (recognised by content,
not by file name):

- `ti_ckpt`: ours and mindone's `*_ti.ckpt`, a MindSpore checkpoint with one parameter whose name ends
  in `embedding_table` holding the `[N, dim]` vectors, plus `placeholder_token` (str) and `num_vectors`
  (int); ours also stores `version` and `embedding_dim`. SDXL: the two parameters mindone's SDXL
  TextualInversionManager saves (`XL_PARAMS`), and in ours `version` "xl", `embedding_dim` and `embedding_dim_2`.
- `diffusers`: `learned_embeds.safetensors` / `.bin`, `{token: [n, dim] or [dim]}`. SDXL: diffusers'
  textual_inversion_sdxl.py writes a pair, `learned_embeds*.safetensors` (text_encoder) and
  `learned_embeds_2*.safetensors` (text_encoder_2) side by side (`_2` also in its `-steps-N` names); either
  file of a pair reads as the whole embedding.
- `a1111`: A1111's `.pt` (`string_to_param["*"]`) and A1111/kohya `.safetensors` (`emb_params`); SDXL:
  `{"clip_l": [N, 768], "clip_g": [N, 1280]}` as kohya's sdxl_train_textual_inversion.py writes it in a
  `.safetensors` or `.pt` (what A1111 and ComfyUI read).
  A1111 names an embedding after its file, so the token is the file's stem (the `name` inside a .pt is
  ignored, as A1111 ignores it).
- `a1111_card`: A1111's embedding card, a PNG preview image carrying the `.pt`'s dict as base64 JSON in an
  `sd-ti-embedding` text chunk and, again, zlib-compressed in two pixel stripes beside the image (so a card
  whose text chunk was stripped still loads). The token is the card's `name`, as in A1111. SD 1.x/2.x only:
  A1111 trains no SDXL embeddings, so there are no SDXL cards.

A name that is not a file but reads `owner/name` is a hub concept repo (sd-concepts-library style:
`learned_embeds.safetensors` or `.bin`, the token in `token_identifier.txt`; an SDXL repo of diffusers'
script also has `learned_embeds_2.*`), fetched through the Hugging Face cache. Vectors are returned as
float32 `[n, dim]`; `token` can always be overridden by the caller.
"""

import base64
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ldm.checkpoint_io import CheckpointError, atomic_write, load_state_dict, load_torch_pickle, save_safetensors

logger = logging.getLogger(__name__)

FORMATS = ("ti_ckpt", "diffusers", "a1111", "a1111_card")
# mindone's text encoder parameter names: OpenAI CLIP (SD 1.x) and OpenCLIP (SD 2.x)
SD1_PARAM = "cond_stage_model.transformer.embedding_table"
SD2_PARAM = "cond_stage_model.model.token_embedding.embedding_table"
# mindone's SDXL parameter names (GeneralConditioner's CLIP ViT-L, then OpenCLIP ViT-bigG)
XL_PARAMS = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table",
             "conditioner.embedders.1.model.token_embedding.embedding_table")
_FAMILY = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}
# diffusers' names for the two files of an SDXL embedding, e.g. learned_embeds_2-steps-500.safetensors
_PAIR_NAME = re.compile(r"learned_embeds(_2)?(?=[-.])")
CARD_KEY = "sd-ti-embedding"
# a card's JSON is ~20 bytes a value (75 vectors of 1024 make 1.5 MB): the cap only stops a zlib bomb
_MAX_CARD_JSON = 64 << 20
CONCEPT_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
# a missing path with one of these endings is a mistyped file, not a hub repo id
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".png", ".webp")


class EmbeddingError(CheckpointError):
    """One-line message naming the embedding file."""


@dataclass
class Embedding:
    token: str
    vectors: np.ndarray  # [n, dim] float32; SDXL: CLIP ViT-L's
    source_format: str  # one of FORMATS
    vectors_2: Optional[np.ndarray] = None  # SDXL: OpenCLIP ViT-bigG's [n, dim_2] float32, same n

    @property
    def is_sdxl(self):
        return self.vectors_2 is not None

    @property
    def num_vectors(self):
        return self.vectors.shape[0]

    @property
    def dim(self):
        return self.vectors.shape[1]

    @property
    def dims(self):
        """The widths of the text encoders the embedding is for: `(dim,)`, SDXL `(768, 1280)`."""
        return (self.dim,) if self.vectors_2 is None else (self.dim, self.vectors_2.shape[1])

    @property
    def all_vectors(self):
        """`[n, sum(dims)]`: SDXL's two sets side by side, CLIP ViT-L's columns first."""
        return self.vectors if self.vectors_2 is None else np.concatenate([self.vectors, self.vectors_2], axis=1)


def _as_vectors(array, path, what):
    vectors = np.asarray(array)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating):
        raise EmbeddingError(f"{path}: {what} is not a [n, dim] float array (shape {vectors.shape}, {vectors.dtype})")
    # a copy: torch files are memory-mapped, and the caller may overwrite the file it came from
    return np.array(vectors, dtype=np.float32, order="C")


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _vector_pair(vectors, vectors_2, path, names):
    """SDXL's two sets `names` of `path` as float32 `[n, dim]`; they must hold as many vectors each."""
    vectors, vectors_2 = _as_vectors(vectors, path, names[0]), _as_vectors(vectors_2, path, names[1])
    if len(vectors) != len(vectors_2):
        raise EmbeddingError(f"{path}: {names[0]} has {len(vectors)} vectors but {names[1]} has {len(vectors_2)}; "
                             "an SDXL embedding has as many for each text encoder")
    return vectors, vectors_2


def _sdxl_embedding(token, vectors, vectors_2, source_format, path, names=("clip_l", "clip_g")):
    vectors, vectors_2 = _vector_pair(vectors, vectors_2, path, names)
    return Embedding(token, vectors, source_format, vectors_2)


def _from_mapping(data, path):
    """Embedding from a safetensors dict or an unpickled object."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} is not a known embedding format (holds a {type(data).__name__}, not a dict)")
    if "clip_l" in data or "clip_g" in data:
        missing = "clip_g" if "clip_l" in data else "clip_l"
        if missing not in data:
            raise EmbeddingError(f"{path} is half an SDXL embedding: it has no {missing} vectors")
        return _sdxl_embedding(_stem(path), data["clip_l"], data["clip_g"], "a1111", path)
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: A1111 string_to_param must hold exactly one tensor")
        return Embedding(_stem(path), _as_vectors(next(iter(params.values())), path, "string_to_param"), "a1111")
    if "emb_params" in data:
        return Embedding(_stem(path), _as_vectors(data["emb_params"], path, "emb_params"), "a1111")
    if len(data) == 1:
        token, value = next(iter(data.items()))
        if isinstance(token, str) and isinstance(value, np.ndarray):
            return Embedding(token, _as_vectors(value, path, f"tensor {token!r}"), "diffusers")
    keys = ", ".join(map(str, list(data)[:5]))
    raise EmbeddingError(
        f"{path} is not a known embedding format (keys: {keys}); expected ours/mindone _ti.ckpt, "
        "diffusers learned_embeds, A1111 .pt or A1111/kohya .safetensors"
    )


def _read_ti_ckpt(path):
    import mindspore as ms

    try:
        data = ms.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - MindSpore raises assorted types with multi-line messages
        raise EmbeddingError(f"{path} is not a readable MindSpore checkpoint ({str(err).strip().splitlines()[0]})")
    tables = [k for k in data if k.endswith("embedding_table")]
    token = data.get("placeholder_token")
    token = token if isinstance(token, str) and token else _stem(path)
    # via float32: asnumpy() cannot hand out bfloat16
    arrays = [data[name].astype(ms.float32).asnumpy() for name in tables]
    if sorted(tables) == sorted(XL_PARAMS):
        embedding = _sdxl_embedding(token, *(arrays[tables.index(name)] for name in XL_PARAMS), "ti_ckpt", path,
                                    names=XL_PARAMS)
    elif len(tables) == 1:
        embedding = Embedding(token, _as_vectors(arrays[0], path, tables[0]), "ti_ckpt")
    else:
        raise EmbeddingError(f"{path} holds {len(tables)} parameters named *embedding_table; a TI checkpoint has "
                             f"one, or for SDXL the two {' and '.join(XL_PARAMS)}")
    if "num_vectors" in data and int(data["num_vectors"].asnumpy()) != embedding.num_vectors:
        raise EmbeddingError(f"{path}: num_vectors is {int(data['num_vectors'].asnumpy())} but {' and '.join(tables)} "
                             f"{'have' if len(tables) > 1 else 'has'} {embedding.num_vectors} rows")
    return embedding


# --- A1111 embedding cards ---------------------------------------------------------------------------
# The pixel stripes hold the zlib-compressed JSON, its low nibbles left of the image and its high nibbles
# right of it, one black column apart, row-major with 3 nibbles a pixel. Each nibble sits in the low 4 bits
# of its channel, XOR-ed with A1111's LCG stream; the high 4 bits draw a pattern of dots. A1111's reader
# crops the black border and splits at the outermost columns whose low nibbles are all zero; so does ours.

def _lcg_nibbles(n):
    """A1111's XOR mask: the low 4 bits of an LCG (Numerical Recipes constants, seed 0) taken mod 255."""
    out = np.empty(n, np.uint8)
    state = 0
    for i in range(n):
        state = (1664525 * state + 1013904223) & 0xFFFFFFFF
        out[i] = (state % 255) & 0x0F
    return out


def _pixel_payload(image):
    """The compressed bytes in a card's pixel stripes, or None when the image has no stripes."""
    pixels = np.asarray(image.convert("RGB"))
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if not len(cols):
        return None
    low = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] & 0x0F
    gaps = np.flatnonzero(low.sum(axis=(0, 2)) == 0)
    if len(gaps) < 2:
        return None
    low_nibbles, high_nibbles = low[:, :gaps[0]], low[:, gaps[-1] + 1:]
    if not low_nibbles.size or low_nibbles.shape != high_nibbles.shape:
        return None
    mask = _lcg_nibbles(low_nibbles.size).reshape(low_nibbles.shape)
    return (((high_nibbles ^ mask) << 4) | (low_nibbles ^ mask)).tobytes()


def _inflate(payload, path):
    """The card's JSON from its pixel payload; None when the bytes are not a zlib stream (a plain image)."""
    stream = zlib.decompressobj()
    try:
        text = stream.decompress(payload, _MAX_CARD_JSON)
    except zlib.error:
        return None
    if not stream.eof:
        raise EmbeddingError(f"{path}: the embedding in the image's pixels is cut short or over 64 MB")
    return text


def _tensor_from_json(obj):
    # A1111's EmbeddingEncoder writes each tensor as {"TORCHTENSOR": nested lists}
    return np.asarray(obj["TORCHTENSOR"], dtype=np.float64) if "TORCHTENSOR" in obj else obj


def _read_card(path):
    """An A1111 card: the text chunk if present, else the pixel stripes (A1111's order)."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(CARD_KEY)  # only PNG has text chunks
            payload = _pixel_payload(image) if text is None else None
    except (OSError, ValueError) as err:  # PIL raises UnidentifiedImageError (an OSError) or ValueError
        raise EmbeddingError(f"{path}: unreadable image ({err})") from None
    if text is None:
        text = _inflate(payload, path) if payload else None
        if text is None:
            raise EmbeddingError(f"{path} is an image without an embedding (no {CARD_KEY} text chunk, no data "
                                 "in its pixels)")
    else:
        text = base64.b64decode(text)
    try:
        data = json.loads(text, object_hook=_tensor_from_json)
    except ValueError as err:
        raise EmbeddingError(f"{path}: damaged embedding data in the card ({err})") from None
    embedding = _from_mapping(data, path)
    name = data.get("name")
    if isinstance(name, str) and name:
        embedding.token = name
    embedding.source_format = "a1111_card"
    return embedding


# --- hub concept repos --------------------------------------------------------------------------------

def _is_repo_id(name):
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.lower().endswith(_FILE_SUFFIXES)


def _download_concept(repo):
    """(path, token) of a hub concept repo's embedding, through the Hugging Face cache; token may be None."""
    from huggingface_hub import hf_hub_download

    from ldm.pretrained import download_failure

    errors = []
    for filename in CONCEPT_FILES:
        try:
            path = hf_hub_download(repo_id=repo, filename=filename)
            break
        except Exception as err:  # noqa: BLE001 - a missing file, no network or offline mode: try the next one
            errors.append(err)
    else:
        raise EmbeddingError(
            f"{repo} is not a file, and its {' or '.join(CONCEPT_FILES)} could not be had from "
            f"huggingface.co/{repo} ({download_failure(errors[-1])}); download the file and pass its path"
        ) from errors[-1]
    logger.info("embedding %s: %s", repo, path)
    try:
        # diffusers' SDXL concepts have a second file, which the cache puts beside the first
        hf_hub_download(repo_id=repo, filename=diffusers_pair(filename)[1])
    except Exception:  # noqa: BLE001 - an SD 1.x/2.x concept has none
        pass
    try:
        with open(hf_hub_download(repo_id=repo, filename="token_identifier.txt"), encoding="utf-8") as f:
            return path, f.read().strip() or None
    except Exception:  # noqa: BLE001 - the file is optional: the token stored with the vectors serves
        return path, None


def _read(path):
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"\x89PNG" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return _read_card(path)
    if head[:4] == b"PK\x03\x04":
        return _from_mapping(load_torch_pickle(path), path)
    if head[:1] == b"\x0a":
        # a MindSpore checkpoint is a protobuf whose first field (tag 1, length-delimited) is a parameter
        return _read_ti_ckpt(path)
    # safetensors; anything else gets checkpoint_io's one-line "not a checkpoint" error
    return _from_mapping(load_state_dict(path), path)


def diffusers_pair(path):
    """`(learned_embeds…, learned_embeds_2…)`: the two files of a diffusers SDXL embedding `path` names either
    of, or None when its file name is not diffusers'."""
    folder, name = os.path.split(path)
    match = _PAIR_NAME.search(name)
    if match is None:
        return None
    return tuple(os.path.join(folder, name[:match.start()] + stem + name[match.end():])
                 for stem in ("learned_embeds", "learned_embeds_2"))


def _other_half(path):
    pair = diffusers_pair(path)
    return pair and (pair[1] if path == pair[0] else pair[0])


def _with_diffusers_pair(embedding, path):
    """`embedding` (a diffusers file) joined with the other file of its diffusers SDXL pair, if there is one."""
    pair = diffusers_pair(path)
    other = _other_half(path)
    if other is None or not os.path.isfile(other):
        return embedding
    first, second = (embedding, _read(other)) if other == pair[1] else (_read(other), embedding)
    if first.source_format != "diffusers" or second.source_format != "diffusers" or first.is_sdxl or second.is_sdxl:
        raise EmbeddingError(f"{pair[0]} and {pair[1]} are named as diffusers' SDXL pair but are not two "
                             "diffusers embeddings; rename the one that does not belong")
    if first.token != second.token:
        raise EmbeddingError(f"{pair[0]} and {pair[1]} are named as diffusers' SDXL pair but hold different tokens "
                             f"({first.token!r}, {second.token!r}); rename the one that does not belong")
    return _sdxl_embedding(first.token, first.vectors, second.vectors, "diffusers", f"{pair[0]} + {pair[1]}",
                           names=(os.path.basename(pair[0]), os.path.basename(pair[1])))


def load_embedding(path, token=None):
    """Read a TI embedding of any supported format, or a hub concept repo's; `token` overrides its own name.
    A diffusers SDXL embedding is read whole from either of its two files."""
    repo_token = None
    if not os.path.isfile(path):
        if os.path.exists(path) or not _is_repo_id(path):
            raise EmbeddingError(f"embedding file {path} does not exist")
        path, repo_token = _download_concept(path)
    embedding = _read(path)
    if embedding.source_format == "diffusers":
        embedding = _with_diffusers_pair(embedding, path)
    embedding.token = token or repo_token or embedding.token
    return embedding


def _family(dims):
    return f" ({_FAMILY[dims]})" if dims in _FAMILY else ""


def _widths(dims):
    return " / ".join(f"{d}-d" for d in dims)


def check_fits(embedding, widths, path):
    """Refuse an embedding that does not fit the model's text encoders, whose widths are `widths`: `(768,)`
    for SD 1.x, `(1024,)` SD 2.x, `(768, 1280)` SDXL (CLIP ViT-L, then OpenCLIP ViT-bigG)."""
    widths = tuple(widths)
    if embedding.dims == widths:
        return
    dims = embedding.dims
    if len(widths) == 2 and not embedding.is_sdxl:
        other = _other_half(path) if embedding.source_format == "diffusers" else None
        hint = f"; for diffusers' SDXL pair, put {os.path.basename(other)} beside it" if other else ""
        raise EmbeddingError(f"{path} holds one set of {dims[0]}-d vectors{_family(dims)}; this SDXL model needs "
                             f"an SDXL embedding, {widths[0]}-d clip_l and {widths[1]}-d clip_g vectors{hint}")
    if len(widths) == 1 and embedding.is_sdxl:
        raise EmbeddingError(f"{path} is an SDXL embedding ({dims[0]}-d clip_l and {dims[1]}-d clip_g vectors); "
                             f"this model{_family(widths)} has one {widths[0]}-d text encoder")
    are = "is" if len(widths) == 1 else "are"
    raise EmbeddingError(f"{path} holds {_widths(dims)} vectors{_family(dims)}; this model's text "
                         f"encoder{'s' if len(widths) > 1 else ''} {are} {_widths(widths)}{_family(widths)}")


def ti_param_name(version):
    """mindone's name for the text encoder's embedding table: OpenCLIP for SD 2.x, OpenAI CLIP otherwise."""
    return SD2_PARAM if str(version).startswith("2") else SD1_PARAM


def _vector_sets(path, vectors, vectors_2):
    """The vectors to write as float32, checked: `(vectors,)`, or for SDXL `(clip_l, clip_g)` with the same n."""
    if vectors_2 is None:
        return (_as_vectors(vectors, path, "vectors"),)
    return _vector_pair(vectors, vectors_2, path, ("vectors", "vectors_2"))


def save_ti_ckpt(path, vectors, placeholder_token, version, param_name=None, vectors_2=None):
    """Write ours/mindone `_ti.ckpt`; `param_name` defaults to mindone's name for `version`. SDXL: `vectors`
    (CLIP ViT-L) and `vectors_2` (ViT-bigG) under mindone's SDXL names `XL_PARAMS`, with `embedding_dim_2`."""
    import mindspore as ms

    sets = _vector_sets(path, vectors, vectors_2)
    names = XL_PARAMS if len(sets) == 2 else (param_name or ti_param_name(version),)
    params = [{"name": name, "data": ms.Tensor(v)} for name, v in zip(names, sets)]
    extra = {
        "placeholder_token": placeholder_token,
        "num_vectors": sets[0].shape[0],
        "version": str(version),
        "embedding_dim": sets[0].shape[1],
    }
    if len(sets) == 2:
        extra["embedding_dim_2"] = sets[1].shape[1]
    with atomic_write(path) as tmp:
        # save_checkpoint appends ".ckpt" to any other file name
        target = tmp if tmp.endswith(".ckpt") else tmp + ".ckpt"
        ms.save_checkpoint(params, target, append_dict=extra)
        if target != tmp:
            os.replace(target, tmp)


def _save_safetensors(path, tensors):
    if not path.endswith(".safetensors"):
        raise EmbeddingError(f"{path}: embeddings are written as .safetensors (writing torch pickles needs torch)")
    save_safetensors(tensors, path)


def save_diffusers(path, token, vectors, vectors_2=None):
    """diffusers `learned_embeds.safetensors`: `{token: [n, dim]}` (what `load_textual_inversion` reads).
    SDXL: `path` must have diffusers' name, `learned_embeds*.safetensors`; `vectors_2` go beside it into
    `learned_embeds_2*.safetensors`, as diffusers' textual_inversion_sdxl.py writes them."""
    sets = _vector_sets(path, vectors, vectors_2)
    if len(sets) == 1:
        _save_safetensors(path, {token: sets[0]})
        return
    pair = diffusers_pair(path)
    if pair is None or path != pair[0]:
        raise EmbeddingError(f"{path}: a diffusers SDXL embedding is two files, learned_embeds*.safetensors and "
                             "learned_embeds_2*.safetensors; name the output learned_embeds.safetensors")
    # the second file first: a reader that finds the first finds its pair complete
    _save_safetensors(pair[1], {token: sets[1]})
    _save_safetensors(pair[0], {token: sets[0]})


def save_a1111_safetensors(path, token, vectors, vectors_2=None):
    """A1111/kohya `.safetensors`: `emb_params`, SDXL `clip_l` and `clip_g`. The file holds no name: A1111 uses
    the file's stem (a warning when that is not `token`; None: the caller says so itself)."""
    if token is not None and _stem(path) != token:
        logger.warning("A1111 will call the embedding in %s %r, not %r (it names embeddings after their file)",
                       path, _stem(path), token)
    sets = _vector_sets(path, vectors, vectors_2)
    _save_safetensors(path, dict(zip(("clip_l", "clip_g") if len(sets) == 2 else ("emb_params",), sets)))


def _card_json(token, vectors, step, checkpoint_name):
    """What A1111's trainer puts in a card: its .pt's dict (265 is CLIP's id of "*"; A1111 never reads it)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
        "name": token,
        "step": step,
        "sd_checkpoint": None,  # A1111's short hash of the model file: not computed for a multi-GB file
        "sd_checkpoint_name": checkpoint_name,
    }
    return json.dumps(data).encode()


def _dots(width, height, shades):
    """The high bits of a pixel stripe: A1111's staggered grid of 7 px dots, shaded in turn by `shades`."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            draw.ellipse((x + shift, y, x + shift + 6, y + 6), fill=(int(shades[i % len(shades)]),) * 3)
            i += 1
    return np.asarray(canvas) & 0xF0


def _add_stripes(image, payload, first_vector):
    """`image` with the payload's low nibbles in a stripe on its left and its high nibbles on its right."""
    height = image.shape[0]
    # A1111's padding to whole columns, quirk included: a length already a multiple grows by a step
    size = len(payload) + height - len(payload) % height
    size += 3 * height - size % (3 * height)
    nibbles = np.frombuffer(payload, np.uint8)
    mask = _lcg_nibbles(size).reshape(height, -1, 3)
    magnitude = np.abs(first_vector[:1024].astype(np.float64))
    shades = (magnitude / (magnitude.max() or 1.0) * 255).astype(np.uint8)
    stripes = []
    for part, order in ((nibbles & 0x0F, 1), (nibbles >> 4, -1)):
        # np.resize repeats the payload to fill the stripe, as A1111 does
        block = np.resize(part, size).reshape(height, -1, 3)
        stripes.append(block ^ _dots(block.shape[1], height, shades[::order]) ^ mask)
    gap = np.zeros((height, 1, 3), np.uint8)
    return np.concatenate([stripes[0], gap, image, gap, stripes[1]], axis=1)


def _font_size(draw, text, width):
    """A1111's caption sizing: the size (at most 72) at which `text` spans `width` pixels."""
    length = draw.textlength(text, font=ImageFont.load_default(32))
    return min(72, int(32 * width / length)) if length else 72


def _caption(image, title, footer_left, footer_right):
    """A1111's card look: the image darkened towards its top and bottom edges, the title above, details below."""
    height, width = image.shape[:2]
    y = np.arange(height) / height
    shade = np.minimum(np.maximum(1 - np.cos(1.5 * y), 1 - np.cos(1.65 * (1 - y))), 1.0)
    card = Image.fromarray((image * (1 - shade[:, None, None])).round().astype(np.uint8))
    draw = ImageDraw.Draw(card)
    pad, white = 10, (255, 255, 255)
    # text below 8 px is unreadable: small previews (the tiny model's) go without it
    size = _font_size(draw, title, 0.75 * width - 4 * pad)
    if size >= 8:
        draw.text((pad, pad), title, anchor="lt", font=ImageFont.load_default(size), fill=white)
    size = min(_font_size(draw, text, width / 3 - pad) for text in (footer_left or " ", footer_right))
    if size >= 8:
        font = ImageFont.load_default(size)
        draw.text((pad, height - pad), footer_left, anchor="ls", font=font, fill=white)
        draw.text((width - pad, height - pad), footer_right, anchor="rs", font=font, fill=white)
    return np.asarray(card)


def save_png_card(path, image, token, vectors, step, checkpoint_name):
    """Write an A1111 embedding card of `image` (uint8 `[H, W, 3]`): captioned, with the embedding in an
    `sd-ti-embedding` text chunk and in pixel stripes, as A1111's trainer writes it. A1111 loads it under
    the name `token`; so does load_embedding. `step` and `checkpoint_name` (the model file) may be None."""
    vectors = _as_vectors(vectors, path, "vectors")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise EmbeddingError(f"{path}: a card's image must be uint8 [H, W, 3], not {image.dtype} {image.shape}")
    text = _card_json(token, vectors, step, checkpoint_name)
    title = token if token.startswith("<") else f"<{token}>"
    footer = f"{len(vectors)}v" if step is None else f"{len(vectors)}v {step}s"
    card = _add_stripes(_caption(image, title, checkpoint_name or "", footer), zlib.compress(text, 9), vectors[0])
    info = PngImagePlugin.PngInfo()
    info.add_text(CARD_KEY, base64.b64encode(text))
    with atomic_write(path) as tmp:
        Image.fromarray(card).save(tmp, format="PNG", pnginfo=info)
