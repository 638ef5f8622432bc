"""Known-answer Textual Inversion on the trained toy-world model (models/tiny-sd).

Both concepts are trained with their shipped tiny configs (object 300 steps, style 100) and judged by
tools/evaluate_ti.py's run evaluation (the pixel judge) on 16 samples per prompt.
The object meets the known-answer bar: purple stars from the learned word, not from its initializer,
and still purple stars on the background the edited prompt names.

- object: `<my-shape>` from the 8 purple-star images, starting from "shape", which names no colour or
  shape; the base model knows purple stars only under their own words.
- style: `<my-style>` from 8 images of assorted outlined shapes with style captions, starting from
  "drawing", which the base model never read; it knows the style only under other words.
"""

import os

import mindspore as ms

import train_textual_inversion as T
from ldm.embeddings import load_embedding
from ldm.training.config import load_yaml
from tools.evaluate_ti import build_parser, evaluate_run


def _train_and_judge(yaml, out, concept):
    """Train a shipped tiny config, then judge its last embedding and its initializer on 16 samples per prompt."""
    ms.set_context(mode=ms.GRAPH_MODE)
    assert T.main(["--train_config", yaml, "--output_path", str(out), "--validation_prompt", "none"]) == 0
    path = os.path.join(out, "weights", f"SDvtiny_textual_inversion_{load_yaml(yaml)['max_steps']}_ti.ckpt")
    assert load_embedding(path).vectors.shape == (1, 64)
    args = build_parser().parse_args([str(out), "--ti_ckpt_path", path, "--concept", concept, "--n", "16"])
    (initial, learned), _ = evaluate_run(str(out), args)
    return initial, learned


def test_textual_inversion_learns_the_object(tmp_path, shared_graphs):
    initial, learned = _train_and_judge("configs/train/train_config_textual_inversion_tiny.yaml", tmp_path, "object")
    # purple stars from "a photo of <my-shape>": measured 16/16, from the initializer's vectors 0/16
    assert learned["concept"] >= 0.8 and initial["concept"] <= 0.2, (initial, learned)
    # editability: purple stars on the background the edited prompt names, measured 16/16
    assert learned["edit"] >= 0.7, learned


def test_textual_inversion_learns_the_style(tmp_path, shared_graphs):
    initial, learned = _train_and_judge("configs/train/train_config_textual_inversion_tiny_style.yaml", tmp_path,
                                        "style")
    # outlined shapes from "a painting in the style of <my-style>": measured 9/16, from the initializer's 0/16
    assert learned["concept"] >= 0.4 and initial["concept"] <= 0.2, (initial, learned)
