"""A frozen Stable Diffusion (1.x, 2.x, SDXL) with placeholder embeddings: what training and sampling share.

`StableDiffusion.load()` resolves and loads the weights (any layout `ldm.convert` reads), builds the
tokenizer, and freezes everything. Placeholder tokens (`<t>`, `<t>_1`, ...) get ids after the base
vocabulary; their vectors live in `extra_embeddings` (`[N, D]`), which the text encoder reads for those
ids, so the 49408-row table is never resized or written.

Initial latents are framework independent: iteration j of a run with seed s draws the whole batch as
`numpy.random.default_rng(s + j).standard_normal((n, 4, H // f, W // f), dtype=float32)`, f being the
VAE's downsampling factor (8 for every SD model), so the same seed gives the same image on any machine,
and the same image as diffusers fed the same latents.
"""

import logging
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ldm import samplers
from ldm.convert import read_json, build_pretrained
from ldm.models import load_model_config
from ldm.modules.conditioner import Conditioner
from ldm.pretrained import get_version, resolve_weights
from ldm.schedule import make_alphas_cumprod
from ldm.tokenizer import add_placeholder_tokens, expand_placeholders, load_tokenizer, placeholder_names, tokenize

logger = logging.getLogger(__name__)

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


class VAEGraph(nn.Cell):
    """Graph-mode entry point for the VAE's encoder or decoder (methods other than `construct`)."""

    def __init__(self, vae, decode):
        super().__init__()
        self.vae = vae
        self.decode = decode

    def construct(self, x):
        if self.decode:
            return self.vae.decode(x)
        return self.vae.encode(x)


