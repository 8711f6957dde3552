"""The exponential moving average of the weights (`ema_decay`), as torch's AveragedModel applies it."""

from __future__ import annotations

import torch
from torch import Tensor


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """The EMA decay of the update after `updates` earlier ones: `decay`, or with warm-up the smaller of `decay` and
    (1 + t) / (10 + t), the schedule of TensorFlow's ExponentialMovingAverage with num_updates."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


def ema_update(decay: float, warmup: bool = True):
    """`multi_avg_fn` for torch's AveragedModel: in-place lerp of every averaged tensor towards the model's with
    weight 1 - decay_t. AveragedModel copies the weights on its first update and counts updates itself, so the
    count (and with it the warm-up) is part of its state dict and survives a checkpoint resume."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged) -> None:
        d = ema_decay_at(decay, int(num_averaged), warmup)  # one host sync per step: negligible beside the step
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (counters): lerp is float-only
            for a, c in zip(averaged, current, strict=True):
                a.copy_((a * d + c * (1.0 - d)).to(a.dtype))

    return update
