"""Training configuration for Textual Inversion: one typed dataclass, filled from a YAML file and the CLI.

Keys are mindone's (examples/stable_diffusion_v2/train_textual_inversion.py) so a mindone train YAML works
unchanged; every key is also a `--key value` / `--key=value` flag, and `--train_config X.yaml` is loaded
first so the command line overrides it. Mistakes (unknown key, wrong type, bad cross-field combination)
raise `ConfigError` with a one-line message; the training script turns that into exit code 2.
"""

import dataclasses
import difflib
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple

import yaml

from ldm.checkpoint_io import atomic_write
from ldm.errors import UserInputError
from ldm.pretrained import VERSIONS

_logger = logging.getLogger(__name__)


class ConfigError(UserInputError):
    """A train-config mistake; the message is one line naming the key."""


def _opt(default, help, choices=None, **kwargs):
    return field(default=default, metadata={"help": help, "choices": choices}, **kwargs)


# a scored validation's edited prompts when validation_edit_prompts is unset; each scorer can read them
DEFAULT_EDIT_PROMPTS = {"object": ("a {} on a yellow background",),
                        "style": ("a yellow circle on a blue background in the style of {}",)}


@dataclass
class TrainConfig:
    # data
    train_data_dir: Optional[str] = _opt(None, "folder of training images (jpg, jpeg, png, webp, bmp)")
    placeholder_token: Optional[str] = _opt(None, "the new token, e.g. <cat-toy>")
    initializer_token: Optional[str] = _opt(None, "existing word(s) whose token embeddings start the new vectors "
                                              "(several tokens are shared out over the vectors)")
    learnable_property: str = _opt("object", "caption templates: object or style", ("object", "style"))
    num_vectors: int = _opt(1, "number of embedding vectors learned for the placeholder")
    train_data_repeats: int = _opt(1, "repeat the image list N times per epoch")
    template_file: Optional[str] = _opt(None, "text file of caption templates, one per line, each with {}")
    image_size: int = _opt(512, "training resolution in pixels (multiple of 8)")
    random_crop: bool = _opt(True, "random crop after resizing the short side; false = center crop")
    flip_p: float = _opt(0.5, "probability of a horizontal flip")
    filter_small_size: bool = _opt(True, "drop images whose short side is below image_filter_size")
    image_filter_size: int = _opt(256, "short-side threshold in pixels for filter_small_size")
    replace_small_images: bool = _opt(True, "fill the places of dropped small images with other training images")
    latent_cache: str = _opt("auto", "encode each augmented image once: auto (when random_crop is false), true, false",
                             ("auto", "true", "false"))
    # batch and schedule
    train_batch_size: int = _opt(1, "batch size per device")
    gradient_accumulation_steps: int = _opt(4, "micro-batches per optimizer step")
    epochs: int = _opt(10, "epochs to train when max_steps is unset")
    max_steps: Optional[int] = _opt(6000, "optimizer steps to train (overrides epochs)")
    seed: int = _opt(3407, "seed for data order, augmentation and noise")
    # learning rate
    start_learning_rate: float = _opt(5e-5, "peak learning rate")
    end_learning_rate: float = _opt(1e-7, "final learning rate of the linear and cosine schedules")
    scale_lr: bool = _opt(False, "multiply the learning rate by batch size x accumulation x devices")
    scheduler: str = _opt("linear", "learning-rate schedule",
                          ("linear", "constant", "cosine", "multi_step_decay"))
    warmup_steps: int = _opt(0, "linear warm-up steps")
    decay_steps: int = _opt(0, "steps of decay after warm-up; 0 = until the end of training")
    milestones: Tuple[int, ...] = _opt((200, 400, 800, 1600, 3200), "steps where multi_step_decay decays")
    decay_rate: float = _opt(0.9, "multiplier applied at each multi_step_decay milestone")
    # optimizer
    optim: str = _opt("adamw", "optimizer", ("adamw", "adam"))
    betas: Tuple[float, ...] = _opt((0.9, 0.999), "Adam [beta1, beta2]")
    weight_decay: float = _opt(1e-2, "weight decay")
    clip_grad: bool = _opt(False, "clip the gradient norm")
    max_grad_norm: float = _opt(1.0, "gradient-norm limit when clip_grad is true")
    init_loss_scale: float = _opt(2048.0, "initial loss scale (fp16/bf16)")
    loss_scale_factor: float = _opt(2.0, "loss scale growth/shrink factor")
    scale_window: int = _opt(200, "overflow-free steps before the loss scale grows")
    dtype: str = _opt("fp32", "compute dtype of the frozen models", ("fp32", "fp16", "bf16"))
    recompute: bool = _opt(False, "gradient checkpointing (graph mode): each UNet block's activations are "
                                  "recomputed in the backward instead of kept, about one more UNet forward per step "
                                  "for less memory where the device frees them (on CPU the peak stays: "
                                  "docs/performance.md)")
    # model
    version: str = _opt("1.5", "Stable Diffusion version", tuple(VERSIONS))
    model_config: Optional[str] = _opt(None, "model YAML; unset = the version's default")
    pretrained_model_path: Optional[str] = _opt(None, "weights file or folder; unset = models/ then the Hub")
    pretrained_model_file: Optional[str] = _opt(None, "weights file name inside pretrained_model_path")
    extract_ema: bool = _opt(False, "a single file with EMA and non-EMA UNet weights (v1-5-pruned.ckpt): train on "
                                    "the EMA ones (diffusers' converter flag); false = the non-EMA ones, as diffusers "
                                    "and A1111 load such files")
    clip_skip: int = _opt(1, "text encoder layer the captions are read from, counted from the end as A1111's "
                             "'Clip skip': 1 = the last (no skip), 2 = the penultimate; sample with the same value")
    # output, logging, validation
    output_path: str = _opt("output", "folder for embeddings, logs, samples and the resolved config")
    ckpt_save_interval: int = _opt(600, "save the embedding every N steps")
    log_interval: int = _opt(1, "write the step's loss to loss_log.csv every N steps (and at the last step)")
    validation_prompt: Optional[str] = _opt(None, "prompt sampled during training; unset = no validation")
    validation_steps: int = _opt(100, "sample validation images every N steps")
    num_validation_images: int = _opt(4, "images per validation")
    validation_metric: str = _opt("none", "score each validation's samples into metrics.csv and keep weights/"
                                          "best_ti.ckpt, a copy of the best embedding so far: the best concept score "
                                          "among those whose edit score is within the metric's margin of the best "
                                          "(ldm/scoring.py); judge = the toy world's pixel judge, clip = CLIP-I and "
                                          "CLIP-T; without validation_prompt nothing is scored",
                                  ("judge", "clip", "none"))
    validation_edit_prompts: Optional[Tuple[str, ...]] = _opt(
        None, "prompts with {} for the placeholder that put the concept in a new scene, sampled with the validation's "
              "seeds for the edit score; unset = " + ", ".join(
                  f"'{prompts[0]}' ({kind})" for kind, prompts in DEFAULT_EDIT_PROMPTS.items()))
    resume: Optional[str] = _opt(None, "training state to resume from")
    # runtime
    mode: int = _opt(0, "MindSpore mode: 0 graph, 1 pynative", (0, 1))
    jit_level: str = _opt("O0", "graph-mode optimisation level", ("O0", "O1", "O2"))
    use_parallel: bool = _opt(False, "data-parallel training over several devices")
    # where the YAML came from; command-line only, never written to the resolved config
    train_config: Optional[str] = _opt(None, "YAML file loaded before the command-line flags")

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "train_config":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def edit_prompts(self) -> list:
        """The edited prompts of a scored validation, with the placeholder in their `{}`."""
        templates = self.validation_edit_prompts or DEFAULT_EDIT_PROMPTS[self.learnable_property]
        return [t.replace("{}", self.placeholder_token) for t in templates]

    def validate(self) -> "TrainConfig":
        """Cross-field checks; raises one ConfigError listing every problem."""
        problems = []

        def need(ok, message):
            if not ok:
                problems.append(message)

        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                problems.append(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")

        need(bool(self.train_data_dir), "train_data_dir is required (a folder of 3-5 images of the concept)")
        need(bool(self.placeholder_token), "placeholder_token is required, e.g. <my-concept>")
        if self.placeholder_token:
            need(not any(c.isspace() for c in self.placeholder_token),
                 f"placeholder_token must not contain spaces, got {self.placeholder_token!r}")
        if self.initializer_token is not None:
            need(self.initializer_token.strip() != "", "initializer_token must not be empty (unset it instead)")
        need(self.num_vectors >= 1, f"num_vectors has to be >= 1, got {self.num_vectors}")
        need(self.clip_skip >= 1, f"clip_skip has to be >= 1 (1 = the text encoder's last layer), got {self.clip_skip}")
        need(self.train_data_repeats >= 1, f"train_data_repeats has to be >= 1, got {self.train_data_repeats}")
        need(self.image_size >= 8 and self.image_size % 8 == 0,
             f"image_size must be a positive multiple of 8 (the VAE downsamples by 8), got {self.image_size}")
        need(0.0 <= self.flip_p <= 1.0, f"flip_p must be in [0, 1], got {self.flip_p}")
        need(self.image_filter_size >= 0, f"image_filter_size must be >= 0, got {self.image_filter_size}")
        need(not (self.latent_cache == "true" and self.random_crop),
             "latent_cache true needs random_crop false (a random crop has no finite set of images to cache)")
        need(self.train_batch_size >= 1, f"train_batch_size has to be >= 1, got {self.train_batch_size}")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps has to be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_steps is None:
            need(self.epochs >= 1, f"epochs has to be >= 1 when max_steps is unset, got {self.epochs}")
        else:
            need(self.max_steps >= 1, f"max_steps has to be >= 1, got {self.max_steps}")
        need(self.start_learning_rate > 0, f"start_learning_rate must be > 0, got {self.start_learning_rate}")
        need(self.end_learning_rate >= 0, f"end_learning_rate must be >= 0, got {self.end_learning_rate}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.decay_steps >= 0, f"decay_steps must be >= 0, got {self.decay_steps}")
        if self.scheduler == "multi_step_decay":
            ms_ = list(self.milestones)
            need(len(ms_) > 0 and all(m > 0 for m in ms_) and ms_ == sorted(set(ms_)),
                 f"milestones must be increasing positive steps for multi_step_decay, got {ms_}")
            need(0 < self.decay_rate <= 1, f"decay_rate must be in (0, 1], got {self.decay_rate}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be [beta1, beta2] in [0, 1), got {list(self.betas)}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.init_loss_scale > 0, f"init_loss_scale must be > 0, got {self.init_loss_scale}")
        need(self.loss_scale_factor > 1, f"loss_scale_factor must be > 1, got {self.loss_scale_factor}")
        need(self.scale_window >= 1, f"scale_window has to be >= 1, got {self.scale_window}")
        for name in ("ckpt_save_interval", "log_interval", "validation_steps", "num_validation_images"):
            need(getattr(self, name) >= 1, f"{name} has to be >= 1, got {getattr(self, name)}")
        if self.validation_edit_prompts is not None:
            need(len(self.validation_edit_prompts) > 0 and all("{}" in p for p in self.validation_edit_prompts),
                 "validation_edit_prompts must be one or more prompts, each with {} where the placeholder goes, got "
                 f"{list(self.validation_edit_prompts)}")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))
        return self


# mindone train-script keys that mean nothing here; accepted so a mindone YAML loads, with a warning.
IGNORED_MINDONE_KEYS = {
    "enable_modelarts": "ModelArts is not supported",
    "json_data_path": "ModelArts only",
    "num_workers": "ModelArts only",
    "callback_size": "not used by this script",
    "sample_batch_size": "not used by this script",
    "use_ema": "EMA is not used for the few trained vectors (extract_ema picks a file's EMA UNet weights)",
    "overflow_still_update": "not configurable here",
    "log_level": "not configurable here",
}

# Names a diffusers, kohya or A1111 user reaches for, mapped to ours; difflib alone would suggest
# end_learning_rate for learning_rate.
_FOREIGN_KEYS = {
    "learning_rate": "start_learning_rate",
    "lr": "start_learning_rate",
    "resolution": "image_size",
    "max_train_steps": "max_steps",
    "num_train_epochs": "epochs",
    "max_train_epochs": "epochs",
    "repeats": "train_data_repeats",
    "lr_scheduler": "scheduler",
    "lr_warmup_steps": "warmup_steps",
    "gradient_checkpointing": "recompute",
    "use_recompute": "recompute",
    "output_dir": "output_path",
    "center_crop": "random_crop",
    "random_flip": "flip_p",
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "adam_weight_decay": "weight_decay",
    "optimizer_type": "optim",
    "save_steps": "ckpt_save_interval",
    "checkpointing_steps": "ckpt_save_interval",
    "save_every_n_steps": "ckpt_save_interval",
    "mixed_precision": "dtype",
    "pretrained_model_name_or_path": "pretrained_model_path",
    "resume_from_checkpoint": "resume",
    "data_path": "train_data_dir",
    "token_string": "placeholder_token",
    "init_word": "initializer_token",
    "num_vectors_per_token": "num_vectors",
    "use_object_template": "learnable_property",
    "use_style_template": "learnable_property",
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)
_NONE_WORDS = ("none", "null", "~", "")
_TRUE_WORDS = ("true", "1", "yes", "on")
_BAD = object()  # "not convertible"; None is a legitimate value
_FALSE_WORDS = ("false", "0", "no", "off")


def _suggest(key: str) -> str:
    guess = _FOREIGN_KEYS.get(key) or next(iter(difflib.get_close_matches(key, list(_FIELDS), n=1)), None)
    return f"; did you mean '{guess}'?" if guess else "; run with --help to list the keys"


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        return _type_name(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _is_list(tp) -> bool:
    """A list-valued key's type (an optional one too)."""
    return any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp)))


