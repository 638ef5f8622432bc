import json
import os
from dataclasses import asdict

import pytest
from huggingface_hub import constants

from ldm import pretrained
from ldm.convert import config_from_diffusers
from ldm.errors import UserInputError
from ldm.models import load_model_config


@pytest.fixture
def offline(monkeypatch, tmp_path):
    # the hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well as the variable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_offline_error_is_one_line_naming_the_file(offline):
    models = offline / "models"
    with pytest.raises(pretrained.WeightsNotFoundError) as info:
        pretrained.resolve_weights("1.5", models_dir=str(models), cache_dir=str(offline / "cache"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"SD 1.5 weights not found: put v1-5-pruned-emaonly.safetensors in {models}/")
    assert "--ckpt_path" in message
    assert ("download of v1-5-pruned-emaonly.safetensors from huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"
            " or huggingface.co/runwayml/stable-diffusion-v1-5 failed") in message
    assert "HF_HUB_OFFLINE" in message


def test_download_falls_back_to_an_older_repo(monkeypatch, tmp_path):
    # a cache holding the file under the repo it used to live in still serves it
    calls = []

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append(repo_id)
        if repo_id != "runwayml/stable-diffusion-v1-5":
            raise OSError("not in the cache")
        return str(tmp_path / filename)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = pretrained.resolve_weights("1.5", models_dir=str(tmp_path / "models"))
    assert path == str(tmp_path / "v1-5-pruned-emaonly.safetensors")
    assert calls == ["stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"]


def test_version_table_names_repos_and_files_that_exist():
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "hub_repos.json")) as f:
        recorded = json.load(f)["repos"]
    for v in pretrained.VERSIONS.values():
        if not v.hub_repos:
            continue
        first = recorded[v.hub_repos[0]]
        assert first["exists"], f"{v.name}: the first repo tried, {v.hub_repos[0]}, no longer exists"
        assert v.hub_filename in first["files"], f"{v.name}: {v.hub_repos[0]} has no {v.hub_filename}"
        # every repo is a known one (an existing copy, or a removed repo whose cached copy may still be used)
        assert all(repo in recorded for repo in v.hub_repos), v.hub_repos


@pytest.mark.parametrize(
    "version,filename",
    [
        ("2.0", "512-base-ema.safetensors"),
        ("2.1", "v2-1_512-ema-pruned.safetensors"),
        ("2.0-v", "768-v-ema.safetensors"),
        ("2.1-v", "v2-1_768-ema-pruned.safetensors"),
        ("xl", "sd_xl_base_1.0.safetensors"),
    ],
)
def test_sd2_and_xl_offline_errors_name_their_file(offline, version, filename):
    with pytest.raises(pretrained.WeightsNotFoundError, match=f"put {filename} in"):
        pretrained.resolve_weights(version, models_dir=str(offline), cache_dir=str(offline / "cache"))


def test_explicit_path_wins_over_models_folder(tmp_path):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    mine = tmp_path / "mine.ckpt"
    mine.write_bytes(b"x")
    assert pretrained.resolve_weights("1.5", ckpt_path=str(mine), models_dir=str(tmp_path)) == str(mine)
    with pytest.raises(pretrained.WeightsNotFoundError, match="--ckpt_path .*nope.ckpt does not exist"):
        pretrained.resolve_weights("1.5", ckpt_path=str(tmp_path / "nope.ckpt"), models_dir=str(tmp_path))


def test_models_folder_accepts_hub_mindone_and_diffusers_names(tmp_path):
    for name in ("stable-diffusion-2-1-base", "sd_v2-1_base-7c8d09ce.ckpt", "v2-1_512-ema-pruned.ckpt"):
        path = tmp_path / name
        path.mkdir() if "." not in name else path.write_bytes(b"x")
        assert pretrained.resolve_weights("2.1", models_dir=str(tmp_path)) == str(path)
    (tmp_path / "v2-1_512-ema-pruned.safetensors").write_bytes(b"x")
    assert pretrained.resolve_weights("2.1", models_dir=str(tmp_path)).endswith("v2-1_512-ema-pruned.safetensors")


def test_tiny_needs_no_download(tmp_path):
    (tmp_path / "tiny-sd").mkdir()
    assert pretrained.resolve_weights("tiny", models_dir=str(tmp_path)) == str(tmp_path / "tiny-sd")
    with pytest.raises(pretrained.WeightsNotFoundError, match="tiny-sd"):
        pretrained.resolve_weights("tiny", models_dir=str(tmp_path / "empty"))


def test_unknown_version_lists_valid_ones():
    valid = "1.5, 2.0, 2.1, 2.0-v, 2.1-v, xl, tiny"
    with pytest.raises(UserInputError, match=f"unknown SD version '3.0'; valid versions: {valid}"):
        pretrained.get_version("3.0")


def test_version_table():
    assert {v: pretrained.get_version(v).image_size for v in pretrained.VERSIONS} == {
        "1.5": 512, "2.0": 512, "2.1": 512, "2.0-v": 768, "2.1-v": 768, "xl": 1024, "tiny": 128,
    }
    vpred = os.path.join(pretrained.ROOT, "configs/v2-vpred-inference.yaml")
    assert pretrained.get_version("2.1-v").config_path == vpred
    assert pretrained.get_version("1.5").config == "configs/v1-inference.yaml"


def test_tiny_yaml_describes_the_shipped_model():
    # Training reads the version's YAML, sampling the folder's config.json files; a scale_factor left
    # stale in the YAML when the model was retrained once went unnoticed.
    yaml_config = asdict(load_model_config(pretrained.get_version("tiny").config_path))
    folder_config = asdict(config_from_diffusers(pretrained.resolve_weights("tiny")))
    assert yaml_config.pop("scale_factor") == pytest.approx(folder_config.pop("scale_factor"), rel=1e-7)
    assert yaml_config == folder_config
