import base64
import itertools
import json
import os

import huggingface_hub
import mindspore as ms
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from safetensors.numpy import load_file, save_file

from ldm import embeddings as emb
from ldm.checkpoint_io import CheckpointError
from tools import convert_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "embeddings")


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(FIXTURES, "expected.npz"))


def _vectors(n=3, dim=768, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_a1111_pt_is_named_after_its_file(expected):
    e = emb.load_embedding(os.path.join(FIXTURES, "fixture-a1111.pt"))
    assert (e.token, e.source_format, e.vectors.dtype) == ("fixture-a1111", "a1111", np.float32)
    np.testing.assert_array_equal(e.vectors, expected["a1111"])
    assert emb.load_embedding(os.path.join(FIXTURES, "fixture-a1111.pt"), token="<mine>").token == "<mine>"


def test_diffusers_bin(expected):
    e = emb.load_embedding(os.path.join(FIXTURES, "learned_embeds.bin"))
    assert (e.token, e.source_format, e.num_vectors, e.dim) == ("<fixture-bin>", "diffusers", 3, 8)
    np.testing.assert_array_equal(e.vectors, expected["diffusers"])
    old = emb.load_embedding(os.path.join(FIXTURES, "learned_embeds_1d.bin"))
    assert old.token == "<old-bin>" and old.vectors.shape == (1, 8)
    np.testing.assert_array_equal(old.vectors[0], expected["diffusers_1d"])


def test_diffusers_and_a1111_safetensors(tmp_path):
    vectors = _vectors(2, 16)
    save_file({"<cat-toy>": vectors}, str(tmp_path / "learned_embeds.safetensors"))
    e = emb.load_embedding(str(tmp_path / "learned_embeds.safetensors"))
    assert (e.token, e.source_format) == ("<cat-toy>", "diffusers")
    np.testing.assert_array_equal(e.vectors, vectors)
    # kohya writes fp16; vectors come back as float32
    save_file({"emb_params": vectors.astype(np.float16)}, str(tmp_path / "kohya-style.safetensors"))
    k = emb.load_embedding(str(tmp_path / "kohya-style.safetensors"))
    assert (k.token, k.source_format, k.vectors.dtype) == ("kohya-style", "a1111", np.float32)
    np.testing.assert_array_equal(k.vectors, vectors.astype(np.float16).astype(np.float32))


def test_mindone_sd2_ti_ckpt(tmp_path):
    vectors = _vectors(3, 1024)
    path = str(tmp_path / "SDv2.0_textual_inversion_3000_ti.ckpt")
    ms.save_checkpoint(
        [{"name": emb.SD2_PARAM, "data": ms.Tensor(vectors)}],
        path,
        append_dict={"placeholder_token": "<cat-toy>", "num_vectors": 3},
    )
    e = emb.load_embedding(path)
    assert (e.token, e.source_format) == ("<cat-toy>", "ti_ckpt")
    np.testing.assert_array_equal(e.vectors, vectors)
    assert not e.is_sdxl and e.dims == (1024,) and e.vectors_2 is None
    emb.check_fits(e, (1024,), path)


def test_our_ti_ckpt_records_version_and_dim(tmp_path):
    path = str(tmp_path / "out_ti.ckpt")
    emb.save_ti_ckpt(path, _vectors(2), "<t>", "1.5")
    assert sorted(os.listdir(tmp_path)) == ["out_ti.ckpt"]
    raw = ms.load_checkpoint(path)
    assert raw[emb.SD1_PARAM].shape == (2, 768)
    assert (raw["placeholder_token"], raw["version"]) == ("<t>", "1.5")
    assert int(raw["num_vectors"].asnumpy()) == 2 and int(raw["embedding_dim"].asnumpy()) == 768
    emb.save_ti_ckpt(path, _vectors(1, 1024), "<t>", "2.1")
    assert emb.SD2_PARAM in ms.load_checkpoint(path)


_WRITERS = {
    "ti_ckpt": ("cat-toy_ti.ckpt", lambda p, t, v: emb.save_ti_ckpt(p, v, t, "1.5")),
    "diffusers": ("learned_embeds.safetensors", emb.save_diffusers),
    # A1111 takes the token from the file name
    "a1111": ("cat-toy.safetensors", emb.save_a1111_safetensors),
    # A1111 takes the token from the card's name
    "a1111_card": ("cat.png", lambda p, t, v: emb.save_png_card(p, np.zeros((64, 64, 3), np.uint8), t, v, 1, None)),
}


@pytest.mark.parametrize("src_format,dst_format", list(itertools.permutations(emb.FORMATS, 2)))
def test_round_trip_is_bit_exact(tmp_path, src_format, dst_format):
    vectors = _vectors(3, 768, seed=3 * emb.FORMATS.index(src_format) + emb.FORMATS.index(dst_format))
    name, write = _WRITERS[src_format]
    src = str(tmp_path / name)
    write(src, "cat-toy", vectors)
    mid = str(tmp_path / "mid" / _WRITERS[dst_format][0])
    os.makedirs(os.path.dirname(mid))
    back = str(tmp_path / "back" / name)
    os.makedirs(os.path.dirname(back))
    convert_embedding.convert(src, mid, dst_format)
    convert_embedding.convert(mid, back, src_format)
    for path, fmt in ((mid, dst_format), (back, src_format)):
        e = emb.load_embedding(path)
        assert (e.token, e.source_format) == ("cat-toy", fmt)
        assert e.vectors.dtype == np.float32 and e.vectors.tobytes() == vectors.tobytes()


def test_a1111_pt_converts_to_every_writable_format(tmp_path, expected):
    src = os.path.join(FIXTURES, "fixture-a1111.pt")
    assert convert_embedding.main([src, str(tmp_path / "x_ti.ckpt"), "--to", "ti_ckpt", "--version", "tiny"]) == 0
    e = emb.load_embedding(str(tmp_path / "x_ti.ckpt"))
    assert e.token == "fixture-a1111"
    np.testing.assert_array_equal(e.vectors, expected["a1111"])
    convert_embedding.main([src, str(tmp_path / "d.safetensors"), "--to", "diffusers", "--token", "<toy>"])
    np.testing.assert_array_equal(load_file(str(tmp_path / "d.safetensors"))["<toy>"], expected["a1111"])


def test_converter_refuses_to_overwrite(tmp_path, capsys):
    src = os.path.join(FIXTURES, "learned_embeds.bin")
    dst = tmp_path / "x.safetensors"
    dst.write_bytes(b"keep")
    with pytest.raises(SystemExit) as info:
        convert_embedding.main([src, str(dst), "--to", "a1111"])
    assert info.value.code == 1 and dst.read_bytes() == b"keep"
    assert f"{dst} already exists; pass --overwrite" in capsys.readouterr().err
    assert convert_embedding.main([src, str(dst), "--to", "a1111", "--overwrite"]) == 0
    assert load_file(str(dst))["emb_params"].shape == (3, 8)


def test_converter_needs_version_for_unknown_width_and_checks_it(tmp_path):
    src = os.path.join(FIXTURES, "learned_embeds.bin")
    with pytest.raises(emb.EmbeddingError, match="holds 8-d vectors, not SD 1.x/2.x or SDXL; pass --version"):
        convert_embedding.convert(src, str(tmp_path / "a_ti.ckpt"), "ti_ckpt")
    v1 = str(tmp_path / "v1.safetensors")
    emb.save_diffusers(v1, "<t>", _vectors(1, 768))
    message = r"v1.safetensors holds 768-d vectors; SD 2.0 has a 1024-d text encoder"
    with pytest.raises(emb.EmbeddingError, match=message):
        convert_embedding.convert(v1, str(tmp_path / "b_ti.ckpt"), "ti_ckpt", version="2.0")
    assert not os.path.exists(tmp_path / "b_ti.ckpt")


def test_dim_mismatch_message_is_one_line_naming_the_file():
    e = emb.Embedding("<t>", _vectors(1, 768), "diffusers")
    with pytest.raises(emb.EmbeddingError) as info:
        emb.check_fits(e, (1024,), "cat.safetensors")
    assert str(info.value) == (
        "cat.safetensors holds 768-d vectors (SD 1.x); this model's text encoder is 1024-d (SD 2.x)"
    )
    emb.check_fits(e, (768,), "cat.safetensors")


def test_unknown_files_are_refused_by_name(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not an embedding")
    with pytest.raises(CheckpointError) as info:
        emb.load_embedding(str(text))
    assert str(text) in str(info.value) and "\n" not in str(info.value)
    two = str(tmp_path / "two.safetensors")
    save_file({"a": _vectors(1, 8), "b": _vectors(1, 8)}, two)
    with pytest.raises(emb.EmbeddingError, match=r"two.safetensors is not a known embedding format \(keys: a, b\)"):
        emb.load_embedding(two)
    with pytest.raises(emb.EmbeddingError, match="does not exist"):
        emb.load_embedding(str(tmp_path / "missing.pt"))


def test_inconsistent_ti_ckpt_is_refused(tmp_path):
    path = str(tmp_path / "bad_ti.ckpt")
    ms.save_checkpoint(
        [{"name": emb.SD1_PARAM, "data": ms.Tensor(_vectors(2, 8))}], path, append_dict={"num_vectors": 3}
    )
    with pytest.raises(emb.EmbeddingError, match="num_vectors is 3 but .*embedding_table has 2 rows"):
        emb.load_embedding(path)


# --- files from the wild, made by each tool's own code (tools/dev/make_embedding_fixtures.py) ----------

def test_sd_concepts_bin_holds_one_768_vector(expected):
    e = emb.load_embedding(os.path.join(FIXTURES, "cat-toy", "learned_embeds.bin"))
    assert (e.token, e.source_format, e.vectors.shape) == ("<cat-toy>", "diffusers", (1, 768))
    np.testing.assert_array_equal(e.vectors[0], expected["sd_concepts"])


def test_a1111_fp16_pt_ignores_its_name_field_as_a1111_does(expected):
    # the file's `name` is "my-style-1500"; A1111 registers a .pt under its file's stem
    e = emb.load_embedding(os.path.join(FIXTURES, "a1111-fp16.pt"))
    assert (e.token, e.source_format, e.vectors.dtype) == ("a1111-fp16", "a1111", np.float32)
    np.testing.assert_array_equal(e.vectors, expected["a1111_fp16"].astype(np.float32))


def test_kohya_safetensors_with_1d_emb_params(expected):
    e = emb.load_embedding(os.path.join(FIXTURES, "kohya-1d.safetensors"))
    assert (e.token, e.source_format, e.vectors.shape) == ("kohya-1d", "a1111", (1, 768))
    np.testing.assert_array_equal(e.vectors[0], expected["kohya_1d"].astype(np.float32))


@pytest.mark.parametrize("name", ["a1111-card.png", "a1111-card-pixels-only.png"])
def test_a1111_card_from_text_chunk_or_pixels(expected, name):
    # A1111 registers a card under the `name` inside it, not the file's stem
    e = emb.load_embedding(os.path.join(FIXTURES, name))
    assert (e.token, e.source_format) == ("tiny-card-500", "a1111_card")
    np.testing.assert_array_equal(e.vectors, expected["card"])


def _stripes(pixels, image_width):
    width = (pixels.shape[1] - image_width - 2) // 2
    return pixels[:, :width], pixels[:, -width:]


def test_our_card_carries_a1111s_bytes(tmp_path, expected):
    """Same embedding, same image height: the text chunk and the two data stripes equal A1111's to the byte."""
    reference = Image.open(os.path.join(FIXTURES, "a1111-card.png"))
    path = str(tmp_path / "card.png")
    # the preview itself may differ (our caption is drawn with Pillow's font): only the data must match
    emb.save_png_card(path, np.full((64, 64, 3), 90, np.uint8), "tiny-card-500", expected["card"], 500, "tiny-sd1")
    ours = Image.open(path)
    assert ours.size == reference.size
    assert ours.text[emb.CARD_KEY] == reference.text[emb.CARD_KEY]
    for mine, theirs in zip(_stripes(np.asarray(ours), 64), _stripes(np.asarray(reference), 64)):
        np.testing.assert_array_equal(mine, theirs)


def test_trainer_sized_card_reads_back_without_its_text_chunk(tmp_path):
    vectors = _vectors(3, 768)
    image = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    path = tmp_path / "SDv1.5_textual_inversion_300_ti.png"
    emb.save_png_card(str(path), image, "<cat-toy>", vectors, 300, "v1-5-pruned-emaonly.safetensors")
    # the text chunk as A1111 reads it: base64 JSON of the .pt's dict, tensors as TORCHTENSOR lists
    card = Image.open(path)
    data = json.loads(base64.b64decode(card.text[emb.CARD_KEY]))
    assert (data["name"], data["step"]) == ("<cat-toy>", 300)
    assert data["sd_checkpoint_name"] == "v1-5-pruned-emaonly.safetensors"
    assert data["string_to_token"] == {"*": 265}
    np.testing.assert_array_equal(np.float32(data["string_to_param"]["*"]["TORCHTENSOR"]), vectors)
    assert card.size == (128 + 2 * _stripe_width(card), 128)
    # an image host strips the text chunk: the pixels still hold the embedding
    card.save(tmp_path / "stripped.png")
    assert "sd-ti-embedding" not in Image.open(tmp_path / "stripped.png").text
    e = emb.load_embedding(str(tmp_path / "stripped.png"))
    assert (e.token, e.source_format) == ("<cat-toy>", "a1111_card")
    assert e.vectors.tobytes() == vectors.tobytes()


def _stripe_width(card):
    gaps = np.flatnonzero((np.asarray(card) & 0x0F).sum(axis=(0, 2)) == 0)
    return gaps[0] + 1


def test_plain_image_is_not_an_embedding(tmp_path):
    path = str(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    with pytest.raises(emb.EmbeddingError, match=r"photo.png is an image without an embedding"):
        emb.load_embedding(path)


# --- hub concept repos -----------------------------------------------------------------------------------

def _fake_hub(monkeypatch, files):
    """hf_hub_download answering from `files` ({filename: local path}); other files are missing on the hub."""
    calls = []

    def download(repo_id, filename, **_):
        calls.append((repo_id, filename))
        if filename not in files:
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}")
        return files[filename]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_concept_repo_id_loads_through_the_hub_cache(monkeypatch, tmp_path, expected):
    concept = os.path.join(FIXTURES, "cat-toy")
    calls = _fake_hub(monkeypatch, {"learned_embeds.bin": os.path.join(concept, "learned_embeds.bin"),
                                    "token_identifier.txt": os.path.join(concept, "token_identifier.txt")})
    e = emb.load_embedding("sd-concepts-library/cat-toy")
    assert (e.token, e.vectors.shape) == ("<cat-toy>", (1, 768))
    np.testing.assert_array_equal(e.vectors[0], expected["sd_concepts"])
    # learned_embeds_2.bin: the second file an SDXL concept of diffusers' script would have
    assert calls == [("sd-concepts-library/cat-toy", name) for name in ("learned_embeds.safetensors",
                     "learned_embeds.bin", "learned_embeds_2.bin", "token_identifier.txt")]
    # token_identifier.txt names the token over the file's own key; an explicit token wins over both
    (tmp_path / "token_identifier.txt").write_text("<other>\n")
    _fake_hub(monkeypatch, {"learned_embeds.bin": os.path.join(concept, "learned_embeds.bin"),
                            "token_identifier.txt": str(tmp_path / "token_identifier.txt")})
    assert emb.load_embedding("sd-concepts-library/cat-toy").token == "<other>"
    assert emb.load_embedding("sd-concepts-library/cat-toy", token="<mine>").token == "<mine>"
    # without token_identifier.txt (a diffusers-trained repo), the token stored with the vectors
    _fake_hub(monkeypatch, {"learned_embeds.safetensors": os.path.join(concept, "learned_embeds.bin")})
    assert emb.load_embedding("someone/concept").token == "<cat-toy>"


def test_concept_repo_offline_is_one_line_naming_repo_file_and_fix(monkeypatch, tmp_path):
    # the hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well as the variable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(emb.EmbeddingError) as info:
        emb.load_embedding("sd-concepts-library/cat-toy")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("sd-concepts-library/cat-toy is not a file, and its learned_embeds.safetensors or "
                              "learned_embeds.bin could not be had from huggingface.co/sd-concepts-library/cat-toy")
    assert "HF_HUB_OFFLINE" in message and message.endswith("download the file and pass its path")


def test_missing_file_paths_are_not_taken_for_repo_ids(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, {})
    for path in ("weights/cat_ti.ckpt", "out/learned_embeds.bin", str(tmp_path / "x" / "y"), "a/b/c"):
        with pytest.raises(emb.EmbeddingError, match="does not exist"):
            emb.load_embedding(path)
    assert calls == []


def test_converter_writes_a_card_around_a_given_image(tmp_path):
    preview = tmp_path / "preview.png"
    Image.fromarray(np.full((96, 80, 3), 200, np.uint8)).save(preview)
    src = os.path.join(FIXTURES, "learned_embeds.bin")
    dst = str(tmp_path / "card.png")
    assert convert_embedding.main([src, dst, "--to", "a1111_card", "--image", str(preview)]) == 0
    card = Image.open(dst)
    assert card.height == 96 and card.width == 80 + 2 * _stripe_width(card)
    e = emb.load_embedding(dst)
    assert (e.token, e.num_vectors) == ("<fixture-bin>", 3)


# --- SDXL: clip_l [N, 768] + clip_g [N, 1280] ------------------------------------------------------------

def _xl(n=2, seed=0, dims=(768, 1280)):
    return tuple(_vectors(n, dim, seed=seed + i) for i, dim in enumerate(dims))


def _assert_xl(e, token, fmt, clip_l, clip_g):
    assert (e.token, e.source_format, e.is_sdxl, e.num_vectors) == (token, fmt, True, len(clip_l))
    assert e.dims == (clip_l.shape[1], clip_g.shape[1])
    assert e.vectors.dtype == e.vectors_2.dtype == np.float32
    assert e.vectors.tobytes() == clip_l.astype(np.float32).tobytes()
    assert e.vectors_2.tobytes() == clip_g.astype(np.float32).tobytes()


@pytest.mark.parametrize("name,key", [("kohya-xl.safetensors", "kohya_xl"), ("kohya-xl.pt", "kohya_xl_pt")])
def test_kohya_sdxl_files_are_named_after_their_file(expected, name, key):
    # kohya's sdxl_train_textual_inversion.py: bf16 .safetensors, fp16 torch .pt; A1111 names them by file stem
    e = emb.load_embedding(os.path.join(FIXTURES, name))
    _assert_xl(e, "kohya-xl", "a1111", expected[key + "_l"], expected[key + "_g"])
    emb.check_fits(e, (768, 1280), name)


@pytest.mark.parametrize("name", ["learned_embeds.safetensors", "learned_embeds_2.safetensors"])
def test_diffusers_sdxl_pair_reads_whole_from_either_file(expected, name):
    e = emb.load_embedding(os.path.join(FIXTURES, "diffusers-xl", name))
    _assert_xl(e, "<cat-toy>", "diffusers", expected["diffusers_xl_l"], expected["diffusers_xl_g"])
    assert emb.load_embedding(os.path.join(FIXTURES, "diffusers-xl", name), token="<mine>").token == "<mine>"


def test_mindone_sdxl_ti_ckpt(tmp_path):
    # mindone's SDXL TextualInversionManager: both token_embedding tables, placeholder_token, num_vectors
    clip_l, clip_g = _xl(3)
    path = str(tmp_path / "SD-XL-base-1.0_3000_ti.ckpt")
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(v)} for name, v in zip(emb.XL_PARAMS, (clip_l, clip_g))],
                       path, append_dict={"placeholder_token": "<cat-toy>", "num_vectors": 3})
    _assert_xl(emb.load_embedding(path), "<cat-toy>", "ti_ckpt", clip_l, clip_g)


