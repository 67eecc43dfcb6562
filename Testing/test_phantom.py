"""Tests of vaeuda.phantom: determinism, anatomy, MR/CT appearance, cohort files, atomicity."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from vaeuda import phantom
from vaeuda.errors import VaeudaError
from vaeuda.metrics import dice
from vaeuda.progress import Reporter

TARGETS = (205, 420, 500, 820)
DISTRACTORS = (550, 600, 850)
SIZE = 48


def arrays(subject):
    return [sitk.GetArrayFromImage(img) for img in subject]


@pytest.fixture(scope="module")
def small_subjects():
    """Two subjects of each modality at a small grid, with their tissue maps."""
    return {(m, seed): phantom.simulate_subject(m, seed, SIZE) for m in phantom.MODALITIES for seed in (0, 1)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohorts") / "tiny"
    splits = phantom.make_cohort(out, n_source=3, n_target=2, n_train=2, seed=4, size=24)
    return out, splits


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("modality", phantom.MODALITIES)
def test_same_seed_gives_identical_arrays_and_other_seed_differs(modality):
    first = arrays(phantom.make_subject(modality, 11, 32))
    again = arrays(phantom.make_subject(modality, 11, 32))
    other = arrays(phantom.make_subject(modality, 12, 32))
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_cohort_mr_and_ct_are_different_subjects():
    seeds = {(m, i): phantom.cohort_subject_seed(0, m, i) for m in phantom.MODALITIES for i in range(20)}
    assert len(set(seeds.values())) == 40
    assert phantom.cohort_subject_seed(0, "mr", 0) != phantom.cohort_subject_seed(1, "mr", 0)
    # different for every (seed, modality, index): seed 1's first subject is not seed 0's second
    every = [phantom.cohort_subject_seed(c, m, i) for c in range(4) for m in phantom.MODALITIES for i in range(4)]
    assert len(set(every)) == len(every)


# ---------------------------------------------------------------- geometry helpers (by hand)

def test_rotation_turns_about_x_then_y_then_z():
    quarter = np.pi / 2
    np.testing.assert_allclose(phantom._rotation(quarter, 0, 0) @ [0, 1, 0], [0, 0, 1], atol=1e-12)   # y -> z
    np.testing.assert_allclose(phantom._rotation(0, quarter, 0) @ [0, 0, 1], [1, 0, 0], atol=1e-12)   # z -> x
    np.testing.assert_allclose(phantom._rotation(0, 0, quarter) @ [1, 0, 0], [0, 1, 0], atol=1e-12)   # x -> y
    # x first (y -> z), then y (z -> x): the other order would leave y at z
    np.testing.assert_allclose(phantom._rotation(quarter, quarter, 0) @ [0, 1, 0], [1, 0, 0], atol=1e-12)


def test_frame_is_right_handed_with_the_axis_first_and_the_hint_made_orthogonal():
    frame = phantom._frame(np.array([0.0, 0.0, 2.0]), np.array([3.0, 0.0, 5.0]))
    np.testing.assert_allclose(frame, [[0, 1, 0], [0, 0, 1], [1, 0, 0]], atol=1e-12)   # columns z, x, y


def test_catmull_rom_passes_through_its_points_and_keeps_evenly_spaced_collinear_points_straight():
    points = [np.array([0.0, 0, 0]), np.array([3.0, 0, 0]), np.array([6.0, 0, 0])]
    curve = phantom._catmull_rom(points, per_segment=3)
    # the reflected end points continue the spacing, so the curve is the line at even steps, ends included
    np.testing.assert_allclose(curve, [[x, 0, 0] for x in range(7)], atol=1e-12)
    bent = [np.array([0.0, 0, 0]), np.array([4.0, 0, 0]), np.array([4.0, 4, 0]), np.array([8.0, 4, 8])]
    curve = phantom._catmull_rom(bent, per_segment=4)
    assert curve.shape == (13, 3)
    np.testing.assert_allclose(curve[::4], bent, atol=1e-12)
    # the middle of the middle segment, (-p0 + 9 p1 + 9 p2 - p3) / 16
    np.testing.assert_allclose(curve[6], (-bent[0] + 9 * bent[1] + 9 * bent[2] - bent[3]) / 16, atol=1e-12)


def test_shapes_have_the_bounds_and_insides_worked_out_by_hand():
    turned = phantom._Ellipsoid((0, 0, 0), (5, 2, 1), phantom._rotation(0, 0, np.pi / 2))   # long axis along y
    np.testing.assert_allclose(np.concatenate(turned.bounds()), [-2, -5, -1, 2, 5, 1], atol=1e-12)
    slanted = phantom._Ellipsoid((0, 0, 0), (5, 2, 1), phantom._rotation(0, 0, np.pi / 4))  # long axis along x = y
    d = 4 / np.sqrt(2)
    assert slanted.inside(np.float32(d), np.float32(d), np.float32(0)) and not slanted.inside(
        np.float32(d), np.float32(-d), np.float32(0))
    capsule = phantom._Capsule((0, 0, 0), (4, 0, 0), 1.0)
    np.testing.assert_allclose(np.concatenate(capsule.bounds()), [-1, -1, -1, 5, 1, 1])
    xs = np.array([-1.0, -1.5, 2.0, 2.0, 5.0, 5.5, 6.0], np.float32)
    ys = np.array([0.0, 0.0, 1.0, 1.2, 0.0, 0.0, 0.0], np.float32)
    assert capsule.inside(xs, ys, np.float32(0)).tolist() == [True, False, True, False, True, False, False]
    # a tube's radius goes from r0 at its start to r1 at its end
    tube = phantom._Tube([np.array([0.0, 0, 0]), np.array([10.0, 0, 0]), np.array([20.0, 0, 0])], 4.0, 2.0)
    xs, ys = np.array([1.0, 19.0, 19.0], np.float32), np.array([3.5, 2.5, 1.5], np.float32)
    assert tube.inside(xs, ys, np.float32(0)).tolist() == [True, False, True]


def test_painting_a_shape_in_its_box_equals_evaluating_it_on_the_whole_grid():
    """A ball of radius 2 voxels at a voxel centre holds the 33 lattice points with
    x^2 + y^2 + z^2 <= 4 (1 + 6 + 12 + 8, and the 6 poles, on the box's last rows)."""
    canvas = phantom._Canvas((0, 0, 0), (1, 1, 1), (12, 11, 10))
    canvas.paint(phantom._Ellipsoid((4, 4, 4), (2, 2, 2)), phantom.MUSCLE, 7)
    assert (canvas.label == 7).sum() == 33 and canvas.label[4, 4, 6] == canvas.label[6, 4, 4] == 7
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (10, 11, 12)), indexing="ij")
    for shape in (phantom._Ellipsoid((5.5, 3, 6), (4, 2, 1.5), phantom._rotation(0.3, -0.4, 0.9), cut=-1.0),
                  phantom._Capsule((2, 2, 2), (9, 7, 5), 2.0)):
        canvas = phantom._Canvas((0, 0, 0), (1, 1, 1), (12, 11, 10))
        canvas.paint(shape, phantom.MUSCLE, 7)
        np.testing.assert_array_equal(canvas.label == 7, shape.inside(x, y, z))
    # with where, only over voxels of those tissues
    canvas = phantom._Canvas((0, 0, 0), (1, 1, 1), (12, 11, 10))
    canvas.tissue[:, :, :6] = phantom.FAT
    canvas.paint(phantom._Ellipsoid((5, 5, 5), (4, 4, 4)), phantom.LIVER, where=[phantom.FAT])
    assert (canvas.tissue[:, :, 6:] == phantom.LIVER).sum() == 0 and (canvas.tissue == phantom.LIVER).sum() > 0


