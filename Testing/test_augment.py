"""augment: the transforms are the ones configured, and images and labels move together."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaeuda.augment import AugmentConfig, augment_batch, random_gamma, random_grid, random_intensity_remap

SIZE = 32


def _affine_of(grid: torch.Tensor) -> torch.Tensor:
    """The 2x3 matrices (n, 2, 3) of affine grids (n, S, S, 2): exact least squares over all pixels,
    since each grid point is theta @ (x, y, 1) at the output pixel's normalised (x, y)."""
    identity = F.affine_grid(torch.eye(2, 3)[None], [1, 1, SIZE, SIZE], align_corners=False)[0]
    design = torch.cat([identity.reshape(-1, 2), torch.ones(SIZE * SIZE, 1)], 1).double()   # (S*S, 3)
    targets = grid.reshape(len(grid), -1, 2).double()                                          # (n, S*S, 2)
    solution = torch.linalg.lstsq(design.expand(len(grid), -1, -1), targets).solution          # (n, 3, 2)
    return solution.transpose(1, 2)


def _grids(n=2000, **cfg):
    return random_grid(n, SIZE, AugmentConfig(elastic_alpha=0.0, **cfg), torch.Generator().manual_seed(0), "cpu")


def test_translation_spans_the_configured_fraction_of_the_image():
    """translate 0.06 of the image size: the normalised image spans 2, so offsets reach +-0.12."""
    theta = _affine_of(_grids(rotate_deg=0.0, shear=0.0, scale=0.0, probability=1.0))
    assert torch.allclose(theta[:, :, :2], torch.eye(2, dtype=theta.dtype).expand(len(theta), 2, 2), atol=1e-6)
    offsets = theta[:, :, 2].abs()
    assert offsets.max() <= 0.12 + 1e-6 and offsets.max() > 0.115
    # both ways on each axis, evenly: the mean of 2000 uniform draws on +-0.12 is within 0.0054 (3 sigma) of 0
    signed = theta[:, :, 2]
    assert torch.all(signed.min(dim=0).values < -0.115) and torch.all(signed.max(dim=0).values > 0.115)
    assert torch.all(signed.mean(dim=0).abs() < 0.0054)


def test_rotation_stays_within_the_configured_degrees():
    theta = _affine_of(_grids(rotate_deg=10.0, translate=0.0, shear=0.0, scale=0.0, probability=1.0))
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert angles.abs().max() <= 10.0 + 1e-4 and angles.abs().max() > 9.9
    assert torch.allclose(theta[:, 0, 0], theta[:, 1, 1], atol=1e-6)      # a rotation: [[c, -s], [s, c]]
    assert torch.allclose(theta[:, 0, 1], -theta[:, 1, 0], atol=1e-6)


def test_rotation_shear_and_scale_compose_as_rotation_times_shear_over_scale():
    """theta = R(angle) @ [[1, shear], [0, 1]] / scale: its first column has length 1/scale and its
    determinant is 1/scale^2, so det / |column 1|^2 = 1 exactly; the shear, read back, is within +-0.06."""
    theta = _affine_of(_grids(translate=0.0, probability=1.0))[:, :, :2]
    column = theta[:, :, 0].norm(dim=1)
    assert torch.allclose(torch.linalg.det(theta) / column ** 2, torch.ones(len(theta), dtype=theta.dtype), atol=1e-5)
    assert column.min() >= 1 / 1.08 - 1e-5 and column.max() <= 1 / 0.92 + 1e-5
    rotation_inverse = torch.stack([torch.stack([theta[:, 0, 0], theta[:, 1, 0]], 1),
                                    torch.stack([-theta[:, 1, 0], theta[:, 0, 0]], 1)], 1) / column[:, None, None] ** 2
    shear = (rotation_inverse @ theta)[:, 0, 1] / (rotation_inverse @ theta)[:, 1, 1]
    assert shear.abs().max() <= 0.06 + 1e-5 and shear.abs().max() > 0.059


def test_one_sample_in_ten_keeps_the_identity():
    """probability 0.9 transforms 90 % of the samples; the others keep the identity grid exactly,
    elastic field included."""
    grids = random_grid(2000, SIZE, AugmentConfig(), torch.Generator().manual_seed(0), "cpu")
    identity = F.affine_grid(torch.eye(2, 3)[None], [1, 1, SIZE, SIZE], align_corners=False)
    untouched = (grids == identity).flatten(1).all(1).float().mean().item()
    assert untouched == pytest.approx(0.1, abs=0.02)


