import os
import signal

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

# The Ctrl-C tests send SIGINT to a child `baffle run`. A test suite started as a background job
# of a script (`make test &`, nohup) inherits SIGINT ignored, and so would every child, which then
# (rightly, as any program must) goes on running. Give the children the default disposition: a
# handler set here is reset to the default when a child execs, where SIG_IGN would be inherited.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
