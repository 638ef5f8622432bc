"""Known-answer Textual Inversion on the trained toy-world model (models/tiny-sd).

`<my-shape>` is trained with the README's demo config on the 8 shipped purple-star images, starting
from the embedding of "shape", which names no colour. The pixel judge then reads samples of
"a photo of <my-shape>": the learned vectors must bring the concept's colour that the initializer's
embedding does not. (The interim toy model renders colours far more reliably than shapes; the full
table, shape included, is printed by tools/evaluate_ti.py.)
"""

import os

import mindspore as ms

import train_textual_inversion as T
from data.toy_world import PURPLE_STAR
from ldm.embeddings import load_embedding
from ldm.pipeline import StableDiffusion
from tools.evaluate_ti import evaluate, share

TINY_YAML = "configs/train/train_config_textual_inversion_tiny.yaml"


def test_textual_inversion_learns_the_concept_colour(tmp_path):
    assert T.main(["--train_config", TINY_YAML, "--output_path", str(tmp_path),
                   "--validation_prompt", "none"]) == 0
    emb = load_embedding(os.path.join(tmp_path, "weights", "SDvtiny_textual_inversion_100_ti.ckpt"))
    assert emb.token == "<my-shape>" and emb.vectors.shape == (1, 64)

    ms.set_context(mode=ms.GRAPH_MODE)
    rows = evaluate(StableDiffusion.load("tiny"), emb.token, emb.vectors, "object", n=16, seed=1000)
    learned, initial, _edited = (share(verdicts, fg=PURPLE_STAR[1]) for verdicts in rows.values())
    assert learned >= 0.4, rows
    assert initial <= 0.2, rows
