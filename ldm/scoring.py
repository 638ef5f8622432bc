"""How far a Textual Inversion embedding has got, as two scores per checkpoint, and which checkpoint to keep.

The paper's two axes: *concept* (reconstruction: samples of the concept prompt show what the training images
show) and *edit* (editability: samples of a prompt that puts the concept somewhere new show what that prompt
asks). Too few steps and the concept is not there; too many and the embedding overpowers the rest of the prompt.
A `Scorer` turns samples (uint8 `[B, H, W, 3]`) into both; `best_row` picks a checkpoint by the rule:

    the best concept score among the checkpoints whose edit score is within the scorer's `margin` of the
    best edit score (inclusive); ties go to the earlier step.

Scorers (`make_scorer`):
- `judge`, the toy world's pixel judge (data/toy_world.py), offline: concept = share of samples showing the
  training images' (shape, colour) or their style, edit = share of samples showing what the edited prompt
  names (shape, colours, style) with the concept kept where the prompt does not name otherwise; both in
  [0, 1], margin 0.1 (ten percentage points).
- `clip`, the paper's CLIP-I / CLIP-T (ldm/clip_scorer.py).

A run's scores are rows of `metrics.csv` (`write_metrics`, `read_metrics`): step, checkpoint, concept, edit
(the mean over the edited prompts), then one `edit: PROMPT` column per edited prompt.
"""

import collections
import csv
import os

import numpy as np

from data.toy_world import STYLE, Scene, all_combos, caption_fields, judge
from ldm.checkpoint_io import atomic_write
from ldm.errors import UserInputError

SCORERS = ("judge", "clip")
# within floating-point noise of the margin counts as within it (0.9 - 0.1 < 0.8 in floats)
_EPS = 1e-9


class ScorerError(UserInputError):
    """A prompt or a training set a scorer cannot score; the message names it and the fix."""


class Scorer:
    """How much samples show the trained concept, and how much edited-prompt samples follow their prompt."""

    name = ""
    margin = 0.0  # the best-step rule's margin on the edit score, in the scorer's own scale

    def __init__(self, train_images, placeholder):
        self.placeholder = placeholder

    def concept(self, images):
        """How much `images` (samples of the concept prompt) show the training images' concept."""
        raise NotImplementedError

    def edit(self, images, prompt):
        """How much `images` (samples of the edited `prompt`, placeholder included) show what `prompt` asks."""
        raise NotImplementedError

    def check_prompt(self, prompt):
        """Raise ScorerError for an edited prompt this scorer cannot score, before any sampling is spent on it."""


class JudgeScorer(Scorer):
    """The toy world's pixel judge: shares of samples whose verdict shows the concept, or what a prompt names.

    The concept is the training images' most common (shape, foreground colour), or their style (outlined);
    unless `concept` ("object" or "style") says which, it is the pair when at least half the images share it,
    else the style when at least half are outlined.
    """

    name = "judge"
    margin = 0.1

    def __init__(self, train_images, placeholder, concept=None):
        super().__init__(train_images, placeholder)
        verdicts = [judge(image) for image in train_images]
        pair, count = collections.Counter((v.shape, v.fg) for v in verdicts).most_common(1)[0]
        if concept is None and 2 * count >= len(verdicts):
            concept = "object"
        elif concept is None and 2 * sum(v.style == STYLE for v in verdicts) >= len(verdicts):
            concept = "style"
        elif concept is None:
            raise ScorerError(f"the {len(verdicts)} training images share no shape and colour, nor the outline, that "
                              "the toy-world judge can name; the judge scores toy-world concepts: use the clip metric")
        self.kind = concept
        self.want = dict(shape=pair[0], fg=pair[1]) if concept == "object" else dict(style=STYLE)

    def concept(self, images):
        return share([judge(image) for image in images], **self.want)

    def edit(self, images, prompt):
        # an edit that loses the concept is no edit of it: "a <my-shape> on a yellow background" asks for a purple
        # star on yellow; what the prompt names wins (", filled" asks a style concept's scene to be filled)
        return share([judge(image) for image in images], **{**self.want, **self.prompt_fields(prompt)})

    def check_prompt(self, prompt):
        self.prompt_fields(prompt)

    def prompt_fields(self, prompt):
        """What `prompt` asks the judge to see, read from it with the placeholder taken out."""
        return prompt_fields(" ".join(prompt.replace(self.placeholder, " ").split()))


