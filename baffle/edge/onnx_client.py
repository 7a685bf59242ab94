"""The client half of a FedSGD round on ONNX Runtime + NumPy (torch-free).

The model is an ONNX graph ``logits = f(x, w)`` whose weights are the graph input
``w``: the flat float32 vector in baffle's logical order (the order of the
direction stream, :class:`baffle.perturb.Layout`). For a round with plan
(seed, K, sigma, scheme, stream) and local batch (x, y) the client computes, as
:func:`baffle.estimators.probe` does,

    forward:  u_k = (L(W + sigma z_k) - L(W)) / sigma                 K + 1 passes
    central:  u_k = (L(W + sigma z_k) - L(W - sigma z_k)) / (2 sigma)  2K passes

with z_k = :func:`baffle.perturb.normals_np` (seed, k, stream), bit-identical to
the torch stream, and L the mean cross-entropy (per-example losses in float64
from the float32 logits). W + s z_k is rounded once to float32, as torch's fused
``add(W, z, alpha=s)`` does. Memory: W, one perturbed copy, one direction and
one float64 buffer of n, plus the runtime's activations for one batch.

On a memory-tight device, also fix glibc's mmap threshold before the process starts
(MALLOC_MMAP_THRESHOLD_=131072, MALLOC_ARENA_MAX=1): with the dynamic threshold the
per-direction buffers land on the heap and fragment it (benchmarks/client_memory.py).

Bad input never crashes the client: it raises :class:`Refused` naming the reason
(a model file that is not ONNX, a graph whose inputs do not match the weights,
a seed or K out of range, a malformed batch, a non-finite loss), and the server
counts the client as failed for that round.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from os import PathLike
from typing import Any, Mapping

import numpy as np

from ..perturb import Layout, normals_np
from ..plan import ProbePlan

INPUT_X, INPUT_W, OUTPUT = "x", "w", "logits"
LAYOUT_KEY = "baffle.layout"  # metadata: JSON [[name, [shape...]], ...] in logical order


class Refused(Exception):
    """The client refuses the round; ``str(e)`` is the reason, one line."""


@dataclass(frozen=True)
class ProbeReply:
    """What the client computed: u (float32, (K,)), L(W) on its batch, passes run."""

    u: np.ndarray
    loss_at_w: float
    forward_passes: int


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class OnnxClient:
    """An inference-only BAFFLE client for one exported model.

    ``model``: path to, or bytes of, a model written by ``baffle export-onnx``.
    ``threads``: ONNX Runtime intra-op threads. ``max_perturbations``: the largest
    K this client accepts (a weak device bounds its work per round).
    ``arena``: ONNX Runtime's CPU memory arena (off by default: it keeps freed
    activation memory reserved, which costs resident memory on a small device).

    A model that cannot be loaded does not raise here: the client then refuses
    every round with that reason (:attr:`refusal`).
    """

    def __init__(self, model: str | PathLike | bytes, *, threads: int = 1, max_perturbations: int = 100_000,
                 arena: bool = False):
        self.max_perturbations = int(max_perturbations)
        self.refusal: str | None = None
        self.layout: Layout | None = None
        name = "the model bytes" if isinstance(model, (bytes, bytearray)) else f"model file {str(model)!r}"
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.enable_cpu_mem_arena = arena
            options.log_severity_level = 3  # errors only: the client reports through Refused
            # no busy-waiting between runs: it only burns a weak device's cycles (and, in a
            # simulation, steals them from torch's threads)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable / invalid files
            self.refusal = f"{name} is not a loadable ONNX model ({_first_line(e)})"
            return
        try:
            self._check_graph()
        except Refused as e:
            self.refusal = f"{name}: {e}"

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != {INPUT_X, INPUT_W} or outputs != [OUTPUT]:
            raise Refused(f"graph inputs {sorted(inputs)} / outputs {outputs} are not "
                          f"['{INPUT_W}', '{INPUT_X}'] / ['{OUTPUT}'] (export it with `baffle export-onnx`)")
        w, x = inputs[INPUT_W], inputs[INPUT_X]
        if w.type != "tensor(float)" or len(w.shape) != 1 or not isinstance(w.shape[0], int):
            raise Refused(f"input {INPUT_W!r} must be a float32 vector of fixed length, got {w.type} {w.shape}")
        if x.type != "tensor(float)" or len(x.shape) < 2 or not all(isinstance(d, int) for d in x.shape[1:]):
            raise Refused(f"input {INPUT_X!r} must be float32 (batch, fixed dims...), got {x.type} {x.shape}")
        self.n = int(w.shape[0])
        self.example_shape = tuple(int(d) for d in x.shape[1:])
        classes = self.session.get_outputs()[0].shape[-1]
        self.num_classes = classes if isinstance(classes, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        if LAYOUT_KEY in meta:
            try:
                entries = [(str(name), tuple(int(s) for s in shape)) for name, shape in json.loads(meta[LAYOUT_KEY])]
            except (ValueError, TypeError) as e:
                raise Refused(f"metadata {LAYOUT_KEY!r} is malformed ({_first_line(e)})") from None
            self.layout = Layout.from_shapes(entries)
            if self.layout.size != self.n:
                raise Refused(f"metadata layout holds {self.layout.size} weights but input {INPUT_W!r} has {self.n}")

    # ---- one round ------------------------------------------------------------------

    def probe(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray, plan: ProbePlan | Mapping[str, Any],
              layout: Layout | None = None) -> ProbeReply:
        """The K scalars u for this round (see the module docstring); raises Refused."""
        if self.refusal:
            raise Refused(self.refusal)
        plan = self._check_plan(plan)
        w = self._check_weights(weights, layout)
        x, y = self._check_batch(x, y)
        sigma = np.float32(plan.sigma)  # torch multiplies by the float32 alpha too
        w64 = w.astype(np.float64)
        buf = np.empty(self.n, dtype=np.float64)
        wp = np.empty(self.n, dtype=np.float32)

        def loss_at(scale: np.float32, k: int) -> float:
            z = normals_np(plan.seed, [k], 0, self.n, plan.stream)[0]
            np.multiply(z, np.float64(scale), out=buf)  # exact: 24 x 24 bits
            np.add(buf, w64, out=buf)
            wp[...] = buf  # one rounding to float32
            return self._loss(wp, x, y)

        u = np.empty(plan.num_perturbations, dtype=np.float64)
        if plan.scheme == "forward":
            base = loss_at_w = self._loss(w, x, y)
            for k in range(plan.num_perturbations):
                u[k] = (loss_at(sigma, k) - base) / plan.sigma
        else:
            for k in range(plan.num_perturbations):
                plus, minus = loss_at(sigma, k), loss_at(-sigma, k)
                u[k] = (plus - minus) / (2 * plan.sigma)
                if k == 0:  # (L(W + s z) + L(W - s z)) / 2 = L(W) + O(s^2), as the torch probe reports
                    loss_at_w = (plus + minus) / 2
        return ProbeReply(u.astype(np.float32), float(loss_at_w), plan.forward_passes)

    def _check_plan(self, plan) -> ProbePlan:
        if not isinstance(plan, ProbePlan):
            try:
                plan = ProbePlan(**dict(plan))
            except (TypeError, ValueError) as e:
                raise Refused(f"bad round plan: {e}") from None
        if plan.num_perturbations > self.max_perturbations:
            raise Refused(f"K = {plan.num_perturbations} exceeds this client's maximum {self.max_perturbations}")
        return plan

    def _check_weights(self, weights, layout: Layout | None) -> np.ndarray:
        w = np.asarray(weights)
        if w.dtype != np.float32 or w.shape != (self.n,):
            raise Refused(f"weights of dtype {w.dtype} and shape {w.shape} do not match the model input "
                          f"{INPUT_W!r} (float32, ({self.n},))")
        if layout is not None and not isinstance(layout, Layout):
            raise Refused(f"layout must be a baffle.perturb.Layout, got {type(layout).__name__}")
        if layout is not None and self.layout is not None and layout != self.layout:
            mine, theirs = list(self.layout.entries), list(layout.entries)
            i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a[:2] != b[:2]), min(len(mine), len(theirs)))
            got = theirs[i][:2] if i < len(theirs) else "nothing"
            want = mine[i][:2] if i < len(mine) else "nothing"
            raise Refused(f"the server's weights do not match the model's inputs: parameter {i} is {got} "
                          f"on the server, {want} in the model")
        if not np.isfinite(w).all():
            raise Refused("weights contain NaN or inf")
        return np.ascontiguousarray(w)

    def _check_batch(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.float32 or x.ndim != 1 + len(self.example_shape) or x.shape[1:] != self.example_shape \
                or len(x) == 0:
            raise Refused(f"batch x of dtype {x.dtype} and shape {x.shape} does not match the model input "
                          f"{INPUT_X!r} (float32, (B>=1, {', '.join(map(str, self.example_shape))}))")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise Refused(f"labels y of dtype {y.dtype} and shape {y.shape} do not match the batch of {len(x)}")
        if y.min() < 0 or (self.num_classes is not None and y.max() >= self.num_classes):
            raise Refused(f"labels must be in [0, {self.num_classes or 'classes'}), got range [{y.min()}, {y.max()}]")
        return np.ascontiguousarray(x), y.astype(np.int64)

    def _loss(self, w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy: log-sum-exp of the float32 logits, in float64."""
        try:
            logits = self.session.run([OUTPUT], {INPUT_X: x, INPUT_W: w})[0].astype(np.float64)
        except Exception as e:  # an onnxruntime failure on this input: refuse, do not crash
            raise Refused(f"the model failed on this batch ({_first_line(e)})") from None
        if logits.ndim != 2 or y.max() >= logits.shape[1]:
            raise Refused(f"labels up to {y.max()} do not fit logits of shape {logits.shape}")
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        loss = float(np.mean(lse - logits[np.arange(len(y)), y]))
        if not math.isfinite(loss):
            raise Refused(f"the loss is not finite ({loss}) at these weights")
        return loss
