"""CLIP scores of Textual Inversion samples: the paper's CLIP-I (concept) and CLIP-T (edit).

The model is a transformers `CLIPModel` (`openai/clip-vit-large-patch14` by default, the one the TI paper and
SD 1.x use), read from a folder or the Hugging Face hub into MindSpore cells: the text tower of
`ldm.modules.clip_text` and the vision tower of `ldm.modules.clip_vision`. Images go through
CLIPImageProcessor's steps (shortest side resized bicubically, centre crop, /255, CLIP's mean and std), prompts
through the CLIP tokenizer shipped in ldm/ (or the folder's own).
"""
import os
import re

import numpy as np
import mindspore as ms

from ldm.checkpoint_io import CheckpointError, load_state_dict
from ldm.convert import load_into, read_json
from ldm.errors import ModelConfigError
from ldm.modules.clip_text import CLIPTextModel
from ldm.modules.clip_vision import CLIPVisionModelWithProjection
from ldm.pretrained import MODELS_DIR, WeightsNotFoundError, download_failure
from ldm.scoring import Scorer
from ldm.tokenizer import load_tokenizer, tokenize

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# in the files, not in the cells: buffers of older transformers, and the contrastive loss' temperature
UNUSED_KEYS = {"logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
# CLIPImageProcessor's defaults, which are openai's
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


def download(repo):
    """The hub cache's folder of `repo` holding config.json, the weights and (when the repo has it)
    preprocessor_config.json; the first weight file of `WEIGHT_FILES` the repo has is fetched, not both."""
    from huggingface_hub import hf_hub_download

    folder = os.path.dirname(hf_hub_download(repo_id=repo, filename="config.json"))
    errors = []
    for name in WEIGHT_FILES:
        try:
            hf_hub_download(repo_id=repo, filename=name)
            break
        except Exception as err:  # noqa: BLE001 - a repo without this file: try the next one
            errors.append(err)
    else:
        raise errors[0]
    try:
        hf_hub_download(repo_id=repo, filename="preprocessor_config.json")
    except Exception:  # noqa: BLE001 - optional: CLIPImageProcessor's defaults are openai's
        pass
    return folder


def resolve_clip(model=DEFAULT_MODEL, models_dir=MODELS_DIR):
    """The folder of a CLIP model: `model` itself when it is a folder, else (a hub id) `models_dir/<name>`,
    else the Hugging Face cache after a download."""
    if os.path.isdir(model):
        return model
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) is None:
        raise WeightsNotFoundError(f"CLIP model {model}: no such folder; pass a transformers CLIPModel folder "
                                   f"or a hub id such as {DEFAULT_MODEL}")
    local = os.path.join(models_dir, model.split("/")[-1])
    if os.path.isdir(local):
        return local
    try:
        return download(model)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes the same actionable one-line message
        raise WeightsNotFoundError(
            f"CLIP model {model} not found: put config.json, {WEIGHT_FILES[0]} and preprocessor_config.json from "
            f"huggingface.co/{model} in {local}/ (or pass that folder); the download failed: {download_failure(err)}"
        ) from err


def _tower(cfg, where, width, layers, heads):
    """The sizes both towers share, from a text_config / vision_config (transformers' defaults when absent)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ModelConfigError(f"{where}: hidden_act {act!r} is not supported (quick_gelu or gelu)")
    width = cfg.get("hidden_size", width)
    return dict(width=width, layers=cfg.get("num_hidden_layers", layers), heads=cfg.get("num_attention_heads", heads),
                intermediate_size=cfg.get("intermediate_size", 4 * width), use_quick_gelu=act == "quick_gelu",
                epsilon=float(cfg.get("layer_norm_eps", 1e-5)))


def build_towers(config, where, dtype=ms.float32):
    """`(text, vision)` cells for a CLIPConfig dict: the projection size is the top level's `projection_dim`
    (the towers' own entries are ignored by CLIPModel too)."""
    text, vision = config.get("text_config"), config.get("vision_config")
    if not (isinstance(text, dict) and isinstance(vision, dict)):
        raise ModelConfigError(f"{where}: not a CLIPModel config (no text_config and vision_config); "
                               f"pass a transformers CLIPModel folder such as {DEFAULT_MODEL}'s")
    projection_dim = int(config.get("projection_dim", 512))
    text_cell = CLIPTextModel(vocab_size=text.get("vocab_size", 49408),
                              context_length=text.get("max_position_embeddings", 77),
                              **_tower(text, where, 512, 12, 8), projection_dim=projection_dim, dtype=dtype)
    vision_cell = CLIPVisionModelWithProjection(
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
        num_channels=vision.get("num_channels", 3), **_tower(vision, where, 768, 12, 12),
        projection_dim=projection_dim, dtype=dtype)
    return text_cell, vision_cell


def weights_file(folder):
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{folder}: no CLIP weights (expected {' or '.join(WEIGHT_FILES)})")


class ImageProcessor:
    """CLIPImageProcessor (its PIL path): the shortest side resized to `size` (the other side truncated to an
    integer, as transformers does), a centre crop, `* rescale_factor` in float64, then float32 `(x - mean) / std`.

    config: the preprocessor_config.json dict; `size` and `crop_size` as numbers (openai's files) or dicts.
    Without one, openai's values and the model's image size.
    """

    def __init__(self, config, image_size, where):
        size, crop = config.get("size", image_size), config.get("crop_size", image_size)
        self.size = size.get("shortest_edge") if isinstance(size, dict) else size
        self.crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        if self.crop != (image_size, image_size) or not isinstance(self.size, int) or self.size < image_size:
            raise ModelConfigError(f"{where}: crop_size {crop} must be the model's image_size {image_size}, and size "
                                   f"{size} a shortest edge of at least that")
        self.resample = config.get("resample", PIL_BICUBIC)
        self.rescale_factor = config.get("rescale_factor", 1 / 255)
        self.mean = np.asarray(config.get("image_mean", OPENAI_CLIP_MEAN), np.float32)
        self.std = np.asarray(config.get("image_std", OPENAI_CLIP_STD), np.float32)

    def __call__(self, images):
        """uint8 images `[H, W, 3]` (a list, or an array `[B, H, W, 3]`) -> pixel values `[B, 3, S, S]` float32."""
        return np.stack([self._one(np.asarray(image)) for image in images])

    def _one(self, image):
        from PIL import Image

        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        long = int(self.size * max(h, w) / min(h, w))
        new_h, new_w = (self.size, long) if h <= w else (long, self.size)
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=self.resample))
        top, left = (new_h - self.crop[0]) // 2, (new_w - self.crop[1]) // 2
        image = image[top:top + self.crop[0], left:left + self.crop[1]]
        x = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return ((x - self.mean) / self.std).transpose(2, 0, 1)


