"""Weight layouts -> our parameter names (docs/design.md), model configs from weights, strict loading.

Three layouts are read:
- `original`: the CompVis/Stability single file (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.transformer.*` for SD1's OpenAI CLIP, `cond_stage_model.model.*` for SD2's OpenCLIP
  with packed `in_proj` attention; SDXL's sgm file: `conditioner.embedders.0.transformer.*` for CLIP ViT-L
  and `conditioner.embedders.1.model.*` for OpenCLIP ViT-bigG), `.safetensors` or torch `.ckpt`;
- `diffusers`: a pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; SDXL's
  also `text_encoder_2/`, `tokenizer_2/`);
- `mindone`: MindSpore `.ckpt` of mindone's ldm (CompVis names with `gamma/beta`, `embedding_table`,
  wrapped convs `X.conv.weight`, `in_layers_norm`/`in_layers_conv`/..., and its own text encoder names).

A single file's keys are model weights, or set aside by name in known categories (noise schedule
buffers, EMA copies or counters, CLIP extras, SD2's unused last text block: `split_single_file`), or an
error. Config checks compare meaning (`ldm.models.config_differences`), not YAML spelling.

MindSpore and `ldm.models` are imported inside the functions that need them: the key maps here are also
used by tools/dev/make_reference_fixtures.py, which runs in a torch environment without MindSpore.
"""
import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ldm.checkpoint_io import CheckpointError, load_state_dict

logger = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder")   # SD 1.x/2.x; SDXL adds "text_encoder_2" (ldm.models.model_parts)
ORIGINAL_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
OPENAI_PREFIX = "cond_stage_model.transformer."   # SD1 (and mindone's first SD2 release)
OPENCLIP_PREFIX = "cond_stage_model.model."       # SD2
# SDXL's sgm conditioner: CLIP ViT-L under HF names, OpenCLIP ViT-bigG under OpenCLIP names
XL_PREFIXES = {"text_encoder": "conditioner.embedders.0.transformer.",
               "text_encoder_2": "conditioner.embedders.1.model."}
# SDXL's vector conditioning: pooled text ++ the embeddings of 6 size/crop numbers (original size, crop
# top-left, target size: a pair each)
SIZE_IDS = 6


def _rename(sd, rules):
    """Apply `(pattern, replacement)` regex rules, in order, to every key."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- UNet

_RESNET_DIFFUSERS_TO_COMPVIS = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))

_UNET_DIFFUSERS_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL's "text_time" added conditioning (sgm's num_classes "sequential")
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_to_compvis(rest):
    head, _, tail = rest.partition(".")
    return dict(_RESNET_DIFFUSERS_TO_COMPVIS).get(head, head) + "." + tail


def unet_from_diffusers(sd):
    """diffusers `UNet2DConditionModel` state dict -> CompVis openaimodel names.

    The block arithmetic follows CompVis: input block 0 is conv_in, then per level `layers_per_block`
    (resnet[, transformer]) blocks and a downsample block; output blocks have one more resnet per level,
    the upsampler sitting after the transformer when the level has one.
    """
    lpb = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        name, _, param = key.rpartition(".")
        if name in _UNET_DIFFUSERS_TOP:
            new = f"{_UNET_DIFFUSERS_TOP[name]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + level * (lpb + 1) + j
            new = (f"input_blocks.{index}.0.{_resnet_to_compvis(rest)}" if kind == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, j, rest = m.groups()
            new = (f"middle_block.{2 * int(j)}.{_resnet_to_compvis(rest)}" if kind == "resnets"
                   else f"middle_block.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = level * (lpb + 1) + j
            new = (f"output_blocks.{index}.0.{_resnet_to_compvis(rest)}" if kind == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m.group(1))
            slot = 2 if level in up_has_attn else 1
            new = f"output_blocks.{level * (lpb + 1) + lpb}.{slot}.conv.{m.group(2)}"
        else:
            new = key   # left as is: the strict load reports it as unexpected
        out[new] = value
    return out


_UNET_MINDONE_RULES = (
    (r"\.gamma$", ".weight"), (r"\.beta$", ".bias"),
    (r"\.in_layers_norm\.", ".in_layers.0."), (r"\.in_layers_conv\.", ".in_layers.2."),
    (r"\.out_layers_norm\.", ".out_layers.0."), (r"\.out_layers_conv\.", ".out_layers.3."),
    # mindone wraps every UNet conv in a cell with a `conv` member: X.conv.weight is CompVis' X.weight
    (r"\.conv\.(weight|bias)$", r".\1"),
)


# ---------------------------------------------------------------------------------------------- VAE

def vae_attention_as_conv(sd):
    """Mid-block attention q/k/v/proj_out as 1x1 conv weights `[C, C, 1, 1]` (some files store `[C, C]`)."""
    return {k: (v.reshape(*v.shape, 1, 1) if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k)
                and v.ndim == 2 else v) for k, v in sd.items()}


_VAE_ATTN_DIFFUSERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                       "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def vae_from_diffusers(sd):
    """diffusers `AutoencoderKL` state dict -> CompVis autoencoder names (decoder levels are reversed)."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m.group(1))
            new = f"decoder.up.{level}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN_DIFFUSERS.get(m.group(2), m.group(2))}.{m.group(3)}"
        else:
            new = key
        out[new] = value
    return vae_attention_as_conv(out)


