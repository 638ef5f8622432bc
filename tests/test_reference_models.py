"""The tiny reference models (tools/dev/make_reference_fixtures.py) through every layout into our cells.

References were computed by diffusers/transformers in fp32 from the fp16-rounded weights the fixtures
store, so a correct conversion reproduces them to float32 rounding in either execution mode.
"""
import os
import re

import mindspore as ms
import numpy as np
import pytest

from ldm.checkpoint_io import CheckpointError
from ldm.convert import PARTS, load_into, load_pretrained
from tests.test_text_to_image import TINY_SD1, TINY_SD2_V, pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SOURCES = {
    "tiny-sd1": ("tiny-sd1", "tiny-sd1.safetensors", "tiny-sd1.ckpt"),
    "tiny-sd2": ("tiny-sd2", "tiny-sd2.safetensors"),
}
TOLERANCE = 1e-4


# The cells test_text_to_image samples with (tiny-sd2-v holds tiny-sd2's weights), whose graphs it compiles at
# the references' shapes; each test here loads them again from every layout, the same numbers
PIPELINES = {"tiny-sd1": TINY_SD1, "tiny-sd2": TINY_SD2_V}


@pytest.fixture(scope="module")
def models():
    """Per flavour: (config, {part: cell}, runners, reference arrays)."""
    cache = {}

    def get(flavour):
        if flavour not in cache:
            cfg = load_pretrained(os.path.join(FIXTURES, flavour))[0]
            sd = pipeline(PIPELINES[flavour])
            runners = {"unet": sd.unet, "text_encoder": sd.text_encoder, "encode": sd._encode, "decode": sd._decode}
            ref = dict(np.load(os.path.join(FIXTURES, flavour + "-reference.npz")))
            cache[flavour] = (cfg, dict(zip(PARTS, (sd.unet, sd.vae, sd.text_encoder))), runners, ref)
        return cache[flavour]

    return get


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("flavour,source", [(f, s) for f, sources in SOURCES.items() for s in sources])
def test_every_layout_loads_strictly_and_matches_diffusers(models, flavour, source, mode):
    cfg, cells, run, ref = models(flavour)
    _, parts, layout = load_pretrained(os.path.join(FIXTURES, source), cfg)
    assert layout == ("diffusers" if "." not in source else "original")
    for part, cell in cells.items():
        # zero first, so a value left from an earlier test cannot pass for a loaded one
        for _, p in cell.parameters_and_names():
            p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
        load_into(cell, parts[part], part, source)

    hidden = run["text_encoder"](ms.Tensor(ref["input_ids"])).asnumpy()
    # with the pipeline's arguments (y None), so that it runs the graph the pipeline compiled
    out = run["unet"](ms.Tensor(ref["unet_x"]), ms.Tensor(ref["unet_t"]), ms.Tensor(ref["unet_context"]),
                      None).asnumpy()
    mean, logvar = run["encode"](ms.Tensor(ref["vae_x"]))
    decoded = run["decode"](ms.Tensor(ref["vae_z"])).asnumpy()
    diffs = {"text": _max_diff(hidden, ref["text_hidden"]), "unet": _max_diff(out, ref["unet_out"]),
             "mean": _max_diff(mean.asnumpy(), ref["vae_mean"]),
             "logvar": _max_diff(logvar.asnumpy(), ref["vae_logvar"]),
             "decoded": _max_diff(decoded, ref["vae_decoded"])}
    assert max(diffs.values()) < TOLERANCE, diffs
    # the references are not trivially small: a dropped layer would show
    assert np.abs(ref["unet_out"]).mean() > 0.05 and np.abs(ref["text_hidden"]).mean() > 0.1


def test_reference_token_ids():
    sd1 = np.load(os.path.join(FIXTURES, "tiny-sd1-reference.npz"))
    sd2 = np.load(os.path.join(FIXTURES, "tiny-sd2-reference.npz"))
    assert list(sd1["input_ids"][0, :8]) == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert list(sd2["input_ids"][0, :8]) == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert list(sd1["input_ids"][1, :3]) == [49406, 49407, 49407]   # empty prompt, padded
    long_ids = sd1["input_ids"][2]
    assert long_ids[0] == 49406 and long_ids[-1] == 49407 and 49407 not in long_ids[1:-1]   # truncated


