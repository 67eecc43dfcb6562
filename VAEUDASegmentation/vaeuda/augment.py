"""Batched data augmentation on torch tensors, as the paper lists: small rotations,
translations, shears (and scaling), elastic deformation, gamma transforms; and, opt-in and not
part of the paper, a random non-linear intensity remapping (:func:`random_intensity_remap`).

Why not MONAI's ``RandAffined``/``Rand2DElasticd``: they transform one sample at a time with
their own random state; here every training batch is transformed in one ``grid_sample`` call
(on the CPU, before the batch moves to the training device), driven by the one seeded
``torch.Generator`` of the run, so a seed gives the same batches on any machine. (Intensity normalisation is
done per volume when slices are made, see ``volumes``.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    rotate_deg: float = 10.0       # uniform in +-rotate_deg
    translate: float = 0.06        # fraction of the image size
    shear: float = 0.06            # shear factor
    scale: float = 0.08            # uniform in 1 +- scale
    elastic_alpha: float = 0.03    # displacement amplitude, fraction of the image size
    elastic_grid: int = 4          # control points per side of the random displacement field
    gamma: float = 0.3             # log-uniform gamma in exp(+-gamma)
    probability: float = 0.9       # fraction of samples that get the spatial transform

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, bound: float, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * 2 - 1).mul_(bound).to(device)


def random_grid(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Sampling grid (n, size, size, 2) for ``grid_sample``: affine plus smooth elastic displacement."""
    angle = _uniform(n, math.radians(cfg.rotate_deg), gen, device)
    scale = 1 + _uniform(n, cfg.scale, gen, device)
    shear = _uniform(n, cfg.shear, gen, device)
    tx, ty = _uniform(n, 2 * cfg.translate, gen, device), _uniform(n, 2 * cfg.translate, gen, device)
    keep = (torch.rand(n, generator=gen) < cfg.probability).to(device).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (-sin + shear * cos) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = (cos + shear * sin) / scale
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=device).expand(n, 2, 3)
    theta = keep[:, None, None] * theta + (1 - keep[:, None, None]) * identity
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    if cfg.elastic_alpha > 0:
        coarse = torch.randn(n, 2, cfg.elastic_grid, cfg.elastic_grid, generator=gen).to(device)
        disp = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        grid = grid + 2 * cfg.elastic_alpha * keep[:, None, None, None] * disp.permute(0, 2, 3, 1)
    return grid


def random_gamma(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-sample gamma on the [min, max] range of each image, range restored afterwards. (B, C, H, W)."""
    b = images.shape[0]
    gamma = torch.exp(_uniform(b, cfg.gamma, gen, images.device)).view(b, 1, 1, 1)
    flat = images.reshape(b, -1)
    lo = flat.min(1).values.view(b, 1, 1, 1)
    hi = flat.max(1).values.view(b, 1, 1, 1)
    span = (hi - lo).clamp_min(1e-6)
    return ((images - lo) / span).clamp(0, 1).pow(gamma) * span + lo


def augment_batch(images: torch.Tensor, labels: Optional[torch.Tensor], cfg: AugmentConfig,
                  gen: torch.Generator) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """images (B, C, S, S) float, labels (B, S, S) int64 or None -> the same shapes, transformed alike.

    Images are resampled bilinearly, labels by nearest neighbour; where the grid reaches outside
    the slice both replicate their border, so a structure that touches the edge stays labelled
    where the image shows it.
    """
    b, _, size, _ = images.shape
    grid = random_grid(b, size, cfg, gen, images.device)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = random_gamma(out, cfg, gen)
    if labels is not None:
        lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
        labels = lab[:, 0].round().long()
    return out, labels


REMAP_LAYERS = 4          # GIN's depth and width (Ouyang et al. 2021, "Causality-inspired
REMAP_WIDTH = 2           # single-source domain generalization for medical image segmentation")
REMAP_BIAS_STD = 0.1
REMAP_SLOPE = 0.2         # leaky ReLU


def random_intensity_remap(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Global intensity non-linear augmentation (GIN, Ouyang et al. 2021). (B, C, H, W) -> (B, C, H, W).

    Each image goes through its own randomly drawn shallow network: REMAP_LAYERS convolutions
    (each 1x1 or 3x3 at random, weights N(0, 1), REMAP_WIDTH channels between layers) with leaky
    ReLUs. Its C channels (adjacent slices) share the network, so they stay one consistent
    volume. The result is mixed with the original by alpha ~ U(0, 1) and given back the original
    image's mean and standard deviation. Unlike a gamma, the map can be non-monotonic and reverse
    the contrast between tissues, which is what separates MR from CT at the heart's borders.
    """
    b = images.shape[0]
    dims = (1, 2, 3)
    ring = torch.ones(3, 3)
    ring[1, 1] = 0                            # zeroing it turns a 3x3 kernel into a 1x1 one
    x = images.transpose(0, 1)                # (C, B, H, W): slices as the batch, one group per image
    cin = 1
    for layer in range(REMAP_LAYERS):
        cout = 1 if layer == REMAP_LAYERS - 1 else REMAP_WIDTH
        weight = torch.randn(b, cout, cin, 3, 3, generator=gen)
        pointwise = torch.rand(b, generator=gen) < 0.5            # this image's layer is a 1x1 convolution
        weight = weight * (1 - pointwise.float().view(b, 1, 1, 1, 1) * ring)
        bias = torch.randn(b * cout, generator=gen) * REMAP_BIAS_STD
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight.view(b * cout, cin, 3, 3).to(x.device),
                     bias.to(x.device), groups=b)
        if layer < REMAP_LAYERS - 1:
            x = F.leaky_relu(x, REMAP_SLOPE)
        cin = cout
    alpha = torch.rand(b, 1, 1, 1, generator=gen).to(images.device)
    mixed = alpha * x.transpose(0, 1) + (1 - alpha) * images
    mixed = (mixed - mixed.mean(dims, keepdim=True)) / mixed.std(dims, keepdim=True).clamp_min(1e-6)
    return mixed * images.std(dims, keepdim=True) + images.mean(dims, keepdim=True)
