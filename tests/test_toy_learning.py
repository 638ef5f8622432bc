"""Known-answer Textual Inversion on the trained toy-world model (models/tiny-sd).

Both concepts are trained with their shipped tiny configs and judged as tools/evaluate_ti.py judges a run (its
model, seeds and sampler, the pixel judge) on 16 samples of each prompt the test asserts on: the style's 100 steps,
and the object's first 150 of 300, the step its scored validations keep (the learning rate is constant, so these
are the 300-step run's first 150 steps). Prompts no assertion reads are not sampled: the initializer's edited
prompt, and the style's edited prompt, which neither embedding renders in the style (evaluate_ti measured 0-6%).
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
from ldm.training.config import load_yaml
from tools.evaluate_ti import (build_parser, concept_prompt, embedding_vectors, run_config, run_scorer,
                               sample_prompts)


def _train_and_judge(yaml, out, concept, steps, sampling_steps, edit=False):
    """Train a shipped tiny config for `steps`, then the judge's shares on 16 samples (of `sampling_steps`) of the
    concept prompt from the initializer's and the learned vectors, and of the config's edited prompt from the
    learned ones if `edit`."""
    ms.set_context(mode=ms.GRAPH_MODE)
    assert steps <= load_yaml(yaml)["max_steps"]
    assert T.main(["--train_config", yaml, "--output_path", str(out), "--validation_prompt", "none",
                   "--max_steps", str(steps)]) == 0
    args = build_parser().parse_args([str(out), "--concept", concept, "--n", "16", "--steps", str(sampling_steps)])
    cfg = run_config(str(out))
    prompt = concept_prompt(cfg, args)
    scorer = run_scorer(cfg, args)
    sd, ids, initial = T.load_models(cfg)
    learned = embedding_vectors(sd, os.path.join(out, "weights", f"SDvtiny_textual_inversion_{steps}_ti.ckpt"))
    assert learned.shape == (1, 64)
    shares = {"initial": scorer.concept(sample_prompts(sd, ids, initial, [prompt], cfg.image_size, args)[prompt])}
    edit_prompts = cfg.edit_prompts() if edit else []
    samples = sample_prompts(sd, ids, learned, [prompt] + edit_prompts, cfg.image_size, args)
    shares["concept"] = scorer.concept(samples[prompt])
    if edit:
        (edit_prompt,) = edit_prompts
        shares["edit"] = scorer.edit(samples[edit_prompt], edit_prompt)
    return shares


def test_textual_inversion_learns_the_object(tmp_path, shared_graphs):
    shares = _train_and_judge("configs/train/train_config_textual_inversion_tiny.yaml", tmp_path, "object", 150,
                              sampling_steps=10, edit=True)
    # purple stars from "a photo of <my-shape>": measured 16/16, from the initializer's vectors 0/16
    assert shares["concept"] >= 0.8 and shares["initial"] <= 0.2, shares
    # editability: purple stars on the background the edited prompt names, measured 15/16
    assert shares["edit"] >= 0.7, shares


def test_textual_inversion_learns_the_style(tmp_path, shared_graphs):
    shares = _train_and_judge("configs/train/train_config_textual_inversion_tiny_style.yaml", tmp_path, "style", 100,
                              sampling_steps=20)
    # outlined shapes from "a painting in the style of <my-style>": measured 9/16, from the initializer's 0/16
    assert shares["concept"] >= 0.4 and shares["initial"] <= 0.2, shares