def test_configs_from_diffusers_folders():
    sd1 = load_pretrained(os.path.join(FIXTURES, "tiny-sd1"))[0]
    sd2 = load_pretrained(os.path.join(FIXTURES, "tiny-sd2"))[0]
    sd2v = load_pretrained(os.path.join(FIXTURES, "tiny-sd2-v"))[0]
    assert (sd1.unet.model_channels, sd1.unet.channel_mult, sd1.unet.num_res_blocks) == (8, (1, 2, 2), 1)
    assert set(sd1.unet.attention_resolutions) == {1, 2} and sd1.unet.context_dim == 6
    assert (sd1.unet.num_heads, sd1.unet.num_head_channels, sd1.unet.use_linear_in_transformer) == (2, -1, False)
    assert (sd2.unet.num_heads, sd2.unet.num_head_channels, sd2.unet.use_linear_in_transformer) == (-1, 4, True)
    assert (sd1.text_encoder.use_quick_gelu, sd1.text_encoder.pad_token) == (True, "<|endoftext|>")
    assert (sd2.text_encoder.use_quick_gelu, sd2.text_encoder.pad_token) == (False, "!")
    assert (sd1.vae.ch, sd1.vae.ch_mult, sd1.vae.norm_num_groups, sd1.unet.norm_num_groups) == (8, (1, 2), 4, 4)
    assert (sd1.linear_start, sd1.linear_end, sd1.parameterization) == (0.00085, 0.012, "eps")
    assert sd2v.parameterization == "v" and sd2.parameterization == "eps"
    assert sd2v.unet == sd2.unet and sd2v.text_encoder == sd2.text_encoder


def test_config_inferred_from_an_original_file():
    cfg, parts, layout = load_pretrained(os.path.join(FIXTURES, "tiny-sd2.safetensors"))
    folder = load_pretrained(os.path.join(FIXTURES, "tiny-sd2"))[0]
    assert layout == "original"
    assert cfg.unet.use_linear_in_transformer and cfg.text_encoder.pad_token == "!"
    for name in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim"):
        assert getattr(cfg.unet, name) == getattr(folder.unet, name), name
    # the extra OpenCLIP block (SD2 conditions on the penultimate one) is dropped, q/k/v unpacked
    assert cfg.text_encoder.layers == 2 and "text_model.encoder.layers.2.mlp.fc1.weight" not in parts["text_encoder"]
    assert parts["text_encoder"]["text_model.encoder.layers.1.self_attn.v_proj.weight"].shape == (6, 6)
    # the file stores the VAE attention as linear weights; they come out as 1x1 convs
    assert parts["vae"]["decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


@pytest.mark.parametrize("source,config_of", [("tiny-sd2.safetensors", "tiny-sd1"), ("tiny-sd1", "tiny-sd2"),
                                              ("tiny-sd1.ckpt", "tiny-sd2")])
def test_wrong_version_fails_in_one_line_naming_the_file(source, config_of):
    cfg = load_pretrained(os.path.join(FIXTURES, config_of))[0]
    path = os.path.join(FIXTURES, source)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, cfg)
    message = str(err.value)
    assert path in message and "\n" not in message
    weights, config = ("2.x", "1.x") if "sd2" in source else ("1.x", "2.x")
    assert f"Stable Diffusion {weights} weights" in message and f"SD {config}" in message


