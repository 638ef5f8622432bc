"""The SDXL parts of the model cells and config: per-level transformer depth, label_emb (the vector y),
the size embedding, the text encoders' "penultimate" context and pooled output, and configs/xl-inference.yaml.

Tiny random models; expected values are computed here by hand from the cells' own weights (numerical
parity with diffusers on a tiny SDXL is tests/test_sdxl_weights.py's).
"""
import math
import os
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ldm.errors import ModelConfigError, UserInputError
from ldm.models import (ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, build_models, config_differences,
                        load_model_config, model_config_from_dict, model_parts)
from ldm.modules.clip_text import EOS_TOKEN_ID, CLIPTextModel
from ldm.modules.openaimodel import UNetModel, size_embedding, timestep_embedding, timestep_frequencies

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
XL_YAML = os.path.join(CONFIGS, "xl-inference.yaml")

pytestmark = pytest.mark.usefixtures("pynative_mode")

TINY_UNET = dict(model_channels=16, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_res_blocks=1,
                 num_heads=-1, num_head_channels=8, transformer_depth=(1, 2, 3), context_dim=12,
                 use_linear_in_transformer=True, norm_num_groups=4)
# real vocabulary size: the ids are the real <|startoftext|> / <|endoftext|> and placeholders above them
TINY_TEXT = dict(vocab_size=49408, context_length=8, width=8, layers=3, heads=2, intermediate_size=16,
                 use_quick_gelu=False)
# one level, for the forward passes (compiling and running op by op cost seconds per block)
SMALL_UNET = dict(TINY_UNET, channel_mult=(1,), attention_resolutions=(1,), transformer_depth=1)
BOS, FIRST_PLACEHOLDER = 49406, 49408


def _param_shapes(cell):
    return {name: tuple(p.shape) for name, p in cell.parameters_and_names()}


def _transformer_depths(cell):
    """`{SpatialTransformer prefix: number of transformer blocks}` read from the parameter names."""
    depths = {}
    for name in _param_shapes(cell):
        if m := re.match(r"(.*)\.transformer_blocks\.(\d+)\.", name):
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def _set(param, value):
    param.set_data(Tensor(np.asarray(value, np.float32)))


def _randomize(cell, seed):
    """Nonzero values everywhere (zero-initialised output convs would hide the UNet's inputs)."""
    rng = np.random.default_rng(seed)
    for _, p in cell.parameters_and_names():
        _set(p, rng.standard_normal(p.shape) * 0.2)


# ------------------------------------------------------------------------------------------------ UNet

def test_per_level_transformer_depth_and_heads():
    unet = UNetModel(**TINY_UNET)
    # level 0 (ds 1) has no attention; levels 1, 2 have depths 2, 3; the middle block takes the last level's
    assert _transformer_depths(unet) == {
        "input_blocks.3.1": 2, "input_blocks.5.1": 3, "middle_block.1": 3,
        "output_blocks.0.1": 3, "output_blocks.1.1": 3, "output_blocks.2.1": 2, "output_blocks.3.1": 2}
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 64 // 8   # 64-wide level, 8 per head
    assert unet.input_blocks[3][1].transformer_blocks[1].attn2.heads == 32 // 8
    assert "label_emb.0.0.weight" not in _param_shapes(unet)

    # one number = that depth everywhere: the same names as before per-level depths existed
    uniform = dict(TINY_UNET, transformer_depth=2)
    per_level = dict(TINY_UNET, transformer_depth=(2, 2, 2))
    assert _param_shapes(UNetModel(**uniform)) == _param_shapes(UNetModel(**per_level))
    with pytest.raises(ModelConfigError, match=r"transformer_depth \(1, 2\) needs one depth per level"):
        UNetModel(**dict(TINY_UNET, transformer_depth=(1, 2)))


