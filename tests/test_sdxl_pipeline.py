"""SDXL end to end on the tiny random SDXL of tests/fixtures (tools/dev/make_sdxl_fixtures.py): whole sampling
runs against diffusers' StableDiffusionXLPipeline, the training step's gradient for both vector sets, and a
training run whose embeddings load back into sampling."""

import os

import mindspore as ms
import numpy as np
import pytest

import text_to_image
import train_textual_inversion as T
from ldm.embeddings import EmbeddingError, check_fits, load_embedding
from ldm.pipeline import StableDiffusion
from tests.conftest import session_graphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY_SDXL = os.path.join(FIXTURES, "tiny-sdxl")
DATA = os.path.join(ROOT, "data", "examples", "purple_star")


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "tiny-sdxl-reference.npz")) as z:
        return dict(z)


@pytest.fixture(scope="module")
def sd(ref):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = StableDiffusion.load("xl", TINY_SDXL)
    ids = model.add_placeholder(str(ref["ti.token"]), np.concatenate([ref["ti.vectors_l"], ref["ti.vectors_g"]], 1))
    assert ids == ref["ti.token_ids"].tolist()
    return model


@pytest.mark.parametrize("run", ["plain", "ti"])
def test_ddim_sampling_matches_diffusers(sd, ref, run):
    """Same initial latents, prompts and size conditioning: the same images as diffusers within 1/255 (plain: an
    empty negative prompt, which SDXL base zeroes; ti: a negative prompt, a placeholder, non-square, cropped)."""
    get = lambda key: ref[f"{run}.{key}"]  # noqa: E731
    prompts = [str(p) for p in get("prompt")]
    negative = str(ref["ti.negative_prompt"][0]) if run == "ti" else ""
    size_ids = np.tile(get("time_ids"), (len(prompts), 1))
    images, z = sd.sample(prompts, get("latents0"), sampler="ddim", steps=int(get("num_inference_steps")),
                          scale=float(get("guidance_scale")), negative_prompt=negative, size_ids=size_ids,
                          return_latents=True)
    np.testing.assert_allclose(z, get("latents"), atol=1e-4)
    expected = (get("images") * 255).round().astype(np.int16)
    assert images.shape == expected.shape
    assert np.abs(images.astype(np.int16) - expected).max() <= 1


def test_default_size_ids_are_diffusers(sd, ref):
    """No size flags: original and target size are the image's, the crop (0, 0), as in the plain run."""
    np.testing.assert_array_equal(sd.size_ids(2, 64, 64), np.tile(ref["plain.time_ids"], (2, 1)))


def test_gradient_of_both_vector_sets_matches_finite_differences(ref, _loaded):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        # loaded and differentiated as the training run below does, on its inputs' shapes (batch 1, 2 vectors,
        # 64 px), so that both use one compiled gradient
        with session_graphs(_loaded):
            sd = StableDiffusion.load("xl", TINY_SDXL)
            loss = T.TextualInversionLoss(sd.unet, sd.conditioner, sd.alphas_cumprod, "eps")
            grad_fn = ms.value_and_grad(loss, grad_position=0)
        sd.add_placeholder(str(ref["ti.token"]), np.concatenate([ref["ti.vectors_l"], ref["ti.vectors_g"]], 1))
        latents, noise = np.random.default_rng(0).standard_normal((2, 1, 4, 8, 8), dtype=np.float32)
        ids = sd.token_ids(["a photo of <cat-toy>"])
        assert ids.shape == (1, 2, 77)
        args = [ms.Tensor(latents), ms.Tensor(ids), ms.Tensor(noise), ms.Tensor(np.array([700], np.int32)),
                ms.Tensor(1.0, ms.float32), ms.Tensor(sd.size_ids(1, 64, 64))]
        vectors = sd.extra_embeddings.copy()
        _, grad = grad_fn(ms.Tensor(vectors), *args)
        grad = grad.asnumpy()
        width = sd.embedding_dims[0]
        for columns in (slice(0, width), slice(width, None)):   # CLIP ViT-L's set, then bigG's
            # along the set's own gradient: the steepest direction keeps the float32 loss difference well
            # above its rounding
            direction = np.zeros_like(vectors)
            direction[:, columns] = grad[:, columns]
            direction /= np.linalg.norm(direction)
            h = 1e-2
            plus = float(grad_fn(ms.Tensor(vectors + h * direction), *args)[0].asnumpy())
            minus = float(grad_fn(ms.Tensor(vectors - h * direction), *args)[0].asnumpy())
            analytic = float(np.sum(grad * direction))
            assert abs(analytic) > 1e-6
            assert (plus - minus) / (2 * h) == pytest.approx(analytic, rel=2e-2, abs=1e-7)
    finally:
        ms.set_context(mode=previous)


def test_training_writes_both_formats_that_sampling_reads(tmp_path, shared_graphs):
    out = tmp_path / "out"
    argv = ["--train_config", "configs/train/train_config_textual_inversion_xl.yaml", "--version", "xl",
            "--pretrained_model_path", TINY_SDXL, "--train_data_dir", DATA, "--image_size", "64",
            "--image_filter_size", "0", "--num_vectors", "2", "--max_steps", "2", "--ckpt_save_interval", "2",
            "--warmup_steps", "0", "--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "2",
            "--num_validation_images", "1", "--output_path", str(out)]
    assert T.main(argv) == 0
    weights = out / "weights"
    assert sorted(os.listdir(weights)) == ["SDXL_textual_inversion_2.safetensors", "SDXL_textual_inversion_2_ti.ckpt"]
    ours = load_embedding(str(weights / "SDXL_textual_inversion_2_ti.ckpt"))
    kohya = load_embedding(str(weights / "SDXL_textual_inversion_2.safetensors"), token="<cat-toy>")
    assert ours.token == "<cat-toy>" and ours.dims == (6, 8) and ours.num_vectors == 2
    np.testing.assert_array_equal(kohya.all_vectors, ours.all_vectors)
    assert os.listdir(out / "validation") == ["step_0000002.png"]
    # an SD 1.x model refuses it, naming the reason
    with pytest.raises(EmbeddingError, match="is an SDXL embedding"):
        check_fits(ours, (6,), "x")
    assert text_to_image.main(["--version", "xl", "--ckpt_path", TINY_SDXL, "--prompt", "a <cat-toy> backpack",
                               "--H", "64", "--W", "64", "--n_samples", "1", "--sampling_steps", "2",
                               "--ti_ckpt_path", str(weights / "SDXL_textual_inversion_2_ti.ckpt"),
                               "--output_path", str(tmp_path / "samples")]) == 0
    assert os.listdir(tmp_path / "samples" / "samples") == ["00000.png"]
