"""Full-size SD 1.5 / SD 2.1 architectures with random weights: every key through both layouts, and one
UNet (and text encoder) forward against diffusers.

    python tools/check_full_size.py --work /tmp/fullsize [--versions 1.5 2.1]

Two processes per version, one model at a time (SD 1.5's UNet alone is 3.4 GB in fp32):
1. `make` in the torch venv (`--torch-python`, default /work/devvenv/bin/python): diffusers/transformers
   models with the release's architecture and random fp16-rounded weights, written as a diffusers
   folder and as an original single file (checked against diffusers' own conversion), plus the
   reference outputs for a 1x4x16x16 latent and one prompt;
2. `check` here, with MindSpore: both layouts loaded strictly into our cells (missing / unexpected /
   mis-shaped counts per part), the forward passes compared with the references.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARCHITECTURES = {
    "1.5": dict(
        unet=dict(cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        openclip=False),
    "2.1": dict(
        unet=dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  upcast_attention=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu"),
        openclip=True),
}


def make(version, work):
    """Torch side: models, both layouts, references."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_reference_fixtures import check_against_diffusers, original_layout, randomize, save_half, text_state

    arch = ARCHITECTURES[version]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    folder = os.path.join(work, f"sd{version}")
    shutil.rmtree(folder, ignore_errors=True)
    unet = randomize(UNet2DConditionModel(sample_size=64, **arch["unet"]), gen)
    vae = randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512), gen)
    text = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **arch["text"])), gen)

    save_half(unet, os.path.join(folder, "unet"))
    save_half(vae, os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "text_encoder"))
    text.config.to_json_file(os.path.join(folder, "text_encoder", "config.json"))
    save_file({k: v.half().contiguous() for k, v in text_state(text).items()},
              os.path.join(folder, "text_encoder", "model.safetensors"))
    for part in ("tokenizer", "scheduler"):
        os.makedirs(os.path.join(folder, part))

    original = original_layout(unet, vae, text, arch["openclip"], gen)
    check_against_diffusers(original, unet, vae, text, arch["openclip"])
    save_file({k: v.contiguous() for k, v in original.items()}, os.path.join(work, f"sd{version}.safetensors"))
    del original

    with torch.no_grad():
        ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])
        latents = torch.randn(1, 4, 16, 16, generator=gen)
        timesteps = torch.tensor([500])
        context = torch.randn(1, 77, arch["unet"]["cross_attention_dim"], generator=gen)
        start = time.time()
        out = unet(latents, timesteps, encoder_hidden_states=context).sample
        print(f"  diffusers UNet forward: {time.time() - start:.1f} s")
        hidden = text(ids).last_hidden_state
    np.savez(os.path.join(work, f"sd{version}-reference.npz"), ids=ids.numpy().astype(np.int32), hidden=hidden.numpy(),
             x=latents.numpy(), t=timesteps.numpy().astype(np.int32), context=context.numpy(), out=out.numpy())


def check(version, work):
    """MindSpore side: strict key check through both layouts, forward passes against the references."""
    import mindspore as ms
    import numpy as np

    from ldm.convert import PARTS, compare_keys, load_into, load_pretrained
    from ldm.models import build_models

    ms.set_device("CPU")
    ref = np.load(os.path.join(work, f"sd{version}-reference.npz"))
    folder = os.path.join(work, f"sd{version}")
    cfg = load_pretrained(folder)[0]
    unet, vae, text = build_models(cfg)
    cells = dict(zip(PARTS, (unet, vae, text)))
    ok = True
    for source in (folder, os.path.join(work, f"sd{version}.safetensors")):
        _, parts, layout = load_pretrained(source, cfg)
        counts = []
        for part in PARTS:
            missing, unexpected, mismatched = compare_keys(cells[part], parts[part])
            counts.append(f"{part} {len(parts[part])} tensors: missing {len(missing)}, unexpected {len(unexpected)}, "
                          f"mismatched {len(mismatched)}")
            ok = ok and not (missing or unexpected or mismatched)
        print(f"  {layout}: " + "; ".join(counts))
        for part in ("unet", "text_encoder"):
            load_into(cells[part], parts[part], part, source)
        del parts
        start = time.time()
        out = unet(ms.Tensor(ref["x"]), ms.Tensor(ref["t"]), ms.Tensor(ref["context"])).asnumpy()
        elapsed = time.time() - start
        hidden = text(ms.Tensor(ref["ids"])).asnumpy()
        unet_diff = float(np.abs(out - ref["out"]).max())
        text_diff = float(np.abs(hidden - ref["hidden"]).max())
        print(f"  {layout}: UNet 1x4x16x16 max abs diff {unet_diff:.2e} (|out| max {np.abs(ref['out']).max():.2f}, "
              f"{elapsed:.1f} s); text encoder max abs diff {text_diff:.2e}")
        ok = ok and unet_diff < 1e-3 and text_diff < 1e-3
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("make", "check"), help="one side only (default: both)")
    parser.add_argument("--work", required=True, help="scratch folder for the multi-GB weight files")
    parser.add_argument("--versions", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--torch-python", default="/work/devvenv/bin/python")
    parser.add_argument("--keep", action="store_true", help="keep the weight files")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    ok = True
    for version in args.versions:
        if args.step == "make":
            make(version, args.work)
            continue
        if args.step is None:
            print(f"SD {version}: building the diffusers models and both layouts")
            subprocess.run([args.torch_python, os.path.abspath(__file__), "make", "--work", args.work,
                            "--versions", version], check=True)
        print(f"SD {version}: loading into our cells")
        ok = check(version, args.work) and ok
        if not args.keep:
            shutil.rmtree(os.path.join(args.work, f"sd{version}"), ignore_errors=True)
            for suffix in (".safetensors", "-reference.npz"):
                path = os.path.join(args.work, f"sd{version}{suffix}")
                if os.path.exists(path):
                    os.remove(path)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
