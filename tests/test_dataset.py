import logging
import os

import numpy as np
import pytest
from PIL import Image, features

from data.dataset import (
    BatchIterator,
    DatasetError,
    TextualInversionDataset,
    imagenet_style_templates_small,
    imagenet_templates_small,
    list_images,
    load_image,
    read_template_file,
)

def solid(path, color, size=(40, 32), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return str(path)


def make_folder(folder, n, size=(40, 32)):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        solid(folder / f"img{i:02d}.png", (i * 20, 100, 200), size)
    return str(folder)


def dataset(folder, **kwargs):
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("image_filter_size", 0)
    return TextualInversionDataset(str(folder), "<t> <t>_1", **kwargs)


# ---- loading every format -------------------------------------------------------------------------------

def test_rgba_composited_on_white(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:, :4] = (255, 0, 0, 0)      # fully transparent red -> white
    pixels[:, 4:] = (255, 0, 0, 128)    # half transparent red -> pink
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_image(str(tmp_path / "a.png")))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 7].tolist() == [255, 127, 127]


def test_la_and_palette_transparency(tmp_path):
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert np.asarray(load_image(str(tmp_path / "la.png")))[1, 1].tolist() == [255, 255, 255]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(str(tmp_path / "p.png")))[0, 0].tolist() == [255, 255, 255]


def test_16bit_grayscale_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    rgb = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert rgb[:, :, 0].tolist() == [[0, 100], [255, 7]]
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all()


def test_32bit_int_and_grayscale_and_cmyk(tmp_path):
    Image.fromarray(np.full((3, 3), 257 * 50, np.int32), "I").save(tmp_path / "i.tif")
    assert np.asarray(load_image(str(tmp_path / "i.tif")))[0, 0].tolist() == [50, 50, 50]
    solid(tmp_path / "l.png", 77, mode="L")
    assert np.asarray(load_image(str(tmp_path / "l.png")))[0, 0].tolist() == [77, 77, 77]
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert np.asarray(load_image(str(tmp_path / "c.tif")))[2, 2].tolist() == [255, 0, 0]


def test_exif_rotated_jpeg_is_upright(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)   # 40 wide, 20 high: left red, right blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90 CW to display": stored column 0 is the visual top
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_image(str(tmp_path / "rot.jpg"))
    assert upright.size == (20, 40)
    px = np.asarray(upright).astype(int)
    assert px[3, 10, 0] > 240 and px[3, 10, 2] < 15     # top is red
    assert px[36, 10, 2] > 240 and px[36, 10, 0] < 15   # bottom is blue


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_bmp_and_upper_case_extensions(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    solid(folder / "a.WEBP", (0, 255, 0))
    Image.new("RGB", (40, 32), (1, 2, 3)).save(folder / "b.JPG", format="JPEG")
    solid(folder / "c.bmp", (9, 9, 9))
    (folder / "notes.txt").write_text("x")
    (folder / "._a.jpg").write_bytes(b"\x00\x05")   # macOS resource fork: not an image, ignored quietly
    (folder / "sub.png").mkdir()                    # a folder with an image name is not a file
    assert [os.path.basename(p) for p in list_images(str(folder))] == ["a.WEBP", "b.JPG", "c.bmp"]
    assert dataset(folder).num_images == 3


# ---- folder errors -------------------------------------------------------------------------------------

def test_missing_empty_and_imageless_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"'.*nope' does not exist"):
        list_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"'.*empty' is empty"):
        list_images(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match=r"no image files \(accepted: \.bmp, \.jpeg, \.jpg, \.png, \.webp; "
                                           r"found readme\.md\)"):
        list_images(str(tmp_path / "docs"))


def test_corrupt_and_truncated_skipped_with_warning(tmp_path, caplog):
    folder = tmp_path / "imgs"
    make_folder(folder, 2)
    (folder / "bad.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (5, 5, 5)).save(folder / "cut.jpg", quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        ds = dataset(folder)
    assert [os.path.basename(p) for p in ds.image_paths] == ["img00.png", "img01.png"]
    assert "bad.png" in caplog.text and "cut.jpg" in caplog.text


def test_no_readable_image_left_is_an_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"none of the 1 image files in '.*broken' could be read"):
        dataset(folder)


