"""The synthetic shapes world: a seeded image generator with captions, and a pixel judge.

A tiny text-to-image model trained on this world really knows it, so Textual Inversion can be
shown to learn something (a held-out colour/shape combination, an unseen rendering style), and
the judge turns sampled images into numbers without any learned classifier.

numpy + Pillow + scipy only (no torch, no MindSpore).
"""
from dataclasses import dataclass
import random
import re

import numpy as np
from PIL import Image
from scipy import ndimage

SIZE = 128
# Shapes are drawn at SUPERSAMPLE x resolution and box-filtered down, so edges are anti-aliased
# like the smooth images the autoencoder will see from the sampler.
SUPERSAMPLE = 4

# Well separated in RGB (closest pair red/orange is ~114 apart) so nearest-colour naming
# survives the blur and colour drift of decoded samples.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Rotational symmetry period in degrees; the judge only searches one period.
_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}
STAR_INNER = 0.45
CROSS_HALF_WIDTH = 0.32
# Shapes stand upright up to a small tilt (degrees). Under free rotation, "a star" at a given place
# and size is a ring of equally likely outlines; a small denoiser's estimate is their average, a
# round blob, and the tiny model's samples stayed blobs (judge: 24-35% of shapes right).
TILT = 10.0

# The TI style concept: the shape is drawn hollow, as a thick outline. The base model learns it from
# captions that name it with these phrases, none of which contains "style", "painting" or "in", so the
# words of TI's style templates ("a painting in the style of {}") and its initializer carry no outline:
# TI has to find the style in embedding space from images alone. (A recipe model trained on " in
# outline" read any "in" after a scene as outlined.)
STYLE = "outlined"
STYLE_PHRASES = (", outlined", ", as an outline", ", drawn as an outline")
# Some filled scenes' captions end in one of these, so that the style is told by its words, not by
# the caption going on after the scene (the model learned that shortcut when only outlined captions
# had a tail).
FILL_PHRASES = (", filled", ", solid", ", solid colour")

# TI's known-answer object. tools/dev/train_toy_model.py trains the base model on purple stars under their
# own words, as SD has seen cat toys;
# TI's prompt ("a photo of <my-shape>") and initializer ("shape") carry neither word, so TI has to
# find the concept in embedding space from its images alone.
PURPLE_STAR = ("star", "purple")
# Held-out (shape, fg, bg) triples for the base model's quality check: each (shape, fg) pair is still
# seen on other backgrounds, so these test composition, not memory.
_HELDOUT_SEED = 1234


def all_combos():
    return [(s, f, b) for s in SHAPES for f in COLORS for b in COLORS if f != b]


def heldout_combos(n=24):
    """Triples kept out of the base model's training set for the quality check. Purple stars stay out of
    the draw, which keeps the same 24 triples as when the base model never saw purple stars."""
    pool = [c for c in all_combos() if (c[0], c[1]) != PURPLE_STAR]
    rng = random.Random(_HELDOUT_SEED)
    return sorted(rng.sample(pool, n))


def training_combos():
    held = set(heldout_combos())
    return [c for c in all_combos() if c not in held]


def shape_polygon(shape, cx, cy, r, angle_deg):
    """Vertices (x, y) of `shape` centred at (cx, cy) with circumradius r; None for the circle."""
    a0 = np.deg2rad(angle_deg) - np.pi / 2  # angle 0: upright (a vertex up, a square's sides level)
    if shape == "circle":
        return None
    if shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        t = a0 + 2 * np.pi * np.arange(n) / n + (np.pi / 4 if shape == "square" else 0.0)
        rad = np.full(n, r)
    elif shape == "star":
        t = a0 + np.pi * np.arange(10) / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER)
    elif shape == "cross":
        # Plus sign with arms reaching r from the centre; the 12 corners in the unrotated frame.
        w = CROSS_HALF_WIDTH * r
        pts = np.array([(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                        (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)])
        c, s = np.cos(a0 + np.pi / 2), np.sin(a0 + np.pi / 2)
        x = pts[:, 0] * c - pts[:, 1] * s
        y = pts[:, 0] * s + pts[:, 1] * c
        return [(cx + xi, cy + yi) for xi, yi in zip(x, y)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + ri * np.cos(ti), cy + ri * np.sin(ti)) for ri, ti in zip(rad, t)]


