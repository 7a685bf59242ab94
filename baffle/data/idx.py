"""Reader for the IDX format of the original MNIST / Fashion-MNIST files.

Layout (big-endian): two zero bytes, a type byte (only ``0x08`` = uint8 is
supported), a byte ``ndim``, then ``ndim`` uint32 sizes, then
``prod(sizes)`` data bytes. Hence magic 2051 = ``0x0803`` for image files
``(N, rows, cols)`` and 2049 = ``0x0801`` for label files ``(N,)``.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from ._base import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """Parse one IDX file (plain or ``.gz``) into a uint8 array of its declared shape.

    ``magic`` (e.g. :data:`IMAGES_MAGIC`) is checked when given; a bad header,
    a truncated body or trailing bytes raise :class:`DataError` naming ``path``.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no 4-byte header")
    found = int.from_bytes(raw[:4], "big")
    if magic is not None and found != magic:
        raise DataError(f"IDX file {path} has magic number {found}, expected {magic}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"IDX file {path} has magic number {found}, not an unsigned-byte IDX header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, header needs {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"IDX file {path} is {kind}: {len(raw)} bytes, dimensions {dims} need {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def find_idx(directory: str, stem: str, what: str) -> str:
    """Path of ``stem`` or ``stem.gz`` in ``directory`` (the ``.gz`` preferred)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{what} directory {directory} has no {stem}(.gz)")


def read_idx_split(directory: str, prefix: str, what: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, rows, cols)`` and labels ``(N,)`` of split ``prefix`` (``train`` or ``t10k``)."""
    img_path = find_idx(directory, f"{prefix}-images-idx3-ubyte", what)
    lab_path = find_idx(directory, f"{prefix}-labels-idx1-ubyte", what)
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lab_path, LABELS_MAGIC)
    if images.ndim != 3:
        raise DataError(f"IDX file {img_path} has {images.ndim} dimensions, expected 3 (N, rows, cols)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"IDX file {lab_path} holds {labels.shape} labels for {len(images)} images in {img_path}")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"IDX file {lab_path} has label {int(labels.max())}, expected 0..{num_classes - 1}")
    return images[:, None], labels
