"""The toy shapes world: deterministic generator, judge accuracy, shipped TI example sets."""
import os

import numpy as np
from PIL import Image
from scipy import ndimage

from data import toy_world as tw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "data", "examples")


def _key(v):
    return (v.shape, v.fg, v.bg, v.style)


def test_generator_is_deterministic_for_a_seed():
    a, b, c = tw.generate(5, 3), tw.generate(5, 3), tw.generate(5, 4)
    for (ia, sa, ca), (ib, sb, cb) in zip(a, b):
        assert np.array_equal(ia, ib) and sa == sb and ca == cb
    assert not np.array_equal(a[0][0], c[0][0])
    img, scene, cap = a[0]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    # Plain background in the named colour, foreground colour present.
    assert tuple(img[0, 0]) == tw.COLORS[scene.bg]
    assert (np.abs(img.astype(int) - tw.COLORS[scene.fg]).sum(-1) == 0).sum() > 500


def test_shapes_stand_upright():
    assert all(abs(scene.angle) <= tw.TILT for _, scene, _ in tw.generate(200, 16))
    # at angle 0 a square's sides are level: its bounding box is its side (r * sqrt 2), not its diagonal
    ys, xs = np.nonzero(tw.shape_mask("square", 64.0, 64.0, 40.0, 0.0))
    assert abs(ys.ptp() + 1 - 40 * np.sqrt(2)) <= 2 and abs(xs.ptp() + 1 - 40 * np.sqrt(2)) <= 2  # diamond: 80
    ys, _ = np.nonzero(tw.shape_mask("triangle", 64.0, 64.0, 40.0, 0.0))
    assert ys.min() == 24  # a vertex up, at the circumradius above the centre


def test_judge_is_right_on_generator_images():
    data = tw.generate(200, 11)
    ok = [_key(tw.judge(img)) == (sc.shape, sc.fg, sc.bg, "") for img, sc, _ in data]
    assert np.mean(ok) >= 0.98
    # Every shape and colour occurs, so the accuracy is not from a few easy classes.
    assert {sc.shape for _, sc, _ in data} == set(tw.SHAPES)
    assert {sc.fg for _, sc, _ in data} == set(tw.COLORS)


def test_judge_survives_blur_noise_and_resizing():
    rng = np.random.default_rng(0)
    data = tw.generate(60, 12)
    ok = []
    for img, sc, _ in data:
        x = ndimage.gaussian_filter(img.astype(float), (1.5, 1.5, 0)) + rng.normal(0, 8, img.shape)
        x = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).resize((96, 96)))
        ok.append(_key(tw.judge(x)) == (sc.shape, sc.fg, sc.bg, ""))
    assert np.mean(ok) >= 0.95


def test_judge_detects_the_outlined_style():
    data = tw.generate(60, 13, style=tw.STYLE)
    ok = [_key(tw.judge(img)) == (sc.shape, sc.fg, sc.bg, tw.STYLE) for img, sc, _ in data]
    assert np.mean(ok) >= 0.95


def test_captions_name_the_scene():
    data = tw.generate(50, 14)
    for _, sc, cap in data:
        assert sc.shape in cap or "shape" in cap
    assert any(f"{sc.fg} {sc.shape} on a {sc.bg} background" in cap for _, sc, cap in data)


def test_caption_fields_state_only_what_the_caption_names():
    sc = tw.Scene("star", "red", "blue", 64.0, 64.0, 30.0, 0.0, "")
    assert tw.caption_fields(sc, tw.full_caption("star", "red", "blue")) == (4, 1, 3, 0)
    assert tw.caption_fields(sc, tw.full_caption("star", "red")) == (4, 1, 0, 0)
    assert tw.caption_fields(sc, "a photo of a red shape, solid") == (0, 1, 0, 2)
    assert tw.caption_fields(sc, "a star on blue") == (4, 0, 3, 0)
    assert tw.caption_fields(sc, "") == (0, 0, 0, 0)
    outlined = tw.Scene("cross", "white", "black", 64.0, 64.0, 30.0, 0.0, tw.STYLE)
    assert tw.caption_fields(outlined, "a cross on a black background, as an outline") == (5, 0, 8, 1)
    assert tw.caption_fields(outlined, "") == (0, 0, 0, 0)  # the caption dropped for guidance
    for _, s, cap in tw.generate(200, 16) + tw.generate(50, 17, style=tw.STYLE):
        words = cap.replace(",", " ").split()
        shape, fg, bg, style = tw.caption_fields(s, cap)
        assert bool(shape) == (s.shape in words)
        assert bool(bg) == (f"on a {s.bg} background" in cap or f"on {s.bg}" in cap)
        # a colour named before "on" is the foreground's
        assert bool(fg) == (s.fg in (words[:words.index("on")] if "on" in words else words))
        assert style == (1 if s.style else 2 if cap.endswith(tw.FILL_PHRASES) else 0)


