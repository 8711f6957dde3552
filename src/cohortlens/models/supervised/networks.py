"""The networks of the supervised engine: MONAI's ResNet10, ResNet34 and DenseNet121, 2-D with one input channel.

`width` scales every channel count (ResNet: MONAI's `widen_factor` on the block widths 64-128-256-512; DenseNet: the
stem's 64 features and the growth rate 32), so a CPU demo can run the architecture at 1/8 of its channels; the
depth (layers per stage, dense blocks 6-12-24-16) is always the named one. The ResNet stem convolution has stride
`stem_stride` (torchvision's and the paper-era ImageNet ResNets' 2; MONAI defaults to 1, which quadruples the cost
of every later layer at 256 px). The output is one linear layer over all heads' outputs (`heads.Head`).
"""

from __future__ import annotations

from torch import nn

ARCHITECTURES = ("resnet10", "resnet34", "densenet121")

# The last convolutional block, whose activations GradCAM weighs (monai.visualize.GradCAM `target_layers`).
GRADCAM_LAYERS = {"resnet10": "layer4", "resnet34": "layer4", "densenet121": "class_layers.relu"}


def build_network(arch: str, n_outputs: int, *, width: float = 1.0, stem_stride: int = 2) -> nn.Module:
    """A freshly initialised 2-D network with one input channel and `n_outputs` outputs (torch's global RNG decides
    the weights: seed it first)."""
    from monai.networks import nets

    if n_outputs < 1:
        raise ValueError(f"a network needs at least one output, not {n_outputs}")
    if arch in ("resnet10", "resnet34"):
        factory = nets.resnet10 if arch == "resnet10" else nets.resnet34
        net = factory(spatial_dims=2, n_input_channels=1, num_classes=n_outputs, widen_factor=width,
                      conv1_t_stride=stem_stride)
    elif arch == "densenet121":
        net = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=n_outputs,
                               init_features=max(2, round(64 * width)), growth_rate=max(1, round(32 * width)))
    else:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    net.arch = arch
    return net
