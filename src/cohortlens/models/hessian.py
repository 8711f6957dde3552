"""The Hessian penalty (Peebles et al., "The Hessian Penalty: A Weak Prior for Unsupervised Disentanglement",
ECCV 2020): pushes the Hessian of a generator G with respect to its input z towards a diagonal matrix, so that
each latent coordinate changes the output independently of the others.

For a Rademacher vector v (entries ±1 with probability 1/2) the quadratic form vᵀHv = Σ_i H_ii + Σ_{i≠j} H_ij v_i v_j
has the diagonal part as a constant and the off-diagonal part as its only random term. Its variance over v is

    Var_v[vᵀHv] = Var[2 Σ_{i<j} H_ij v_i v_j] = 4 Σ_{i<j} H_ij² = 2 Σ_{i≠j} H_ij²

(the products v_i v_j of distinct pairs are pairwise uncorrelated with variance 1), which is zero exactly when H is
diagonal. The penalty estimates it for every output element of G with

- vᵀHv ≈ [G(z + εv) − 2 G(z) + G(z − εv)] / ε²  (central second difference along v; exact for quadratic G),
- the unbiased sample variance over k vectors v (k = 2 in the paper),
- then a reduction over output elements: the paper's default "max" (penalise the worst pixel).

G must be deterministic across the 2k+1 evaluations: no dropout, and normalisation layers that do not depend on
the other batch members or update running statistics (GroupNorm / InstanceNorm, or BatchNorm in eval mode).
All 2k+1 latents are evaluated in one batched call of G.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA for the duration of the block.

    cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default; like bfloat16 that would drown the
    second difference in rounding noise.
    """
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def rademacher(shape: tuple[int, ...], *, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Entries ±1 with probability 1/2, dtype and device of `like`."""
    bits = torch.randint(0, 2, shape, device=like.device, generator=generator)
    return (bits * 2 - 1).to(like.dtype)


def second_directional_differences(
    G: Callable[[Tensor], Tensor], z: Tensor, k: int = 2, epsilon: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[G(z+εv) − 2G(z) + G(z−εv)] / ε² for k Rademacher vectors v per sample: shape (k, *G(z).shape)."""
    if k < 2:
        raise ValueError(f"the Hessian penalty needs k >= 2 samples for a variance, got k={k}")
    v = rademacher((k, *z.shape), like=z, generator=generator) * epsilon
    # one call: [z, z+εv_1, …, z+εv_k, z−εv_1, …, z−εv_k] stacked along the batch axis
    batch = torch.cat([z, *(z + v), *(z - v)], dim=0)
    out = G(batch)
    n = z.shape[0]
    centre = out[:n]
    plus = out[n : n * (k + 1)].unflatten(0, (k, n))
    minus = out[n * (k + 1) :].unflatten(0, (k, n))
    return (plus - 2 * centre.unsqueeze(0) + minus) / (epsilon**2)


def hessian_penalty(
    G: Callable[[Tensor], Tensor],
    z: Tensor,
    k: int = 2,
    epsilon: float = 0.1,
    reduction: str | None = "max",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hessian penalty of G at the latents z (batch first).

    reduction: "max" (paper default: over every output element of the whole batch), "mean", or None for the
    per-element variance estimate (shape of G(z)); its expectation is 2 Σ_{i≠j} H_ij² of that element.

    Evaluated in IEEE float32 with autocast and TF32 off: the second difference divides by ε² = 0.01 a difference
    of nearly equal outputs, and bfloat16's 8-bit (TF32's 10-bit) mantissa would leave mostly rounding noise.
    """
    with torch.autocast(device_type=z.device.type, enabled=False), ieee_float32(z.device):
        sdd = second_directional_differences(G, z.float(), k, epsilon, generator)
        var = sdd.var(dim=0, unbiased=True)
    if reduction is None:
        return var
    if reduction == "max":
        return var.max()
    if reduction == "mean":
        return var.mean()
    raise ValueError(f"unknown Hessian penalty reduction {reduction!r} (max | mean | None)")