def test_heart_pose_scales_rotates_and_grows_its_shapes():
    pose = phantom._HeartPose(center=np.array([1.0, 2.0, 3.0]), rotation=phantom._rotation(0, 0, np.pi / 2), scale=2.0)
    np.testing.assert_allclose(pose.point((1, 0, 0)), [1, 4, 3], atol=1e-12)
    shell = pose.ellipsoid((0, 0, 0), (5, 4, 3), cut=-5, grow=1)
    np.testing.assert_allclose(shell.semi, [11, 9, 7])
    assert shell.cut == -10                            # the cut plane scales with the heart
    tube = pose.tube([(0, 0, 0), (10, 0, 0)], 3, 2, grow=1)
    assert tube.capsules[0].r == 7 and tube.capsules[-1].r == 5


# ---------------------------------------------------------------- heart plan (Docs/phantom.md, Anatomy)

def _heart_poses(seeds):
    """The heart pose each subject seed draws, stopping before anything is painted."""
    class Stop(Exception):
        pass

    poses = []

    def record(heart, *args):
        poses.append(heart)
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(phantom, "_plan_heart", record)
        for seed in seeds:
            with pytest.raises(Stop):
                phantom.simulate_subject("mr", seed, 16)
    return poses


def test_heart_is_rotated_by_up_to_15_degrees_about_each_axis_and_scaled_by_up_to_15_percent():
    for pose in _heart_poses(range(40)):
        r = pose.rotation
        angles = np.degrees([np.arctan2(r[2, 1], r[2, 2]), -np.arcsin(r[2, 0]), np.arctan2(r[1, 0], r[0, 0])])
        assert np.all(np.abs(angles) <= 15), angles
        assert 0.85 <= pose.scale <= 1.15
        assert pose.center[0] > 0 and pose.center[1] < 0        # left of the midline, anterior


def test_heart_plan_sizes_follow_the_documented_ranges():
    """LV cavity 36-46 by 19-25 mm, wall 8-12 mm (0.8 x that at the apex), epicardial fat 5-10 mm
    around every chamber; the ventricles' lowest point is where the diaphragm is fitted."""
    for seed in range(8):
        rng = np.random.default_rng(seed)
        pose = phantom._HeartPose(np.zeros(3), phantom._rotation(*rng.uniform(-0.2, 0.2, 3)), rng.uniform(0.85, 1.15))
        plan, bottom = phantom._plan_heart(pose, rng, spine_y=50.0, body_r=18.0)
        by_label = {}
        for shape, tissue, label, where in plan:
            by_label.setdefault(label, shape)          # the first of each: the chamber, not its vessels
        cavity, wall = by_label[phantom.LV_BLOOD], by_label[phantom.LV_MYO]
        long_axis, short_axis = cavity.semi[:2] / pose.scale
        assert 36 <= long_axis <= 46 and 19 <= short_axis <= 25 and cavity.semi[1] == cavity.semi[2]
        thickness = (wall.semi - cavity.semi) / pose.scale
        assert 8 <= thickness[1] <= 12 and thickness[1] == pytest.approx(thickness[2])
        assert thickness[0] == pytest.approx(0.8 * thickness[1])
        fat = [shape for shape, tissue, label, where in plan if tissue == phantom.FAT]
        chambers = [wall, by_label[phantom.LA_BLOOD], by_label[phantom.RA_BLOOD],
                    next(shape for shape, tissue, label, where in plan if tissue == phantom.MYOCARDIUM and not label)]
        for chamber in chambers:      # for the RV, its outer wall (3.5 mm): the fat grows from there
            around = next(f for f in fat if isinstance(f, phantom._Ellipsoid) and np.allclose(f.center, chamber.center))
            grown = around.semi - chamber.semi
            assert 5 <= grown[0] <= 10 and np.allclose(grown, grown[0])
        ventricles = (wall, chambers[3])
        assert bottom[2] == min(v.bounds()[0][2] for v in ventricles)


# ---------------------------------------------------------------- anatomy

def test_every_subject_has_targets_and_distractors_in_single_pieces(small_subjects):
    for (modality, seed), s in small_subjects.items():
        label = sitk.GetArrayFromImage(s.label)
        assert set(np.unique(label)) <= {0, *TARGETS, *DISTRACTORS}, (modality, seed)
        for value in TARGETS + DISTRACTORS:
            mask = label == value
            assert mask.any(), (modality, seed, value)
            assert ndimage.label(mask)[1] == 1, (modality, seed, value)
        for value in TARGETS:  # visible in several coronal (fixed y) slices
            assert (label == value).any(axis=(0, 2)).sum() >= 4, (modality, seed, value)


