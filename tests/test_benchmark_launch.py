"""The benchmark tools' PyTorch baseline runs on our thread count, whatever MindSpore left in the C
environment (tools/torch_baseline.py; nothing here needs torch)."""
import argparse
import ctypes
import json
import subprocess
import sys

import pytest

from tools.torch_baseline import THREAD_VARIABLES, add_arguments, child_env, run_child, thread_mismatch, torch_python

# the child writes the thread variables it sees to argv[1]
PRINT_THREADS = ("import json, os, sys; "
                 "json.dump({k: os.environ.get(k) for k in sys.argv[2:]}, open(sys.argv[1], 'w'))")


@pytest.fixture
def mindspore_omp_setting():
    """OMP_NUM_THREADS=1 in the C environment only, as `import mindspore` sets it: os.environ does not show it,
    a child started without `env=` inherits it. The previous C value is restored afterwards."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    previous = libc.getenv(b"OMP_NUM_THREADS")
    libc.setenv(b"OMP_NUM_THREADS", b"1", 1)
    yield
    if previous is None:
        libc.unsetenv(b"OMP_NUM_THREADS")
    else:
        libc.setenv(b"OMP_NUM_THREADS", previous, 1)


def test_child_env_sets_every_thread_variable_and_keeps_the_rest():
    env = child_env(3, {"PATH": "/bin", "HF_HOME": "/hf", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "8"})
    assert env == {"PATH": "/bin", "HF_HOME": "/hf", **dict.fromkeys(THREAD_VARIABLES, "3")}


def test_child_runs_on_our_threads_not_mindspores(tmp_path, mindspore_omp_setting, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    out = tmp_path / "env.json"
    names = [*THREAD_VARIABLES, "HF_HOME"]
    subprocess.run([sys.executable, "-c", PRINT_THREADS, out, *names], check=True)
    assert json.loads(out.read_text())["OMP_NUM_THREADS"] == "1"   # what the baseline used to get

    run_child(sys.executable, ["-c", PRINT_THREADS, out, *names], threads=2)
    assert json.loads(out.read_text()) == {**dict.fromkeys(THREAD_VARIABLES, "2"), "HF_HOME": str(tmp_path)}


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)   # reads TORCH_PYTHON now
    return parser.parse_args(argv)


def test_interpreter_from_flag_or_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCH_PYTHON", raising=False)
    assert torch_python(parse()) is None
    assert "--torch-python or set TORCH_PYTHON" in capsys.readouterr().out
    assert torch_python(parse("--torch-python", sys.executable, "--no-baseline")) is None

    no_torch = tmp_path / "python"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    monkeypatch.setenv("TORCH_PYTHON", str(no_torch))
    with pytest.raises(SystemExit, match=f"--torch-python {no_torch}: cannot import torch"):
        torch_python(parse())
    with pytest.raises(SystemExit, match="cannot run it"):
        torch_python(parse("--torch-python", str(tmp_path / "missing")))


def test_ratio_only_on_equal_threads():
    assert thread_mismatch({"threads": 2}, {"threads": 2, "torch_threads": 2}) is None
    assert thread_mismatch({"threads": 2}, {"threads": 1, "torch_threads": 1}) == \
        "threads differ: MindSpore 2, PyTorch 1 (torch.get_num_threads() 1)"
    assert thread_mismatch({"threads": 2}, {"threads": 2, "torch_threads": 4}) is not None
