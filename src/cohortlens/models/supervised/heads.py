"""What a supervised network predicts: one or more heads, each a classification (its classes' logits) or a
regression (one standardised value), side by side in the network's output; and the loss that trains them.

Targets and weights are (n, heads) arrays: a class code or a standardised value per head, and a loss weight per
head (the caller's balancing; 0 where the target is missing, so one network can learn heads with different
missing rows). A head's loss is its weighted mean over the batch, cross-entropy or L1 (paper 003's regressions
minimise the mean absolute error); the network's loss is the sum over heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Head:
    """One predicted quantity: `n_classes` logits (classification) or one standardised value (regression)."""

    name: str
    kind: str
    n_classes: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head {self.name}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "classification" and self.n_classes < 2:
            raise ValueError(f"head {self.name}: a classification needs at least two classes")

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.kind == "classification" else 1


def n_outputs(heads: Sequence[Head]) -> int:
    return sum(h.n_outputs for h in heads)


def output_slices(heads: Sequence[Head]) -> dict[str, slice]:
    """Head name -> its columns of the network's output."""
    out, start = {}, 0
    for h in heads:
        out[h.name] = slice(start, start + h.n_outputs)
        start += h.n_outputs
    return out


def heads_loss(outputs: Tensor, targets: Tensor, weights: Tensor, heads: Sequence[Head]) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum of the heads' losses, loss per head); every head's loss is the weighted mean over its rows with a
    weight (0 when no row of the batch has one)."""
    outputs = outputs.float()
    total = outputs.new_zeros(())
    parts = {}
    for j, (h, cols) in enumerate(zip(heads, output_slices(heads).values())):
        w = weights[:, j]
        if h.kind == "classification":
            codes = targets[:, j].clamp(min=0).long()  # a missing target has weight 0; any class keeps CE defined
            per_row = F.cross_entropy(outputs[:, cols], codes, reduction="none")
        else:
            per_row = (outputs[:, cols.start] - targets[:, j]).abs()
        loss = (w * per_row).sum() / w.sum().clamp(min=1e-8)
        parts[f"loss_{h.name}"] = loss.detach()
        total = total + loss
    return total, parts