def test_myocardium_wraps_the_lv_cavity(small_subjects):
    # the cavity is open only at its base: most of its one-voxel rim is LV myocardium
    for (modality, seed), s in small_subjects.items():
        label = sitk.GetArrayFromImage(s.label)
        cavity = label == 500
        rim = ndimage.binary_dilation(cavity) & ~cavity
        assert (label[rim] == 205).mean() > 0.6, (modality, seed)


def test_same_subject_seed_is_the_same_body_in_both_modalities(small_subjects):
    def lv_ml(s):
        return (sitk.GetArrayFromImage(s.label) == 500).sum() * np.prod(s.label.GetSpacing()) / 1000

    mr, ct = lv_ml(small_subjects[("mr", 0)]), lv_ml(small_subjects[("ct", 0)])
    assert abs(mr - ct) / mr < 0.1


def test_body_frame_overlays_the_mr_and_ct_renderings_of_one_subject(small_subjects):
    mr, ct = small_subjects[("mr", 0)], small_subjects[("ct", 0)]
    scanner_origin = ct.label.GetOrigin()

    def dice_on_mr_grid(ct_label, value):
        moved = sitk.GetArrayFromImage(sitk.Resample(ct_label, mr.label, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        return dice(sitk.GetArrayFromImage(mr.label) == value, moved == value)

    assert dice_on_mr_grid(ct.label, 500) == 0.0                      # scanner frames: the bodies do not meet
    for value in (500, 205):                                          # LV blood, and its 8-12 mm wall
        assert dice_on_mr_grid(phantom.body_frame(ct.label, "ct"), value) > 0.8
    assert ct.label.GetOrigin() == scanner_origin                     # a copy: the input keeps its origin
    assert phantom.body_frame(mr.label, "mr").GetOrigin() == mr.label.GetOrigin()


def test_anatomy_keeps_its_size_in_mm_whatever_the_grid():
    def lv_volume_ml(size):
        label = phantom.make_subject("mr", 3, size)[1]
        voxel_ml = np.prod(label.GetSpacing()) / 1000.0
        return (sitk.GetArrayFromImage(label) == 500).sum() * voxel_ml

    coarse, fine = lv_volume_ml(40), lv_volume_ml(80)
    assert 40 < fine < 250  # an LV cavity, in mL
    assert abs(coarse - fine) / fine < 0.15


def test_image_and_label_share_geometry_and_types(small_subjects):
    for s in small_subjects.values():
        for other in (s.label, s.tissue):
            assert other.GetSize() == s.image.GetSize() == (SIZE, SIZE, SIZE)
            assert other.GetOrigin() == s.image.GetOrigin()
            assert other.GetSpacing() == s.image.GetSpacing()
            assert other.GetDirection() == s.image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert s.image.GetPixelID() == sitk.sitkFloat32
        assert s.label.GetPixelID() == sitk.sitkUInt16
    mr, ct = small_subjects[("mr", 0)].image, small_subjects[("ct", 0)].image
    assert mr.GetOrigin() != ct.GetOrigin()
    # CT covers a wider in-plane field of view than the heart-cropped MR
    for seed in (0, 1):
        mr, ct = small_subjects[("mr", seed)].image, small_subjects[("ct", seed)].image
        assert ct.GetSize()[0] * ct.GetSpacing()[0] > mr.GetSize()[0] * mr.GetSpacing()[0]


# ---------------------------------------------------------------- appearance (the domain shift)

def medians(subject):
    """Median intensity per tissue; soft tissues over their interior, away from partial volume."""
    image, label, tissue = arrays((subject.image, subject.label, subject.tissue))

    def interior(mask):
        return np.median(image[ndimage.binary_erosion(mask)])

    return {
        "bone": np.median(image[tissue == phantom.BONE]),
        "fat": interior(tissue == phantom.FAT),
        "lung": interior(tissue == phantom.LUNG),
        "lv_blood": interior(label == 500),
        "myo": interior(label == 205),
    }


@pytest.mark.parametrize("seed", (0, 1))
def test_ct_contrast_bone_brightest_fat_dark(small_subjects, seed):
    m = medians(small_subjects[("ct", seed)])
    assert m["bone"] > m["lv_blood"] > m["myo"] > m["fat"]
    assert 200 < m["lv_blood"] < 450          # contrast-enhanced blood, HU
    assert -950 < m["lung"] < -700            # aerated lung, HU
    assert -160 < m["fat"] < -40


@pytest.mark.parametrize("seed", (0, 1))
def test_mr_contrast_blood_and_fat_bright_bone_dark(small_subjects, seed):
    m = medians(small_subjects[("mr", seed)])
    assert m["fat"] > m["lv_blood"] > m["myo"] > m["bone"]
    assert m["lv_blood"] > 2 * m["myo"]        # bright-blood bSSFP
    assert m["lung"] < 0.2 * m["lv_blood"]


def test_mr_noise_is_rician_positive_and_ct_is_in_hounsfield_units(small_subjects):
    mr = sitk.GetArrayFromImage(small_subjects[("mr", 1)].image)
    ct = sitk.GetArrayFromImage(small_subjects[("ct", 1)].image)
    assert mr.min() >= 0                       # magnitude image
    assert ct.min() >= -1024 and ct.max() > 500
    assert np.array_equal(ct, np.round(ct))    # integer HU stored as float32


# Docs/phantom.md's appearance table: (MR low, MR high), (CT low, CT high) per tissue.
DOCUMENTED_VALUES = {
    phantom.BLOOD_LEFT: ((650, 820), (250, 400)), phantom.MYOCARDIUM: ((150, 210), (60, 110)),
    phantom.MUSCLE: ((190, 260), (40, 65)), phantom.FAT: ((880, 1000), (-115, -85)),
    phantom.LIVER: ((300, 380), (60, 120)), phantom.ABDOMEN: ((380, 520), (25, 55)),
    phantom.LUNG: ((15, 40), (-870, -830)), phantom.LUNG_VESSEL: ((120, 220), (-50, 120)),
    phantom.BONE: ((25, 60), (850, 1250)), phantom.MARROW: ((420, 540), (180, 320)),
    phantom.AIR: ((0, 0), (-1000, -1000)),
}


@pytest.mark.parametrize("column, modality", ((0, "mr"), (1, "ct")))
def test_tissue_values_cover_the_documented_table(column, modality):
    """Each drawn value lies in its documented range, and 300 draws reach into both ends of it."""
    rng = np.random.default_rng(1)
    drawn = np.array([phantom._tissue_values(modality, rng) for _ in range(300)])
    for tissue, ranges in DOCUMENTED_VALUES.items():
        lo, hi = ranges[column]
        values = drawn[:, tissue]
        assert lo - 0.01 <= values.min() and values.max() <= hi + 0.01, phantom.TISSUES[tissue]
        assert values.min() <= lo + 0.1 * (hi - lo) and values.max() >= hi - 0.1 * (hi - lo), phantom.TISSUES[tissue]


def test_smoothing_takes_sigma_in_mm_per_axis_x_y_z():
    """An impulse on (z, y, x) with 1 x 1 x 4 mm voxels and a 2 mm sigma spreads 2 voxels in x and y
    (variance 4, a little less for the 3-sigma truncation) and half a voxel in z."""
    impulse = np.zeros((9, 21, 21), np.float32)
    impulse[4, 10, 10] = 1
    out = phantom._smooth(impulse, (1.0, 1.0, 4.0), (2.0, 2.0, 2.0))
    assert out.sum() == pytest.approx(1, abs=1e-5)
    k = np.arange(21) - 10
    var_x, var_y = (out.sum(axis=(0, 1)) * k ** 2).sum(), (out.sum(axis=(0, 2)) * k ** 2).sum()
    var_z = (out.sum(axis=(1, 2)) * (np.arange(9) - 4) ** 2).sum()
    assert var_x == pytest.approx(4, rel=0.03) and var_y == pytest.approx(4, rel=0.03) and var_z < 0.3


def test_smooth_noise_is_zero_mean_unit_variance():
    field = phantom._smooth_noise(np.random.default_rng(0), (12, 14, 16), np.array([2.0, 2.0, 3.0]), 4.0)
    assert field.shape == (12, 14, 16)
    assert abs(float(field.mean())) < 1e-5 and float(field.std()) == pytest.approx(1, abs=1e-4)


def test_bias_field_is_centred_on_one_in_log_and_reaches_exactly_its_strength():
    canvas = phantom._Canvas((0, 0, 0), (1, 1, 1), (10, 9, 8))         # (x, y, z): arrays (8, 9, 10)
    field = phantom._bias_field(np.random.default_rng(3), canvas, 0.2)
    assert field.shape == (8, 9, 10)
    log = np.log(field.astype(np.float64))
    assert abs(log.mean()) < 1e-5                                       # no overall gain
    assert np.abs(log).max() == pytest.approx(np.log(1.2), rel=1e-5)    # within 1/1.2 .. 1.2


def test_rendering_blurs_and_biases_as_documented(monkeypatch):
    """Partial volume: Gaussian 0.75 voxel in MR, 0.55 in CT; MR bias field 15-30 %."""
    blurs, strengths = [], []
    real_smooth, real_bias = phantom._smooth, phantom._bias_field
    monkeypatch.setattr(phantom, "_smooth",
                        lambda a, spacing, sigma: blurs.append(np.asarray(sigma) / spacing) or real_smooth(a, spacing, sigma))
    monkeypatch.setattr(phantom, "_bias_field",
                        lambda rng, canvas, strength: strengths.append(strength) or real_bias(rng, canvas, strength))
    for modality, voxels in (("mr", 0.75), ("ct", 0.55)):
        for seed in range(3):
            blurs.clear()
            phantom.simulate_subject(modality, seed, 16)
            assert any(np.allclose(b, voxels) for b in blurs), (modality, blurs)
    assert len(strengths) == 3 and all(0.15 <= s <= 0.30 for s in strengths)


def test_lung_vessels_are_the_top_5_percent_of_a_random_field(small_subjects):
    # a unit normal field exceeds 1.6 in 5.5 % of its voxels
    for (modality, seed), s in small_subjects.items():
        tissue = sitk.GetArrayFromImage(s.tissue)
        lung = np.isin(tissue, (phantom.LUNG, phantom.LUNG_VESSEL))
        assert 0.04 < (tissue[lung] == phantom.LUNG_VESSEL).mean() < 0.07, (modality, seed)


def test_mr_air_holds_rician_noise(small_subjects):
    """Air is the magnitude of complex Gaussian noise (Rayleigh): mean^2 / mean square is pi / 4;
    the magnitude of real noise alone would give 2 / pi = 0.64."""
    for seed in (0, 1):
        s = small_subjects[("mr", seed)]
        image, tissue = arrays((s.image, s.tissue))
        air = image[ndimage.binary_erosion(tissue == phantom.AIR, iterations=2)]
        assert air.size > 1000
        assert np.mean(air) ** 2 / np.mean(air.astype(np.float64) ** 2) == pytest.approx(np.pi / 4, abs=0.02)


def test_ct_right_heart_is_the_most_mixed_blood_pool(small_subjects):
    for seed in (0, 1):
        s = small_subjects[("ct", seed)]
        image, label = arrays((s.image, s.label))
        spread = {v: image[ndimage.binary_erosion(label == v)].std() for v in (500, 600)}
        assert spread[600] > 1.5 * spread[500], spread


def test_mr_field_of_view_is_centred_on_the_heart_and_ct_nearer_the_thorax_centre():
    def fov_centre(modality, seed):
        image = phantom.body_frame(phantom.make_subject(modality, seed, 16)[0], modality)
        return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))

    for seed, pose in enumerate(_heart_poses(range(4))):
        mr, ct = (np.linalg.norm(fov_centre(m, seed)[:2] - pose.center[:2]) for m in ("mr", "ct"))
        assert mr < 20 and mr < ct, (seed, mr, ct)


