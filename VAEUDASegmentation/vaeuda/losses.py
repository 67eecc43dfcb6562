"""The loss terms of Eq. 1-8, and how each is normalised.

Normalisation (it fixes what the lambdas mean; see Docs/method.md):

- reconstruction ``L_rec``: mean absolute error over all pixels and channels (the negative
  log-likelihood of a Laplace decoder up to constants, as UNIT's L1 reconstruction);
- ``L_kl``: closed-form KL(N(mu, diag sigma^2) || N(0, I)) **averaged** over latent elements
  (channels x positions) and over the batch, so it is on the scale of one latent unit;
- segmentation: soft Dice (mean over the 4 foreground classes, computed per batch) plus
  class-weighted cross-entropy (mean over pixels);
- adversarial: least-squares GAN (UNIT's choice, ``gan_mode="lsgan"``) averaged over patches
  and summed over discriminator scales; ``gan_mode="vanilla"`` gives the log form of Eq. 3;
- cycle ``L_cyc``: mean absolute error, as L_rec.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - log sigma^2 - 1).

    mu, logvar: (B, C, h, w) -> scalar.
    """
    return 0.5 * torch.mean(mu.pow(2) + logvar.exp() - logvar - 1.0)


def reconstruction(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, (B, C, H, W) x 2 -> scalar."""
    return torch.mean(torch.abs(x_hat - x))


class SegmentationLoss(torch.nn.Module):
    """Soft Dice + weighted cross-entropy (Eq. 2). logits (B, K, H, W), target (B, H, W) int64 -> scalar.

    ``class_weights`` (K,) weight the cross-entropy against the large background; the Dice
    term excludes background (MONAI ``DiceLoss(include_background=False)``).
    """

    def __init__(self, class_weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the weighted mean sum(w_y * l) / sum(w_y): the weights' scale does not change the loss's
        ce = F.cross_entropy(logits, target, weight=self.class_weights)
        return self.dice(logits, target.unsqueeze(1)) + ce


GAN_MODES = ("lsgan", "vanilla")


def gan_loss(scores: List[torch.Tensor], real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Adversarial loss of a multi-scale discriminator's outputs against the label real/fake.

    Used for the discriminator (real images -> True, generated -> False) and for the generator
    side (generated -> True), which is the usual non-saturating form of minimising Eq. 3/5.
    """
    total = scores[0].new_zeros(())
    for s in scores:
        if mode == "lsgan":
            total = total + torch.mean((s - (1.0 if real else 0.0)) ** 2)
        elif mode == "vanilla":
            total = total + F.binary_cross_entropy_with_logits(s, torch.full_like(s, 1.0 if real else 0.0))
        else:
            raise ValueError(f"unknown gan mode {mode}")
    return total
