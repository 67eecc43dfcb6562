"""data: finding and pairing input volumes, the few-shot --slices range, and slice sampling weights."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from vaeuda import train as train_mod
from vaeuda.cli import main
from vaeuda.data import SliceSet, find_images, find_pairs, load_slices, parse_slice_range
from vaeuda.errors import VaeudaError
from vaeuda.labels import MMWHS
from vaeuda.volumes import DEFAULT_NORMALISATION

# (z, y, x) = (6, 8, 7) with the identity direction: already LPS, so one coronal slice per y index, 8 of them.
SHAPE = (6, 8, 7)
N_CORONAL = SHAPE[1]


def _ramp_image() -> np.ndarray:
    """Values that differ on every coronal plane, so each slice can be told from its neighbours."""
    z, y, x = np.indices(SHAPE)
    return (100.0 * y + 10.0 * z + x).astype(np.float32)


def _plane_labels() -> np.ndarray:
    """MM-WHS values: coronal plane y = j holds a block of a structure chosen by j (plane 0 none)."""
    values = (0, 205, 420, 500, 820)
    labels = np.zeros(SHAPE, np.int16)
    for j in range(1, N_CORONAL):
        labels[1:5, j, 1:6] = values[j % 5]
    return labels


def _write_pair(tmp_volume, prefix: str):
    return (tmp_volume(_ramp_image(), name=f"{prefix}_image.nii.gz"),
            tmp_volume(_plane_labels(), name=f"{prefix}_label.nii.gz"))


# --------------------------------------------------------------------------- --slices


def test_slice_range_keeps_exactly_those_coronal_slices(tmp_volume):
    """Catches an off-by-one in A:B (B included, A skipped) or labels not cut with their images."""
    image, label = _write_pair(tmp_volume, "a")
    full = load_slices([image], 8, None, DEFAULT_NORMALISATION, [label], MMWHS)
    part = load_slices([image], 8, None, DEFAULT_NORMALISATION, [label], MMWHS, slice_range=(2, 5))
    assert len(full) == N_CORONAL and len(part) == 3
    torch.testing.assert_close(part.images, full.images[2:5], rtol=0, atol=0)
    torch.testing.assert_close(part.labels, full.labels[2:5], rtol=0, atol=0)
    assert part.volume_index.tolist() == [0, 0, 0]
    assert [sorted(set(s.unique().tolist())) for s in part.labels] == [[0, 2], [0, 3], [0, 4]]   # planes 2, 3, 4
    # the planes really differ, so the equality above pins down which three were kept
    assert not torch.equal(full.images[1], full.images[2]) and not torch.equal(full.images[4], full.images[5])


def test_slice_range_applies_to_each_volume_and_up_to_the_last_slice(tmp_volume):
    """B equal to the slice count is allowed (catches `>=` for `>`); each volume gets the range."""
    image_a, _ = _write_pair(tmp_volume, "a")
    image_b = tmp_volume(_ramp_image()[:, :, ::-1].copy(), name="b_image.nii.gz")
    full = load_slices([image_a, image_b], 8, None, DEFAULT_NORMALISATION)
    part = load_slices([image_a, image_b], 8, None, DEFAULT_NORMALISATION, slice_range=(N_CORONAL - 2, N_CORONAL))
    assert part.labels is None
    assert part.volume_index.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(part.images[:2], full.images[N_CORONAL - 2:N_CORONAL], rtol=0, atol=0)
    torch.testing.assert_close(part.images[2:], full.images[2 * N_CORONAL - 2:], rtol=0, atol=0)


def test_slice_range_beyond_the_volume_is_refused_naming_the_file(tmp_volume):
    image, _ = _write_pair(tmp_volume, "a")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(image))}: --slices 6:9 is outside its "
                                          f"{N_CORONAL} coronal slices\\.$"):
        load_slices([image], 8, None, DEFAULT_NORMALISATION, slice_range=(6, 9))


def test_adapt_trains_on_the_chosen_target_slices_only(tmp_path, tmp_volume, monkeypatch):
    """Catches slice_range dropped on its way to the target set, or applied to the labelled source too."""
    # voxels of 20 mm in-plane: at 1 mm the labelled blocks vanish in the 192 mm field of view (and training refuses)
    src_image, src_label = (tmp_volume(array, spacing=(20.0, 1.0, 20.0), name=f"mr_{role}.nii.gz")
                            for array, role in ((_ramp_image(), "image"), (_plane_labels(), "label")))
    target = tmp_volume(_ramp_image()[::-1].copy(), name="ct_image.nii.gz")
    model = tmp_path / "source.safetensors"
    train_mod.train_source([src_image], [src_label], model, preset="tiny", iterations=1, seed=0, device="cpu")
    stages = []
    monkeypatch.setattr(train_mod, "run_stage", lambda net, stage, *a, **k: stages.append((net, stage)) or {})
    train_mod.adapt(model, [target], tmp_path / "adapted.safetensors", iterations=1, device="cpu",
                    slice_range=(2, 5))
    (net, stage), = stages
    full = load_slices([target], net.cfg.input_size, net.cfg.slice_fov_mm, DEFAULT_NORMALISATION)
    assert stage.target.images.shape[0] == 3
    torch.testing.assert_close(stage.target.images, full.images[2:5], rtol=0, atol=0)
    assert len(stage.source) == N_CORONAL                     # the labelled source keeps all its slices
    assert stage.meta["provenance"]["slices"] == [2, 5]
    assert not (tmp_path / "adapted.safetensors").exists()


@pytest.mark.parametrize("spec, message", [
    ("a:b", "--slices 'a:b' must look like A:B, for example 60:63."),
    ("5", "--slices '5' must look like A:B, for example 60:63."),
    ("1:2:3", "--slices '1:2:3' must look like A:B, for example 60:63."),
    ("5:3", "--slices '5:3' must have 0 <= A < B."),
    ("4:4", "--slices '4:4' must have 0 <= A < B."),
    ("-1:2", "--slices '-1:2' must have 0 <= A < B."),
])
def test_bad_slice_range_is_one_sentence(spec, message):
    with pytest.raises(VaeudaError, match=f"^{re.escape(message)}$"):
        parse_slice_range(spec)


def test_slice_range_parses_to_a_half_open_pair():
    assert parse_slice_range("60:63") == (60, 63)
    assert parse_slice_range("0:1") == (0, 1)
    assert parse_slice_range(None) is None and parse_slice_range("") is None


def test_cli_bad_slices_exits_2_and_writes_nothing(tmp_path, tmp_volume, capsys):
    image, _ = _write_pair(tmp_volume, "ct")
    out = tmp_path / "adapted.safetensors"
    code = main(["adapt", "--model", str(tmp_path / "source.safetensors"), "--out", str(out), "--slices", "5:3",
                 "--progress", "none", str(image)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["vaeuda: error: --slices '5:3' must have 0 <= A < B."]
    assert not out.exists()


# --------------------------------------------------------------------------- sampling weights


def test_sampling_weights_favour_slices_with_any_structure():
    """Catches only some classes counted as foreground, or the background weight applied the wrong way round."""
    labels = torch.zeros(4, 3, 3, dtype=torch.uint8)
    labels[0, 1, 1] = 1
    labels[1, 2, 0] = 4                                   # one pixel of the last structure is enough
    data = SliceSet(torch.zeros(4, 3, 3, 3), labels, torch.zeros(4, dtype=torch.int32))
    assert data.sampling_weights().tolist() == [1.0, 1.0, 0.25, 0.25]
    assert data.sampling_weights(background_weight=0.5).tolist() == [1.0, 1.0, 0.5, 0.5]
    assert train_mod.TrainConfig().background_weight == 0.25


def test_unlabelled_slices_are_drawn_uniformly():
    data = SliceSet(torch.zeros(4, 3, 3, 3), None, torch.zeros(4, dtype=torch.int32))
    assert data.sampling_weights().tolist() == [1.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- finding and pairing files


def test_folder_gives_its_images_not_their_labels(tmp_path, tmp_volume):
    image, label = _write_pair(tmp_volume, "a")
    (tmp_path / "notes.txt").write_text("not a volume")
    assert find_images([str(tmp_path)]) == [image]
    assert find_pairs([str(tmp_path)]) == [(image, label)]


def test_folder_without_image_names_gives_every_volume_but_labels(tmp_path, tmp_volume):
    plain = tmp_volume(_ramp_image(), name="scan.nrrd")
    tmp_volume(_plane_labels(), name="scan_label.nrrd")
    assert find_images([str(tmp_path)]) == [plain]


def test_each_image_is_paired_with_its_own_label(tmp_path, tmp_volume):
    """Catches pairs made by sorting images and labels separately, or X paired with Y's label."""
    image_b, label_b = _write_pair(tmp_volume, "b")
    image_a, label_a = _write_pair(tmp_volume, "a")
    assert find_pairs([str(image_b), str(image_a)]) == [(image_b, label_b), (image_a, label_a)]
    seg_z, seg_y = (tmp_volume(_plane_labels(), name=name) for name in ("z_seg.nii.gz", "y_seg.nii.gz"))
    assert find_pairs([str(image_b), str(image_a)], [str(seg_z), str(seg_y)]) == \
        [(image_b, seg_z), (image_a, seg_y)]              # --labels: in the order given, whatever the names