def test_our_sdxl_ti_ckpt_records_both_sets_version_and_dims(tmp_path):
    path = str(tmp_path / "out_ti.ckpt")
    clip_l, clip_g = _xl(2)
    emb.save_ti_ckpt(path, clip_l, "<t>", "xl", vectors_2=clip_g)
    raw = ms.load_checkpoint(path)
    assert [raw[name].shape for name in emb.XL_PARAMS] == [(2, 768), (2, 1280)]
    assert (raw["placeholder_token"], raw["version"]) == ("<t>", "xl")
    assert [int(raw[k].asnumpy()) for k in ("num_vectors", "embedding_dim", "embedding_dim_2")] == [2, 768, 1280]
    _assert_xl(emb.load_embedding(path), "<t>", "ti_ckpt", clip_l, clip_g)


def test_our_sdxl_files_have_the_reference_tools_layouts(tmp_path):
    """Our kohya/A1111 file and diffusers pair hold the keys and shapes of the files the tools write."""
    clip_l, clip_g = _xl(2)
    emb.save_a1111_safetensors(str(tmp_path / "kohya-xl.safetensors"), "kohya-xl", clip_l, clip_g)
    _assert_same_layout(str(tmp_path / "kohya-xl.safetensors"), os.path.join(FIXTURES, "kohya-xl.safetensors"))
    os.makedirs(tmp_path / "pair")
    emb.save_diffusers(str(tmp_path / "pair" / "learned_embeds.safetensors"), "<cat-toy>", clip_l, clip_g)
    assert sorted(os.listdir(tmp_path / "pair")) == sorted(os.listdir(os.path.join(FIXTURES, "diffusers-xl")))
    for name in os.listdir(tmp_path / "pair"):
        _assert_same_layout(str(tmp_path / "pair" / name), os.path.join(FIXTURES, "diffusers-xl", name))