# ---- templates and captions ----------------------------------------------------------------------------

def test_template_file_and_bad_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a photo of {}\n\n  {} on a table  \n", encoding="utf-8")
    assert read_template_file(str(good)) == ["a photo of {}", "{} on a table"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}\na drawing of it\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.txt' line 2: 'a drawing of it' needs one '\{\}'"):
        read_template_file(str(bad))
    bad.write_text("{} in {style}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 1"):
        read_template_file(str(bad))


def test_captions_use_templates_and_placeholder_string(tmp_path):
    folder = make_folder(tmp_path / "imgs", 1)
    ds = dataset(folder)
    captions = {ds.get_example(0, np.random.default_rng(s))[1] for s in range(200)}
    assert captions == {t.format("<t> <t>_1") for t in imagenet_templates_small}
    style = dataset(folder, learnable_property="style")
    style_captions = {t.format("<t> <t>_1") for t in imagenet_style_templates_small}
    assert style.get_example(0, np.random.default_rng(0))[1] in style_captions
    assert len(imagenet_templates_small) == 27 and len(imagenet_style_templates_small) == 19


# ---- augmentation --------------------------------------------------------------------------------------

def test_center_crop_resize_and_normalisation(tmp_path):
    # 60 x 20 image: three vertical bands; short side 20 -> 16 means 48 x 16, the center crop is the middle band
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:40] = (0, 255, 0)
    pixels[:, 40:] = (0, 0, 255)
    folder = tmp_path / "bands"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "x.png")
    ds = dataset(folder, random_crop=False, flip_p=0.0)
    a, _ = ds.get_example(0, np.random.default_rng(1))
    b, _ = ds.get_example(0, np.random.default_rng(2))
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a[:, 8, 8].tolist() == [-1.0, 1.0, -1.0]
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_random_crop_covers_offsets_and_flip_mirrors(tmp_path):
    pixels = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (16, 1, 3))   # horizontal ramp
    folder = tmp_path / "ramp"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "r.png")
    ds = dataset(folder, random_crop=True, flip_p=0.0)
    lefts = {ds.get_example(0, np.random.default_rng(s))[0][0, 8, 0] for s in range(60)}
    assert len(lefts) > 10
    flipped = dataset(folder, random_crop=False, flip_p=1.0).render_variant(0, True)
    plain = dataset(folder, random_crop=False, flip_p=1.0).render_variant(0, False)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_size_ids_are_the_file_size_and_the_crop_in_the_resized_image(tmp_path):
    """SDXL's size conditioning: (file height, width, crop top, left, size, size), the crop being where the
    rendered pixels were cut from the resized image."""
    pixels = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (16, 1, 3))   # 64 wide ramp, 16 high
    folder = tmp_path / "ramp"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "r.png")
    ds = dataset(folder, random_crop=True, flip_p=0.0)
    resized = np.asarray(Image.fromarray(pixels).resize((64, 16), Image.BICUBIC), np.float32) / 127.5 - 1
    for seed in range(5):
        example = ds.draw(0, np.random.default_rng(seed))
        ids = ds.size_ids(example)
        assert ids.dtype == np.float32 and ids[[0, 1, 2, 4, 5]].tolist() == [16, 64, 0, 16, 16]
        left = int(ids[3])
        np.testing.assert_array_equal(ds.render(example), resized[:, left:left + 16].transpose(2, 0, 1))
    centred = dataset(folder, random_crop=False)
    assert centred.size_ids(centred.draw(0, np.random.default_rng(0))).tolist() == [16, 64, 0, 24, 16, 16]


def test_flip_probability_roughly_half(tmp_path):
    ds = dataset(make_folder(tmp_path / "imgs", 1))
    flips = [ds.draw(0, np.random.default_rng(s)).flip for s in range(400)]
    assert 150 < sum(flips) < 250