def shape_mask(shape, cx, cy, r, angle_deg, size=SIZE, scale=1):
    """Boolean [size*scale, size*scale] mask of the filled shape (coordinates in `size` pixels)."""
    from PIL import ImageDraw

    n = size * scale
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=255)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in shape_polygon(shape, cx, cy, r, angle_deg)], fill=255)
    return np.asarray(img) > 127


@dataclass(frozen=True)
class Scene:
    shape: str
    fg: str
    bg: str
    cx: float
    cy: float
    r: float
    angle: float
    style: str = ""  # "" (filled) or STYLE


def random_scene(rng, combos=None, style=""):
    """A scene drawn from `rng` (random.Random); combos restricts (shape, fg, bg)."""
    if combos is None:
        combos = all_combos()
    shape, fg, bg = combos[rng.randrange(len(combos))]
    r = rng.uniform(24.0, 44.0)
    margin = r + 4.0
    return Scene(shape, fg, bg, rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin),
                 r, rng.uniform(-TILT, TILT), style)


def render(scene):
    """uint8 [128, 128, 3] image of a scene."""
    s = SUPERSAMPLE
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.r, scene.angle, scale=s)
    if scene.style == STYLE:
        # Uniform stroke width whatever the shape; thin enough that a small star (inscribed radius
        # 0.45 r) keeps a hole, thick enough to survive the autoencoder's 8x downsampling.
        stroke = (2.0 + 0.12 * scene.r) * s
        mask = mask & ~(ndimage.distance_transform_edt(mask) > stroke)
    elif scene.style:
        raise ValueError(f"unknown style {scene.style!r}")
    cover = mask.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))[..., None]
    fg = np.array(COLORS[scene.fg], np.float64)
    bg = np.array(COLORS[scene.bg], np.float64)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


# Caption templates: the Textual Inversion object templates (so "a photo of <my-shape>" is in
# distribution) around several phrasings of the object, plus "shape" as a generic shape word.
PREFIX_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of my {}", "a close-up photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a rendition of the {}", "a rendition of a {}",
    "a photo of a nice {}", "a photo of the small {}", "a photo of the large {}", "a {}", "{}",
)


def caption(scene, rng):
    """A random caption for a scene; some omit the background or colour, some say "shape"; an
    outlined scene's caption always names the style, some filled ones say they are filled."""
    shape = "shape" if rng.random() < 0.1 else scene.shape
    kind = rng.random()
    if kind < 0.5:
        obj = f"{scene.fg} {shape} on a {scene.bg} background"
    elif kind < 0.65:
        obj = f"{scene.fg} {shape}"
    elif kind < 0.75:
        obj = shape
    elif kind < 0.85:
        obj = f"{shape} on a {scene.bg} background"
    else:
        obj = None
    text = f"a {scene.fg} {shape} on {scene.bg}" if obj is None else rng.choice(PREFIX_TEMPLATES).format(obj)
    if scene.style == STYLE:
        text += rng.choice(STYLE_PHRASES)
    elif rng.random() < 0.3:
        text += rng.choice(FILL_PHRASES)
    return text


def caption_fields(scene, text):
    """What a caption of `scene` says: 1-based (shape, fg, bg, style) class indices into SHAPES, COLORS,
    COLORS and (outlined, filled), 0 for a field it does not state ("shape" states no shape)."""
    shape = re.search(rf"\b{scene.shape}\b", text)
    fg = f"{scene.fg} {scene.shape}" in text or f"{scene.fg} shape" in text
    bg = re.search(rf"\bon (a )?{scene.bg}\b", text)
    style = 1 if text.endswith(STYLE_PHRASES) else 2 if text.endswith(FILL_PHRASES) else 0
    return (1 + SHAPES.index(scene.shape) if shape else 0, 1 + _NAMES.index(scene.fg) if fg else 0,
            1 + _NAMES.index(scene.bg) if bg else 0, style)


