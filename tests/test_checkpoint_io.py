import json
import os
import pickle
import stat
import struct
import zipfile

import numpy as np
import pytest

from ldm.checkpoint_io import (CheckpointError, UnsafeCheckpointError, atomic_write, load_state_dict,
                               load_torch_pickle, read_safetensors_metadata, save_safetensors)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 4)).astype(np.float32), "h": np.float16([1.5, -2.25]),
               "ids": np.arange(6, dtype=np.int64).reshape(2, 3), "t": rng.standard_normal((4, 3)).T}
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"step": 7})
    back = load_state_dict(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    assert read_safetensors_metadata(path) == {"step": "7"}
    assert os.listdir(tmp_path) == ["x.safetensors"]


def _raw_safetensors(path, name, dtype, shape, data):
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


def test_safetensors_bf16_is_read_as_float32(tmp_path):
    values = np.float32([1.0, -2.5, 3.140625, 0.0])   # exactly representable in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    _raw_safetensors(tmp_path / "b.safetensors", "x", "BF16", [2, 2], bits)
    out = load_state_dict(tmp_path / "b.safetensors")["x"]
    assert out.dtype == np.float32 and np.array_equal(out, values.reshape(2, 2))


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_safetensors({"w": np.ones((64, 64), np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value) and "\n" not in str(err.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello, this is text")
    with pytest.raises(CheckpointError, match="notes.ckpt: not a checkpoint"):
        load_state_dict(path)


def test_torch_zip_checkpoint_equals_the_safetensors_twin():
    ckpt = load_state_dict(os.path.join(FIXTURES, "tiny-sd1.ckpt"))
    st = load_state_dict(os.path.join(FIXTURES, "tiny-sd1.safetensors"))
    assert set(ckpt) == set(st) and len(st) > 400
    for k in st:
        assert ckpt[k].dtype == st[k].dtype and np.array_equal(ckpt[k], st[k]), k
    assert st["first_stage_model.encoder.conv_in.weight"].dtype == np.float16
    assert np.array_equal(ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"],
                          np.arange(77)[None])


def test_torch_pickle_dtypes_and_strided_views():
    obj = load_torch_pickle(os.path.join(FIXTURES, "torch-dtypes.pt"))
    assert obj["epoch"] == 3 and obj["name"] == "dtypes"
    expected = np.load(os.path.join(FIXTURES, "torch-dtypes-expected.npz"))
    got = obj["state_dict"]
    assert set(got) == set(expected.files)
    for k in expected.files:
        assert got[k].dtype == expected[k].dtype and np.array_equal(got[k], expected[k]), k
    assert got["bf16"].dtype == np.float32 and got["fp16_transposed"].shape == (6, 4)
    assert np.array_equal(got["int64_offset_view"], np.arange(24).reshape(4, 6)[1:, 2:5])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_zip(path, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    _torch_zip(path, pickle.dumps({"state_dict": {}, "x": _Evil(marker)}, protocol=2))
    for load in (load_state_dict, load_torch_pickle):
        with pytest.raises(UnsafeCheckpointError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and "system" in message and "\n" not in message
    assert not marker.exists()


def test_legacy_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(CheckpointError, match="old.pt"):
        load_state_dict(path)
    assert not marker.exists()


def _tensor_pickle(size, stride, numel):
    """Protocol-2 opcodes of `{"w": torch._utils._rebuild_tensor_v2(<FloatStorage 0>, 0, size, stride, False, {})}`."""
    def text(t):
        return b"X" + struct.pack("<I", len(t)) + t.encode()

    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    storage_id = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + ints([numel])[1:-1] + b"t"
    return (b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + storage_id + b"Q" + b"J\x00\x00\x00\x00" + ints(size) + ints(stride) + b"\x89}tRs.")


@pytest.mark.parametrize("size,stride,ok", [((2, 2), (2, 1), True), ((100,), (1,), False), ((2, 2), (3, 1), False)])
def test_tensor_geometry_is_checked_against_its_storage(tmp_path, size, stride, ok):
    """A crafted size/stride must not make the reader (numpy as_strided) read past the storage."""
    path = tmp_path / "crafted.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _tensor_pickle(size, stride, 4))
        zf.writestr("archive/data/0", np.float32([1, 2, 3, 4]).tobytes())
    if ok:
        assert np.array_equal(load_state_dict(path)["w"], np.float32([[1, 2], [3, 4]]))
    else:
        with pytest.raises(CheckpointError, match="crafted.ckpt"):
            load_state_dict(path)


def test_atomic_write_keeps_the_old_file_when_the_body_fails(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half-written")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["weights.safetensors"]
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["weights.safetensors"]


def test_mindspore_checkpoint_is_told_by_content(tmp_path):
    import mindspore as ms
    path = str(tmp_path / "mindone_style.ckpt")
    values = {"a.gamma": np.float32([1, 2, 3]), "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in values.items()], path)
    out = load_state_dict(path)
    assert set(out) == set(values)
    for k, v in values.items():
        assert np.array_equal(out[k], v)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    # mkstemp makes 0600 files and MindSpore's save_checkpoint 0400 ones: outputs are to be shared
    previous = os.umask(0o022)
    try:
        path = tmp_path / "out.png"
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x")
            os.chmod(tmp, 0o400)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(previous)
