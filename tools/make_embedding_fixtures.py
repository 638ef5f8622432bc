"""Write the torch-pickled embedding fixtures of tests/test_embeddings.py (run with a Python that has torch).

The tests never import torch: they read these files with our restricted unpickler and compare them with
the same numbers stored in expected.npz.

    /work/devvenv/bin/python tools/make_embedding_fixtures.py
"""

import argparse
import os

import numpy as np
import torch

DIM = 8
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "embeddings")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1234)
    a1111 = rng.standard_normal((2, DIM)).astype(np.float32)
    diffusers = rng.standard_normal((3, DIM)).astype(np.float32)
    diffusers_1d = rng.standard_normal(DIM).astype(np.float32)

    # A1111's layout as its embedding saver writes it; the vector is a leaf being trained, hence requires_grad
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.from_numpy(a1111).requires_grad_(True)},
            "name": "name-inside-the-file",
            "step": 42,
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        os.path.join(out, "fixture-a1111.pt"),
    )
    # diffusers' train_textual_inversion.py: {placeholder: [n, dim]}; releases before multi-vector support saved [dim]
    torch.save({"<fixture-bin>": torch.from_numpy(diffusers)}, os.path.join(out, "learned_embeds.bin"))
    torch.save({"<old-bin>": torch.from_numpy(diffusers_1d)}, os.path.join(out, "learned_embeds_1d.bin"))
    np.savez(os.path.join(out, "expected.npz"), a1111=a1111, diffusers=diffusers, diffusers_1d=diffusers_1d)
    print(f"wrote fixtures to {out}")


if __name__ == "__main__":
    main()