def _scalar(value, tp, choices):
    """Convert one scalar or return the _BAD sentinel. CLI values arrive as strings, YAML ones typed."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        return _BAD
    if tp is int:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                return _BAD
        if isinstance(value, float):
            return int(value) if value.is_integer() else _BAD
        return value if isinstance(value, int) else _BAD
    if tp is float:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, str):
            # PyYAML reads 1e-4 (no dot) as a string; mindone's YAMLs are full of those.
            try:
                return float(value)
            except ValueError:
                return _BAD
        return float(value) if isinstance(value, (int, float)) else _BAD
    # str: an unquoted `version: 2.0` arrives as a float; `latent_cache: true` as a bool.
    if isinstance(value, bool):
        word = "true" if value else "false"
        return word if choices and word in choices else _BAD
    if isinstance(value, (int, float)):
        return str(value)
    return value if isinstance(value, str) else _BAD


def _coerce(name: str, value, where: str):
    tp = _TYPES[name]
    choices = _FIELDS[name].metadata["choices"]
    optional = typing.get_origin(tp) is typing.Union
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.startswith("["):
                    value = yaml.safe_load(text)
                else:
                    # a prompt's commas are its own: one string is one prompt
                    value = [text] if item_tp is str else [v for v in text.split(",") if v.strip()]
            except yaml.YAMLError:
                value = None
        items = [_scalar(v, item_tp, None) for v in value] if isinstance(value, (list, tuple)) else [_BAD]
        if any(v is _BAD for v in items):
            raise ConfigError(f"{name} expects {_type_name(tp)}, got {value!r} ({where})")
        return tuple(items)
    converted = _scalar(value, tp, choices)
    if converted is _BAD:
        raise ConfigError(f"{name} expects {_type_name(tp)}, got {value!r} ({where})")
    return converted


def _apply(values: dict, key: str, value, where: str) -> None:
    if key in IGNORED_MINDONE_KEYS:
        _logger.warning("train config: ignoring mindone key '%s' (%s; %s)", key, IGNORED_MINDONE_KEYS[key], where)
        return
    if key == "train_config" and not where.startswith("--"):
        raise ConfigError(f"train_config can only be given on the command line ({where})")
    if key not in _FIELDS:
        if where.startswith("--"):
            raise ConfigError(f"unknown command-line flag '{where}'{_suggest(key)}")
        raise ConfigError(f"unknown train-config key '{key}' ({where}){_suggest(key)}")
    values[key] = _coerce(key, value, where)


def load_yaml(path: str) -> dict:
    """The YAML file's mapping, raw (not yet converted); ConfigError if it is missing or not a mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"train config file '{path}' does not exist")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"train config file '{path}'{line}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"train config file '{path}' must be a mapping of key: value, got {type(data).__name__}")
    return data


