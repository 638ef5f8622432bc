"""The PyTorch baseline of the benchmark tools: its interpreter, its threads, its matmul peak.

The baseline runs in a child process of an interpreter with torch, diffusers, transformers and psutil
(requirements-dev.txt), named by `--torch-python` or TORCH_PYTHON; without one, only our side runs.

Threads. MindSpore sets OMP_NUM_THREADS=1 in the C environment when it is imported; Python's
`os.environ` does not show it, but a child started without `env=` inherits it, so torch used to run on
one thread against our two. `run_child` therefore passes an explicit environment: Python's view of
ours with every thread variable set to our count, and the child calls `set_torch_threads` first.
Our count is measured, not read from the context: on CPU MindSpore runs a kernel on its runtime pool
(threads ActorThread_* and KernelThread_*: one actor thread plus at least one kernel thread), so on 2
cores `runtime_num_threads` or `op_tuning.threads_num` of 1 still runs a matmul on 2 threads while the
context says 1. `matmul_peak` counts the threads that did the work of a large matmul, on either side,
and no ratio is printed unless the counts are equal (`thread_mismatch`).
"""
import os
import subprocess
import time

import numpy as np

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
CHILD_MODULES = "torch, diffusers, transformers, psutil"


def add_arguments(parser):
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                        help=f"an interpreter with {CHILD_MODULES} for the baseline (default: $TORCH_PYTHON; "
                             "none: our side only)")
    parser.add_argument("--no-baseline", action="store_true", help="our side only")


def torch_python(args):
    """The baseline's interpreter, or None (said so) when there is to be no baseline."""
    if args.no_baseline:
        return None
    if not args.torch_python:
        print("no PyTorch baseline: pass --torch-python or set TORCH_PYTHON (an interpreter with "
              f"{CHILD_MODULES}, see requirements-dev.txt)", flush=True)
        return None
    try:
        probe = subprocess.run([args.torch_python, "-c", f"import {CHILD_MODULES}"], capture_output=True)
    except OSError as e:
        raise SystemExit(f"--torch-python {args.torch_python}: cannot run it ({e.strerror}); give an "
                         "interpreter with requirements-dev.txt installed")
    if probe.returncode:
        raise SystemExit(f"--torch-python {args.torch_python}: cannot import {CHILD_MODULES} there; "
                         "install requirements-dev.txt into it")
    return args.torch_python


def child_env(threads, environ=os.environ):
    """The baseline's environment: `environ` without its thread settings, then each of them = `threads`."""
    env = {k: v for k, v in environ.items() if k not in THREAD_VARIABLES}
    env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    return env


def run_child(python, args, threads):
    """`python *args` on `threads` threads (a child that times calls `set_torch_threads` first)."""
    subprocess.run([python, *args], env=child_env(threads), check=True)


def set_torch_threads():
    """In the child: torch on the thread count `run_child` gave, which is returned."""
    import torch

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    return threads


def machine_load():
    """How busy the machine is, to be taken before the run: other processes slow an OpenMP baseline on all
    cores far more than ours (tiny model, 2 cores, one busy: diffusers' 20-step image 26-41 s, not 0.7)."""
    return f"machine: {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f} at the start"


def thread_times():
    """`{thread id: (name, CPU seconds)}` of this process's threads (Linux /proc)."""
    tick, times = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        times[tid] = name, (int(fields[11]) + int(fields[12])) / tick
    return times


def matmul_peak(matmul, convert=np.asarray, pool=lambda name: True, n=2048, repeat=5):
    """`{"flops": best FLOP/s, "threads": threads that ran it}` of an n^3 float32 matmul: `matmul(a, a)`
    on `a = convert(numpy array)` returns once the product is computed. A thread whose name `pool`
    accepts counts if it used at least half the CPU time of the busiest one: the workers of a parallel
    matmul share the work about evenly, idle threads use ~0."""
    a = convert(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    matmul(a, a)
    before = thread_times()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        matmul(a, a)
        best = min(best, time.perf_counter() - start)
    used = [seconds - before.get(tid, (name, 0.0))[1] for tid, (name, seconds) in thread_times().items()
            if pool(name)]
    busiest = max(used, default=0.0)
    return {"flops": 2 * n ** 3 / best, "threads": sum(0 < busiest / 2 <= u for u in used)}


def thread_mismatch(ours, theirs):
    """Why a ratio of `ours` to `theirs` (results with matmul "threads", theirs also "torch_threads") would
    compare unequal thread counts, or None when they are equal."""
    counts = (ours["threads"], theirs["threads"], theirs["torch_threads"])
    if len(set(counts)) == 1:
        return None
    return "threads differ: MindSpore {}, PyTorch {} (torch.get_num_threads() {})".format(*counts)
