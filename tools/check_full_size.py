"""Full-size stand-ins of the checkpoints users download, loaded and sampled end to end; optionally
full-size diffusers models compared forward with ours.

    python -m tools.check_full_size --work /tmp/fullsize [--key-sets sd15_original ...] [--torch-python PY]
    python -m tools.check_full_size --work /tmp/fullsize --diffusers [--versions 1.5 2.1] --torch-python PY

Key sets (tests/fixtures/checkpoint-keys: names and shapes of the real files, from public listings): per
key set, random fp16 values with exactly those names and shapes, written as the file users have: a
`.safetensors` for the original layouts (plus the torch `.ckpt` zip, `{"state_dict": ...}`, when a torch
interpreter is given by `--torch-python` or TORCH_PYTHON; without one that format is skipped) and a
MindSpore `.ckpt` for mindone's. Each file is then sampled by `text_to_image.main` with its version's
shipped config and no `--config` (one 64x64 image, 2 steps), printing the layout, the loaded / ignored
key counts and the result. One child process per file and version keeps one model in memory at a time
(SD 1.5 with EMA: a 3.9 GB file). The files are deleted afterwards unless `--keep`.

`--diffusers`: two processes per version: `diffusers-make` in the torch interpreter builds
diffusers/transformers models with the release's architecture and random fp16-rounded weights, written
as a diffusers folder and as an original single file (checked against diffusers' own conversion), plus
reference outputs for a 1x4x16x16 latent and one prompt; `diffusers-check` here loads both layouts
strictly into our cells and compares the forward passes.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from tools import ROOT

KEY_LISTS = os.path.join(ROOT, "tests", "fixtures", "checkpoint-keys")
# key set -> the versions whose shipped config it must load with, and whether it has EMA copies to switch to
KEY_SETS = {
    "sd15_original": (("1.5",), False),
    "sd15_original_with_ema": (("1.5",), True),
    "sd21_original": (("2.1", "2.1-v"), False),
    "mindone_sd15": (("1.5",), False),
    "mindone_sd21": (("2.1",), False),
    "mindone_sd21_vae_weightbias": (("2.1",), False),
}
# dtypes of the released files where they are not float: LitEma's counters, HF CLIP's position ids
_DTYPES = {"model_ema.decay": np.float32, "model_ema.num_updates": np.int32}
_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
                       np.dtype(np.int64): "I64"}


def read_key_list(name):
    """`[(key, shape)]` of a key set (`name<TAB>shape` lines, `#` comments, empty shape = a scalar)."""
    out = []
    with gzip.open(os.path.join(KEY_LISTS, name + ".txt.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            out.append((key, tuple(int(n) for n in shape.split(",")) if shape else ()))
    return out


def _dtype(key):
    return np.int64 if key.endswith("position_ids") else _DTYPES.get(key, np.float16)


def _stand_in(key, shape, rng):
    """A random value of the key's shape: weights scaled by their fan-in and norm scales near 1, so that a
    full-size forward pass stays finite."""
    dtype = _dtype(key)
    if key.endswith("position_ids"):
        return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    if np.issubdtype(dtype, np.integer):
        return np.full(shape, 1000, dtype)
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) >= 2:
        x /= np.sqrt(np.prod(shape[1:]))
    elif key.endswith((".weight", ".gamma")):
        x = 1 + 0.1 * x
    else:
        x *= 0.02
    return x.astype(dtype)


def write_safetensors(path, keys, seed=0):
    """Stream stand-ins of `keys` into a safetensors file, one tensor in memory at a time."""
    from ldm.checkpoint_io import atomic_write

    header, offset = {}, 0
    for key, shape in keys:
        size = int(np.prod(shape)) * np.dtype(_dtype(key)).itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(_dtype(key))], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the format aligns the data to 8 bytes
    rng = np.random.default_rng(seed)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in keys:
            f.write(np.ascontiguousarray(_stand_in(key, shape, rng)).tobytes())


def write_mindspore(path, keys, seed=0):
    """Stand-ins of `keys` as a MindSpore checkpoint (mindone's format)."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    ms.save_checkpoint([{"name": key, "data": ms.Tensor(_stand_in(key, shape, rng))} for key, shape in keys], path)


def torch_ckpt(src, dst):
    """(torch interpreter) The safetensors file `src` as a torch zip `{"state_dict": ...}`, as SD releases."""
    import torch
    from safetensors.torch import load_file

    tmp = dst + ".tmp"
    torch.save({"state_dict": load_file(src)}, tmp)
    os.replace(tmp, dst)


def sample(path, version, extract_ema, work):
    """One 64x64 image from `path` by text_to_image.main; prints the key counts and the result."""
    from PIL import Image

    import text_to_image
    from ldm.convert import collect_key_reports

    out = os.path.join(work, "samples")
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--version", version, "--ckpt_path", path, "--prompt", "a photo of a cat", "--H", "64", "--W", "64",
            "--sampling_steps", "2", "--n_samples", "1", "--output_path", out, "--skip_grid"]
    argv += ["--extract_ema"] if extract_ema else []
    start = time.time()
    with collect_key_reports() as reports:
        code = text_to_image.main(argv)
    label = f"{os.path.basename(path)} --version {version}{' --extract_ema' if extract_ema else ''}"
    if code != 0 or not reports:
        print(f"RESULT {label}: FAILED (text_to_image exit code {code})", flush=True)
        return False
    image = np.asarray(Image.open(os.path.join(out, "samples", "00000.png")), np.float32)
    print(f"RESULT {label}: {reports[-1].summary()}; sampled a {image.shape[1]}x{image.shape[0]} image "
          f"(pixel mean {image.mean():.1f}, std {image.std():.1f}) in {time.time() - start:.0f} s", flush=True)
    return True


