"""Train Textual Inversion embeddings for a frozen Stable Diffusion.

    python train_textual_inversion.py --train_config configs/train/train_config_textual_inversion_v1.yaml

Reads top to bottom: config -> runtime -> models -> placeholder vectors -> data -> train step -> loop
-> save. Only the N placeholder vectors (`[N, D]`) are trained; every model weight stays frozen and gets
no gradient. All randomness (data order, augmentation, timesteps, noise, posterior samples) comes from
numpy generators seeded by `seed` and drawn for the *global* batch, so runs are reproducible, resumable
bit for bit, and a data-parallel run sees exactly the batch a single process would.
"""

import csv
import glob
import json
import logging
import math
import os
import signal
import sys
import time
import zipfile

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from PIL import Image, ImageDraw
from tqdm import tqdm

from data.dataset import BatchIterator, DatasetError, TextualInversionDataset
from ldm.checkpoint_io import CheckpointError, atomic_write
from ldm.embeddings import save_png_card, save_ti_ckpt
from ldm.optim import Adam, DynamicLossScale, clip_grad_norm, learning_rate
from ldm.pipeline import StableDiffusion, image_grid, initial_latents
from ldm.pretrained import WeightsNotFoundError
from ldm.tokenizer import initializer_ids, init_vectors, placeholder_names
from ldm.train_config import ConfigError, parse_train_config, save_resolved

logger = logging.getLogger("train_textual_inversion")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Errors caused by the user's input: reported in one line with exit code 2.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, WeightsNotFoundError, ValueError, FileNotFoundError)


