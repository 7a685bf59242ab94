"""The portable direction stream: known answers, NumPy == torch, any slice alone."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from baffle.perturb import Layout, derive_seed, directions_np, normals_np, philox4x32
from baffle.perturb_torch import directions, normals

# Philox4x32-10 known answers (Salmon et al., SC'11; Random123 kat_vectors)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(backend, ctr, key, expected):
    arr = (lambda v: np.array([v], dtype=np.int64)) if backend == "numpy" else (lambda v: torch.tensor([v]))
    out = philox4x32(*(arr(c) for c in ctr), *key)
    assert tuple(int(o[0]) for o in out) == expected


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return np.abs(ia - ib)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**64 - 1])
def test_numpy_equals_torch(seed):
    """Stated bound: at most 1 float32 ulp anywhere; in practice bit-identical."""
    a = normals_np(seed, range(6), 0, 10_001, stream=3)
    b = normals(seed, range(6), 0, 10_001, stream=3).numpy()
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (6, 10_001)
    d = ulp_distance(a, b)
    assert d.max() <= 1
    assert (d > 0).mean() < 1e-4


@pytest.mark.parametrize("impl", [normals_np, lambda *a: normals(*a).numpy()])
def test_any_slice_alone_equals_whole(impl):
    whole = impl(42, [0, 1, 2, 3, 4], 0, 1000)
    for start, stop in [(0, 1), (1, 2), (3, 9), (4, 8), (5, 5), (997, 1000), (250, 751)]:
        assert np.array_equal(impl(42, [0, 1, 2, 3, 4], start, stop), whole[:, start:stop])
    # single directions generated alone equal rows of the block
    for k in range(5):
        assert np.array_equal(impl(42, [k], 0, 1000)[0], whole[k])


def test_layout_directions_match_flat_stream():
    layout = Layout.from_shapes([("a", (3, 4)), ("b", (5,)), ("c", (2, 1, 3))])
    assert layout.size == 23
    flat = normals_np(9, [7], 0, 23)[0]
    z_np, z_t = directions_np(9, 7, layout), directions(9, 7, layout)
    for name, shape, a, b in layout.slices():
        assert z_np[name].shape == shape
        assert np.array_equal(z_np[name].ravel(), flat[a:b])
        assert np.array_equal(z_t[name].numpy().ravel(), flat[a:b])


def test_directions_are_standard_normal():
    """Statistical (seeded): 400k draws; moments within ~5 standard errors."""
    z = normals_np(123, range(40), 0, 10_000).astype(np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z**3)) < 5 * np.sqrt(15 / n)
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / n)
    # tails: P(|z| > 2) = 0.0455
    assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / n)
    # distinct directions and streams are uncorrelated
    a, b = normals_np(5, [0, 1], 0, 50_000).astype(np.float64)
    other_stream = normals_np(5, [0], 0, 50_000, stream=1)[0].astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(50_000)
    assert abs(np.corrcoef(a, other_stream)[0, 1]) < 5 / np.sqrt(50_000)


def test_derive_seed_is_deterministic_and_distinct():
    seeds = {derive_seed(0, 1, t) for t in range(1000)}
    assert len(seeds) == 1000
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2) != derive_seed(8, 1, 2)
    assert all(0 <= s < 2**64 for s in seeds)


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="-1"):
        normals_np(-1, [0], 0, 4)
    with pytest.raises(ValueError, match=r"\[5, 2\)"):
        normals(0, [0], 5, 2)


def test_numpy_half_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from baffle.perturb import normals_np\n"
        "print(float(normals_np(1, [0], 0, 4)[0, 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == float(normals_np(1, [0], 0, 4)[0, 0])


def test_compiled_generator_equals_eager():
    from baffle.perturb_torch import CompiledDirections, flat_directions

    gen = CompiledDirections(block=4)
    for seed, ks, stream in [(1, [0, 1, 2, 3], 0), (2**40 + 3, [4, 5], 7), (9, [0], 1)]:  # full and short blocks
        assert torch.equal(gen(seed, ks, 1001, stream), flat_directions(seed, ks, 1001, stream))


def test_chunked_generation_equals_one_chunk(monkeypatch):
    """Generation runs in chunks of CHUNK counters (bounded temporaries); chunk
    boundaries must not show: a tiny chunk gives the very same numbers."""
    import baffle.perturb as perturb
    from baffle.perturb_torch import normals

    whole_np = normals_np(9, [0, 3, 5], 2, 1001, stream=4)
    whole_t = normals(9, [0, 3, 5], 2, 1001, stream=4)
    monkeypatch.setattr(perturb, "CHUNK", 7)
    assert np.array_equal(normals_np(9, [0, 3, 5], 2, 1001, stream=4), whole_np)
    assert torch.equal(normals(9, [0, 3, 5], 2, 1001, stream=4), whole_t)