def test_label_emb_adds_the_vector_to_the_timestep_embedding():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    t = Tensor(np.array([3, 700], np.int32))
    context = Tensor(rng.standard_normal((2, 5, 12)).astype(np.float32))
    y = rng.standard_normal((2, 10)).astype(np.float32)

    xl = UNetModel(**SMALL_UNET, adm_in_channels=10)
    shapes = _param_shapes(xl)
    assert {k: v for k, v in shapes.items() if k.startswith("label_emb.")} == {
        "label_emb.0.0.weight": (64, 10), "label_emb.0.0.bias": (64,),
        "label_emb.0.2.weight": (64, 64), "label_emb.0.2.bias": (64,)}   # time_embed_dim 4 * 16
    _randomize(xl, 1)
    ms.set_context(mode=ms.GRAPH_MODE)   # as training and sampling call it
    try:
        out = xl(x, t, context, Tensor(y)).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)

    # the same UNet without label_emb, the vector's embedding added to time_embed's output bias instead
    sd = UNetModel(**SMALL_UNET)
    params = dict(xl.parameters_and_names())
    for name, p in sd.parameters_and_names():
        _set(p, params[name].asnumpy())
    assert set(params) - set(_param_shapes(sd)) == {k for k in params if k.startswith("label_emb.")}
    w0, b0, w2, b2 = (params[f"label_emb.0.{k}"].asnumpy() for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    h = y @ w0.T + b0
    label = (h / (1 + np.exp(-h))) @ w2.T + b2   # Linear, SiLU, Linear
    bias = params["time_embed.2.bias"].asnumpy()
    refs = []
    for i in range(2):
        _set(sd.time_embed[2].bias, bias + label[i])
        refs.append(sd(x[i:i + 1], t[i:i + 1], context[i:i + 1], Tensor(y[i:i + 1])).asnumpy())
    np.testing.assert_allclose(out, np.concatenate(refs), atol=1e-4, rtol=1e-4)
    assert np.abs(refs[0] - refs[1]).max() > 1e-2
    # an SD UNet: no vector input (a y given is not used), no label_emb parameters
    _set(sd.time_embed[2].bias, bias)
    np.testing.assert_array_equal(sd(x[:1], t[:1], context[:1]).asnumpy(),
                                  sd(x[:1], t[:1], context[:1], Tensor(y[:1])).asnumpy())


def test_size_embedding_is_the_timestep_sinusoid_per_id():
    ids = np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 37, 0, 896, 1152]], np.float32)
    emb = size_embedding(Tensor(ids), 16).asnumpy()
    assert emb.shape == (2, 6 * 16) and emb.dtype == np.float32
    freqs = Tensor(timestep_frequencies(16))
    for b in range(2):
        for k in range(6):
            one = timestep_embedding(Tensor(ids[b, k:k + 1]), freqs).asnumpy()[0]
            np.testing.assert_allclose(emb[b, 16 * k:16 * (k + 1)], one, atol=1e-6)
    # cos half first, frequencies 10000^(-i/8) (sgm's timestep_embedding, diffusers flip_sin_to_cos=True)
    args = 768.0 * 10000.0 ** (-np.arange(8) / 8)
    np.testing.assert_allclose(emb[0, 16:32], np.concatenate([np.cos(args), np.sin(args)]), atol=2e-4)


# ------------------------------------------------------------------------------------------------ text encoders

def _text_encoder(seed, **kwargs):
    ms.set_seed(seed)
    return CLIPTextModel(**TINY_TEXT, **kwargs)


def _prompt_ids():
    # row 0: a placeholder (49408) before the first <|endoftext|>, then <|endoftext|> padding (CLIP-L style);
    # row 1: placeholder 49409, <|endoftext|>, then "!" padding (id 0, bigG style)
    return np.array([[BOS, 320, FIRST_PLACEHOLDER, EOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID,
                      EOS_TOKEN_ID],
                     [BOS, FIRST_PLACEHOLDER + 1, 500, 1125, EOS_TOKEN_ID, 0, 0, 0]], np.int32)


def _extra():
    return Tensor(np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32))


