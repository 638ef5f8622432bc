"""Dev tool: where a graph-mode compile of an SD 1.x/2.x UNet forward spends its time (MindSpore's pass profile).

    python -m tools.dev.profile_compile [--ckpt_path tests/fixtures/tiny-sd1] [--version 1.5] [--size 8] [--batch 1]

Compiles the UNet once on zero inputs of the given latent size with MindSpore's COMPILE_PROFILE on, which prints
every compile pass's time, then prints the wall time of that first call and of a second (compiled) call. Most of
the test suite's time is such compiles (docs/development.md).
"""
import argparse
import time

import mindspore as ms
import numpy as np
from mindspore.graph._parse import compile_config

# read once, when MindSpore's graph executor starts: before ldm's modules build their ops
compile_config.COMPILE_PROFILE = "1"

from ldm.errors import USER_ERRORS  # noqa: E402
from ldm.pipeline import StableDiffusion  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.dev.profile_compile", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", default="tests/fixtures/tiny-sd1", help="an SD 1.x/2.x model folder or file (as "
                   "text_to_image.py's --ckpt_path)")
    p.add_argument("--version", default="1.5", help="its version (as text_to_image.py's --version)")
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--batch", type=int, default=1, help="latent batch")
    args = p.parse_args(argv)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        sd = StableDiffusion.load(args.version, args.ckpt_path)
    except USER_ERRORS as err:
        p.exit(2, f"error: {err}\n")
    if sd.is_xl:
        p.exit(2, "error: --version xl: this tool profiles SD 1.x/2.x UNets (SDXL's takes size ids too)\n")
    x = ms.Tensor(np.zeros((args.batch, 4, args.size, args.size), np.float32))
    t = ms.Tensor(np.full((args.batch,), 10, np.int32))
    context = ms.Tensor(np.zeros((args.batch, 77, sd.config.unet.context_dim), np.float32))
    for call in ("first call (compile and run)", "second call"):
        start = time.perf_counter()
        sd.unet(x, t, context).asnumpy()
        print(f"{call}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
