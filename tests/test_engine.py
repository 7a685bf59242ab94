"""Every engine returns the reference loop's scalars (LeNet, WRN-10-2; both schemes).

Tolerance: the engines differ only in float32 rounding of the forward pass, so the
losses agree to a few ulps of |L| and u = d / sigma to within
    atol = 16 * 2^-23 * max|L| / sigma
(16 ulps of the loss, divided by the step). sigma = 1e-3 keeps that bound small
relative to u.
"""
import numpy as np
import pytest
import torch

from baffle.engine import ENGINES, Engine
from baffle.estimators import ProbePlan, probe, probe_blocks
from baffle.flatmodel import FlatModel
from baffle.models import ModelSpec, build_model

SIGMA = 1e-3
MODELS = {"lenet": ModelSpec("lenet"), "wrn-10-2": ModelSpec("wrn-10-2", norm="group")}


def setup(name, batch=6):
    g = torch.Generator().manual_seed(1)
    model = FlatModel(build_model(MODELS[name], generator=g))
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def engine_probe(engine, w, x, y, plan, segment, groups, block):
    return probe_blocks(lambda v: engine.losses(v, x, y, segment, groups),
                        lambda v, z, s: engine.perturbed_losses(v, z, s, x, y, segment, groups),
                        w, plan, block, directions=engine.directions)


def tolerance(model, w, x, y):
    return 16 * 2.0**-23 * abs(model.loss(w, x, y)) * 1.5 / SIGMA


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("engine_name", ENGINES)
def test_engine_matches_reference_loop(engine_name, name, scheme):
    model, x, y = setup(name)
    w = model.weights()
    before = w.clone()
    plan = ProbePlan(11, 6, SIGMA, scheme)
    reference = probe(lambda v: model.loss(v, x, y), w, plan, block=6)
    engine = Engine(model, engine_name)
    seg = torch.zeros(len(y), dtype=torch.int64)
    result = engine_probe(engine, w, x, y, plan, seg, 1, block=4)  # 4 + 2: a partial last block
    atol = tolerance(model, w, x, y)
    torch.testing.assert_close(result.u[:, 0], reference, rtol=0, atol=atol)
    assert engine.forward_passes == plan.forward_passes
    assert torch.equal(w, before)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_batched_clients_match_each_client_alone(engine_name):
    model, x, y = setup("lenet", batch=9)
    w = model.weights()
    plan = ProbePlan(4, 5, SIGMA)
    engine = Engine(model, engine_name)
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # clients of unequal batch sizes
    together = engine_probe(engine, w, x, y, plan, segment, 3, block=5).u
    for c in range(3):
        rows = segment == c
        alone = probe(lambda v: model.loss(v, x[rows], y[rows]), w, plan)
        torch.testing.assert_close(together[:, c], alone, rtol=0, atol=tolerance(model, w, x[rows], y[rows]))


@pytest.mark.parametrize("engine_name", ENGINES)
def test_block_size_does_not_change_the_scalars(engine_name):
    model, x, y = setup("lenet")
    w = model.weights()
    plan = ProbePlan(2, 7, SIGMA, "central")
    engine = Engine(model, engine_name)
    seg = torch.zeros(len(y), dtype=torch.int64)
    one = engine_probe(engine, w, x, y, plan, seg, 1, block=7).u
    for block in (1, 3):
        torch.testing.assert_close(engine_probe(engine, w, x, y, plan, seg, 1, block=block).u, one,
                                   rtol=0, atol=tolerance(model, w, x, y))


def test_unknown_engine_is_named():
    model, _, _ = setup("lenet")
    with pytest.raises(ValueError, match="'fast'"):
        Engine(model, "fast")


def test_engine_refuses_to_overwrite_its_input():
    g = torch.Generator().manual_seed(1)
    model = FlatModel(build_model(MODELS["lenet"], generator=g), channels_last=False)  # identity order
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    engine = Engine(model, "loop")
    with pytest.raises(ValueError, match="buffer"):
        engine.perturbed_losses(model.storage, torch.zeros(1, model.n), 1e-3, x, y, torch.zeros(6, dtype=torch.int64), 1)


def test_physical_order_is_invisible():
    """Channels-last storage changes nothing a caller sees: same logical weights,
    same parameters inside the module, same losses."""
    spec = MODELS["wrn-10-2"]
    a = FlatModel(build_model(spec, generator=torch.Generator().manual_seed(3)), channels_last=True)
    b = FlatModel(build_model(spec, generator=torch.Generator().manual_seed(3)), channels_last=False)
    assert a._order is not None and b._order is None
    assert torch.equal(a.weights(), b.weights())
    w = torch.randn(a.n, generator=torch.Generator().manual_seed(4)) * 0.05
    a.load(w)
    assert torch.equal(a.weights(), w)
    for name, p in a.module.named_parameters():
        assert torch.equal(p, a.named(w)[name])
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    assert abs(a.loss(w, x, y) - b.loss(w, x, y)) < 1e-5
    torch.testing.assert_close(a.grad(w, x, y)[0], b.grad(w, x, y)[0])
    z = torch.randn(2, a.n)
    assert torch.equal(a.to_physical(z)[:, a._order.argsort()], z)
