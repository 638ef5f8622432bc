"""The images a training run writes for people: the loss plot, the scores plot and captioned validation grids.

Pillow only (no plotting dependency for two line charts) and its default font; written atomically.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from ldm.checkpoint_io import atomic_write

PLOT_SIZE = (720, 480)
EMA_DECAY = 0.9
# margins around the panels: tick labels on the left, step labels and the axis name below
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 28, 48
LR_PANEL, GAP = 80, 30
TEXT, GRID = (40, 40, 40), (228, 228, 228)
RAW, SMOOTH, LR = (185, 200, 235), (25, 70, 180), (205, 110, 20)
EDIT_FAINT, BEST = (240, 205, 170), (40, 150, 60)


def ema(values, decay=EMA_DECAY):
    """Exponential moving average started at the first value."""
    out = np.empty(len(values))
    avg = values[0]
    for i, value in enumerate(values):
        avg = decay * avg + (1.0 - decay) * value
        out[i] = avg
    return out


def nice_ticks(lo, hi, count=5, integer=False):
    """About `count`+1 round ticks (1, 2 or 5 x 10^k apart) from at most `lo` to at least `hi`."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    rough = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    if integer:
        step = max(step, 1)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [i * step for i in range(first, last + 1)]


def tick_labels(ticks):
    """Labels with the decimals the ticks' spacing needs (so 1.105 and 1.11 do not both read 1.11); tiny
    spacings (learning rates) in exponent form, where two digits tell the ticks apart."""
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
    return [f"{tick:.1e}" if decimals > 4 else f"{tick:.{decimals}f}" for tick in ticks]


def _pixels(values, ticks, start, end):
    """Data values -> pixel coordinates: the first tick at `start`, the last at `end`."""
    return start + (np.asarray(values, np.float64) - ticks[0]) / (ticks[-1] - ticks[0]) * (end - start)