def test_hidden_files_are_no_scans(tmp_path, tmp_volume):
    """A folder copied from a Mac carries "._X" metadata twins with the scans' extensions."""
    image, label = _write_pair(tmp_volume, "a")
    for twin in ("._a_image.nii.gz", "._a_label.nii.gz"):
        (tmp_path / twin).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert find_pairs([str(tmp_path)]) == [(image, label)]


def test_image_and_label_roles_match_in_any_case(tmp_path, tmp_volume):
    """Extensions match in any case, so the roles do: before, A_IMAGE / A_LABEL made the label an
    image, and b_Image / b_Label was dropped beside a_image / a_label without a word."""
    upper = (tmp_volume(_ramp_image(), name="A_IMAGE.nii.gz"), tmp_volume(_plane_labels(), name="A_LABEL.nii.gz"))
    title = (tmp_volume(_ramp_image(), name="b_Image.nii.gz"), tmp_volume(_plane_labels(), name="b_Label.nii.gz"))
    mixed = (tmp_volume(_ramp_image(), name="c_image.nii.gz"), tmp_volume(_plane_labels(), name="c_LABEL.nii.gz"))
    assert find_pairs([str(tmp_path)]) == sorted([upper, title, mixed])


def test_a_labelled_volume_given_twice_is_refused(tmp_path, tmp_volume):
    """Training would draw its slices twice as often, unasked (adapt and segment refused a repeat already).
    The same image with two labels (two raters), or one label for two images, are two pairs."""
    image = tmp_volume(_ramp_image(), name="a_image.nii.gz")
    label = tmp_volume(_plane_labels(), name="a_label.nii.gz")
    other = tmp_volume(_ramp_image(), name="b_image.nii.gz")
    second = tmp_volume(_plane_labels(), name="rater2.nii.gz")
    again = tmp_path / "." / "a_image.nii.gz"                             # the same file, spelt otherwise
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(again))}: given twice with the label "
                                          f"{re.escape(str(label))}; give each labelled volume once\\.$"):
        find_pairs([str(image), str(again)])
    with pytest.raises(VaeudaError, match="given twice with the label"):
        find_pairs([str(image), str(image)], labels=[str(label), str(label)])
    assert find_pairs([str(image), str(other)], labels=[str(label), str(label)]) == [(image, label), (other, label)]
    linked = tmp_path / "linked.nii.gz"                                   # the same file under another name
    os.link(image, linked)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(linked))}: given twice with the label "):
        find_pairs([str(image), str(linked)], labels=[str(label), str(label)])
    assert find_pairs([str(image), str(image)], labels=[str(label), str(second)]) == [(image, label), (image, second)]


