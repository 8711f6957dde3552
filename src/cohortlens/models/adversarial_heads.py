"""The heads of the adversarial VAE and what they are scored with: what a head predicts, its losses (adversary,
confusion, task), the closed-form linear leakage the encoder is trained against and early-stopped on, and the
chance loss a fully debiased latent leaves. Kept apart from the network and its training loop
(`adversarial_vae`), as MONAI keeps losses apart from networks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AdversaryHead:
    """What one adversary predicts: `n_outputs` classes (classification) or 1 value (regression)."""

    name: str
    kind: str  # classification | regression
    n_outputs: int


def recorded(y: torch.Tensor, head: AdversaryHead) -> torch.Tensor:
    return y >= 0 if head.kind == "classification" else torch.isfinite(y)


def _per_head(outputs: dict, targets: dict, heads: dict[str, AdversaryHead], classification, regression) -> dict:
    """One loss per head on its recorded rows: ``classification(name, logits, labels)`` or
    ``regression(name, prediction, value)``; a batch without a recorded row gives a zero that keeps the graph."""
    losses = {}
    for name, out in outputs.items():
        y, head = targets[name], heads[name]
        keep = recorded(y, head)
        if not keep.any():
            losses[name] = out.sum() * 0.0
        elif head.kind == "classification":
            losses[name] = classification(name, out[keep], y[keep])
        else:
            losses[name] = regression(name, out[keep, 0], y[keep])
    return losses


def adversary_losses(outputs: dict, targets: dict, heads: dict[str, AdversaryHead]) -> dict[str, torch.Tensor]:
    """Per head: cross-entropy (label -1 = missing) or MSE on the standardised value (NaN = missing)."""
    return _per_head(outputs, targets, heads, lambda _, out, y: F.cross_entropy(out, y),
                     lambda _, out, y: F.mse_loss(out, y))


def confusion_losses(outputs: dict, targets: dict, heads: dict[str, AdversaryHead], priors: dict) -> dict:
    """How far each head's output is from the chance prediction (train prior / train mean)."""
    return _per_head(outputs, targets, heads,
                     lambda name, out, _: -(priors[name] * F.log_softmax(out, dim=1)).sum(1).mean(),
                     lambda _, out, __: out.pow(2).mean())


def linear_leakage(mu: torch.Tensor, strata: torch.Tensor, targets: dict, heads: dict[str, AdversaryHead],
                    ridge: float) -> torch.Tensor:
    """R² of the closed-form ridge read-out of each attribute from μ within each stratum of the batch
    (row-weighted mean over strata, summed over attributes). Differentiable; always the best linear
    adversary for this batch, so the encoder cannot outrun it."""
    total = mu.new_zeros(())
    for name, head in heads.items():
        y = targets[name]
        keep = recorded(y, head)
        parts, weights = [], []
        for s in torch.unique(strata[keep]):
            rows = keep & (strata == s)
            if rows.sum() < 4:
                continue
            M = mu[rows] - mu[rows].mean(0)
            if head.kind == "classification":
                Y = F.one_hot(y[rows], head.n_outputs).to(mu.dtype)
            else:
                Y = y[rows].to(mu.dtype)[:, None]
            Y = Y - Y.mean(0)
            denom = Y.pow(2).sum()
            if denom <= 0:
                continue
            gram = M.T @ M
            # scale-free ridge: relative to the mean latent variance, so shrinking μ buys nothing
            alpha = ridge * torch.trace(gram).detach() / M.shape[1] + 1e-6
            eye = torch.eye(M.shape[1], device=M.device, dtype=M.dtype)
            coef = torch.linalg.solve(gram + alpha * eye, M.T @ Y)
            parts.append((M @ coef).pow(2).sum() / denom)
            weights.append(float(rows.sum()))
        if parts:
            w = torch.tensor(weights, device=mu.device, dtype=mu.dtype)
            total = total + (torch.stack(parts) * w).sum() / w.sum()
    return total


def held_out_linear_leakage(mu_fit, s_fit, y_fit, mu_eval, s_eval, y_eval, heads: dict[str, AdversaryHead],
                             ridge: float) -> float:
    """What a linear probe fitted on the train latents reads on held-out latents: per attribute, the pooled
    R² (floored at 0) on the eval rows of ridge read-outs fitted per stratum on the fit rows. The train-side
    leakage can be driven to zero by an encoder that memorises the train rows; this is the number the
    re-probe will see, so early stopping watches it."""
    total = 0.0
    for name, head in heads.items():
        sse, sst = 0.0, 0.0
        for s in torch.unique(s_eval):
            fit_rows = (s_fit == s) & recorded(y_fit[name], head)
            eval_rows = (s_eval == s) & recorded(y_eval[name], head)
            if fit_rows.sum() < 4 or eval_rows.sum() < 1:
                continue
            if head.kind == "classification":
                Yf = F.one_hot(y_fit[name][fit_rows], head.n_outputs).to(mu_fit.dtype)
                Ye = F.one_hot(y_eval[name][eval_rows], head.n_outputs).to(mu_fit.dtype)
            else:
                Yf = y_fit[name][fit_rows].to(mu_fit.dtype)[:, None]
                Ye = y_eval[name][eval_rows].to(mu_fit.dtype)[:, None]
            centre, y_centre = mu_fit[fit_rows].mean(0), Yf.mean(0)
            M = mu_fit[fit_rows] - centre
            gram = M.T @ M
            alpha = ridge * torch.trace(gram) / M.shape[1] + 1e-6
            coef = torch.linalg.solve(gram + alpha * torch.eye(M.shape[1], device=M.device, dtype=M.dtype),
                                      M.T @ (Yf - y_centre))
            pred = (mu_eval[eval_rows] - centre) @ coef + y_centre
            sse += float((Ye - pred).pow(2).sum())
            sst += float((Ye - y_centre).pow(2).sum())
        if sst > 0:
            total += max(0.0, 1.0 - sse / sst)
    return total


def chance_loss(y: np.ndarray, head: AdversaryHead, train_mask: np.ndarray) -> float:
    """The loss of the best constant predictor (train label frequencies / train mean): what a fully
    debiased latent leaves the adversary."""
    if head.kind == "classification":
        labels = y[train_mask & (y >= 0)]
        p = np.bincount(labels, minlength=head.n_outputs) / max(len(labels), 1)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())
    return 1.0  # standardised regression target: variance 1 around the train mean


def encode_targets(adversary_targets: dict, train_mask: np.ndarray) -> tuple[list[AdversaryHead], dict]:
    heads, encoded = [], {}
    for name, (kind, values) in adversary_targets.items():
        if kind == "classification":
            codes = np.asarray(values, dtype=np.int64)
            heads.append(AdversaryHead(name, kind, int(max(codes.max(initial=0) + 1, 2))))
            encoded[name] = codes
        elif kind == "regression":
            v = np.asarray(values, dtype=np.float64)
            tv = v[train_mask & np.isfinite(v)]
            centre, spread = (tv.mean(), tv.std()) if len(tv) else (0.0, 1.0)
            encoded[name] = ((v - centre) / (spread if spread > 0 else 1.0)).astype(np.float32)
            heads.append(AdversaryHead(name, kind, 1))
        else:
            raise ValueError(f"adversary {name}: kind must be classification or regression, not {kind!r}")
    return heads, encoded
