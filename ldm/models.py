"""Typed model configuration, the CompVis/Stability/mindone YAML reader, and the model builder.

The YAML layout is the one of CompVis, Stability and mindone `configs/*.yaml`: everything sits under
`model.params`, with `unet_config`, `first_stage_config` (its `ddconfig` + `embed_dim`) and
`cond_stage_config`, each carrying `target` and `params`. `target` class paths are mapped to our cells
(`TARGETS`). Keys that only matter to the reference code's own training or devices (use_fp16,
use_checkpoint, legacy, monitor, lossconfig, scheduler_config, ...) are accepted and ignored.
"""
import contextlib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

import yaml
import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from ldm.errors import ModelConfigError
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


def _coerced(value, default):
    """`value` as the type of the field's default (PyYAML reads `1e-5`, no dot, as a string)."""
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, bool):
        return bool(value)
    for kind in (float, int, str):
        if isinstance(default, kind):
            return kind(value)
    return value


def _typed(cls, params, where):
    """Instantiate dataclass `cls` from the keys of `params` it knows, coerced to the field types; `where`
    names the YAML section in the error for a value that does not convert."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in params:
            continue
        try:
            kwargs[f.name] = _coerced(params[f.name], f.default)
        except (TypeError, ValueError):
            raise ModelConfigError(f"{where}: {f.name} must be {type(f.default).__name__}, "
                                   f"got {params[f.name]!r}") from None
    return cls(**kwargs)


# `target:` class paths of the YAMLs users have (CompVis, Stability and mindone use the same ones) -> what
# we build for them; any other target (inpainting, depth, unCLIP, SDXL, ...) is refused by name.
TEXT_TARGETS = {
    # CompVis/Stability: OpenAI CLIP ViT-L/14 by name; mindone: its CLIP, sized by params (exact gelu by default)
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "openai",
    # Stability: the OpenCLIP ViT-H-14 text tower by name; mindone: the same, sized by params
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "openclip",
}
TARGETS = {
    "model": ("ldm.models.diffusion.ddpm.LatentDiffusion",),        # -> ModelConfig (ldm.pipeline)
    "unet_config": ("ldm.modules.diffusionmodules.openaimodel.UNetModel",),   # -> UNetModel
    "first_stage_config": ("ldm.models.autoencoder.AutoencoderKL",),  # -> AutoencoderKL
    "cond_stage_config": tuple(TEXT_TARGETS),                          # -> CLIPTextModel
}

# What the CompVis/Stability text classes load by name (their YAMLs give no sizes)
_RELEASED_TEXT_ENCODERS = {
    "openai": dict(width=768, layers=12, heads=12, intermediate_size=3072, use_quick_gelu=True),     # ViT-L/14
    "openclip": dict(width=1024, layers=24, heads=16, intermediate_size=4096, use_quick_gelu=False),  # ViT-H-14
}
# Stability's FrozenOpenCLIPEmbedder `layer`: how many of the tower's last blocks it skips
_OPENCLIP_LAYERS = {"last": 0, "penultimate": 1}
# mindone's `model.prediction_type` (beside `model.params`) -> CompVis' `parameterization`
_PREDICTION_TYPES = {"noise": "eps", "v": "v"}


def _section(model_params, name, path):
    """`(target, params)` of `model.params.<name>`; the target must be one of `TARGETS[name]`, if given."""
    section = model_params.get(name)
    if not isinstance(section, dict):
        raise ModelConfigError(f"{path}: model.params.{name} is missing")
    target = section.get("target")
    if target is not None and target not in TARGETS[name]:
        raise ModelConfigError(f"{path}: model.params.{name}.target {target} is not a Stable Diffusion 1.x/2.x part "
                               f"this project builds (known: {', '.join(TARGETS[name])})")
    return target, dict(section.get("params") or {})


def _released_text_encoder(flavour, params, where):
    """TextEncoderConfig fields of the encoder a CompVis/Stability class loads by name."""
    out = dict(_RELEASED_TEXT_ENCODERS[flavour])
    layer = params.get("layer", "last")
    if flavour == "openclip":
        if params.get("arch", "ViT-H-14") != "ViT-H-14":
            raise ModelConfigError(f"{where}.arch {params['arch']!r}: only ViT-H-14 (the SD 2.x text encoder) is "
                                   "supported")
        if layer not in _OPENCLIP_LAYERS:
            raise ModelConfigError(f"{where}.layer {layer!r}: use 'penultimate' (SD 2.x) or 'last'")
        out["layers"] -= _OPENCLIP_LAYERS[layer]
    else:
        version = params.get("version", "openai/clip-vit-large-patch14")
        if version != "openai/clip-vit-large-patch14":
            raise ModelConfigError(f"{where}.version {version!r}: only openai/clip-vit-large-patch14 (the SD 1.x "
                                   "text encoder) is supported")
        if layer != "last":
            raise ModelConfigError(f"{where}.layer {layer!r}: only 'last' is supported")
    if "max_length" in params:
        out["context_length"] = params["max_length"]
    return out


def _text_encoder_params(target, params, path):
    """TextEncoderConfig fields from `cond_stage_config`: named by the class (CompVis, Stability: no size
    in params) or listed in params (mindone, ours)."""
    if target is not None and not {f.name for f in fields(TextEncoderConfig)} & params.keys():
        params = _released_text_encoder(TEXT_TARGETS[target], params,
                                        f"{path}: model.params.cond_stage_config.params")
    elif target is not None:
        # mindone's text encoders use exact gelu unless told otherwise (its OpenCLIP one always)
        params.setdefault("use_quick_gelu", False)
    params.setdefault("intermediate_size", 4 * int(params.get("width", TextEncoderConfig.width)))
    # padding as the SD release of the flavour pads: OpenAI CLIP with <|endoftext|>, OpenCLIP with "!" (id 0)
    quick_gelu = bool(params.get("use_quick_gelu", TextEncoderConfig.use_quick_gelu))
    params.setdefault("pad_token", "<|endoftext|>" if quick_gelu else "!")
    return params


def _parameterization(model, path):
    """CompVis' `model.params.parameterization` or mindone's `model.prediction_type`; they must agree."""
    params = model.get("params") or {}
    if "prediction_type" not in model:
        return params.get("parameterization")
    kind = model["prediction_type"]
    if kind not in _PREDICTION_TYPES:
        raise ModelConfigError(f"{path}: model.prediction_type {kind!r} must be 'noise' or 'v'")
    if params.get("parameterization", _PREDICTION_TYPES[kind]) != _PREDICTION_TYPES[kind]:
        raise ModelConfigError(f"{path}: model.prediction_type {kind!r} contradicts model.params.parameterization "
                               f"{params['parameterization']!r}; keep one of them")
    return _PREDICTION_TYPES[kind]


def model_config_from_dict(config: dict, path="<dict>") -> ModelConfig:
    """`ModelConfig` from an already parsed model config (see `load_model_config`)."""
    try:
        model = config["model"]
        mp = model.get("params") or {}
    except (KeyError, TypeError, AttributeError):
        raise ModelConfigError(f"{path}: not a model config (no model.params)") from None
    if model.get("target") is not None and model["target"] not in TARGETS["model"]:
        raise ModelConfigError(f"{path}: model.target {model['target']} is not a model this project builds "
                               f"(known: {', '.join(TARGETS['model'])})")

    _, unet_params = _section(mp, "unet_config", path)
    # CompVis: num_head_channels, when set, decides the head count (num_heads defaults to -1 there)
    if unet_params.get("num_head_channels", -1) != -1 and "num_heads" not in unet_params:
        unet_params["num_heads"] = -1
    unet = _typed(UNetConfig, unet_params, f"{path}: model.params.unet_config.params")

    _, first = _section(mp, "first_stage_config", path)
    vae_params = dict(first.get("ddconfig") or {})
    if "embed_dim" in first:
        vae_params["embed_dim"] = first["embed_dim"]
    vae = _typed(VAEConfig, vae_params, f"{path}: model.params.first_stage_config.params")

    text = _typed(TextEncoderConfig, _text_encoder_params(*_section(mp, "cond_stage_config", path), path),
                  f"{path}: model.params.cond_stage_config.params")

    top = {k: mp[k] for k in ("linear_start", "linear_end", "timesteps", "scale_factor") if k in mp}
    parameterization = _parameterization(model, path)
    if parameterization is not None:
        top["parameterization"] = parameterization
    if "image_size" in mp:
        # model.params.image_size is the latent size; the sample size in pixels is that times the VAE factor
        top["image_size"] = int(mp["image_size"]) * 2 ** (len(vae.ch_mult) - 1)
    cfg = replace(_typed(ModelConfig, top, f"{path}: model.params"), unet=unet, vae=vae, text_encoder=text)
    if cfg.parameterization not in ("eps", "v"):
        raise ModelConfigError(f"{path}: parameterization must be 'eps' or 'v', got {cfg.parameterization!r}")
    return cfg


def load_model_config(path) -> ModelConfig:
    """Read a CompVis, Stability or mindone model YAML (`model.params.{unet_config, first_stage_config,
    cond_stage_config}`)."""
    with open(path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return model_config_from_dict(config, str(path))


# levels that get attention, a set: CompVis YAMLs list [4, 2, 1], weights read as (1, 2, 4)
_SET_FIELDS = ("attention_resolutions", "attn_resolutions")


def _flat(cfg):
    """`{"unet.channel_mult": ..., "parameterization": ...}` of a ModelConfig."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in asdict(value).items()})
        else:
            out[f.name] = value
    return out


