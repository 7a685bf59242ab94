import os

import pytest
import torch

from baffle.data import make_synthetic


@pytest.fixture(scope="session")
def synth():
    """A small learnable synthetic problem: (train, test), 1x16x16 images, 10 classes."""
    return make_synthetic(n_train=600, n_test=300, image_size=16, seed=0)


def _threads_per_test() -> int:
    """torch threads per test: 2 in a plain pytest run; under pytest-xdist (`make test` runs one
    worker per core) the cores shared among the workers, so they do not oversubscribe them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    return max(1, (os.cpu_count() or 2) // int(workers)) if workers else 2


THREADS = _threads_per_test()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
