"""Typed model configuration, the CompVis/Stability/mindone/sgm YAML reader, and the model builder.

Two YAML layouts are read. SD 1.x/2.x: the one of CompVis, Stability and mindone `configs/*.yaml`,
everything under `model.params`, with `unet_config`, `first_stage_config` (its `ddconfig` + `embed_dim`)
and `cond_stage_config`, each carrying `target` and `params`. SDXL: Stability's generative-models (sgm)
`configs/inference/sd_xl_base.yaml`, `model.target` DiffusionEngine, with `network_config`,
`first_stage_config`, `conditioner_config` (its `emb_models` list) and `denoiser_config`. `target`
class paths are mapped to our cells (`TARGETS`, `SGM_TARGETS`). Keys that only matter to the reference
code's own training or devices (use_fp16, use_checkpoint, legacy, monitor, lossconfig, scheduler_config,
spatial_transformer_attn_type, ...) are accepted and ignored.
"""
import contextlib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Optional

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
    num_head_channels: int = -1                # SD2, SDXL: 64
    transformer_depth: int = 1                 # or one per level: SDXL (1, 2, 10) (level 0 has no attention)
    context_dim: int = 768
    use_linear_in_transformer: bool = False    # SD2, SDXL: True
    norm_num_groups: int = 32
    adm_in_channels: int = 0                   # SDXL: 2816, the vector y (pooled text ++ size embedding)


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
    pad_token: str = "<|endoftext|>"   # SD2, SDXL's bigG: "!" (id 0)
    layer: str = "last"       # SDXL: "penultimate" (its output without the final layer norm)
    projection_dim: int = 0   # SDXL's bigG: 1280, the pooled output's width (text_projection)


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_encoder_2: Optional[TextEncoderConfig] = None   # SDXL: OpenCLIP ViT-bigG (its context follows CLIP-L's)
    parameterization: str = "eps"   # or "v"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    scale_factor: float = 0.18215   # SDXL: 0.13025
    image_size: int = 512           # default sample size in pixels
    size_embedding_dim: int = 256   # SDXL: width of each size/crop id's embedding (unet.adm_in_channels > 0)


def model_parts(cfg):
    """The parts `build_models` builds, in its order: unet, vae, text_encoder, and SDXL's text_encoder_2."""
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if cfg.text_encoder_2 is not None else ())


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


# int fields that may also be given one value per UNet level
_PER_LEVEL_FIELDS = ("transformer_depth",)