def test_variants_and_variant_index(tmp_path):
    folder = make_folder(tmp_path / "imgs", 3)
    ds = dataset(folder, random_crop=False, repeats=2)
    assert ds.is_augmentation_finite and len(ds) == 6
    assert ds.variants() == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]
    for s in range(20):
        ex = ds.draw(s % len(ds), np.random.default_rng(s))
        image_index, flip = ds.variants()[ds.variant_index(ex)]
        assert (image_index, flip) == (ex.image_index, ex.flip)
        np.testing.assert_array_equal(ds.render(ex), ds.render_variant(image_index, flip))
    assert dataset(folder, random_crop=False, flip_p=0.0).variants() == [(0, False), (1, False), (2, False)]
    with pytest.raises(DatasetError, match="random_crop"):
        dataset(folder, random_crop=True).variants()


def test_small_images_filtered_or_replaced(tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    solid(folder / "a_big.png", (1, 1, 1), (64, 64))
    solid(folder / "b_small.png", (2, 2, 2), (64, 20))
    solid(folder / "c_big.png", (3, 3, 3), (80, 70))
    solid(folder / "d_small.png", (4, 4, 4), (10, 10))
    dropped = dataset(folder, image_filter_size=32, replace_small_images=False)
    assert [os.path.basename(p) for p in dropped.image_paths] == ["a_big.png", "c_big.png"]
    assert len(dropped) == 2
    replaced = dataset(folder, image_filter_size=32, replace_small_images=True)
    assert replaced.num_images == 2 and len(replaced) == 4 and replaced.slots == [0, 1, 0, 1]
    unfiltered = dataset(folder, image_filter_size=32, filter_small_size=False)
    assert unfiltered.num_images == 4 and unfiltered.render_variant(3, False).shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="image_filter_size=100"):
        dataset(folder, image_filter_size=100)


# ---- batching, sharding, resume ------------------------------------------------------------------------

def test_sharding_is_disjoint_and_covers_each_global_batch(tmp_path):
    ds = dataset(make_folder(tmp_path / "imgs", 12), random_crop=False)
    step_batches = []
    its = [BatchIterator(ds, batch_size=2, seed=5, rank_id=r, device_num=2) for r in range(2)]
    for _ in range(3):   # one epoch = 12 examples = 3 global batches of 4
        step_batches.append([[e.image_index for e in it.next_examples()] for it in its])
    for rank0, rank1 in step_batches:
        assert not set(rank0) & set(rank1)
    everything = sorted(i for batch in step_batches for rank in batch for i in rank)
    assert everything == list(range(12))
    single = BatchIterator(ds, batch_size=4, seed=5)
    for rank0, rank1 in step_batches:
        assert [e.image_index for e in single.next_examples()] == rank0 + rank1


def test_iterator_state_restore_reproduces_the_stream(tmp_path):
    ds = dataset(make_folder(tmp_path / "imgs", 5), random_crop=True, repeats=2)
    first = BatchIterator(ds, batch_size=3, seed=11)
    for _ in range(4):   # crosses the 10-example epoch boundary
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(5)]
    resumed = BatchIterator(ds, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    assert resumed.seed == 11 and resumed.step == 4
    for (img_a, cap_a), (img_b, cap_b) in zip(expected, [next(resumed) for _ in range(5)]):
        np.testing.assert_array_equal(img_a, img_b)
        assert cap_a == cap_b
    assert expected[0][0].shape == (3, 3, 16, 16)
    other = dataset(make_folder(tmp_path / "imgs", 5), random_crop=True, repeats=3)
    with pytest.raises(DatasetError, match="10 examples per epoch, this dataset has 15"):
        BatchIterator(other, batch_size=3, seed=11).load_state_dict(state)


def test_epochs_are_permutations_and_seed_matters(tmp_path):
    ds = dataset(make_folder(tmp_path / "imgs", 6), random_crop=False)
    it = BatchIterator(ds, batch_size=6, seed=1)
    epoch1 = [e.image_index for e in it.next_examples()]
    epoch2 = [e.image_index for e in it.next_examples()]
    assert sorted(epoch1) == sorted(epoch2) == list(range(6)) and epoch1 != epoch2
    assert it.steps_per_epoch == 1 and it.step == 2
    other = [e.image_index for e in BatchIterator(ds, batch_size=6, seed=2).next_examples()]
    assert other != epoch1
