"""Training augmentation of windowed slices, on whole batches with torch.

82 patients from one hospital are all the real data the weights see, so the augmentation
stands in for what other hospitals change: head position and size in the frame (rotation,
scale, shift, mirror), reconstruction window and kernel (window and gamma jitter, blur,
noise), and slice thickness (thin slices make the neighbours almost equal to the centre).
Inputs are windowed values in 0..1 where 0 is everything below the window (air, fat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5  # probability of a left-right mirror
    rotate_deg: float = 15.0
    scale: float = 0.12  # zoom by 1 +- scale
    shift: float = 0.06  # fraction of the side
    window_level: float = 0.06  # shift of the window's lower edge, fraction of its width
    window_width: float = 0.15  # relative change of the window width
    gamma: float = 0.2  # gamma in [1/(1+g), 1+g]
    noise: float = 0.03  # largest noise SD
    blur: float = 0.25  # probability of a Gaussian blur (softer kernel)
    thin: float = 0.15  # probability that the neighbour channels copy the centre slice


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig(), adjacent: bool = False) -> torch.Tensor:
    """A randomly changed copy of a batch [B, C, S, S]; each item draws its own changes.

    ``adjacent``: the channels are neighbouring slices (s-1, s, s+1), so "thin" applies.
    """
    b = x.shape[0]
    if adjacent and cfg.thin > 0:
        thin = (torch.rand(b, generator=gen) < cfg.thin).view(b, 1, 1, 1)
        x = torch.where(thin, x[:, 1:2].expand_as(x), x)
    flip = (torch.rand(b, generator=gen) < cfg.flip).view(b, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    # one affine warp per item: rotation, isotropic zoom, shift (grid_sample fills with 0 = air)
    ang = _uniform(b, -1, 1, gen) * math.radians(cfg.rotate_deg)
    zoom = 1 + _uniform(b, -cfg.scale, cfg.scale, gen)
    tx, ty = _uniform(b, -2 * cfg.shift, 2 * cfg.shift, gen), _uniform(b, -2 * cfg.shift, 2 * cfg.shift, gen)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # another reconstruction window: what was 0 stays 0 (it was below the window)
    body = x > 0
    level = _uniform(b, -cfg.window_level, cfg.window_level, gen).view(b, 1, 1, 1)
    width = (1 + _uniform(b, -cfg.window_width, cfg.window_width, gen)).view(b, 1, 1, 1)
    gamma = torch.exp(_uniform(b, -math.log1p(cfg.gamma), math.log1p(cfg.gamma), gen)).view(b, 1, 1, 1)
    x = torch.where(body, ((x - level) / width).clamp(0, 1) ** gamma, x)
    if cfg.blur > 0:
        soft = torch.rand(b, generator=gen) < cfg.blur
        if soft.any():
            x[soft] = _blur(x[soft], float(_uniform(1, 0.5, 1.2, gen)))
    if cfg.noise > 0:
        sd = _uniform(b, 0, cfg.noise, gen).view(b, 1, 1, 1)
        x = torch.where(body, (x + sd * torch.randn(x.shape, generator=gen)).clamp(0, 1), x)
    return x