def _assert_same_layout(ours, theirs):
    ours, theirs = load_file(ours), load_file(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


_XL_WRITERS = {
    "ti_ckpt": ("cat-toy_ti.ckpt", lambda p, t, v, v2: emb.save_ti_ckpt(p, v, t, "xl", vectors_2=v2)),
    "diffusers": ("learned_embeds.safetensors", emb.save_diffusers),
    "a1111": ("cat-toy.safetensors", emb.save_a1111_safetensors),
}


@pytest.mark.parametrize("src_format,dst_format", list(itertools.permutations(_XL_WRITERS, 2)))
def test_sdxl_round_trip_is_bit_exact(tmp_path, src_format, dst_format):
    clip_l, clip_g = _xl(3, seed=10 * list(_XL_WRITERS).index(src_format) + list(_XL_WRITERS).index(dst_format))
    name, write = _XL_WRITERS[src_format]
    src = str(tmp_path / name)
    write(src, "cat-toy", clip_l, clip_g)
    mid = str(tmp_path / "mid" / _XL_WRITERS[dst_format][0])
    back = str(tmp_path / "back" / name)
    os.makedirs(os.path.dirname(mid))
    os.makedirs(os.path.dirname(back))
    convert_embedding.convert(src, mid, dst_format)
    convert_embedding.convert(mid, back, src_format)
    for path, fmt in ((mid, dst_format), (back, src_format)):
        _assert_xl(emb.load_embedding(path), "cat-toy", fmt, clip_l, clip_g)


def test_fixtures_convert_to_every_sdxl_format(tmp_path, expected):
    src = os.path.join(FIXTURES, "diffusers-xl", "learned_embeds_2.safetensors")
    assert convert_embedding.main([src, str(tmp_path / "x_ti.ckpt"), "--to", "ti_ckpt"]) == 0
    assert ms.load_checkpoint(str(tmp_path / "x_ti.ckpt"))["version"] == "xl"
    assert convert_embedding.main([str(tmp_path / "x_ti.ckpt"), str(tmp_path / "x.safetensors"), "--to", "a1111"]) == 0
    kohya = load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(kohya["clip_l"], expected["diffusers_xl_l"])
    np.testing.assert_array_equal(kohya["clip_g"], expected["diffusers_xl_g"])
    steps = str(tmp_path / "learned_embeds-steps-500.safetensors")
    assert convert_embedding.main([os.path.join(FIXTURES, "kohya-xl.pt"), steps, "--to", "diffusers"]) == 0
    # diffusers' names for the pair saved at step 500
    assert (tmp_path / "learned_embeds_2-steps-500.safetensors").is_file()
    pair = emb.load_embedding(str(tmp_path / "learned_embeds_2-steps-500.safetensors"))
    _assert_xl(pair, "kohya-xl", "diffusers", expected["kohya_xl_pt_l"], expected["kohya_xl_pt_g"])


def test_all_vectors_puts_clip_l_columns_first():
    clip_l, clip_g = _xl(2, dims=(4, 6))
    e = emb.Embedding("<t>", clip_l, "a1111", clip_g)
    np.testing.assert_array_equal(e.all_vectors, np.concatenate([clip_l, clip_g], axis=1))
    assert emb.Embedding("<t>", clip_l, "a1111").all_vectors is clip_l


def test_diffusers_pair_names():
    assert emb.diffusers_pair("out/learned_embeds.safetensors") == (
        os.path.join("out", "learned_embeds.safetensors"), os.path.join("out", "learned_embeds_2.safetensors"))
    assert emb.diffusers_pair("learned_embeds_2-steps-500.safetensors") == (
        "learned_embeds-steps-500.safetensors", "learned_embeds_2-steps-500.safetensors")
    for name in ("cat.safetensors", "learned_embeds_1d.bin", "my_learned_embedsX.bin"):
        assert emb.diffusers_pair(name) is None


# --- SDXL refusals: one line, naming the file ------------------------------------------------------------

def _one_line(info):
    message = str(info.value)
    assert "\n" not in message
    return message


def test_sd_and_sdxl_embeddings_do_not_cross(tmp_path):
    sd1 = emb.Embedding("<t>", _vectors(1, 768), "a1111")
    with pytest.raises(emb.EmbeddingError) as info:
        emb.check_fits(sd1, (768, 1280), "cat.pt")
    assert _one_line(info) == ("cat.pt holds one set of 768-d vectors (SD 1.x); this SDXL model needs an SDXL "
                               "embedding, 768-d clip_l and 1280-d clip_g vectors")
    clip_l, clip_g = _xl(1)
    xl = emb.Embedding("<t>", clip_l, "a1111", clip_g)
    for widths, family in (((768,), "SD 1.x"), ((1024,), "SD 2.x")):
        with pytest.raises(emb.EmbeddingError) as info:
            emb.check_fits(xl, widths, "xl.safetensors")
        assert _one_line(info) == ("xl.safetensors is an SDXL embedding (768-d clip_l and 1280-d clip_g vectors); "
                                   f"this model ({family}) has one {widths[0]}-d text encoder")
    with pytest.raises(emb.EmbeddingError) as info:
        emb.check_fits(xl, (32, 64), "xl.safetensors")
    assert _one_line(info) == ("xl.safetensors holds 768-d / 1280-d vectors (SDXL); "
                               "this model's text encoders are 32-d / 64-d")


def test_half_a_diffusers_pair_names_the_missing_file(tmp_path):
    save_file({"<t>": _vectors(2, 1280)}, str(tmp_path / "learned_embeds_2.safetensors"))
    path = str(tmp_path / "learned_embeds_2.safetensors")
    e = emb.load_embedding(path)
    assert (e.is_sdxl, e.dims) == (False, (1280,))
    with pytest.raises(emb.EmbeddingError) as info:
        emb.check_fits(e, (768, 1280), path)
    assert _one_line(info).endswith("; for diffusers' SDXL pair, put learned_embeds.safetensors beside it")


def test_mixed_vector_counts_are_refused(tmp_path):
    path = str(tmp_path / "mixed.safetensors")
    save_file({"clip_l": _vectors(2, 768), "clip_g": _vectors(3, 1280)}, path)
    with pytest.raises(emb.EmbeddingError) as info:
        emb.load_embedding(path)
    assert _one_line(info) == (f"{path}: clip_l has 2 vectors but clip_g has 3; "
                               "an SDXL embedding has as many for each text encoder")
    ckpt = str(tmp_path / "mixed_ti.ckpt")
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(_vectors(n, dim))}
                        for name, n, dim in zip(emb.XL_PARAMS, (2, 1), (768, 1280))], ckpt)
    with pytest.raises(emb.EmbeddingError, match=r"mixed_ti.ckpt: .*token_embedding.embedding_table has 2 vectors but"):
        emb.load_embedding(ckpt)
    save_file({"<t>": _vectors(2, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<t>": _vectors(1, 1280)}, str(tmp_path / "learned_embeds_2.safetensors"))
    with pytest.raises(emb.EmbeddingError, match="learned_embeds.safetensors has 2 vectors but "
                                                 "learned_embeds_2.safetensors has 1"):
        emb.load_embedding(str(tmp_path / "learned_embeds.safetensors"))
    with pytest.raises(emb.EmbeddingError, match="vectors has 2 vectors but vectors_2 has 1"):
        emb.save_a1111_safetensors(str(tmp_path / "w.safetensors"), "w", _vectors(2, 768), _vectors(1, 1280))
    assert not os.path.exists(tmp_path / "w.safetensors")


def test_half_or_mismatched_sdxl_files_are_refused(tmp_path):
    half = str(tmp_path / "half.safetensors")
    save_file({"clip_l": _vectors(1, 768)}, half)
    with pytest.raises(emb.EmbeddingError, match=r"half.safetensors is half an SDXL embedding: it has no clip_g"):
        emb.load_embedding(half)
    save_file({"<a>": _vectors(1, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<b>": _vectors(1, 1280)}, str(tmp_path / "learned_embeds_2.safetensors"))
    with pytest.raises(emb.EmbeddingError, match=r"are named as diffusers' SDXL pair but hold different tokens"):
        emb.load_embedding(str(tmp_path / "learned_embeds_2.safetensors"))
    three = str(tmp_path / "three_ti.ckpt")
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(_vectors(1, 8))} for name in emb.XL_PARAMS + (emb.SD1_PARAM,)],
                       three)
    with pytest.raises(emb.EmbeddingError, match=r"holds 3 parameters named \*embedding_table; a TI checkpoint "
                                                 "has one, or for SDXL the two"):
        emb.load_embedding(three)


def test_sdxl_diffusers_output_needs_diffusers_name(tmp_path):
    with pytest.raises(emb.EmbeddingError, match="a diffusers SDXL embedding is two files, learned_embeds"):
        emb.save_diffusers(str(tmp_path / "cat.safetensors"), "<t>", *_xl(1))
    assert os.listdir(tmp_path) == []


def test_converter_sdxl_versions_cards_and_overwrite(tmp_path, capsys):
    src = str(tmp_path / "cat.safetensors")
    emb.save_a1111_safetensors(src, "cat", *_xl(2))
    with pytest.raises(emb.EmbeddingError, match=r"cat.safetensors holds 768-d clip_l and 1280-d clip_g vectors; "
                                                 r"SD 1.5 has a 768-d text encoder"):
        convert_embedding.convert(src, str(tmp_path / "a_ti.ckpt"), "ti_ckpt", version="1.5")
    sd1 = str(tmp_path / "sd1.safetensors")
    emb.save_a1111_safetensors(sd1, "sd1", _vectors(2, 768))
    with pytest.raises(emb.EmbeddingError, match=r"sd1.safetensors holds 768-d vectors; SDXL's text encoders are "
                                                 r"768-d and 1280-d"):
        convert_embedding.convert(sd1, str(tmp_path / "b_ti.ckpt"), "ti_ckpt", version="xl")
    with pytest.raises(emb.EmbeddingError, match="is an SDXL embedding: A1111 cards hold SD 1.x/2.x embeddings only"):
        convert_embedding.convert(src, str(tmp_path / "c.png"), "a1111_card")
    tiny = str(tmp_path / "tiny.safetensors")
    emb.save_a1111_safetensors(tiny, "tiny", *_xl(1, dims=(32, 64)))
    with pytest.raises(emb.EmbeddingError, match="holds 32-d clip_l and 64-d clip_g vectors, not SD 1.x/2.x or SDXL; "
                                                 "pass --version"):
        convert_embedding.convert(tiny, str(tmp_path / "d_ti.ckpt"), "ti_ckpt")
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".safetensors")] == []
    # the pair's second file is not overwritten either
    (tmp_path / "learned_embeds_2.safetensors").write_bytes(b"keep")
    with pytest.raises(SystemExit):
        convert_embedding.main([src, str(tmp_path / "learned_embeds.safetensors"), "--to", "diffusers"])
    assert "learned_embeds_2.safetensors already exists" in capsys.readouterr().err
    assert (tmp_path / "learned_embeds_2.safetensors").read_bytes() == b"keep"
    assert convert_embedding.main([src, str(tmp_path / "learned_embeds.safetensors"), "--to", "diffusers",
                                   "--overwrite"]) == 0
    assert "token 'cat', 2 x 768-d clip_l and 1280-d clip_g vectors" in capsys.readouterr().out
