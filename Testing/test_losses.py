"""Loss terms against hand-computed values and a Monte-Carlo estimate."""
import math

import torch

from vaeuda.losses import SegmentationLoss, gan_loss, kl_to_standard_normal, reconstruction


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 1.0, -0.5, 2.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, -1.0, 0.7, 0.3]).view(1, 4, 1, 1)
    n = 400_000
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((n, 4, 1, 1), generator=g)
    log_q = -0.5 * (((z - mu) / std) ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
    mc = (log_q - log_p).mean()
    closed = kl_to_standard_normal(mu, logvar)
    assert abs(float(closed) - float(mc)) < 0.01
    # and the hand value of the first element: N(0,1) vs N(0,1) is zero, N(1, e^-1): 0.5 (1 + e^-1 + 1 - 1)
    assert float(kl_to_standard_normal(mu[:, :1], logvar[:, :1])) == 0.0
    assert abs(float(kl_to_standard_normal(mu[:, 1:2], logvar[:, 1:2])) - 0.5 * (1 + math.exp(-1) + 1 - 1)) < 1e-6


def test_reconstruction_is_mean_absolute_error():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, -3.0], [0.0, 2.0]]]])
    assert float(reconstruction(b, a)) == 1.5


def test_segmentation_loss_perfect_vs_wrong():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.full((1, 5, 4, 4), -20.0)
    perfect[:, 0][target == 0] = 20.0
    perfect[:, 1][target == 1] = 20.0
    wrong = perfect.flip(1)
    loss = SegmentationLoss([1.0, 2.0, 1.0, 1.0, 1.0])
    assert float(loss(perfect, target)) < 0.02
    assert float(loss(wrong, target)) > 5.0


def test_gan_loss_lsgan_values():
    scores = [torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 1, 1), 1.0)]
    # real: (0.5-1)^2 + (1-1)^2 = 0.25 ; fake: 0.25 + 1
    assert float(gan_loss(scores, True)) == 0.25
    assert float(gan_loss(scores, False)) == 1.25