def _hidden_states(te, ids, extra):
    """HF's hidden_states: the embeddings and each layer's output, run layer by layer here."""
    tm = te.text_model
    mask = tm.causal_mask[:ids.shape[1], :ids.shape[1]]
    states = [tm.embeddings(Tensor(ids), extra)]
    for layer in tm.encoder.layers:
        states.append(layer(states[-1], mask))
    return [s.asnumpy() for s in states]


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * norm.weight.asnumpy() + norm.bias.asnumpy()


def test_pooled_output_is_taken_at_the_first_endoftext():
    te = _text_encoder(0, layer="penultimate", projection_dim=6)
    assert _param_shapes(te)["text_projection.weight"] == (6, 8)
    assert "text_projection.bias" not in _param_shapes(te)
    ids, extra = _prompt_ids(), _extra()
    context, pooled = te(Tensor(ids), extra)
    assert context.shape == (2, 8, 8) and pooled.shape == (2, 6)

    last = _hidden_states(te, ids, extra)[-1]
    first_eos = [list(row).index(EOS_TOKEN_ID) for row in ids]
    assert first_eos == [3, 4] and list(ids.argmax(-1)) == [2, 1]   # argmax would pick the placeholders
    projection = te.text_projection.weight.asnumpy()
    expected = _layer_norm(last[[0, 1], first_eos], te.text_model.final_layer_norm) @ projection.T
    np.testing.assert_allclose(pooled.asnumpy(), expected, atol=1e-5)
    at_argmax = _layer_norm(last[[0, 1], ids.argmax(-1)], te.text_model.final_layer_norm) @ projection.T
    assert np.abs(at_argmax - expected).max() > 1e-2


def test_penultimate_context_and_clip_skip():
    te = _text_encoder(1, layer="penultimate", projection_dim=6)
    ids, extra = _prompt_ids(), _extra()
    states = _hidden_states(te, ids, extra)
    context, pooled = te(Tensor(ids), extra)
    # the output of layer L-1 as it is: no final layer norm (diffusers' hidden_states[-2])
    np.testing.assert_allclose(context.asnumpy(), states[-2], atol=1e-5)

    # clip skip counts from the penultimate layer; the pooled output still comes from all layers
    te.set_clip_skip(2)
    skipped, pooled_skipped = te(Tensor(ids), extra)
    np.testing.assert_allclose(skipped.asnumpy(), states[-3], atol=1e-5)
    np.testing.assert_array_equal(pooled_skipped.asnumpy(), pooled.asnumpy())
    with pytest.raises(UserInputError) as err:
        te.set_clip_skip(3)
    assert str(err.value) == ("clip_skip 3: this text encoder conditions on layer 2 of its 3; use --clip_skip 1 "
                              "(layer 2, no skip) to 2")

    # without projection_dim: the context alone; "last" = the last layer through the final layer norm
    alone = _text_encoder(1, layer="penultimate")(Tensor(ids), extra)
    np.testing.assert_array_equal(alone.asnumpy(), context.asnumpy())
    last = _text_encoder(1)(Tensor(ids), extra).asnumpy()
    np.testing.assert_allclose(last, _layer_norm(states[-1], te.text_model.final_layer_norm), atol=1e-5)
    with pytest.raises(ModelConfigError, match="layer 'pooled' must be one of last, penultimate"):
        CLIPTextModel(**TINY_TEXT, layer="pooled")


