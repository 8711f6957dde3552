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

What is MONAI's and what is ours
--------------------------------
MONAI (1.6) building blocks used as they are:

- ``monai.networks.nets.diffusion_model_unet.get_timestep_embedding`` — sinusoidal timestep features;
- ``monai.networks.blocks.Convolution`` (``conv_only=True``) — every 3×3 / 1×1 convolution;
- ``monai.networks.nets.diffusion_model_unet.DiffusionUnetDownsample`` (``use_conv=True``) — stride-2 3×3
  convolution between levels, in the UNet and the encoder;
- ``monai.networks.blocks.Upsample`` (``mode="nontrainable"``, nearest, with a 3×3 ``post_conv``) — the
  UNet's upsampling, configured as in MONAI's own ``DiffusionModelUNet``.

Ours (written here):

- :class:`ResBlock` — GroupNorm/SiLU/conv residual block with the DiffAE conditioning (time scale-shift,
  then z_sem scale). MONAI's ``DiffusionModelUNet`` adds a class embedding to the time embedding (a shift
  only) or conditions through cross-attention; neither is the multiplicative z_sem path of DiffAE, so
  its ``DiffusionUNetResnetBlock`` is not used. The encoder uses the same block with no conditioning.
- :class:`SelfAttention2d` — spatial multi-head self-attention on ``torch.nn.functional
  .scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA). MONAI's
  ``SpatialAttentionBlock`` / ``SABlock`` would do, but they need ``einops`` at run time.
