"""The two networks of the diffusion autoencoder (:mod:`cohortlens.models.dae`) and their blocks.

- :class:`SemanticEncoder` — the UNet's encoder path without time conditioning and with one more downsampling
  level, pooled and projected to ``z_sem``;
- :class:`ConditionalUNet` — the ε-prediction UNet whose every residual block is conditioned on the timestep
  and on ``z_sem``.

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
- the UNet and encoder wiring and the semantic pooling head (the training loss, the DDIM encode/decode and
  the QA grids are :mod:`cohortlens.models.dae`'s; the schedule is :mod:`cohortlens.models.diffusion`'s, not
  MONAI's schedulers).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.diffusion_model_unet import DiffusionUnetDownsample, get_timestep_embedding
from torch import Tensor, nn

# Initial gain of the semantic head (the Linear from pooled features to z_sem). Pooled GroupNorm-ed
# features differ little between images, so with PyTorch's default init z_sem varies across images by
# ~0.04 per dimension; the z_sem scale in the UNet then barely depends on the image, its gradient back
# to the encoder is as small, and the decoder learns to ignore z_sem for hundreds of steps before the two
# find each other (measured on the 32-px test model with Adam at lr 2e-3: z_sem starts to matter after
# ~600 steps with gain 1, after ~200-400 with gain 10). Gain 10 gives z_sem an across-image spread of
# ~0.4-0.6 per dimension from step one.
SEMANTIC_HEAD_INIT_GAIN = 10.0


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