def test_image_whose_label_is_missing_is_refused(tmp_path, tmp_volume):
    image = tmp_volume(_ramp_image(), name="a_image.nii.gz")
    label = tmp_path / "a_label.nii.gz"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(label))}: label file not found\\.$"):
        find_pairs([str(image)])


def test_image_without_the_image_suffix_cannot_find_its_label(tmp_volume):
    image = tmp_volume(_ramp_image(), name="scan.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(image))}: cannot find its label: name it "
                                          f"X_image\\.nii\\.gz beside X_label\\.nii\\.gz, or pass --labels\\.$"):
        find_pairs([str(image)])


def test_a_label_file_given_as_an_image_is_named_as_such(tmp_volume):
    """train-source a_label.nii.gz: not "cannot find its label", which asks to rename a label file."""
    label = tmp_volume(np.zeros((4, 5, 6), np.uint8), name="a_label.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(label))}: is a label file; give the images "
                                          f"\\(X_image\\.nii\\.gz\\), and each finds its X_label\\.nii\\.gz "
                                          f"beside it\\.$"):
        find_pairs([str(label)])


def test_given_label_that_does_not_exist_is_refused(tmp_path, tmp_volume):
    image, _ = _write_pair(tmp_volume, "a")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'other.nii.gz'))}: label file not found\\.$"):
        find_pairs([str(image)], [str(tmp_path / "other.nii.gz")])


