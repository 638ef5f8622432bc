"""The model YAMLs users have, as `--config`: CompVis v1, Stability v2 / v2-v, mindone v1 / v2 (copies in
tests/fixtures/yaml, keys and values as their repositories have them). Each must read as the config
of our shipped YAML of the same version, compared by meaning (`config_differences`)."""
import os

import pytest
import yaml

from ldm.convert import check_fits
from ldm.errors import ModelConfigError
from ldm.models import (ModelConfig, UNetConfig, config_differences, load_model_config, model_config_from_dict)
from ldm.pretrained import get_version

YAMLS = os.path.join(os.path.dirname(__file__), "fixtures", "yaml")


def _reference(name):
    with open(os.path.join(YAMLS, name + ".yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name,version,differences", [
    ("compvis-v1-inference", "1.5", []),
    ("mindone-v1-inference", "1.5", []),
    ("stability-v2-inference", "2.1", []),
    ("mindone-v2-inference", "2.1", []),
    # Stability's v YAML keeps the base model's latent image_size 64 (its txt2img.py takes --H/--W 768);
    # our samplers take the default size from --version, not from this field
    ("stability-v2-inference-v", "2.1-v", [("image_size", 512, 768)]),
])
def test_reference_yaml_reads_as_the_shipped_config(name, version, differences):
    theirs = load_model_config(os.path.join(YAMLS, name + ".yaml"))
    ours = load_model_config(get_version(version).config_path)
    assert config_differences(theirs, ours) == differences


def test_targets_name_the_released_text_encoders():
    v1 = load_model_config(os.path.join(YAMLS, "compvis-v1-inference.yaml"))
    # FrozenCLIPEmbedder without params: OpenAI CLIP ViT-L/14
    te = v1.text_encoder
    assert (te.width, te.layers, te.heads, te.intermediate_size, te.use_quick_gelu, te.pad_token) == \
        (768, 12, 12, 3072, True, "<|endoftext|>")
    # FrozenOpenCLIPEmbedder with only freeze and layer: ViT-H-14, the penultimate block (23 of 24), or all 24
    config = _reference("stability-v2-inference")
    te = model_config_from_dict(config).text_encoder
    assert (te.width, te.layers, te.heads, te.intermediate_size, te.use_quick_gelu, te.pad_token) == \
        (1024, 23, 16, 4096, False, "!")
    config["model"]["params"]["cond_stage_config"]["params"]["layer"] = "last"
    assert model_config_from_dict(config).text_encoder.layers == 24


def test_mindone_prediction_type_sets_the_parameterization():
    config = _reference("mindone-v2-inference")
    assert model_config_from_dict(config).parameterization == "eps"
    config["model"]["prediction_type"] = "v"
    assert model_config_from_dict(config).parameterization == "v"
    config["model"]["params"]["parameterization"] = "eps"
    with pytest.raises(ModelConfigError, match="contradicts model.params.parameterization"):
        model_config_from_dict(config, "x.yaml")


@pytest.mark.parametrize("section,target", [
    ("model", "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"),
    ("unet_config", "sgm.modules.diffusionmodules.openaimodel.UNetModel"),
    ("first_stage_config", "ldm.models.autoencoder.VQModelInterface"),
    ("cond_stage_config", "ldm.modules.encoders.modules.FrozenT5Embedder"),
])
def test_unknown_target_is_a_one_line_error_naming_it(section, target):
    config = _reference("compvis-v1-inference")
    params = config["model"] if section == "model" else config["model"]["params"][section]
    params["target"] = target
    with pytest.raises(ModelConfigError) as err:
        model_config_from_dict(config, "their.yaml")
    message = str(err.value)
    assert message.startswith("their.yaml: ") and target in message and "\n" not in message


@pytest.mark.parametrize("params,field", [({"arch": "ViT-bigG-14"}, "arch"), ({"layer": "pooled"}, "layer")])
def test_unsupported_openclip_params_are_named(params, field):
    config = _reference("stability-v2-inference")
    config["model"]["params"]["cond_stage_config"]["params"].update(params)
    with pytest.raises(ModelConfigError, match=f"cond_stage_config.params.{field} "):
        model_config_from_dict(config, "their.yaml")


@pytest.mark.parametrize("section,key,value,kind", [
    ("unet_config", "model_channels", "wide", "int"),
    ("unet_config", "channel_mult", 4, "tuple"),
    ("first_stage_config", "embed_dim", "four", "int"),
])
def test_a_value_of_the_wrong_type_is_named(section, key, value, kind):
    config = _reference("compvis-v1-inference")
    config["model"]["params"][section]["params"][key] = value
    with pytest.raises(ModelConfigError) as err:
        model_config_from_dict(config, "their.yaml")
    assert str(err.value) == f"their.yaml: model.params.{section}.params: {key} must be {kind}, got {value!r}"


def test_config_checks_compare_meaning_not_spelling():
    shipped = ModelConfig()   # attention_resolutions (4, 2, 1), as the CompVis YAMLs list them
    read = ModelConfig(unet=UNetConfig(attention_resolutions=[1, 2, 4], channel_mult=[1, 2, 4, 4],
                                       context_dim=768.0))
    assert config_differences(read, shipped) == []
    check_fits(read, shipped, "weights.safetensors")
    other = ModelConfig(unet=UNetConfig(attention_resolutions=(1, 2), channel_mult=(1, 2, 4)))
    assert [name for name, _, _ in config_differences(other, shipped)] == ["unet.attention_resolutions",
                                                                           "unet.channel_mult"]