- the UNet and encoder wiring, the semantic pooling head, the training loss, the DDIM encode/decode
  (:mod:`cohortlens.models.diffusion`, not MONAI's schedulers) and the QA grids.

Design choices that guard against the known DiffAE failure (z_sem getting no gradient, a decoder that
ignores it):

- no zero-initialised layers. The reference code (following guided-diffusion) initialises the last
  convolution of every residual block and the UNet's output convolution to zero; everything upstream of
  a zero output convolution, z_sem and every encoder weight included, then gets exactly zero gradient on
  the first backward pass (a test shows both this and that every encoder parameter gets a gradient here).
- the semantic head starts with gain :data:`SEMANTIC_HEAD_INIT_GAIN` so that z_sem differs between
  images from step one (see the constant for the measurements);
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
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.diffusion_model_unet import DiffusionUnetDownsample, get_timestep_embedding
from torch import Tensor, nn

from cohortlens.models.diffusion import DiffusionSchedule

# Initial gain of the semantic head (the Linear from pooled features to z_sem). Pooled GroupNorm-ed
# features differ little between images, so with PyTorch's default init z_sem varies across images by
# ~0.04 per dimension; the z_sem scale in the UNet then barely depends on the image, its gradient back
# to the encoder is as small, and the decoder learns to ignore z_sem for hundreds of steps before the two
# find each other (measured on the 32-px test model with Adam at lr 2e-3: z_sem starts to matter after
# ~600 steps with gain 1, after ~200-400 with gain 10). Gain 10 gives z_sem an across-image spread of
# ~0.4-0.6 per dimension from step one.
SEMANTIC_HEAD_INIT_GAIN = 10.0

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


def conv(in_ch: int, out_ch: int, kernel: int = 3) -> Convolution:
    return Convolution(spatial_dims=2, in_channels=in_ch, out_channels=out_ch, strides=1,
                       kernel_size=kernel, padding=kernel // 2, conv_only=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; with ``time_dim``/``z_dim`` it is DiffAE's conditioned block.

    Conditioning after the second GroupNorm: ``h·(1 + t_scale) + t_shift`` from the time embedding,
    then ``h·(1 + z_scale)`` from z_sem. The callers pass SiLU(time embedding) and SiLU(z_sem), computed
    once per forward pass; each block owns its Linear projections.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, time_dim: int | None = None,
                 z_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, in_ch)
        self.conv_in = conv(in_ch, out_ch)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch) if time_dim else None
        self.z_proj = nn.Linear(z_dim, out_ch) if z_dim else None
        self.norm_out = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv_out = conv(out_ch, out_ch)
        self.skip = nn.Identity() if in_ch == out_ch else conv(in_ch, out_ch, kernel=1)

    def forward(self, x: Tensor, t_act: Tensor | None = None, z_act: Tensor | None = None) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = self.norm_out(h)
        if self.time_proj is not None:
            t_scale, t_shift = self.time_proj(t_act)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + t_scale) + t_shift
        if self.z_proj is not None:
            h = h * (1 + self.z_proj(z_act)[:, :, None, None])
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"dae: {channels} channels not divisible into {self.heads} heads")
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = conv(channels, 3 * channels, kernel=1)
        self.proj = conv(channels, channels, kernel=1)

    def forward(self, x: Tensor, t_act: Tensor | None = None, z_act: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = DiffusionUnetDownsample(spatial_dims=2, num_channels=channels, use_conv=True)

    def forward(self, x: Tensor, t_act: Tensor | None = None, z_act: Tensor | None = None) -> Tensor:
        return self.op(x)


class UpsampleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Upsample(spatial_dims=2, in_channels=channels, out_channels=channels, scale_factor=2.0,
                           mode="nontrainable", interp_mode="nearest", align_corners=None,
                           post_conv=conv(channels, channels))

    def forward(self, x: Tensor, t_act: Tensor | None = None, z_act: Tensor | None = None) -> Tensor:
        return self.op(x)


class Stage(nn.ModuleList):
    """A run of blocks that all receive the same (t, z) conditioning."""

    def forward(self, x: Tensor, t_act: Tensor | None = None, z_act: Tensor | None = None) -> Tensor:
        for block in self:
            x = block(x, t_act, z_act)
        return x


class SemanticEncoder(nn.Module):
    """Half-UNet without time input: levels × res blocks (+ attention), middle block, pooled → z_sem."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        base, groups = cfg["base_channels"], cfg["norm_groups"]
        res = cfg["image_size"]
        attn = set(cfg["attention_resolutions"])
        mults = cfg["encoder_channel_mult"]
        self.conv_in = conv(cfg["in_channels"], base)
        stages, ch = [], base
        for level, mult in enumerate(mults):
            blocks: list[nn.Module] = []
            for _ in range(cfg["num_res_blocks"]):
                blocks.append(ResBlock(ch, base * mult, groups))
                ch = base * mult
                if res in attn:
                    blocks.append(SelfAttention2d(ch, cfg["attention_head_channels"], groups))
            if level < len(mults) - 1:
                blocks.append(Downsample(ch))
                res //= 2
            stages.append(Stage(blocks))
        self.levels = nn.ModuleList(stages)
        self.middle = Stage([ResBlock(ch, ch, groups), SelfAttention2d(ch, cfg["attention_head_channels"], groups),
                             ResBlock(ch, ch, groups)])
        self.norm_out = nn.GroupNorm(groups, ch)
        self.to_z = nn.Linear(ch, cfg["z_dim"])
        with torch.no_grad():
            self.to_z.weight.mul_(SEMANTIC_HEAD_INIT_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.levels:
            h = stage(h)
        h = F.silu(self.norm_out(self.middle(h)))
        return self.to_z(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ConditionalUNet(nn.Module):
    """ε-prediction UNet; every residual block is conditioned on the timestep and on z_sem."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        base, groups, z_dim = cfg["base_channels"], cfg["norm_groups"], cfg["z_dim"]
        head_ch, dropout = cfg["attention_head_channels"], cfg["dropout"]
        self.base_channels = base
        time_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        attn = set(cfg["attention_resolutions"])
        mults = cfg["channel_mult"]
        n_res = cfg["num_res_blocks"]

        def block(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, groups, time_dim=time_dim, z_dim=z_dim, dropout=dropout)

        self.conv_in = conv(cfg["in_channels"], base)
        # Down path: every Stage's output is one skip connection (the standard guided-diffusion layout).
        self.down = nn.ModuleList()
        skip_ch, ch, res = [base], base, cfg["image_size"]
        for level, mult in enumerate(mults):
            for _ in range(n_res):
                blocks: list[nn.Module] = [block(ch, base * mult)]
                ch = base * mult
                if res in attn:
                    blocks.append(SelfAttention2d(ch, head_ch, groups))
                self.down.append(Stage(blocks))
                skip_ch.append(ch)
            if level < len(mults) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_ch.append(ch)
                res //= 2
        self.middle = Stage([block(ch, ch), SelfAttention2d(ch, head_ch, groups), block(ch, ch)])
        # Up path: n_res + 1 blocks per level, each eating one skip; upsample at the end of a level.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(n_res + 1):
                blocks = [block(ch + skip_ch.pop(), base * mult)]
                ch = base * mult
                if res in attn:
                    blocks.append(SelfAttention2d(ch, head_ch, groups))
                if level > 0 and i == n_res:
                    blocks.append(UpsampleBlock(ch))
                self.up.append(Stage(blocks))
            if level > 0:
                res *= 2
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = conv(ch, cfg["in_channels"])

    def forward(self, x_t: Tensor, t: Tensor, z_sem: Tensor) -> Tensor:
        temb = self.time_mlp(get_timestep_embedding(t, self.base_channels).to(x_t.dtype))
        t_act, z_act = F.silu(temb), F.silu(z_sem)
        h = self.conv_in(x_t)
        skips = [h]
        for stage in self.down:
            h = stage(h, t_act, z_act)
            skips.append(h)
        h = self.middle(h, t_act, z_act)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), t_act, z_act)
        return self.conv_out(F.silu(self.norm_out(h)))


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
        t = self.schedule.sample_timesteps(x.shape[0], x.device)
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


__all__ = ["DEFAULT_CONFIG", "DEMO_TINY_CONFIG", "DiffusionAutoencoder", "SemanticEncoder", "ConditionalUNet",
           "ResBlock", "SelfAttention2d", "resolve_config", "image_grid", "grid_tile", "parameter_count"]
