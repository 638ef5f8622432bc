"""A pytest plugin that records every MindSpore graph compile of a test run: where the suite's time goes.

    python -m pytest -p tools.dev.compile_log tests
    sort -rn compile_log.tsv | head -20

Appends one tab-separated line per compile that took at least 0.3 s (a cached graph returns in milliseconds) to
`compile_log.tsv`, or to the file COMPILE_LOG names: seconds, the test (with its xdist group), what was compiled (a
cell's class or a gradient) and the shapes of its tensor inputs. Every xdist worker appends to the same file.
It wraps MindSpore's private graph executors (2.10), so a MindSpore upgrade may need it adjusted.
"""

import os
import time

from mindspore.graph import api

MIN_SECONDS = 0.3


def _logged(executor, path):
    compile_ = executor.compile

    def compile(self, *args, **kwargs):
        start = time.perf_counter()
        result = compile_(self, *args, **kwargs)
        seconds = time.perf_counter() - start
        if seconds >= MIN_SECONDS:
            # a cell's graph: (cell, *inputs); a gradient or jit function's: (method name, *inputs)
            what = type(args[0]).__name__ if executor is api._CellGraphExecutor else self.fn.__qualname__
            shapes = [tuple(a.shape) for a in args[1:] if hasattr(a, "shape")]
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{seconds:.2f}\t{test}\t{what}\t{shapes}\n")
        return result

    executor.compile = compile


def pytest_configure(config):
    path = os.path.abspath(os.environ.get("COMPILE_LOG", "compile_log.tsv"))
    for executor in (api._CellGraphExecutor, api._JitExecutor):
        _logged(executor, path)
