"""Sampling end to end: our pipeline against diffusers' StableDiffusionPipeline, and the text_to_image CLI.

References (tests/fixtures/pipelines.npz, tools/dev/make_pipeline_fixtures.py) are diffusers' decoded images
from the same initial latents, prompt, negative prompt and guidance scale, each scheduler made `from_config`
of the model folder's scheduler_config.json; every sampler must reproduce them to 1/255 in graph mode, for
an eps (tiny-sd1) and a v-prediction (tiny-sd2-v) model.

Graph mode compiles once per cell and input shape, so everything here samples the same batch of 2 at the
same size, and the CLI runs reuse the cells loaded once per model (see `cli`).
"""

import logging
import os

import numpy as np
import pytest
from PIL import Image

import text_to_image
from ldm.embeddings import load_embedding, save_a1111_safetensors, save_diffusers, save_ti_ckpt
from ldm.errors import UserInputError
from ldm.pipeline import StableDiffusion, initial_latents
from tests.conftest import fresh_copy

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY_SD1 = os.path.join(FIXTURES, "tiny-sd1")
TINY_SD2_V = os.path.join(FIXTURES, "tiny-sd2-v")
TINY_EMBEDDINGS = os.path.join(FIXTURES, "tiny-embeddings")
VERSIONS = {TINY_SD1: "1.5", TINY_SD2_V: "2.1-v"}
SAMPLERS = ("ddim", "plms", "dpm_solver", "uni_pc")
SIZE = 32  # pixels; the tiny VAEs downsample by 2, so 16x16 latents
N = 2
# the real loader, bound before the `cli` fixture replaces StableDiffusion.load
LOAD = StableDiffusion.load


pytestmark = pytest.mark.usefixtures("graph_mode")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURES, "pipelines.npz")))


# Model folder -> StableDiffusion, loaded once per worker through the real `StableDiffusion.load`.
# test_reference_models checks these cells against diffusers' outputs at the shapes sampled here (it is in
# this group), so the UNet and VAE graphs compile once for both modules.
_PIPELINES = {}


def pipeline(path):
    if path not in _PIPELINES:
        _PIPELINES[path] = LOAD(VERSIONS[path], path)
    return _PIPELINES[path]


@pytest.fixture
def cli(monkeypatch):
    """text_to_image.main, with `StableDiffusion.load` handing out the module's already compiled cells.

    Each call still gets its own StableDiffusion with a fresh tokenizer and no placeholders, as a real
    load gives (`fresh_copy`); the loads are recorded as `(args, instance)` so tests can inspect what main() built.
    """
    loads = []

    def load(version, weights=None, model_config=None, dtype="fp32", clip_skip=1, use_ema=False):
        assert clip_skip == 1, "the shared text encoder is compiled without clip skip"
        sd = fresh_copy(pipeline(weights))
        loads.append(((version, weights, model_config, dtype, use_ema), sd))
        return sd

    monkeypatch.setattr(StableDiffusion, "load", load)

    def run(*argv):
        return text_to_image.main(list(argv))

    run.loads = loads
    return run


