"""Textual Inversion training data: an image folder -> augmented [-1, 1] CHW images + template captions.

numpy + Pillow only. Randomness comes from the numpy Generator the caller passes in; `BatchIterator` derives
one Generator per example from (seed, position in the example stream), so its whole state is one integer and
a resumed run replays exactly, independent of how the stream is sharded over ranks.

Augmentation: resize the short side to image_size (bicubic), crop image_size x image_size (random or
center), flip horizontally with probability flip_p. With a center crop the set of possible outputs is finite
(image x flip); `variants()` lists it so the trainer can VAE-encode each once (latent cache).
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from ldm.errors import UserInputError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")

# The Textual Inversion paper's caption templates, as diffusers and mindone ship them.
imagenet_templates_small = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

imagenet_style_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


class DatasetError(UserInputError):
    """A data problem; the one-line message names the input and the fix."""


def list_images(folder: str) -> List[str]:
    """Image files directly in `folder` (not recursive), sorted by name; DatasetError if there are none."""
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not os.path.exists(folder):
        raise DatasetError(f"train_data_dir '{folder}' does not exist; point --train_data_dir at a folder of images")
    if not os.path.isdir(folder):
        raise DatasetError(f"train_data_dir '{folder}' is a file, not a folder; pass the folder holding the images")
    # dot files include macOS '._x.jpg' resource forks, which carry an image extension but no image
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    if not names:
        raise DatasetError(f"train_data_dir '{folder}' is empty; put 3-5 images of the concept in it ({accepted})")
    images = [os.path.join(folder, n) for n in names
              if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    if not images:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DatasetError(f"train_data_dir '{folder}' has no image files (accepted: {accepted}; found {shown})")
    return images


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: Pillow's own conversion to L clips at 255 instead of scaling.
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # A transparent background would otherwise turn black, and black backgrounds leak into the concept.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode fully (so truncated files fail here), apply EXIF orientation, return RGB.

    Raises OSError/ValueError/SyntaxError from Pillow for unreadable files; callers decide to skip.
    """
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright)