def _child(*args, python=sys.executable):
    return subprocess.run([python, "-m", "tools.check_full_size", *args], check=False).returncode == 0


def check_key_set(name, work, torch_python, keep):
    """Write the key set's stand-in file(s), sample each with every version it belongs to."""
    versions, has_ema = KEY_SETS[name]
    mindone = name.startswith("mindone")
    files = [os.path.join(work, name + (".ckpt" if mindone else ".safetensors"))]
    start = time.time()
    if not _child("stand-in", name, files[0]):
        return False
    print(f"{name}: wrote {os.path.basename(files[0])} ({os.path.getsize(files[0]) / 2**30:.2f} GiB, "
          f"{time.time() - start:.0f} s)", flush=True)
    if not mindone and torch_python:
        files.append(os.path.join(work, name + ".ckpt"))
        if not _child("torch-ckpt", files[0], files[1], python=torch_python):
            return False
    elif not mindone:
        print(f"{name}: torch .ckpt skipped (no --torch-python / TORCH_PYTHON)", flush=True)
    ok = True
    for path in files:
        for version in versions:
            for extract_ema in (False, True) if has_ema else (False,):
                ok = _child("sample", path, version, *(["--extract-ema"] if extract_ema else []),
                            "--work", work) and ok
        if not keep:
            os.remove(path)
    return ok


# ---------------------------------------------------------------------------------------------- diffusers models

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


def diffusers_make(version, work):
    """Torch side: models, both layouts, references."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from tools.dev.make_reference_fixtures import (check_against_diffusers, original_layout, randomize, save_half,
                                                   text_state)

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


def diffusers_check(version, work):
    """MindSpore side: strict key check through both layouts, forward passes against the references."""
    import mindspore as ms

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


def check_diffusers(version, work, torch_python, keep):
    print(f"SD {version}: building the diffusers models and both layouts", flush=True)
    ok = _child("diffusers-make", version, "--work", work, python=torch_python)
    if ok:
        print(f"SD {version}: loading into our cells", flush=True)
        ok = _child("diffusers-check", version, "--work", work)
    if not keep:
        shutil.rmtree(os.path.join(work, f"sd{version}"), ignore_errors=True)
        for suffix in (".safetensors", "-reference.npz"):
            path = os.path.join(work, f"sd{version}{suffix}")
            if os.path.exists(path):
                os.remove(path)
    return ok


# ---------------------------------------------------------------------------------------------- command line

def main():
    parser = argparse.ArgumentParser(prog="python -m tools.check_full_size", description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch folder for the multi-GB weight files")
    parser.add_argument("--key-sets", nargs="+", default=list(KEY_SETS), choices=list(KEY_SETS))
    parser.add_argument("--diffusers", action="store_true", help="compare full-size diffusers models instead")
    parser.add_argument("--versions", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES),
                        help="--diffusers: the architectures to compare")
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                        help="an interpreter with torch (and diffusers for --diffusers); default $TORCH_PYTHON")
    parser.add_argument("--keep", action="store_true", help="keep the weight files")
    args = parser.parse_args()
    if args.diffusers and not args.torch_python:
        parser.error("--diffusers needs --torch-python (or TORCH_PYTHON)")
    os.makedirs(args.work, exist_ok=True)
    ok = True
    if args.diffusers:
        for version in args.versions:
            ok = check_diffusers(version, args.work, args.torch_python, args.keep) and ok
    else:
        for name in args.key_sets:
            ok = check_key_set(name, args.work, args.torch_python, args.keep) and ok
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


def child_main(step, argv):
    """The steps `main` runs in child processes (one model in memory, or the torch interpreter)."""
    parser = argparse.ArgumentParser(prog=f"python -m tools.check_full_size {step}")
    parser.add_argument("args", nargs="+")
    parser.add_argument("--work")
    parser.add_argument("--extract-ema", action="store_true")
    args = parser.parse_args(argv)
    if step == "stand-in":
        name, path = args.args
        (write_mindspore if name.startswith("mindone") else write_safetensors)(path, read_key_list(name))
        return 0
    if step == "torch-ckpt":
        torch_ckpt(*args.args)
        return 0
    if step == "sample":
        path, version = args.args
        return 0 if sample(path, version, args.extract_ema, args.work) else 1
    if step == "diffusers-make":
        diffusers_make(args.args[0], args.work)
        return 0
    return 0 if diffusers_check(args.args[0], args.work) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("stand-in", "torch-ckpt", "sample", "diffusers-make", "diffusers-check"):
        sys.exit(child_main(sys.argv[1], sys.argv[2:]))
    sys.exit(main())