def test_outlined_captions_name_the_style_without_the_style_template_words():
    # The TI style test relies on this: "painting", "style", "in" and the initializer "drawing" must
    # mean nothing to the base model, only the style phrases may (a model trained on " in outline"
    # read the templates' "in the style of" as outlined).
    data = tw.generate(60, 15, style=tw.STYLE)
    assert all(cap.endswith(tw.STYLE_PHRASES) for _, _, cap in data)
    assert {p for p in tw.STYLE_PHRASES if any(c.endswith(p) for _, _, c in data)} == set(tw.STYLE_PHRASES)
    plain = tw.generate(60, 15)
    words = {w for _, _, c in data + plain for w in c.replace(",", " ").split()}
    assert not words & {"painting", "style", "in", "drawing"}
    assert not any(c.endswith(tw.STYLE_PHRASES) for _, _, c in plain)
    # filled scenes have tails too, so a tail alone does not mean "outlined"
    assert any(c.endswith(tw.FILL_PHRASES) for _, _, c in plain)


def test_base_model_training_set_excludes_the_held_out_triples_only():
    train = set(tw.training_combos())
    held = set(tw.heldout_combos())
    assert len(held) == 24 and not (held & train) and train | held == set(tw.all_combos())
    # TI's object is a trained pair (found from images, under no word of TI's prompt), never held out
    assert not any((s, f) == tw.PURPLE_STAR for s, f, _ in held)
    assert sum((s, f) == tw.PURPLE_STAR for s, f, _ in train) == len(tw.COLORS) - 1
    # Held-out triples test composition: their (shape, fg) pair is still trained on another background.
    pairs = {(s, f) for s, f, _ in train}
    assert all((s, f) in pairs for s, f, _ in held)


def _folder_verdicts(name):
    folder = os.path.join(EXAMPLES, name)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    return [tw.judge(np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))) for f in files]


def test_shipped_purple_star_examples_judge_as_purple_stars():
    v = _folder_verdicts("purple_star")
    assert 6 <= len(v) <= 8
    assert all((x.shape, x.fg, x.style) == ("star", "purple", "") for x in v)
    assert len({x.bg for x in v}) >= 6


def test_shipped_style_examples_judge_as_outlined():
    v = _folder_verdicts(tw.STYLE)
    assert 6 <= len(v) <= 8
    assert all(x.style == tw.STYLE for x in v)
    assert {x.shape for x in v} == set(tw.SHAPES)


def test_object_scenes_put_one_concept_on_every_background():
    scenes = tw.object_scenes("circle", "red", 8, seed=5)
    assert {(s.shape, s.fg) for s in scenes} == {("circle", "red")}
    # every other colour once, then a repeat
    assert {s.bg for s in scenes[:7]} == set(tw.COLORS) - {"red"} and scenes[7].bg != "red"
    assert tw.object_scenes("circle", "red", 8, seed=5) == scenes
    # the shipped purple stars are the generator's (tools/dev/make_toy_dataset.py, seed 100)
    shipped = sorted(os.listdir(os.path.join(EXAMPLES, "purple_star")))
    for name, scene in zip(shipped, tw.object_scenes(*tw.PURPLE_STAR, 8, seed=100)):
        image = np.asarray(Image.open(os.path.join(EXAMPLES, "purple_star", name)).convert("RGB"))
        assert name.endswith(f"_purple_star_on_{scene.bg}.png") and np.array_equal(image, tw.render(scene))