def _meaning(name, value):
    """A config value as what it means: lists and tuples alike, attention levels as a set (numbers
    already compare by value: 1 == 1.0)."""
    if isinstance(value, (list, tuple)):
        return frozenset(value) if name.rpartition(".")[2] in _SET_FIELDS else tuple(value)
    return value


def config_differences(a: ModelConfig, b: ModelConfig, names=None):
    """`[(name, value in a, value in b)]` for the fields where `a` and `b` mean different things.

    names: flat field names to compare ("unet.channel_mult", "parameterization", ...); default all.
    """
    flat_a, flat_b = _flat(a), _flat(b)
    return [(n, flat_a[n], flat_b[n]) for n in (names or flat_a)
            if _meaning(n, flat_a[n]) != _meaning(n, flat_b[n])]


def build_models(cfg: ModelConfig, dtype=ms.float32, init=True):
    """Build `(unet, vae, text_encoder)` with random weights; `dtype` is the compute dtype.

    Parameters stay float32 (they are what checkpoints load into and what optimizers update);
    matmuls and convs run in `dtype`, norms and softmax in float32. `init=False` allocates no parameter
    data (MindSpore's `no_init_parameters`): names and shapes only, which is all a key check needs, in
    a fraction of a second for a full-size model instead of ~17 s and 3.4 GB.
    """
    text_kwargs = asdict(cfg.text_encoder)
    text_kwargs.pop("pad_token")   # a tokenizer concern
    with contextlib.nullcontext() if init else no_init_parameters():
        unet = UNetModel(**asdict(cfg.unet), dtype=dtype)
        vae = AutoencoderKL(**asdict(cfg.vae), dtype=dtype)
        text_encoder = CLIPTextModel(**text_kwargs, dtype=dtype)
    return unet, vae, text_encoder
