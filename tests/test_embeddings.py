import importlib.util
import itertools
import os

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ldm import embeddings as emb
from ldm.checkpoint_io import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "embeddings")


def _load_tool():
    path = os.path.join(ROOT, "tools", "convert_embedding.py")
    spec = importlib.util.spec_from_file_location("convert_embedding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_embedding = _load_tool()


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
    emb.check_dim(e, 1024, path)


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
    with pytest.raises(emb.EmbeddingError, match="holds 8-d vectors, not SD 1.x/2.x; pass --version"):
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
        emb.check_dim(e, 1024, "cat.safetensors")
    assert str(info.value) == (
        "cat.safetensors holds 768-d vectors (SD 1.x); this model's text encoder is 1024-d (SD 2.x)"
    )
    emb.check_dim(e, 768, "cat.safetensors")


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


def test_sdxl_embedding_is_refused(tmp_path):
    path = str(tmp_path / "xl.safetensors")
    save_file({"clip_l": _vectors(1, 768), "clip_g": _vectors(1, 1280)}, path)
    with pytest.raises(emb.EmbeddingError, match="is an SDXL embedding"):
        emb.load_embedding(path)


def test_inconsistent_ti_ckpt_is_refused(tmp_path):
    path = str(tmp_path / "bad_ti.ckpt")
    ms.save_checkpoint(
        [{"name": emb.SD1_PARAM, "data": ms.Tensor(_vectors(2, 8))}], path, append_dict={"num_vectors": 3}
    )
    with pytest.raises(emb.EmbeddingError, match="num_vectors is 3 but .*embedding_table has 2 rows"):
        emb.load_embedding(path)
