"""Data parallel with msrun on 2 CPU workers equals one process with the same global batch."""

import os
import socket
import subprocess

import numpy as np

from ldm.embeddings import load_embedding
from tests.conftest import ALL_CPUS
from tests.test_train import run, run_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_cpus():
    if ALL_CPUS is not None:
        os.sched_setaffinity(0, ALL_CPUS)


def test_two_workers_equal_one_process(tmp_path, micro_sd1):
    # the micro model: each worker is a new process that compiles the training graph; global batch 2 on both sides
    weights, config = micro_sd1
    steps = ["--pretrained_model_path", weights, "--model_config", config, "--image_size", "32",
             "--max_steps", "2", "--gradient_accumulation_steps", "2"]
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
           f"--log_dir={tmp_path / 'logs'}", "--join=True", "python", "train_textual_inversion.py",
           *run_argv(tmp_path / "dp", *steps, "--train_batch_size", "1", "--use_parallel", "true")]
    # on every CPU, not only this test worker's (conftest pins it): msrun's two workers wait on each other
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=all_cpus)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # only rank 0 writes
    assert sorted(os.listdir(tmp_path / "dp" / "weights")) == ["SDv1.5_textual_inversion_2_ti.ckpt"]

    assert run(tmp_path, *steps, "--train_batch_size", "2", output="single") == 0
    name = "SDv1.5_textual_inversion_2_ti.ckpt"
    parallel = load_embedding(str(tmp_path / "dp" / "weights" / name)).vectors
    single = load_embedding(str(tmp_path / "single" / "weights" / name)).vectors
    assert np.abs(single).max() > 0
    np.testing.assert_allclose(parallel, single, rtol=0, atol=1e-6)
    losses = [(tmp_path / d / "loss_log.csv").read_text().splitlines()[1].split(",")[1] for d in ("dp", "single")]
    assert abs(float(losses[0]) - float(losses[1])) < 1e-5
