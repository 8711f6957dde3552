"""GradCAM maps of a supervised network (MONAI `monai.visualize.GradCAM` on the layer `networks.GRADCAM_LAYERS`
names): per slice, the ReLU of the class score's gradient-weighted activations of that layer, upsampled to the
crop (bilinear), each map scaled to unit mass so that every slice counts the same in a mean.

MONAI's default post-processing (`default_normalizer`) maps each map's (min, max) to (1, 0), i.e. it inverts the
map; it is replaced by the identity here and the scaling is done on the raw map. A slice without any positive
evidence for the class (an all-zero map) has no mass to scale: it stays zero, and `n_empty` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cohortlens.models.supervised.data import CenterCrops
from cohortlens.models.supervised.networks import GRADCAM_LAYERS


@dataclass
class GradCAMMaps:
    maps: np.ndarray  # (n, H, W) float32, each summing to 1 (or all zero: n_empty of them)
    n_empty: int


def gradcam_maps(network: nn.Module, data: CenterCrops, class_idx: int, *, layer: str | None = None,
                 device: torch.device | None = None) -> GradCAMMaps:
    """The unit-mass GradCAM map of `class_idx` for every crop of `data`, in order (fp32, eval mode). `layer`:
    default the network's GRADCAM_LAYERS entry (its `arch`). The network gets MONAI's hooks (and its in-place
    activations made out-of-place): use it only for maps afterwards."""
    from monai.visualize import GradCAM

    layer = layer or GRADCAM_LAYERS[getattr(network, "arch", "resnet10")]
    device = device or next(network.parameters()).device
    network.eval()
    cam = GradCAM(nn_module=network, target_layers=layer, postprocessing=lambda m: m)
    out = []
    with torch.enable_grad():
        for i in range(len(data)):
            x = data[i].to(device=device, dtype=torch.float32)
            out.append(cam(x=x, class_idx=int(class_idx))[:, 0].detach().float().cpu().numpy())
    crop = data.crop
    maps = np.concatenate(out) if out else np.zeros((0, crop, crop), np.float32)
    mass = maps.reshape(len(maps), -1).sum(1)
    scaled = np.where(mass[:, None, None] > 0, maps / np.maximum(mass, 1e-30)[:, None, None], 0.0)
    return GradCAMMaps(scaled.astype(np.float32), int((mass <= 0).sum()))