def test_strict_load_lists_missing_unexpected_and_shape_mismatch(models):
    _, cells, _, _ = models("tiny-sd1")
    _, parts, _ = load_pretrained(os.path.join(FIXTURES, "tiny-sd1.safetensors"))
    sd = dict(parts["vae"])
    del sd["encoder.conv_in.bias"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    with pytest.raises(CheckpointError) as err:
        load_into(cells["vae"], sd, "vae", "some/file.safetensors")
    message = str(err.value)
    assert message.startswith("some/file.safetensors: vae weights do not match the model") and "\n" not in message
    for piece in ("missing 1 (encoder.conv_in.bias)", "unexpected 1 (encoder.extra.weight)",
                  "decoder.conv_out.weight (3, 8, 1, 1) in the file vs (3, 72) (out, in*k*k)"):
        assert piece in message


def test_inspect_tool_reports_layout_version_and_key_diff():
    from tools.inspect_checkpoint import describe

    lines = []
    assert describe(os.path.join(FIXTURES, "tiny-sd2.safetensors"), os.path.join(FIXTURES, "tiny-sd2"),
                    out=lines.append)
    text = "\n".join(lines)
    assert "layout: original CompVis/Stability single file" in text and "version: SD 2.x" in text
    assert "unet: 324 tensors" in text and "float16" in text
    assert "text_encoder: missing 0, unexpected 0, shape mismatch 0" in text
    lines.clear()
    assert describe(os.path.join(FIXTURES, "tiny-sd2-v"), out=lines.append)
    assert "  prediction: v (scheduler config)" in lines
    lines.clear()
    assert not describe(os.path.join(FIXTURES, "tiny-sd1.ckpt"), os.path.join(FIXTURES, "tiny-sd2"), out=lines.append)
    assert "Stable Diffusion 1.x weights, but the model config is for SD 2.x" in lines[-1]


# mindone's names (examples/stable_diffusion_v2: tools/model_conversion/ms_names_v2.txt, text_encoder.py),
# written from ours: the converter must map them back exactly

_UNET_TO_MINDONE = (
    (r"\.conv\.(weight|bias)$", r".conv.conv.\1"),   # the upsampler's conv, before other convs get a .conv
    (r"^input_blocks\.0\.0\.", "input_blocks.0.0.conv."), (r"^out\.2\.", "out.2.conv."),
    (r"\.in_layers\.0\.", ".in_layers_norm."), (r"\.in_layers\.2\.", ".in_layers_conv.conv."),
    (r"\.out_layers\.0\.", ".out_layers_norm."), (r"\.out_layers\.3\.", ".out_layers_conv.conv."),
    (r"\.skip_connection\.", ".skip_connection.conv."), (r"\.op\.", ".op.conv."),
)
_NORM = re.compile(r"(norm\d?|norm_out|in_layers_norm|out_layers_norm|^out\.0|ln_\d|ln_final)\.(weight|bias)$")


def _gamma_beta(key):
    return _NORM.sub(lambda m: f"{m.group(1)}.{'gamma' if m.group(2) == 'weight' else 'beta'}", key)


def _to_mindone(parts, text_style):
    out = {}
    for key, value in parts["unet"].items():
        for pattern, repl in _UNET_TO_MINDONE:
            key = re.sub(pattern, repl, key)
        out["model.diffusion_model." + _gamma_beta(key)] = value
    out.update({"first_stage_model." + _gamma_beta(k): v for k, v in parts["vae"].items()})
    text = parts["text_encoder"]
    openclip = text_style == "openclip"
    prefix = "cond_stage_model.model." if openclip else "cond_stage_model.transformer."
    blocks = "transformer.resblocks" if openclip else "transformer_layer.resblocks"
    attn = "attn" if openclip else "attn.attn"
    mlp = "mlp." if openclip else ""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": f"{attn}.out_proj",
             "mlp.fc1": f"{mlp}c_fc", "mlp.fc2": f"{mlp}c_proj"}
    out[prefix + ("token_embedding.embedding_table" if openclip else "embedding_table")] = \
        text["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = text["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.gamma"] = text["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.beta"] = text["text_model.final_layer_norm.bias"]
    layers = 1 + max(int(k.split(".")[3]) for k in text if ".layers." in k)
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}{blocks}.{i}."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[_gamma_beta(f"{dst}{theirs}.{p}")] = text[f"{src}{ours}.{p}"]
            for p in ("weight", "bias"):
                out[f"{dst}{attn}.in_proj.{p}"] = np.concatenate([text[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    out["global_step"] = np.array([10], np.int32)   # training bookkeeping mindone files carry
    return out


@pytest.mark.parametrize("flavour,text_style", [("tiny-sd1", "openai"), ("tiny-sd2", "openclip"),
                                                ("tiny-sd2", "openai")])   # mindone's first SD2 release
def test_mindone_checkpoint_converts_to_the_same_weights(tmp_path, flavour, text_style):
    cfg, parts, _ = load_pretrained(os.path.join(FIXTURES, flavour))
    mindone = _to_mindone(parts, text_style)
    assert "model.diffusion_model.input_blocks.1.0.in_layers_conv.conv.weight" in mindone
    assert "model.diffusion_model.out.0.gamma" in mindone
    path = str(tmp_path / "sd_mindone.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in mindone.items()], path)
    _, back, layout = load_pretrained(path, cfg)
    assert layout == "mindone"
    for part in PARTS:
        assert set(back[part]) == set(parts[part]), (part, sorted(set(back[part]) ^ set(parts[part]))[:5])
        for k, v in parts[part].items():
            assert np.array_equal(back[part][k], v.astype(np.float32)), (part, k)