def test_text_encoder_with_projection_in_graph_mode():
    te = _text_encoder(2, layer="penultimate", projection_dim=6)
    ids, extra = Tensor(_prompt_ids()), _extra()
    context, pooled = te(ids, extra)
    weights = Tensor(np.random.default_rng(3).standard_normal((2, 6)).astype(np.float32))

    def loss(e):
        c, p = te(ids, e)
        return (p * weights).sum() + c.sum()

    @ms.jit
    def step(e):
        return loss(e), ms.grad(loss)(e)

    value, grad = step(extra)
    np.testing.assert_allclose(value.asnumpy(), loss(extra).asnumpy(), rtol=1e-5)
    # the gradient reaching the placeholder vectors through both outputs, against finite differences
    direction = np.random.default_rng(4).standard_normal(extra.shape).astype(np.float32)
    h = 1e-2
    plus, minus = (float(loss(extra + Tensor(s * h * direction)).asnumpy()) for s in (1, -1))
    analytic = float((grad.asnumpy() * direction).sum())
    assert abs(analytic) > 0.1 and (plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-3)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_context, graph_pooled = te(ids, extra)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(graph_context.asnumpy(), context.asnumpy(), atol=1e-5)
    np.testing.assert_allclose(graph_pooled.asnumpy(), pooled.asnumpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ config

def _clip_text_params(width, layers, intermediate, projection=0, vocab=49408, length=77):
    """Parameter count of an HF CLIP text model (with projection: CLIPTextModelWithProjection)."""
    attention = 4 * (width * width + width)
    mlp = width * intermediate + intermediate + intermediate * width + width
    layer = attention + mlp + 2 * 2 * width          # + layer_norm1, layer_norm2
    return vocab * width + length * width + layers * layer + 2 * width + width * projection


def test_xl_yaml_reads_as_sdxl_base():
    cfg = load_model_config(XL_YAML)
    assert cfg.unet == UNetConfig(
        model_channels=320, attention_resolutions=(4, 2), num_res_blocks=2, channel_mult=(1, 2, 4), num_heads=-1,
        num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048, use_linear_in_transformer=True,
        adm_in_channels=2816)
    assert cfg.vae == VAEConfig()
    assert cfg.text_encoder == TextEncoderConfig(layer="penultimate")   # CLIP ViT-L/14
    assert cfg.text_encoder_2 == TextEncoderConfig(
        width=1280, layers=32, heads=20, intermediate_size=5120, use_quick_gelu=False, pad_token="!",
        layer="penultimate", projection_dim=1280)
    assert (cfg.parameterization, cfg.linear_start, cfg.linear_end, cfg.timesteps) == ("eps", 0.00085, 0.012, 1000)
    assert (cfg.scale_factor, cfg.image_size, cfg.size_embedding_dim) == (0.13025, 1024, 256)
    # the vector y: bigG's pooled output and 3 pairs of size/crop ids
    assert cfg.unet.adm_in_channels == cfg.text_encoder_2.projection_dim + 6 * cfg.size_embedding_dim


def test_full_size_sdxl_builds_without_data():
    cfg = load_model_config(XL_YAML)
    assert model_parts(cfg) == ("unet", "vae", "text_encoder", "text_encoder_2")
    assert model_parts(ModelConfig()) == ("unet", "vae", "text_encoder")
    cells = build_models(cfg, init=False)
    assert len(cells) == 4 and len(build_models(load_model_config(os.path.join(CONFIGS, "v1-inference.yaml")),
                                                init=False)) == 3
    unet, _, clip_l, big_g = (_param_shapes(c) for c in cells)

    assert sum(map(math.prod, clip_l.values())) == _clip_text_params(768, 12, 3072)
    assert sum(map(math.prod, big_g.values())) == _clip_text_params(1280, 32, 5120, projection=1280)
    assert len(clip_l) == 2 + 12 * 16 + 2 and len(big_g) == 2 + 32 * 16 + 2 + 1
    assert "text_model.encoder.layers.11.mlp.fc2.weight" in clip_l and "text_projection.weight" not in clip_l
    assert big_g["text_projection.weight"] == (1280, 1280)
    assert big_g["text_model.final_layer_norm.weight"] == (1280,)

    assert (unet["label_emb.0.0.weight"], unet["label_emb.0.2.weight"]) == ((1280, 2816), (1280, 1280))
    depths = _transformer_depths(cells[0])
    assert sum(depths.values()) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2
    assert depths["middle_block.1"] == 10 and not any(k.startswith("input_blocks.1.") for k in depths)
    assert unet["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert cells[0].input_blocks[4][1].transformer_blocks[0].attn1.heads == 10   # 640 / 64


def test_config_differences_with_and_without_text_encoder_2():
    xl, sd = load_model_config(XL_YAML), ModelConfig()
    diffs = {name: (a, b) for name, a, b in config_differences(xl, sd)}
    assert diffs["text_encoder_2.width"] == (1280, None) and diffs["unet.adm_in_channels"] == (2816, 0)
    assert config_differences(sd, ModelConfig(), ["text_encoder_2.layers"]) == []
    # a level without attention has no transformers: its depth means nothing
    same = ModelConfig(unet=UNetConfig(**dict(vars(xl.unet), transformer_depth=[0, 2, 10])))
    assert config_differences(same, xl, ["unet.transformer_depth"]) == []
    assert config_differences(ModelConfig(unet=UNetConfig(transformer_depth=(1, 1, 1, 1))), sd) == []


def _xl_yaml():
    import yaml
    with open(XL_YAML, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["model"]["params"]["network_config"].update(target="sgm.modules.diffusionmodules.video_model."
                                                                      "VideoUNet"),
     "model.params.network_config.target sgm.modules.diffusionmodules.video_model.VideoUNet is not an SDXL part"),
    (lambda c: c["model"]["params"]["conditioner_config"]["params"]["emb_models"][1].update(
        target="sgm.modules.encoders.modules.FrozenT5Embedder"),
     "emb_models[1].target sgm.modules.encoders.modules.FrozenT5Embedder is not an SDXL base conditioner"),
    (lambda c: c["model"]["params"]["conditioner_config"]["params"]["emb_models"][1]["params"].update(
        arch="ViT-H-14"), "emb_models[1].params.arch 'ViT-H-14': only 'ViT-bigG-14' (SDXL base) is supported"),
    (lambda c: c["model"]["params"]["conditioner_config"]["params"]["emb_models"][0]["params"].update(
        layer_idx=5), "emb_models[0].params.layer 'hidden' (layer_idx 5): use 'hidden' with layer_idx 11"),
    (lambda c: c["model"]["params"]["conditioner_config"]["params"]["emb_models"].pop(),
     "emb_models: not SDXL base's conditioners"),
    (lambda c: c["model"]["params"]["network_config"]["params"].update(adm_in_channels=2560),
     "adm_in_channels 2560 (with num_classes 'sequential') must be the conditioner's vector width 2816"),
    (lambda c: c["model"]["params"]["denoiser_config"]["params"]["scaling_config"].update(
        target="sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling"),
     "scaling_config.target sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling is not supported"),
])
def test_sgm_yaml_errors_name_the_key(edit, message):
    config = _xl_yaml()
    edit(config)
    with pytest.raises(ModelConfigError) as err:
        model_config_from_dict(config, "their.yaml")
    assert str(err.value).startswith("their.yaml: ") and message in str(err.value) and "\n" not in str(err.value)


def test_sgm_yaml_reads_v_prediction_and_schedule():
    config = _xl_yaml()
    denoiser = config["model"]["params"]["denoiser_config"]["params"]
    denoiser["scaling_config"]["target"] = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
    denoiser["discretization_config"]["params"] = {"linear_start": 0.001, "linear_end": 0.02}
    cfg = model_config_from_dict(config)
    assert (cfg.parameterization, cfg.linear_start, cfg.linear_end) == ("v", 0.001, 0.02)


def test_sdxl_vae_computes_in_float32_whatever_the_dtype():
    """SDXL's VAE overflows in fp16 (diffusers' force_upcast): it keeps float32; SD's follows the dtype."""
    unet, vae, _, _ = build_models(load_model_config(XL_YAML), dtype=ms.float16, init=False)
    assert (unet.dtype, vae.dtype) == (ms.float16, ms.float32)
    sd_vae = build_models(load_model_config(os.path.join(CONFIGS, "v1-inference.yaml")), ms.float16, init=False)[1]
    assert sd_vae.dtype == ms.float16
