"""SDXL weights: the tiny SDXL (tools/dev/make_sdxl_fixtures.py) through both layouts into our cells,
against diffusers/transformers' outputs on the same fp16-rounded weights; SD <-> XL mixes refused; and
SDXL base 1.0's full-size key sets (tests/fixtures/checkpoint-keys/sdxl_*) loaded strictly, names and
shapes only, as tests/test_real_checkpoints.py does for SD 1.x/2.x.
"""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest

import ldm.convert
from ldm.checkpoint_io import CheckpointError
from ldm.convert import (IGNORED_SCHEDULE, IGNORED_TEXT_EXTRAS, build_pretrained, check_fits, collect_key_reports,
                         compare_keys, config_from_diffusers, load_into, load_pretrained, sd_version)
from ldm.models import build_models, config_differences, load_model_config, model_parts
from ldm.modules.openaimodel import size_embedding
from ldm.pretrained import get_version
from tools.check_full_size import KEY_LISTS, read_key_list

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "tiny-sdxl")
SINGLE_FILE = os.path.join(FIXTURES, "tiny-sdxl.safetensors")
TOLERANCE = 1e-4


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def tiny():
    """(config of the folder, {part: cell}, reference arrays), built once."""
    cfg = config_from_diffusers(FOLDER)
    cells = dict(zip(model_parts(cfg), build_models(cfg)))
    return cfg, cells, dict(np.load(os.path.join(FIXTURES, "tiny-sdxl-reference.npz")))


def test_folder_loads_strictly_and_matches_diffusers(tiny, pynative_mode):
    cfg, cells, ref = tiny
    _, parts, layout = load_pretrained(FOLDER, cfg)
    assert layout == "diffusers" and set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for part, cell in cells.items():
        # zero first, so a value left from an earlier test cannot pass for a loaded one
        for _, p in cell.parameters_and_names():
            p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
        load_into(cell, parts[part], part, FOLDER)

    context = cells["text_encoder"](ms.Tensor(ref["input_ids"])).asnumpy()
    context_2, pooled = (t.asnumpy() for t in cells["text_encoder_2"](ms.Tensor(ref["input_ids_2"])))
    y = np.concatenate([ref["unet_text_embeds"], size_embedding(
        ms.Tensor(ref["unet_time_ids"]), cfg.size_embedding_dim).asnumpy()], axis=-1)
    out = cells["unet"](ms.Tensor(ref["unet_x"]), ms.Tensor(ref["unet_t"]), ms.Tensor(ref["unet_context"]),
                        ms.Tensor(y)).asnumpy()
    mean, logvar = cells["vae"].encode(ms.Tensor(ref["vae_x"]))
    decoded = cells["vae"].decode(ms.Tensor(ref["vae_z"])).asnumpy()
    diffs = {"context": _max_diff(context, ref["text_hidden"]), "context_2": _max_diff(context_2, ref["text_hidden_2"]),
             "pooled": _max_diff(pooled, ref["pooled"]), "y": _max_diff(y, ref["unet_y"]),
             "unet": _max_diff(out, ref["unet_out"]), "mean": _max_diff(mean.asnumpy(), ref["vae_mean"]),
             "logvar": _max_diff(logvar.asnumpy(), ref["vae_logvar"]), "decoded": _max_diff(decoded, ref["vae_decoded"])}
    assert max(diffs.values()) < TOLERANCE, diffs
    # the references are not trivially small: a dropped layer would show
    assert np.abs(ref["unet_out"]).mean() > 0.05 and np.abs(ref["pooled"]).mean() > 0.1
    assert np.abs(ref["text_hidden"]).mean() > 0.1 and np.abs(ref["text_hidden_2"]).mean() > 0.1


