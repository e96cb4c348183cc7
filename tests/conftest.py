"""Fixtures shared across test directories, and `--torch-threads N`: run the whole suite with N intra-op threads
(the modules that pin one thread for speed use N too), so that a result depending on the CPU's float rounding
shows up as a difference between `--torch-threads 1` and `--torch-threads 2`."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--torch-threads", type=int, default=None,
                     help="torch intra-op threads for every test (default: torch's own; one_thread modules: 1)")


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--torch-threads={threads} must be >= 1")
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread(request):
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~10x faster than two contending.
    With --torch-threads N, N threads instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.config.getoption("--torch-threads") or 1)
    yield
    torch.set_num_threads(before)
