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


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cohort_over_a_folder_whose_splits_json_is_not_ours_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1002"], "test": []}}), encoding="utf-8")
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


def test_save_preview_writes_a_png(cohort, tmp_path):
    out, _ = cohort
    png = tmp_path / "figs" / "preview.png"
    phantom.save_preview(out, png, n=2)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 300          # 2 x 2 panels plus a legend
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
