"""Export a baffle model to ONNX with its weights as a graph input (torch side).

The exported graph is ``logits = f(x, w)``: ``x`` of shape (batch, C, H, W) with
a free batch dimension and ``w`` the flat float32 weight vector in the logical
order of :class:`baffle.perturb.Layout` (the graph slices and reshapes it into
the parameters). No weight is stored in the file, so one export serves every
round; the client feeds W + sigma z_k itself (:class:`baffle.edge.OnnxClient`).
The layout (parameter names and shapes) is stored in the metadata entry
``baffle.layout`` so that a client can refuse weights that do not fit.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import torch
from torch import nn

from ..estimators import layout_of
from ..perturb import Layout
from .onnx_client import INPUT_W, INPUT_X, LAYOUT_KEY, OUTPUT

OPSET = 18


class _WeightsAsInput(nn.Module):
    """forward(x, w) = module(x) with the parameters taken from the flat vector w."""

    def __init__(self, module: nn.Module, layout: Layout):
        super().__init__()
        self.module = module
        self.layout = layout

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        params = {name: w[a:b].view(shape) for name, shape, a, b in self.layout.slices()}
        return torch.func.functional_call(self.module, params, (x,))


def export_onnx(module: nn.Module, example_shape: tuple[int, ...]) -> bytes:
    """The serialized ONNX model of ``module`` for inputs of shape (batch, *example_shape).

    Weights are inputs (see the module docstring); the module's own parameter
    values are not stored. Raises ValueError for a module with buffers.
    """
    if any(True for _ in module.buffers()):
        raise ValueError("model has buffers; only buffer-free baffle models can be exported")
    layout = layout_of(dict(module.named_parameters()))
    wrapper = _WeightsAsInput(module, layout).eval()
    x = torch.zeros((2, *example_shape))
    w = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    batch = torch.export.Dim("batch")
    quiet = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # the exporter logs optional-dependency notes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (x, w), None, input_names=[INPUT_X, INPUT_W],
                                        output_names=[OUTPUT], dynamic_shapes={"x": {0: batch}, "w": None},
                                        opset_version=OPSET, dynamo=True, optimize=True, verbose=False)
    finally:
        onnx_logger.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key = LAYOUT_KEY
    entry.value = json.dumps([[name, list(shape)] for name, shape, _ in layout.entries])
    return proto.SerializeToString()