def prompt_fields(text):
    """`{field: value}` of the shape, foreground colour (`fg`), background colour (`bg`) and style that `text`
    names, read with the toy world's caption grammar (data/toy_world.caption_fields): "a yellow circle on a blue
    background" -> shape circle, fg yellow, bg blue; "..., outlined" -> style outlined, "..., filled" -> style ""."""
    named = collections.defaultdict(set)
    for shape, fg, bg in all_combos():
        said = caption_fields(Scene(shape, fg, bg, 0.0, 0.0, 0.0, 0.0), text)
        for field, value, index in zip(("shape", "fg", "bg"), (shape, fg, bg), said):
            if index:
                named[field].add(value)
        if said[3]:
            named["style"].add(STYLE if said[3] == 1 else "")
    several = {field: values for field, values in named.items() if len(values) > 1}
    if several:
        field, values = next(iter(several.items()))
        raise ScorerError(f"the edited prompt {text!r} names several {field} values ({', '.join(sorted(values))}); "
                          "name one scene for the toy-world judge")
    if not named:
        raise ScorerError(f"the edited prompt {text!r} names nothing the toy-world judge can check; name a shape, "
                          "a colour with its shape (\"a yellow circle\"), a background (\"on a blue background\") "
                          "or \", outlined\"")
    return {field: values.pop() for field, values in named.items()}


def share(verdicts, **want):
    """Fraction of judge verdicts whose fields equal `want` (e.g. shape="star", fg="purple")."""
    return float(np.mean([all(getattr(v, k) == x for k, x in want.items()) for v in verdicts]))


def make_scorer(name, train_images, placeholder, **kwargs):
    """The scorer `name` ("judge" or "clip"; the CLIP model is imported only when asked for)."""
    if name == "judge":
        return JudgeScorer(train_images, placeholder, **kwargs)
    if name == "clip":
        from ldm.clip_scorer import ClipScorer

        return ClipScorer(train_images, placeholder, **kwargs)
    raise ScorerError(f"unknown metric {name!r}; use one of {', '.join(SCORERS)}")


def training_images(dataset):
    """The training set as scorers take it: each image's centre crop at the training size, uint8 `[S, S, 3]`."""
    return [np.round((dataset.render_variant(i, False).transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
            for i in range(dataset.num_images)]


# ---------------------------------------------------------------------------------------------- rows

def score_row(scorer, step, checkpoint, concept_images, edit_images):
    """The metrics.csv row of one checkpoint: its concept score and the edit score of each edited prompt
    (`edit_images`: `{prompt: samples}`) and their mean."""
    edits = {f"edit: {prompt}": _round(scorer.edit(images, prompt)) for prompt, images in edit_images.items()}
    return {"step": step, "checkpoint": checkpoint, "concept": _round(scorer.concept(concept_images)),
            "edit": _round(np.mean(list(edits.values()))), **edits}


def _round(value):
    # the value read back from metrics.csv is the one written, so a resumed run picks as the first one did
    return round(float(value), 6)


def best_row(rows, margin):
    """The row of the best checkpoint: the best concept score among the rows whose edit score is within `margin`
    of the best edit score (inclusive); ties go to the earlier step."""
    rows = sorted(rows, key=lambda row: row["step"])
    top = max(row["edit"] for row in rows)
    # max() returns the first of equals: the earliest step
    return max((row for row in rows if row["edit"] >= top - margin - _EPS), key=lambda row: row["concept"])


def write_metrics(path, rows):
    """metrics.csv of `rows` by step (atomic): step, checkpoint, concept, edit, then the per-prompt edit columns."""
    rows = sorted(rows, key=lambda row: row["step"])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)


def read_metrics(path):
    """`{step: row}` of a metrics.csv written by `write_metrics`, scores as floats (None where a row has none)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {int(row["step"]): {key: int(value) if key == "step" else value if key == "checkpoint"
                               else float(value) if value else None for key, value in row.items()}
            for row in rows}
