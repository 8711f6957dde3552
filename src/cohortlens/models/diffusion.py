"""Gaussian diffusion schedule and deterministic DDIM encode/decode for the diffusion autoencoder.

Everything here is written for cohortlens (no MONAI scheduler is stepped):

- the linear beta schedule of Ho et al. (betas evenly spaced from ``beta_start`` to ``beta_end`` over
  ``timesteps`` steps) and its cumulative product ``alphas_cumprod`` (ᾱ_t), computed in float64 and kept as
  float32 buffers. It is the same ᾱ as MONAI's ``DDPMScheduler(schedule="linear_beta")``; a test checks that.
- forward noising ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` for the ε-prediction training loss;
- DDIM (Song et al. 2021, η = 0) on a uniform grid of timesteps, in both directions. MONAI 1.6's
  ``DDIMScheduler.step`` derives its previous timestep from ``timesteps // steps`` while ``set_timesteps``
  builds its grid differently, so the two disagree unless ``steps == timesteps``; here one grid,
  :meth:`DiffusionSchedule.ddim_timesteps`, serves both :meth:`~DiffusionSchedule.ddim_decode` and
  :meth:`~DiffusionSchedule.ddim_encode`, which is what makes encode the inverse of decode.

The DDIM levels are ``clean (ᾱ = 1), τ_0 = 0, τ_1, …, τ_{S-1} = T-1``. Decoding steps down the levels with
``x̂_0 = (x_i - sqrt(1-ᾱ_i) ε) / sqrt(ᾱ_i)`` and ``x_{i-1} = sqrt(ᾱ_{i-1}) x̂_0 + sqrt(1-ᾱ_{i-1}) ε``,
ε = ε_θ(x_i, τ_i). Encoding runs the same update upwards with ε taken at the lower level (ε_θ(x_{i-1},
τ_{i-1}); the clean level uses τ_0 = 0, where ᾱ_0 = 1 - β_0 ≈ 0.9999). Both directions therefore use the
same ε at each step up to one step of drift, and the round trip error vanishes as the steps grow.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""ε-prediction ``eps_fn(x_t, t)``: x_t (B, C, H, W), t (B,) long timesteps → ε (B, C, H, W)."""


class DiffusionSchedule(nn.Module):
    """Linear-beta DDPM schedule (buffers move with ``.to(device)``) with ε-space DDIM in both directions."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        super().__init__()
        if timesteps < 2:
            raise ValueError(f"diffusion: timesteps must be >= 2, got {timesteps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"diffusion: need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.timesteps = int(timesteps)
        betas = torch.linspace(beta_start, beta_end, self.timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Non-persistent: derived from the config, so checkpoints hold only learned weights and an EMA
        # over the state dict never averages constants.
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt().float(),
                             persistent=False)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) sample for per-sample timesteps t (B,), gathered on-device (no host sync)."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return (self.sqrt_alphas_cumprod[t].view(shape) * x0
                + self.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise)

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None,
                         power: float = 1.0) -> Tensor:
        """Training timesteps t = floor(T · u^power), u uniform on [0, 1): uniform for power 1 (drawn as
        `randint`), noisier steps more often below 1 (E[t] ≈ T / (1 + power)); always in [0, T - 1]."""
        if power == 1.0:
            return torch.randint(0, self.timesteps, (batch,), device=device, generator=generator)
        u = torch.rand(batch, device=device, generator=generator)
        return (self.timesteps * u.pow(power)).long().clamp_(max=self.timesteps - 1)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Uniform grid τ_0 = 0 < … < τ_{S-1} = T-1 (plain ints: building it never touches the device)."""
        steps = int(steps)
        if not 2 <= steps <= self.timesteps:
            raise ValueError(f"diffusion: ddim steps must be in [2, {self.timesteps}], got {steps}")
        grid = torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
        return grid

    def _ddim_levels(self, steps: int) -> tuple[list[int], list[float]]:
        grid = self.ddim_timesteps(steps)
        # ᾱ per level as host floats, read once from a CPU copy: the loops below then do no
        # device->host transfers per step.
        acp = self.alphas_cumprod.detach().to("cpu", torch.float64)
        return grid, [1.0] + [float(acp[t]) for t in grid]  # index 0 is the clean level

    def _effective_eps(self, eps_fn: EpsFn, x: Tensor, t_int: int, a_t: float, clip_x0: bool) -> Tensor:
        """ε at timestep t; with ``clip_x0`` the implied x̂_0 is clipped to the data range [-1, 1] and ε is
        re-derived from it (ε' = (x - sqrt(ᾱ_t) clip(x̂_0)) / sqrt(1 - ᾱ_t)).

        Clipping keeps an imperfect model's x̂_0 — divided by sqrt(ᾱ_t) ≈ 0.006 at t = T-1 — from blowing up
        a decode. ε' depends only on (x, t), i.e. it is just another ε-model, so encode and decode stay
        exact inverses of each other whenever both clip (or both do not).
        """
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t).float()
        if clip_x0:
            x0_hat = ((x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1.0, 1.0)
            eps = (x - a_t ** 0.5 * x0_hat) / (1.0 - a_t) ** 0.5
        return eps

    @staticmethod
    def _move(x: Tensor, eps: Tensor, a_from: float, a_to: float) -> Tensor:
        """One deterministic DDIM move between noise levels ᾱ=a_from → ᾱ=a_to with a fixed ε."""
        x0_hat = (x - (1.0 - a_from) ** 0.5 * eps) / a_from ** 0.5
        return a_to ** 0.5 * x0_hat + (1.0 - a_to) ** 0.5 * eps

    @torch.no_grad()
    def ddim_decode(self, eps_fn: EpsFn, x_T: Tensor, steps: int, clip_x0: bool = True) -> Tensor:
        """x_T (at τ_{S-1} = T-1) → x_0 with S ε-evaluations. Returns float32."""
        grid, levels = self._ddim_levels(steps)
        x = x_T.float()
        for i in range(len(grid) - 1, -1, -1):
            eps = self._effective_eps(eps_fn, x, grid[i], levels[i + 1], clip_x0)
            x = self._move(x, eps, levels[i + 1], levels[i])
        return x

    @torch.no_grad()
    def ddim_encode(self, eps_fn: EpsFn, x0: Tensor, steps: int, clip_x0: bool = True) -> Tensor:
        """x_0 → x_T (at τ_{S-1} = T-1), the inverse of :meth:`ddim_decode` with the same ``steps``."""
        grid, levels = self._ddim_levels(steps)
        x = x0.float()
        for i in range(len(grid)):
            # ε at the level we start from; the clean level borrows τ_0 = 0 (ᾱ_0 ≈ 0.9999).
            j = max(i - 1, 0)
            eps = self._effective_eps(eps_fn, x, grid[j], levels[j + 1], clip_x0)
            x = self._move(x, eps, levels[i], levels[i + 1])
        return x
