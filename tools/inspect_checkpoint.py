"""Dry run of loading Stable Diffusion weights: what the file is and whether it fits a model config.

    python -m tools.inspect_checkpoint PATH [--config configs/v2-inference.yaml | DIFFUSERS_FOLDER] [--list]

Prints the detected format and layout, how many keys are loaded and which are ignored (by category),
per model part the tensor count, parameter count, dtypes and key shapes, the SD version and prediction
type where the source tells them, and the model config inferred from the weights. With `--config`, it
also builds the cells of that config (names and shapes only, no parameter data) and reports missing /
unexpected / mis-shaped parameters per part. `--extract_ema` takes a file's EMA UNet copies.
"""
import argparse
import os
import sys
from dataclasses import asdict

from ldm.checkpoint_io import CheckpointError, sniff_format
from ldm.convert import (check_fits, collect_key_reports, compare_keys, config_from_diffusers, infer_config,
                         is_diffusers_folder, load_pretrained, sd_version)
from ldm.errors import UserInputError
from ldm.models import model_parts

KEY_SHAPES = {
    "unet": ("input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
             "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight"),
    "vae": ("encoder.conv_in.weight", "encoder.mid.attn_1.q.weight", "decoder.conv_out.weight"),
    "text_encoder": ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                     "text_model.encoder.layers.0.mlp.fc1.weight"),
    "text_encoder_2": ("text_model.embeddings.token_embedding.weight", "text_projection.weight"),
}
# what each version's text encoders are
TEXT_KINDS = {"1.x": "OpenAI CLIP", "2.x": "OpenCLIP", "xl": "OpenAI CLIP ViT-L + OpenCLIP ViT-bigG"}
LAYOUTS = {"original": "original CompVis/Stability single file", "diffusers": "diffusers pipeline folder",
           "mindone": "mindone MindSpore checkpoint"}


def _config(path):
    if is_diffusers_folder(path):
        return config_from_diffusers(path)
    from ldm.models import load_model_config
    return load_model_config(path)


def _summary(cfg_part):
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg_part).items())


def describe(path, config_path=None, list_all=False, out=print, use_ema=False):
    with collect_key_reports() as reports:
        own_cfg, parts, layout = load_pretrained(path, use_ema=use_ema)
    weights_cfg = infer_config(parts, None if layout != "diffusers" else
                               ("openai" if own_cfg.text_encoder.use_quick_gelu else "openclip"))
    fmt = "folder" if os.path.isdir(path) else sniff_format(path)
    out(path)
    out(f"  format: {fmt}; layout: {LAYOUTS[layout]}")
    out(f"  keys: {reports[-1].summary()}")
    version = sd_version(weights_cfg)
    label = "SDXL" if version == "xl" else f"SD {version}"
    projections = "linear" if weights_cfg.unet.use_linear_in_transformer else "1x1-conv"
    out(f"  version: {label} ({projections} transformer projections, {TEXT_KINDS[version]}-style text encoder)")
    if layout == "diffusers":
        out(f"  prediction: {own_cfg.parameterization} (scheduler config)")
    else:
        out("  prediction: not recorded in the file (eps, or v for the SD 2.x 768-v models)")
    for part in model_parts(weights_cfg):
        sd = parts[part]
        dtypes = sorted({str(v.dtype) for v in sd.values()})
        count = sum(int(v.size) for v in sd.values())
        out(f"  {part}: {len(sd)} tensors, {count:,} parameters, {'/'.join(dtypes)}")
        for key in KEY_SHAPES[part]:
            if key in sd:
                out(f"    {key} {tuple(sd[key].shape)}")
        if list_all:
            for key in sorted(sd):
                out(f"      {key} {tuple(sd[key].shape)} {sd[key].dtype}")
    out("  inferred config (head and group counts are not in the weights: those are the SD release's):")
    for part in model_parts(weights_cfg):
        out(f"    {part}: {_summary(getattr(weights_cfg, part))}")
    if not config_path:
        return True
    cfg = _config(config_path)
    ok = True
    try:
        check_fits(weights_cfg, cfg, path)
        out(f"  vs {config_path}: architecture fits")
    except CheckpointError as e:
        out(f"  vs {config_path}: {e}")
        ok = False
    if ok:
        from ldm.models import build_models
        del parts   # full-size weights: do not hold two copies
        _, parts, _ = load_pretrained(path, cfg, use_ema)
        for part, cell in zip(model_parts(cfg), build_models(cfg, init=False)):
            missing, unexpected, mismatched = compare_keys(cell, parts[part])
            out(f"  {part}: missing {len(missing)}, unexpected {len(unexpected)}, shape mismatch {len(mismatched)}")
            for label, names in (("missing", missing), ("unexpected", unexpected), ("mismatch", mismatched)):
                for name in names[:10]:
                    out(f"    {label}: {name}")
            ok = ok and not (missing or unexpected or mismatched)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.inspect_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="weights file (.safetensors/.ckpt/.bin) or diffusers folder")
    parser.add_argument("--config", help="model config YAML or diffusers folder to check the weights against")
    parser.add_argument("--list", action="store_true", help="list every converted tensor name and shape")
    parser.add_argument("--extract_ema", action="store_true", help="the UNet from the file's EMA copies")
    args = parser.parse_args(argv)
    try:
        ok = describe(args.path, args.config, args.list, use_ema=args.extract_ema)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