def test_single_file_gives_the_folder_weights_exactly(tiny):
    # the same fp16 numbers, however stored: OpenCLIP's packed q/k/v, its transposed text_projection, the
    # VAE attention as 1x1 convs; so the folder's outputs above hold for the single file as well
    cfg = tiny[0]
    folder = load_pretrained(FOLDER, cfg)[1]
    (_, parts, layout), report = _load(SINGLE_FILE, cfg)
    assert (layout, report.total, sorted(report.ignored[IGNORED_TEXT_EXTRAS])) == ("original", 873, [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale"])
    assert set(parts) == set(folder)
    for part, weights in parts.items():
        assert set(weights) == set(folder[part]), part
        for key, value in weights.items():
            assert value.shape == folder[part][key].shape and np.array_equal(value, folder[part][key]), (part, key)


def test_placeholder_vectors_in_both_encoders_match_diffusers(tiny, pynative_mode):
    # diffusers gave the 2-vector <cat-toy> ids 49408, 49409 in both tokenizers; bigG's pooled output must
    # still be read at the first <|endoftext|>, not at the placeholder (the largest id)
    cfg, cells, ref = tiny
    _, parts, _ = load_pretrained(FOLDER, cfg)
    for part in ("text_encoder", "text_encoder_2"):
        load_into(cells[part], parts[part], part, FOLDER)
    assert list(ref["ti.input_ids"][0, 5:7]) == list(ref["ti.input_ids_2"][0, 5:7]) == [49408, 49409]
    context = cells["text_encoder"](ms.Tensor(ref["ti.input_ids"]), ms.Tensor(ref["ti.vectors_l"])).asnumpy()
    context_2, pooled = (t.asnumpy() for t in cells["text_encoder_2"](ms.Tensor(ref["ti.input_ids_2"]),
                                                                    ms.Tensor(ref["ti.vectors_g"])))
    diffs = {"context": _max_diff(context, ref["ti.text_hidden"]),
             "context_2": _max_diff(context_2, ref["ti.text_hidden_2"]), "pooled": _max_diff(pooled, ref["ti.pooled"])}
    assert max(diffs.values()) < TOLERANCE, diffs


def test_config_of_the_tiny_folder_and_of_its_single_file(tiny):
    cfg = tiny[0]
    assert sd_version(cfg) == "xl" and model_parts(cfg)[3:] == ("text_encoder_2",)
    unet = cfg.unet
    assert (unet.transformer_depth, unet.attention_resolutions, unet.adm_in_channels) == ((1, 2, 1), (2, 4), 58)
    assert (unet.num_heads, unet.num_head_channels, unet.context_dim, cfg.size_embedding_dim) == (-1, 4, 14, 8)
    text, text_2 = cfg.text_encoder, cfg.text_encoder_2
    assert (text.layer, text.projection_dim, text.use_quick_gelu, text.pad_token) == (
        "penultimate", 0, True, "<|endoftext|>")
    assert (text_2.layer, text_2.projection_dim, text_2.use_quick_gelu, text_2.pad_token, text_2.width) == (
        "penultimate", 10, False, "!", 8)
    assert (cfg.scale_factor, cfg.image_size, cfg.parameterization) == (0.13025, 64, "eps")
    # the single file's own config: the shapes agree with the folder's, the rest is SDXL base's
    inferred, parts, _ = load_pretrained(SINGLE_FILE)
    check_fits(inferred, cfg, SINGLE_FILE)
    assert (inferred.unet.num_head_channels, inferred.image_size, inferred.size_embedding_dim) == (64, 1024, 8)
    # OpenCLIP's text_projection [width, projection] (x @ P) becomes HF's Linear weight [projection, width]
    assert parts["text_encoder_2"]["text_projection.weight"].shape == (10, 8)


def test_build_pretrained_builds_and_loads_the_second_text_encoder(tiny, pynative_mode):
    ref = tiny[2]
    _, cells, layout = build_pretrained(SINGLE_FILE, tiny[0])
    assert layout == "original" and len(cells) == 4
    _, pooled = cells[3](ms.Tensor(ref["input_ids_2"]))
    assert _max_diff(pooled.asnumpy(), ref["pooled"]) < TOLERANCE


@pytest.mark.parametrize("source,config_of,weights,config", [
    ("tiny-sdxl.safetensors", "tiny-sd1", "XL", "1.x"), ("tiny-sdxl", "tiny-sd2", "XL", "2.x"),
    ("tiny-sd2.safetensors", "tiny-sdxl", "2.x", "XL"), ("tiny-sd1", "tiny-sdxl", "1.x", "XL")])
def test_sd_and_xl_mixes_fail_in_one_line(source, config_of, weights, config):
    cfg = config_from_diffusers(os.path.join(FIXTURES, config_of))
    path = os.path.join(FIXTURES, source)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, cfg)
    message = str(err.value)
    assert message.startswith(path) and "\n" not in message
    assert f"holds Stable Diffusion {weights} weights, but the model config is for SD {config}" in message


def test_folder_with_half_of_sdxl_fails_in_one_line(tmp_path):
    folder = tmp_path / "half"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(folder))
    assert str(err.value) == (f"{folder}: has addition_embed_type 'text_time' in unet/config.json but no text_encoder_2/; "
                              "an SDXL folder has both, an SD 1.x/2.x one neither")


# ------------------------------------------------------------------------------ SDXL base 1.0, full size

