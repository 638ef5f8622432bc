import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

ms.set_device("CPU")


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
