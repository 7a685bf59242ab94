"""Server state: global weights, the server optimiser and the EMA of the weights.

Shared by every engine (the in-process simulator and the Flower app).

EMA (BAFFLE guideline 3) with exactly the decay it is given, bias-corrected:
    m_0 = 0,   m_t = d m_{t-1} + (1 - d) W_t,   EMA_t = m_t / (1 - d^t)
so EMA_t is a proper weighted average of W_1..W_t with weights proportional to
d^(t-s) and W_0 (the random initialisation) never leaks in. No warm-up schedule:
the official BAFFLE code's warm-up min(d, (1+t)/(10+t)) made its effective decay
0.18-0.70 over a 20-round run whatever d was configured; here d is d.

Learning-rate schedule (explicit, off by default): "constant", or "cosine" over the
run's T server steps, lr_t = lr * (1 + cos(pi t / T)) / 2 for step t = 0..T-1.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .modes import OPTIMIZERS, _choice, check_weight_decay, make_optimizer

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ServerOptions:
    optimizer: str = "adam"
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float = 0.0  # 0 disables the EMA
    schedule: str = "constant"  # or "cosine" over total_steps
    total_steps: int = 0  # server steps in the run (needed by "cosine")
    weight_decay: float = 0.0  # coupled L2 on W in the server's step (0: none)

    def __post_init__(self) -> None:
        _choice("server_optimizer", self.optimizer, OPTIMIZERS)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"server_lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _choice("lr_schedule", self.schedule, SCHEDULES)
        check_weight_decay("server_weight_decay", self.weight_decay)
        if self.schedule == "cosine" and self.total_steps < 1:
            raise ValueError(f"the cosine schedule needs total_steps >= 1, got {self.total_steps}")

    def lr_at(self, step: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        return self.lr


class Server:
    """Holds W (flat float32) and applies pseudo-gradients with the chosen optimiser."""

    def __init__(self, w0: torch.Tensor, options: ServerOptions):
        self.options = options
        self.w = torch.nn.Parameter(w0.detach().clone().to(torch.float32))
        self.opt = make_optimizer(options.optimizer, self.w, options.lr, options.betas, options.weight_decay)
        self.ema_sum = torch.zeros_like(self.w.detach())
        self.steps = 0

    @property
    def weights(self) -> torch.Tensor:
        return self.w.detach()

    def step(self, pseudo_gradient: torch.Tensor) -> None:
        if not torch.isfinite(pseudo_gradient).all():
            raise FloatingPointError("pseudo-gradient has non-finite values; refusing to update the model")
        self.w.grad = pseudo_gradient.to(self.w.dtype)
        for group in self.opt.param_groups:
            group["lr"] = self.options.lr_at(self.steps)
        self.opt.step()
        self.steps += 1
        d = self.options.ema_decay
        if d > 0:
            self.ema_sum.mul_(d).add_(self.weights, alpha=1 - d)

    def eval_weights(self) -> torch.Tensor:
        """EMA_t if the EMA is on and at least one step was taken, else W_t."""
        d = self.options.ema_decay
        if d == 0 or self.steps == 0:
            return self.weights.clone()
        return self.ema_sum / (1 - d**self.steps)

    def state_dict(self) -> dict:
        """A snapshot (copies, not views of the live optimiser state)."""
        return {"w": self.weights.clone(), "opt": copy.deepcopy(self.opt.state_dict()),
                "ema_sum": self.ema_sum.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # the options, not the snapshot's copy of them, rule the next step
            group["weight_decay"] = self.options.weight_decay
            if "betas" in group:
                group["betas"] = self.options.betas
        self.ema_sum.copy_(state["ema_sum"])
        self.steps = int(state["steps"])