def test_empty_folder_holds_no_image_volumes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'empty'))}: folder holds no image volumes\\.$"):
        find_images([str(tmp_path / "empty")])


def test_folder_of_label_volumes_only_is_not_taken_for_a_dicom_series(tmp_path, tmp_volume):
    """Only *_label volumes: no image to segment, and no DICOM series either."""
    folder = tmp_volume(np.zeros((2, 3, 4), np.uint8), name="a_label.nii.gz").parent   # tmp_path, nothing else in it
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: folder holds label volumes \\(\\*_label\\) "
                                          f"but no image volumes\\.$"):
        find_images([str(folder)])


def test_no_inputs_is_refused():
    with pytest.raises(VaeudaError, match=r"^no input volumes were given\.$"):
        find_images([])


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'gone.nii.gz'))}: file not found\\.$"):
        find_images([str(tmp_path / "gone.nii.gz")])
    # a name without a volume suffix may have been meant as either (a folder of MR scans, say)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'mr_train'))}: file or folder not found\\.$"):
        find_images([str(tmp_path / "mr_train")])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'mr_train'))}: folder not found\\.$"):
        find_images([str(tmp_path / "mr_train") + "/"])


def test_label_count_must_match_image_count(tmp_path, tmp_volume):
    image_a, label_a = _write_pair(tmp_volume, "a")
    image_b, _ = _write_pair(tmp_volume, "b")
    with pytest.raises(VaeudaError, match=r"^2 images but 1 label files were given; pass one label per image\.$"):
        find_pairs([str(image_a), str(image_b)], [str(label_a)])


def test_cli_label_count_mismatch_exits_2_and_writes_nothing(tmp_path, tmp_volume, capsys):
    image_a, label_a = _write_pair(tmp_volume, "a")
    image_b, _ = _write_pair(tmp_volume, "b")
    out = tmp_path / "source.safetensors"
    code = main(["train-source", "--preset", "tiny", "--out", str(out), "--progress", "none", "--device", "cpu",
                 str(image_a), str(image_b), "--labels", str(label_a)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["vaeuda: error: 2 images but 1 label files were given; pass one label per image."]
    assert not out.exists()


def test_an_input_behind_a_folder_that_may_not_be_entered_is_one_sentence(tmp_path, monkeypatch):
    """The OS's fallback read "PATH: Permission denied." where an unreadable file reads "PATH: cannot be
    read (Permission denied).": one wording. (Simulated: root may enter any folder.)"""
    import errno
    import pathlib
    blocked = tmp_path / "locked" / "ct_1002_image.nii.gz"
    real_stat = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if self == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(blocked))}: cannot be read \\(Permission denied\\)\\.$"):
        find_images([str(blocked)])


def test_a_label_shared_by_two_images_names_the_one_whose_grid_it_misses(tmp_volume):
    """One label for two co-registered images is allowed; if the second lies on another grid, the
    sentence says which image (the label alone named no culprit)."""
    label = tmp_volume(np.ones((6, 7, 8), np.uint8) * 205, name="lab.nii.gz")
    first = tmp_volume(name="a_image.nii.gz")
    second = tmp_volume(spacing=(1.0, 1.0, 2.0), name="b_image.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(label))}: geometry does not match "
                                          f"{re.escape(str(second))} \\(spacing"):
        load_slices([first, second], 8, None, DEFAULT_NORMALISATION, [label, label], MMWHS)


def test_slice_ranges_take_ascii_digits_only():
    """int() reads other scripts' digits ('٣' is 3): a range typed so is refused, as any other typo."""
    assert parse_slice_range("3:5") == (3, 5)
    with pytest.raises(VaeudaError, match="must look like A:B"):
        parse_slice_range("٣:٥")


