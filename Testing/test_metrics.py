"""Tests of vaeuda.metrics: hand-computed Dice/ASSD, largest component, summaries, tables, folders."""
from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

from vaeuda import metrics
from vaeuda.errors import VaeudaError
from vaeuda.labels import CLASS_KEYS, MMWHS


def two_cubes():
    """4x4x4 cubes in a (6, 6, 7) array, the second shifted by one voxel along x (last axis)."""
    a = np.zeros((6, 6, 7), dtype=bool)
    b = a.copy()
    a[1:5, 1:5, 1:5] = True
    b[1:5, 1:5, 2:6] = True
    return a, b


def ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


# ----------------------------------------------------------------------------- Dice and ASSD

def test_shifted_cubes_dice():
    a, b = two_cubes()
    assert metrics.dice(a, b) == pytest.approx(2 * 48 / (64 + 64))


def test_shifted_cubes_assd_by_hand():
    # Each cube's surface has 64 - 8 = 56 voxels. From A's surface to B's surface: the 16 voxels
    # of A's face x=0 are one x-step from B's face x=1; the 4 voxels of A's face x=3 that lie in
    # B's interior (y, z in {1, 2}) are one step from B's surface, the cheapest step being along
    # the axis of smallest spacing; the other 36 lie on B's surface. Same the other way round.
    a, b = two_cubes()
    assert metrics.assd(a, b, (1.0, 1.0, 1.0)) == pytest.approx(20 / 56, abs=1e-6)
    # spacing (z, y, x) = (2, 1, 1): x and y steps are still 1 mm.
    assert metrics.assd(a, b, (2.0, 1.0, 1.0)) == pytest.approx(20 / 56, abs=1e-6)
    # spacing (z, y, x) = (1, 1.5, 2): face voxels are 2 mm away (x), interior ones 1 mm (z).
    assert metrics.assd(a, b, (1.0, 1.5, 2.0)) == pytest.approx((16 * 2.0 + 4 * 1.0) / 56, abs=1e-6)
    assert metrics.assd(b, a, (1.0, 1.5, 2.0)) == pytest.approx((16 * 2.0 + 4 * 1.0) / 56, abs=1e-6)


def test_assd_is_mean_of_directed_means_not_pooled():
    # A 1-voxel mask against a 3x3x3 cube around it: directed means 1.0 (point -> nearest face
    # voxel) and the mean over the 26 cube surface voxels of their distance to the centre.
    point = np.zeros((5, 5, 5), dtype=bool)
    point[2, 2, 2] = True
    cube = np.zeros_like(point)
    cube[1:4, 1:4, 1:4] = True
    to_centre = (6 * 1.0 + 12 * math.sqrt(2) + 8 * math.sqrt(3)) / 26
    assert metrics.assd(point, cube, (1, 1, 1)) == pytest.approx((1.0 + to_centre) / 2, abs=1e-9)


def test_assd_agrees_with_monai_directed_distances():
    # MONAI's own surface code (same 6-neighbour erosion surface): medpy 0.4's ASSD = mean of directions.
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_average_surface_distance
    from scipy import ndimage
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((16, 18, 20)), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random((16, 18, 20)), 2) > 0.5
    spacing = (2.0, 1.0, 0.7)

    def directed(x, y):
        as_tensor = lambda m: torch.from_numpy(m[None, None].astype(np.float32))
        return float(compute_average_surface_distance(as_tensor(x), as_tensor(y), include_background=True,
                                                      symmetric=False, spacing=spacing))
    expected = (directed(a, b) + directed(b, a)) / 2
    assert metrics.assd(a, b, spacing) == pytest.approx(expected, rel=1e-5)


def test_concentric_spheres():
    shape, centre = (31, 31, 31), (15, 15, 15)
    inner, outer = ball(shape, centre, 10), ball(shape, centre, 11)
    assert metrics.dice(inner, outer) == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 11 ** 3), abs=0.01)
    assert metrics.assd(inner, outer, (1, 1, 1)) == pytest.approx(1.0, abs=0.15)
    # Doubling every spacing doubles every distance.
    assert metrics.assd(inner, outer, (2, 2, 2)) == pytest.approx(2 * metrics.assd(inner, outer, (1, 1, 1)))


