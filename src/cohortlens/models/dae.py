"""The ``dae`` model: a Diffusion Autoencoder (Preechakul et al., CVPR 2022) for 1-channel slices.

Two networks trained end to end with one loss, the ε-prediction diffusion MSE:

- :class:`SemanticEncoder` — the UNet's encoder path *without* time conditioning and with one more
  downsampling level than the UNet, global-average-pooled and projected by a linear layer to one vector
  ``z_sem`` per image. It always sees the clean image x_0. ``z_sem`` is the embedding (:meth:`embed`).
- :class:`ConditionalUNet` — an ε-prediction UNet (T = 1000, linear betas) whose every residual block
  modulates its second GroupNorm with the time embedding *and* z_sem (adaptive GroupNorm):
  ``h = GN(h) · (1 + t_scale) + t_shift``, then ``h = h · (1 + z_scale)`` with
  ``z_scale = Linear(SiLU(z_sem))`` per block.

Together with DDIM (:mod:`cohortlens.models.diffusion`) the pair is an autoencoder: ``ddim_encode``
inverts x_0 to the stochastic code x_T under its z_sem, ``ddim_decode`` maps (x_T, z_sem) back.

The networks, and which of their blocks are MONAI's: :mod:`cohortlens.models.dae_networks`.

Design choices that guard against the known DiffAE failure (z_sem getting no gradient, a decoder that
ignores it):

- no zero-initialised layers. The reference code (following guided-diffusion) initialises the last
  convolution of every residual block and the UNet's output convolution to zero; everything upstream of
  a zero output convolution, z_sem and every encoder weight included, then gets exactly zero gradient on
  the first backward pass (a test shows both this and that every encoder parameter gets a gradient here).
- the semantic head starts with gain :data:`~cohortlens.models.dae_networks.SEMANTIC_HEAD_INIT_GAIN` so that
  z_sem differs between images from step one (see the constant for the measurements);
- z_sem scales every residual block of the UNet (down, middle and up), and ``training_loss`` logs the
  across-batch spread of z_sem (``z_sem_std``), so a collapsing encoder is visible in ``train_log.csv``.

Device and precision are the trainer's: nothing here picks a device, every tensor is created on the
input's device, there are no Python loops over the batch, and :meth:`training_loss` never syncs with
the host (its logged values are detached 0-dim tensors; ``float()`` them when writing a log line).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cohortlens.models.dae_networks import ConditionalUNet, SemanticEncoder
from cohortlens.models.diffusion import DiffusionSchedule

# The full preset: 256-px crops and a 512-d z_sem (poster 001), a DiffAE-style UNet at half the width of
# the reference FFHQ-256 model (base 64 instead of 128) so that training stays fast at 256² in bf16.
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 256,            # training crop / embedding crop (px); must divide by 2**(levels-1)
    "in_channels": 1,
    "base_channels": 64,
    "channel_mult": [1, 1, 2, 2, 4, 4],   # UNet levels: 256,128,64,32,16,8 px
    "encoder_channel_mult": None,         # None: channel_mult + [channel_mult[-1]] (one more level)
    "num_res_blocks": 2,
    "attention_resolutions": [16],        # feature-map sizes (px) with self-attention, plus the middle block
    "attention_head_channels": 64,
    "norm_groups": 32,
    "dropout": 0.1,                       # UNet residual blocks only; the encoder has none
    "z_dim": 512,
    "timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 2e-2,
    # Training timesteps t = floor(T · u^power), u uniform (`DiffusionSchedule.sample_timesteps`): 1 is the usual
    # uniform t; below 1 noisier steps come more often (density of t/T ∝ (t/T)^(1/power - 1)). There x_t tells the
    # UNet little and z_sem must carry the image, so a short run's encoder learns its semantics sooner.
    "timestep_power": 1.0,
    # Learning rate of the semantic encoder relative to the trainer's lr (the UNet keeps the lr): the encoder is
    # trained only through the UNet's conditioning, so in a short run it moves least.
    "encoder_lr_mult": 1.0,
    "ddim_steps": 100,                    # DDIM steps for the QA encode/decode
    "qa_images": 8,                       # columns in the QA grids
}

# A CPU-sized preset for the demo's 64-px slices (0.6 M parameters; on one loaded CPU core ~1.7 s per
# batch-16 training step and ~165 embedded slices/s).
DEMO_TINY_CONFIG: dict[str, Any] = {
    **DEFAULT_CONFIG,
    "image_size": 64,
    "base_channels": 16,
    "channel_mult": [1, 2, 2, 2],         # 64,32,16,8 px; encoder down to 4 px
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "attention_head_channels": 16,
    "norm_groups": 8,
    "dropout": 0.0,
    "z_dim": 32,
    "ddim_steps": 50,
}


def resolve_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULT_CONFIG overridden by ``cfg``; unknown keys are an error (a typo must not be silently ignored)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"dae: unknown config keys {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    out = {**DEFAULT_CONFIG, **cfg}
    out["channel_mult"] = [int(m) for m in out["channel_mult"]]
    if out["encoder_channel_mult"] is None:
        out["encoder_channel_mult"] = out["channel_mult"] + [out["channel_mult"][-1]]
    out["encoder_channel_mult"] = [int(m) for m in out["encoder_channel_mult"]]
    out["attention_resolutions"] = sorted(int(r) for r in out["attention_resolutions"])
    if len(out["encoder_channel_mult"]) != len(out["channel_mult"]) + 1:
        raise ValueError("dae: the semantic encoder has exactly one more level than the UNet "
                         f"(channel_mult {out['channel_mult']}, encoder_channel_mult {out['encoder_channel_mult']})")
    levels = len(out["encoder_channel_mult"])
    if out["image_size"] % 2 ** (levels - 1):
        raise ValueError(f"dae: image_size {out['image_size']} must be divisible by 2**{levels - 1} "
                         f"({levels} encoder levels)")
    for mult in {*out["channel_mult"], *out["encoder_channel_mult"]}:
        ch = out["base_channels"] * mult
        if ch % out["norm_groups"]:
            raise ValueError(f"dae: {ch} channels not divisible by norm_groups {out['norm_groups']}")
    if out["qa_images"] < 2:
        raise ValueError("dae: qa_images must be >= 2 (the QA swaps z_sem between images)")
    return out



def image_grid(rows: Sequence[Tensor], pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """Rows of equally many (N, 1, H, W) images → one (1, H_grid, W_grid) image with white separators."""
    n, _, h, w = rows[0].shape
    grid = torch.full((1, len(rows) * (h + pad) + pad, n * (w + pad) + pad), pad_value)
    for r, imgs in enumerate(rows):
        imgs = imgs.detach().float().cpu().clamp(-1, 1)
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, y:y + h, x:x + w] = imgs[c]
    return grid


def grid_tile(grid: Tensor, row: int, col: int, size: tuple[int, int], pad: int = 2) -> Tensor:
    """The (1, H, W) tile at (row, col) of an :func:`image_grid`."""
    h, w = size
    y, x = pad + row * (h + pad), pad + col * (w + pad)
    return grid[:, y:y + h, x:x + w]


class DiffusionAutoencoder(nn.Module):
    """The trainer's ``AutoencoderModel`` for ``dae``: ``training_loss``, ``embed``, ``qa_images``.

    Submodules: ``encoder`` (:class:`SemanticEncoder`, the only part :meth:`embed` runs — its EMA weights
    are the embedding model), ``unet`` (:class:`ConditionalUNet`, the decoder) and ``schedule``
    (:class:`~cohortlens.models.diffusion.DiffusionSchedule`, buffers only, nothing to train or average).
    """

    name = "dae"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__()
        self.config = resolve_config(cfg)
        self.embedding_dim = int(self.config["z_dim"])
        self.encoder = SemanticEncoder(self.config)
        self.unet = ConditionalUNet(self.config)
        self.schedule = DiffusionSchedule(self.config["timesteps"], self.config["beta_start"],
                                          self.config["beta_end"])

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "DiffusionAutoencoder":
        """Build from a resolved models.dae config entry (the registry calls it): the keys of DEFAULT_CONFIG it
        holds (trainer keys are ignored), on top of the CPU-sized DEMO_TINY_CONFIG for the demo preset; the
        trainer's `crop` is the `image_size` and `latent_dim` the `z_dim`."""
        base = DEMO_TINY_CONFIG if cfg.get("preset") == "demo" else {}
        model_cfg = {**{k: v for k, v in base.items() if k in DEFAULT_CONFIG},
                     **{k: v for k, v in cfg.items() if k in DEFAULT_CONFIG}}
        if "crop" in cfg:
            if "image_size" in cfg and int(cfg["image_size"]) != int(cfg["crop"]):
                raise ValueError(f"dae: image_size {cfg['image_size']} differs from the training crop {cfg['crop']}")
            model_cfg["image_size"] = int(cfg["crop"])
        if "latent_dim" in cfg:
            model_cfg["z_dim"] = int(cfg["latent_dim"])
        return cls(model_cfg)

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimiser's parameter groups: the encoder at `encoder_lr_mult` × lr, the rest at lr."""
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": encoder, "lr": lr * float(self.config["encoder_lr_mult"])}]

    def forward(self, x_t: Tensor, t: Tensor, z_sem: Tensor) -> Tensor:
        """ε̂(x_t, t, z_sem)."""
        return self.unet(x_t, t, z_sem)

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Diffusion MSE on a random timestep per image; the encoder sees the clean x.

        Returns the loss and detached 0-dim tensors to log (no host sync here): ``mse`` and
        ``z_sem_std``, the mean over dimensions of z_sem's standard deviation across the batch (→ 0 if
        the encoder collapses to a constant).
        """
        z_sem = self.encoder(x)
        t = self.schedule.sample_timesteps(x.shape[0], x.device, power=float(self.config["timestep_power"]))
        noise = torch.randn_like(x, dtype=torch.float32)
        x_t = self.schedule.add_noise(x.float(), noise, t).to(x.dtype)
        eps = self.unet(x_t, t, z_sem)
        loss = F.mse_loss(eps.float(), noise)
        z_std = z_sem.detach().float().std(dim=0, correction=0).mean()
        return loss, {"mse": loss.detach(), "z_sem_std": z_std}

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """z_sem (B, embedding_dim), float32: one forward pass of the encoder. The encoder has no dropout
        or batch statistics, so the result does not depend on train/eval mode or on the batch."""
        return self.encoder(x).float()

    def eps_fn(self, z_sem: Tensor):
        """ε-prediction under a fixed z_sem, in the ``eps_fn(x_t, t)`` form DDIM takes."""
        return lambda x_t, t: self.unet(x_t, t, z_sem)

    @torch.no_grad()
    def ddim_encode(self, x0: Tensor, z_sem: Tensor, steps: int | None = None, clip_x0: bool = True) -> Tensor:
        """Deterministic x_0 → x_T conditioned on z_sem (the stochastic code)."""
        return self.schedule.ddim_encode(self.eps_fn(z_sem), x0, steps or self.config["ddim_steps"], clip_x0)

    @torch.no_grad()
    def ddim_decode(self, x_T: Tensor, z_sem: Tensor, steps: int | None = None, clip_x0: bool = True) -> Tensor:
        """Deterministic x_T → x_0 conditioned on z_sem."""
        return self.schedule.ddim_decode(self.eps_fn(z_sem), x_T, steps or self.config["ddim_steps"], clip_x0)

    @torch.no_grad()
    def qa_decodes(self, x: Tensor, steps: int | None = None, seed: int = 0) -> dict[str, Tensor]:
        """The QA decodes as (N, 1, H, W) batches (N = min(len(x), qa_images) >= 2), in eval mode.

        - ``input``: x_0;  ``roundtrip``: decode(encode(x_0, z), z);
        - ``other_z``: decode(encode(x_0, z), z of the next image) — x_T kept, semantics swapped;
        - ``shared_noise``: ONE x_T (seeded Gaussian) decoded under every image's z_sem: differences
          between its columns come from z_sem alone.
        """
        n = min(x.shape[0], self.config["qa_images"])
        if n < 2:
            raise ValueError("dae: qa_images needs at least 2 images")
        was_training = self.training
        self.eval()
        try:
            x0 = x[:n]
            z = self.embed(x0).to(x0.dtype)
            x_T = self.ddim_encode(x0, z, steps)
            gen = torch.Generator(device=x.device).manual_seed(seed)
            noise = torch.randn((1, *x0.shape[1:]), generator=gen, device=x.device).expand_as(x0)
            return {
                "input": x0.float(),
                "roundtrip": self.ddim_decode(x_T, z, steps),
                "other_z": self.ddim_decode(x_T, z.roll(-1, dims=0), steps),
                "shared_noise": self.ddim_decode(noise.contiguous(), z, steps),
            }
        finally:
            self.train(was_training)

    @torch.no_grad()
    def qa_images(self, x: Tensor) -> dict[str, Tensor]:
        """Named (1, H_grid, W_grid) grids in [-1, 1] (columns = images, white 2-px separators):

        - ``reconstruction``: rows x_0 | decode(encode(x_0)) | decode(encode(x_0)) under the next
          column's z_sem;
        - ``shared_noise_z_sem``: rows x_0 (whose z_sem is used) | one shared x_T decoded under that z_sem.
        """
        d = self.qa_decodes(x)
        return {
            "reconstruction": image_grid([d["input"], d["roundtrip"], d["other_z"]]),
            "shared_noise_z_sem": image_grid([d["input"], d["shared_noise"]]),
        }


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["DEFAULT_CONFIG", "DEMO_TINY_CONFIG", "DiffusionAutoencoder", "resolve_config", "image_grid", "grid_tile",
           "parameter_count"]