def test_gamma_keeps_each_images_range_and_applies_one_power():
    """out = lo + span * ((x - lo) / span) ** gamma per sample, gamma log-uniform in exp(+-0.3)."""
    ramp = torch.linspace(-2.0, 3.0, 11)                        # lo -2, span 5: steps of 0.1 of the span
    images = ramp.view(1, 1, 1, 11).repeat(500, 2, 3, 1)
    out = random_gamma(images, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(out[..., 0], torch.full_like(out[..., 0], -2.0))
    assert torch.allclose(out[..., -1], torch.full_like(out[..., -1], 3.0))
    gamma = torch.log((out[:, 0, 0, 5] + 2) / 5) / math.log(0.5)   # from the midpoint, 0.5 of the span
    expected = -2 + 5 * (torch.arange(11) / 10.0)[None, :] ** gamma[:, None]
    assert torch.allclose(out[:, :, :, :], expected[:, None, None, :].expand_as(out), atol=1e-5)
    assert gamma.log().abs().max() <= 0.3 + 1e-5 and gamma.log().abs().max() > 0.29


def test_labels_follow_the_images_grid_by_nearest_neighbour():
    """Each output label is the input label at the nearest input pixel of the same sampling point
    as the image (align_corners=False: pixel = ((g + 1) * S - 1) / 2), the border pixel's outside;
    so only the input's label values occur."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(16, SIZE, SIZE, dtype=torch.long)
    labels[:, 6:20, 8:26] = 4
    labels[:, 12:28, 4:14] = 2
    images = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out, out_labels = augment_batch(images, labels, AugmentConfig(), gen)
    grid = random_grid(16, SIZE, AugmentConfig(), torch.Generator().manual_seed(3), "cpu").numpy()
    col = np.rint(((grid[..., 0] + 1) * SIZE - 1) / 2).astype(int)
    row = np.rint(((grid[..., 1] + 1) * SIZE - 1) / 2).astype(int)
    n = np.arange(16)[:, None, None]
    expected = labels.numpy()[n, row.clip(0, SIZE - 1), col.clip(0, SIZE - 1)]
    assert set(np.unique(out_labels.numpy())) <= {0, 2, 4}
    assert (out_labels.numpy() == expected).mean() > 0.999      # rounding ties aside
    assert out.shape == images.shape and out_labels.dtype == torch.long


def test_a_structure_at_the_edge_stays_labelled_where_the_image_shows_it():
    """The image replicates its border outside the slice; the label must too, or a shift inward
    draws a strip of the structure's intensity labelled background."""
    labels = torch.zeros(16, SIZE, SIZE, dtype=torch.long)
    labels[:, :, :6] = 2                                   # touches the left edge
    images = (labels == 2).float()[:, None].repeat(1, 3, 1, 1) * 2.0
    cfg = AugmentConfig(rotate_deg=0, shear=0, scale=0, elastic_alpha=0, gamma=0, probability=1.0)
    out, out_labels = augment_batch(images, labels, cfg, torch.Generator().manual_seed(0))
    assert ((out[:, 0] > 1.5).sum((1, 2)) > 6 * SIZE).any()   # a shift right brought the outside in
    assert torch.equal(out_labels == 2, out[:, 0] > 1.0)


def _two_tissue_images(n: int) -> torch.Tensor:
    """(n, 3, 16, 16): left half 0 ("tissue a"), right half 1 ("tissue b"), the same in every slice."""
    images = torch.zeros(n, 3, 16, 16)
    images[..., 8:] = 1.0
    return images


def test_intensity_remap_keeps_each_images_mean_and_std():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 24, 24, generator=gen) * torch.arange(1, 7).view(6, 1, 1, 1) + 5
    out = random_intensity_remap(images, gen)
    assert out.shape == images.shape
    assert torch.allclose(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=1e-4)
    assert torch.allclose(out.std((1, 2, 3)), images.std((1, 2, 3)), atol=1e-4)
    assert not torch.allclose(out, images, atol=1e-2)