def _typed(cls, params, where):
    """Instantiate dataclass `cls` from the keys of `params` it knows, coerced to the field types; `where`
    names the YAML section in the error for a value that does not convert."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in params:
            continue
        value = params[f.name]
        per_level = f.name in _PER_LEVEL_FIELDS and isinstance(value, (list, tuple))
        try:
            kwargs[f.name] = tuple(int(v) for v in value) if per_level else _coerced(value, f.default)
        except (TypeError, ValueError):
            raise ModelConfigError(f"{where}: {f.name} must be {type(f.default).__name__}, "
                                   f"got {value!r}") from None
    return cls(**kwargs)


# `target:` class paths of the YAMLs users have (CompVis, Stability and mindone use the same ones) -> what
# we build for them; any other target (inpainting, depth, unCLIP, ...) is refused by name.
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
# the same for the sgm layout (SDXL base); the refiner, SVD, ... are refused by name
SGM_TARGETS = {
    "model": ("sgm.models.diffusion.DiffusionEngine",),
    "network_config": ("sgm.modules.diffusionmodules.openaimodel.UNetModel",),
    "first_stage_config": ("sgm.models.autoencoder.AutoencoderKL",
                           "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"),
    "conditioner_config": ("sgm.modules.GeneralConditioner",),
    "denoiser_config": ("sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",),
}
# sgm conditioner `emb_models` -> what each one gives
SGM_EMBEDDERS = {
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "openai",          # -> text_encoder (CLIP ViT-L/14)
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "bigG",       # -> text_encoder_2 (+ pooled)
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "size",      # -> size_embedding_dim
}
# SDXL base's conditioners in order: the context is CLIP-L's ++ bigG's, the vector y is pooled ++ the
# size embeddings of these input keys (the order of the pipeline's time ids)
_SDXL_EMBEDDERS = ("openai", "bigG", "size", "size", "size")
_SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# FrozenOpenCLIPEmbedder2 params that change what it computes: (the class's default, SDXL base's value)
_SDXL_BIGG_PARAMS = {"arch": ("ViT-H-14", "ViT-bigG-14"), "layer": ("last", "penultimate"),
                     "legacy": (True, False), "always_return_pooled": (False, True)}
_SGM_SCALINGS = {"sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "eps",
                 "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": "v"}
_SGM_DISCRETIZATION = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
SDXL_IMAGE_SIZE = 1024   # SDXL base's training size; neither sgm YAMLs nor its weights carry one

# What the CompVis/Stability text classes load by name (their YAMLs give no sizes)
_RELEASED_TEXT_ENCODERS = {
    "openai": dict(width=768, layers=12, heads=12, intermediate_size=3072, use_quick_gelu=True),     # ViT-L/14
    "openclip": dict(width=1024, layers=24, heads=16, intermediate_size=4096, use_quick_gelu=False),  # ViT-H-14
    "bigG": dict(width=1280, layers=32, heads=20, intermediate_size=5120, use_quick_gelu=False,         # ViT-bigG-14
                 projection_dim=1280),
}
# Stability's FrozenOpenCLIPEmbedder `layer`: how many of the tower's last blocks it skips
_OPENCLIP_LAYERS = {"last": 0, "penultimate": 1}
# mindone's `model.prediction_type` (beside `model.params`) -> CompVis' `parameterization`
_PREDICTION_TYPES = {"noise": "eps", "v": "v"}


def _section(model_params, name, path, targets=TARGETS, family="a Stable Diffusion 1.x/2.x"):
    """`(target, params)` of `model.params.<name>`; the target must be one of `targets[name]`, if given."""
    section = model_params.get(name)
    if not isinstance(section, dict):
        raise ModelConfigError(f"{path}: model.params.{name} is missing")
    target = section.get("target")
    if target is not None and target not in targets[name]:
        raise ModelConfigError(f"{path}: model.params.{name}.target {target} is not {family} part "
                               f"this project builds (known: {', '.join(targets[name])})")
    return target, dict(section.get("params") or {})


def _unet_config(params, where):
    # CompVis: num_head_channels, when set, decides the head count (num_heads defaults to -1 there)
    if params.get("num_head_channels", -1) != -1 and "num_heads" not in params:
        params["num_heads"] = -1
    # the vector input y exists with num_classes "sequential" only (sgm); class labels are not supported
    num_classes = params.pop("num_classes", None)
    if num_classes not in (None, "sequential"):
        raise ModelConfigError(f"{where}.num_classes {num_classes!r}: only 'sequential' (SDXL's vector "
                               "conditioning) is supported")
    if num_classes is None:
        params.pop("adm_in_channels", None)
    return _typed(UNetConfig, params, where)


def _vae_config(first, where):
    params = dict(first.get("ddconfig") or {})
    if "embed_dim" in first:
        params["embed_dim"] = first["embed_dim"]
    return _typed(VAEConfig, params, where)


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


# TextEncoderConfig fields this layout never sets: its `layer` is Stability's (how many blocks to skip)
_SDXL_TEXT_FIELDS = ("layer", "projection_dim")


def _text_encoder_params(target, params, path):
    """TextEncoderConfig fields from `cond_stage_config`: named by the class (CompVis, Stability: no size
    in params) or listed in params (mindone, ours)."""
    sizes = {k: v for k, v in params.items() if k not in _SDXL_TEXT_FIELDS}
    if target is not None and not {f.name for f in fields(TextEncoderConfig)} & sizes.keys():
        params = _released_text_encoder(TEXT_TARGETS[target], params,
                                        f"{path}: model.params.cond_stage_config.params")
    else:
        params = sizes
        if target is not None:
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
    known = TARGETS["model"] + SGM_TARGETS["model"]
    if model.get("target") is not None and model["target"] not in known:
        raise ModelConfigError(f"{path}: model.target {model['target']} is not a model this project builds "
                               f"(known: {', '.join(known)})")
    if model.get("target") in SGM_TARGETS["model"]:
        return _sgm_model_config(mp, path)

    unet = _unet_config(_section(mp, "unet_config", path)[1], f"{path}: model.params.unet_config.params")
    vae = _vae_config(_section(mp, "first_stage_config", path)[1],
                      f"{path}: model.params.first_stage_config.params")

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


def _sgm_text_encoder(flavour, params, where):
    """TextEncoderConfig of an sgm text conditioner of SDXL base (the classes load their encoder by name)."""
    out = dict(_RELEASED_TEXT_ENCODERS[flavour], layer="penultimate")
    if flavour == "bigG":
        for key, (default, wanted) in _SDXL_BIGG_PARAMS.items():
            if params.get(key, default) != wanted:
                raise ModelConfigError(f"{where}.{key} {params.get(key, default)!r}: only {wanted!r} (SDXL base) "
                                       "is supported")
        out["pad_token"] = "!"
    else:
        version = params.get("version", "openai/clip-vit-large-patch14")
        if version != "openai/clip-vit-large-patch14":
            raise ModelConfigError(f"{where}.version {version!r}: only openai/clip-vit-large-patch14 (SDXL's first "
                                   "text encoder) is supported")
        # layer "hidden" reads HF's hidden_states[layer_idx]: 11 (or -2) of 12 is the penultimate layer
        layer, index = params.get("layer", "last"), params.get("layer_idx")
        if not (layer == "last" or layer == "hidden" and index in (11, -2)):
            raise ModelConfigError(f"{where}.layer {layer!r} (layer_idx {index}): use 'hidden' with layer_idx 11 "
                                   "(SDXL) or 'last'")
        out.update(pad_token="<|endoftext|>", layer="last" if layer == "last" else "penultimate")
    if "max_length" in params:
        out["context_length"] = params["max_length"]
    return _typed(TextEncoderConfig, out, where)


def _sgm_conditioner(mp, path):
    """`(text_encoder, text_encoder_2, size_embedding_dim, width of the vector y)` from the conditioner."""
    _, params = _section(mp, "conditioner_config", path, SGM_TARGETS, "an SDXL")
    where = f"{path}: model.params.conditioner_config.params.emb_models"
    models = params.get("emb_models")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ModelConfigError(f"{where} is missing")
    for i, m in enumerate(models):
        if m.get("target") not in SGM_EMBEDDERS:
            raise ModelConfigError(f"{where}[{i}].target {m.get('target')} is not an SDXL base conditioner this "
                                   f"project builds (known: {', '.join(SGM_EMBEDDERS)})")
    kinds = tuple(SGM_EMBEDDERS[m["target"]] for m in models)
    sizes = [m for m in models if SGM_EMBEDDERS[m["target"]] == "size"]
    dims = {(m.get("params") or {}).get("outdim") for m in sizes}
    if (kinds != _SDXL_EMBEDDERS or tuple(m.get("input_key") for m in sizes) != _SDXL_SIZE_KEYS
            or len(dims) != 1 or not isinstance(min(dims), int)):
        raise ModelConfigError(f"{where}: not SDXL base's conditioners (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2, "
                               f"then ConcatTimestepEmbedderND on {', '.join(_SDXL_SIZE_KEYS)} with one outdim)")
    text, text_2 = (_sgm_text_encoder(SGM_EMBEDDERS[m["target"]], dict(m.get("params") or {}),
                                      f"{where}[{i}].params") for i, m in enumerate(models[:2]))
    size_dim = dims.pop()
    # each ConcatTimestepEmbedderND embeds a pair of numbers
    return text, text_2, size_dim, text_2.projection_dim + 2 * len(sizes) * size_dim


def _sgm_schedule(mp, path):
    """ModelConfig fields from the sgm `denoiser_config` (absent: its defaults, SDXL base's)."""
    if "denoiser_config" not in mp:
        return {}
    _, params = _section(mp, "denoiser_config", path, SGM_TARGETS, "an SDXL")
    where = f"{path}: model.params.denoiser_config.params"
    out = {"timesteps": params["num_idx"]} if "num_idx" in params else {}
    scaling = (params.get("scaling_config") or {}).get("target", next(iter(_SGM_SCALINGS)))
    if scaling not in _SGM_SCALINGS:
        raise ModelConfigError(f"{where}.scaling_config.target {scaling} is not supported (known: "
                               f"{', '.join(_SGM_SCALINGS)})")
    out["parameterization"] = _SGM_SCALINGS[scaling]
    discretization = params.get("discretization_config") or {}
    if discretization.get("target", _SGM_DISCRETIZATION) != _SGM_DISCRETIZATION:
        raise ModelConfigError(f"{where}.discretization_config.target {discretization['target']} is not supported "
                               f"(known: {_SGM_DISCRETIZATION})")
    schedule = discretization.get("params") or {}
    out.update({k: schedule[k] for k in ("linear_start", "linear_end") if k in schedule})
    return out


def _sgm_model_config(mp, path):
    """`ModelConfig` of an sgm DiffusionEngine YAML (SDXL base)."""
    where = f"{path}: model.params.network_config.params"
    unet = _unet_config(_section(mp, "network_config", path, SGM_TARGETS, "an SDXL")[1], where)
    vae = _vae_config(_section(mp, "first_stage_config", path, SGM_TARGETS, "an SDXL")[1],
                      f"{path}: model.params.first_stage_config.params")
    text, text_2, size_dim, adm = _sgm_conditioner(mp, path)
    if unet.adm_in_channels != adm:
        raise ModelConfigError(f"{where}: adm_in_channels {unet.adm_in_channels} (with num_classes 'sequential') "
                               f"must be the conditioner's vector width {adm}")
    if unet.context_dim != text.width + text_2.width:
        raise ModelConfigError(f"{where}.context_dim {unet.context_dim} does not match the two text encoders' "
                               f"{text.width} + {text_2.width}")
    top = dict(_sgm_schedule(mp, path), image_size=SDXL_IMAGE_SIZE, size_embedding_dim=size_dim)
    if "scale_factor" in mp:
        top["scale_factor"] = mp["scale_factor"]
    return replace(_typed(ModelConfig, top, f"{path}: model.params"), unet=unet, vae=vae, text_encoder=text,
                   text_encoder_2=text_2)


def load_model_config(path) -> ModelConfig:
    """Read a CompVis, Stability or mindone model YAML (`model.params.{unet_config, first_stage_config,
    cond_stage_config}`) or an sgm one (SDXL: `model.params.{network_config, first_stage_config,
    conditioner_config, denoiser_config}`)."""
    with open(path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return model_config_from_dict(config, str(path))


# levels that get attention, a set: CompVis YAMLs list [4, 2, 1], weights read as (1, 2, 4)
_SET_FIELDS = ("attention_resolutions", "attn_resolutions")
# parts a config may lack (None): flattened as their fields, all None, so that both sides have the names
_OPTIONAL_PARTS = {"text_encoder_2": TextEncoderConfig}


def _transformer_depths(unet):
    """`transformer_depth` as what it builds: one number when all transformers have that depth, else one per
    level with 0 for the levels without attention (the last level's counts always: the middle block's)."""
    levels = len(unet.channel_mult)
    depths = unet.transformer_depth
    depths = (depths,) * levels if isinstance(depths, int) else tuple(depths)
    if len(depths) != levels:
        return depths
    depths = tuple(d if 2 ** i in unet.attention_resolutions or i == levels - 1 else 0
                   for i, d in enumerate(depths))
    used = set(depths) - {0}
    return used.pop() if len(used) == 1 else depths


def _flat(cfg):
    """`{"unet.channel_mult": ..., "parameterization": ...}` of a ModelConfig."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.name in _OPTIONAL_PARTS:
            out.update({f"{f.name}.{g.name}": None for g in fields(_OPTIONAL_PARTS[f.name])})
        elif is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in asdict(value).items()})
        else:
            out[f.name] = value
    out["unet.transformer_depth"] = _transformer_depths(cfg.unet)
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
    """Build one cell per `model_parts(cfg)`, `(unet, vae, text_encoder[, text_encoder_2])`, with random
    weights; `dtype` is the compute dtype.

    Parameters stay float32 (they are what checkpoints load into and what optimizers update);
    matmuls and convs run in `dtype`, norms and softmax in float32, and SDXL's VAE always in float32
    (it overflows in fp16: diffusers' `force_upcast`). `init=False` allocates no parameter
    data (MindSpore's `no_init_parameters`): names and shapes only, which is all a key check needs, in
    a fraction of a second for a full-size model instead of ~17 s and 3.4 GB.
    """
    def text_encoder(text_cfg):
        kwargs = asdict(text_cfg)
        kwargs.pop("pad_token")   # a tokenizer concern
        return CLIPTextModel(**kwargs, dtype=dtype)

    with contextlib.nullcontext() if init else no_init_parameters():
        vae_dtype = ms.float32 if cfg.text_encoder_2 is not None else dtype
        cells = (UNetModel(**asdict(cfg.unet), dtype=dtype), AutoencoderKL(**asdict(cfg.vae), dtype=vae_dtype),
                 text_encoder(cfg.text_encoder))
        if cfg.text_encoder_2 is not None:
            cells += (text_encoder(cfg.text_encoder_2),)
    return cells
