"""The BAFFLE paper's reported accuracies (Feng et al. 2023, arXiv 2301.12195), by preset.

Each preset that reproduces a cell of the paper names it here: the value (test
top-1, %) and where it is printed. Used by ``baffle report`` to put our numbers
beside the paper's; a preset not listed has no paper counterpart.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperCell:
    top1: float  # %
    where: str   # table, row and column in the paper


def _table1(model: str, column: str, values: tuple[float, float, float, float]) -> dict[str, PaperCell]:
    rows = {"k100": "K=100", "k200": "K=200", "k500": "K=500", "bp": "BP baseline"}
    return {f"table1-{model}-mnist-{key}": PaperCell(v, f"Table 1, {column} MNIST, {rows[key]}")
            for key, v in zip(rows, values)}


PAPER: dict[str, PaperCell] = {
    **_table1("lenet", "LeNet", (87.27, 89.48, 92.18, 94.31)),
    **_table1("wrn", "WRN-10-2", (88.35, 89.57, 95.17, 97.11)),
    # the BP cell again, under the batch-level protocol of the authors' public code (README commands)
    "table1-lenet-mnist-bp-fedsgd": PaperCell(94.31, "Table 1, LeNet MNIST, BP baseline"),
    "table1-lenet-mnist-bp-fedsgd-wd": PaperCell(94.31, "Table 1, LeNet MNIST, BP baseline"),
    "ablation-lenet-mnist-k100-no-ema": PaperCell(85.06, "Table 1 ablations, LeNet MNIST K=100, without EMA"),
    "ablation-lenet-mnist-k100-relu": PaperCell(81.55, "Table 1 ablations, LeNet MNIST K=100, ReLU"),
    "ablation-lenet-mnist-k100-selu": PaperCell(86.18, "Table 1 ablations, LeNet MNIST K=100, SELU"),
    "ablation-lenet-mnist-k100-central": PaperCell(76.02, "Table 1 ablations, LeNet MNIST K=100, central scheme"),
}

#: Table 1's MNIST LeNet accuracies: the thresholds of the "forward passes to reach" table.
LENET_MNIST_TARGETS = (87.27, 89.48, 92.18)

#: The paper's K=500 MNIST LeNet run (Table 1), in client forward passes on one batch each:
#: 20 rounds x 10 clients x 6000 // 32 = 187 local steps (full batches, as our epochs) x (K + 1) = 501.
PAPER_K500_BUDGET = "20 rounds x 10 clients x 187 steps of batch 32 x 501 forwards"
PAPER_K500_FORWARD_PASSES = 20 * 10 * 187 * 501
