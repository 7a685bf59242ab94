"""Probe for the Table 1 BP gap: the authors' public code's MNIST input pipeline.

Their code feeds pixels in [0, 1], resized to 32x32, without mean/std normalisation;
baffle normalises 28x28 images with mean 0.1307 and std 0.3081. This runs the
table1-lenet-mnist-bp preset unchanged but for that input pipeline, to see whether
it explains the paper's lower BP accuracy (94.31% against our 99.14%).

    .venv/bin/python docs/results/probes/bp_input_pipeline.py OUT_DIR [ROUNDS]

ROUNDS defaults to 5 (the preset's 20 take about 30 min on one thread).
"""
import sys
from pathlib import Path

import torch.nn.functional as F

from baffle import runs
from baffle.config import resolve
from baffle.data import _base

_normalise = _base.normalise


def unit_range_32(u8, mean, std):
    """uint8 (N, 1, 28, 28) -> float (N, 1, 32, 32) in [0, 1] (bilinear), no mean/std."""
    return F.interpolate(_normalise(u8, (0.0,), (1.0,)), size=(32, 32), mode="bilinear", align_corners=False)


def main() -> None:
    """Run the probe: table1-lenet-mnist-bp with this input pipeline (and any patch the caller made)."""
    usage = f"usage: .venv/bin/python docs/results/probes/{Path(sys.argv[0]).name} OUT_DIR [ROUNDS]"
    if len(sys.argv) not in (2, 3):
        sys.exit(usage)
    rounds = sys.argv[2] if len(sys.argv) == 3 else "5"
    if not rounds.isdigit() or int(rounds) < 1:
        sys.exit(f"ROUNDS must be a whole number >= 1, got {rounds!r}\n{usage}")
    _base.normalise = unit_range_32  # make_dataset looks it up at call time
    config = resolve("table1-lenet-mnist-bp", {"threads": 1, "rounds": int(rounds)})
    print(runs.execute(config, Path(sys.argv[1])))


if __name__ == "__main__":
    main()
