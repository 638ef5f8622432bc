import json
import logging

import numpy as np
import pytest

from ldm import tokenizer as tk
from ldm.errors import UserInputError

PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def base_vocab():
    return tk.bpe_vocab_and_merges()


def test_shipped_vocabulary_shape(base_vocab):
    vocab, merges = base_vocab
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # printable bytes come first: "!" is id 0, the SD 2.x pad token
    assert vocab["!"] == 0 and vocab["a</w>"] == 320


def test_known_ids_and_sd1_padding():
    tok = tk.load_tokenizer()
    ids = tk.tokenize(tok, "a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == PHOTO_OF_A_CAT
    assert (ids[0, 7:] == 49407).all()
    # CLIP lowercases and splits punctuation off
    assert tk.tokenize(tok, "A Photo of  a CAT!")[0, :8].tolist() == PHOTO_OF_A_CAT[:-1] + [256, 49407]


def test_sd2_pads_with_exclamation_mark():
    ids = tk.tokenize(tk.load_tokenizer(pad_token="!"), ["a photo of a cat", "a"])
    assert ids[0, :7].tolist() == PHOTO_OF_A_CAT
    assert (ids[0, 7:] == 0).all()
    assert ids[1, :3].tolist() == [49406, 320, 49407] and (ids[1, 3:] == 0).all()


def test_folder_tokenizer_keeps_its_pad_unless_overridden(tmp_path, base_vocab):
    vocab, merges = base_vocab
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # a diffusers model root resolves to its tokenizer/ subfolder
    from_folder = tk.load_tokenizer(str(tmp_path))
    assert tk.tokenize(from_folder, "a photo of a cat")[0].tolist() == PHOTO_OF_A_CAT + [0] * 70
    overridden = tk.load_tokenizer(str(folder), pad_token="<|endoftext|>")
    assert tk.tokenize(overridden, "a photo of a cat")[0].tolist() == PHOTO_OF_A_CAT + [49407] * 70


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no CLIP tokenizer"):
        tk.load_tokenizer(str(tmp_path))


def test_truncation_warns_with_removed_text(caplog):
    tok = tk.load_tokenizer()
    prompt = " ".join(["cat"] * 75 + ["dog", "bird"])
    with caplog.at_level(logging.WARNING, logger="ldm.tokenizer"):
        ids = tk.tokenize(tok, [prompt, "a photo of a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and (ids[0, 1:76] == 2368).all() and ids[0, 76] == 49407
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "removed: 'dog bird'" in warnings[0]


def test_exactly_77_tokens_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.tokenizer"):
        ids = tk.tokenize(tk.load_tokenizer(), " ".join(["cat"] * 75))
    assert ids[0, 76] == 49407 and not caplog.records


def test_placeholders_get_ids_after_the_vocabulary():
    tok = tk.load_tokenizer()
    assert tk.add_placeholder_tokens(tok, "<cat-toy>", 3) == [49408, 49409, 49410]
    # a second concept continues after the first: its rows follow in extra_embeddings
    assert tk.add_placeholder_tokens(tok, "<style>", 1) == [49411]
    names = {"<cat-toy>": tk.placeholder_names("<cat-toy>", 3)}
    prompt = tk.expand_placeholders("a <cat-toy> backpack in <style>", names)
    assert prompt == "a <cat-toy> <cat-toy>_1 <cat-toy>_2 backpack in <style>"
    ids = tk.tokenize(tok, prompt)[0]
    assert ids[:8].tolist() == [49406, 320, 49408, 49409, 49410, 14894, 530, 49411]
    # a fresh tokenizer does not see the placeholders of another one
    assert len(tk.load_tokenizer()) == 49408


def test_expand_is_idempotent_and_leaves_hand_written_tokens():
    names = {"<t>": ["<t>", "<t>_1"]}
    once = tk.expand_placeholders("<t>, <t> <t>_1 and <t>_1", names)
    assert once == "<t> <t>_1, <t> <t>_1 and <t>_1"
    assert tk.expand_placeholders(once, names) == once
    assert tk.expand_placeholders("<t> only", {"<t>": ["<t>"]}) == "<t> only"


def test_existing_token_is_refused_by_name():
    tok = tk.load_tokenizer()
    with pytest.raises(UserInputError, match=r"placeholder token 'cat' already exists .*pick another placeholder"):
        tk.add_placeholder_tokens(tok, "cat", 1)
    tk.add_placeholder_tokens(tok, "<t>", 2)
    with pytest.raises(UserInputError, match="'<t>_1' already exists"):
        tk.add_placeholder_tokens(tok, "<t>_1", 1)
    assert len(tok) == 49410


def test_initializer_ids():
    tok = tk.load_tokenizer()
    assert tk.initializer_ids(tok, "cat") == [2368]
    assert tk.initializer_ids(tok, "a photo") == [320, 1125]
    with pytest.raises(UserInputError, match="gives no tokens"):
        tk.initializer_ids(tok, "  ")
    tk.add_placeholder_tokens(tok, "<t>", 1)
    with pytest.raises(UserInputError, match=r"placeholder tokens \['<t>'\]"):
        tk.initializer_ids(tok, "a <t>")


def test_init_vectors_spreading_rule():
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.testing.assert_array_equal(tk.init_vectors(table, [2], 3), table[[2, 2, 2]])
    np.testing.assert_array_equal(tk.init_vectors(table, [2, 5], 3), table[[2, 5, 2]])
    np.testing.assert_array_equal(tk.init_vectors(table, [1, 2, 3], 1), table[[2]])
    np.testing.assert_array_equal(tk.init_vectors(table, [1, 2, 3], 3), table[[1, 2, 3]])
    # 3 tokens over 2 vectors: groups [1, 2] and [3]
    np.testing.assert_array_equal(tk.init_vectors(table, [1, 2, 3], 2), np.stack([table[1:3].mean(0), table[3]]))


def test_random_init_is_small_and_seeded():
    table = np.zeros((10, 64), np.float32)
    a = tk.init_vectors(table, None, 2, seed=7)
    assert a.shape == (2, 64) and a.dtype == np.float32
    assert 0.005 < a.std() < 0.015
    np.testing.assert_array_equal(a, tk.init_vectors(table, [], 2, seed=7))
    assert not np.array_equal(a, tk.init_vectors(table, None, 2, seed=8))
