"""Slice CNN and sequence model.

The slice CNN is a MONAI backbone's convolutional trunk, global average pooling and one
linear head (so a class-activation map from the served feature maps equals Grad-CAM).
The sequence model is a bidirectional GRU/LSTM over a series' [embedding, sigmoid(CNN
logits)], predicting a residual on top of the CNN logits of each slice.
"""

from __future__ import annotations

import torch
from torch import nn

from triage_node import CLASSES

N_CLASSES = len(CLASSES)

#: Backbones by name. "resnet-lite" is a narrow MONAI ResNet for a 2-core CPU budget;
#: "resnet-ich" is a ResNet-10 of width 32 whose last stage keeps stride 16 (not 32), so the
#: served feature maps, and the heat maps made from them, are twice as fine.
BACKBONES: tuple[str, ...] = (
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


class _EfficientNetTrunk(nn.Module):
    """Stem, MBConv blocks and 1x1 head convolution of :class:`monai.networks.nets.EfficientNetBN`."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import EfficientNetBN

        net = EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=3, num_classes=N_CLASSES)
        net.set_swish(memory_efficient=False)  # plain x*sigmoid(x): exportable to ONNX
        self.net = net
        self.out_channels = int(net._fc.in_features)
        # the backbone's own pooling/fc are not used
        net._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        x = n._blocks(x)
        x = n._conv_head(n._conv_head_padding(x))
        return n._swish(n._bn1(x))


class _ResNetTrunk(nn.Module):
    """conv1 ... layer4 of :class:`monai.networks.nets.ResNet` (2D)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        if name == "resnet-lite":
            kw = dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[24, 48, 96, 192])
        elif name == "resnet-ich":
            kw = dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[32, 64, 128, 256])
        elif name == "resnet18":
            kw = dict(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512])
        elif name == "resnet34":
            kw = dict(block="basic", layers=[3, 4, 6, 3], block_inplanes=[64, 128, 256, 512])
        else:  # pragma: no cover - guarded by build_backbone
            raise ValueError(name)
        net = ResNet(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, num_classes=N_CLASSES, **kw)
        net.fc = nn.Identity()
        if name == "resnet-ich":  # output stride 16: the first block of layer4 does not stride
            net.layer4[0].conv1.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        self.net = net
        self.out_channels = int(kw["block_inplanes"][-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class _SENetTrunk(nn.Module):
    """``features()`` of MONAI's SE-ResNeXt (2D)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from monai.networks.nets import SEResNext50, SEResNext101

        cls = SEResNext50 if name == "seresnext50" else SEResNext101
        net = cls(spatial_dims=2, in_channels=3, num_classes=N_CLASSES, pretrained=False)
        self.out_channels = int(net.last_linear.in_features)
        net.last_linear = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_backbone(name: str) -> nn.Module:
    """Convolutional trunk by name (one of :data:`BACKBONES`), with ``out_channels``."""
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

    def __init__(self, backbone: str = "efficientnet-b0", dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.trunk = build_backbone(backbone)
        self.feature_dim = int(self.trunk.out_channels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, N_CLASSES)

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

    def __init__(self, feature_dim: int, hidden: int = 96, cell: str = "gru", layers: int = 1, dropout: float = 0.3):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.feature_dim = feature_dim
        self.cell = cell
        self.hidden = hidden
        self.reduce = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim + N_CLASSES, hidden), nn.ReLU())
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden + N_CLASSES, N_CLASSES))
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        probs = sequence[..., self.feature_dim :]
        cnn_logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
        h, _ = self.rnn(self.reduce(sequence))
        return cnn_logits + self.head(torch.cat([h, probs], dim=-1))


def rsna_weights(device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-class weights of the RSNA 2019 metric: any x2, others x1."""
    return torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=device)


def rsna_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with logits weighted as the RSNA 2019 metric (``any`` counts twice), mean over items."""
    w = rsna_weights(logits.device)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    return (loss * w).sum(-1).mean() / w.sum()