def test_liver_lies_below_the_heart_on_the_right(small_subjects):
    for (modality, seed), s in small_subjects.items():
        tissue = phantom.body_frame(s.tissue, modality)
        liver = np.argwhere(sitk.GetArrayFromImage(tissue) == phantom.LIVER)
        lv = np.argwhere(sitk.GetArrayFromImage(s.label) == 500)
        assert len(liver) > 1000, (modality, seed)
        x_liver, _, z_liver = tissue.TransformContinuousIndexToPhysicalPoint(liver.mean(axis=0)[::-1].tolist())
        z_lv = tissue.TransformContinuousIndexToPhysicalPoint(lv.mean(axis=0)[::-1].tolist())[2]
        assert x_liver < 0 and z_liver < z_lv, (modality, seed)     # LPS: the patient's right is x < 0


# ---------------------------------------------------------------- cohort files

def test_cohort_files_and_splits(cohort):
    out, splits = cohort
    names = sorted(p.name for p in out.iterdir())
    expected = sorted([f"mr_{i}_{kind}.nii.gz" for i in (1001, 1002, 1003) for kind in ("image", "label")]
                      + [f"ct_{i}_{kind}.nii.gz" for i in (1001, 1002) for kind in ("image", "label")]
                      + ["splits.json"])
    assert names == expected
    on_disk = json.loads((out / "splits.json").read_text())
    assert on_disk == splits
    assert on_disk["labels"] == "mmwhs" and on_disk["seed"] == 4
    assert on_disk["generator"] == f"vaeuda.phantom {phantom.GENERATOR_VERSION}"
    assert on_disk["mr"] == {"train": ["mr_1001", "mr_1002"], "test": ["mr_1003"]}
    assert on_disk["ct"] == {"train": ["ct_1001", "ct_1002"], "test": []}
    assert not list(out.parent.glob(".*part*"))