def _text(draw, xy, text, anchor="lt", fill=TEXT):
    """Text placed by its box ("l"/"m"/"r", then "t"/"m"/"b"); anchors of our own work with bitmap fonts too."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    x = xy[0] - {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    y = xy[1] - {"t": top, "m": (top + bottom) / 2, "b": bottom}[anchor[1]]
    draw.text((x, y), text, fill=fill)


def _panel(draw, box, steps, x_ticks, y_ticks, series):
    """Grid, y tick labels, frame and the `(values, colour, width)` lines of one panel."""
    left, top, right, bottom = box
    for tick, label in zip(y_ticks, tick_labels(y_ticks)):
        y = _pixels(tick, y_ticks, bottom, top)
        draw.line([(left, y), (right, y)], fill=GRID)
        _text(draw, (left - 6, y), label, "rm")
    for tick in x_ticks:
        x = _pixels(tick, x_ticks, left, right)
        draw.line([(x, top), (x, bottom)], fill=GRID)
    draw.rectangle(box, outline=TEXT)
    xs = _pixels(steps, x_ticks, left, right)
    for values, colour, width in series:
        points = list(zip(xs, _pixels(values, y_ticks, bottom, top)))
        if len(points) > 1:
            draw.line(points, fill=colour, width=width, joint="curve")
        else:
            (x, y), r = points[0], width + 1
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def save_loss_curve(path, steps, losses, lrs):
    """The loss plot: the logged loss (faint), its EMA over it, and the learning rate in a panel below."""
    steps, losses, lrs = (np.asarray(a, np.float64) for a in (steps, losses, lrs))
    # an fp16 step skipped for overflow logs a non-finite loss: it has no place on the axis
    keep = np.isfinite(losses)
    steps, losses, lrs = steps[keep], losses[keep], lrs[keep]
    width, height = PLOT_SIZE
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    if len(steps):
        smooth = ema(losses)
        x_ticks = nice_ticks(0, steps.max(), 6, integer=True)
        loss_box = (LEFT, TOP, width - RIGHT, height - BOTTOM - LR_PANEL - GAP)
        lr_box = (LEFT, height - BOTTOM - LR_PANEL, width - RIGHT, height - BOTTOM)
        _panel(draw, loss_box, steps, x_ticks, nice_ticks(losses.min(), losses.max()),
               [(losses, RAW, 1), (smooth, SMOOTH, 2)])
        _panel(draw, lr_box, steps, x_ticks, nice_ticks(0.0, lrs.max(), 2), [(lrs, LR, 2)])
        for tick, label in zip(x_ticks, tick_labels(x_ticks)):
            _text(draw, (_pixels(tick, x_ticks, LEFT, width - RIGHT), lr_box[3] + 5), label, "mt")
        _text(draw, ((LEFT + width - RIGHT) / 2, height - 6), "step", "mb")
        _text(draw, (LEFT, TOP - 8), f"loss (faint) and its EMA {EMA_DECAY:g}", "lb", SMOOTH)
        _text(draw, (width - RIGHT, TOP - 8), f"step {steps[-1]:g}: EMA loss {smooth[-1]:.4g}", "rb")
        _text(draw, (LEFT, lr_box[1] - 6), "learning rate", "lb", LR)
        _text(draw, (width - RIGHT, lr_box[1] - 6), f"step {steps[-1]:g}: {lrs[-1]:.3g}", "rb", LR)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def save_score_plot(path, rows, best, metric):
    """Scores vs step: concept, the mean edit score and each edited prompt's (faint), the best step marked."""
    rows = sorted(rows, key=lambda row: row["step"])
    steps = [row["step"] for row in rows]
    concept, edit = [row["concept"] for row in rows], [row["edit"] for row in rows]
    prompts = [[row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)
               if key.startswith("edit: ")]
    # one prompt's line is the mean's; a prompt some rows lack (changed on resume) is not drawn, the mean is
    prompts = [values for values in prompts if None not in values] if len(prompts) > 1 else []
    width, height = PLOT_SIZE
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    box = (LEFT, TOP, width - RIGHT, height - BOTTOM)
    x_ticks = nice_ticks(0, max(steps), 6, integer=True)
    values = concept + edit + [v for values in prompts for v in values]
    _panel(draw, box, steps, x_ticks, nice_ticks(min(values), max(values)),
           [(values, EDIT_FAINT, 1) for values in prompts] + [(edit, LR, 2), (concept, SMOOTH, 2)])
    x = _pixels(best["step"], x_ticks, box[0], box[2])
    draw.line([(x, box[1]), (x, box[3])], fill=BEST, width=2)
    for tick, label in zip(x_ticks, tick_labels(x_ticks)):
        _text(draw, (_pixels(tick, x_ticks, box[0], box[2]), box[3] + 5), label, "mt")
    _text(draw, ((box[0] + box[2]) / 2, height - 6), "step", "mb")
    _text(draw, (LEFT, TOP - 8), f"{metric}: concept", "lb", SMOOTH)
    _text(draw, (LEFT + draw.textlength(f"{metric}: concept") + 16, TOP - 8),
          f"edit (the mean of {len(prompts)} prompts, each faint)" if prompts else "edit", "lb", LR)
    _text(draw, (width - RIGHT, TOP - 8), f"best: step {best['step']}", "rb", BEST)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def _wrap(draw, text, width):
    """`text` split at spaces into lines no wider than `width` pixels (a longer single word stays whole)."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def save_captioned_grid(path, grid, captions):
    """`grid` (uint8 `[H, W, 3]`) below a white strip with the `captions` lines, wrapped to the grid's width."""
    h, w = grid.shape[:2]
    pad = 4
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [line for caption in captions for line in _wrap(draw, caption, w - 2 * pad)]
    line_height = draw.textbbox((0, 0), "Ay|")[3] + 3
    strip = len(lines) * line_height + 2 * pad
    img = Image.new("RGB", (w, strip + h), "white")
    img.paste(Image.fromarray(grid), (0, strip))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        _text(draw, (pad, pad + i * line_height), line)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
