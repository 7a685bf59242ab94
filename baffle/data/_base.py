"""Shared types of :mod:`baffle.data`: the error class and the in-memory dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


class DataError(ValueError):
    """Any data problem: missing/corrupt directory or file, or a bad argument."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole split held in memory.

    ``x`` is float32 ``(N, C, H, W)``, already normalised per channel as
    ``(u8 / 255 - mean_c) / std_c`` with the TRAIN split's constants;
    ``y`` is int64 ``(N,)`` with values in ``[0, num_classes)``.
    ``eq=False``: tensors have no boolean ``==``, so identity equality is used.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() != 4:
            raise DataError(f"{self.name}: x must be float32 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.name}: y must be int64 ({self.x.shape[0]},), got {self.y.dtype} {tuple(self.y.shape)}")
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(f"{self.name}: labels span {int(self.y.min())}..{int(self.y.max())}, outside 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> ArrayDataset:
        """Rows ``idx`` (any integer index array, in the given order) as a new dataset."""
        index = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(np.asarray(idx))
        if index.dim() != 1 or index.dtype == torch.bool or index.is_floating_point() and index.numel():
            raise DataError(f"{self.name}: subset index must be a 1-D integer array, got {index.dtype} {tuple(index.shape)}")
        index = index.to(torch.int64)
        return ArrayDataset(self.x[index], self.y[index], self.num_classes, self.name)


def normalise(u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(u8 / 255 - mean_c) / std_c``."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).to(torch.float32).div_(255.0)
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    return x.sub_(mean_t).div_(std_t)


def make_dataset(u8: np.ndarray, labels: np.ndarray, num_classes: int, name: str,
                 mean: Sequence[float], std: Sequence[float]) -> ArrayDataset:
    """Build an :class:`ArrayDataset` from raw uint8 images ``(N, C, H, W)`` and integer labels."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return ArrayDataset(normalise(u8, mean, std), y, num_classes, name)
