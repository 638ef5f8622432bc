"""Train Textual Inversion embeddings for a frozen Stable Diffusion.

    python train_textual_inversion.py --train_config configs/train/train_config_textual_inversion_v1.yaml

Reads top to bottom: `main` -> `train`, the loop -> the `Trainer`'s steps in the order the loop calls
them (set-up, restore, one optimisation step, log/save/validate, finish) -> the helpers they use.
Only the N placeholder vectors (`[N, D]`) are trained; every model weight stays frozen and gets
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
import shutil
import signal
import sys
import time
import zipfile

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from tqdm import tqdm

from data.dataset import BatchIterator, TextualInversionDataset
from ldm.checkpoint_io import atomic_write
from ldm.embeddings import save_a1111_safetensors, save_png_card, save_ti_ckpt
from ldm.errors import USER_ERRORS, UserInputError
from ldm.pipeline import StableDiffusion, image_grid, initial_latents
from ldm.scoring import best_row, make_scorer, read_metrics, score_row, training_images, write_metrics
from ldm.tokenizer import initializer_ids, init_vectors, placeholder_names
from ldm.training.config import ConfigError, parse_train_config, save_resolved
from ldm.training.figures import save_captioned_grid, save_loss_curve, save_score_plot
from ldm.training.loss import TextualInversionLoss
from ldm.training.optim import Adam, DynamicLossScale, clip_grad_norm, learning_rate

logger = logging.getLogger("train_textual_inversion")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_COLUMNS = ["step", "loss", "lr", "loss_scale", "seconds"]


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
    """Set up, restore, then optimisation steps, each logged, saved and validated at its interval; the exit code."""
    trainer = Trainer(cfg)
    if cfg.resume:
        trainer.restore(cfg.resume)
    if trainer.is_main:
        trainer.start_outputs()
    logger.info("training %d vectors of %s for %d steps (batch %d x %d accumulation x %d devices, mode %d)",
                cfg.num_vectors, cfg.placeholder_token, trainer.max_steps, cfg.train_batch_size,
                cfg.gradient_accumulation_steps, trainer.world, cfg.mode)
    stop = StopSignal()
    with tqdm(total=trainer.max_steps, initial=trainer.step, disable=not trainer.is_main, dynamic_ncols=True) as bar:
        while trainer.step < trainer.max_steps:
            t0 = time.time()
            loss, lr = trainer.optimisation_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            # read once: a signal arriving later in this step must not skip the save of the step it ends
            signum = stop.signum
            if trainer.is_main:
                trainer.log_save_validate(loss, lr, time.time() - t0, stopping=signum is not None)
            if signum is not None:
                logger.warning("stopped by signal %d at step %d; resume with --resume latest", signum, trainer.step)
                return 128 + signum
    if trainer.is_main:
        trainer.finish()
    return 0


class StopSignal:
    """Ctrl-C / SIGTERM record their signal instead of interrupting: the loop saves a resumable state and stops."""

    def __init__(self):
        self.signum = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.catch)

    def catch(self, signum, _frame):
        if self.signum is None:
            self.signum = signum


class Trainer:
    """A run's state from step to step; its methods are the steps `train()` takes, in order."""

    def __init__(self, cfg):
        """Set-up: runtime, the frozen SD with the placeholder vectors, data, loss, optimizer and LR schedule."""
        self.cfg = cfg
        self.rank, self.world = init_runtime(cfg)
        self.is_main = self.rank == 0
        self.weights_dir = os.path.join(cfg.output_path, "weights")
        self.log_path = os.path.join(cfg.output_path, "loss_log.csv")
        self.metrics_path = os.path.join(cfg.output_path, "metrics.csv")
        if self.is_main:
            check_output_path(cfg)
        self.sd, self.placeholder_ids, self.vectors = load_models(cfg)
        self.dataset, self.batches, self.cache = load_data(cfg, self.sd, self.rank, self.world)
        self.scorer = load_scorer(cfg, self.dataset) if self.is_main else None
        self.metrics = {}  # step -> metrics.csv row

        steps_per_epoch = math.ceil(self.batches.steps_per_epoch / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        lr_scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.world if cfg.scale_lr else 1
        decay_steps = cfg.decay_steps or max(self.max_steps - cfg.warmup_steps, 1)
        self.lr_kwargs = dict(start=cfg.start_learning_rate * lr_scale, end=cfg.end_learning_rate,
                              scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps, decay_steps=decay_steps,
                              milestones=cfg.milestones, decay_rate=cfg.decay_rate)

        # loss and gradient w.r.t. the vectors only
        loss_net = TextualInversionLoss(self.sd.unet, self.sd.conditioner, self.sd.alphas_cumprod,
                                        self.sd.config.parameterization)
        self.grad_fn = ms.value_and_grad(loss_net, grad_position=0)
        self.reduce_mean = AllReduceMean(self.world) if self.world > 1 else None
        self.optimizer = Adam(self.vectors.shape, tuple(cfg.betas), cfg.weight_decay, decoupled=cfg.optim == "adamw")
        # fp32 needs no loss scaling: a fixed scale of 1
        self.fp32 = cfg.dtype == "fp32"
        self.loss_scale = DynamicLossScale(1.0 if self.fp32 else cfg.init_loss_scale,
                                           1.0 if self.fp32 else cfg.loss_scale_factor, cfg.scale_window)
        self.rng = np.random.default_rng([cfg.seed, 2])
        self.step = 0
        self.last_saved = None

    def restore(self, resume):
        """Continue a run where its state was saved: vectors, Adam moments, loss scale, RNG and data position."""
        cfg = self.cfg
        path, state, meta = load_resume_state(resume, cfg.output_path)
        if meta["placeholder"] != cfg.placeholder_token or state["vectors"].shape != self.vectors.shape:
            raise ConfigError(f"--resume {path} trained {meta['placeholder']} with vectors "
                              f"{state['vectors'].shape}; this run is {cfg.placeholder_token} {self.vectors.shape}")
        # states written before clip_skip was recorded say nothing of it
        trained_skip = meta.get("clip_skip", cfg.clip_skip)
        if trained_skip != cfg.clip_skip:
            raise ConfigError(f"--resume {path} trained with clip_skip {trained_skip}, this run has clip_skip "
                              f"{cfg.clip_skip}; pass --clip_skip {trained_skip} to continue it")
        self.vectors = state["vectors"].astype(np.float32)
        self.optimizer.load_state_dict({"m": state["m"], "v": state["v"], "t": meta["adam_t"]})
        self.loss_scale.load_state_dict(meta["loss_scale"])
        self.rng.bit_generator.state = meta["rng"]
        self.batches.load_state_dict(meta["data"])
        self.step = meta["step"]
        logger.info("resumed from %s at step %d", path, self.step)

    def start_outputs(self):
        """Output folders, the resolved config, and the loss log's header (a resumed run appends to its log and
        reads back the scores so far)."""
        cfg = self.cfg
        os.makedirs(os.path.join(cfg.output_path, "state"), exist_ok=True)
        os.makedirs(self.weights_dir, exist_ok=True)
        save_resolved(cfg, os.path.join(cfg.output_path, "train_config_resolved.yaml"))
        if not (cfg.resume and os.path.exists(self.log_path)):
            with open(self.log_path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
        if self.scorer and cfg.resume and os.path.exists(self.metrics_path):
            # a run resumed from an older state scores the later steps again
            self.metrics = {s: row for s, row in read_metrics(self.metrics_path).items() if s <= self.step}
        if self.sd.is_xl:
            logger.info("each save also writes a clip_l/clip_g .safetensors (A1111, ComfyUI, kohya); A1111 names an "
                        "embedding after its file, so rename it to %s.safetensors to prompt with that word",
                        cfg.placeholder_token)

    def micro_batch(self):
        """This rank's slice of the next global micro-batch: latents, ids, noise, timesteps, SDXL's size ids
        (None for SD 1.x/2.x), as numpy arrays."""
        cfg, sd, dataset = self.cfg, self.sd, self.dataset
        examples = self.batches.next_examples()
        gb, b = cfg.train_batch_size * self.world, cfg.train_batch_size
        if self.cache is not None:
            idx = [dataset.variant_index(e) for e in examples]
            mean, logvar = self.cache[0][idx], self.cache[1][idx]
        else:
            mean, logvar = sd.encode_images(np.stack([dataset.render(e) for e in examples]))
        # global draws sliced by rank: identical to a single process with the whole global batch
        shape = (gb,) + mean.shape[1:]
        sl = slice(self.rank * b, (self.rank + 1) * b)
        eps = self.rng.standard_normal(shape, dtype=np.float32)[sl]
        noise = self.rng.standard_normal(shape, dtype=np.float32)[sl]
        timesteps = self.rng.integers(0, sd.config.timesteps, size=gb).astype(np.int32)[sl]
        latents = (mean + np.exp(0.5 * logvar) * eps) * sd.config.scale_factor
        size_ids = np.stack([dataset.size_ids(e) for e in examples]) if sd.is_xl else None
        return latents, sd.token_ids([e.caption for e in examples]), noise, timesteps, size_ids

    def optimisation_step(self):
        """One optimizer step on the gradient accumulated over the micro-batches (and ranks); `(loss, lr)`."""
        accumulation, scale = self.cfg.gradient_accumulation_steps, self.loss_scale.scale
        lr = learning_rate(self.step, **self.lr_kwargs)
        grad = np.zeros_like(self.vectors)
        loss = 0.0
        for _ in range(accumulation):
            latents, ids, noise, timesteps, size_ids = self.micro_batch()
            value, g = self.grad_fn(Tensor(self.vectors), Tensor(latents), Tensor(ids), Tensor(noise),
                                    Tensor(timesteps), Tensor(scale, ms.float32),
                                    None if size_ids is None else Tensor(size_ids))
            # the gradient first: on CPU, waiting on the loss (ready halfway through the graph) makes
            # the rest of the step ~2x slower (docs/performance.md)
            grad += g.asnumpy() / scale / accumulation
            loss += float(value.asnumpy()) / scale / accumulation
        if self.world > 1:
            grad = self.reduce_mean(Tensor(grad)).asnumpy()
            loss = float(self.reduce_mean(Tensor(np.float32(loss))).asnumpy())
        finite = bool(np.isfinite(grad).all() and np.isfinite(loss))
        if self.fp32 and not finite:
            raise FloatingPointError(f"the loss ({loss}) or its gradient is not finite at step {self.step + 1}; "
                                     f"last good embedding: {self.last_saved}. Lower start_learning_rate or enable "
                                     "clip_grad")
        if self.loss_scale.update(finite):
            if self.cfg.clip_grad:
                grad, _ = clip_grad_norm(grad, self.cfg.max_grad_norm)
            self.vectors = self.optimizer.step(self.vectors, grad, lr)
        self.step += 1
        return loss, lr

    def log_save_validate(self, loss, lr, seconds, stopping):
        """The step's loss-log row, embedding and state, validation images: each at its interval, and the
        row and the save also at the last step of the run (the end, or a stop signal)."""
        cfg, step = self.cfg, self.step
        last = step == self.max_steps or stopping
        validating = cfg.validation_prompt and step % cfg.validation_steps == 0
        if step % cfg.log_interval == 0 or last:
            with open(self.log_path, "a", newline="") as f:
                csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.6e}", self.loss_scale.scale, f"{seconds:.3f}"])
        # a scored embedding is saved, so that best_ti.ckpt can be a copy of it
        if step % cfg.ckpt_save_interval == 0 or last or (validating and self.scorer):
            self.last_saved = self.save()
        if validating:
            self.validate()

    def save(self):
        """The embedding (what users load; SDXL's also as A1111/kohya's `clip_l`/`clip_g` .safetensors) and the
        resumable train state at this step; the embedding's path."""
        cfg = self.cfg
        stem = os.path.join(self.weights_dir, f"{run_name(cfg.version)}_textual_inversion_{self.step}")
        sets = self.sd.vector_sets(self.vectors)
        vectors_2 = sets[1] if self.sd.is_xl else None
        save_ti_ckpt(stem + "_ti.ckpt", sets[0], cfg.placeholder_token, cfg.version, vectors_2=vectors_2)
        if self.sd.is_xl:
            save_a1111_safetensors(stem + ".safetensors", None, *sets)
        save_state(os.path.join(cfg.output_path, "state", f"train_state_{self.step:07d}.npz"), self.vectors,
                   self.optimizer, self.loss_scale, self.step, self.rng, self.batches, cfg.placeholder_token,
                   cfg.clip_skip)
        return stem + "_ti.ckpt"

    def validate(self):
        """Sample the validation prompt with the current vectors, and with a scorer the edited prompts from the same
        seeds: a grid captioned with step and prompts (a row each), and the scores (`keep_best`)."""
        cfg, sd = self.cfg, self.sd
        sd.set_placeholder_vectors(self.placeholder_ids, self.vectors)
        n, size = cfg.num_validation_images, cfg.image_size
        latents = initial_latents(cfg.seed, n, size, size, factor=sd.latent_factor)
        prompts = [cfg.validation_prompt] + (cfg.edit_prompts() if self.scorer else [])
        samples = [sd.sample([prompt] * n, latents) for prompt in prompts]
        path = os.path.join(cfg.output_path, "validation", f"step_{self.step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid = image_grid(np.concatenate(samples), cols=n if self.scorer else None)
        save_captioned_grid(path, grid, [f"step {self.step}", *prompts])
        if not sd.is_xl:
            # the first image as an A1111 embedding card (A1111 trains no SDXL embeddings, so has no SDXL card)
            card = os.path.join(self.weights_dir, f"{run_name(cfg.version)}_textual_inversion_{self.step}_ti.png")
            save_png_card(card, samples[0][0], cfg.placeholder_token, self.vectors, self.step, sd.name)
        if self.scorer:
            self.keep_best(score_row(self.scorer, self.step, os.path.basename(self.last_saved), samples[0],
                                     dict(zip(prompts[1:], samples[1:]))))

    def keep_best(self, row):
        """The validation's scores as a metrics.csv row, and weights/best_ti.ckpt: a copy of the best embedding so
        far by the scorer's rule (ldm.scoring.best_row)."""
        self.metrics[self.step] = row
        write_metrics(self.metrics_path, self.metrics.values())
        best = best_row(self.metrics.values(), self.scorer.margin)
        with atomic_write(os.path.join(self.weights_dir, "best_ti.ckpt")) as tmp:
            shutil.copyfile(os.path.join(self.weights_dir, best["checkpoint"]), tmp)
        logger.info("step %d: concept %.3g, edit %.3g (%s); best so far: step %d", self.step, row["concept"],
                    row["edit"], self.scorer.name, best["step"])

    def finish(self):
        """The loss plot of the whole log (a resumed run's earlier rows included) and the scores' plot."""
        with open(self.log_path) as f:
            # a run resumed from an older state logs some steps again: the newer row counts
            rows = sorted({int(r["step"]): r for r in csv.DictReader(f)}.items())
        save_loss_curve(os.path.join(self.cfg.output_path, "loss.png"), [step for step, _ in rows],
                        [float(r["loss"]) for _, r in rows], [float(r["lr"]) for _, r in rows])
        logger.info("saved %s", self.last_saved)
        if self.metrics:
            best = best_row(self.metrics.values(), self.scorer.margin)
            save_score_plot(os.path.join(self.cfg.output_path, "scores.png"), self.metrics.values(), best,
                            self.scorer.name)
            logger.info("best by %s: step %d, copied to %s", self.scorer.name, best["step"],
                        os.path.join(self.weights_dir, "best_ti.ckpt"))


# ---------------------------------------------------------------------------------------------- set-up

def run_name(version):
    """The file-name prefix of a run's embeddings: mindone's `SDv1.5`, `SDv2.0`, ...; `SDXL`."""
    return "SDXL" if version == "xl" else f"SDv{version}"


def load_models(cfg):
    """The frozen SD with the placeholder tokens added, their ids, and the initial vectors `[N, D]`."""
    weights, keys = cfg.pretrained_model_path, "pretrained_model_path"
    if weights and cfg.pretrained_model_file:
        weights, keys = os.path.join(weights, cfg.pretrained_model_file), keys + " + pretrained_model_file"
    if weights and not os.path.exists(weights):
        raise ConfigError(f"{keys}: {weights} does not exist; name a weights file or diffusers folder, or leave "
                          "pretrained_model_path unset for models/ and the Hub")
    sd = StableDiffusion.load(cfg.version, weights, cfg.model_config, cfg.dtype, clip_skip=cfg.clip_skip,
                              use_ema=cfg.extract_ema)
    if cfg.recompute:
        sd.unet.enable_gradient_checkpointing()
    placeholder_ids = sd.add_placeholder(cfg.placeholder_token, np.zeros((cfg.num_vectors, sd.embedding_dim)))
    # after adding the placeholder, so that an initializer naming it is refused
    init_ids = initializer_ids(sd.tokenizer, cfg.initializer_token) if cfg.initializer_token else None
    # SDXL: each encoder's set from its own table, side by side (the conditioner's column order)
    vectors = np.concatenate([init_vectors(table, init_ids, cfg.num_vectors, seed=cfg.seed)
                              for table in sd.token_tables()], axis=1)
    sd.set_placeholder_vectors(placeholder_ids, vectors)
    logger.info("placeholder %s -> token ids %s, initialised from %r",
                cfg.placeholder_token, placeholder_ids, cfg.initializer_token or "random (std 0.01)")
    return sd, placeholder_ids, vectors


def load_data(cfg, sd, rank, world):
    """The dataset, this rank's batch iterator and the latent cache (None without one)."""
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
    return dataset, batches, cache


def load_scorer(cfg, dataset):
    """validation_metric's scorer of the training images (None for none or without validation); an edited prompt
    it cannot score is refused before training starts."""
    if cfg.validation_metric == "none" or not cfg.validation_prompt:
        return None
    scorer = make_scorer(cfg.validation_metric, training_images(dataset), cfg.placeholder_token)
    for prompt in cfg.edit_prompts():
        scorer.check_prompt(prompt)
    return scorer


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


def check_output_path(cfg):
    """A writable output_path that holds no embeddings of an earlier run, unless this run resumes it."""
    check_output_writable(cfg.output_path)
    earlier = glob.glob(os.path.join(cfg.output_path, "weights", "*_ti.ckpt"))
    if earlier and not cfg.resume:
        raise ConfigError(f"output_path {cfg.output_path} already holds {len(earlier)} embeddings of an earlier run; "
                          "pass --resume latest to continue it or a new --output_path")


def check_output_writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with atomic_write(os.path.join(path, ".write_test")) as tmp:
            open(tmp, "w").close()
        os.remove(os.path.join(path, ".write_test"))
    except OSError as err:
        raise ConfigError(f"output_path {path} is not writable ({err.strerror}); "
                          "pass a writable --output_path") from None


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


# ---------------------------------------------------------------------------------------------- train state

class DamagedStateError(UserInputError):
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


def save_state(path, vectors, optimizer, loss_scale, step, rng, batches, placeholder, clip_skip):
    meta = {"step": step, "loss_scale": loss_scale.state_dict(), "rng": rng.bit_generator.state,
            "data": batches.state_dict(), "adam_t": optimizer.t, "placeholder": placeholder, "clip_skip": clip_skip}
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, vectors=vectors, m=optimizer.m, v=optimizer.v, meta=json.dumps(meta))


if __name__ == "__main__":
    sys.exit(main())
