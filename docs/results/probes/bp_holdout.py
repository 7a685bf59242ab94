"""Probe for the Table 1 BP gap: the authors' public code's data, both differences at once.

Beside its input pipeline (pixels in [0, 1] at 32x32, no mean/std; see
bp_input_pipeline.py), their code keeps 5,000 of MNIST's 60,000 training images for
validation and trains on the other 55,000. This runs the table1-lenet-mnist-bp preset
with both: 5,000 training images dropped (a seeded random choice, the same every run)
and the code's input pipeline. The 10 iid clients then hold 5,500 images each, not 6,000.

    .venv/bin/python docs/results/probes/bp_holdout.py OUT_DIR [ROUNDS]

ROUNDS defaults to 5 (bp_input_pipeline.py's probe length, so the two compare round by round).
"""
import numpy as np

from baffle import data

from bp_input_pipeline import main

HELD_OUT = 5000
_load_mnist = data.DATASETS["mnist"]


def mnist_without_validation(root, *, seed=0):
    """MNIST (train, test) with HELD_OUT training images removed (fixed seed 0, not the run's)."""
    train, test = _load_mnist(root, seed=seed)
    keep = np.sort(np.random.default_rng(0).permutation(len(train))[HELD_OUT:])
    return train.subset(keep), test


if __name__ == "__main__":
    data.DATASETS["mnist"] = mnist_without_validation  # load_dataset looks it up at call time
    main()
