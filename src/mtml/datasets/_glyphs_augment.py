"""Random distortions that turn clean glyph prototypes into hand-drawn-looking examples (``glyphs`` dataset).

Per example, all driven by one ``torch.Generator``: a stroke-width change (grey-scale erosion or dilation by
3×3 min/max pooling), a random affine map (rotation, shear, anisotropic scale, translation) and an elastic warp
(a coarse grid of Gaussian displacements, upsampled bicubically to a smooth field), applied in one
``grid_sample`` at twice the output resolution, then 2×2 average-pooled to ``image_size``. None of these adds
pixel noise: the character stays whole, only its pose, shape and weight vary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.errors import ConfigError

__all__ = ["GlyphAugment", "augment"]

_BATCH = 2048  # examples distorted at once (fixed: the random stream must not depend on memory)


@dataclass(frozen=True)
class GlyphAugment:
    """Strength of each distortion.

    Args:
        rotation: maximum rotation in degrees (uniform in ±rotation).
        shear: maximum shear angle in degrees.
        scale: log-uniform overall scale in ``[1/(1+scale), 1+scale]``.
        aspect: log-uniform x/y stretch in ``[1/(1+aspect), 1+aspect]``.
        translate: maximum shift as a fraction of the image side.
        elastic: standard deviation of the warp displacements, as a fraction of the image side.
        elastic_grid: side of the coarse displacement grid (smaller = smoother warp).
        thin, thick: probabilities of eroding / dilating the strokes by one pixel (at twice the resolution).
    """

    rotation: float = 15.0
    shear: float = 10.0
    scale: float = 0.15
    aspect: float = 0.15
    translate: float = 0.11
    elastic: float = 0.03
    elastic_grid: int = 4
    thin: float = 0.2
    thick: float = 0.3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"glyphs augment: `{name}` must be a finite number >= 0. Got {value}.")
        if self.elastic_grid < 2 or int(self.elastic_grid) != self.elastic_grid:
            raise ConfigError(f"glyphs augment: `elastic_grid` must be an integer >= 2. Got {self.elastic_grid}.")
        if self.thin + self.thick > 1:
            raise ConfigError(f"glyphs augment: `thin` + `thick` are probabilities and must sum to <= 1. Got "
                              f"{self.thin} + {self.thick}.")


def _uniform(n: int, half_width: float, g: torch.Generator) -> Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * half_width


def _affine(n: int, aug: GlyphAugment, g: torch.Generator) -> Tensor:
    """``[n, 2, 3]`` output→input maps for ``affine_grid`` (normalised coordinates)."""
    angle = torch.deg2rad(_uniform(n, aug.rotation, g))
    shear = torch.tan(torch.deg2rad(_uniform(n, aug.shear, g)))
    scale = torch.exp(_uniform(n, math.log1p(aug.scale), g))
    aspect = torch.exp(_uniform(n, math.log1p(aug.aspect), g))
    shift = _uniform(2 * n, 2 * aug.translate, g).view(n, 2)  # the image spans 2 normalised units
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    shr = torch.zeros(n, 2, 2)
    shr[:, 0, 0] = 1
    shr[:, 1, 1] = 1
    shr[:, 0, 1] = shear
    stretch = torch.diag_embed(torch.stack([scale * aspect.sqrt(), scale / aspect.sqrt()], -1))
    forward = rot @ shr @ stretch  # glyph → image; grid_sample needs image → glyph
    inverse = torch.linalg.inv(forward)
    offset = -(inverse @ shift.unsqueeze(-1))
    return torch.cat([inverse, offset], -1)


def _stroke(x: Tensor, aug: GlyphAugment, g: torch.Generator) -> Tensor:
    """Erode, keep or dilate each image of ``x: [n, 1, H, W]``."""
    u = torch.rand(x.shape[0], generator=g)
    thin, thick = u < aug.thin, (u >= aug.thin) & (u < aug.thin + aug.thick)
    out = x.clone()
    out[thick] = _max3(x[thick])
    out[thin] = -_max3(-x[thin])
    return out


def _max3(x: Tensor) -> Tensor:
    """3×3 grey-scale dilation of ``x: [n, 1, H, W]`` (two separable 1-D max filters)."""
    return F.max_pool2d(F.max_pool2d(x, (3, 1), 1, (1, 0)), (1, 3), 1, (0, 1))


def _distort(x: Tensor, aug: GlyphAugment, g: torch.Generator) -> Tensor:
    """``x: float [n, 1, C, C]`` in [0, 1] → distorted ``[n, 1, C, C]``."""
    n, side = x.shape[0], x.shape[-1]
    x = _stroke(x, aug, g)
    grid = F.affine_grid(_affine(n, aug, g), [n, 1, side, side], align_corners=False)
    k = int(aug.elastic_grid)
    coarse = torch.randn(n, 2, k, k, generator=g) * (2 * aug.elastic)
    field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
    grid = grid + field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(prototypes: Tensor, index: Tensor, aug: GlyphAugment, generator: torch.Generator, *,
            progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Distorted examples of ``prototypes: uint8 [P, C, C]`` (``C`` even): example ``i`` starts from prototype
    ``index[i]``. Returns ``uint8 [len(index), C // 2, C // 2]``; ``progress(done, total)`` after each batch."""
    side = prototypes.shape[-1]
    if side % 2:
        raise ConfigError(f"glyphs: prototype canvas must be even (2 × image_size). Got {side}.")
    out = torch.empty(len(index), side // 2, side // 2, dtype=torch.uint8)
    for start in range(0, len(index), _BATCH):
        chunk = index[start : start + _BATCH]
        x = prototypes[chunk].unsqueeze(1).float() / 255.0
        y = F.avg_pool2d(_distort(x, aug, generator), 2)
        out[start : start + len(chunk)] = (y.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8)
        if progress is not None:
            progress(start + len(chunk), len(index))
    return out
