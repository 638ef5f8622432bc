"""Known-answer Textual Inversion on the trained toy-world model (models/tiny-sd).

Both concepts are trained with their shipped tiny configs and judged by tools/evaluate_ti.py's run evaluation
(the pixel judge) on 16 samples per prompt: the style's 100 steps, and the object's first 150 of 300, the step
its scored validations keep (the learning rate is constant, so these are the 300-step run's first 150 steps).
The object's samples take 10 sampler steps, not evaluate_ti's 20: the judge measured the same shares with
both (16/16, 0/16, 15/16), and the style's did not (9/16 with 20 steps, 8/16 with 10).
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


def _train_and_judge(yaml, out, concept, steps, sampling_steps):
    """Train a shipped tiny config for `steps`, then judge that embedding and the initializer's on 16 samples per
    prompt, each of `sampling_steps`."""
    ms.set_context(mode=ms.GRAPH_MODE)
    assert steps <= load_yaml(yaml)["max_steps"]
    assert T.main(["--train_config", yaml, "--output_path", str(out), "--validation_prompt", "none",
                   "--max_steps", str(steps)]) == 0
    path = os.path.join(out, "weights", f"SDvtiny_textual_inversion_{steps}_ti.ckpt")
    assert load_embedding(path).vectors.shape == (1, 64)
    args = build_parser().parse_args([str(out), "--ti_ckpt_path", path, "--concept", concept, "--n", "16",
                                      "--steps", str(sampling_steps)])
    (initial, learned), _ = evaluate_run(str(out), args)
    return initial, learned


def test_textual_inversion_learns_the_object(tmp_path, shared_graphs):
    initial, learned = _train_and_judge("configs/train/train_config_textual_inversion_tiny.yaml", tmp_path, "object",
                                        150, sampling_steps=10)
    # purple stars from "a photo of <my-shape>": measured 16/16, from the initializer's vectors 0/16
    assert learned["concept"] >= 0.8 and initial["concept"] <= 0.2, (initial, learned)
    # editability: purple stars on the background the edited prompt names, measured 15/16
    assert learned["edit"] >= 0.7, learned


def test_textual_inversion_learns_the_style(tmp_path, shared_graphs):
    initial, learned = _train_and_judge("configs/train/train_config_textual_inversion_tiny_style.yaml", tmp_path,
                                        "style", 100, sampling_steps=20)
    # outlined shapes from "a painting in the style of <my-style>": measured 9/16, from the initializer's 0/16
    assert learned["concept"] >= 0.4 and initial["concept"] <= 0.2, (initial, learned)
