import pytest
import torch

from baffle.data import make_synthetic


@pytest.fixture(scope="session")
def synth():
    """A small learnable synthetic problem: (train, test), 1x16x16 images, 10 classes."""
    return make_synthetic(n_train=600, n_test=300, image_size=16, seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