def test_intensity_remap_is_one_map_per_image_shared_by_its_slices():
    """Identical slices stay identical (one network per image, not per channel); the networks of
    two images differ, so the same image twice in a batch comes out two ways."""
    gen = torch.Generator().manual_seed(1)
    one = torch.randn(1, 1, 20, 20, generator=gen).expand(2, 3, 20, 20).contiguous()
    out = random_intensity_remap(one, gen)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_intensity_remap_is_seeded_by_the_runs_generator():
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = random_intensity_remap(images, torch.Generator().manual_seed(5))
    b = random_intensity_remap(images, torch.Generator().manual_seed(5))
    c = random_intensity_remap(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_intensity_remap_reverses_tissue_contrast_where_a_gamma_cannot():
    """MR and CT differ by which tissue is brighter at the heart's borders. Over many draws the
    remap puts tissue b below tissue a in a sizeable share of images (centre pixels of each half,
    away from the 3x3 kernels' reach across the border; about a fifth, since the mix with the
    original, alpha ~ U(0, 1), undoes weak reversals), and above it in the others; the paper's
    gamma transform, monotonic, never reverses the order."""
    images = _two_tissue_images(400)
    remapped = random_intensity_remap(images, torch.Generator().manual_seed(3))
    reversed_share = (remapped[:, 0, 8, 3] > remapped[:, 0, 8, 12]).float().mean()
    assert 0.1 < reversed_share < 0.5
    gamma = random_gamma(images, AugmentConfig(gamma=1.0), torch.Generator().manual_seed(3))
    assert bool((gamma[:, 0, 8, 3] < gamma[:, 0, 8, 12]).all())


def test_intensity_remap_layers_are_1x1_or_3x3_at_random():
    """Each layer of each image's network is a 1x1 or a 3x3 convolution with probability 1/2, so
    about 1 image in 16 gets four 1x1 layers: a pointwise map, under which two pixels of equal
    intensity stay equal whatever their neighbours; in the others the neighbours leak in."""
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(256, 3, 16, 16, generator=gen)
    images[:, :, 4, 4] = images[:, :, 11, 11] = 0.5
    out = random_intensity_remap(images, gen)
    pointwise = torch.isclose(out[:, 0, 4, 4], out[:, 0, 11, 11], atol=1e-5, rtol=0)
    assert 5 <= int(pointwise.sum()) <= 40


def test_augment_batch_applies_the_gamma_after_the_spatial_transform():
    """The grid's draws come first, then the gamma's; the gamma is applied to the resampled batch.
    Bilinear resampling mixes neighbours, so gamma-then-resample gives other values: the test tells
    the two orders apart."""
    cfg = AugmentConfig(rotate_deg=20.0, elastic_alpha=0.03, probability=1.0, gamma=0.3)
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 5 + 1
    out, _ = augment_batch(images, None, cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    grid = random_grid(4, SIZE, cfg, gen, "cpu")            # the draws the grid takes first
    state = gen.get_state()

    def resample(x):
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    gamma_after = random_gamma(resample(images), cfg, gen)
    gen.set_state(state)
    gamma_before = resample(random_gamma(images, cfg, gen))
    assert torch.allclose(out, gamma_after, atol=1e-5)
    assert not torch.allclose(out, gamma_before, atol=1e-3)
    assert not torch.allclose(resample(images), images, atol=1e-2)       # the grid did move the batch


def test_the_elastic_field_is_twice_alpha_times_the_smoothed_coarse_noise_on_both_axes():
    """Without the affine part the grid is the identity plus 2 * alpha * a bicubic upsampling of
    (2, g, g) standard normal control points, drawn after the affine parameters."""
    cfg = AugmentConfig(rotate_deg=0.0, translate=0.0, shear=0.0, scale=0.0, elastic_alpha=0.03, elastic_grid=4,
                        probability=1.0)
    grid = random_grid(3, SIZE, cfg, torch.Generator().manual_seed(0), "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):                                      # angle, scale, shear, tx, ty, keep
        torch.rand(3, generator=gen)
    coarse = torch.randn(3, 2, 4, 4, generator=gen)
    disp = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    identity = F.affine_grid(torch.eye(2, 3)[None].expand(3, 2, 3), [3, 1, SIZE, SIZE], align_corners=False)
    assert torch.allclose(grid - identity, 2 * 0.03 * disp, atol=1e-6)
    moved = grid - identity
    assert moved[..., 0].std() > 0.01 and moved[..., 1].std() > 0.01     # both axes displaced


def test_the_two_translations_are_drawn_independently():
    """tx and ty are two draws, each uniform in +-0.12: the offsets fill the square, not its diagonal
    (a shared draw moves every sample along x = y). Uncorrelated, and often far apart."""
    theta = _affine_of(_grids(rotate_deg=0.0, shear=0.0, scale=0.0, probability=1.0))
    tx, ty = theta[:, 0, 2], theta[:, 1, 2]
    assert abs(float(torch.corrcoef(torch.stack([tx, ty]))[0, 1])) < 0.1
    assert (tx - ty).abs().max() > 0.2 and (tx + ty).abs().max() > 0.2      # both diagonals reached


def test_gamma_keeps_each_images_own_range_in_a_batch_of_different_ranges():
    """The range restored is each sample's own [min, max], not the batch's: a ramp over [0, 1], one
    over [10, 30] and one over [-5, -4] keep their ends, and each follows its own power."""
    ramp = torch.linspace(0.0, 1.0, 11)
    images = torch.stack([ramp, 10 + 20 * ramp, -5 + ramp]).view(3, 1, 1, 11).repeat(1, 2, 2, 1)
    out = random_gamma(images, AugmentConfig(), torch.Generator().manual_seed(0))
    for k, (lo, span) in enumerate(((0.0, 1.0), (10.0, 20.0), (-5.0, 1.0))):
        assert out[k].min().item() == pytest.approx(lo, abs=1e-5)
        assert out[k].max().item() == pytest.approx(lo + span, abs=1e-5)
        gamma = math.log((out[k, 0, 0, 5].item() - lo) / span) / math.log(0.5)
        assert torch.allclose(out[k], lo + span * ramp.view(1, 1, 11) ** gamma, atol=1e-4)


def test_gamma_leaves_a_constant_image_constant_and_finite():
    """A blank slice (all one value, e.g. padding outside the body) has no range to rescale: it stays
    that value, not 0/0 = NaN, which would make the training loss NaN."""
    images = torch.full((4, 3, 8, 8), 2.5)
    images[1] = -1.0
    out = random_gamma(images, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.equal(out, images)


def test_intensity_remap_is_the_documented_network_by_hand():
    """Per image, in the order drawn: for each of the 4 layers the (b, cout, cin, 3, 3) N(0, 1) weights,
    the 1x1-or-3x3 coin (rand < 1/2: only the centre tap kept), the N(0, 0.1^2) biases; then alpha ~ U(0, 1).
    Each layer convolves the reflect-padded maps, leaky ReLU (0.2) between layers, none after the last;
    the result is alpha * net(x) + (1 - alpha) * x, standardised and given back x's mean and std."""
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 12, 12, generator=gen) * 4 - 1
    out = random_intensity_remap(images, torch.Generator().manual_seed(11))
    draws = torch.Generator().manual_seed(11)
    layers = []
    for layer, (cin, cout) in enumerate(((1, 2), (2, 2), (2, 2), (2, 1))):
        weight = torch.randn(2, cout, cin, 3, 3, generator=draws)
        pointwise = torch.rand(2, generator=draws) < 0.5
        bias = torch.randn(2 * cout, generator=draws).view(2, cout) * 0.1
        layers.append((weight, pointwise, bias))
    alpha = torch.rand(2, generator=draws)
    coins = torch.stack([p for _, p, _ in layers])
    assert coins.any() and not coins.all()                                 # 1x1 and 3x3 layers in this draw
    for k in range(2):
        x = images[k][:, None]                                              # (C, 1, H, W): slices share the network
        for layer, (weight, pointwise, bias) in enumerate(layers):
            w = weight[k].clone()
            if pointwise[k]:
                centre = w[..., 1, 1].clone()
                w.zero_()
                w[..., 1, 1] = centre
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, bias[k])
            if layer < 3:
                x = F.leaky_relu(x, 0.2)
        mixed = alpha[k] * x[:, 0] + (1 - alpha[k]) * images[k]
        expected = (mixed - mixed.mean()) / mixed.std() * images[k].std() + images[k].mean()
        torch.testing.assert_close(out[k], expected, atol=1e-4, rtol=1e-4)