def test_cohort_files_round_trip_make_subject(cohort):
    out, _ = cohort
    image, label = phantom.make_subject("ct", phantom.cohort_subject_seed(4, "ct", 1), 24)
    read_image = sitk.ReadImage(str(out / "ct_1002_image.nii.gz"))
    read_label = sitk.ReadImage(str(out / "ct_1002_label.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(read_image), sitk.GetArrayFromImage(image))
    assert np.array_equal(sitk.GetArrayFromImage(read_label), sitk.GetArrayFromImage(label))
    np.testing.assert_allclose(read_label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read_label.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(read_image.GetDirection(), np.eye(3).ravel(), atol=1e-6)


def test_cohort_into_existing_file_fails_and_leaves_nothing(tmp_path):
    target = tmp_path / "cohort"
    target.write_text("not a folder")
    with pytest.raises(VaeudaError, match="existing file"):
        phantom.make_cohort(target, n_source=1, n_target=1, n_train=1, size=16)
    assert target.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]


def test_smaller_cohort_over_a_larger_one_removes_the_scans_it_no_longer_lists(tmp_path, capsys):
    """... and says which: a user's own file of such a name goes too."""
    out = tmp_path / "cohort"
    phantom.make_cohort(out, n_source=3, n_target=2, n_train=1, seed=1, size=16)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "mr_1009_image.nii.gz").write_bytes(b"not listed by any splits.json")
    (out / "mr_1003_label.nii.gz").unlink()            # gone already: not named as removed
    reporter = Reporter("json")
    phantom.make_cohort(out, n_source=2, n_target=1, n_train=1, seed=2, size=16, reporter=reporter)
    logged = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()
              if json.loads(line)["event"] == "log"]
    assert logged[-2:] == [  # what it wrote over, then what it removed: models naming those paths read the new scans
        "Replaced 7 file(s) of the cohort that was there before: splits.json, mr_1001_image.nii.gz, "
        "mr_1001_label.nii.gz and 4 more.",
        "Removed 3 file(s) of the cohort that was there before and has scans this one lacks: "
        "ct_1002_image.nii.gz, ct_1002_label.nii.gz, mr_1003_image.nii.gz."]
    scans = sorted(p.name for p in out.glob("*_*.nii.gz"))
    assert scans == ["ct_1001_image.nii.gz", "ct_1001_label.nii.gz", "mr_1001_image.nii.gz",
                     "mr_1001_label.nii.gz", "mr_1002_image.nii.gz", "mr_1002_label.nii.gz",
                     "mr_1009_image.nii.gz"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((out / "splits.json").read_text(encoding="utf-8"))["mr"]["test"] == ["mr_1002"]


def test_a_hand_edited_splits_json_cannot_reach_files_the_generator_never_writes(tmp_path):
    """Only names of the form <modality>_<digits> in an earlier splits.json count as its scans:
    a prefix of another form, or one reaching out of the folder, removes nothing."""
    out = tmp_path / "cohort"
    phantom.make_cohort(out, n_source=2, n_target=1, n_train=1, seed=1, size=16)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    splits["mr"]["test"] += ["scan", "../outside", "ct_1001"]
    (out / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    mine = [out / "scan_image.nii.gz", tmp_path / "outside_label.nii.gz"]
    for path in mine:
        path.write_bytes(b"a user's file")
    phantom.make_cohort(out, n_source=1, n_target=1, n_train=1, seed=2, size=16)
    assert all(path.read_bytes() == b"a user's file" for path in mine)
    assert not (out / "mr_1002_image.nii.gz").exists()                # the generator's own name: removed


def test_an_earlier_scan_that_cannot_be_removed_is_named_and_fails_nothing(tmp_path, capsys, monkeypatch):
    """The new cohort is already in place when the earlier cohort's extra scans are removed: one
    that cannot be removed is named with the reason in a log line, a folder of such a name is
    kept, and the command succeeds."""
    out = tmp_path / "cohort"
    phantom.make_cohort(out, n_source=3, n_target=1, n_train=1, seed=1, size=16)
    (out / "mr_1003_label.nii.gz").unlink()
    (out / "mr_1003_label.nii.gz").mkdir()                 # a folder of the user's, of a scan's name
    real_unlink = Path.unlink

    def refuse_one(self, *args, **kwargs):
        if self.name == "mr_1003_image.nii.gz":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse_one)
    splits = phantom.make_cohort(out, n_source=2, n_target=1, n_train=1, seed=2, size=16, reporter=Reporter("json"))
    logged = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()
              if json.loads(line)["event"] == "log"]
    assert logged[-1] == (f"Could not remove 1 file(s) of the cohort that was there before, which the new cohort "
                          f"does not list: {out / 'mr_1003_image.nii.gz'} ({os.strerror(errno.EACCES)}).")
    assert not any(line.startswith("Removed") for line in logged)
    assert (out / "mr_1003_label.nii.gz").is_dir() and (out / "mr_1003_image.nii.gz").is_file()
    assert splits["mr"] == {"train": ["mr_1001"], "test": ["mr_1002"]}
    assert json.loads((out / "splits.json").read_text(encoding="utf-8"))["seed"] == 2      # the new cohort is there


