"""Accuracy and loss curves of a run, rendered to PNG bytes (matplotlib, no display)."""
from __future__ import annotations

import io


def figure(ncols: int, figsize: tuple[float, float]):
    """A matplotlib figure and its axes, drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def png(fig, dpi: int) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(metrics: list[dict], title: str) -> bytes:
    from .runs import evaluated_rows

    ev = evaluated_rows(metrics)
    fig, (acc, loss) = figure(2, (10, 4))
    acc.plot([m["round"] for m in ev], [100 * m["test_top1"] for m in ev], marker=".", label="test top-1")
    acc.plot([m["round"] for m in ev], [100 * m["test_top5"] for m in ev], marker=".", label="test top-5")
    acc.set(xlabel="round", ylabel="accuracy (%)", title="accuracy")
    acc.grid(alpha=0.3)
    acc.legend()
    loss.plot([m["round"] for m in ev], [m["test_loss"] for m in ev], marker=".", label="test loss")
    loss.plot([m["round"] for m in ev], [m["train_loss"] for m in ev], marker=".", label="train loss")
    client = [float("nan") if m["client_loss"] is None else m["client_loss"] for m in metrics]  # None: no replies
    loss.plot([m["round"] for m in metrics], client, alpha=0.5, label="client batch loss")
    loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    loss.grid(alpha=0.3)
    loss.legend()
    fig.suptitle(title)
    return png(fig, dpi=100)
