"""Tests for baffle.models: every registry entry x norm x activation."""

import itertools

import pytest
import torch
from torch.func import functional_call

from baffle.models import (
    ACTIVATIONS,
    MODELS,
    NORMS,
    ModelSpec,
    build_model,
    count_parameters,
    init_parameters,
)

DATASETS = {"mnist": (1, 28), "cifar": (3, 32)}  # name -> (channels, image size)

COMBOS = list(itertools.product(sorted(MODELS), NORMS, sorted(ACTIVATIONS)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(name, norm="none", activation="hardswish", dataset="mnist", **kw) -> ModelSpec:
    channels, size = DATASETS[dataset]
    return ModelSpec(name, in_channels=channels, image_size=size, norm=norm,
                     activation=activation, **kw)


def _input(dataset: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    channels, size = DATASETS[dataset]
    return torch.randn(batch, channels, size, size, generator=_gen(seed))


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("name,norm,activation", COMBOS)
def test_forward_buffers_functional_call(name, norm, activation, dataset):
    model = build_model(_spec(name, norm, activation, dataset), generator=_gen(0))
    x = _input(dataset)
    out = model(x)
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert list(model.buffers()) == []
    assert all(p.dtype == torch.float32 for p in model.parameters())

    params = dict(model.named_parameters())
    assert torch.equal(functional_call(model, params, (x,)), out)
    # A perturbed copy really flows through functional_call and leaves the model untouched.
    shifted = {k: v + 0.1 for k, v in params.items()}
    assert not torch.equal(functional_call(model, shifted, (x,)), out)
    assert torch.equal(model(x), out)


@pytest.mark.parametrize("name,norm,activation", COMBOS)
def test_generator_determinism(name, norm, activation):
    spec = _spec(name, norm, activation)
    a = build_model(spec, generator=_gen(1)).state_dict()
    b = build_model(spec, generator=_gen(1)).state_dict()
    c = build_model(spec, generator=_gen(2)).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_generator_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    build_model(_spec("wrn-10-2", "group"), generator=_gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_global_rng_path_is_reproducible_under_fork_rng():
    def make():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            return build_model(_spec("lenet"))

    a, b = make().state_dict(), make().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_parameters_scheme():
    model = build_model(_spec("lenet", "group"), generator=_gen(0))
    init_parameters(model, _gen(3))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 1:  # GroupNorm weight
            assert torch.all(p == 1), name
        else:
            bound = 1.0 / p[0].numel() ** 0.5  # 1/sqrt(fan_in)
            assert p.abs().max() <= bound and p.std() > 0.3 * bound, name


def test_init_parameters_rejects_unknown_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with pytest.raises(TypeError, match="1.weight"):
        init_parameters(model, _gen(0))


def test_lenet_parameter_count():
    model = build_model(_spec("lenet"))
    assert count_parameters(model) == 26_730 == 416 + 25_664 + 650
    # GroupNorm adds only its affine pairs: 2 * (16 + 64).
    assert count_parameters(build_model(_spec("lenet", "group"))) == 26_730 + 160


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("norm", NORMS)
def test_wrn_parameter_count(norm, dataset):
    n = count_parameters(build_model(_spec("wrn-10-2", norm, dataset=dataset)))
    assert 2.9e5 <= n <= 3.1e5


def test_num_classes():
    model = build_model(_spec("lenet", num_classes=7))
    assert model(_input("mnist")).shape == (3, 7)


@pytest.mark.parametrize(
    "field,bad",
    [("name", "resnet-999"), ("norm", "batch"), ("activation", "tanh")],
)
def test_bad_spec_raises(field, bad):
    kwargs = {"name": "lenet", "norm": "none", "activation": "relu", field: bad}
    with pytest.raises(ValueError, match=bad):
        build_model(ModelSpec(**kwargs))


@pytest.mark.parametrize("field", ["in_channels", "num_classes", "image_size"])
def test_bad_sizes_raise(field):
    with pytest.raises(ValueError, match=field):
        build_model(ModelSpec("mlp", **{field: 0}))


def test_lenet_too_small_image_raises():
    with pytest.raises(ValueError, match="15"):
        build_model(ModelSpec("lenet", image_size=15))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_norm_is_applied(name):
    """Same seed => identical conv/linear weights, so any output change is the norm's.

    Models without a hidden layer (``linear``) have no norm to apply: same
    parameter count, same output.
    """
    x = _input("mnist", batch=3, seed=1)
    plain = build_model(_spec(name, "none"), generator=_gen(4))
    group = build_model(_spec(name, "group"), generator=_gen(4))
    shared = dict(plain.named_parameters())
    for key, value in group.named_parameters():
        if key in shared:
            assert torch.equal(value, shared[key]), key
    assert any(isinstance(m, torch.nn.GroupNorm) for m in group.modules()) == (
        count_parameters(group) > count_parameters(plain)
    )
    if count_parameters(group) > count_parameters(plain):
        assert not torch.allclose(plain(x), group(x))
    else:
        assert torch.equal(plain(x), group(x))


def test_lenet_no_grad_batch_32():
    model = build_model(_spec("lenet", "group"), generator=_gen(0))
    with torch.no_grad():
        out = model(_input("mnist", batch=32))
    assert out.shape == (32, 10)
    assert not out.requires_grad
    assert torch.isfinite(out).all()