def test_a_cohort_that_would_not_fit_on_the_disk_is_refused_after_its_first_subject(tmp_path, monkeypatch):
    """`synth --n-source 8999 --size 512` would write for days into a full disk: each modality's first
    subject sizes the rest, against the free space, and nothing is left behind."""
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    made = []
    real_make = phantom.make_subject
    monkeypatch.setattr(phantom, "make_subject", lambda *a: made.append(a[0]) or real_make(*a))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 1000))      # 1000 bytes free
    out = tmp_path / "cohort"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(out))}: the cohort needs about [0-9.]+ MiB more "
                                          r"\(4 more subjects of about [0-9.]+ MiB each\), and 0\.0 MiB are "
                                          r"free; make fewer or smaller subjects \(--n-source, --n-target, --size\), "
                                          r"or free space\.$"):
        phantom.make_cohort(out, n_source=3, n_target=2, n_train=1, size=16)
    assert made == ["mr"] and list(tmp_path.iterdir()) == []               # one subject made, nothing kept
    # room for the MR subjects at their size, not for CT's: refused at the first CT subject
    sizes = {}
    for modality in ("mr", "ct"):
        image, label = real_make(modality, phantom.cohort_subject_seed(0, modality, 0), 16)
        for kind, volume in (("image", image), ("label", label)):
            phantom._write_nifti(volume, tmp_path / f"{modality}_{kind}.nii.gz")
        sizes[modality] = sum((tmp_path / f"{modality}_{kind}.nii.gz").stat().st_size for kind in ("image", "label"))
        for kind in ("image", "label"):
            (tmp_path / f"{modality}_{kind}.nii.gz").unlink()
    free = 40 * sizes["mr"]                  # the 40 CT subjects left after the one MR subject, at MR's size
    assert 39 * sizes["ct"] > free           # ... but not the 39 left after the first CT one, at CT's
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, free))
    made.clear()
    with pytest.raises(VaeudaError, match=r"\(39 more subjects of about"):
        phantom.make_cohort(out, n_source=1, n_target=40, n_train=1, size=16)
    assert made == ["mr", "ct"] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 10 ** 9))
    phantom.make_cohort(out, n_source=3, n_target=2, n_train=1, size=16)          # room: made
    assert len(list(out.glob("*_image.nii.gz"))) == 5
    assert [phantom._bytes_text(n) for n in (1000, 12_900_000, 2 ** 30, 4.56 * 2 ** 30, 3230 * 2 ** 30)] == [
        "0.0 MiB", "12.3 MiB", "1 GiB", "4.56 GiB", "3,230 GiB"]
    # at 1000 GiB the three significant digits would read "1e+03 GiB"
    assert [phantom._bytes_text(n) for n in (999 * 2 ** 30, 1000 * 2 ** 30)] == ["999 GiB", "1,000 GiB"]


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("generator", ({}, {"generator": "vaeuda.other 1"}))    # none, or not the phantom's
def test_cohort_over_a_folder_whose_splits_json_is_not_ours_is_refused_and_changes_nothing(tmp_path, generator):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1002"], "test": []}, **generator}),
                                     encoding="utf-8")
    (out / "mr_1002_image.nii.gz").write_bytes(b"someone else's")
    before = _contents(out)
    with pytest.raises(VaeudaError, match=rf"^{re.escape(str(out))}: holds splits.json, a name this cohort writes, "
                                          r"which no earlier phantom cohort there wrote; choose an empty folder, or "
                                          r"move it away\.$"):
        phantom.make_cohort(out, n_source=1, n_target=1, n_train=1, size=16)
    assert _contents(out) == before


def test_cohort_never_replaces_scans_it_did_not_write(tmp_path):
    """Real scans named as the phantom's are refused, also where an earlier phantom cohort lies
    (one that listed fewer subjects: the new names beyond its own are not its files)."""
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "mr_1001_image.nii.gz").write_bytes(b"a user's scan")
    (out / "ct_1001_label.nii.gz").symlink_to(tmp_path / "nowhere")       # a dangling link is there too
    before = {p.name for p in out.iterdir()}
    with pytest.raises(VaeudaError, match=rf"^{re.escape(str(out))}: holds mr_1001_image.nii.gz, "
                                          r"ct_1001_label.nii.gz, names this cohort writes, .* or move them away\.$"):
        phantom.make_cohort(out, n_source=1, n_target=1, n_train=1, size=16)
    assert {p.name for p in out.iterdir()} == before and (out / "ct_1001_label.nii.gz").is_symlink()
    assert (out / "mr_1001_image.nii.gz").read_bytes() == b"a user's scan"

    ours = tmp_path / "ours"
    phantom.make_cohort(ours, n_source=1, n_target=1, n_train=1, size=16)
    (ours / "mr_1002_label.nii.gz").write_bytes(b"a user's label")
    before = _contents(ours)
    with pytest.raises(VaeudaError, match="holds mr_1002_label.nii.gz, a name this cohort writes"):
        phantom.make_cohort(ours, n_source=2, n_target=1, n_train=1, size=16, seed=5)
    assert _contents(ours) == before
    (ours / "mr_1002_label.nii.gz").unlink()
    phantom.make_cohort(ours, n_source=2, n_target=1, n_train=1, size=16, seed=5)   # its own files: replaced
    assert json.loads((ours / "splits.json").read_text(encoding="utf-8"))["seed"] == 5
    assert before["mr_1001_image.nii.gz"] != (ours / "mr_1001_image.nii.gz").read_bytes()