def _key_set(name, extra=()):
    """The key set with zero-memory values (each its index, to tell copies apart)."""
    keys = read_key_list(name) + list(extra)
    return {key: np.broadcast_to(np.float32(i), shape) for i, (key, shape) in enumerate(keys)}


@pytest.fixture(scope="module")
def xl():
    """SDXL base's shipped config and its cells (names and shapes only), built once."""
    cfg = load_model_config(get_version("xl").config_path)
    return cfg, dict(zip(model_parts(cfg), build_models(cfg, init=False)))


def _assert_strict_fit(parts, cells):
    assert set(parts) == set(cells)
    for part, cell in cells.items():
        assert compare_keys(cell, parts[part]) == ([], [], []), part
        assert len(parts[part]) == len(list(cell.get_parameters())), part


def _load(path, cfg=None):
    with collect_key_reports() as reports:
        out = load_pretrained(path, cfg)
    return out, reports[-1]


def test_original_key_set_loads_strictly_with_the_xl_config(xl, monkeypatch):
    cfg, cells = xl
    sd = _key_set("sdxl_original")
    monkeypatch.setattr(ldm.convert, "load_state_dict", lambda path: sd)
    (_, parts, layout), report = _load("models/sd_xl_base_1.0.safetensors", cfg)
    assert (layout, report.total) == ("original", 2515)
    assert report.ignored == {IGNORED_TEXT_EXTRAS: ["conditioner.embedders.0.transformer.text_model.embeddings."
                                                    "position_ids", "conditioner.embedders.1.model.logit_scale"]}
    _assert_strict_fit(parts, cells)
    # all 32 bigG blocks are kept (the pooled output needs the last); text_projection is taken transposed
    projection = parts["text_encoder_2"]["text_projection.weight"]
    assert projection.shape == (1280, 1280) and projection.strides == sd[
        "conditioner.embedders.1.model.text_projection"].T.strides
    # without a config: SDXL base's, read from the weights
    (inferred, _, _), _ = _load("models/sd_xl_base_1.0.safetensors")
    assert config_differences(inferred, cfg) == []


def test_sgm_schedule_buffer_is_set_aside_and_sd_keys_in_an_xl_file_are_errors(xl, monkeypatch):
    cfg = xl[0]
    sd = _key_set("sdxl_original", extra=[("denoiser.sigmas", (1000,))])
    monkeypatch.setattr(ldm.convert, "load_state_dict", lambda path: sd)
    _, report = _load("sgm.safetensors", cfg)
    assert report.ignored[IGNORED_SCHEDULE] == ["denoiser.sigmas"]
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.zeros(768, np.float16)
    with pytest.raises(CheckpointError, match=r"^mixed.safetensors: unexpected keys, .*: 1 \(cond_stage_model\."):
        load_pretrained("mixed.safetensors", cfg)


def test_diffusers_key_set_and_configs_load_strictly(xl, monkeypatch, tmp_path):
    cfg, cells = xl
    with open(os.path.join(KEY_LISTS, "sdxl_diffusers_configs.json")) as f:
        for name, content in json.load(f).items():
            os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
            (tmp_path / name).write_text(json.dumps(content))
    by_part = {}
    for key, value in _key_set("sdxl_diffusers").items():
        part, _, name = key.partition("/")
        by_part.setdefault(part, {})[name] = value
    for part in by_part:
        (tmp_path / part / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(ldm.convert, "load_state_dict", lambda path: by_part[os.path.basename(os.path.dirname(path))])
    (folder_cfg, parts, layout), report = _load(str(tmp_path), cfg)
    assert (layout, report.total, report.ignored) == ("diffusers", 2641, {})
    _assert_strict_fit(parts, cells)
    # the folder's own config means what the shipped YAML does (the VAE's sample_size is only a tiling hint)
    (own, _, _), _ = _load(str(tmp_path))
    assert config_differences(own, cfg) == [("vae.resolution", 1024, 256)]


def test_inspect_tool_reports_both_text_encoders():
    from tools.inspect_checkpoint import describe

    lines = []
    assert describe(os.path.join(FIXTURES, "tiny-sdxl.safetensors"), os.path.join(FIXTURES, "tiny-sdxl"),
                    out=lines.append)
    text = "\n".join(lines)
    assert "version: SDXL (linear transformer projections, OpenAI CLIP ViT-L + OpenCLIP ViT-bigG" in text
    assert "    text_projection.weight (10, 8)" in text
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert f"  {part}: missing 0, unexpected 0, shape mismatch 0" in text
