"""Model zoo for BAFFLE: small, buffer-free, functional-call-friendly networks.

BAFFLE estimates gradients from forward passes only: a client evaluates the
loss ``L(W + sigma * delta_k)`` for K random perturbations ``delta_k`` and
forms ``grad L ~ 1/(K sigma) * sum_k (L(W + sigma delta_k) - L(W)) delta_k``.
Every model here is built with that in mind:

* **No buffers.**  Everything that the estimator perturbs is a parameter and
  nothing else holds state.  BatchNorm is deliberately not offered (the
  paper's guideline 4): its running statistics make ``L(W)`` depend on the
  batch composition and on call history, adding noise to the finite
  differences, and its integer ``num_batches_tracked`` buffer must never be
  perturbed.  GroupNorm normalises each sample on its own and has only affine
  parameters, so it is the normalisation on offer.
* **Pure forward.**  No hooks, no in-place tricks, so
  ``torch.func.functional_call(model, params, (x,))`` with
  ``params = dict(model.named_parameters())`` (possibly perturbed copies)
  gives exactly ``model(x)``.
* **Deterministic initialisation.**  :func:`build_model` never seeds the
  global RNG.  Pass a ``torch.Generator`` (or call :func:`init_parameters`)
  to get bit-identical weights from the same seed.

Normalisation ``"group"`` uses ``nn.GroupNorm`` with **8 channels per group**
(``num_groups = C // 8``, affine), so every normalised width (16, 32, 64, 128)
is divisible; ``"none"`` is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "GROUP_SIZE",
    "ModelSpec",
    "MODELS",
    "build_model",
    "count_parameters",
    "init_parameters",
    "LeNet",
    "WideResNet",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "hardswish": nn.Hardswish,
    "relu": nn.ReLU,
    "selu": nn.SELU,
}

NORMS = ("group", "none")

#: Channels per GroupNorm group (``num_groups = channels // GROUP_SIZE``).
GROUP_SIZE = 8


@dataclass(frozen=True)
class ModelSpec:
    """What to build.

    ``name`` is a key of :data:`MODELS`; ``in_channels`` x ``image_size`` x
    ``image_size`` is the input shape (1x28x28 for MNIST, 3x32x32 for
    CIFAR-10); ``norm`` is one of :data:`NORMS`; ``activation`` is a key of
    :data:`ACTIVATIONS`.  Validation happens in :func:`build_model`.
    """

    name: str
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    norm: str = "none"
    activation: str = "hardswish"


def _choices(names) -> str:
    return ", ".join(sorted(names))


def make_norm(norm: str, channels: int) -> nn.Module:
    """``GroupNorm(channels // 8, channels)`` for ``"group"``, identity for ``"none"``."""
    if norm == "none":
        return nn.Identity()
    if norm == "group":
        if channels % GROUP_SIZE:
            raise ValueError(f"GroupNorm needs channels divisible by {GROUP_SIZE}, got {channels}")
        return nn.GroupNorm(channels // GROUP_SIZE, channels, affine=True)
    raise ValueError(f"unknown norm {norm!r} (choose from {_choices(NORMS)})")


def make_activation(activation: str) -> nn.Module:
    """A fresh (non in-place) activation module."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (choose from {_choices(ACTIVATIONS)})")
    return ACTIVATIONS[activation]()


# --------------------------------------------------------------------------- LeNet


class LeNet(nn.Module):
    """The BAFFLE paper's LeNet.

    ``conv5x5(in->16) [norm] act maxpool2 -> conv5x5(16->64) [norm] act maxpool2
    -> global average pool -> linear(64->classes)``; convs have biases and no
    padding.  Spatial size on MNIST: 28 -> 24 -> 12 -> 8 -> 4 -> 1; on CIFAR:
    32 -> 28 -> 14 -> 10 -> 5 -> 1.  Parameters on MNIST with norm none:
    ``416 + 25,664 + 650 = 26,730``; GroupNorm adds ``2 * (16 + 64) = 160``.
    The global pool makes the classifier independent of the image size, which
    must be at least 16 so the second pool sees a 2x2 map.
    """

    MIN_IMAGE_SIZE = 16

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.image_size < self.MIN_IMAGE_SIZE:
            raise ValueError(
                f"lenet needs image_size >= {self.MIN_IMAGE_SIZE}, got {spec.image_size}"
            )
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, 16, kernel_size=5),
            make_norm(spec.norm, 16),
            make_activation(spec.activation),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 64, kernel_size=5),
            make_norm(spec.norm, 64),
            make_activation(spec.activation),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- WRN


class PreActBlock(nn.Module):
    """Pre-activation basic block (Zagoruyko & Komodakis, 2016).

    ``h = act(norm1(x)); out = conv3x3_s(h); out = conv3x3(act(norm2(out)))``
    and the residual is ``x`` when the shape is unchanged, otherwise the 1x1
    strided conv of the *activated* input ``h`` (as in the reference WRN
    code).  Convs have no bias.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, activation: str):
        super().__init__()
        self.norm1 = make_norm(norm, c_in)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if (c_in != c_out or stride != 1)
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(x))
        out = self.conv1(h)
        out = self.conv2(self.act2(self.norm2(out)))
        residual = x if self.shortcut is None else self.shortcut(h)
        return out + residual


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet WRN-``depth``-``widen``.

    ``n = (depth - 4) / 6`` blocks per group; WRN-10-2 has one block per group.
    Layout: ``conv3x3(in->16)``; groups of widths ``16k, 32k, 64k`` (32, 64,
    128 for k=2) with strides 1, 2, 2; final ``norm, act``, global average
    pool, ``linear(64k->classes)``.  No convolution has a bias.  Parameters for
    WRN-10-2 on MNIST with norm none: 302,490 (CIFAR: 302,778).
    """

    def __init__(self, spec: ModelSpec, depth: int = 10, widen: int = 2):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(spec.in_channels, 16, 3, padding=1, bias=False)
        blocks = []
        c_in = 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                blocks.append(
                    PreActBlock(c_in, width, stride if i == 0 else 1, spec.norm, spec.activation)
                )
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            make_norm(spec.norm, c_in),
            make_activation(spec.activation),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c_in, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))


# --------------------------------------------------------------------------- small


def _linear(spec: ModelSpec) -> nn.Module:
    """``flatten -> linear(C*H*W -> classes)``.  Has no hidden layer, so
    ``norm`` and ``activation`` have no effect (used for oracle tests where
    the exact gradient is known in closed form)."""
    features = spec.in_channels * spec.image_size**2
    return nn.Sequential(nn.Flatten(), nn.Linear(features, spec.num_classes))


def _mlp(spec: ModelSpec) -> nn.Module:
    """``flatten -> linear(C*H*W -> 64) [norm] act -> linear(64 -> classes)``.
    The optional GroupNorm acts on the 64 hidden units (8 groups of 8)."""
    features = spec.in_channels * spec.image_size**2
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 64),
        make_norm(spec.norm, 64),
        make_activation(spec.activation),
        nn.Linear(64, spec.num_classes),
    )


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "lenet": LeNet,
    "wrn-10-2": lambda spec: WideResNet(spec, depth=10, widen=2),
    "linear": _linear,
    "mlp": _mlp,
}


# --------------------------------------------------------------------------- API


def _validate(spec: ModelSpec) -> None:
    if spec.name not in MODELS:
        raise ValueError(f"unknown model {spec.name!r} (choose from {_choices(MODELS)})")
    if spec.norm not in NORMS:
        raise ValueError(f"unknown norm {spec.norm!r} (choose from {_choices(NORMS)})")
    if spec.activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {spec.activation!r} (choose from {_choices(ACTIVATIONS)})"
        )
    for field in ("in_channels", "num_classes", "image_size"):
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive int, got {value!r}")


def init_parameters(model: nn.Module, generator: torch.Generator | None) -> None:
    """Re-initialise every parameter of ``model`` in place, drawing from ``generator``.

    Conv/linear weights: PyTorch's default ``kaiming_uniform_(a=sqrt(5))``,
    i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; biases: zeros; GroupNorm
    affine: weight ones, bias zeros.  Modules are visited in registration
    order and only weights consume random numbers, so the same generator seed
    gives bit-identical weights, and the conv/linear weights of a ``"group"``
    model equal those of the ``"none"`` model built from the same seed.
    ``generator=None`` draws from the global RNG (still without seeding it).
    Raises ``TypeError`` for a module with parameters of an unsupported kind.
    """
    covered: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                covered.add(id(module.weight))
                if module.bias is not None:
                    module.bias.zero_()
                    covered.add(id(module.bias))
            elif isinstance(module, nn.GroupNorm):
                if module.affine:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                    covered.update((id(module.weight), id(module.bias)))
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise TypeError(f"init_parameters cannot initialise parameter {missing[0]!r}")


def build_model(spec: ModelSpec, generator: torch.Generator | None = None) -> nn.Module:
    """Validate ``spec`` and return a freshly initialised fp32 model (train mode).

    With a ``generator`` the weights come from it alone and the global RNG is
    left exactly as it was; without one they come from the global RNG (wrap the
    call in ``torch.random.fork_rng()`` + ``torch.manual_seed`` for
    reproducibility).  Either way the scheme is :func:`init_parameters`.
    """
    _validate(spec)
    if generator is None:
        model = MODELS[spec.name](spec)
    else:
        # Module constructors draw their default init from the global RNG;
        # restore it so that passing a generator has no side effect.
        with torch.random.fork_rng(devices=[]):
            model = MODELS[spec.name](spec)
    model = model.to(torch.float32)
    init_parameters(model, generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