# ---------------------------------------------------------------------------------------------- text encoder

_TEXT_IGNORED = re.compile(r"(^|\.)(position_ids|text_projection|logit_scale|attn_mask)$")


def text_from_openai(sd):
    """SD1 original (`cond_stage_model.transformer.` stripped) or diffusers CLIPTextModel -> our names."""
    # very old transformers versions saved CLIPTextModel without the `text_model.` level
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items() if not _TEXT_IGNORED.search(k)}


def text_with_projection(sd):
    """diffusers CLIPTextModelWithProjection (SDXL's text_encoder_2) -> our names: as `text_from_openai`,
    keeping `text_projection.weight` (the pooled output's projection)."""
    projection = {k: v for k, v in sd.items() if k == "text_projection.weight"}
    return {**text_from_openai({k: v for k, v in sd.items() if k not in projection}), **projection}


_OPENCLIP_TO_HF = (
    (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1."),
    (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
)


def text_from_openclip(sd):
    """OpenCLIP text tower (`cond_stage_model.model.` or `conditioner.embedders.1.model.` stripped, extras
    set aside) -> our HF names.

    The packed `attn.in_proj_{weight,bias}` rows are q, k, v in that order. `text_projection` (kept by
    SDXL only) is applied by OpenCLIP as `x @ P`: HF's Linear weight is its transpose.
    """
    out = {}
    for key, value in _rename(sd, _OPENCLIP_TO_HF).items():
        if p := re.fullmatch(r"(.+)\.attn\.in_proj_(weight|bias)", key):
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{p.group(1)}.self_attn.{name}.{p.group(2)}"] = chunk
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        else:
            out[key] = value
    return out


# mindone's two text encoders, renamed to the OpenCLIP original names so that one converter serves all
_TEXT_MINDONE_TO_OPENCLIP = (
    (r"\.gamma$", ".weight"), (r"\.beta$", ".bias"),
    (r"^(token_embedding\.)?embedding_table$", "token_embedding.weight"),
    (r"^transformer_layer\.", "transformer."),
    (r"\.attn\.(attn\.)?in_proj\.(weight|bias)$", r".attn.in_proj_\2"),
    (r"\.attn\.attn\.out_proj\.", ".attn.out_proj."),
    (r"\.(?<!mlp\.)c_(fc|proj)\.", r".mlp.c_\1."),
)


# ---------------------------------------------------------------------------------------------- single files

# Keys of real single files that hold nothing our cells load, by category. Any other key outside the
# model weights is an error: a file we do not understand is not half-loaded in silence.
IGNORED_SCHEDULE = "noise schedule buffers"
IGNORED_TRAINING = "EMA/training counters"
IGNORED_EMA = "EMA UNet copies (extract_ema loads them)"
IGNORED_NON_EMA = "non-EMA UNet weights (extract_ema)"
IGNORED_TEXT_EXTRAS = "CLIP position_ids/logit_scale/text_projection"
IGNORED_TEXT_LAYERS = "unused text encoder layers"

# LatentDiffusion's registered buffers, and sgm's DiscreteDenoiser one (SDXL files saved from sgm's
# DiffusionEngine; the released sd_xl_base_1.0 has none); our schedule is computed from the model config
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "denoiser.sigmas")
# LitEma's counters (CompVis/Stability files) and the step count mindone's training checkpoints carry
TRAINING_KEYS = ("model_ema.decay", "model_ema.num_updates", "global_step")
EMA_PREFIX = "model_ema."
# CLIP tensors the text encoder's output does not use: HF position_ids (a buffer), OpenCLIP's contrastive
# head and its causal mask (SDXL's bigG keeps text_projection: the pooled output goes through it)
_TEXT_EXTRAS = re.compile(r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(text_model\.)?embeddings"
                          r"\.position_ids|cond_stage_model\.model\.(logit_scale|text_projection|attn_mask)"
                          r"|conditioner\.embedders\.1\.model\.(logit_scale|attn_mask)")
# OpenCLIP blocks: original SD 2.x files and mindone's text encoders
_TEXT_BLOCK = re.compile(r"cond_stage_model\.(?:model\.transformer|transformer\.transformer_layer)"
                         r"\.resblocks\.(\d+)\.")


@dataclass
class KeyReport:
    """What became of a weight file's keys: `ignored` maps a category above to the keys set aside."""
    layout: str
    total: int
    ignored: dict = field(default_factory=dict)

    @property
    def loaded(self):
        return self.total - sum(len(keys) for keys in self.ignored.values())

    def summary(self):
        ignored = ", ".join(f"{len(keys)} {category}" for category, keys in self.ignored.items() if keys)
        return f"{self.layout} layout, {self.total} keys: {self.loaded} loaded, " + (
            f"{self.total - self.loaded} ignored ({ignored})" if ignored else "none ignored")


class _KeyReports(logging.Handler):
    def __init__(self):
        super().__init__()
        self.reports = []

    def emit(self, record):
        if hasattr(record, "key_report"):
            self.reports.append(record.key_report)


@contextlib.contextmanager
def collect_key_reports():
    """A list that receives the `KeyReport` of every load inside the block (for tools that print them)."""
    handler, level = _KeyReports(), logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield handler.reports
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def detect_layout(keys):
    """'original' or 'mindone' for a single-file state dict's keys; None for anything else."""
    keys = list(keys)
    unet = [k for k in keys if k.startswith(ORIGINAL_PREFIXES["unet"])]
    if not unet:
        return None
    if any(k.endswith((".gamma", ".beta")) or "embedding_table" in k or ".in_layers_conv." in k for k in keys):
        return "mindone"
    return "original"


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ema_name(unet_key):
    """LitEma's name for the EMA copy of `model.diffusion_model.<unet_key>`: the path without its dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _unet_weights(sd, source, use_ema):
    """`(UNet in CompVis names, the file keys it came from, {category: keys set aside})`.

    A file with `model_ema.*` copies (v1-5-pruned.ckpt) gives its non-EMA `model.diffusion_model.*`
    weights, as diffusers' original-checkpoint converter (extract_ema=False) and A1111 do, unless
    `use_ema`. EMA names with no UNet weight to copy are left unclaimed (unexpected).
    """
    unet = _strip(sd, ORIGINAL_PREFIXES["unet"])
    originals = {ORIGINAL_PREFIXES["unet"] + k: k for k in unet}
    copies = {ema_name(k): k for k in unet}
    ema = [k for k in copies if k in sd]
    if not use_ema:
        if ema:
            logger.info("%s: holds EMA and non-EMA UNet weights; using the non-EMA ones (as diffusers and A1111 "
                        "do); extract_ema (--extract_ema, or the train config key) loads the EMA ones", source)
        return unet, list(originals), {IGNORED_EMA: ema}
    if not ema:
        raise CheckpointError(f"{source}: extract_ema is set but the file holds no EMA copies (model_ema.*): its "
                              "model.diffusion_model.* weights are the only ones; load it without extract_ema")
    if len(ema) < len(copies):
        lacking = next(k for k in copies if k not in sd)
        raise CheckpointError(f"{source}: the EMA copies lack {len(copies) - len(ema)} UNet weights (e.g. "
                              f"{lacking}); load it without extract_ema")
    logger.info("%s: using the EMA UNet weights (model_ema.*)", source)
    return {copies[k]: sd[k] for k in ema}, ema, {IGNORED_NON_EMA: list(originals)}


def split_single_file(sd, source, text_layers=None, use_ema=False):
    """A single-file SD state dict -> `(parts, report)`: `{"unet","vae","text_encoder"[,"text_encoder_2"]}` in
    our names and a `KeyReport` (layout, key counts, the keys set aside by category).

    text_layers: how many OpenCLIP blocks to keep; by default an original SD2 file drops its last one
    (SD2 conditions on the penultimate block), while mindone's SD2 files already hold only those.
    use_ema: the UNet from the `model_ema.*` copies (see `_unet_weights`).
    Keys that are neither model weights nor in a category above raise CheckpointError.
    """
    layout = detect_layout(sd.keys())
    if layout is None:
        raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint (no {ORIGINAL_PREFIXES['unet']}* weights)")
    unet, used, ignored = _unet_weights(sd, source, use_ema)
    ignored[IGNORED_SCHEDULE] = [k for k in SCHEDULE_BUFFERS if k in sd]
    ignored[IGNORED_TRAINING] = [k for k in TRAINING_KEYS if k in sd]
    ignored[IGNORED_TEXT_EXTRAS] = [k for k in sd if _TEXT_EXTRAS.fullmatch(k)]
    blocks = {k: int(m.group(1)) for k in sd if (m := _TEXT_BLOCK.match(k))}
    if text_layers is None:
        text_layers = 1 + max(blocks.values(), default=-1)
        if layout == "original":
            text_layers -= 1
    ignored[IGNORED_TEXT_LAYERS] = [k for k, block in blocks.items() if block >= text_layers]

    claimed = set(used).union(*ignored.values())
    rest = {k: v for k, v in sd.items() if k not in claimed}
    # one family's text encoders only: an SDXL file's are all under conditioner.*, SD 1.x/2.x's under cond_stage_model.*
    xl = layout == "original" and any(k.startswith(tuple(XL_PREFIXES.values())) for k in rest)
    text_prefixes = tuple(XL_PREFIXES.values()) if xl else (OPENAI_PREFIX, OPENCLIP_PREFIX)
    unexpected = [k for k in rest if not k.startswith((ORIGINAL_PREFIXES["vae"], *text_prefixes))]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys, neither Stable Diffusion weights nor known extras: "
                              f"{len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    vae = _strip(rest, ORIGINAL_PREFIXES["vae"])
    openai, openclip = _strip(rest, OPENAI_PREFIX), _strip(rest, OPENCLIP_PREFIX)
    if layout == "mindone":
        unet = _rename(unet, _UNET_MINDONE_RULES)
        vae = _rename(vae, _UNET_MINDONE_RULES[:2])
        texts = {"text_encoder": text_from_openclip(_rename(openclip or openai, _TEXT_MINDONE_TO_OPENCLIP))}
    elif xl:
        texts = {"text_encoder": text_from_openai(_strip(rest, XL_PREFIXES["text_encoder"])),
                 "text_encoder_2": text_from_openclip(_strip(rest, XL_PREFIXES["text_encoder_2"]))}
    else:
        texts = {"text_encoder": text_from_openclip(openclip) if openclip else text_from_openai(openai)}
    parts = {"unet": unet, "vae": vae_attention_as_conv(vae), **texts}
    prefixes = {"vae": ORIGINAL_PREFIXES["vae"], **(XL_PREFIXES if xl else {"text_encoder": "cond_stage_model."})}
    for part, prefix in prefixes.items():
        if not parts[part]:
            raise CheckpointError(f"{source}: the file has UNet weights but no {prefix}* weights")
    return parts, KeyReport(layout, len(sd), {k: v for k, v in ignored.items() if v})


# ---------------------------------------------------------------------------------------------- diffusers folders

_DIFFUSERS_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model", "model"),
    "vae": ("diffusion_pytorch_model", "model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}


def is_diffusers_folder(path):
    return os.path.isdir(path) and all(os.path.isdir(os.path.join(path, p)) for p in PARTS)


def _diffusers_weight_file(folder, part):
    sub = os.path.join(folder, part)
    for stem in _DIFFUSERS_WEIGHT_NAMES[part]:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                path = os.path.join(sub, stem + variant + ext)
                if os.path.isfile(path):
                    return path
    raise CheckpointError(f"{sub}: no weight file (expected e.g. {_DIFFUSERS_WEIGHT_NAMES[part][0]}.safetensors)")


def read_json(path, required=True):
    """A JSON config file as a dict; CheckpointError (one line) when it is invalid or, if required, missing."""
    if not os.path.isfile(path):
        if required:
            raise CheckpointError(f"{path}: missing")
        return {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _diffusers_heads(unet, source):
    """CompVis (num_heads, num_head_channels) from diffusers' head settings.

    diffusers' `attention_head_dim` is, for SD, the number of heads (a historical misnomer) and
    `num_attention_heads`, when present, overrides it. A per-level list with a constant width per head
    is CompVis' `num_head_channels` (SD2: 64).
    """
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    channels = list(unet["block_out_channels"])
    if isinstance(heads, int):
        return heads, -1
    heads = list(heads)
    widths = {c // h for c, h in zip(channels, heads)}
    if len(set(heads)) == 1:
        return heads[0], -1
    if len(widths) == 1 and all(c % h == 0 for c, h in zip(channels, heads)):
        return -1, widths.pop()
    raise CheckpointError(f"{source}: attention heads {heads} for channels {channels} have no CompVis equivalent")


def _pad_token(folder, tokenizer="tokenizer"):
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = read_json(os.path.join(folder, tokenizer, name), required=False).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad:
            return pad
    return None


def _diffusers_text_config(folder, part, xl):
    """`TextEncoderConfig` of `text_encoder/` or SDXL's `text_encoder_2/` (its pad token from the tokenizer
    folder beside it; SDXL conditions both on the penultimate layer, the second also gives the pooled output)."""
    from ldm.models import TextEncoderConfig

    path = os.path.join(folder, part, "config.json")
    text = read_json(path)
    act = text.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{path}: hidden_act {act!r} is not supported")
    pad = _pad_token(folder, part.replace("text_encoder", "tokenizer"))
    return TextEncoderConfig(
        vocab_size=text.get("vocab_size", 49408), context_length=text.get("max_position_embeddings", 77),
        width=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        intermediate_size=text["intermediate_size"], use_quick_gelu=act == "quick_gelu",
        epsilon=float(text.get("layer_norm_eps", 1e-5)),
        pad_token=pad or ("<|endoftext|>" if act == "quick_gelu" else "!"),
        layer="penultimate" if xl else "last",
        projection_dim=int(text.get("projection_dim", 0)) if part == "text_encoder_2" else 0)


def _diffusers_depth(unet, source):
    """CompVis transformer_depth from `transformer_layers_per_block`: one number, or one per level (SDXL)."""
    depth = unet.get("transformer_layers_per_block", 1)
    if isinstance(depth, int):
        return depth
    if not all(isinstance(d, int) for d in depth):
        raise CheckpointError(f"{source}: per-block transformer depths {depth} are not supported (one per level is)")
    return depth[0] if len(set(depth)) == 1 else tuple(depth)


def _diffusers_adm(unet, source):
    """`(adm_in_channels, size_embedding_dim)` of SDXL's "text_time" added conditioning; (0, None) without."""
    added = unet.get("addition_embed_type")
    if added is None:
        return 0, None
    if added != "text_time":
        raise CheckpointError(f"{source}: addition_embed_type {added!r} is not supported (SDXL's is 'text_time')")
    return int(unet["projection_class_embeddings_input_dim"]), int(unet["addition_time_embed_dim"])