def read_template_file(path: str) -> List[str]:
    """Non-empty stripped lines; each must hold exactly the `{}` slot for the placeholder."""
    if not os.path.isfile(path):
        raise DatasetError(f"template_file '{path}' does not exist")
    templates = []
    with open(path, "r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                text.format("x")
                ok = "{}" in text
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                raise DatasetError(f"template_file '{path}' line {number}: {text!r} needs one '{{}}' where the "
                                   "placeholder goes (and no other braces)")
            templates.append(text)
    if not templates:
        raise DatasetError(f"template_file '{path}' has no templates; write one per line, e.g. 'a photo of {{}}'")
    return templates


def get_templates(learnable_property: str = "object", template_file: Optional[str] = None) -> List[str]:
    if template_file:
        return read_template_file(template_file)
    if learnable_property == "style":
        return list(imagenet_style_templates_small)
    if learnable_property == "object":
        return list(imagenet_templates_small)
    raise DatasetError(f"learnable_property must be object or style, got {learnable_property!r}")


def _resize_short_side(image: Image.Image, size: int) -> np.ndarray:
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    return np.asarray(image.resize((new_w, new_h), resample=Image.BICUBIC), dtype=np.uint8)


@dataclass(frozen=True)
class Example:
    """One drawn augmentation, before any pixels are touched (the latent-cache path never renders it)."""

    image_index: int  # index into dataset.image_paths
    flip: bool
    crop: Optional[Tuple[float, float]]  # (y, x) fractions of the free range for a random crop; None = center
    caption: str


class TextualInversionDataset:
    """The training images of one concept with their augmentations and captions.

    `placeholder_string` is what replaces `{}` in the templates: the placeholder token followed by its extra
    vector tokens (`<t> <t>_1 <t>_2` for num_vectors 3). All images are decoded once here and kept resized.
    """

    def __init__(
        self,
        data_dir: str,
        placeholder_string: str,
        learnable_property: str = "object",
        templates: Optional[Sequence[str]] = None,
        template_file: Optional[str] = None,
        image_size: int = 512,
        random_crop: bool = True,
        flip_p: float = 0.5,
        repeats: int = 1,
        filter_small_size: bool = True,
        image_filter_size: int = 256,
        replace_small_images: bool = True,
    ):
        if repeats < 1:
            raise DatasetError(f"train_data_repeats has to be >= 1, got {repeats}")
        self.data_dir = data_dir
        self.placeholder_string = placeholder_string
        self.templates = list(templates) if templates is not None else get_templates(learnable_property,
                                                                                   template_file)
        self.image_size = image_size
        self.random_crop = random_crop
        self.flip_p = flip_p
        self.repeats = repeats

        paths = list_images(data_dir)
        self.image_paths: List[str] = []
        self._resized: List[np.ndarray] = []
        self._original_sizes: List[Tuple[int, int]] = []  # (height, width) of each file, for SDXL's size ids
        small = []
        for path in paths:
            try:
                image = load_image(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                _logger.warning("skipping unreadable image '%s' (%s)", path, reason)
                continue
            if filter_small_size and min(image.size) < image_filter_size:
                small.append(path)
                _logger.info("image '%s' (%dx%d) is below image_filter_size=%d and is left out",
                             path, image.size[0], image.size[1], image_filter_size)
                continue
            self.image_paths.append(path)
            self._resized.append(_resize_short_side(image, image_size))
            self._original_sizes.append((image.size[1], image.size[0]))
        if not self.image_paths:
            if small:
                raise DatasetError(
                    f"all {len(small)} images in '{data_dir}' have a short side below image_filter_size="
                    f"{image_filter_size}; lower --image_filter_size or pass --filter_small_size false")
            raise DatasetError(f"none of the {len(paths)} image files in '{data_dir}' could be read "
                               "(see the warnings above); add readable images")
        # `slots` is the epoch's image list: mindone keeps the dataset length when replacing small images,
        # filling each dropped place with another (kept) image.
        self.slots: List[int] = list(range(len(self.image_paths)))
        if replace_small_images:
            self.slots += [j % len(self.image_paths) for j in range(len(small))]

    @classmethod
    def from_config(cls, cfg, placeholder_string: str) -> "TextualInversionDataset":
        """Built from a TrainConfig (or anything with the same attribute names)."""
        return cls(
            cfg.train_data_dir,
            placeholder_string,
            learnable_property=cfg.learnable_property,
            template_file=cfg.template_file,
            image_size=cfg.image_size,
            random_crop=cfg.random_crop,
            flip_p=cfg.flip_p,
            repeats=cfg.train_data_repeats,
            filter_small_size=cfg.filter_small_size,
            image_filter_size=cfg.image_filter_size,
            replace_small_images=cfg.replace_small_images,
        )

    def __len__(self) -> int:
        return len(self.slots) * self.repeats

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def is_augmentation_finite(self) -> bool:
        return not self.random_crop

    def variants(self) -> List[Tuple[int, bool]]:
        """Every distinct (image_index, flip) output of a center-crop dataset, in a fixed order."""
        if not self.is_augmentation_finite:
            raise DatasetError("random_crop is true, so the augmented images are not a finite set; "
                               "set random_crop false to cache latents")
        flips = [f for f, possible in ((False, self.flip_p < 1.0), (True, self.flip_p > 0.0)) if possible]
        return [(i, f) for i in range(self.num_images) for f in flips]

    def variant_index(self, example: Example) -> int:
        """Position of a drawn example in `variants()` (the row of the latent cache)."""
        if example.crop is not None:
            raise ValueError("a randomly cropped example has no cached variant")
        both = 0.0 < self.flip_p < 1.0
        return example.image_index * (2 if both else 1) + (int(example.flip) if both else 0)

    def draw(self, idx: int, rng: np.random.Generator) -> Example:
        """Choose the augmentation and caption of example `idx`; the draws' order is fixed so that cached
        and rendered training see the same sequence."""
        if not 0 <= idx < len(self):
            raise IndexError(f"example {idx} out of range for a dataset of {len(self)}")
        image_index = self.slots[idx % len(self.slots)]
        caption = self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_string)
        flip = bool(rng.random() < self.flip_p)
        crop = (float(rng.random()), float(rng.random())) if self.random_crop else None
        return Example(image_index, flip, crop, caption)

    def render(self, example: Example) -> np.ndarray:
        """The example's image: float32 [3, S, S] in [-1, 1]."""
        return self.render_variant(example.image_index, example.flip, example.crop)

    def _crop_top_left(self, image_index: int, crop: Optional[Tuple[float, float]]) -> Tuple[int, int]:
        """(top, left) of the crop in the resized image: centred, or at fractions `crop` of the free range."""
        full = self._resized[image_index]
        free_y, free_x = full.shape[0] - self.image_size, full.shape[1] - self.image_size
        if crop is None:
            return free_y // 2, free_x // 2
        return min(int(crop[0] * (free_y + 1)), free_y), min(int(crop[1] * (free_x + 1)), free_x)

    def size_ids(self, example: Example) -> np.ndarray:
        """SDXL's six size conditioning values, float32: the file's (height, width), the crop's (top, left) in
        the resized image and the (height, width) trained on, as diffusers' train_text_to_image_sdxl.py and
        kohya's SDXL trainers compute them (resize, then crop)."""
        top, left = self._crop_top_left(example.image_index, example.crop)
        return np.array(self._original_sizes[example.image_index] + (top, left, self.image_size, self.image_size),
                        np.float32)

    def render_variant(self, image_index: int, flip: bool,
                       crop: Optional[Tuple[float, float]] = None) -> np.ndarray:
        size = self.image_size
        top, left = self._crop_top_left(image_index, crop)
        pixels = self._resized[image_index][top:top + size, left:left + size]
        if flip:
            pixels = pixels[:, ::-1]
        return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()

    def get_example(self, idx: int, rng: np.random.Generator) -> Tuple[np.ndarray, str]:
        example = self.draw(idx, rng)
        return self.render(example), example.caption


class BatchIterator:
    """Endless stream of per-rank batches: the examples of consecutive shuffled epochs, cut into global
    batches of batch_size x device_num; rank r takes the r-th slice of each, so ranks never overlap.

    A batch may straddle two epochs (nothing is dropped). `steps_per_epoch` is the count the trainer can use
    for epoch bookkeeping.
    """

    def __init__(self, dataset: TextualInversionDataset, batch_size: int, seed: int,
                 rank_id: int = 0, device_num: int = 1):
        if batch_size < 1 or device_num < 1 or not 0 <= rank_id < device_num:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank_id={rank_id}, device_num={device_num}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank_id = rank_id
        self.device_num = device_num
        self.position = 0  # examples of the global stream consumed (all ranks together)
        self._perm_epoch = -1
        self._perm = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.device_num

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.dataset) // self.global_batch_size)

    @property
    def step(self) -> int:
        return self.position // self.global_batch_size

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def next_examples(self) -> List[Example]:
        """This rank's next batch as drawn examples, without pixels (for the latent-cache path)."""
        start = self.position + self.rank_id * self.batch_size
        examples = []
        for p in range(start, start + self.batch_size):
            rng = np.random.default_rng([self.seed, 1, p])
            examples.append(self.dataset.draw(self._index_at(p), rng))
        self.position += self.global_batch_size
        return examples

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[np.ndarray, List[str]]:
        """Images float32 [B, 3, S, S] in [-1, 1] and their captions."""
        examples = self.next_examples()
        images = np.stack([self.dataset.render(e) for e in examples])
        return images, [e.caption for e in examples]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream; position counts global examples, so batch size or device count may change."""
        if int(state["num_examples"]) != len(self.dataset):
            raise DatasetError(f"cannot resume the data order: the saved run had {state['num_examples']} "
                               f"examples per epoch, this dataset has {len(self.dataset)}; keep the same images, "
                               "train_data_repeats and filter settings")
        self.seed = int(state["seed"])
        self.position = int(state["position"])
        self._perm_epoch = -1