class StableDiffusion:
    """The frozen model. SDXL (`text_encoder_2` set) has a second text encoder and tokenizer; its placeholder
    vectors are `[N, 768 + 1280]`, CLIP ViT-L's columns first (see ldm.modules.conditioner)."""

    def __init__(self, config, unet, vae, text_encoder, tokenizer, name="", scheduler_settings=None,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt=False):
        self.config = config
        # {sampler: samplers.SchedulerSettings} from the model's scheduler config; unset = SD's own
        self.scheduler_settings = scheduler_settings or samplers.scheduler_settings()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
        self.tokenizer = tokenizer
        self.tokenizers = [tokenizer] + ([tokenizer_2] if tokenizer_2 is not None else [])
        self.is_xl = text_encoder_2 is not None
        # SDXL base's pipeline option: an empty negative prompt is all zeros, not the encoding of ""
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.name = name
        for cell in [unet, vae] + self.text_encoders:
            cell.set_train(False)
            for p in cell.get_parameters():
                p.requires_grad = False
        self.conditioner = Conditioner(self.text_encoders, config.size_embedding_dim)
        self.alphas_cumprod = make_alphas_cumprod(config.linear_start, config.linear_end, config.timesteps)
        self.vocab_size = config.text_encoder.vocab_size
        self.embedding_dims = tuple(te.width for te in self.text_encoders)
        self.embedding_dim = sum(self.embedding_dims)
        self.placeholders = {}  # placeholder -> its token names
        self.extra_embeddings = np.zeros((0, self.embedding_dim), np.float32)
        # the VAE halves the resolution between consecutive levels
        self.latent_factor = 2 ** (len(config.vae.ch_mult) - 1)
        self._encode = VAEGraph(vae, decode=False)
        self._decode = VAEGraph(vae, decode=True)

    @classmethod
    def load(cls, version, weights=None, model_config=None, dtype="fp32", clip_skip=1, use_ema=False):
        """Load `version`'s weights (or `weights`: a file or diffusers folder) into frozen cells.

        model_config: a model YAML; unset = the version's config, except that a diffusers folder's own
        config.json files win.
        clip_skip: the text encoder layer prompts are read from, counted from the end (A1111's "CLIP stop
        at last layers") starting at the layer the model conditions on: 1 = that layer, 2 = the one before,
        ...; fixed for the model's lifetime.
        use_ema: the UNet from a single file's EMA copies (`model_ema.*`, e.g. v1-5-pruned.ckpt) instead of
        its non-EMA weights (the default, as diffusers and A1111 load such files).
        """
        path = resolve_weights(version, weights)
        if model_config:
            config = load_model_config(model_config)
        elif os.path.isdir(path):
            config = None  # the folder's config.json files describe it
        else:
            config = load_model_config(get_version(version).config_path)
        # a diffusers folder's scheduler config decides how each sampler steps, as diffusers' from_config
        # does; single files (no such file under them) sample with SD's own
        scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
        settings = (samplers.scheduler_settings(read_json(scheduler_file), scheduler_file)
                    if os.path.isfile(scheduler_file) else None)
        config, (unet, vae, *text_encoders), layout = build_pretrained(path, config, DTYPES[dtype], use_ema)
        for text_encoder in text_encoders:
            text_encoder.set_clip_skip(clip_skip)
        encoder_configs = [config.text_encoder, config.text_encoder_2][:len(text_encoders)]
        tokenizers = [_tokenizer(path, folder, te.pad_token)
                      for folder, te in zip(TOKENIZER_FOLDERS, encoder_configs)]
        # SDXL base's pipeline setting, unless a diffusers folder says otherwise
        force_zeros = read_json(os.path.join(path, "model_index.json"), required=False).get(
            "force_zeros_for_empty_prompt", len(text_encoders) == 2)
        logger.info("loaded %s (%s layout) from %s", version, layout, path)
        return cls(config, unet, vae, text_encoders[0], tokenizers[0], name=os.path.basename(os.path.normpath(path)),
                   scheduler_settings=settings, text_encoder_2=text_encoders[1] if len(text_encoders) > 1 else None,
                   tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None, force_zeros_for_empty_prompt=force_zeros)

    # --- placeholder tokens ---------------------------------------------------------------------------

    def add_placeholder(self, placeholder, vectors):
        """Register `placeholder` with `vectors` `[N, D]` (SDXL: D = 768 + 1280); returns the N new token ids."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embedding for {placeholder!r} has shape {vectors.shape}; this model needs [N, {self.embedding_dim}]"
            )
        # every tokenizer gets the tokens, at the same ids (SDXL's two share the vocabulary)
        ids, *others = [add_placeholder_tokens(tokenizer, placeholder, len(vectors)) for tokenizer in self.tokenizers]
        # ids are consecutive after the vocabulary, so row id - vocab_size is the next free row
        assert ids[0] - self.vocab_size == len(self.extra_embeddings), "placeholder ids out of step with the rows"
        assert all(other == ids for other in others), "the tokenizers gave the placeholder different ids"
        self.extra_embeddings = np.concatenate([self.extra_embeddings, vectors])
        self.placeholders[placeholder] = placeholder_names(placeholder, len(vectors))
        return ids

    def set_placeholder_vectors(self, ids, vectors):
        self.extra_embeddings[np.asarray(ids) - self.vocab_size] = vectors

    def vector_sets(self, vectors):
        """`[N, D]` placeholder vectors split into each text encoder's set (SDXL: CLIP ViT-L's, then bigG's)."""
        return tuple(np.split(np.asarray(vectors), np.cumsum(self.embedding_dims)[:-1], axis=1))

    def token_tables(self):
        """Each text encoder's token embedding table (numpy), in the column order of the vectors."""
        return [te.text_model.embeddings.token_embedding.weight.asnumpy() for te in self.text_encoders]

    def token_ids(self, prompts):
        """`[B, 77]` int32 ids; SDXL: `[B, 2, 77]`, one row per tokenizer (they pad differently)."""
        prompts = [expand_placeholders(p, self.placeholders) for p in prompts]
        ids = [tokenize(tokenizer, prompts) for tokenizer in self.tokenizers]
        return ids[0] if len(ids) == 1 else np.stack(ids, axis=1)

    def encode_text(self, prompts, size_ids=None):
        """`(context, y)` Tensors for `prompts` (y: SDXL's pooled text and size embedding, else None)."""
        extra = Tensor(self.extra_embeddings) if len(self.extra_embeddings) else None
        return self.conditioner(Tensor(self.token_ids(prompts)), extra,
                                None if size_ids is None else Tensor(np.asarray(size_ids, np.float32)))

    def uncond_embeddings(self, negative_prompt, n, size_ids=None):
        """The classifier-free guidance's unconditional `(context, y)`: the negative prompt's, or zeros for an
        empty one when the model asks for it (SDXL base: context and pooled text zero, size embedding kept)."""
        context, y = self.encode_text([negative_prompt] * n, size_ids)
        if negative_prompt or not self.force_zeros_for_empty_prompt:
            return context, y
        pooled = self.config.text_encoder_2.projection_dim
        return ms.ops.zeros_like(context), ms.ops.concat([ms.ops.zeros_like(y[:, :pooled]), y[:, pooled:]], axis=1)

    # --- images <-> latents ---------------------------------------------------------------------------

    def encode_images(self, images):
        """Posterior `(mean, logvar)` numpy arrays of images `[B, 3, H, W]` in [-1, 1] (unscaled latents)."""
        mean, logvar = self._encode(Tensor(np.asarray(images, np.float32)))
        return mean.asnumpy(), logvar.asnumpy()

    def decode_latents(self, latents):
        """uint8 images `[B, H, W, 3]` from scaled latents, rounded as diffusers' pipelines do."""
        x = self._decode(Tensor(np.asarray(latents, np.float32) / self.config.scale_factor)).asnumpy()
        x = np.clip(x / 2 + 0.5, 0.0, 1.0)
        return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

    # --- sampling -------------------------------------------------------------------------------------

    def size_ids(self, n, height, width, original_size=None, crops_coords_top_left=None, target_size=None):
        """SDXL's `[n, 6]` size conditioning, diffusers' defaults: original and target size = the image's
        `(height, width)`, crop at (0, 0)."""
        row = (*(original_size or (height, width)), *(crops_coords_top_left or (0, 0)),
               *(target_size or (height, width)))
        return np.tile(np.asarray(row, np.float32), (n, 1))

    def sample(self, prompts, latents, sampler="dpm_solver", steps=20, scale=7.5, negative_prompt="",
               eta=0.0, rng=None, return_latents=False, size_ids=None):
        """Images for `prompts` from initial `latents` `[B, 4, h, w]` with classifier-free guidance.

        size_ids: SDXL's `[B, 6]` size conditioning; unset = `size_ids()`'s defaults for the latents' size.
        """
        n = len(prompts)
        if self.is_xl and size_ids is None:
            f = self.latent_factor
            size_ids = self.size_ids(n, latents.shape[2] * f, latents.shape[3] * f)
        uncond, cond = self.uncond_embeddings(negative_prompt, n, size_ids), self.encode_text(prompts, size_ids)
        context = ms.ops.concat([uncond[0], cond[0]])
        y = None if cond[1] is None else ms.ops.concat([uncond[1], cond[1]])

        def model_fn(x, t):
            x_in = Tensor(np.concatenate([x, x]))
            out = self.unet(x_in, Tensor(np.full((2 * n,), t, np.int32)), context, y).asnumpy()
            uncond, cond = out[:n], out[n:]
            return uncond + scale * (cond - uncond)

        z = samplers.sample(sampler, model_fn, np.asarray(latents, np.float32), self.alphas_cumprod, steps,
                            parameterization=self.config.parameterization, eta=eta, rng=rng,
                            settings=self.scheduler_settings.get(sampler))
        images = self.decode_latents(z)
        return (images, z) if return_latents else images


# a diffusers folder's tokenizer of each text encoder
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


def _tokenizer(path, folder, pad_token):
    """A diffusers folder's own tokenizer files win; otherwise the shipped CLIP vocabulary (both SDXL
    tokenizers are CLIP's BPE, differing only in the pad token)."""
    tokenizer_dir = os.path.join(path, folder)
    if not os.path.isfile(os.path.join(tokenizer_dir, "vocab.json")):
        tokenizer_dir = None
    return load_tokenizer(tokenizer_dir, pad_token=pad_token)


def initial_latents(seed, n, height, width, channels=4, factor=8):
    """The documented, framework-independent initial noise (see the module docstring)."""
    return np.random.default_rng(seed).standard_normal((n, channels, height // factor, width // factor),
                                                       dtype=np.float32)


def image_grid(images, cols=None):
    """One uint8 image `[rows*H, cols*W, 3]` from `[B, H, W, 3]`."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid
