"""How well the image translations carry the LV myocardium's contrast across modalities.

The MR -> CT shift that makes a source model fail is at the LV myocardium's outer border: in MR
the myocardium is a dark band between bright blood and bright epicardial fat, in CT a grey band
between bright blood and dark fat. :func:`border_contrast` measures that on labelled slices, in
the units of the normalised model input; :func:`translation_contrast` measures it on real images
and on what the VAE makes of them (x_SS, x_ST, x_TT, x_TS), so one can see whether the
translations flip the border's polarity, which the adversarial term is there to achieve.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import numpy as np
import torch
from scipy import ndimage

from .labels import CLASS_KEYS

LV_MYOCARDIUM = CLASS_KEYS.index("LV-M") + 1     # class indices of the label slices
LV_BLOOD = CLASS_KEYS.index("LV-B") + 1
# What border_contrast returns, in table order.
CONTRAST_KEYS = ("blood", "myocardium", "ring", "blood - myocardium", "ring - myocardium")


def border_contrast(images: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Mean intensity of LV blood, LV myocardium and the one-pixel ring just outside the LV.

    images (N, S, S) float (one channel of the model input), labels (N, S, S) class indices.
    The ring is the 4-connected one-pixel dilation of LV blood + myocardium, minus both: the
    tissue at the myocardium's outer border (epicardial fat where there is some). Returns a dict
    with the keys of ``CONTRAST_KEYS``, in that order; NaN where the slices show no LV.
    """
    images, labels = np.asarray(images, dtype=np.float64), np.asarray(labels)
    if images.shape != labels.shape or images.ndim != 3:
        raise ValueError(f"images {images.shape} and labels {labels.shape} must both be (N, S, S)")
    myo, blood = labels == LV_MYOCARDIUM, labels == LV_BLOOD
    lv = myo | blood
    cross = ndimage.generate_binary_structure(2, 1)[None]          # in-plane only, slice by slice
    ring = ndimage.binary_dilation(lv, structure=cross) & ~lv

    def mean(mask: np.ndarray) -> float:
        return float(images[mask].mean()) if mask.any() else float("nan")

    b, m, r = mean(blood), mean(myo), mean(ring)
    return dict(zip(CONTRAST_KEYS, (b, m, r, b - m, r - m)))


@torch.no_grad()
def translation_contrast(net, mr_images: torch.Tensor, mr_labels: torch.Tensor, ct_images: torch.Tensor,
                         ct_labels: torch.Tensor, batch_size: int = 32) -> "OrderedDict[str, Dict[str, float]]":
    """:func:`border_contrast` of real and generated images, on the centre channel.

    mr_images, ct_images (N, 3, S, S) normalised slices; mr_labels, ct_labels (N, S, S). Each image
    is encoded to its posterior mean (E_S for MR, E_T for CT) and decoded by both domain decoders:
    rows x_S, x_SS, x_ST (MR anatomy, so MR labels) and x_T, x_TT, x_TS (CT labels).
    """
    net.eval()

    def decoded(images: torch.Tensor, domain: str):
        own, other = [], []
        for i in range(0, len(images), batch_size):
            mu, _ = net.posterior(images[i:i + batch_size], domain)
            own.append(net.decode(mu, domain))
            other.append(net.decode(mu, "target" if domain == "source" else "source"))
        return torch.cat(own), torch.cat(other)

    x_ss, x_st = decoded(mr_images, "source")
    x_tt, x_ts = decoded(ct_images, "target")
    rows = OrderedDict()
    for name, images, labels in (("x_S (real MR)", mr_images, mr_labels), ("x_SS", x_ss, mr_labels),
                                 ("x_ST (MR as CT)", x_st, mr_labels), ("x_T (real CT)", ct_images, ct_labels),
                                 ("x_TT", x_tt, ct_labels), ("x_TS (CT as MR)", x_ts, ct_labels)):
        rows[name] = border_contrast(images[:, images.shape[1] // 2].float().numpy(), labels.numpy())
    return rows
