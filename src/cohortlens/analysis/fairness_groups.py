"""The groups the fairness stage compares: a categorical protected attribute's values, or a continuous one (or a
date) binned: `fairness.bins[attr]` quantile bins (edges from the whole cohort, rounded to 3 significant
digits, so they do not move with the test split) or a list of edges."""

from __future__ import annotations

import datetime as _dt
from typing import Sequence

import numpy as np

from cohortlens.analysis.table import DATE_EPOCH, AttributeSpec


def _fmt_edge(value: float, spec: AttributeSpec) -> str:
    if spec.type == "date":
        return (DATE_EPOCH + _dt.timedelta(days=int(round(value)))).isoformat()
    return f"{value:.3g}"


def bin_edges(reference: np.ndarray, spec: AttributeSpec, setting) -> list[float]:
    """Inner bin edges for a continuous/date attribute: explicit, or quantiles of `reference` (the cohort),
    rounded so the labels name the edges actually used."""
    if isinstance(setting, (list, tuple)):
        edges = [float((_dt.date.fromisoformat(e) - DATE_EPOCH).days) if isinstance(e, str) else float(e)
                 for e in setting]
        return sorted(set(edges))
    q = int(setting)
    ref = reference[np.isfinite(reference)]
    if q < 2 or ref.size == 0:
        return []
    raw = np.quantile(ref, np.linspace(0, 1, q + 1)[1:-1])
    if spec.type == "date":
        rounded = np.round(raw)
    else:
        rounded = np.array([float(f"{e:.3g}") for e in raw])
    return sorted(set(rounded.tolist()))


def bin_labels(edges: Sequence[float], spec: AttributeSpec) -> list[str]:
    if not edges:
        return ["all"]
    f = [_fmt_edge(e, spec) for e in edges]
    return [f"< {f[0]}", *[f"[{a}, {b})" for a, b in zip(f[:-1], f[1:])], f">= {f[-1]}"]


def protected_groups(values: np.ndarray, spec: AttributeSpec, edges: Sequence[float] | None = None
                     ) -> tuple[np.ndarray, list[str]]:
    """Group label per row (None where the attribute is missing) and the groups in display order."""
    if spec.is_categorical:
        present = [v for v in values if v is not None]
        order = [c for c in (spec.categories or ()) if c in set(present)]
        order += sorted(set(present) - set(order))
        return np.asarray(values, dtype=object), order
    edges = list(edges or [])
    labels = bin_labels(edges, spec)
    out = np.full(len(values), None, dtype=object)
    ok = np.isfinite(values)
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values[ok], side="right")
    out[ok] = np.asarray(labels, dtype=object)[idx]
    return out, labels
