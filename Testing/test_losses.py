"""Loss terms against hand-computed values and a Monte-Carlo estimate."""
import math

import pytest
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


def test_kl_is_the_mean_over_batch_channels_and_positions():
    """The normalisation that fixes what lambda_KL = 0.1 means (Docs/method.md): per-element KLs of
    the four channels above are 0, 0.5 (1 + e^-1) = 0.683940, 0.5 (0.25 + e^0.7 - 1.7) = 0.281877 and
    0.5 (4 + e^0.3 - 1.3) = 2.024929, mean 0.747687. Repeated over 2x2 positions, beside a second
    batch element at the prior (KL 0), the mean is half that: 0.373843."""
    mu = torch.tensor([0.0, 1.0, -0.5, 2.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    logvar = torch.tensor([0.0, -1.0, 0.7, 0.3]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert float(kl_to_standard_normal(mu, logvar)) == pytest.approx(0.747687, abs=1e-6)
    at_prior = torch.zeros(1, 4, 2, 2)
    batch_mu, batch_logvar = torch.cat([mu, at_prior]), torch.cat([logvar, at_prior])
    assert float(kl_to_standard_normal(batch_mu, batch_logvar)) == pytest.approx(0.373843, abs=1e-6)


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


def test_segmentation_loss_uniform_logits_is_foreground_softmax_dice_plus_cross_entropy():
    """Dice over the 4 foreground classes of softmax probabilities, plus plain CE (catches
    include_background=True -> 2.4317 and sigmoid instead of softmax -> 2.3594)."""
    target = torch.tensor([[[0, 1], [2, 3]]])
    logits = torch.zeros(1, 5, 2, 2)            # softmax: 0.2 everywhere
    # classes 1-3: 1 - 2*0.2 / (4*0.2 + 1) = 7/9 each; class 4 absent: 1; mean (3*7/9 + 1)/4 = 5/6
    # cross-entropy: -ln 0.2 = ln 5 ; total 5/6 + ln 5 = 2.4428
    assert abs(float(SegmentationLoss()(logits, target)) - (5 / 6 + math.log(5))) < 1e-4


def test_segmentation_loss_cross_entropy_uses_class_weights():
    """The class weights reach the cross-entropy (catches weight=None -> 11/12 + 0.5 ln 5 = 1.7214)."""
    target = torch.tensor([[[0, 1]]])
    logits = torch.zeros(1, 5, 1, 2)
    logits[0, 0, 0, 0] = 20.0                   # pixel 0: class 0 certain (CE ~ 0); pixel 1: uniform (CE ln 5)
    loss = SegmentationLoss([1.0, 3.0, 1.0, 1.0, 1.0])
    # weighted CE: (1*0 + 3*ln 5) / (1 + 3) = 0.75 ln 5 = 1.2071
    # Dice: class 1: 1 - 2*0.2 / (0.2 + 1) = 2/3; classes 2-4 absent: 1 each; mean (2/3 + 3)/4 = 11/12
    assert abs(float(loss(logits, target)) - (11 / 12 + 0.75 * math.log(5))) < 1e-4


def test_segmentation_loss_dice_pools_the_batch():
    """Dice sums intersections over the batch before dividing (catches batch=False, which averages
    per-sample Dice: (5/6 + 1)/2 + ln 5 = 2.5261)."""
    target = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [0, 0]]])   # second sample: background only
    logits = torch.zeros(2, 5, 2, 2)
    # classes 1-3 over both samples: 1 - 2*0.2 / (8*0.2 + 1) = 11/13; class 4: 1
    # mean (3*11/13 + 1)/4 = 23/26 = 0.8846 ; plus CE ln 5 -> 2.4941
    assert abs(float(SegmentationLoss()(logits, target)) - (23 / 26 + math.log(5))) < 1e-4


def test_gan_loss_vanilla_values_summed_over_scales():
    """Vanilla mode is BCE-with-logits against 1 for real and 0 for fake, summed over scales
    (catches swapped targets)."""
    scores = [torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 1, 1), 2.0)]
    # real: 2 scales * ln(1 + e^-2) = 2 * 0.1269 = 0.2539 ; fake: 2 * ln(1 + e^2) = 2 * 2.1269 = 4.2539
    assert abs(float(gan_loss(scores, True, "vanilla")) - 2 * math.log1p(math.exp(-2))) < 1e-5
    assert abs(float(gan_loss(scores, False, "vanilla")) - 2 * math.log1p(math.exp(2))) < 1e-5


