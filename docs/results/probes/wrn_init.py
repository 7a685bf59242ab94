"""Probe for WRN-10-2 K=100's slow start: does the weight initialisation matter?

baffle initialises every conv/linear weight as PyTorch's default,
``kaiming_uniform_(a=sqrt(5))``: U(-b, b) with b = 1/sqrt(fan_in). The authors'
public code initialises its WRN convs with ``kaiming_uniform_()`` (a=0:
b = sqrt(6/fan_in), 2.45 times larger) and its linear layer with
``xavier_uniform_``. Behind GroupNorm a conv's output does not depend on its
weights' scale, so an Adam step of fixed size turns larger weights by a smaller
angle: the same client learning rate is a smaller effective one.

Each variant runs the table1-wrn-mnist-k100 preset for one round of ONE client
holding all 60,000 training images, cut to STEPS local steps, then evaluates on
the test set (one local step is 101 forward passes of a batch of 32):

    .venv/bin/python docs/results/probes/wrn_init.py OUT_DIR VARIANT [STEPS]

VARIANT: ``baffle`` (as the preset), ``authors`` (the authors' init scale),
``baffle-lr0.001`` (as the preset, client Adam lr 0.001) or ``lenet`` (the
LeNet K=100 preset cut the same way, for reference). STEPS defaults to 60.
"""
import sys
from pathlib import Path

import torch
from torch import nn

from baffle import models, runs
from baffle.config import resolve

VARIANTS = ("baffle", "authors", "baffle-lr0.001", "lenet")


def authors_init(model: nn.Module, generator: torch.Generator | None) -> None:
    """Convs: kaiming_uniform_(a=0), b = sqrt(6/fan_in); linear: xavier_uniform_; biases 0; GN affine 1/0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=0.0, generator=generator)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=1.0, generator=generator)
            elif isinstance(module, nn.GroupNorm) and module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()


if __name__ == "__main__":
    usage = "usage: .venv/bin/python docs/results/probes/wrn_init.py OUT_DIR VARIANT [STEPS]"
    if len(sys.argv) not in (3, 4):
        sys.exit(usage)
    variant = sys.argv[2]
    if variant not in VARIANTS:
        sys.exit(f"VARIANT must be one of {', '.join(VARIANTS)}, got {variant!r}\n{usage}")
    steps = sys.argv[3] if len(sys.argv) == 4 else "60"
    if not steps.isdigit() or int(steps) < 1:
        sys.exit(f"STEPS must be a whole number >= 1, got {steps!r}\n{usage}")
    preset = "table1-lenet-mnist-k100" if variant == "lenet" else "table1-wrn-mnist-k100"
    overrides = {"threads": 1, "rounds": 1, "num_clients": 1, "local_steps": int(steps)}
    if variant == "authors":
        models.init_parameters = authors_init  # build_model looks it up at call time
    if variant == "baffle-lr0.001":
        overrides["client_lr"] = 0.001
    config = resolve(preset, overrides)
    print(runs.execute(config, Path(sys.argv[1])))
