"""β-VAE with a Hessian penalty on the decoder (paper 003's "β-VAE + Hessian" baseline; poster 001's settings).

A small convolutional VAE for one-channel slices in [-1, 1], assembled from MONAI blocks (`ResidualUnit`,
`Convolution`):

- encoder: per level a strided residual unit (halves the size), then Linear layers to μ and log σ²;
- decoder: Linear from z to the smallest feature map, per level a transposed convolution (doubles the size) and a
  residual unit, then one plain convolution to one channel: no normalisation, activation or sigmoid on the output
  (images live in [-1, 1], and the loss is a likelihood on the raw output). MONAI's `VarAutoEncoder` was the first
  choice, but its last block instance-normalises the one-channel output map, which fights the constant -1
  background of these slices;
- GroupNorm (or InstanceNorm): no batch statistics, so the decoder gives the same output for a latent whatever
  else is in the batch and in train or eval mode, which the Hessian penalty's finite differences need (it
  evaluates the decoder 2k+1 times in one batch);
- the bottleneck is a Linear layer over the whole feature map: position in the field of view is part of the
  embedding (a shifted field of view is a finding), so the input size is fixed at construction (`image_size`,
  divisible by 2^len(channels)).

Loss per batch (means over the batch of per-image sums, i.e. the negative ELBO up to constants, plus the penalty):

    loss = Σ_pixels rec(x̂, x) + β · KL(q(z|x) ‖ N(0, I)) + λ · HessianPenalty(decoder, z)

with rec = squared error ("mse", a Gaussian likelihood) or absolute error ("l1"). Summing over pixels (not averaging)
keeps β meaningful at any image size: β = 1 is the plain VAE. The penalty is taken at the posterior samples z,
detached, so it shapes the decoder only (as in the paper, where z has no parameters of its own); `hessian_batch`
limits it to the first latents of the batch (the 2k+1 decoder passes dominate the step time on a CPU).
The embedding is the encoder mean μ (deterministic).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import Tensor, nn

from cohortlens.models.hessian import hessian_penalty

NORMS = ("group", "instance")


def _act(kind: str):
    # leaky ReLU 0.2 as in the GANs the Hessian penalty was introduced on (ProGAN); any MONAI name works
    return ("leakyrelu", {"negative_slope": 0.2}) if kind == "leakyrelu" else kind


def _norm(kind: str, channels: int):
    if kind == "group":
        return ("group", {"num_groups": min(8, channels)})
    return ("instance", {"affine": True})


class ConvEncoder(nn.Module):
    def __init__(self, image_size: int, channels: Sequence[int], latent_dim: int, norm: str, act: str, subunits: int):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers.append(ResidualUnit(2, c_in, c, strides=2, subunits=subunits, act=_act(act), norm=_norm(norm, c)))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.grid = image_size // 2 ** len(channels)
        flat = c_in * self.grid * self.grid
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x).flatten(1)
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    def __init__(self, image_size: int, channels: Sequence[int], latent_dim: int, norm: str, act: str, subunits: int):
        super().__init__()
        self.grid = image_size // 2 ** len(channels)
        self.top = int(channels[-1])
        self.project = nn.Linear(latent_dim, self.top * self.grid * self.grid)
        # mirror of the encoder: the feature sizes the encoder had at each scale; at full resolution only the
        # upsampling convolution and the output convolution (the costliest scale, as in MONAI's autoencoders)
        outs = list(channels[:-1])[::-1] + [channels[0]]
        layers, c_in = [], self.top
        for level, c in enumerate(outs):
            layers.append(Convolution(2, c_in, c, strides=2, kernel_size=3, is_transposed=True, act=_act(act),
                                      norm=_norm(norm, c)))
            if level < len(outs) - 1:
                layers.append(ResidualUnit(2, c, c, subunits=subunits, act=_act(act), norm=_norm(norm, c)))
            c_in = c
        self.upsample = nn.Sequential(*layers)
        self.out = Convolution(2, c_in, 1, kernel_size=3, conv_only=True)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], self.top, self.grid, self.grid)
        return self.out(self.upsample(h))


class BetaVAE(nn.Module):
    name = "vae"

    def __init__(
        self,
        image_size: int = 256,
        latent_dim: int = 128,
        channels: Sequence[int] = (32, 64, 128, 256, 256),
        subunits: int = 2,
        norm: str = "group",
        act: str = "leakyrelu",
        beta: float = 1.0,
        hessian_weight: float = 5e-6,
        hessian_samples: int = 2,
        hessian_epsilon: float = 0.1,
        hessian_batch: int | None = None,
        recon_loss: str = "mse",
    ):
        super().__init__()
        depth = len(channels)
        if image_size % (2**depth):
            raise ValueError(f"vae: image_size {image_size} is not divisible by 2^{depth} (one halving per channel level)")
        if recon_loss not in ("mse", "l1"):
            raise ValueError(f"vae: recon_loss must be 'mse' or 'l1', got {recon_loss!r}")
        if norm not in NORMS:
            raise ValueError(f"vae: norm must be one of {sorted(NORMS)} (batch-independent), got {norm!r}")
        self.image_size = int(image_size)
        self.embedding_dim = int(latent_dim)
        self.beta = float(beta)
        self.hessian_weight = float(hessian_weight)
        self.hessian_samples = int(hessian_samples)
        self.hessian_epsilon = float(hessian_epsilon)
        self.hessian_batch = int(hessian_batch) if hessian_batch else None
        self.recon_loss = recon_loss
        channels = [int(c) for c in channels]
        self.encoder = ConvEncoder(self.image_size, channels, self.embedding_dim, norm, act, int(subunits))
        self.decoder = ConvDecoder(self.image_size, channels, self.embedding_dim, norm, act, int(subunits))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BetaVAE":
        """Build from a models.vae config entry (trainer keys in it are ignored)."""
        keys = ("latent_dim", "channels", "subunits", "norm", "act", "beta", "hessian_weight",
                "hessian_samples", "hessian_epsilon", "hessian_batch", "recon_loss")
        kwargs = {k: cfg[k] for k in keys if k in cfg}
        return cls(image_size=int(cfg["crop"]), **kwargs)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x)
        # bounds keep exp(logvar) finite at the high learning rates of the poster (5e-3) early in training
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        x_hat = self.decode(z)
        err = (x_hat.float() - x.float()).flatten(1)
        rec = (err.square() if self.recon_loss == "mse" else err.abs()).sum(1).mean()
        mu32, logvar32 = mu.float(), logvar.float()
        kl = (-0.5 * (1 + logvar32 - mu32.square() - logvar32.exp()).sum(1)).mean()
        loss = rec + self.beta * kl
        parts = {"recon": rec.detach(), "kl": kl.detach()}
        if self.hessian_weight > 0:
            # the penalty costs 2k+1 extra decoder passes; on small machines it may use the first latents only
            z_h = z.detach()[: self.hessian_batch] if self.hessian_batch else z.detach()
            hp = hessian_penalty(self.decode, z_h, k=self.hessian_samples, epsilon=self.hessian_epsilon)
            loss = loss + self.hessian_weight * hp
            parts["hessian"] = hp.detach()
        return loss, parts

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return self.encode(x)[0].float()

    @torch.no_grad()
    def qa_images(self, x: Tensor) -> dict[str, Tensor]:
        mu, _ = self.encode(x)
        return {"input": x, "reconstruction": self.decode(mu).clamp(-1, 1)}
