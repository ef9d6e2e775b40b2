"""Heat maps from served outputs against autograd Grad-CAM / Grad-CAM++ on the PyTorch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.model.networks import SliceCNN
from worker.pipeline.explain import cam, cam_pp, overlay

torch.set_num_threads(2)
SIZE = 128


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = SliceCNN("resnet-lite").eval()
    with torch.no_grad():  # a head that is not tiny, so every class has support
        model.head.weight.normal_(0, 0.5)
        model.head.weight[:, : model.feature_dim // 2].abs_()
    x = torch.rand(1, 3, SIZE, SIZE)
    x[:, :, 10:30, 35:55] += 1.0  # a bright region makes the maps non-uniform
    return model, x


def _autograd_gradcam(model, x, k, plus=False):
    feats = {}

    def hook(_m, _i, out):
        out.retain_grad()
        feats["a"] = out

    h = model.trunk.register_forward_hook(hook)
    logits, _, _ = model(x)
    h.remove()
    model.zero_grad()
    logits[0, k].backward()
    a, g = feats["a"][0].detach(), feats["a"].grad[0]
    if plus:
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + (a.sum(dim=(1, 2), keepdim=True) * g3)).where(g2 != 0, torch.ones_like(g2))
        w = (alpha * F.relu(g)).sum(dim=(1, 2))
    else:
        w = g.mean(dim=(1, 2))
    m = F.relu((w[:, None, None] * a).sum(0))
    return m.numpy(), a.numpy()


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("k", range(6))
def test_cam_from_features_matches_autograd_gradcam(model_and_input, k):
    model, x = model_and_input
    ref, feats = _autograd_gradcam(model, x, k)
    with torch.no_grad():
        _, _, served = model(x)
    np.testing.assert_allclose(served[0].numpy(), feats, atol=1e-5)
    w = model.head.weight[k].detach().numpy()
    # at feature resolution the maps agree exactly up to the positive scale 1/hw
    mine = cam(served[0].numpy(), w, feats.shape[-1])
    expect = ref / ref.max() if ref.max() > 0 else ref
    np.testing.assert_allclose(mine, expect, atol=1e-5)
    # upsampled to the input size, both bilinear: correlation >= 0.99
    up_ref = F.interpolate(torch.from_numpy(ref)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
    up = cam(served[0].numpy(), w, SIZE)
    assert up.shape == (SIZE, SIZE) and up.min() >= 0.0 and up.max() == pytest.approx(1.0)
    assert _corr(up, up_ref) >= 0.99


def test_cam_pp_matches_autograd_gradcam_pp(model_and_input):
    model, x = model_and_input
    for k in range(6):
        ref, feats = _autograd_gradcam(model, x, k, plus=True)
        mine = cam_pp(feats, model.head.weight[k].detach().numpy(), feats.shape[-1])
        if ref.max() == 0:
            assert mine.max() == 0
            continue
        np.testing.assert_allclose(mine, ref / ref.max(), atol=1e-4)


def test_cam_of_unsupported_class_is_zero_and_shapes_are_checked():
    f = np.ones((4, 2, 2), np.float32)
    assert cam(f, -np.ones(4), 8).max() == 0.0
    with pytest.raises(ValueError):
        cam(f, np.ones(3), 8)


def test_overlay_colours_only_hot_pixels():
    gray = np.full((8, 8), 0.5, np.float32)
    heat = np.zeros((8, 8), np.float32)
    heat[2, 2] = 1.0
    rgb = overlay(gray, heat)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[7, 7]) == (128, 128, 128)
    assert rgb[2, 2, 0] > rgb[2, 2, 2]
