"""Write the toy-world TI example image sets that ship in the repo (deterministic).

    python -m tools.dev.make_toy_dataset [--out data/examples]

- purple_star/: purple stars on every background, the known-answer object concept
  (placeholder <my-shape>, initializer "shape"); the tiny base model never saw a purple star.
- outlined/: assorted shapes and colours drawn hollow, the style concept (placeholder <my-style>,
  initializer "drawing"); the base model knows it only under the caption words of tw.STYLE_PHRASES.
"""
import argparse
import os
import random

from PIL import Image

from data import toy_world as tw
from tools import ROOT

N_IMAGES = 8


def purple_star_scenes(seed=100):
    return tw.object_scenes(*tw.PURPLE_STAR, N_IMAGES, seed)


def style_scenes(seed=200):
    rng = random.Random(seed)
    # Each shape at least once, never a purple star, so the style is not confused with that concept.
    combos = [c for c in tw.all_combos() if (c[0], c[1]) != tw.PURPLE_STAR]
    scenes = []
    for i in range(N_IMAGES):
        shape = tw.SHAPES[i % len(tw.SHAPES)]
        scenes.append(tw.random_scene(rng, [c for c in combos if c[0] == shape], tw.STYLE))
    return scenes


def write(folder, scenes):
    os.makedirs(folder, exist_ok=True)
    for i, sc in enumerate(scenes):
        Image.fromarray(tw.render(sc)).save(os.path.join(folder, f"{i:02d}_{sc.fg}_{sc.shape}_on_{sc.bg}.png"))
    print(f"{folder}: {len(scenes)} images")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "examples"))
    a = ap.parse_args()
    write(os.path.join(a.out, "purple_star"), purple_star_scenes())
    write(os.path.join(a.out, tw.STYLE), style_scenes())


if __name__ == "__main__":
    main()
