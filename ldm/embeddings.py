"""Textual Inversion embedding files: read every common format, write ours and the two portable ones.

Formats (recognised by content, not by file name):

- `ti_ckpt`: ours and mindone's `*_ti.ckpt`, a MindSpore checkpoint with one parameter whose name ends
  in `embedding_table` holding the `[N, dim]` vectors, plus `placeholder_token` (str) and `num_vectors`
  (int); ours also stores `version` and `embedding_dim`.
- `diffusers`: `learned_embeds.safetensors` / `.bin`, `{token: [n, dim] or [dim]}`.
- `a1111`: A1111's `.pt` (`string_to_param["*"]`) and A1111/kohya `.safetensors` (`emb_params`).
  A1111 names an embedding after its file, so the token is the file's stem.

Vectors are returned as float32 `[n, dim]`; `token` can always be overridden by the caller.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np

from ldm.checkpoint_io import CheckpointError, atomic_write, load_state_dict, load_torch_pickle, save_safetensors

logger = logging.getLogger(__name__)

FORMATS = ("ti_ckpt", "diffusers", "a1111")
# mindone's text encoder parameter names: OpenAI CLIP (SD 1.x) and OpenCLIP (SD 2.x)
SD1_PARAM = "cond_stage_model.transformer.embedding_table"
SD2_PARAM = "cond_stage_model.model.token_embedding.embedding_table"
_DIM_FAMILY = {768: "SD 1.x", 1024: "SD 2.x"}


class EmbeddingError(CheckpointError):
    """One-line message naming the embedding file."""


@dataclass
class Embedding:
    token: str
    vectors: np.ndarray  # [n, dim] float32
    source_format: str  # one of FORMATS

    @property
    def num_vectors(self):
        return self.vectors.shape[0]

    @property
    def dim(self):
        return self.vectors.shape[1]


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


def _from_mapping(data, path):
    """Embedding from a safetensors dict or an unpickled object."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} is not a known embedding format (holds a {type(data).__name__}, not a dict)")
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"{path} is an SDXL embedding (clip_l/clip_g); only SD 1.x/2.x embeddings are supported")
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
    if len(tables) != 1:
        raise EmbeddingError(f"{path} holds {len(tables)} parameters named *embedding_table; a TI checkpoint has one")
    # via float32: asnumpy() cannot hand out bfloat16
    vectors = _as_vectors(data[tables[0]].astype(ms.float32).asnumpy(), path, tables[0])
    if "num_vectors" in data and int(data["num_vectors"].asnumpy()) != vectors.shape[0]:
        raise EmbeddingError(
            f"{path}: num_vectors is {int(data['num_vectors'].asnumpy())} but {tables[0]} has {vectors.shape[0]} rows"
        )
    token = data.get("placeholder_token")
    return Embedding(token if isinstance(token, str) and token else _stem(path), vectors, "ti_ckpt")


def load_embedding(path, token=None):
    """Read a TI embedding file of any supported format; `token` overrides the file's own name."""
    if not os.path.isfile(path):
        raise EmbeddingError(f"embedding file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        embedding = _from_mapping(load_torch_pickle(path), path)
    elif head[:1] == b"\x0a":
        # a MindSpore checkpoint is a protobuf whose first field (tag 1, length-delimited) is a parameter
        embedding = _read_ti_ckpt(path)
    else:
        # safetensors; anything else gets checkpoint_io's one-line "not a checkpoint" error
        embedding = _from_mapping(load_state_dict(path), path)
    if token:
        embedding.token = token
    return embedding


def _family(dim):
    return f" ({_DIM_FAMILY[dim]})" if dim in _DIM_FAMILY else ""


def check_dim(embedding, dim, path):
    """Refuse an embedding whose vectors do not fit the text encoder's width."""
    if embedding.dim != dim:
        raise EmbeddingError(
            f"{path} holds {embedding.dim}-d vectors{_family(embedding.dim)}; "
            f"this model's text encoder is {dim}-d{_family(dim)}"
        )


def ti_param_name(version):
    """mindone's name for the text encoder's embedding table: OpenCLIP for SD 2.x, OpenAI CLIP otherwise."""
    return SD2_PARAM if str(version).startswith("2") else SD1_PARAM


def save_ti_ckpt(path, vectors, placeholder_token, version, param_name=None):
    """Write ours/mindone `_ti.ckpt`; `param_name` defaults to mindone's name for `version`."""
    import mindspore as ms

    vectors = _as_vectors(vectors, path, "vectors")
    params = [{"name": param_name or ti_param_name(version), "data": ms.Tensor(vectors)}]
    extra = {
        "placeholder_token": placeholder_token,
        "num_vectors": vectors.shape[0],
        "version": str(version),
        "embedding_dim": vectors.shape[1],
    }
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


def save_diffusers(path, token, vectors):
    """diffusers `learned_embeds.safetensors`: `{token: [n, dim]}` (what `load_textual_inversion` reads)."""
    _save_safetensors(path, {token: _as_vectors(vectors, path, "vectors")})


def save_a1111_safetensors(path, token, vectors):
    """A1111/kohya `.safetensors` (`emb_params`). The file holds no name: A1111 uses the file's stem."""
    if _stem(path) != token:
        logger.warning("A1111 will call the embedding in %s %r, not %r (it names embeddings after their file)",
                       path, _stem(path), token)
    _save_safetensors(path, {"emb_params": _as_vectors(vectors, path, "vectors")})