def full_caption(shape, fg, bg=None):
    return f"a photo of a {fg} {shape}" + (f" on a {bg} background" if bg else "")


def object_scenes(shape, fg, n, seed):
    """n scenes of one (shape, foreground colour) for Textual Inversion: every other colour as the background once
    (then random repeats), so that the concept is the shape and its colour, not a background."""
    rng = random.Random(seed)
    bgs = [b for b in COLORS if b != fg]
    bgs += [rng.choice(bgs) for _ in range(max(0, n - len(bgs)))]
    return [random_scene(rng, [(shape, fg, bg)]) for bg in bgs[:n]]


def generate(n, seed, combos=None, style=""):
    """n (image, scene, caption) triples, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sc = random_scene(rng, combos, style)
        out.append((render(sc), sc, caption(sc, rng)))
    return out


# ---------------------------------------------------------------- judge

@dataclass(frozen=True)
class Verdict:
    shape: str
    fg: str
    bg: str
    style: str  # "" or STYLE
    iou: float  # how well the best shape template fits; low means the judge is guessing


_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[k] for k in _NAMES], np.float64)


def nearest_color(rgb):
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float64)) ** 2).sum(-1)))]


def _best_template(solid):
    """(shape, iou) of the generator shape whose best-placed template overlaps `solid` most."""
    area = solid.sum()
    ys, xs = np.nonzero(solid)
    cy, cx = ys.mean(), xs.mean()
    # Unit-circumradius areas, measured once on the same rasteriser as the templates.
    best = ("circle", -1.0)
    for shape in SHAPES:
        r = np.sqrt(area / _UNIT_AREA[shape])
        period = _PERIOD[shape]
        angles = [0.0] if shape == "circle" else np.arange(0.0, period, 4.0)
        for a in angles:
            t = shape_mask(shape, cx, cy, r, a, size=solid.shape[0])
            iou = (t & solid).sum() / max((t | solid).sum(), 1)
            if iou > best[1]:
                best = (shape, float(iou))
    return best


def _unit_areas():
    n, r = 512, 200.0
    return {s: shape_mask(s, n / 2, n / 2, r, 0.0, size=n).sum() / r ** 2 for s in SHAPES}


_UNIT_AREA = _unit_areas()


def judge(image):
    """Name shape, foreground colour, background colour and style of an image (uint8 HxWx3)."""
    img = np.asarray(image)[..., :3]
    if img.shape[:2] != (SIZE, SIZE):
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))
    px = img.astype(np.float64)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_color(bg_rgb)
    # Far from the background colour = foreground; the threshold is under half the closest palette gap.
    far = np.sqrt(((px - bg_rgb) ** 2).sum(-1)) > 50.0
    labels, n = ndimage.label(far)
    if n == 0:
        return Verdict("none", "none", bg, "", 0.0)
    sizes = ndimage.sum(far, labels, index=np.arange(1, n + 1))
    fg_mask = labels == (1 + int(np.argmax(sizes)))
    # Edge pixels are blends of fg and bg (thin outlines are mostly edge); the pixels farthest
    # from the background carry the true colour.
    dist = np.sqrt(((px[fg_mask] - bg_rgb) ** 2).sum(-1))
    fg_rgb = np.median(px[fg_mask][dist >= np.percentile(dist, 70)], axis=0)
    fg = nearest_color(fg_rgb)
    solid = ndimage.binary_fill_holes(fg_mask)
    # Filled shapes have no holes; specks of sampler noise make only tiny ones.
    style = STYLE if fg_mask.sum() < 0.9 * solid.sum() else ""
    shape, iou = _best_template(solid)
    return Verdict(shape, fg, bg, style, iou)
