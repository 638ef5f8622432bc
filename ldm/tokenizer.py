"""CLIP tokenizer for Stable Diffusion, plus the placeholder tokens of Textual Inversion.

The tokenizer is a transformers `CLIPTokenizer`, either loaded from a folder (the
`openai/clip-vit-large-patch14` tree, or the `tokenizer/` folder of a diffusers model) or built offline
from the BPE merges file shipped in this package, so no download is ever needed.

Placeholder tokens get ids after the base vocabulary (49408, 49409, ...). The text encoder maps an id
`>= vocab_size` to row `id - vocab_size` of its `extra_embeddings`, so the order in which placeholder
tokens are added is the row order of the vectors handed to the text encoder.
"""

import functools
import gzip
import logging
import os
import re

import numpy as np

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)


class _NoTorchNotice(logging.Filter):
    """transformers announces on import that it has no PyTorch; we use only its tokenizer, on purpose."""

    def filter(self, record):
        return "PyTorch was not found" not in record.getMessage()


# on the logger transformers will log to, before transformers is imported (below, lazily)
logging.getLogger("transformers").addFilter(_NoTorchNotice())

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The BPE file holds more merges than CLIP uses: the vocabulary is capped at 49408 entries
# (256 bytes + their end-of-word forms + merges + 2 specials).
_NUM_MERGES = 49408 - 2 * 256 - 2


def _byte_chars():
    """The 256 base symbols of CLIP's byte-level BPE, in vocabulary order.

    Printable latin-1 bytes stand for themselves and come first (in byte order); every other byte is
    then given a char from 256 upwards, so any byte sequence has a whitespace-free string form.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.lru_cache(maxsize=None)
def bpe_vocab_and_merges(bpe_path=BPE_PATH):
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is the "#version" header
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_tokenizer(path=None, pad_token=None):
    """A fresh `CLIPTokenizer` (fresh because placeholder tokens are added to it in place).

    path: None builds it from the shipped BPE file; a folder is loaded with `from_pretrained` (a diffusers
    model root is accepted too: its `tokenizer/` subfolder is used).
    pad_token: the text encoder's pad token ("<|endoftext|>" for SD 1.x, "!" for SD 2.x). It wins over the
    folder's own setting, since the openai tree is often reused for SD 2.x models; None keeps the folder's
    (or "<|endoftext|>" for the shipped vocabulary).
    """
    from transformers import CLIPTokenizer

    overrides = {"model_max_length": CONTEXT_LENGTH}
    if pad_token is not None:
        overrides["pad_token"] = pad_token
    if path is None:
        vocab, merges = bpe_vocab_and_merges()
        overrides.setdefault("pad_token", EOS)
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **overrides)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if os.path.isdir(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(f"{path} holds no CLIP tokenizer (expected vocab.json + merges.txt or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(path, **overrides)


def placeholder_names(placeholder, num_vectors):
    """`<t>`, `<t>_1`, ..., `<t>_{N-1}`: the diffusers/mindone naming of a multi-vector placeholder."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, placeholder, num_vectors=1):
    """Add the N tokens of `placeholder` to `tokenizer`; returns their ids (consecutive, after the vocabulary)."""
    names = placeholder_names(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    for name in names:
        # add_tokens() counts an existing vocabulary entry as added, so the check must come first
        if name in vocab:
            raise UserInputError(
                f"placeholder token {name!r} already exists in the tokenizer's vocabulary; pick another placeholder"
            )
    first = len(tokenizer)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(first, first + num_vectors)):
        raise RuntimeError(f"placeholder tokens of {placeholder!r} got ids {ids}, expected {first}..")
    return ids


def expand_placeholders(prompt, placeholders):
    """Replace each placeholder `<t>` in `prompt` by its tokens `<t> <t>_1 ...`.

    placeholders: {placeholder: [its token names]}. An already expanded placeholder, and the `<t>_i`
    tokens written out by hand, are left alone, so expanding twice changes nothing.
    """
    expansions = {p: " ".join(tokens) for p, tokens in placeholders.items() if len(tokens) > 1}
    if not expansions:
        return prompt
    alternatives = []
    # longest first, so that a placeholder that contains another one is matched whole
    for p in sorted(expansions, key=len, reverse=True):
        alternatives.append(re.escape(expansions[p]))
        alternatives.append(re.escape(p) + r"(?!_\d)")
    pattern = re.compile("|".join(alternatives))

    def replace(match):
        text = match.group(0)
        return expansions.get(text, text)

    return pattern.sub(replace, prompt)


def tokenize(tokenizer, prompts):
    """Token ids `np.int32 [B, 77]`, padded and truncated exactly like the diffusers pipelines.

    A prompt longer than 77 tokens (with the start/end tokens) is truncated, with a warning naming
    the part that was cut.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    full = tokenizer(prompts, verbose=False)["input_ids"]
    for prompt, seq in zip(prompts, full):
        if len(seq) > max_length:
            removed = tokenizer.decode(seq[max_length - 1 : -1])
            logger.warning(
                "prompt is longer than %d tokens and was truncated; removed: %r (prompt: %r)",
                max_length,
                removed,
                prompt,
            )
    return np.asarray(ids, dtype=np.int32)


def initializer_ids(tokenizer, text):
    """Token ids of an initializer text (one or more words) in the base vocabulary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:
        raise UserInputError(f"initializer text {text!r} gives no tokens; pass a word such as 'toy' or 'painting'")
    outside = [i for i in ids if i >= tokenizer.vocab_size]
    if outside:
        names = tokenizer.convert_ids_to_tokens(outside)
        raise UserInputError(f"initializer text {text!r} contains placeholder tokens {names}; use ordinary words")
    return ids


def init_vectors(table, ids, num_vectors, seed=0):
    """Initial TI vectors `[num_vectors, D]` float32 from the token embedding table `[V, D]`.

    With initializer ids, the tokens are shared out in order: when there are at least as many tokens as
    vectors, vector i is the mean of the i-th of N contiguous, near-equal groups of tokens (so N == 1
    gives the mean of all of them and N == len(ids) one token each); with fewer tokens than vectors they
    repeat cyclically (vector i = token i mod len(ids), the single-token case of diffusers/mindone).
    Without ids (None or empty), small random vectors: normal with std 0.01 from `seed`.
    """
    table = np.asarray(table)
    if not ids:
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((num_vectors, table.shape[1])) * 0.01).astype(np.float32)
    rows = table[np.asarray(ids)].astype(np.float32)
    if len(ids) < num_vectors:
        return rows[np.arange(num_vectors) % len(ids)]
    return np.stack([group.mean(axis=0) for group in np.array_split(rows, num_vectors)]).astype(np.float32)