def _split_cli(argv):
    """(key, raw value, flag text) triples from `--key value`, `--key=value`, bare bool flags and list values."""
    out = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "-v":
            token = "--version"
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected command-line argument '{token}'; flags look like --key value")
        body = token[2:]
        key, has_eq, inline = body.partition("=")
        key = key.replace("-", "_")
        flag = f"--{key}"
        i += 1
        if has_eq:
            out.append((key, inline, flag))
            continue
        following = []
        while i < len(argv) and not argv[i].startswith("--") and argv[i] != "-v":
            following.append(argv[i])
            i += 1
        tp = _TYPES.get(key)
        if not following:
            if tp is bool:
                out.append((key, True, flag))  # diffusers-style bare switch
                continue
            if key in _FIELDS or key in IGNORED_MINDONE_KEYS or key == "train_config":
                raise ConfigError(f"{flag} needs a value")
            raise ConfigError(f"unknown command-line flag '{flag}'{_suggest(key)}")
        if len(following) > 1 and not _is_list(tp):
            raise ConfigError(f"{flag} takes one value, got {' '.join(following)!r}")
        out.append((key, following if len(following) > 1 else following[0], flag))
    return out


def _help_text() -> str:
    lines = [
        "usage: train_textual_inversion.py [--train_config FILE.yaml] [--key value | --key=value ...]",
        "The YAML is loaded first; flags override it. Bools take true/false/1/0.",
        "",
    ]
    for name, f in _FIELDS.items():
        default = f.default if not isinstance(f.default, tuple) else list(f.default)
        lines.append(f"  --{name} ({_type_name(_TYPES[name])}, default {default!r}): {f.metadata['help']}")
    lines.append("")
    lines.append("Accepted and ignored (mindone): " + ", ".join(IGNORED_MINDONE_KEYS))
    return "\n".join(lines)


def parse_train_config(argv=None, validate: bool = True) -> TrainConfig:
    """Build the config from `--train_config` YAML plus command-line overrides (argv excludes the program name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help_text())
        raise SystemExit(0)
    cli = _split_cli(argv)
    values = {}
    yaml_paths = [raw for key, raw, _ in cli if key == "train_config"]
    if yaml_paths:
        path = yaml_paths[-1]
        for key, value in load_yaml(path).items():
            _apply(values, str(key), value, f"in {path}")
    for key, value, flag in cli:
        _apply(values, key, value, flag)
    cfg = TrainConfig(**values)
    return cfg.validate() if validate else cfg


def config_from_dict(mapping: dict, source: str = "dict", validate: bool = True) -> TrainConfig:
    """The config from a mapping with the same rules as a YAML file (unknown keys and wrong types fail)."""
    values = {}
    for key, value in mapping.items():
        _apply(values, str(key), value, f"in {source}")
    cfg = TrainConfig(**values)
    return cfg.validate() if validate else cfg


def save_resolved(cfg: TrainConfig, path: str) -> None:
    """Write every resolved key as YAML; atomic, so an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False, allow_unicode=True)
