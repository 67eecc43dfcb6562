"""Border contrast of the LV myocardium: hand-computed values, and the translation table's rows."""
import math

import numpy as np
import pytest
import torch

from vaeuda.diagnose import LV_BLOOD, LV_MYOCARDIUM, border_contrast, translation_contrast
from vaeuda.nets import VAEUDANet, get_preset


def _plus():
    """Slice 0: LV blood at the centre of a 5x5 slice, myocardium on its 4 neighbours; slice 1: no LV."""
    labels = np.zeros((2, 5, 5), dtype=np.uint8)
    labels[0, 2, 2] = LV_BLOOD
    for y, x in ((1, 2), (3, 2), (2, 1), (2, 3)):
        labels[0, y, x] = LV_MYOCARDIUM
    images = np.full((2, 5, 5), 100.0)
    images[0, 2, 2] = 5.0
    images[0][labels[0] == LV_MYOCARDIUM] = 1.0
    # the ring: 4 pixels two steps out along the axes and the 4 diagonal neighbours of the centre
    for (y, x), v in zip(((0, 2), (4, 2), (2, 0), (2, 4), (1, 1), (1, 3), (3, 1), (3, 3)), range(8)):
        images[0, y, x] = float(v)
    return images, labels


def test_border_contrast_by_hand():
    images, labels = _plus()
    c = border_contrast(images, labels)
    # slice 1 (all 100) and the corners of slice 0 stay out: the ring is in-plane, one pixel wide
    assert c == {"blood": 5.0, "myocardium": 1.0, "ring": 3.5, "blood - myocardium": 4.0, "ring - myocardium": 2.5}


def test_border_contrast_without_lv_is_nan():
    c = border_contrast(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), dtype=np.uint8))
    assert all(math.isnan(v) for v in c.values())


def test_translation_table_rows_use_real_images_unchanged():
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny"))
    images, labels = _plus()
    img = torch.zeros(2, 3, 32, 32)
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    img[:, 1, :5, :5] = torch.from_numpy(images).float()
    lab[:, :5, :5] = torch.from_numpy(labels)
    rows = translation_contrast(net, img, lab, img * 0.5, lab)
    assert list(rows) == ["x_S (real MR)", "x_SS", "x_ST (MR as CT)", "x_T (real CT)", "x_TT", "x_TS (CT as MR)"]
    assert rows["x_S (real MR)"]["ring - myocardium"] == 2.5
    assert rows["x_T (real CT)"]["ring - myocardium"] == 1.25
    assert all(math.isfinite(v) for row in rows.values() for v in row.values())


def test_translated_rows_decode_each_encoding_with_the_decoder_their_name_says():
    """x_SS / x_TT: own decoder; x_ST: the MR mean by D_T; x_TS: the CT mean by D_S. Swapping the
    decoders would swap the rows' values, which the real-image rows cannot show."""
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny")).eval()
    images, labels = _plus()
    mr, ct = torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    mr[:, 1, :5, :5] = torch.from_numpy(images).float()
    ct[:, 1, :5, :5] = torch.from_numpy(images).float() * -0.5 + 3.0
    lab[:, :5, :5] = torch.from_numpy(labels)
    rows = translation_contrast(net, mr, lab, ct, lab)
    with torch.no_grad():
        mu_s, mu_t = net.posterior(mr, "source")[0], net.posterior(ct, "target")[0]
        for name, image in (("x_SS", net.decode(mu_s, "source")), ("x_ST (MR as CT)", net.decode(mu_s, "target")),
                            ("x_TT", net.decode(mu_t, "target")), ("x_TS (CT as MR)", net.decode(mu_t, "source"))):
            assert rows[name] == border_contrast(image[:, 1].numpy(), lab.numpy()), name
    assert rows["x_ST (MR as CT)"] != rows["x_SS"] and rows["x_TS (CT as MR)"] != rows["x_TT"]


def test_border_contrast_refuses_mismatched_or_unstacked_slices():
    images, labels = _plus()
    for bad_images, bad_labels, shapes in ((images[:, :, :4], labels, r"\(2, 5, 4\) and labels \(2, 5, 5\)"),
                                           (images[0], labels[0], r"\(5, 5\) and labels \(5, 5\)")):
        with pytest.raises(ValueError, match=rf"^images {shapes} must both be \(N, S, S\)$"):
            border_contrast(bad_images, bad_labels)


def test_border_contrast_keeps_full_precision_at_large_intensities():
    # CT slices before normalisation are in the thousands of HU: the means stay exact there
    images, labels = _plus()
    c = border_contrast(images + 3000.0, labels)
    assert c["blood"] == 3005.0 and c["ring"] == 3003.5 and c["ring - myocardium"] == 2.5


def test_translation_contrast_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny")).eval()
    images, labels = _plus()
    img = torch.zeros(3, 3, 32, 32)
    lab = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:2, 1, :5, :5] = torch.from_numpy(images).float()
    img[2, 1] = torch.linspace(-1, 1, 32)                   # a third slice, of another content
    lab[:2, :5, :5] = torch.from_numpy(labels)
    lab[2] = lab[0]
    whole = translation_contrast(net, img, lab, img * 0.5, lab)
    for batch_size in (1, 2):
        split = translation_contrast(net, img, lab, img * 0.5, lab, batch_size=batch_size)
        for name, row in whole.items():
            assert split[name] == pytest.approx(row, rel=1e-5, abs=1e-6), (batch_size, name)