def config_from_diffusers(folder):
    """`ModelConfig` from a diffusers folder's `config.json` files and scheduler config."""
    from ldm.models import ModelConfig, UNetConfig, VAEConfig

    unet = read_json(os.path.join(folder, "unet", "config.json"))
    vae = read_json(os.path.join(folder, "vae", "config.json"))
    sched = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"), required=False)
    source = os.path.join(folder, "unet", "config.json")

    channels = list(unet["block_out_channels"])
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{source}: block_out_channels {channels} are not multiples of the first")
    attention_levels = [2 ** i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    depth = _diffusers_depth(unet, source)
    adm_in_channels, size_embedding_dim = _diffusers_adm(unet, source)
    xl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    if xl != bool(adm_in_channels):
        have, lack = ("text_encoder_2/", "addition_embed_type 'text_time' in unet/config.json")[::1 if xl else -1]
        raise CheckpointError(f"{folder}: has {have} but no {lack}; an SDXL folder has both, an SD 1.x/2.x one neither")
    num_heads, num_head_channels = _diffusers_heads(unet, source)
    unet_cfg = UNetConfig(
        in_channels=unet.get("in_channels", 4), out_channels=unet.get("out_channels", 4),
        model_channels=channels[0], attention_resolutions=tuple(attention_levels),
        num_res_blocks=unet.get("layers_per_block", 2), channel_mult=tuple(c // channels[0] for c in channels),
        num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=depth,
        context_dim=unet.get("cross_attention_dim", 768),
        use_linear_in_transformer=bool(unet.get("use_linear_projection", False)),
        norm_num_groups=unet.get("norm_num_groups", 32), adm_in_channels=adm_in_channels)

    vae_channels = list(vae["block_out_channels"])
    vae_cfg = VAEConfig(
        ch=vae_channels[0], ch_mult=tuple(c // vae_channels[0] for c in vae_channels),
        num_res_blocks=vae.get("layers_per_block", 2), in_channels=vae.get("in_channels", 3),
        out_ch=vae.get("out_channels", 3), z_channels=vae.get("latent_channels", 4),
        embed_dim=vae.get("latent_channels", 4), resolution=vae.get("sample_size", 256),
        norm_num_groups=vae.get("norm_num_groups", 32))

    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{folder}: scheduler prediction_type {prediction!r} is not supported")
    defaults = ModelConfig()
    return ModelConfig(
        unet=unet_cfg, vae=vae_cfg, text_encoder=_diffusers_text_config(folder, "text_encoder", xl),
        text_encoder_2=_diffusers_text_config(folder, "text_encoder_2", xl) if xl else None,
        size_embedding_dim=size_embedding_dim or defaults.size_embedding_dim,
        parameterization="v" if prediction == "v_prediction" else "eps",
        linear_start=float(sched.get("beta_start", defaults.linear_start)),
        linear_end=float(sched.get("beta_end", defaults.linear_end)),
        timesteps=int(sched.get("num_train_timesteps", defaults.timesteps)),
        scale_factor=float(vae.get("scaling_factor", defaults.scale_factor)),
        image_size=int(unet.get("sample_size", 64)) * 2 ** (len(vae_channels) - 1))


def load_diffusers_folder(folder):
    """`(parts, KeyReport)`: the state dicts of a diffusers folder in our names (SDXL's text_encoder_2 too,
    when the folder has one), and what became of their keys (older transformers versions saved CLIP's
    position_ids buffer)."""
    converters = {"unet": unet_from_diffusers, "vae": vae_from_diffusers, "text_encoder": text_from_openai}
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        converters["text_encoder_2"] = text_with_projection
    parts, report = {}, KeyReport("diffusers", 0)
    extras = []
    for part, convert in converters.items():
        sd = load_state_dict(_diffusers_weight_file(folder, part))
        report.total += len(sd)
        extras += [f"{part}/{k}" for k in sd if part.startswith("text_encoder") and _TEXT_IGNORED.search(k)]
        parts[part] = convert(sd)
    if extras:
        report.ignored[IGNORED_TEXT_EXTRAS] = extras
    return parts, report


# ---------------------------------------------------------------------------------------------- configs from weights

def _count(sd, pattern):
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


# SDXL base's scale factor, which its weights do not tell
XL_SCALE_FACTOR = 0.13025


def _text_config_from_weights(text, openclip, layer="last"):
    from ldm.models import TextEncoderConfig

    token = text["text_model.embeddings.token_embedding.weight"]
    width = token.shape[1]
    projection = text.get("text_projection.weight")
    return TextEncoderConfig(
        vocab_size=token.shape[0], width=width,
        context_length=text["text_model.embeddings.position_embedding.weight"].shape[0],
        layers=_count(text, r"text_model\.encoder\.layers\.(\d+)\."), heads=max(width // 64, 1),
        intermediate_size=text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        use_quick_gelu=not openclip, pad_token="!" if openclip else "<|endoftext|>", layer=layer,
        projection_dim=projection.shape[0] if projection is not None else 0)


def infer_config(parts, text_flavour=None):
    """A `ModelConfig` with every shape-determining field read from converted weights.

    What weights cannot tell (head counts, group counts, schedule, parameterization) comes from the SD
    release of the same family: SD1 (8 heads, OpenAI CLIP) when the transformers' proj_in is a 1x1 conv,
    SD2 (64-wide heads, OpenCLIP) when it is linear, SDXL base (64-wide heads, CLIP ViT-L and OpenCLIP
    bigG both read at the penultimate layer, its scale factor and size) when there is a `text_encoder_2`.
    `text_flavour` ('openai' or 'openclip') overrides the text encoder's activation and pad token when the
    layout says which CLIP it is. A level without attention gets transformer depth 1 (as SDXL's configs
    write it), except the last, whose depth is the middle block's.
    """
    from ldm.models import SDXL_IMAGE_SIZE, ModelConfig, UNetConfig, VAEConfig

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    proj_in = next((v for k, v in unet.items() if k.endswith(".proj_in.weight")), None)
    linear = proj_in is not None and proj_in.ndim == 2
    model_channels = unet["input_blocks.0.0.weight"].shape[0]

    mults, attention, depths, level, blocks_in_level, num_res_blocks = [], [], [], 0, 0, None
    for i in range(1, _count(unet, r"input_blocks\.(\d+)\.")):
        if f"input_blocks.{i}.0.op.weight" in unet:
            num_res_blocks = num_res_blocks or blocks_in_level
            level, blocks_in_level = level + 1, 0
            continue
        if blocks_in_level == 0:
            mults.append(unet[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // model_channels)
            depths.append(_count(unet, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
            if f"input_blocks.{i}.1.norm.weight" in unet:
                attention.append(2 ** level)
        blocks_in_level += 1
    middle = _count(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    depths = [d or 1 for d in depths[:-1]] + [depths[-1] or max(middle, 1)]
    context = next((v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")), 768)
    label_emb = unet.get("label_emb.0.0.weight")
    unet_cfg = UNetConfig(
        in_channels=unet["input_blocks.0.0.weight"].shape[1], out_channels=unet["out.2.weight"].shape[0],
        model_channels=model_channels, attention_resolutions=tuple(attention),
        num_res_blocks=num_res_blocks or blocks_in_level, channel_mult=tuple(mults),
        num_heads=-1 if linear else 8, num_head_channels=64 if linear else -1,
        transformer_depth=depths[0] if len(set(depths)) == 1 else tuple(depths),
        context_dim=context, use_linear_in_transformer=linear,
        adm_in_channels=label_emb.shape[1] if label_emb is not None else 0)

    ch = vae["encoder.conv_in.weight"].shape[0]
    z = vae["decoder.conv_in.weight"].shape[1]
    vae_cfg = VAEConfig(
        ch=ch, in_channels=vae["encoder.conv_in.weight"].shape[1], out_ch=vae["decoder.conv_out.weight"].shape[0],
        ch_mult=tuple(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch
                      for i in range(_count(vae, r"encoder\.down\.(\d+)\."))),
        num_res_blocks=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."), z_channels=z,
        embed_dim=vae["post_quant_conv.weight"].shape[1],
        double_z=vae["encoder.conv_out.weight"].shape[0] == 2 * z)

    if "text_encoder_2" not in parts:
        openclip = (text_flavour or ("openclip" if linear else "openai")) == "openclip"
        return ModelConfig(unet=unet_cfg, vae=vae_cfg, text_encoder=_text_config_from_weights(text, openclip))
    text_2 = _text_config_from_weights(parts["text_encoder_2"], openclip=True, layer="penultimate")
    return ModelConfig(
        unet=unet_cfg, vae=vae_cfg, text_encoder=_text_config_from_weights(text, False, "penultimate"),
        text_encoder_2=text_2, scale_factor=XL_SCALE_FACTOR, image_size=SDXL_IMAGE_SIZE,
        size_embedding_dim=(unet_cfg.adm_in_channels - text_2.projection_dim) // SIZE_IDS)


def sd_version(cfg):
    """'xl' for SDXL (a second text encoder), '2.x' for the SD2 family (linear transformer projections,
    OpenCLIP), '1.x' otherwise."""
    if cfg.text_encoder_2 is not None:
        return "xl"
    return "2.x" if cfg.unet.use_linear_in_transformer else "1.x"


# what the weights' shapes determine, compared by meaning (`ldm.models.config_differences`)
_TEXT_SHAPE_FIELDS = ("vocab_size", "width", "layers", "intermediate_size", "context_length", "projection_dim")
_SHAPE_FIELDS = tuple(f"{part}.{name}" for part, names in {
    "unet": ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
             "attention_resolutions", "context_dim", "use_linear_in_transformer", "transformer_depth",
             "adm_in_channels"),
    "vae": ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim"),
    "text_encoder": _TEXT_SHAPE_FIELDS,
    "text_encoder_2": _TEXT_SHAPE_FIELDS,
}.items() for name in names) + ("size_embedding_dim",)
_VERSION_NAMES = {"1.x": "1.x", "2.x": "2.x", "xl": "XL"}


def check_fits(weights_cfg, cfg, source):
    """One-line CheckpointError when the weights' architecture differs from the model config's."""
    from ldm.models import config_differences

    weights_version, config_version = (_VERSION_NAMES[sd_version(c)] for c in (weights_cfg, cfg))
    if weights_version != config_version:
        raise CheckpointError(f"{source}: holds Stable Diffusion {weights_version} weights, but the model config is "
                              f"for SD {config_version}; use the config (or --version) of the weights' version")
    diffs = [f"{name} {ours} in the file vs {theirs} in the config"
             for name, ours, theirs in config_differences(weights_cfg, cfg, _SHAPE_FIELDS)]
    if diffs:
        raise CheckpointError(f"{source}: does not fit the model config: {'; '.join(diffs[:3])}")


# ---------------------------------------------------------------------------------------------- entry points

def load_pretrained(path, model_config=None, use_ema=False):
    """`(ModelConfig, {part: {name: ndarray}}, layout)` for a file or diffusers folder; the parts are
    `ldm.models.model_parts` of the config: unet, vae, text_encoder, and SDXL's text_encoder_2.

    With `model_config`, the weights must fit it (one-line CheckpointError otherwise) and it is returned;
    without, the config comes from the folder's config files or, for a single file, from the weights'
    shapes (see `infer_config`). use_ema: the UNet from a single file's EMA copies (`model_ema.*`);
    CheckpointError when there are none. What became of the keys is logged (INFO); the log record's
    `key_report` attribute is the `KeyReport`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder but not a diffusers pipeline (needs {', '.join(PARTS)}/)")
        if use_ema:
            raise CheckpointError(f"{path}: extract_ema is set but a diffusers folder holds one set of UNet "
                                  "weights (no EMA copies); load it without extract_ema")
        parts, report = load_diffusers_folder(path)
        own_cfg = config_from_diffusers(path)
        weights_cfg = infer_config(parts, "openai" if own_cfg.text_encoder.use_quick_gelu else "openclip")
    else:
        sd = load_state_dict(path)
        text_layers = model_config.text_encoder.layers if model_config is not None else None
        parts, report = split_single_file(sd, path, text_layers, use_ema)
        weights_cfg = own_cfg = infer_config(parts)
    logger.info("%s: %s", path, report.summary(), extra={"key_report": report})
    if model_config is None:
        return own_cfg, parts, report.layout
    check_fits(weights_cfg, model_config, path)
    return model_config, parts, report.layout


def _fits(file_shape, param_shape):
    """Same shape, or a `[out, in, k, k]` conv weight for a cell that keeps it as `[out, in*k*k]` (the
    CPU convolution's matmul layout, `ldm.modules.layers.Conv2d`)."""
    file_shape, param_shape = tuple(file_shape), tuple(param_shape)
    return file_shape == param_shape or (
        len(file_shape) == 4 and param_shape == (file_shape[0], int(np.prod(file_shape[1:]))))


def compare_keys(cell, state_dict):
    """`(missing, unexpected, mismatched)` name lists of `state_dict` against `cell`'s parameters."""
    params = dict(cell.parameters_and_names())
    missing = [n for n in params if n not in state_dict]
    unexpected = [n for n in state_dict if n not in params]
    mismatched = [f"{n} {tuple(state_dict[n].shape)} in the file vs {tuple(params[n].shape)}"
                  f"{' (out, in*k*k)' if len(state_dict[n].shape) == 4 and len(params[n].shape) == 2 else ''}"
                  for n in params if n in state_dict and not _fits(state_dict[n].shape, params[n].shape)]
    return missing, unexpected, mismatched


def load_into(cell, state_dict, what, source):
    """Copy `state_dict` into `cell`'s parameters, strictly: every parameter, no extra key, same shapes.

    Values are cast to each parameter's dtype (fp16/bf16 files load into float32 cells).
    """
    import mindspore as ms

    missing, unexpected, mismatched = compare_keys(cell, state_dict)
    problems = [f"{label} {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if names]
    if problems:
        raise CheckpointError(f"{source}: {what} weights do not match the model: {'; '.join(problems)}")
    for name, param in cell.parameters_and_names():
        param.set_data(ms.Tensor(np.asarray(state_dict[name]).reshape(param.shape), dtype=param.dtype))


def build_pretrained(path, model_config=None, dtype=None, use_ema=False):
    """`(ModelConfig, (unet, vae, text_encoder[, text_encoder_2]), layout)`: the cells built and loaded from
    `path` (see `load_pretrained` for `model_config` and `use_ema`)."""
    import mindspore as ms
    from ldm.models import build_models, model_parts

    cfg, parts, layout = load_pretrained(path, model_config, use_ema)
    cells = build_models(cfg, dtype=dtype or ms.float32)
    for cell, part in zip(cells, model_parts(cfg)):
        load_into(cell, parts[part], part, path)
    return cfg, cells, layout