class TextualInversionLoss(nn.Cell):
    """Denoising loss as a function of the placeholder vectors (the only differentiated input)."""

    def __init__(self, unet, text_encoder, alphas_cumprod, parameterization):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.sqrt_alpha = Tensor(np.sqrt(alphas_cumprod).astype(np.float32))
        self.sqrt_one_minus_alpha = Tensor(np.sqrt(1.0 - alphas_cumprod).astype(np.float32))
        self.v_target = parameterization == "v"

    def construct(self, vectors, latents, input_ids, noise, timesteps, loss_scale):
        context = self.text_encoder(input_ids, vectors)
        a = self.sqrt_alpha[timesteps].reshape(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha[timesteps].reshape(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        pred = self.unet(noisy, timesteps, context).astype(ms.float32)
        target = a * noise - s * latents if self.v_target else noise
        return ops.mean((pred - target) ** 2) * loss_scale


def init_runtime(cfg):
    """Mode, jit level and (with use_parallel) the data-parallel group; returns (rank, world size)."""
    ms.set_context(mode=cfg.mode, jit_config={"jit_level": cfg.jit_level})
    if not cfg.use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


class AllReduceMean(nn.Cell):
    """Mean over the data-parallel ranks (a Cell: the functional all_reduce has no CPU kernel)."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x) / self.world


def check_output_writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with atomic_write(os.path.join(path, ".write_test")) as tmp:
            open(tmp, "w").close()
        os.remove(os.path.join(path, ".write_test"))
    except OSError as err:
        raise ValueError(f"output_path {path} is not writable ({err.strerror}); pass a writable --output_path") from None


class DamagedStateError(ValueError):
    """A train state that cannot be read back (truncated by a full disk or a killed copy)."""


_STATE_META = ("step", "loss_scale", "rng", "data", "adam_t", "placeholder")


def read_state(path):
    """`(arrays, meta)` of a train_state_*.npz written by `save_state`; DamagedStateError when it is not whole."""
    try:
        with np.load(path) as state:
            arrays = {k: state[k] for k in ("vectors", "m", "v")}
            meta = json.loads(str(state["meta"]))
        missing = [k for k in _STATE_META if k not in meta]
        if missing:
            raise KeyError(f"meta lacks {', '.join(missing)}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DamagedStateError(f"{path} is damaged ({type(err).__name__}: {reason})") from None
    return arrays, meta


def load_resume_state(resume, output_path):
    """`(path, arrays, meta)` of the state to resume from; `latest` skips damaged states, saying so."""
    if resume != "latest":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume} does not exist; pass a train_state_*.npz file or 'latest'")
        try:
            return (resume, *read_state(resume))
        except DamagedStateError as err:
            raise DamagedStateError(f"--resume {err}; pass an earlier state or 'latest'") from None
    states = sorted(glob.glob(os.path.join(output_path, "state", "train_state_*.npz")))
    if not states:
        raise FileNotFoundError(f"--resume latest: no train_state_*.npz in {output_path}/state; train without --resume")
    for path in reversed(states):
        try:
            return (path, *read_state(path))
        except DamagedStateError as err:
            logger.warning("%s; resuming from the newest readable state before it", err)
    raise DamagedStateError(f"--resume latest: every train_state_*.npz in {output_path}/state is damaged; "
                            "train without --resume into a new --output_path")


def check_captions_fit(tokenizer, templates, placeholder_string, num_vectors):
    """Refuse a num_vectors whose expanded placeholder pushes a caption past CLIP's context (it would be cut)."""
    lengths = {t: len(tokenizer(t.format(placeholder_string), verbose=False)["input_ids"]) for t in templates}
    longest = max(lengths, key=lengths.get)
    length = lengths[longest]
    over = length - tokenizer.model_max_length
    if over > 0:
        raise ConfigError(f"num_vectors {num_vectors}: the caption template {longest!r} then takes {length} tokens, "
                          f"over the text encoder's {tokenizer.model_max_length}; with these templates num_vectors "
                          f"must be at most {num_vectors - over}")


def save_state(path, vectors, optimizer, loss_scale, step, rng, batches, placeholder):
    meta = {"step": step, "loss_scale": loss_scale.state_dict(), "rng": rng.bit_generator.state,
            "data": batches.state_dict(), "adam_t": optimizer.t, "placeholder": placeholder}
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, vectors=vectors, m=optimizer.m, v=optimizer.v, meta=json.dumps(meta))


def save_loss_curve(path, steps, losses):
    """A small PNG of the loss log (Pillow only: no plotting dependency for one line chart)."""
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    if len(steps) > 1:
        lo, hi = float(np.min(losses)), float(np.max(losses))
        span = (hi - lo) or 1.0
        x0, x1 = steps[0], steps[-1]
        pts = [(pad + (s - x0) / max(x1 - x0, 1) * (w - 1.5 * pad), h - pad - (v - lo) / span * (h - 1.5 * pad))
               for s, v in zip(steps, losses)]
        draw.line(pts, fill=(30, 90, 200), width=2)
        draw.text((pad, h - pad + 8), f"step {x0} .. {x1}   loss {lo:.4f} .. {hi:.4f}", fill="black")
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # train() turns Ctrl-C / SIGTERM into "save and stop"; the caller's handlers come back afterwards
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        return train(parse_train_config(argv))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train(cfg):
    # --- runtime -------------------------------------------------------------------------------------
    rank, world = init_runtime(cfg)
    is_main = rank == 0
    weights_dir = os.path.join(cfg.output_path, "weights")
    if is_main:
        check_output_writable(cfg.output_path)
        earlier = glob.glob(os.path.join(weights_dir, "*_ti.ckpt"))
        if earlier and not cfg.resume:
            raise ValueError(f"output_path {cfg.output_path} already holds {len(earlier)} embeddings of an earlier run; "
                             "pass --resume latest to continue it or a new --output_path")

    # --- models: frozen SD, tokenizer with the placeholder tokens --------------------------------------
    weights = os.path.join(cfg.pretrained_model_path, cfg.pretrained_model_file or "") \
        if cfg.pretrained_model_path else None
    sd = StableDiffusion.load(cfg.version, weights, cfg.model_config, cfg.dtype, clip_skip=cfg.clip_skip,
                             use_ema=cfg.extract_ema)
    placeholder_ids = sd.add_placeholder(cfg.placeholder_token, np.zeros((cfg.num_vectors, sd.embedding_dim)))
    # after adding the placeholder, so that an initializer naming it is refused
    init_ids = initializer_ids(sd.tokenizer, cfg.initializer_token) if cfg.initializer_token else None
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight.asnumpy()
    vectors = init_vectors(table, init_ids, cfg.num_vectors, seed=cfg.seed)
    sd.set_placeholder_vectors(placeholder_ids, vectors)
    logger.info("placeholder %s -> token ids %s, initialised from %r",
                cfg.placeholder_token, placeholder_ids, cfg.initializer_token or "random (std 0.01)")

    # --- data ----------------------------------------------------------------------------------------
    placeholder_string = " ".join(placeholder_names(cfg.placeholder_token, cfg.num_vectors))
    dataset = TextualInversionDataset.from_config(cfg, placeholder_string)
    check_captions_fit(sd.tokenizer, dataset.templates, placeholder_string, cfg.num_vectors)
    batches = BatchIterator(dataset, cfg.train_batch_size, cfg.seed, rank, world)
    use_cache = cfg.latent_cache == "true" or (cfg.latent_cache == "auto" and dataset.is_augmentation_finite)
    cache = None
    if use_cache:
        # Each distinct augmented image is VAE-encoded once; every step then samples its cached posterior.
        posts = [sd.encode_images(dataset.render_variant(i, flip)[None]) for i, flip in dataset.variants()]
        cache = tuple(np.concatenate(p) for p in zip(*posts))
        logger.info("latent cache: %d variants encoded once", len(posts))

    max_steps = cfg.max_steps or cfg.epochs * math.ceil(batches.steps_per_epoch / cfg.gradient_accumulation_steps)
    lr_scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1
    lr_kwargs = dict(start=cfg.start_learning_rate * lr_scale, end=cfg.end_learning_rate, scheduler=cfg.scheduler,
                     warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps or max(max_steps - cfg.warmup_steps, 1),
                     milestones=cfg.milestones, decay_rate=cfg.decay_rate)

    # --- train step: loss and gradient w.r.t. the vectors only --------------------------------------
    loss_net = TextualInversionLoss(sd.unet, sd.text_encoder, sd.alphas_cumprod, sd.config.parameterization)
    grad_fn = ms.value_and_grad(loss_net, grad_position=0)
    reduce_mean = AllReduceMean(world) if world > 1 else None
    optimizer = Adam(vectors.shape, tuple(cfg.betas), cfg.weight_decay, decoupled=cfg.optim == "adamw")
    # fp32 needs no loss scaling: a fixed scale of 1
    fp32 = cfg.dtype == "fp32"
    loss_scale = DynamicLossScale(1.0 if fp32 else cfg.init_loss_scale, 1.0 if fp32 else cfg.loss_scale_factor,
                                  cfg.scale_window)
    rng = np.random.default_rng([cfg.seed, 2])
    step = 0
    if cfg.resume:
        path, state, meta = load_resume_state(cfg.resume, cfg.output_path)
        if meta["placeholder"] != cfg.placeholder_token or state["vectors"].shape != vectors.shape:
            raise ValueError(f"--resume {path} trained {meta['placeholder']} with vectors "
                             f"{state['vectors'].shape}; this run is {cfg.placeholder_token} {vectors.shape}")
        vectors = state["vectors"].astype(np.float32)
        optimizer.load_state_dict({"m": state["m"], "v": state["v"], "t": meta["adam_t"]})
        loss_scale.load_state_dict(meta["loss_scale"])
        rng.bit_generator.state = meta["rng"]
        batches.load_state_dict(meta["data"])
        step = meta["step"]
        logger.info("resumed from %s at step %d", path, step)

    def micro_batch():
        """This rank's slice of the next global micro-batch: latents, ids, noise, timesteps (numpy)."""
        examples = batches.next_examples()
        gb, b = cfg.train_batch_size * world, cfg.train_batch_size
        if cache is not None:
            idx = [dataset.variant_index(e) for e in examples]
            mean, logvar = cache[0][idx], cache[1][idx]
        else:
            mean, logvar = sd.encode_images(np.stack([dataset.render(e) for e in examples]))
        # global draws sliced by rank: identical to a single process with the whole global batch
        shape = (gb,) + mean.shape[1:]
        sl = slice(rank * b, (rank + 1) * b)
        eps = rng.standard_normal(shape, dtype=np.float32)[sl]
        noise = rng.standard_normal(shape, dtype=np.float32)[sl]
        timesteps = rng.integers(0, sd.config.timesteps, size=gb).astype(np.int32)[sl]
        latents = (mean + np.exp(0.5 * logvar) * eps) * sd.config.scale_factor
        return latents, sd.token_ids([e.caption for e in examples]), noise, timesteps

    def save_embedding(at_step):
        path = os.path.join(weights_dir, f"SDv{cfg.version}_textual_inversion_{at_step}_ti.ckpt")
        save_ti_ckpt(path, vectors, cfg.placeholder_token, cfg.version)
        save_state(os.path.join(cfg.output_path, "state", f"train_state_{at_step:07d}.npz"),
                   vectors, optimizer, loss_scale, at_step, rng, batches, cfg.placeholder_token)
        return path

    def validate(at_step):
        sd.set_placeholder_vectors(placeholder_ids, vectors)
        n, size = cfg.num_validation_images, cfg.image_size
        latents = initial_latents(cfg.seed, n, size, size, factor=sd.latent_factor)
        images = sd.sample([cfg.validation_prompt] * n, latents)
        path = os.path.join(cfg.output_path, "validation", f"step_{at_step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path) as tmp:
            Image.fromarray(image_grid(images)).save(tmp, format="PNG")
        # the first image as an A1111 embedding card: the embedding inside, loadable by A1111 and by us
        card = os.path.join(weights_dir, f"SDv{cfg.version}_textual_inversion_{at_step}_ti.png")
        save_png_card(card, images[0], cfg.placeholder_token, vectors, at_step, sd.name)

    # Ctrl-C / SIGTERM: finish the current step, save a resumable state, exit.
    stop = {}
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: stop.setdefault("signal", signum))

    if is_main:
        os.makedirs(os.path.join(cfg.output_path, "state"), exist_ok=True)
        os.makedirs(weights_dir, exist_ok=True)
        save_resolved(cfg, os.path.join(cfg.output_path, "train_config_resolved.yaml"))
        log_path = os.path.join(cfg.output_path, "loss_log.csv")
        new_log = not (cfg.resume and os.path.exists(log_path))
        log_file = open(log_path, "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "loss", "lr", "loss_scale", "seconds"])
    logger.info("training %d vectors of %s for %d steps (batch %d x %d accumulation x %d devices, mode %d)",
                cfg.num_vectors, cfg.placeholder_token, max_steps, cfg.train_batch_size,
                cfg.gradient_accumulation_steps, world, cfg.mode)

    # --- loop ----------------------------------------------------------------------------------------
    last_saved = None
    with tqdm(total=max_steps, initial=step, disable=not is_main, dynamic_ncols=True) as bar:
        while step < max_steps:
            t0 = time.time()
            lr = learning_rate(step, **lr_kwargs)
            grad = np.zeros_like(vectors)
            loss = 0.0
            for _ in range(cfg.gradient_accumulation_steps):
                latents, ids, noise, timesteps = micro_batch()
                value, g = grad_fn(Tensor(vectors), Tensor(latents), Tensor(ids), Tensor(noise), Tensor(timesteps),
                                   Tensor(loss_scale.scale, ms.float32))
                # the gradient first: on CPU, waiting on the loss (ready halfway through the graph) makes
                # the rest of the step ~2x slower (docs/performance.md)
                grad += g.asnumpy() / loss_scale.scale / cfg.gradient_accumulation_steps
                loss += float(value.asnumpy()) / loss_scale.scale / cfg.gradient_accumulation_steps
            if world > 1:
                grad = reduce_mean(Tensor(grad)).asnumpy()
                loss = float(reduce_mean(Tensor(np.float32(loss))).asnumpy())
            finite = bool(np.isfinite(grad).all() and np.isfinite(loss))
            if fp32 and not finite:
                raise FloatingPointError(f"the loss ({loss}) or its gradient is not finite at step {step + 1}; last good "
                                         f"embedding: {last_saved}. Lower start_learning_rate or enable clip_grad")
            if loss_scale.update(finite):
                if cfg.clip_grad:
                    grad, _ = clip_grad_norm(grad, cfg.max_grad_norm)
                vectors = optimizer.step(vectors, grad, lr)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if is_main:
                log.writerow([step, f"{loss:.6f}", f"{lr:.6e}", loss_scale.scale, f"{time.time() - t0:.3f}"])
                log_file.flush()
                if step % cfg.ckpt_save_interval == 0 or step == max_steps or stop:
                    last_saved = save_embedding(step)
                if cfg.validation_prompt and step % cfg.validation_steps == 0:
                    validate(step)
            if stop:
                logger.warning("stopped by signal %d at step %d; resume with --resume latest", stop["signal"], step)
                return 128 + stop["signal"]

    if is_main:
        log_file.close()
        with open(log_path) as f:
            rows = list(csv.DictReader(f))
        save_loss_curve(os.path.join(cfg.output_path, "loss.png"),
                        [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        logger.info("saved %s", last_saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