def test_a_folder_given_as_labels_is_refused_as_such(tmp_volume, tmp_path):
    """--labels FOLDER had been read as a DICOM series: 'holds no DICOM series and no image volumes',
    of a folder full of volumes."""
    image = tmp_volume(name="a_image.nii.gz")
    tmp_volume(np.zeros((6, 7, 8), np.uint8), name="a_label.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path))}: is a folder; --labels takes label files"):
        find_pairs([str(image)], [str(tmp_path)])


def _require_case_sensitive_names(folder) -> None:
    """Skip where names differing only in case are one file (macOS, Windows by default)."""
    (folder / "case_probe").write_bytes(b"")
    if (folder / "CASE_PROBE").exists():
        pytest.skip("the file system here does not tell names apart by case")
    (folder / "case_probe").unlink()


def test_the_label_spelt_as_its_image_wins_over_other_case_variants(tmp_path, tmp_volume):
    """X_IMAGE pairs with X_LABEL, b_Image with b_Label, even where an X_label / b_label lies beside
    them too (a case-sensitive file system): catches the role spelt in lower case whatever the image's."""
    _require_case_sensitive_names(tmp_path)
    upper = tmp_volume(_ramp_image(), name="A_IMAGE.nii.gz")
    upper_label = tmp_volume(_plane_labels(), name="A_LABEL.nii.gz")
    tmp_volume(_plane_labels(), name="A_label.nii.gz")
    title = tmp_volume(_ramp_image(), name="b_Image.nii.gz")
    title_label = tmp_volume(_plane_labels(), name="b_Label.nii.gz")
    tmp_volume(_plane_labels(), name="b_label.nii.gz")
    assert find_pairs([str(upper), str(title)]) == [(upper, upper_label), (title, title_label)]


def test_two_case_variants_of_the_label_are_not_guessed_between(tmp_path, tmp_volume):
    """a_image beside a_LABEL and a_Label (no a_label): which is meant is unknown, so the label is
    not found, rather than one of them taken at random."""
    _require_case_sensitive_names(tmp_path)
    image = tmp_volume(_ramp_image(), name="a_image.nii.gz")
    for name in ("a_LABEL.nii.gz", "a_Label.nii.gz"):
        tmp_volume(_plane_labels(), name=name)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'a_label.nii.gz'))}: label file not found\\.$"):
        find_pairs([str(image)])


def test_each_volume_is_cut_with_its_own_label(tmp_path, tmp_volume):
    """Two volumes, two different labels: volume 1's slices carry label 1's planes (all background),
    volume 0's carry label 0's (plane j holds class j % 5, plane 0 none). Catches every volume read
    with the first label, and the files list not kept in the set."""
    image_a, label_a = _write_pair(tmp_volume, "a")
    image_b = tmp_volume(_ramp_image(), name="b_image.nii.gz")
    label_b = tmp_volume(np.zeros(SHAPE, np.int16), name="b_label.nii.gz")
    data = load_slices([image_a, image_b], 8, None, DEFAULT_NORMALISATION, [label_a, label_b], MMWHS)
    assert data.volume_index.tolist() == [0] * N_CORONAL + [1] * N_CORONAL
    assert [int(s.max()) for s in data.labels] == [0, 1, 2, 3, 4, 0, 1, 2] + [0] * N_CORONAL
    assert data.files == [str(image_a), str(image_b)]
    assert data.sampling_weights().tolist() == [0.25, 1.0, 1.0, 1.0, 1.0, 0.25, 1.0, 1.0] + [0.25] * N_CORONAL


def test_a_cohort_folder_holding_exactly_its_training_scans_is_taken(tmp_path):
    """A folder holding all of splits.json's training scans and nothing else is what the refusal asks
    for: taken (catches a strict subset test); one scan more is refused."""
    import json
    from vaeuda.data import SOURCE_TRAINING, _refuse_cohort_folder
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1001", "mr_1002"]}, "ct": {}}))
    for name in ("mr_1001_image.nii.gz", "mr_1001_label.nii.gz", "mr_1002_image.nii.gz", "mr_1002_label.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    _refuse_cohort_folder(tmp_path, SOURCE_TRAINING)
    (tmp_path / "ct_1001_image.nii.gz").write_bytes(b"")
    with pytest.raises(VaeudaError, match=re.escape(f"{tmp_path}: is a cohort's folder")):
        _refuse_cohort_folder(tmp_path, SOURCE_TRAINING)
