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
    "ablation-lenet-mnist-k100-no-ema": PaperCell(85.06, "Table 1 ablations, LeNet MNIST K=100, without EMA"),
    "ablation-lenet-mnist-k100-relu": PaperCell(81.55, "Table 1 ablations, LeNet MNIST K=100, ReLU"),
    "ablation-lenet-mnist-k100-selu": PaperCell(86.18, "Table 1 ablations, LeNet MNIST K=100, SELU"),
    "ablation-lenet-mnist-k100-central": PaperCell(76.02, "Table 1 ablations, LeNet MNIST K=100, central scheme"),
}

# the BP cell again, for the BP baseline under the batch-level protocol of the authors' public code
for _name in ("table1-lenet-mnist-bp-fedsgd", "table1-lenet-mnist-bp-fedsgd-wd"):
    PAPER[_name] = PAPER["table1-lenet-mnist-bp"]

# the cell a deviation run is measured against (its setting column says what it changes)
PAPER["deviation-wrn-mnist-k100-lr0.001"] = PAPER["table1-wrn-mnist-k100"]

#: Table 1's MNIST LeNet accuracies: the thresholds of the "forward passes to reach" table.
LENET_MNIST_TARGETS = tuple(PAPER[f"table1-lenet-mnist-k{k}"].top1 for k in (100, 200, 500))

#: The paper's K=500 MNIST LeNet run (Table 1), in client forward passes on one batch each:
#: rounds x clients x local steps (6,000 images a client in full batches, as our epochs) x (K + 1).
_ROUNDS, _CLIENTS, _BATCH, _K = 20, 10, 32, 500
_STEPS = 6000 // _BATCH
PAPER_K500_BUDGET = f"{_ROUNDS} rounds x {_CLIENTS} clients x {_STEPS} steps of batch {_BATCH} x {_K + 1} forwards"
PAPER_K500_FORWARD_PASSES = _ROUNDS * _CLIENTS * _STEPS * (_K + 1)
