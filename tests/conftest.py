import contextlib
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# the process's CPUs before `_pin_worker`: for test subprocesses that must not share one worker's core
ALL_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _pin_worker():
    """An xdist worker runs on its own share of the CPUs. MindSpore runs a graph on two threads that keep
    polling for work, so two unpinned workers take time from each other's computing: two toy training runs at
    once took 7.0 and 8.8 s for 30 steps, pinned to a core each 4.9 and 5.5 s (2-core Xeon, 2026-12-08)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or ALL_CPUS is None:
        return
    index, count = int(worker[2:]), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    share = ALL_CPUS[index::count] or [ALL_CPUS[index % len(ALL_CPUS)]]
    os.sched_setaffinity(0, share)


_pin_worker()   # before MindSpore starts its threads, which inherit it

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

ms.set_device("CPU")

# pytest.ini runs the suite on two pytest-xdist workers, each taking whole groups. Most of a test's time is
# MindSpore compiling graphs, which uses one core, and a group's tests share what its worker compiled:
# a module's fixtures, and the training runs' graphs through `shared_graphs`. A module is a group, except
# those that train on the tiny SD1 fixture as test_train does, and test_reference_models, which runs
# test_text_to_image's pipelines.
GROUPS = {"test_evaluate_ti": "test_train", "test_editability_study": "test_train",
          "test_reference_models": "test_text_to_image"}
# The groups that take longest start first so that both workers finish at about the same time (`pytest
# --durations=0`, summed per group).
LONGEST_FIRST = ("test_toy_learning", "test_train", "test_sdxl_pipeline", "test_text_to_image", "test_parallel")


def _group(item):
    module = os.path.splitext(os.path.basename(item.nodeid.split("::")[0]))[0]
    return GROUPS.get(module, module)


@pytest.hookimpl(tryfirst=True)   # before xdist reads the marks
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))


def _mode(mode):
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    yield
    ms.set_context(mode=previous)


@pytest.fixture(scope="module")
def pynative_mode():
    """The module's tests run in PyNative mode; the previous mode is restored after them."""
    yield from _mode(ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def graph_mode():
    """The module's tests run in graph mode; the previous mode is restored after them."""
    yield from _mode(ms.GRAPH_MODE)


@pytest.fixture(scope="session")
def _loaded():
    """The session's models and training graphs behind `shared_graphs` (kept alive: the caches key on ids)."""
    return {"models": {}, "losses": {}, "grads": {}}


@pytest.fixture
def shared_graphs(_loaded, monkeypatch):
    """The test's `StableDiffusion.load` calls and training runs reuse the session's cells and compiled graphs
    (see `share_graphs`)."""
    share_graphs(_loaded, monkeypatch)


@contextlib.contextmanager
def session_graphs(loaded):
    """`shared_graphs` for a module fixture, while it builds (`loaded`: the `_loaded` fixture)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        share_graphs(loaded, monkeypatch)
        yield


def fresh_copy(base):
    """A StableDiffusion on `base`'s cells and compiled graphs, with its own tokenizer copies and no placeholders,
    as a real load gives."""
    from ldm.pipeline import StableDiffusion

    sd = StableDiffusion(base.config, base.unet, base.vae, base.text_encoder, copy.deepcopy(base.tokenizer),
                         name=base.name, scheduler_settings=base.scheduler_settings,
                         text_encoder_2=base.text_encoders[1] if base.is_xl else None,
                         tokenizer_2=copy.deepcopy(base.tokenizers[1]) if base.is_xl else None,
                         force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt)
    # the graph-mode entry cells too (stateless: the vectors are an input), with their compiled graphs
    sd.conditioner, sd._encode, sd._decode = base.conditioner, base._encode, base._decode
    return sd


def share_graphs(loaded, monkeypatch):
    """Makes `StableDiffusion.load` and the trainer's loss and gradient reuse the session's cells and graphs.

    MindSpore compiles a graph per cell and per `value_and_grad` call (tens of seconds each for the tiny UNets),
    so every train_textual_inversion.main() run would compile the same training graph again. Here each load with
    the same arguments gets the cells of the session's first such load, wrapped in a fresh StableDiffusion with
    its own tokenizer copy and no placeholders, as a real load gives; the trainer's loss over the same cells is
    one cell, and its gradient one compiled function. Weights are frozen and the placeholder vectors are the loss's
    input, so a run computes what it would on freshly loaded cells.
    """
    import train_textual_inversion
    from ldm.modules.openaimodel import UNetModel
    from ldm.pipeline import StableDiffusion

    real_load, real_loss, real_value_and_grad = StableDiffusion.load, train_textual_inversion.TextualInversionLoss, \
        ms.value_and_grad
    models, losses, grads = loaded["models"], loaded["losses"], loaded["grads"]

    def load(version, weights=None, model_config=None, dtype="fp32", clip_skip=1, use_ema=False):
        # one key for a folder named with or without a trailing separator
        key = (version, weights and os.path.normpath(weights), model_config, dtype, clip_skip, use_ema)
        if key not in models:
            models[key] = real_load(version, weights, model_config, dtype, clip_skip, use_ema)
        return fresh_copy(models[key])

    def loss(unet, conditioner, alphas_cumprod, parameterization):
        key = (id(unet), tuple(id(te) for te in conditioner.text_encoders), parameterization,
               alphas_cumprod.tobytes())
        if key not in losses:
            losses[key] = real_loss(unet, conditioner, alphas_cumprod, parameterization)
        return losses[key]

    def value_and_grad(fn, grad_position=0, *args, **kwargs):
        if args or kwargs or not any(fn is cell for cell in losses.values()):
            return real_value_and_grad(fn, grad_position, *args, **kwargs)
        key = (id(fn), grad_position)
        if key not in grads:
            grads[key] = real_value_and_grad(fn, grad_position)
        return grads[key]

    def no_recompute(self):
        raise AssertionError("recompute would change the session's shared UNet: test it on a model of its own")

    monkeypatch.setattr(StableDiffusion, "load", load)
    monkeypatch.setattr(train_textual_inversion, "TextualInversionLoss", loss)
    monkeypatch.setattr(ms, "value_and_grad", value_and_grad)
    monkeypatch.setattr(UNetModel, "enable_gradient_checkpointing", no_recompute)


# The tiny demo model's YAML cut to one UNet level, a VAE that halves and a 1-layer CLIP: its training graph
# compiles in well under half the tiny SD1 fixture's time (docs/development.md)
MICRO_SD1 = {"unet_config": dict(model_channels=8, attention_resolutions=[1], channel_mult=[1], num_head_channels=4,
                                 context_dim=8, norm_num_groups=4),
             "first_stage_config": dict(ch=8, ch_mult=[1, 1], resolution=32, norm_num_groups=4),
             "cond_stage_config": dict(width=8, layers=1, heads=2, intermediate_size=16)}


@pytest.fixture(scope="session")
def micro_sd1(tmp_path_factory):
    """`(weights, model YAML)` of a micro SD1 with random weights (no zeros), written as an original single
    file: for tests of mechanics that compile graphs of their own (msrun's workers, recompute)."""
    import numpy as np
    import yaml

    from ldm.checkpoint_io import save_safetensors
    from ldm.convert import OPENAI_PREFIX, ORIGINAL_PREFIXES
    from ldm.models import build_models, load_model_config

    folder = tmp_path_factory.mktemp("micro-sd1")
    with open(os.path.join(ROOT, "configs", "tiny-inference.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    for section, values in MICRO_SD1.items():
        params = config["model"]["params"][section]["params"]
        (params["ddconfig"] if section == "first_stage_config" else params).update(values)
    config_path = str(folder / "micro-sd1.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    rng = np.random.default_rng(0)
    state = {}
    for prefix, cell in zip((ORIGINAL_PREFIXES["unet"], ORIGINAL_PREFIXES["vae"], OPENAI_PREFIX),
                            build_models(load_model_config(config_path))):
        # zero-initialised output layers would leave the loss blind to the text
        state.update({prefix + name: value if value.any() else rng.normal(0, 0.1, value.shape).astype(np.float32)
                      for name, value in file_layout(cell).items()})
    weights = str(folder / "micro-sd1.safetensors")
    save_safetensors(state, weights)
    return weights, config_path


def file_layout(cell):
    """`{name: ndarray}` of `cell`'s parameters as checkpoints store them: conv weights `[out, in, k, k]`, also
    those the CPU path keeps as `[out, in*k*k]` (`ldm.modules.layers.Conv2d`)."""
    from ldm.modules.layers import Conv2d

    kernels = {name: c.kernel_size for name, c in cell.cells_and_names() if isinstance(c, Conv2d)}
    state = {}
    for name, param in cell.parameters_and_names():
        value, (owner, _, leaf) = param.asnumpy(), name.rpartition(".")
        if owner in kernels and leaf == "weight" and value.ndim == 2:
            value = value.reshape(value.shape[0], -1, kernels[owner], kernels[owner])
        state[name] = value
    return state