def _max_diff(a, b):
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("path", [TINY_SD1, TINY_SD2_V], ids=["eps", "v"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_matches_diffusers(ref, path, sampler):
    sd = pipeline(path)
    key = f"{os.path.basename(path)}.{sampler}"
    latents = initial_latents(int(ref["seed"]), N, SIZE, SIZE, factor=sd.latent_factor)
    images, z = sd.sample([str(ref["prompt"])] * N, latents, sampler=sampler, steps=int(ref["steps"]),
                          scale=float(ref[f"{os.path.basename(path)}.scale"]),
                          negative_prompt=str(ref["negative_prompt"]), return_latents=True)
    assert images.shape == ref[f"{key}.images"].shape == (N, SIZE, SIZE, 3)
    np.testing.assert_allclose(z, ref[f"{key}.latents"], atol=1e-3)
    assert _max_diff(images, ref[f"{key}.images"]) <= 1


def _parameters(path):
    with Image.open(path) as image:
        return image.size, image.text["parameters"]


def test_cli_writes_numbered_samples_matching_diffusers_then_continues_with_an_embedding(cli, ref, tmp_path):
    out = tmp_path / "out"
    prompt, negative = str(ref["prompt"]), str(ref["negative_prompt"])
    common = ["--ckpt_path", TINY_SD1, "--version", "1.5", "--H", str(SIZE), "--W", str(SIZE), "--sampling_steps",
              str(ref["steps"]), "--n_samples", str(N), "--output_path", str(out), "--negative_prompt", negative]
    assert cli(*common, "--prompt", prompt) == 0
    assert cli.loads[0][0] == ("1.5", TINY_SD1, None, "fp32", False)
    samples = out / "samples"
    assert sorted(os.listdir(samples)) == ["00000.png", "00001.png"]
    assert sorted(os.listdir(out)) == ["grid-0000.png", "samples"]
    first = {name: (samples / name).read_bytes() for name in os.listdir(samples)}
    # the CLI's defaults: DPM-Solver++, seed 42 and scale 7.5, the settings of the reference
    for b in range(N):
        size, parameters = _parameters(samples / f"0000{b}.png")
        assert size == (SIZE, SIZE)
        assert parameters == (
            f"{prompt}\nNegative prompt: {negative}\nSteps: {ref['steps']}, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, "
            f"Batch pos: {b}, Size: {SIZE}x{SIZE}, Model: tiny-sd1, Version: 1.5")
        assert _max_diff(np.asarray(Image.open(samples / f"0000{b}.png")), ref["tiny-sd1.dpm_solver.images"][b]) <= 1
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (N * SIZE, SIZE)

    bin_path = os.path.join(TINY_EMBEDDINGS, "learned_embeds.bin")
    assert cli(*common, "--prompt", str(ref["ti_prompt"]), "--seed", str(ref["ti_seed"]), f"--{ref['ti_sampler']}",
               "--ti_ckpt_path", bin_path) == 0
    assert sorted(os.listdir(samples)) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert all((samples / name).read_bytes() == data for name, data in first.items())
    assert sorted(os.listdir(out)) == ["grid-0000.png", "grid-0001.png", "samples"]
    for b in range(N):
        _, parameters = _parameters(samples / f"0000{2 + b}.png")
        assert parameters.endswith(f"Seed: {ref['ti_seed']}, Batch pos: {b}, Size: {SIZE}x{SIZE}, Model: tiny-sd1, "
                                   "Version: 1.5, Embeddings: <tiny-toy> (2 vectors, learned_embeds.bin)")
        assert _max_diff(np.asarray(Image.open(samples / f"0000{2 + b}.png")), ref["ti.images"][b]) <= 1


def test_every_embedding_format_changes_the_encoding_from_its_token_on(cli, ref, tmp_path):
    dim = 6
    rng = np.random.default_rng(11)
    ours, diffusers_st, a1111_st = (rng.standard_normal((k, dim), dtype=np.float32) for k in (1, 3, 2))
    save_ti_ckpt(str(tmp_path / "ours_ti.ckpt"), ours, "<ours>", "1.5")
    save_diffusers(str(tmp_path / "learned_embeds.safetensors"), "<diffusers-st>", diffusers_st)
    save_a1111_safetensors(str(tmp_path / "kohya-style.safetensors"), "kohya-style", a1111_st)
    files = {  # path -> (the token it gets, its vectors, its format)
        str(tmp_path / "ours_ti.ckpt"): ("<ours>", ours, "ti_ckpt"),
        str(tmp_path / "learned_embeds.safetensors"): ("<diffusers-st>", diffusers_st, "diffusers"),
        os.path.join(TINY_EMBEDDINGS, "learned_embeds.bin"): ("<tiny-toy>", ref["ti.vectors"], "diffusers"),
        # A1111 names an embedding after its file
        os.path.join(TINY_EMBEDDINGS, "tiny-toy.pt"): ("tiny-toy", ref["ti.vectors"], "a1111"),
        str(tmp_path / "kohya-style.safetensors"): ("kohya-style", a1111_st, "a1111"),
    }
    assert {path: load_embedding(path).source_format for path in files} == {p: f[2] for p, f in files.items()}
    argv = [arg for path in files for arg in ("--ti_ckpt_path", path)]
    assert cli("--ckpt_path", TINY_SD1, "--prompt", "a photo", "--H", str(SIZE), "--W", str(SIZE), "--n_samples",
               str(N), "--sampling_steps", "1", "--skip_save", "--skip_grid", "--output_path", str(tmp_path / "o"),
               *argv) == 0
    sd = cli.loads[-1][1]
    without = sd.encode_text(["a photo of on a table"] * N)[0].asnumpy()[0]
    for token, vectors, _ in files.values():
        names = sd.placeholders[token]
        assert len(names) == len(vectors)
        rows = np.asarray(sd.tokenizer.convert_tokens_to_ids(names)) - sd.vocab_size
        np.testing.assert_array_equal(sd.extra_embeddings[rows], vectors)
        ids = sd.token_ids([f"a photo of {token} on a table"])[0]
        assert list(ids[4:4 + len(names)]) == list(rows + sd.vocab_size), token
        with_token = sd.encode_text([f"a photo of {token} on a table"] * N)[0].asnumpy()[0]
        # causal attention: BOS "a photo of" cannot see the placeholder; everything after it does
        np.testing.assert_array_equal(with_token[:4], without[:4])
        assert (np.abs(with_token[4:] - without[4:]).max(axis=-1) > 0).all(), token


def _error(cli, capsys, *argv):
    """main()'s one-line message for exit code 2 (libraries may have written to stderr before it)."""
    assert cli(*argv) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


def _cli_args(path, tmp_path, *extra):
    return ["--ckpt_path", path, "--version", VERSIONS[path], "--H", str(SIZE), "--W", str(SIZE),
            "--sampling_steps", "1", "--n_samples", str(N), "--output_path", str(tmp_path), *extra]


def test_sd1_embedding_into_sd2_model_is_refused_by_width(cli, capsys, tmp_path):
    sd1 = str(tmp_path / "sd1.safetensors")
    save_diffusers(sd1, "<sd1>", np.ones((1, 768), np.float32))
    err = _error(cli, capsys, *_cli_args(TINY_SD2_V, tmp_path, "--prompt", "a <sd1>", "--ti_ckpt_path", sd1))
    assert err == f"error: {sd1} holds 768-d vectors (SD 1.x); this model's text encoder is 6-d"
    assert not (tmp_path / "samples").exists()


def test_sdxl_size_flags_are_refused_for_sd(cli, capsys, tmp_path):
    err = _error(cli, capsys, *_cli_args(TINY_SD1, tmp_path, "--prompt", "a cat", "--original_size", "64", "64",
                                          "--target_size", "32", "32"))
    assert err == "error: --original_size, --target_size: size conditioning is SDXL's; drop it or use --version xl"


def test_token_already_in_the_vocabulary_is_refused(cli, capsys, tmp_path):
    bin_path = os.path.join(TINY_EMBEDDINGS, "learned_embeds.bin")
    err = _error(cli, capsys, *_cli_args(TINY_SD1, tmp_path, "--prompt", "a cat", "--ti_ckpt_path", bin_path,
                                          "--ti_token", "cat"))
    assert "'cat' already exists in the tokenizer's vocabulary" in err


def test_file_of_no_embedding_format_is_refused(cli, capsys, tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("not an embedding")
    err = _error(cli, capsys, *_cli_args(TINY_SD1, tmp_path, "--prompt", "a cat", "--ti_ckpt_path", str(notes)))
    assert str(notes) in err


def test_missing_or_empty_prompt_file_is_refused(cli, capsys, tmp_path):
    missing = str(tmp_path / "missing.txt")
    err = _error(cli, capsys, *_cli_args(TINY_SD1, tmp_path, "--data_path", missing))
    assert err == f"error: --data_path {missing} does not exist; pass a text file with one prompt per line"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    err = _error(cli, capsys, *_cli_args(TINY_SD1, tmp_path, "--data_path", str(empty)))
    assert err == f"error: --data_path {empty} holds no prompts; write one prompt per line"
    assert not cli.loads


def test_only_user_input_errors_become_a_one_line_exit(monkeypatch, capsys, tmp_path):
    # a ValueError from our own code is a bug: it must reach the caller with its traceback, not exit 2
    def raising(error):
        def load(*args, **kwargs):
            raise error
        return load

    argv = ["--ckpt_path", TINY_SD1, "--prompt", "a cat", "--output_path", str(tmp_path)]
    monkeypatch.setattr(StableDiffusion, "load", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="^a bug$"):
        text_to_image.main(argv)
    monkeypatch.setattr(StableDiffusion, "load", raising(UserInputError("bad input")))
    assert _error(lambda *a: text_to_image.main(list(a)), capsys, *argv) == "error: bad input"


def test_long_prompt_is_truncated_with_a_warning(cli, caplog, tmp_path):
    prompt = " ".join(f"word{i}" for i in range(100))
    with caplog.at_level(logging.WARNING, logger="ldm.tokenizer"):
        assert cli(*_cli_args(TINY_SD1, tmp_path, "--prompt", prompt, "--skip_grid")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("longer than 77 tokens and was truncated" in w for w in warnings)
    assert "word99" in warnings[0]
    # the full prompt is still what the PNG records
    _, parameters = _parameters(tmp_path / "samples" / "00000.png")
    assert parameters.startswith(prompt + "\n")
