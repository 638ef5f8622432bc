"""Typed model configuration, the mindone-style YAML reader, and the model builder.

The YAML layout is the one of CompVis/mindone `configs/*.yaml`: everything sits under
`model.params`, with `unet_config`, `first_stage_config` (its `ddconfig` + `embed_dim`) and
`cond_stage_config`, each carrying `target` and `params`. Keys that only matter to mindone's own
training code (use_fp16, use_checkpoint, legacy, monitor, lossconfig, ...) are accepted and ignored.
"""
from dataclasses import asdict, dataclass, field, fields, replace

import yaml
import mindspore as ms

from ldm.modules.openaimodel import UNetModel
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.clip_text import CLIPTextModel


@dataclass
class UNetConfig:            # CompVis openaimodel.UNetModel params (mindone/CompVis YAML names)
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)   # downsample factors that get a SpatialTransformer
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_heads: int = 8                         # -1 when num_head_channels is used
    num_head_channels: int = -1                # SD2: 64
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False    # SD2: True
    norm_num_groups: int = 32


@dataclass
class VAEConfig:             # CompVis ddconfig
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    double_z: bool = True
    norm_num_groups: int = 32


@dataclass
class TextEncoderConfig:     # mindone cond_stage_config names
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12          # SD2: 23 (penultimate of OpenCLIP's 24)
    heads: int = 12
    intermediate_size: int = 3072
    use_quick_gelu: bool = True   # SD2: False (exact gelu)
    epsilon: float = 1e-5
    pad_token: str = "<|endoftext|>"   # SD2: "!" (id 0)


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    parameterization: str = "eps"   # or "v"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    scale_factor: float = 0.18215
    image_size: int = 512           # default sample size in pixels


def _typed(cls, params):
    """Instantiate dataclass `cls` from the keys of `params` it knows, coerced to the field types.

    PyYAML reads `1e-5` (no dot) as a string and lists as lists, hence the coercion.
    """
    kwargs = {}
    for f in fields(cls):
        if f.name not in params:
            continue
        value = params[f.name]
        default = f.default
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, str):
            value = str(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _section(model_params, name, path):
    if name not in model_params:
        raise ValueError(f"{path}: model.params.{name} is missing")
    return model_params[name].get("params") or {}


def model_config_from_dict(config: dict, path="<dict>") -> ModelConfig:
    """`ModelConfig` from an already parsed mindone-style config (see `load_model_config`)."""
    try:
        model = config["model"]
        mp = model.get("params") or {}
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: not a model config (no model.params)") from None

    unet_params = dict(_section(mp, "unet_config", path))
    # CompVis: num_head_channels, when set, decides the head count (num_heads defaults to -1 there)
    if unet_params.get("num_head_channels", -1) != -1 and "num_heads" not in unet_params:
        unet_params["num_heads"] = -1
    unet = _typed(UNetConfig, unet_params)

    first = _section(mp, "first_stage_config", path)
    vae_params = dict(first.get("ddconfig") or {})
    if "embed_dim" in first:
        vae_params["embed_dim"] = first["embed_dim"]
    vae = _typed(VAEConfig, vae_params)

    text_params = dict(_section(mp, "cond_stage_config", path))
    if "OpenCLIP" in str(mp["cond_stage_config"].get("target", "")):
        # OpenCLIP ViT-H text tower: exact gelu and "!" padding unless the file says otherwise
        text_params.setdefault("use_quick_gelu", False)
        text_params.setdefault("pad_token", "!")
    if "intermediate_size" not in text_params and "width" in text_params:
        text_params["intermediate_size"] = 4 * int(text_params["width"])
    text = _typed(TextEncoderConfig, text_params)

    top = {k: mp[k] for k in ("parameterization", "linear_start", "linear_end", "timesteps", "scale_factor")
           if k in mp}
    if "image_size" in mp:
        # model.params.image_size is the latent size; the sample size in pixels is that times the VAE factor
        top["image_size"] = int(mp["image_size"]) * 2 ** (len(vae.ch_mult) - 1)
    cfg = replace(_typed(ModelConfig, top), unet=unet, vae=vae, text_encoder=text)
    if cfg.parameterization not in ("eps", "v"):
        raise ValueError(f"{path}: parameterization must be 'eps' or 'v', got {cfg.parameterization!r}")
    return cfg


def load_model_config(path) -> ModelConfig:
    """Read a mindone-style model YAML (`model.params.{unet_config, first_stage_config, cond_stage_config}`)."""
    with open(path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return model_config_from_dict(config, str(path))


def build_models(cfg: ModelConfig, dtype=ms.float32):
    """Build `(unet, vae, text_encoder)` with random weights; `dtype` is the compute dtype.

    Parameters stay float32 (they are what checkpoints load into and what optimizers update);
    matmuls and convs run in `dtype`, norms and softmax in float32.
    """
    text_kwargs = asdict(cfg.text_encoder)
    text_kwargs.pop("pad_token")   # a tokenizer concern
    unet = UNetModel(**asdict(cfg.unet), dtype=dtype)
    vae = AutoencoderKL(**asdict(cfg.vae), dtype=dtype)
    text_encoder = CLIPTextModel(**text_kwargs, dtype=dtype)
    return unet, vae, text_encoder
