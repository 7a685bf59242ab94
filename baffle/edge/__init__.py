"""Inference-only BAFFLE clients (no torch, no autograd).

:class:`OnnxClient` runs the client half of a FedSGD round with ONNX Runtime and
NumPy only: it regenerates the round's directions with :mod:`baffle.perturb`,
feeds W + sigma z_k to a model exported with its weights as a graph input
(``baffle export-onnx``, :func:`baffle.edge.export.export_onnx`) and returns the
K scalars. Importing this package imports neither torch nor onnxruntime; the
latter is loaded when a client is built.
"""
from .onnx_client import INPUT_W, INPUT_X, LAYOUT_KEY, OUTPUT, OnnxClient, ProbeReply, Refused

__all__ = ["OnnxClient", "ProbeReply", "Refused", "INPUT_X", "INPUT_W", "OUTPUT", "LAYOUT_KEY"]