class CLIP:
    """A transformers `CLIPModel` folder as MindSpore cells, with its image preprocessing and tokenizer.

    Loads strictly: every parameter of both towers and projections from the file, and no other key than
    `UNUSED_KEYS`. `image_features` / `text_features` are HF's `get_image_features` / `get_text_features`
    (projected, not normalised), float32 numpy.
    """

    def __init__(self, folder, dtype=ms.float32, batch_size=8):
        config_path = os.path.join(folder, "config.json")
        self.text, self.vision = build_towers(read_json(config_path), config_path, dtype)
        path = weights_file(folder)
        state = {k: v for k, v in load_state_dict(path).items() if k not in UNUSED_KEYS}
        vision = {k: v for k, v in state.items() if k.split(".")[0] in ("vision_model", "visual_projection")}
        load_into(self.vision, vision, "CLIP vision", path)
        load_into(self.text, {k: v for k, v in state.items() if k not in vision}, "CLIP text", path)
        preprocessor = os.path.join(folder, "preprocessor_config.json")
        self.preprocess = ImageProcessor(read_json(preprocessor, required=False), self.vision.image_size, preprocessor)
        try:
            self.tokenizer = load_tokenizer(folder)
        except FileNotFoundError:  # the vocabulary is the one shipped in ldm/
            self.tokenizer = load_tokenizer()
        # ViT-L/14 at 224 px: a batch of 8 keeps the attention scores of a layer at 34 MB (8 x 16 heads x 257^2)
        self.batch_size = batch_size

    def image_features(self, images):
        """uint8 images `[H, W, 3]` -> `[N, projection_dim]`."""
        pixels = self.preprocess(images)
        return np.concatenate([self.vision(ms.Tensor(pixels[i:i + self.batch_size])).asnumpy()
                               for i in range(0, len(pixels), self.batch_size)])

    def text_features(self, prompts):
        """prompts -> `[N, projection_dim]`: the pooled output at each prompt's end-of-text token, projected."""
        _, pooled = self.text(ms.Tensor(tokenize(self.tokenizer, prompts)))
        return pooled.asnumpy()


def normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def without_placeholder(prompt, placeholder):
    """`prompt` with `placeholder` and its `<t>_1.._N` tokens removed, as the TI paper's CLIP-T prompts ("A photo
    of on the moon"); whole words only, so the placeholder "sks" leaves "asks" alone."""
    pattern = r"(?<!\w)" + re.escape(placeholder) + r"(?:_\d+)?(?!\w)"
    return " ".join(re.sub(pattern, " ", prompt).split())


class ClipScorer(Scorer):
    """The TI paper's CLIP metrics, as raw cosine similarities in [-1, 1] (not CLIPScore's 2.5 * max(cos, 0)):

    - `concept(images)`, CLIP-I: the mean cosine similarity of every (sample, training image) pair of CLIP image
      embeddings;
    - `edit(images, prompt)`, CLIP-T: the mean cosine similarity between the samples' image embeddings and the
      text embedding of `prompt` with the placeholder removed.

    train_images: the training set, uint8 `[H, W, 3]` images; model: a transformers CLIPModel folder or hub id.
    """

    name = "clip"
    # CLIP-T means of different methods lie close together on the cosine scale (DreamBooth's Table 1:
    # Textual Inversion 0.255, DreamBooth 0.305, on the same prompts): 0.01 is a fifth of that gap between an
    # embedding that overpowers its prompts and one that follows them, so a checkpoint within it of the best
    # edit score edits about as well.
    margin = 0.01

    def __init__(self, train_images, placeholder, model=None):
        super().__init__(train_images, placeholder)
        self.clip = CLIP(resolve_clip(model or DEFAULT_MODEL))
        self.train_embeds = normalized(self.clip.image_features(train_images))

    def concept(self, images):
        return float((normalized(self.clip.image_features(images)) @ self.train_embeds.T).mean())

    def edit(self, images, prompt):
        text = normalized(self.clip.text_features([without_placeholder(prompt, self.placeholder)]))
        return float((normalized(self.clip.image_features(images)) @ text.T).mean())