def test_cohort_failing_midway_leaves_no_folder(tmp_path, monkeypatch):
    real = phantom.make_subject
    calls = []

    def flaky(modality, seed, size=None):
        calls.append(modality)
        if len(calls) == 3:
            raise VaeudaError("simulated failure.")
        return real(modality, seed, size)

    monkeypatch.setattr(phantom, "make_subject", flaky)
    with pytest.raises(VaeudaError, match="simulated"):
        phantom.make_cohort(tmp_path / "cohort", n_source=2, n_target=2, n_train=1, size=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_source=2, n_target=2, n_train=3), "--n-train 3 is larger than the number of MR (2) or CT (2)"),
    (dict(n_source=0, n_target=2, n_train=0), "at least one"),
    (dict(n_source=2, n_target=9000, n_train=1), "--n-source and --n-target take at most 8999 subjects (ids "
                                                 "1001-9999), not 9000"),      # ids stay four digits
    (dict(n_source=2, n_target=2, n_train=1, size=8), "--size 8 must be a whole number of voxels from 16 to 512"),
    (dict(n_source=2, n_target=2, n_train=1, seed=-1), "--seed must be a non-negative whole number, not -1"),
    (dict(n_source=2.5, n_target=2, n_train=1), "--n-source must be a non-negative whole number, not 2.5"),
    # a bool is no count, though Python takes True for 1
    (dict(n_source=1, n_target=1, n_train=True, size=16), "--n-train must be a non-negative whole number, not True"),
    # no CT subject is as wrong as no MR one; too few CT subjects for --n-train as too few MR ones
    (dict(n_source=2, n_target=0, n_train=0, size=16), "a cohort needs at least one MR and one CT subject"),
    (dict(n_source=3, n_target=2, n_train=3, size=16), "--n-train 3 is larger than the number of MR (3) or CT (2)"),
    # 8999 subjects are allowed (ids up to 9999): the next check is the one that refuses (tiny, were it to run)
    (dict(n_source=1, n_target=8999, n_train=2, size=16), "--n-train 2 is larger than the number of MR (1) or CT (8999)"),
])
def test_cohort_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(VaeudaError, match=re.escape(message)):
        phantom.make_cohort(tmp_path / "c", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_make_subject_rejects_unknown_modality_and_bad_seed():
    with pytest.raises(VaeudaError, match="Modality 'us'"):
        phantom.make_subject("us", 0, 16)
    with pytest.raises(VaeudaError, match="seed"):
        phantom.make_subject("mr", -3, 16)


def test_size_limits_are_inclusive_and_modality_names_take_any_case():
    assert [phantom._check_size(n) for n in (None, phantom.MIN_SIZE, phantom.MAX_SIZE, 32.0)] == [None, 16, 512, 32]
    for bad in (phantom.MIN_SIZE - 1, phantom.MAX_SIZE + 1, 32.5, True, "32"):
        with pytest.raises(VaeudaError, match="must be a whole number of voxels from 16 to 512"):
            phantom._check_size(bad)
    # "MR" and "CT" as DICOM writes them are the same modalities
    assert phantom.cohort_subject_seed(0, "MR", 1) == phantom.cohort_subject_seed(0, "mr", 1)
    image = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    assert phantom.body_frame(image, "CT").GetOrigin() == phantom.body_frame(image, "ct").GetOrigin() == (0, -160, 420)


# ---------------------------------------------------------------- preview

def test_coronal_index_prefers_slices_with_more_structures():
    label = np.zeros((5, 4, 6), dtype=np.uint16)
    label[:, 1, :] = 500                        # many voxels, one structure
    label[0, 2, 0], label[0, 2, 1], label[0, 2, 2] = 205, 420, 820  # three structures
    label[1, 3, 0] = 205
    assert phantom._coronal_index(label) == 2
    # all four in y=0 and y=2; in y=0 the smallest (one voxel of LA) is smaller than in y=2
    label[:] = 0
    label[0, 0, :4] = label[1, 2, :4] = label[2, 2, :4] = (205, 420, 500, 820)
    label[1, 0, :4] = (205, 205, 500, 820)
    label[3:, 0, :] = 500                       # y=0 also has more voxels in total
    assert phantom._coronal_index(label) == 2


def test_save_preview_writes_a_png(cohort, tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or real_savefig(self, *a, **k))
    out, _ = cohort
    png = tmp_path / "figs" / "preview.png"
    phantom.save_preview(out, png, n=2)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 300          # 2 x 2 panels plus a legend
    panels = [ax for ax in figures[0].axes if ax.images]
    names = [ax.get_title().split()[0] for ax in panels]
    assert names == ["mr_1001", "mr_1002", "ct_1001", "ct_1002"]              # one row per modality, n each
    for name, ax in zip(names, panels):
        image, label = (sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_{kind}.nii.gz")))
                        for kind in ("image", "label"))
        # (z, y, x) with z superior: the top row shows the last z, and x (towards the patient's left) runs right
        np.testing.assert_array_equal(ax.images[0].get_array(), image[::-1, phantom._coronal_index(label), :])
        left, right, bottom, top = ax.images[0].get_extent()
        assert left < right and bottom < top
    assert panels[2].images[0].get_clim() == panels[3].images[0].get_clim()   # HU: one window for every CT panel
    with pytest.raises(VaeudaError, match="no mr_"):
        phantom.save_preview(tmp_path / "empty", tmp_path / "x.png")


def test_demo_reuses_only_a_cohort_of_the_same_generator_seed_and_size(tmp_path):
    from vaeuda.demo import is_phantom_cohort
    cohort = tmp_path / "cohort"
    assert not is_phantom_cohort(cohort, 0, None)                     # nothing there
    phantom.make_cohort(cohort, n_source=2, n_target=2, n_train=1, seed=3, size=16)
    assert not is_phantom_cohort(cohort, 3, 16)                        # not the demo's 20 + 20 subjects
    splits = json.loads((cohort / "splits.json").read_text())
    splits.update(mr=phantom.split_prefixes("mr", 20, 16), ct=phantom.split_prefixes("ct", 20, 16))
    (cohort / "splits.json").write_text(json.dumps(splits))
    assert splits["ct"]["test"] == ["ct_1017", "ct_1018", "ct_1019", "ct_1020"]
    assert is_phantom_cohort(cohort, 3, 16)
    assert not is_phantom_cohort(cohort, 0, 16)                        # another seed
    assert not is_phantom_cohort(cohort, 3, None)                      # another size
    splits = json.loads((cohort / "splits.json").read_text())
    splits["generator"] = "vaeuda.phantom 1"                           # made by an older generator
    (cohort / "splits.json").write_text(json.dumps(splits))
    assert not is_phantom_cohort(cohort, 3, 16)
    (cohort / "splits.json").write_text("{not json")
    assert not is_phantom_cohort(cohort, 3, 16)


def test_demo_refuses_a_missing_gpu_before_making_the_cohort(tmp_path):
    import torch
    from vaeuda.demo import run_demo
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --device cuda is no error here")
    with pytest.raises(VaeudaError, match="--device cuda was asked for, but no CUDA GPU is available"):
        run_demo(tmp_path / "demo", quick=True, device="cuda")
    assert not (tmp_path / "demo").exists()


def test_demo_figure_shows_the_coronal_slice_with_the_most_structures_then_labelled_voxels():
    """(z, y, x): y = 2 holds 6 labelled voxels of two structures, y = 0 holds 4 of one, spread over
    z and x; axis 0 or 2 would pick something else (index 3 along z, index 4 along x). A slice
    showing three structures in fewer voxels wins over both: the ground truth shows them all."""
    from vaeuda.demo import coronal_slice_with_most_structure
    labels = np.zeros((4, 3, 5), np.uint8)
    labels[3, 2, :] = 1
    labels[1, 2, 4] = 2
    labels[0, 0, 0] = labels[1, 0, 1] = labels[2, 0, 4] = labels[3, 0, 4] = 3
    assert coronal_slice_with_most_structure(labels) == 2
    labels = np.zeros((4, 4, 5), np.uint8)
    labels[:, 1, :] = 1                                     # 20 voxels, one structure
    labels[0, 3, 0], labels[0, 3, 1], labels[0, 3, 2] = 1, 2, 4      # 3 voxels, three structures
    assert coronal_slice_with_most_structure(labels) == 3
    labels = np.zeros((3, 3, 4), np.uint8)
    labels[0, 0, :2] = (1, 2)                               # 2 voxels, two structures
    labels[:, 1, :2], labels[:, 1, 2:] = 1, 2               # 12 voxels, the same two: the fuller slice wins the tie
    assert coronal_slice_with_most_structure(labels) == 1
    assert coronal_slice_with_most_structure(np.zeros((2, 3, 2), np.uint8)) == 0     # nothing labelled


def test_right_heart_values_follow_the_documented_table():
    """Docs/phantom.md: right-heart blood is 0.92-1.04 x the left in MR, and in CT +150 up to
    min(+300, left blood - 30) HU, i.e. always darker than the left by 30 HU or more."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        mr, ct = phantom._tissue_values("mr", rng), phantom._tissue_values("ct", rng)
        assert 0.92 <= mr[phantom.BLOOD_RIGHT] / mr[phantom.BLOOD_LEFT] <= 1.04
        assert 150 <= ct[phantom.BLOOD_RIGHT] <= min(300.0, ct[phantom.BLOOD_LEFT] - 30)


def test_synth_help_gives_the_phantom_size_limits():
    from vaeuda.cli import build_parser
    synth = build_parser()._subparsers._group_actions[0].choices["synth"]
    assert f"{phantom.MIN_SIZE} to {phantom.MAX_SIZE}" in synth.format_help()
    assert synth.format_help().count(f"at most {phantom.MAX_SUBJECTS})") == 2     # --n-source, --n-target


def test_a_pipe_named_splits_json_is_refused_not_read(tmp_path):
    """Reading a FIFO waits for a writer: synth, demo's cohort reuse and experiment hung on one."""
    import os
    from vaeuda.demo import is_phantom_cohort, read_splits
    from vaeuda.errors import VaeudaError
    from vaeuda.phantom import make_cohort
    os.mkfifo(tmp_path / "splits.json")
    with pytest.raises(VaeudaError, match="holds splits.json, a name this cohort writes, which no earlier phantom"):
        make_cohort(tmp_path, n_source=1, n_target=1, n_train=1, seed=0, size=16)
    assert not is_phantom_cohort(tmp_path, 0, None)
    with pytest.raises(VaeudaError, match="is a pipe, socket or device, not a regular file"):
        read_splits(tmp_path)


def test_synth_checks_its_folder_as_other_outputs_are(tmp_path):
    """A name that is not UTF-8 was a UnicodeEncodeError traceback; a dangling link read '(File exists)'."""
    import os
    from vaeuda.phantom import make_cohort
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(VaeudaError, match="link: is a symbolic link to .*nowhere, which does not exist"):
        make_cohort(tmp_path / "link", n_source=1, n_target=1, n_train=1, seed=0, size=16)
    with pytest.raises(VaeudaError, match="its name is not UTF-8 text"):
        make_cohort(os.fsdecode(bytes(tmp_path) + b"/bad\xff"), n_source=1, n_target=1, n_train=1, seed=0, size=16)
    with pytest.raises(VaeudaError, match="is named like a file, but OUT_DIR takes the folder"):
        make_cohort(tmp_path / "cohort.json", n_source=1, n_target=1, n_train=1, seed=0, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]