def test_reconstruction_against_a_non_zero_target_over_channels_with_its_gradient():
    """Mean absolute difference over every pixel and channel against a non-zero target (catches
    |x_hat + x| -> 1.25 and a sum over channels -> 2.0): |0-1|, |1+1|, |2-2|, |-0.5-0.5| = 1, 2, 0, 1,
    mean 1.0; its gradient is sign(x_hat - x) / 4 = -0.25, 0.25, 0, -0.25."""
    x = torch.tensor([1.0, -1.0, 2.0, 0.5]).view(1, 2, 1, 2)
    x_hat = torch.tensor([0.0, 1.0, 2.0, -0.5]).view(1, 2, 1, 2).requires_grad_()
    loss = reconstruction(x_hat, x)
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()
    assert x_hat.grad.flatten().tolist() == pytest.approx([-0.25, 0.25, 0.0, -0.25])


def test_kl_gradient_by_hand():
    """d KL / d mu = mu / N and d KL / d logvar = 0.5 (e^logvar - 1) / N over the N = 4 elements
    (catches a term of the KL cut off from the graph, which leaves its value unchanged)."""
    mu = torch.tensor([0.0, 1.0, -0.5, 2.0]).view(1, 4, 1, 1).requires_grad_()
    logvar = torch.tensor([0.0, -1.0, 0.7, 0.3]).view(1, 4, 1, 1).requires_grad_()
    kl_to_standard_normal(mu, logvar).backward()
    assert mu.grad.flatten().tolist() == pytest.approx([0.0, 0.25, -0.125, 0.5])
    expected = [0.125 * (math.exp(v) - 1) for v in (0.0, -1.0, 0.7, 0.3)]
    assert logvar.grad.flatten().tolist() == pytest.approx(expected)


def test_segmentation_loss_value_and_gradient_match_the_formula():
    """Value and gradient against Eq. 2 written out: 1 - mean over classes 1-4 of
    (2 sum p_k y_k + eps) / (sum p_k + sum y_k + eps) over the batch, plus the weighted CE
    sum(w_y * -log p_y) / sum(w_y) (catches either term cut off from the graph, which keeps
    the value but trains on the other term only)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 3, generator=g)
    target = torch.randint(0, 4, (2, 3, 3), generator=g)          # class 4 absent
    weights = torch.tensor([0.5, 2.0, 1.0, 1.5, 1.0])
    got_logits = logits.clone().requires_grad_()
    got = SegmentationLoss(weights.tolist())(got_logits, target)
    got.backward()
    ref_logits = logits.clone().requires_grad_()
    p = torch.softmax(ref_logits, dim=1)
    y = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    eps = 1e-5                                                  # MONAI's smooth_nr = smooth_dr
    inter, sizes = (p * y).sum(dim=(0, 2, 3)), (p + y).sum(dim=(0, 2, 3))
    dice = (1 - (2 * inter[1:] + eps) / (sizes[1:] + eps)).mean()
    w = weights[target]
    ce = (w * -torch.log(p.gather(1, target.unsqueeze(1)).squeeze(1))).sum() / w.sum()
    expected = dice + ce
    expected.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert got_logits.grad.flatten().tolist() == pytest.approx(ref_logits.grad.flatten().tolist(), abs=1e-6)


def test_gan_loss_gradient_and_unknown_mode():
    """The least-squares term's gradient is 2 (s - label) / patches: 2 * (0.5 - 1) / 4 = -0.25 per
    patch of the first scale (catches a score cut off from the graph). An unknown mode is refused
    rather than read as one of the two."""
    s = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    gan_loss([s], True).backward()
    assert s.grad.flatten().tolist() == pytest.approx([-0.25] * 4)
    for mode in ("hinge", "LSGAN", ""):
        with pytest.raises(ValueError, match=f"^unknown gan mode {mode}$"):
            gan_loss([torch.zeros(1, 1, 2, 2)], True, mode)


def test_gan_loss_vanilla_is_stable_for_a_saturated_discriminator():
    """BCE on logits stays exact where the sigmoid saturates in float32: a fake scored 20 costs
    ln(1 + e^20) = 20.000000002, not the clamped 100 of BCE on sigmoid(20) = 1.0; a real one
    scored -20 likewise."""
    assert float(gan_loss([torch.full((1, 1, 2, 2), 20.0)], False, "vanilla")) == pytest.approx(20.0, abs=1e-5)
    assert float(gan_loss([torch.full((1, 1, 2, 2), -20.0)], True, "vanilla")) == pytest.approx(20.0, abs=1e-5)