def test_identical_masks_and_border_voxels():
    a = np.zeros((4, 4, 4), dtype=bool)
    a[0:2, :, :] = True  # touches the array border: border voxels are surface voxels
    assert metrics.dice(a, a) == 1.0
    assert metrics.assd(a, a, (1, 1, 1)) == 0.0
    b = np.zeros_like(a)
    b[0:3, :, :] = True
    # Surfaces: a all its 32 voxels; b 48 - 4 = 44 (the centre 2x2 of slice 1 is interior).
    # a -> b: those 4 centre voxels are 1 away (slice 2); b -> a: the 16 of slice 2 are 1 away.
    assert metrics.assd(a, b, (1, 1, 1)) == pytest.approx((4 / 32 + 16 / 44) / 2)


def test_empty_cases():
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = empty.copy()
    full[1:4, 1:4, 1:4] = True
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.assd(empty, empty, (1, 1, 1)) == 0.0
    assert metrics.dice(full, empty) == 0.0
    assert metrics.dice(empty, full) == 0.0
    assert math.isnan(metrics.assd(full, empty, (1, 1, 1)))
    assert math.isnan(metrics.assd(empty, full, (1, 1, 1)))


def test_undefined_assd_is_nan_without_a_warning():
    """One mask empty: ASSD is NaN by decision, not by averaging an empty set of distances (which
    would also give NaN, with a RuntimeWarning for every missing structure of every volume)."""
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = empty.copy()
    full[1:4, 1:4, 1:4] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.assd(full, empty, (1, 1, 1)))
        assert math.isnan(metrics.assd(empty, full, (2, 1, 1)))


