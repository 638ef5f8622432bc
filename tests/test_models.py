"""ldm.models / the model cells: YAML configs, tiny models, names, placeholder embeddings.

Numerical parity with diffusers/transformers (full-size names and shapes, tiny random-weight outputs)
was checked once in the dev venv; these tests pin what can be checked without torch.
"""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ldm.errors import ModelConfigError
from ldm.pipeline import VAEGraph
from ldm.models import (ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, build_models, load_model_config,
                        model_config_from_dict)
from ldm.modules.openaimodel import timestep_embedding, timestep_frequencies

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

TINY = ModelConfig(
    unet=UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                    context_dim=12, norm_num_groups=4),
    vae=VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                  norm_num_groups=4),
    text_encoder=TextEncoderConfig(vocab_size=50, context_length=6, width=12, layers=2, heads=2,
                                   intermediate_size=24))


pytestmark = pytest.mark.usefixtures("pynative_mode")


@pytest.fixture(scope="module")
def tiny():
    ms.set_seed(0)
    return build_models(TINY)


def _inputs():
    rng = np.random.default_rng(0)
    return dict(
        x=Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32)),
        t=Tensor(np.array([3, 999], np.int32)),
        ids=Tensor(np.array([[49 - 1, 5, 50, 7, 0, 0], [1, 51, 2, 3, 4, 0]], np.int32)),
        extra=Tensor(rng.standard_normal((2, 12)).astype(np.float32)),
        img=Tensor(rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)),
    )


def _run(models, inp):
    unet, vae, te = models
    ctx = te(inp["ids"], inp["extra"])
    eps = unet(inp["x"], inp["t"], ctx)
    mean, logvar = VAEGraph(vae, decode=False)(inp["img"])
    dec = VAEGraph(vae, decode=True)(mean)
    return ctx.asnumpy(), eps.asnumpy(), mean.asnumpy(), logvar.asnumpy(), dec.asnumpy()


def test_shipped_yaml_configs():
    v1 = load_model_config(os.path.join(CONFIGS, "v1-inference.yaml"))
    assert v1 == ModelConfig() == load_model_config(os.path.join(CONFIGS, "v1-train-textual-inversion.yaml"))
    v2 = load_model_config(os.path.join(CONFIGS, "v2-inference.yaml"))
    assert (v2.unet.num_heads, v2.unet.num_head_channels, v2.unet.use_linear_in_transformer) == (-1, 64, True)
    assert v2.unet.context_dim == v2.text_encoder.width == 1024
    te = v2.text_encoder
    assert (te.layers, te.heads, te.intermediate_size, te.use_quick_gelu, te.pad_token) == (23, 16, 4096, False, "!")
    assert (v2.parameterization, v2.image_size) == ("eps", 512)
    assert v2 == load_model_config(os.path.join(CONFIGS, "v2-train-textual-inversion.yaml"))
    vpred = load_model_config(os.path.join(CONFIGS, "v2-vpred-inference.yaml"))
    assert (vpred.parameterization, vpred.image_size, vpred.unet) == ("v", 768, v2.unet)


def test_yaml_defaults_and_errors():
    # OpenCLIP target without explicit flags: exact gelu and "!" padding; epsilon as PyYAML's string "1e-5"
    cfg = model_config_from_dict({"model": {"params": {
        "unet_config": {"params": {"num_head_channels": 64, "use_fp16": True}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {"ch": 64}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"width": 1024, "epsilon": "1e-5"}}}}})
    assert cfg.unet.num_heads == -1 and cfg.vae.ch == 64
    assert (cfg.text_encoder.use_quick_gelu, cfg.text_encoder.pad_token) == (False, "!")
    assert cfg.text_encoder.intermediate_size == 4096 and cfg.text_encoder.epsilon == 1e-5
    with pytest.raises(ModelConfigError, match="parameterization"):
        model_config_from_dict({"model": {"params": {"parameterization": "x0", "unet_config": {},
                                                     "first_stage_config": {}, "cond_stage_config": {}}}})
    with pytest.raises(ModelConfigError, match="unet_config"):
        model_config_from_dict({"model": {"params": {}}})


def test_timestep_embedding_is_cos_then_sin():
    freqs = timestep_frequencies(8)
    np.testing.assert_allclose(freqs, 10000.0 ** (-np.arange(4) / 4), rtol=1e-6)
    emb = timestep_embedding(Tensor(np.array([0, 5], np.int32)), Tensor(freqs)).asnumpy()
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]), atol=1e-6)


def test_parameter_names_follow_compvis_and_hf(tiny):
    unet, vae, te = tiny
    shapes = {}
    for cell in tiny:
        for name, p in cell.parameters_and_names():
            assert p.name == name  # no prefix surprises: the key a loader uses is the parameter's name
            shapes[name] = tuple(p.shape)
    expected = {
        "time_embed.0.weight": (64, 16),
        "input_blocks.0.0.weight": (16, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (16,),
        "input_blocks.1.0.out_layers.3.weight": (16, 16, 3, 3),
        "input_blocks.3.0.op.weight": (16, 16, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (32, 16, 1, 1),
        "input_blocks.4.1.proj_in.weight": (32, 32, 1, 1),
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (32, 12),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias": (32,),
        "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (256, 32),
        "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (32, 128),
        "input_blocks.4.1.transformer_blocks.0.norm3.weight": (32,),
        "middle_block.1.proj_out.weight": (32, 32, 1, 1),
        "middle_block.2.emb_layers.1.weight": (32, 64),
        "output_blocks.2.2.conv.weight": (32, 32, 3, 3),
        "output_blocks.3.0.skip_connection.weight": (16, 48, 1, 1),
        "out.0.weight": (16,),
        "out.2.weight": (4, 16, 3, 3),
        "encoder.conv_in.weight": (8, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (8, 8, 3, 3),
        "encoder.down.1.attn.0.q.weight": (16, 16, 1, 1),
        "encoder.down.1.block.0.nin_shortcut.weight": (16, 8, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (16, 16, 1, 1),
        "encoder.conv_out.weight": (8, 16, 3, 3),
        "decoder.up.1.upsample.conv.weight": (16, 16, 3, 3),
        "decoder.up.1.block.1.norm2.bias": (16,),
        "decoder.up.1.attn.1.v.weight": (16, 16, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (8, 16, 1, 1),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "text_model.embeddings.token_embedding.weight": (50, 12),
        "text_model.embeddings.position_embedding.weight": (6, 12),
        "text_model.encoder.layers.1.self_attn.out_proj.weight": (12, 12),
        "text_model.encoder.layers.1.mlp.fc1.weight": (24, 12),
        "text_model.final_layer_norm.bias": (12,),
    }
    # CPU convolutions keep their weight in the matmul layout [out, in*k*k]; files hold [out, in, k, k]
    expected = {k: (v[0], int(np.prod(v[1:]))) if len(v) == 4 else v for k, v in expected.items()}
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any("gamma" in k or "beta" in k or "embedding_table" in k for k in shapes)
    # attention only at resolution 8 (level 1 of 16 px); decoder levels have num_res_blocks + 1 blocks
    assert "encoder.down.0.attn.0.q.weight" not in shapes and "decoder.up.0.attn.0.q.weight" not in shapes
    assert "decoder.up.1.block.2.conv1.weight" not in shapes


def test_linear_projection_flavour():
    cfg = UNetConfig(model_channels=16, channel_mult=(1,), attention_resolutions=(1,), num_heads=-1,
                     num_head_channels=8, context_dim=12, use_linear_in_transformer=True, norm_num_groups=4,
                     num_res_blocks=1)
    unet, _, _ = build_models(ModelConfig(unet=cfg, vae=TINY.vae, text_encoder=TINY.text_encoder))
    params = dict(unet.parameters_and_names())
    assert params["input_blocks.1.1.proj_in.weight"].shape == (16, 16)
    assert params["middle_block.1.proj_out.weight"].shape == (16, 16)
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 2  # 16 channels / 8 per head


def test_tiny_models_run(tiny):
    """Output shapes and starting values. That graph mode computes what PyNative does is test_reference_models':
    it runs the fixtures' UNet, VAE and text encoder in both modes against diffusers' outputs, and graph mode's
    compile would cost this module more than all its other tests together."""
    ctx, eps, mean, logvar, dec = _run(tiny, _inputs())
    assert ctx.shape == (2, 6, 12) and eps.shape == (2, 4, 8, 8)
    assert mean.shape == logvar.shape == (1, 4, 8, 8) and dec.shape == (1, 3, 16, 16)
    # fresh models: the zero-initialised output conv makes the UNet output exactly zero
    assert np.all(eps == 0)
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_logvar_is_clamped(tiny):
    vae = tiny[1]
    bias = vae.quant_conv.bias.asnumpy()
    vae.quant_conv.bias.set_data(Tensor(np.array([0, 0, 0, 0, 100, -100, 0, 0], np.float32)))
    try:
        _, logvar = vae.encode(_inputs()["img"])
    finally:
        vae.quant_conv.bias.set_data(Tensor(bias))
    logvar = logvar.asnumpy()
    assert np.all(logvar[:, 0] == 20) and np.all(logvar[:, 1] == -30)


def test_extra_embeddings_equal_writing_into_a_table_copy(tiny):
    te = tiny[2]
    table = te.text_model.embeddings.token_embedding.weight
    original = table.asnumpy().copy()
    extra = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
    ids = np.array([[49, 5, 51, 7, 0, 0], [1, 50, 2, 3, 4, 0]], np.int32)
    out = te(Tensor(ids), Tensor(extra)).asnumpy()
    np.testing.assert_array_equal(table.asnumpy(), original)  # the frozen table is never written

    patched = original.copy()
    patched[10], patched[11] = extra[0], extra[1]
    table.set_data(Tensor(patched))
    try:
        ref = te(Tensor(np.where(ids >= 50, ids - 40, ids).astype(np.int32))).asnumpy()
    finally:
        table.set_data(Tensor(original))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    plain = te(Tensor(np.where(ids >= 50, 0, ids).astype(np.int32))).asnumpy()
    assert np.abs(out - plain).max() > 1e-3


def test_gradient_reaches_only_the_used_extra_rows(tiny):
    te = tiny[2]
    table = te.text_model.embeddings.token_embedding.weight
    ids = Tensor(np.array([[49, 5, 51, 7, 3, 3]], np.int32))  # uses placeholder row 1, not row 0
    extra = Tensor(np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32))
    weights = Tensor(np.random.default_rng(3).standard_normal((1, 6, 12)).astype(np.float32))
    d_extra, (d_table,) = ms.grad(lambda e: (te(ids, e) * weights).sum(), grad_position=0, weights=[table])(extra)
    d_extra, d_table = d_extra.asnumpy(), d_table.asnumpy()
    assert np.abs(d_extra[1]).min() > 0
    assert np.all(d_extra[[0, 2]] == 0)
    # table rows: gradient only for the real tokens; nothing leaks from the placeholder position
    used = {49, 5, 7, 3}
    assert all(np.abs(d_table[i]).max() > 0 for i in used)
    assert np.all(np.delete(d_table, sorted(used), axis=0) == 0)


def test_half_precision_compute_dtype():
    te32 = build_models(TINY)[2]
    te16 = build_models(TINY, dtype=ms.float16)[2]
    for (name, p32), (_, p16) in zip(te32.parameters_and_names(), te16.parameters_and_names()):
        assert p16.dtype == ms.float32  # parameters stay float32
        p16.set_data(p32.data.copy())
    inp = _inputs()
    out32 = te32(inp["ids"], inp["extra"]).asnumpy()
    out16 = te16(inp["ids"], inp["extra"]).asnumpy()
    assert out16.dtype == np.float32
    np.testing.assert_allclose(out16, out32, atol=2e-2)