def test_mismatched_shapes_spacing_and_dimensions_are_refused():
    """Masks of different shapes would broadcast (a (1, 5, 5) slab against a (5, 5, 5) volume gives a
    Dice of 2*25/(25+125) = 1/3 without a word); a spacing of the wrong length is refused even for
    empty masks; evaluate_volume takes two 3D class maps of one shape only."""
    slab, volume_mask = np.ones((1, 5, 5), dtype=bool), np.ones((5, 5, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"^mask shapes differ: \(1, 5, 5\) vs \(5, 5, 5\)$"):
        metrics.dice(slab, volume_mask)
    with pytest.raises(ValueError, match="^mask shapes differ"):
        metrics.assd(slab, volume_mask, (1, 1, 1))
    empty = np.zeros((5, 5, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"^spacing has 2 entries for a 3-D mask$"):
        metrics.assd(empty, empty, (1, 1))
    with pytest.raises(ValueError, match=r"^spacing has 2 entries for a 3-D mask$"):
        metrics.assd(volume_mask, volume_mask, (1, 1))
    with pytest.raises(VaeudaError, match="must be the same 3D shape"):
        metrics.evaluate_volume(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(VaeudaError, match="must be the same 3D shape"):
        metrics.evaluate_volume(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), (1, 1))


# ----------------------------------------------------------------------------- largest component

def test_largest_component_uses_26_connectivity():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal chain: one 26-component
    mask[5, 5, 3:6] = True                                # a separate straight run of 3
    mask[5, 3, 5] = True                                  # a lone voxel
    kept = metrics.largest_component(mask)
    expected = np.zeros_like(mask)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 2, 2] = True
    # 3 vs 3 (with 6-connectivity the chain would be 3 singletons and the run would win):
    # the tie goes to the component met first in scan order, the diagonal chain.
    np.testing.assert_array_equal(kept, expected)
    mask[5, 4, 4] = True  # diagonal bridge: joins the lone voxel (5,3,5) to the run -> one component of 5
    kept = metrics.largest_component(mask)
    assert kept.sum() == 5 and kept[5, 3, 5] and not kept[0, 0, 0]
    assert not metrics.largest_component(np.zeros((3, 3, 3), dtype=bool)).any()


def test_largest_component_returns_a_new_mask():
    """The result is never the caller's array, also when there is one component or none: clearing it
    leaves the input as it was."""
    one, two = np.zeros((4, 4, 4), dtype=bool), np.zeros((4, 4, 4), dtype=bool)
    one[1:3, 1:3, 1:3] = True
    two[0, 0, 0:2] = two[3, 3, 3] = True
    for mask in (np.zeros((4, 4, 4), dtype=bool), one, two):
        before = mask.copy()
        kept = metrics.largest_component(mask)
        kept[...] = False
        np.testing.assert_array_equal(mask, before)


def test_a_reference_piece_the_prediction_misses_counts_against_it():
    """Only the prediction is reduced to its largest component: a reference of 80 + 20 voxels in two
    pieces against a prediction of the 80 gives Dice 2 * 80 / 180 and a non-zero ASSD, not a perfect score."""
    ref = np.zeros((10, 10, 30), dtype=bool)
    ref[2:6, 2:6, 2:7] = True                     # 80 voxels
    ref[2:4, 2:4, 20:25] = True                   # 20 voxels, far away
    pred = ref.copy()
    pred[:, :, 15:] = False
    scores = metrics.evaluate_volume(pred.astype(np.uint8) * 3, ref.astype(np.uint8) * 3, (1, 1, 1))["LV-B"]
    assert scores["dice"] == pytest.approx(160 / 180)
    assert scores["assd_vox"] > 0


def test_small_distant_blob_changes_nothing():
    shape = (30, 30, 40)
    ref = ball(shape, (15, 15, 12), 7)
    pred_big = ball(shape, (15, 16, 13), 7)
    pred_both = pred_big | ball(shape, (15, 15, 34), 2)
    ref_classes = ref.astype(np.uint8) * 3
    with_blob = metrics.evaluate_volume(pred_both.astype(np.uint8) * 3, ref_classes, (1, 1, 1))["LV-B"]
    without = metrics.evaluate_volume(pred_big.astype(np.uint8) * 3, ref_classes, (1, 1, 1))["LV-B"]
    assert with_blob == without
    # ...while on the raw masks the blob does count.
    assert metrics.dice(pred_both, ref) < metrics.dice(pred_big, ref)


def test_evaluate_volume_per_structure_and_axis_order():
    a, b = two_cubes()
    pred = np.zeros(a.shape, dtype=np.uint8)
    ref = np.zeros(a.shape, dtype=np.uint8)
    pred[a] = 1   # LV-M: shifted cubes
    ref[b] = 1
    pred[0, 0, 0] = ref[0, 0, 0] = 2    # LA-B: identical single voxel (not touching the cubes)
    pred[5, 5, 6] = 4                   # A-A: predicted only; LV-B absent in both
    result = metrics.evaluate_volume(pred, ref, (1.0, 1.5, 2.0))
    assert list(result) == list(CLASS_KEYS)
    assert result["LV-M"]["dice"] == pytest.approx(0.75)
    assert result["LV-M"]["assd_mm"] == pytest.approx(36 / 56)   # spacing is taken as (z, y, x)
    assert result["LV-M"]["assd_vox"] == pytest.approx(20 / 56)
    assert result["LA-B"] == {"dice": 1.0, "assd_mm": 0.0, "assd_vox": 0.0}
    assert result["LV-B"] == {"dice": 1.0, "assd_mm": 0.0, "assd_vox": 0.0}
    assert result["A-A"]["dice"] == 0.0 and math.isnan(result["A-A"]["assd_vox"])


# ----------------------------------------------------------------------------- summaries, tables

def volume(dices, assds):
    return OrderedDict((k, {"dice": d, "assd_mm": 2 * a, "assd_vox": a}) for k, d, a in zip(CLASS_KEYS, dices, assds))


def test_summarise_by_hand():
    nan = float("nan")
    v1 = volume([0.8, 0.6, 0.9, 0.7], [nan, 1.0, 2.0, 3.0])
    v2 = volume([0.6, 0.6, 0.7, 0.5], [2.0, 2.0, 2.0, 2.0])
    s = metrics.summarise([v1, v2])
    assert list(s) == list(CLASS_KEYS) + ["Mean"]
    assert s["LV-M"]["dice"]["mean"] == pytest.approx(0.7)
    assert s["LV-M"]["dice"]["std"] == pytest.approx(0.1)        # population std
    assert s["LA-B"]["dice"]["std"] == pytest.approx(0.0)
    assert s["LV-M"]["assd_vox"] == {"mean": 2.0, "std": 0.0, "n": 1, "n_missing": 1}
    assert s["A-A"]["assd_mm"]["mean"] == pytest.approx(5.0)
    # Mean column: pooled over the 8 entries, mean 0.675, squared deviations sum 0.115.
    assert s["Mean"]["dice"]["mean"] == pytest.approx(0.675)
    assert s["Mean"]["dice"]["std"] == pytest.approx(math.sqrt(0.115 / 8))
    assert s["Mean"]["dice"]["std_of_volume_means"] == pytest.approx(0.075)   # means 0.75 and 0.60
    # ASSD Mean: 7 defined entries 1,2,3,2,2,2,2 -> mean 2, std sqrt(2/7); NaN counted.
    assert s["Mean"]["assd_vox"]["mean"] == pytest.approx(2.0)
    assert s["Mean"]["assd_vox"]["std"] == pytest.approx(math.sqrt(2 / 7))
    assert (s["Mean"]["assd_vox"]["n"], s["Mean"]["assd_vox"]["n_missing"]) == (7, 1)
    with pytest.raises(VaeudaError, match="^there are no evaluated volumes to summarise\\.$"):
        metrics.summarise([])


def test_summarise_reproduces_paper_table1_mean_std():
    # The paper's Oracle Dice row: per-structure means/stds and Mean 87.00 (7.11). Four volumes per
    # structure built with exactly those population means and stds give the pooled Mean std 7.11.
    means = [82.35, 88.45, 89.28, 87.92]
    stds = [2.29, 1.92, 3.42, 12.33]
    offsets = np.array([1.0, -1.0, 1.0, -1.0])  # population std 1
    vols = [volume([(m + s * offsets[i]) / 100 for m, s in zip(means, stds)], [1.0] * 4) for i in range(4)]
    s = metrics.summarise(vols)
    assert 100 * s["Mean"]["dice"]["mean"] == pytest.approx(87.00, abs=0.005)
    assert 100 * s["Mean"]["dice"]["std"] == pytest.approx(7.11, abs=0.005)


def test_summarise_volume_means_leave_out_undefined_assd():
    """std_of_volume_means averages each volume over its defined ASSDs only, and skips a volume with
    none: volumes (all NaN), (1, 3, 1, 3), (4, 4, 4, 4) have means 2 and 4 -> std 1 (NaN counted as
    0 would give means 0, 2, 4). The pooled cell: 1, 3, 1, 3, 4, 4, 4, 4 -> mean 3, squared
    deviations 12 -> std sqrt(12/8). A summary with no defined ASSD at all has NaN throughout."""
    nan = float("nan")
    s = metrics.summarise([volume([0.5] * 4, [nan] * 4), volume([0.5] * 4, [1.0, 3.0, 1.0, 3.0]),
                           volume([0.5] * 4, [4.0] * 4)])
    cell = s["Mean"]["assd_vox"]
    assert cell["std_of_volume_means"] == pytest.approx(1.0)
    assert s["Mean"]["assd_mm"]["std_of_volume_means"] == pytest.approx(2.0)
    assert cell["mean"] == pytest.approx(3.0)
    assert cell["std"] == pytest.approx(math.sqrt(12 / 8))
    assert (cell["n"], cell["n_missing"]) == (8, 4)
    assert s["Mean"]["dice"]["std_of_volume_means"] == 0.0
    undefined = metrics.summarise([volume([0.5] * 4, [nan] * 4)])["Mean"]["assd_vox"]
    assert math.isnan(undefined["mean"]) and math.isnan(undefined["std"])
    assert math.isnan(undefined["std_of_volume_means"])
    assert (undefined["n"], undefined["n_missing"]) == (0, 4)


def test_table_markdown_layout():
    a, b = two_cubes()
    per_volume = metrics.evaluate_volume(a.astype(np.uint8), b.astype(np.uint8), (1, 1, 1))
    rows = OrderedDict([("Run A", metrics.summarise([per_volume, per_volume])), ("case1", per_volume)])
    text = metrics.table_markdown(rows)
    lines = text.splitlines()
    assert lines[0] == "|  | Dice [%] |  |  |  |  | ASSD [voxel] |  |  |  |  |"
    assert lines[1] == "| --- " + "| ---: " * 10 + "|"
    group = "**LV-M** | **LA-B** | **LV-B** | **A-A** | **Mean**"
    assert lines[2] == f"| **Structure** | {group} | {group} |"
    run = lines[3].split(" | ")
    assert run[0] == "| Run A"
    # LV-M Dice 75 %, the other structures absent in both (100 %); Mean (75+100*3)/4 = 93.75,
    # pooled population std over 8 entries (two of 75, six of 100) = 10.83.
    assert run[1] == "75.00 (0.00)"
    assert run[2] == "100.00 (0.00)"
    assert run[5] == "93.75 (10.83)"
    assert run[6] == f"{20 / 56:.2f} (0.00)"
    assert lines[4].startswith("| case1 | 75.00 | 100.00 | 100.00 | 100.00 | 93.75 | 0.36 |")
    assert metrics.MISSING_MARK not in text
    mm = metrics.table_markdown(rows, metrics=("assd_mm",))
    assert mm.splitlines()[0] == "|  | ASSD [mm] |  |  |  |  |"
    with pytest.raises(ValueError, match="^unknown metric 'hd95'; expected one of dice, assd_vox, assd_mm$"):
        metrics.table_markdown(rows, metrics=("dice", "hd95"))


def test_table_marks_cells_with_missing_assd_and_empty_cells():
    nan = float("nan")
    rows = OrderedDict([("r", metrics.summarise([volume([0.5] * 4, [nan, 1.0, 1.0, 1.0]),
                                                  volume([0.5] * 4, [nan, 3.0, 1.0, 1.0])]))])
    cells = metrics.table_markdown(rows).splitlines()[3].split(" | ")
    assert cells[6] == "n/a"                                   # LV-M ASSD: no value at all
    assert cells[7] == "2.00 (1.00)"                            # LA-B ASSD
    assert cells[10] == f"1.33 (0.75) {metrics.MISSING_MARK}6/8 |"  # Mean: 6 of 8 entries defined
    assert "ASSD defined for k of the N values" in metrics.table_markdown(rows)
    one = OrderedDict([("r", metrics.summarise([volume([0.5] * 4, [nan, 1.0, 1.0, 1.0]),
                                                volume([0.5] * 4, [2.0, 3.0, 1.0, 1.0])]))])
    assert metrics.table_markdown(one).splitlines()[3].split(" | ")[6] == f"2.00 {metrics.MISSING_MARK}1/2"  # no std


def test_table_from_a_summary_read_back_from_json():
    """NaN is written to JSON as null; a summary read back (as the demo does) still makes a table."""
    nan = float("nan")
    summary = metrics.summarise([volume([0.5] * 4, [nan, 1.0, 1.0, 1.0])])
    read_back = json.loads(json.dumps(metrics._json_ready(summary)))
    assert read_back["LV-M"]["assd_vox"]["mean"] is None
    cells = metrics.table_markdown(OrderedDict([("r", read_back)])).splitlines()[3].split(" | ")
    assert cells[6] == "n/a"
    assert cells[7] == "1.00 (0.00)"


# ----------------------------------------------------------------------------- folders

def write_label(path, classes, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    """Write class indices (Z, Y, X) as an MM-WHS-valued label file."""
    write_raw(path, MMWHS.decode(classes), spacing, origin)


def write_raw(path, values, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    """Write an array (Z, Y, X) as is, with the given (x, y, z) spacing and origin."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def cohort(tmp_path):
    """ref/: ct_1_image, ct_1_label, ct_2_image, ct_2_label; pred/: ct_1_image_seg, ct_2_image_seg."""
    a, b = two_cubes()
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for i, (pred, ref) in enumerate([(a, b), (b, b)], start=1):
        write_label(ref_dir / f"ct_{i}_label.nii.gz", ref.astype(np.uint8) * 3)
        write_raw(ref_dir / f"ct_{i}_image.nii.gz", np.full(a.shape, 7.5, np.float32))  # an image: skipped
        write_label(pred_dir / f"ct_{i}_image_seg.nii.gz", pred.astype(np.uint8) * 3)
    (ref_dir / "splits.json").write_text("{}")
    return pred_dir, ref_dir


def test_pairing_key():
    assert metrics.pairing_key("x/ct_1017_image_seg.nii.gz") == "ct_1017"
    assert metrics.pairing_key("ct_1017_label.nii.gz") == "ct_1017"
    assert metrics.pairing_key("case7_seg.nrrd") == metrics.pairing_key("case7.nrrd") == "case7"
    assert metrics.pairing_key("a_label_seg.mha") == "a"
    # roles in any case, as their extensions: CT_1017_IMAGE.nii.gz segmented pairs with CT_1017_Label.nii.gz
    assert metrics.pairing_key("CT_1017_IMAGE_seg.nii.gz") == metrics.pairing_key("CT_1017_Label.nii.gz") == "CT_1017"
    assert metrics.pairing_key("image.nii.gz") == "image"                  # a role needs its underscore


def test_evaluate_dirs_pairs_scores_and_writes_json(cohort, tmp_path):
    pred_dir, ref_dir = cohort
    out = tmp_path / "out" / "metrics.json"
    markdown, result = metrics.evaluate_dirs(pred_dir, ref_dir, MMWHS, json_path=out)
    assert json.loads(out.read_text()) == result
    assert [v["name"] for v in result["volumes"]] == ["ct_1", "ct_2"]
    assert result["volumes"][0]["ref"].endswith("ct_1_label.nii.gz")
    assert result["volumes"][0]["spacing_zyx"] == [2.0, 1.0, 1.0]
    lvb = result["volumes"][0]["metrics"]["LV-B"]
    assert lvb["dice"] == pytest.approx(0.75)
    assert lvb["assd_vox"] == pytest.approx(20 / 56)
    # spacing (z, y, x) = (2, 1, 1): face voxels 1 mm (x), interior ones 1 mm (x or y).
    assert lvb["assd_mm"] == pytest.approx(20 / 56)
    assert result["volumes"][1]["metrics"]["LV-B"]["dice"] == 1.0
    assert result["summary"]["LV-B"]["dice"]["mean"] == pytest.approx(0.875)
    assert result["n_volumes"] == 2 and result["convention"] == "mmwhs"
    assert "| ct_1 | 100.00 | 100.00 | 75.00 | 100.00 | 93.75 |" in markdown
    assert "| All (2 volumes) | 100.00 (0.00) | 100.00 (0.00) | 87.50 (12.50) |" in markdown
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]   # no temporary left behind


def test_evaluate_dirs_nan_is_null_in_json(tmp_path):
    a, _ = two_cubes()
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    write_label(tmp_path / "p" / "v_seg.nii.gz", a.astype(np.uint8) * 4)
    write_label(tmp_path / "r" / "v.nii.gz", np.zeros(a.shape, np.uint8))
    _, result = metrics.evaluate_dirs(tmp_path / "p", tmp_path / "r", MMWHS, json_path=tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["volumes"][0]["metrics"]["A-A"] == {"dice": 0.0, "assd_mm": None, "assd_vox": None}
    assert saved["summary"]["A-A"]["assd_vox"] == {"mean": None, "std": None, "n": 0, "n_missing": 1}


def expect_error_and_no_json(pred_dir, ref_dir, json_path, *words):
    with pytest.raises(VaeudaError) as info:
        metrics.evaluate_dirs(pred_dir, ref_dir, MMWHS, json_path=json_path)
    for word in words:
        assert word in str(info.value)
    assert not json_path.exists()
    return str(info.value)


def test_evaluate_dirs_refuses_mismatched_geometry(cohort, tmp_path):
    pred_dir, ref_dir = cohort
    a, _ = two_cubes()
    write_label(pred_dir / "ct_2_image_seg.nii.gz", a.astype(np.uint8), origin=(0.0, 0.5, 0.0))
    expect_error_and_no_json(pred_dir, ref_dir, tmp_path / "m.json", "ct_2_image_seg.nii.gz", "ct_2_label.nii.gz",
                             "differ in origin: prediction (")
    write_label(pred_dir / "ct_2_image_seg.nii.gz", a.astype(np.uint8), spacing=(1.0, 1.0, 1.0))
    expect_error_and_no_json(pred_dir, ref_dir, tmp_path / "m.json", "differ in spacing: prediction (")
    write_label(pred_dir / "ct_2_image_seg.nii.gz", a[:, :, :6].astype(np.uint8))
    expect_error_and_no_json(pred_dir, ref_dir, tmp_path / "m.json",
                             "differ in size: prediction (6, 6, 6), reference (7, 6, 6).")


def test_evaluate_dirs_refuses_unmatched_files(cohort, tmp_path):
    pred_dir, ref_dir = cohort
    a, _ = two_cubes()
    json_path = tmp_path / "m.json"
    write_label(pred_dir / "ct_3_image_seg.nii.gz", a.astype(np.uint8))
    expect_error_and_no_json(pred_dir, ref_dir, json_path, "ct_3_image_seg.nii.gz", "no reference")
    (pred_dir / "ct_3_image_seg.nii.gz").unlink()
    (pred_dir / "ct_2_image_seg.nii.gz").unlink()
    expect_error_and_no_json(pred_dir, ref_dir, json_path, "ct_2_label.nii.gz", "no prediction")
    _, result = metrics.evaluate_dirs(pred_dir, ref_dir, MMWHS, ignore_unmatched_refs=True)
    assert [v["name"] for v in result["volumes"]] == ["ct_1"]
    assert result["unscored_references"] == [str(ref_dir / "ct_2_label.nii.gz")]


def test_evaluate_names_the_references_it_skips(cohort, capsys):
    from vaeuda.cli import main
    pred_dir, ref_dir = cohort
    (pred_dir / "ct_2_image_seg.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--progress", "none"]) == 0
    assert "1 reference(s) without a prediction not scored: ct_2_label.nii.gz" in capsys.readouterr().err


def test_evaluate_dirs_refuses_empty_missing_ambiguous_and_bad_labels(cohort, tmp_path):
    pred_dir, ref_dir = cohort
    json_path = tmp_path / "m.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    expect_error_and_no_json(empty, ref_dir, json_path, "empty", "no image files")
    expect_error_and_no_json(tmp_path / "nowhere", ref_dir, json_path, "folder not found")
    one_file = next(pred_dir.iterdir())
    expect_error_and_no_json(one_file, ref_dir, json_path, "is a file; give the prediction folder that holds it")
    a, _ = two_cubes()
    write_label(pred_dir / "ct_1_seg.nii.gz", a.astype(np.uint8))   # same key as ct_1_image_seg
    expect_error_and_no_json(pred_dir, ref_dir, json_path, "ct_1", "same name")
    (pred_dir / "ct_1_seg.nii.gz").unlink()
    write_raw(ref_dir / "ct_1_label.nii.gz", np.full(a.shape, 2.5, np.float32))   # not a label value
    expect_error_and_no_json(pred_dir, ref_dir, json_path, "ct_1_label.nii.gz", "whole numbers")
    (ref_dir / "ct_1_label.nii.gz").write_bytes(b"not a nifti")
    expect_error_and_no_json(pred_dir, ref_dir, json_path, "ct_1_label.nii.gz", "cannot be read")


def test_evaluate_never_writes_its_json_over_the_label_mapping_it_reads(cohort, tmp_path, capsys):
    from vaeuda.cli import main
    pred_dir, ref_dir = cohort
    mapping = tmp_path / "map.json"
    mapping.write_text('{"LV-M": 205, "LA-B": 420, "LV-B": 500, "A-A": 820}')
    before = mapping.read_bytes()
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(mapping),
                 "--json", str(mapping), "--progress", "none"]) == 2
    assert "map.json: is also an input, which is never overwritten" in capsys.readouterr().err
    assert mapping.read_bytes() == before


def test_evaluate_reads_both_folders_in_the_label_convention_given(tmp_path, capsys):
    """--label-convention (as train-source and convert name it; --labels, its first name, still
    works): consecutive values 1-4 are scored as structures, and refused as MM-WHS values."""
    from vaeuda.cli import main
    a, b = two_cubes()
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    write_raw(ref_dir / "ct_1_label.nii.gz", b.astype(np.uint8) * 2)        # LA-B in consecutive values
    write_raw(pred_dir / "ct_1_seg.nii.gz", a.astype(np.uint8) * 2)
    results = []
    for option in ("--label-convention", "--labels"):
        json_path = tmp_path / f"{option}.json"
        assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), option, "consecutive",
                     "--json", str(json_path), "--progress", "none"]) == 0
        results.append(json.loads(json_path.read_text())["volumes"][0]["metrics"])
    assert results[0] == results[1]
    assert results[0]["LA-B"]["dice"] == pytest.approx(2 * 48 / 128)    # 3 of the 4 cubes' columns overlap
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--json", str(tmp_path / "m.json"),
                 "--progress", "none"]) == 2
    assert "none of its label values (2) is a structure of the 'mmwhs' label mapping" in capsys.readouterr().err


def test_two_dimensional_file_is_refused(cohort, tmp_path):
    pred_dir, ref_dir = cohort
    sitk.WriteImage(sitk.Image(4, 4, sitk.sitkUInt8), str(ref_dir / "ct_1_label.nii.gz"))
    expect_error_and_no_json(pred_dir, ref_dir, tmp_path / "m.json", "ct_1_label.nii.gz", "3D")


def test_predictions_in_other_label_values_than_the_references(tmp_path, capsys):
    """A model trained in MM-WHS values scored against references in consecutive values: each folder
    read in its own convention scores as one; read in one convention, the error names the option
    for the segmentations alone."""
    import re
    from vaeuda.cli import main
    from vaeuda.labels import load_convention
    classes = np.zeros((8, 9, 10), np.uint8)
    classes[2:5, 2:6, 2:7], classes[5:7, 3:6, 3:6] = 1, 3          # LV-M and LV-B
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(classes), str(ref / "s_label.nii.gz"))
    mmwhs = np.choose(classes, [0, 205, 420, 500, 820]).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(mmwhs), str(pred / "s_seg.nii.gz"))
    with pytest.raises(VaeudaError, match=re.escape(
            "label values 205, 500 are not in the 'consecutive' label mapping; they are 'mmwhs' values: read it with "
            "--pred-label-convention mmwhs (the references read with --label-convention consecutive).")):
        metrics.evaluate_dirs(pred, ref, load_convention("consecutive"))
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--label-convention", "consecutive", "--progress",
            "none"]
    assert main(args + ["--pred-label-convention", "mmwhs"]) == 0
    result = json.loads((pred / "evaluation.json").read_text())
    assert (result["convention"], result["pred_convention"]) == ("consecutive", "mmwhs")
    assert result["summary"]["LV-M"]["dice"]["mean"] == 1.0 and result["summary"]["LV-B"]["dice"]["mean"] == 1.0
    assert main(args) == 2                          # the same command without it: the sentence names it
    assert "read it with --pred-label-convention mmwhs" in capsys.readouterr().err
    # the option given, but wrong: the hint still names the option for the segmentations
    with pytest.raises(VaeudaError, match=re.escape("they are 'mmwhs' values: read it with --pred-label-convention "
                                                    "mmwhs.")):
        metrics.evaluate_dirs(pred, ref, load_convention("consecutive"), pred_convention=load_convention("consecutive"))
    # consecutive segmentations against MM-WHS references read as MM-WHS: no structure, and the way out
    consecutive = tmp_path / "consecutive"
    consecutive.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(classes), str(consecutive / "s_seg.nii.gz"))
    mmwhs_ref = tmp_path / "mmwhs_ref"
    mmwhs_ref.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(mmwhs), str(mmwhs_ref / "s_label.nii.gz"))
    with pytest.raises(VaeudaError, match=re.escape(
            "is it in another label convention? The references read with --label-convention mmwhs; give the "
            "segmentations' own with --pred-label-convention.")):
        metrics.evaluate_dirs(consecutive, mmwhs_ref, MMWHS)
    # an image given as a segmentation: not a convention's problem, so no hint about one
    image = tmp_path / "image"
    image.mkdir()
    intensities = np.arange(720, dtype=np.int16).reshape(8, 9, 10)
    sitk.WriteImage(sitk.GetImageFromArray(intensities), str(image / "s_seg.nii.gz"))
    with pytest.raises(VaeudaError, match=r"is it an image rather than a label map\?$"):
        metrics.evaluate_dirs(image, mmwhs_ref, MMWHS)


def test_evaluate_names_the_structures_a_reference_lacks(tmp_path, capsys):
    """A reference holding none of a structure (another convention's map, a map of the right heart only)
    was scored without a word: the structure is scored as empty, 100 or 0 Dice."""
    from vaeuda.cli import main
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a, _ = two_cubes()
    right_heart = np.where(a, 600, 0).astype(np.uint16)                 # RV only: background under MM-WHS
    write_raw(ref_dir / "x_label.nii.gz", right_heart)
    write_label(pred_dir / "x_seg.nii.gz", a.astype(np.uint8))          # LV-M where the RV is
    full = np.zeros(a.shape, np.uint8)
    full[0, 0, :4], full[5, 5, :4] = (1, 2, 3, 4), (1, 2, 3, 4)
    write_label(ref_dir / "y_label.nii.gz", full)
    write_label(pred_dir / "y_seg.nii.gz", full)
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--progress", "none"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: the reference x_label.nii.gz holds no LV-M, LA-B, LV-B, A-A; scored as empty there "
                     "(Dice 100 where the segmentation is empty too, 0 where it is not)"]
    result = json.loads((pred_dir / "evaluation.json").read_text())
    assert result["references_lacking"] == {str(ref_dir / "x_label.nii.gz"): ["LV-M", "LA-B", "LV-B", "A-A"]}
    x = result["volumes"][0]["metrics"]
    assert (x["LV-M"]["dice"], x["LA-B"]["dice"]) == (0.0, 1.0)
