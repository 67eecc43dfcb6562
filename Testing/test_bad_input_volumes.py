"""volumes: every kind of bad input is refused with a VaeudaError naming the file, nothing half-written."""
from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from vaeuda import volumes
from vaeuda.data import find_images
from vaeuda.errors import VaeudaError
from vaeuda.labels import CONSECUTIVE, MMWHS
from vaeuda.volumes import normalise, read_image, read_label, write_image, write_label


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.nii.gz"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: file or folder not found"):
        read_image(path)


def test_2d_image(tmp_path):
    path = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(5, 6, sitk.sitkInt16), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: expected a 3D scalar image, found a 2D image"):
        read_image(path)


@pytest.mark.parametrize("shear, refused", [(0.05, True), (5e-4, True), (3e-5, False)])
def test_a_sheared_grid_is_refused(tmp_path, shear, refused):
    """Direction cosines that are not orthonormal (a gantry tilt kept in an .mha header): the NIfTI
    segmentation could not lie on that grid. Rounding below the geometry tolerance is accepted."""
    path = tmp_path / "sheared.mha"
    image = sitk.Image([5, 6, 7], sitk.sitkInt16) + 100
    image.SetDirection((1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    if not refused:
        assert read_image(path).GetDirection() == image.GetDirection()
        return
    deviation = max(abs(shear), shear * shear)      # (D^T D - I) has off-diagonal shear, diagonal shear^2
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its direction cosines are not orthonormal "
                                          rf"\(off by {deviation:.2g}: a sheared or gantry-tilted grid"):
        read_image(path)


@pytest.mark.parametrize("size", [(5, 6, 1), (1, 6, 5), (5, 1, 6)])
def test_a_single_slice_saved_as_3d_is_refused(tmp_path, size):
    """Cut into coronal slices, a one-voxel-thick volume gives image rows, not anatomy."""
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(list(size), sitk.sitkInt16), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: is a single slice "
                                          rf"\({' x '.join(map(str, size))} voxels\), not a volume; give the whole scan\.$"):
        read_image(path)


def test_one_file_of_a_dicom_series_is_refused_with_the_folder_named(tmp_path):
    path = tmp_path / "IM0001.dcm"
    sitk.WriteImage(sitk.Image([5, 6, 1], sitk.sitkInt16), str(path))
    with pytest.raises(VaeudaError, match=r"IM0001\.dcm: is a single slice \(5 x 6 x 1 voxels\), not a volume; give "
                                          r"the whole scan \(the folder that holds the DICOM series\)\.$"):
        read_image(path)


def test_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6, 3], sitk.sitkFloat32), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: expected a 3D scalar image, found a 4D image"):
        read_image(path)


def test_vector_image(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: expected a 3D scalar image, found a vector image with 3"):
        read_image(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b this is not really gzip" * 10)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: cannot be read as an image"):
        read_image(path)
    # ITK's own reason is in the sentence
    text = tmp_path / "notes.nii"
    text.write_text("not an image")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(text))}: cannot be read as an image: Unable to "
                                          f"determine ImageIO reader for \"{re.escape(str(text))}\" \\(readable: .nii,"):
        read_image(text)


def test_empty_folder(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: folder holds no DICOM series and no image "
                                          r"volumes \(.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd\)\.$"):
        read_image(folder)


def test_folder_of_other_files(tmp_path):
    """Text files only: data.find_images passes the folder on as DICOM; the sentence names both."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image", encoding="utf-8")
    [found] = find_images([str(folder)])
    assert found == folder
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: folder holds no DICOM series and no image volumes"):
        read_image(found)


def test_label_of_other_geometry(tmp_path, tmp_volume):
    image_path = tmp_volume(np.zeros((6, 7, 8), np.float32), spacing=(1.0, 1.0, 2.0), name="img.nii.gz")
    label_path = tmp_volume(np.zeros((6, 7, 9), np.uint8), spacing=(1.0, 1.0, 2.0), name="lab.nii.gz")
    with pytest.raises(VaeudaError, match=rf"^{re.escape(str(label_path))}: geometry does not match {re.escape(str(image_path))} "
                                          r"\(size: label \(9, 7, 6\), image \(8, 7, 6\)\)"):
        read_label(label_path, MMWHS, reference=image_path)
    shifted = tmp_volume(np.zeros((6, 7, 8), np.uint8), origin=(0.0, 0.5, 0.0), spacing=(1.0, 1.0, 2.0),
                         name="shifted.nii.gz")
    with pytest.raises(VaeudaError,
                       match=rf"^{re.escape(str(shifted))}: geometry does not match the image \(origin: label \("):
        read_label(shifted, MMWHS, reference=read_image(image_path))


def test_unknown_label_values(tmp_volume):
    path = tmp_volume(np.array([0, 1, 7], np.uint8).reshape(1, 1, 3), name="lab.nrrd")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: label values 7 are not in the 'consecutive'"):
        read_label(path, CONSECUTIVE)
    # Under MM-WHS, unknown values are background by definition (422: a stray value beside LV-M) ...
    mixed = tmp_volume(np.array([0, 205, 422], np.uint16).reshape(1, 1, 3), name="mixed.nrrd")
    assert sitk.GetArrayFromImage(read_label(mixed, MMWHS)).ravel().tolist() == [0, 1, 0]
    # ... and so are MM-WHS's other structures, even alone (a map of the right ventricle only),
    others = tmp_volume(np.array([0, 600, 550], np.uint16).reshape(1, 1, 3), name="others.nrrd")
    assert sitk.GetArrayFromImage(read_label(others, MMWHS)).ravel().tolist() == [0, 0, 0]
    # ... but a map with none of the structures and values MM-WHS does not know is in another
    # convention (1..4 read as MM-WHS would score every structure 0 without a word).
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: none of its label values \\(1, 7\\) is a "
                                          f"structure of the 'mmwhs' label mapping; is it in another label convention"):
        read_label(path, MMWHS)


def test_unsupported_output_format_writes_nothing(tmp_path, tmp_volume):
    path = tmp_path / "out.png"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: cannot write '.png' files"):
        write_image(tmp_volume(), path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, tmp_volume, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    target_old = tmp_path / "old.nii.gz"
    target_old.write_bytes(b"previous result")

    def half_write(image, path, useCompression=False):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(volumes.sitk, "WriteImage", half_write)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(target))}: cannot be written \\(disk full\\)"):
        write_image(tmp_volume(), target)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(target_old))}: cannot be written"):
        write_label(tmp_volume(np.ones((2, 2, 2), np.uint8)), target_old, MMWHS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]
    assert target_old.read_bytes() == b"previous result"


def test_inputs_are_not_modified(tmp_volume):
    array = np.array([1.0, 2.0, 50.0], np.float32)
    normalise(array)
    assert array.tolist() == [1.0, 2.0, 50.0]
    image = tmp_volume(np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))
    before = sitk.GetArrayFromImage(image).copy(), image.GetDirection(), image.GetOrigin()
    volumes.SliceGrid.from_image(image, 5).image_slices(image)
    assert np.array_equal(sitk.GetArrayFromImage(image), before[0])
    assert (image.GetDirection(), image.GetOrigin()) == before[1:]


def test_bad_normalisation_recipes():
    with pytest.raises(VaeudaError, match="normalisation method 'histogram' is unknown"):
        normalise(np.zeros(3), {"method": "histogram"})
    with pytest.raises(VaeudaError, match="range"):
        normalise(np.zeros(3), {"method": "fixed", "range": [2.0, 2.0]})


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nrrd", "empty.mha"])
def test_an_empty_file_is_called_empty(tmp_path, name):
    """ITK says it cannot determine an ImageIO reader; the models' and .tfrecords' readers say "empty"."""
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: file is empty\\.$"):
        read_image(path)


def test_a_nifti_cut_inside_its_header_is_called_truncated(tmp_path, tmp_volume):
    """ITK finds no reader for it; the sentence is the one for a file cut further in."""
    path = tmp_volume(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32), name="whole.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[:100])        # (the 352-byte header alone compresses to more than 100)
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(cut))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(cut))}: the file is truncated"):
        read_image(cut)


@pytest.mark.parametrize("name", ["whole.nii.gz", "whole.nii"])
def test_truncated_nifti_is_refused(tmp_path, tmp_volume, name):
    """ITK's NIfTI reader fills a truncated file's missing voxels with zeros without a word."""
    path = tmp_volume(np.random.default_rng(0).normal(size=(20, 21, 22)).astype(np.float32), name=name)
    assert read_image(path).GetSize() == (22, 21, 20)          # the whole file reads
    data = path.read_bytes()
    cut = tmp_path / ("cut_" + name)
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert sitk.ReadImage(str(cut)).GetSize() == (22, 21, 20)  # ITK takes the cut one too
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(cut))}: the file is truncated"):
        read_image(cut)
    with pytest.raises(VaeudaError, match="the file is truncated"):
        read_label(cut, MMWHS)


def _int16_nifti_with_scaling(path, array, slope, inter):
    """An int16 NIfTI-1 file whose header scales its voxels (scl_slope, scl_inter), as dcm2niix writes CT."""
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.int16)), str(path.with_suffix(".tmp.nii")))
    data = bytearray(path.with_suffix(".tmp.nii").read_bytes())
    assert struct.unpack("<h", data[70:72])[0] == 4 and struct.unpack("<h", data[72:74])[0] == 16   # int16
    data[112:120] = struct.pack("<ff", slope, inter)
    if path.name.endswith(".gz"):
        data = gzip.compress(bytes(data))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["scaled.nii", "scaled.nii.gz"])
def test_nifti_with_intensity_scaling_is_read_and_its_truncation_still_seen(tmp_path, name):
    """ITK returns float32 voxels for a scaled int16 file: its size on disk is the header's, not ITK's."""
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    path = tmp_path / name
    _int16_nifti_with_scaling(path, array, 2.0, -1024.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), 2.0 * array - 1024.0)
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    cut = tmp_path / ("cut_" + name)
    cut.write_bytes(gzip.compress(raw[:-10]) if name.endswith(".gz") else raw[:-10])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(cut))}: the file is truncated"):
        read_image(cut)


def test_uncompressed_nifti_named_nii_gz_is_read_and_checked_as_nii(tmp_path, tmp_volume):
    array = np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32)
    plain = tmp_volume(array, name="plain.nii")
    named = tmp_path / "named.nii.gz"
    named.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(named)), array)
    named.write_bytes(plain.read_bytes()[:-3])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(named))}: the file is truncated"):
        read_image(named)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_truncated_metaimage_is_refused_before_itk(tmp_path, capfd, suffix, compress):
    """MetaIO refuses a truncated file too, but prints its own two lines on stderr first; the
    engine sizes the data from the header and says it in one sentence, before ITK runs."""
    array = np.random.default_rng(1).normal(size=(9, 10, 11)).astype(np.float32)
    path = tmp_path / ("whole" + suffix)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=compress)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array)   # the whole file reads
    data_path = path if suffix == ".mha" else path.with_suffix(".zraw" if compress else ".raw")
    data = data_path.read_bytes()
    for cut in (7, 1):                                       # (1: the size check is exact to the byte)
        data_path.write_bytes(data[:-cut])
        capfd.readouterr()
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the file is truncated"):
            read_image(path)
        assert capfd.readouterr().err == ""                  # nothing from MetaIO
    data_path.write_bytes(data)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array)   # the check is exact


def _compressed_metaimage(path, array):
    """Write ``array`` as a compressed MetaImage; returns (header text, data bytes, data file)."""
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)
    if path.suffix == ".mhd":
        return path.read_text(), path.with_suffix(".zraw").read_bytes(), path.with_suffix(".zraw")
    whole = path.read_bytes()
    end = whole.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    return whole[:end].decode(), whole[end:], path


def _write_metaimage(path, header, data, data_file):
    if data_file == path:
        path.write_bytes(header.encode() + data)
    else:
        path.write_text(header)
        data_file.write_bytes(data)


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_damaged_compressed_metaimage_data_are_refused(tmp_path, capfd, suffix):
    """MetaIO inflates what it can, fills the rest with zeros and says "Uncompress failed" on stderr
    only; the engine inflates the stream itself first and refuses it in one sentence."""
    array = np.random.default_rng(2).integers(0, 1000, size=(12, 14, 16)).astype(np.int16)
    path = tmp_path / ("v" + suffix)
    header, data, data_file = _compressed_metaimage(path, array)
    voxel_bytes = array.size * 2
    damaged = bytearray(data)
    damaged[len(data) // 3: len(data) // 3 + 40] = bytes(b ^ 0x55 for b in damaged[len(data) // 3: len(data) // 3 + 40])
    assert len(damaged) == len(data)                            # whole: the size check alone passes it
    sizes = {"CompressedDataSize": f"CompressedDataSize = {len(data)}"}
    cases = {
        "damaged": (header, bytes(damaged), r"its compressed image data are damaged \(Error -3 while decompressing "
                                            r"data: [^)]+\); MetaIO would read the damaged part as zeros\.$"),
        # a CompressedDataSize that stops short of the stream's end
        "cut": (header.replace(sizes["CompressedDataSize"], f"CompressedDataSize = {len(data) // 2}"), data,
                rf"its compressed image data are damaged \(they end after \d+ of the {voxel_bytes} bytes its "
                rf"header's DimSize and ElementType give\); MetaIO would read the rest as zeros\.$"),
        # a header that promises one slice more than the stream holds
        "more slices": (header.replace("DimSize = 16 14 12", "DimSize = 16 14 13"), data,
                        rf"they end after {voxel_bytes} of the {16 * 14 * 13 * 2} bytes"),
        # and one slice fewer: MetaIO reads the first 11 slices without a word
        "fewer slices": (header.replace("DimSize = 16 14 12", "DimSize = 16 14 11"), data,
                         rf"its compressed image data inflate to more than the {16 * 14 * 11 * 2} bytes its header's "
                         rf"DimSize and ElementType give; the header does not describe them\.$"),
    }
    for name, (text, payload, message) in cases.items():
        assert text != header or payload != data, name           # each case changes the file
        _write_metaimage(path, text, payload, data_file)
        capfd.readouterr()
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: .*{message}"):
            read_image(path)
        assert capfd.readouterr().err == "", name                # MetaIO never ran
    # without CompressedDataSize MetaIO takes the rest of a separate data file, and reads noise from a .mha
    unsized = re.sub(r"CompressedDataSize = \d+\n", "", header)
    assert unsized != header
    _write_metaimage(path, unsized, data, data_file)
    if suffix == ".mha":
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its MetaImage header is damaged "
                                              r"\(CompressedData = True without the CompressedDataSize that data in "
                                              r"the same file need\)\.$"):
            read_image(path)
    else:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), array)
    if suffix == ".mhd":    # ... whole from its first byte, whatever HeaderSize says
        skipped = unsized.replace("ElementDataFile", "HeaderSize = 100\nElementDataFile")
        _write_metaimage(path, skipped, data, data_file)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), array)
        _write_metaimage(path, skipped, b"j" * 100 + data, data_file)
        with pytest.raises(VaeudaError, match="its compressed image data are damaged .*incorrect header check"):
            read_image(path)
    # a CompressedDataSize that leaves out only the stream's checksum: every voxel is there for MetaIO
    _write_metaimage(path, header.replace(sizes["CompressedDataSize"], f"CompressedDataSize = {len(data) - 4}"),
                     data, data_file)
    capfd.readouterr()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), array)
    assert capfd.readouterr().err == ""
    _write_metaimage(path, header, data, data_file)             # the intact file reads whole
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), array)


def test_metaimage_with_missing_data_file(tmp_path):
    path = tmp_path / "header.mhd"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(path))
    path.with_suffix(".raw").unlink()
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its data file .*header.raw was not found"):
        read_image(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_intensities_are_refused(tmp_volume, bad):
    array = np.zeros((6, 7, 8), np.float32)
    array[2, 3, 4] = bad
    path = tmp_volume(array, name="bad.mha")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 1 voxel is NaN or infinite; set such voxels to a number first\\.$"):
        read_image(path)


@pytest.mark.parametrize("values, dtype", [((0, 205, 420, 500, 820, 850), np.uint16), ((0, 1, 2, 3, 4, 5), np.uint8),
                                           ((0, 205, 420, 500, 820, 850), np.float32),    # as nibabel often saves them
                                           ((0, 1, 2, 3, 4, 5), np.float64)])
def test_a_label_map_given_as_an_image_is_refused(tmp_volume, values, dtype):
    array = np.zeros((6, 7, 8), dtype)
    array.reshape(-1)[: len(values)] = values
    path = tmp_volume(array, name="heart_label.nii.gz")
    shown = ", ".join(map(str, values))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: is a label map \\(its only values are {shown}\\), "
                                          f"not an image; give the image it labels\\.$"):
        read_image(path)


@pytest.mark.parametrize("array", [
    np.zeros((6, 7, 8), np.int16),                                  # no structure value: nothing to say
    np.full((6, 7, 8), -1024, np.int16),                            # air
    np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8),          # a scan's many values
    np.where(np.arange(6 * 7 * 8).reshape(6, 7, 8) % 2, 205.5, 0.0).astype(np.float32),   # fractional: intensities
])
def test_integer_images_that_are_no_label_maps_are_read(tmp_volume, array):
    path = tmp_volume(array, name="scan.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array.astype(np.float32))


@pytest.mark.parametrize("name, dtype", [("bad.nii.gz", np.float32), ("bad.nii", np.float32),
                                         ("bad.nii.gz", np.float64)])
def test_non_finite_intensities_in_nifti_are_refused(tmp_volume, name, dtype):
    """ITK's NIfTI reader hands NaN and infinite voxels back as 0 (the file holds them): the check
    reads the file's own bytes."""
    array = np.ones((6, 7, 8), dtype)
    array[2, 3, 4], array[5, 6, 7] = np.nan, -np.inf
    path = tmp_volume(array, name=name)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()     # what ITK alone shows
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 2 voxels are NaN or infinite; set such voxels to a number first\\.$"):
        read_image(path)
    with pytest.raises(VaeudaError, match="2 voxels are NaN or infinite"):
        read_label(path, MMWHS)


def test_compressed_data_damaged_past_what_itk_read_is_one_sentence(tmp_volume, monkeypatch):
    path = tmp_volume(np.ones((4, 5, 6), np.float32), name="late.nii.gz")

    def damaged(_path, _nifti):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")
    monkeypatch.setattr(volumes, "_nifti_non_finite", damaged)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the file is damaged \\(Compressed file ended"):
        read_image(path)


@pytest.mark.parametrize("name", ["once.nii.gz", "once.nii"])
def test_the_nifti_checks_parse_the_header_once(tmp_volume, monkeypatch, name):
    """Truncation, spacing and NaN checks share one parse of the header (and find the float voxels)."""
    path = tmp_volume(np.arange(120, dtype=np.float32).reshape(4, 5, 6), name=name)
    parsed, counted = [], []
    layout, non_finite = volumes._nifti_layout, volumes._nifti_non_finite
    monkeypatch.setattr(volumes, "_nifti_layout", lambda header: parsed.append(1) or layout(header))
    monkeypatch.setattr(volumes, "_nifti_non_finite",
                        lambda p, nifti: counted.append(nifti.layout.float_dtype.kind) or non_finite(p, nifti))
    read_image(path)
    assert parsed == [1] and counted == ["f"]


def test_finite_float_and_integer_nifti_pass_the_check(tmp_volume):
    for array in (np.full((4, 5, 6), 3.5, np.float32), np.full((4, 5, 6), -1024, np.int16)):
        path = tmp_volume(array, name=f"ok_{array.dtype}.nii.gz")
        assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array.astype(np.float32))


@pytest.mark.parametrize("mapping, message", [
    ('{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": "zero"}', "'background' must be a whole number, not 'zero'"),
    ('{"LV-M": 1.5, "LA-B": 2, "LV-B": 3, "A-A": 4}', "'LV-M' must be a whole number, not 1.5"),
    ('[205, 420]', "must be a JSON object"),
])
def test_label_mapping_file_with_bad_values_is_refused(tmp_path, mapping, message):
    from vaeuda.labels import load_convention
    path = tmp_path / "map.json"
    path.write_text(mapping)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_convention(str(path))


def test_evaluation_json_never_replaces_a_prediction(tmp_path, tmp_volume):
    from vaeuda.metrics import evaluate_dirs
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:5, 3:6] = 1
    for name in ("pred/case_seg.nii.gz", "ref/case_label.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / name))
    before = (tmp_path / "pred" / "case_seg.nii.gz").read_bytes()
    with pytest.raises(VaeudaError, match="is also an input"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "ref", CONSECUTIVE, tmp_path / "pred" / "case_seg.nii.gz")
    assert (tmp_path / "pred" / "case_seg.nii.gz").read_bytes() == before


def test_a_gzip_file_named_nii_is_told_to_be_renamed(tmp_path):
    """ITK picks its reader by the name and then refuses the bytes; the sentence says what is wrong."""
    plain = tmp_path / "scan_image.nii.gz"
    sitk.WriteImage(sitk.Image([5, 6, 7], sitk.sitkInt16) + 100, str(plain))
    misnamed = tmp_path / "scan_image.nii"
    misnamed.write_bytes(plain.read_bytes())
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(misnamed))}: is gzip-compressed but named .nii; "
                                          r"rename it scan_image\.nii\.gz\.$"):
        read_image(misnamed)


def test_a_missing_label_names_its_twin_in_another_format(tmp_path):
    """X_image.nii pairs with X_label.nii; an X_label.nii.gz beside it is named, not guessed at."""
    from vaeuda.data import find_pairs
    image = tmp_path / "scan_image.nii"
    sitk.WriteImage(sitk.Image([5, 6, 7], sitk.sitkInt16) + 100, str(image))
    sitk.WriteImage(sitk.Image([5, 6, 7], sitk.sitkUInt8), str(tmp_path / "scan_label.nii.gz"))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'scan_label.nii'))}: label file not found "
                                          r"\(scan_label\.nii\.gz is there: give it with --labels\)\.$"):
        find_pairs([str(image)])
    assert find_pairs([str(image)], [str(tmp_path / "scan_label.nii.gz")])[0][1].name == "scan_label.nii.gz"
    with pytest.raises(VaeudaError, match=r"\(scan_label\.nii\.gz is there: store the image and its label in one "
                                          r"format\)\.$"):
        find_pairs([str(image)], labels_option=False)           # adapt's --source-data has no --labels


def test_a_missing_folder_is_called_a_folder(tmp_path):
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'nodir'))}: folder not found\\.$"):
        find_images([f"{tmp_path / 'nodir'}/"])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'scan.nii.gz'))}: file not found\\.$"):
        find_images([str(tmp_path / "scan.nii.gz")])


def test_a_file_that_may_not_be_read_says_so_not_that_it_is_missing(tmp_path, monkeypatch):
    """ITK and safetensors call a file they may not open missing; the OS's reason is the one to act on."""
    from vaeuda import fileio
    from vaeuda.modelfile import read_tensors
    path = tmp_path / "ct_image.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(path))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"\0" * 16)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(fileio, "open", denied, raising=False)       # the module's open, as chmod 000 would make it
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: cannot be read \\(Permission denied\\)\\.$"):
        read_image(path)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(model))}: cannot be read \\(Permission denied\\)\\.$"):
        read_tensors(model)
    monkeypatch.setattr(fileio.os, "listdir", denied)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path))}: cannot be read \\(Permission denied\\)\\.$"):
        read_image(tmp_path)                                           # a DICOM folder that may not be listed


def test_itks_reason_spanning_lines_is_said_on_one(tmp_path):
    """A singular direction matrix: ITK prints both matrices over several lines, of which the last alone
    ('0 0 1') said nothing."""
    path = tmp_path / "singular.mha"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(path))
    path.write_bytes(path.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1",
                                               b"TransformMatrix = 1 0 0 1 0 0 0 0 1"))
    with pytest.raises(VaeudaError, match=re.escape(
            f"{path}: cannot be read as an image: Bad direction, determinant is 0. Refusing to change direction "
            f"from 1 0 0 0 1 0 0 0 1 to 1 1 0 0 0 0 0 0 1 (readable:")):
        read_image(path)


@pytest.mark.parametrize("pixdim, refused", [(0.0, True), (float("nan"), True), (0.7, False)])
def test_a_nifti_header_without_a_voxel_spacing_is_refused(tmp_path, pixdim, refused):
    """ITK reads pixdim 0 or NaN as 1 mm, whatever the sform says: the scan would be cut and resampled at
    the wrong scale without a word."""
    path = tmp_path / "ct_image.nii"
    image = sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(6, 5, 4))
    image.SetSpacing((0.7, 0.8, 2.5))
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", pixdim)                         # pixdim[1], the x spacing (NIfTI-1)
    path.write_bytes(bytes(data))
    gz = tmp_path / "ct_image.nii.gz"
    gz.write_bytes(gzip.compress(bytes(data)))
    for file in (path, gz):
        if refused:
            with pytest.raises(VaeudaError, match=f"^{re.escape(str(file))}: its NIfTI header records no voxel "
                                                  f"spacing along x \\(pixdim 0 or not a number\\)"):
                read_image(file)
        else:
            assert read_image(file).GetSpacing() == pytest.approx((0.7, 0.8, 2.5))


def test_values_beyond_32_bit_floats_are_not_called_nan(tmp_path):
    """Finite float64 voxels that overflow the networks' float32: the file holds no NaN to look for."""
    values = np.zeros((4, 5, 6))
    values[1, 2, 3], values[2, 2, 2] = 1e300, -1e300
    path = tmp_path / "huge.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 2 voxels are beyond the range of 32-bit floats"):
        read_image(path)
    values[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 1 voxel is NaN or infinite"):
        read_image(path)


def test_the_nrrd_readers_itk_prefix_is_cut_too(tmp_path):
    """The NRRD reader's exceptions say 'itk::ERROR:', not 'ITK ERROR:': the reason alone, on one line."""
    path = tmp_path / "no_endian.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nspacings: 1 1 1\nencoding: raw\n\n"
                     + b"\0" * 16)
    with pytest.raises(VaeudaError) as raised:
        read_image(path)
    reason = str(raised.value).split(": cannot be read as an image: ", 1)[1]
    assert "Exception thrown" not in reason and ".cxx" not in reason and "endian" in reason, reason


def test_a_fifo_given_as_input_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO waits for a writer, and ITK's reader did, forever: the check refuses it unopened."""
    import os
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    with pytest.raises(VaeudaError, match="is a pipe, socket or device, not a regular file"):   # at once
        read_image(fifo)


def test_an_npz_that_may_not_be_read_says_so(tmp_path, monkeypatch):
    from vaeuda import fileio
    from vaeuda.formats import read_npz
    path = tmp_path / "ok.npz"
    np.savez(path, np.zeros((2, 2, 1)), np.zeros((2, 2, 1)))

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(fileio, "open", denied, raising=False)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: cannot be read \\(Permission denied\\)\\.$"):
        read_npz(path)


def _nifti_with(tmp_path, name, at, fmt, value):
    """An uncompressed NIfTI-1 file of a small float volume with ``struct.pack(fmt, value)`` at byte ``at``."""
    import struct
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5)), str(path))
    data = bytearray(path.read_bytes())
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("at, fmt, value, reason", [
    (108, "<f", float("nan"), r"vox_offset nan is inside the header or not a number"),     # a traceback before
    (108, "<f", 100.0, r"vox_offset 100.0 is inside the header or not a number"),         # header read as voxels
    (72, "<h", 64, r"bitpix 64 for datatype 16, which has 32"),                           # half the voxels 0
    (268, "<f", float("nan"), r"its position \(qoffset or sform\) is not a number"),      # read as origin 0
    (108, "<f", 348.0, r"vox_offset 348.0 is inside the header or not a number"),         # the 4 extension bytes
    (292, "<f", float("nan"), r"its position \(qoffset or sform\) is not a number"),      # srow_x[3], sform_code 1
])
def test_a_nifti_header_that_contradicts_itself_is_refused(tmp_path, at, fmt, value, reason):
    path = _nifti_with(tmp_path, "v.nii", at, fmt, value)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its NIfTI header is damaged \\({reason}\\)\\.$"):
        read_image(path)


@pytest.mark.parametrize("header, reason", [
    ("NDims = 100\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nDimSize = 4 4 4\n", r"NDims = 100; an image here has 3 dimensions"),
    ("NDims = 3\nDimSize = 4 0 4\n", r"DimSize = 4 0 4, not 3 whole positive numbers"),
    ("NDims = 3\nDimSize = 4 2.5 4\n", r"DimSize = 4 2.5 4, not 3 whole positive numbers"),
    ("NDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 nan 1\n", r"ElementSpacing = 1 nan 1, not 3 numbers"),
    ("NDims = 3\nDimSize = 4 4 4\nOffset = inf 0 0\n", r"Offset = inf 0 0, not 3 numbers"),
    ("NDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 0 1\n", r"ElementSpacing = 1 0 1: a spacing must be positive"),
])
def test_a_metaimage_header_metaio_would_misread_is_refused(tmp_path, header, reason):
    """NDims = 100 with a 3x3 matrix aborted the process (double free in MetaIO); a zero size gave a
    traceback; 2.5 was read as 2; a spacing or origin that is not a number was read as 1 or 0."""
    path = tmp_path / "v.mha"
    path.write_bytes(("ObjectType = Image\n" + header + "ElementType = MET_SHORT\nElementDataFile = LOCAL\n").encode()
                     + b"\0" * 128)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its MetaImage header is damaged \\({reason}\\)\\.$"):
        read_image(path)


def test_detached_headers_refuse_a_pipe_for_data_and_an_empty_file_list(tmp_path):
    """A .mhd or .nhdr naming a FIFO as its data file hung the reader; LIST without names read uninitialised
    memory as voxels."""
    import os
    os.mkfifo(tmp_path / "ff")
    mhd = tmp_path / "v.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = ff\n")
    nhdr = tmp_path / "v.nhdr"
    nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nspacings: 1 1 1\nencoding: raw\n"
                    "endian: little\ndata file: ff\n")
    for path in (mhd, nhdr):
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its data file {re.escape(str(tmp_path / 'ff'))} "
                                              f"is a pipe, socket or device"):
            read_image(path)
    listed = tmp_path / "l.mhd"
    listed.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = LIST\n")
    with pytest.raises(VaeudaError, match="its MetaImage header lists no data files after ElementDataFile = LIST"):
        read_image(listed)


@pytest.mark.parametrize("geometry, reason", [
    ("spacings: 1 nan 2\n", r"records no spacing along axis 1 \(NaN, 0 or negative\)"),
    ("", r"records no spacings"),
    ("space: left-posterior-superior\nspace directions: none none none\n", r"gives spatial axis 0 no direction \('none'\)"),
    ("spacings: 1 0 2\n", r"records no spacing along axis 1 \(NaN, 0 or negative\)"),
    ("kinds: domain domain time\nspacings: 1 1 nan\n", r"records no spacing along axis 2 \(NaN, 0 or negative\)"),
    ("space: left-posterior-superior\nspace directions: (1,0,0) (0,0,0) (0,0,1)\n",
     r"gives spatial axis 1 the direction \(0,0,0\)"),
])
def test_a_nrrd_without_a_voxel_spacing_is_refused_as_nifti_is(tmp_path, geometry, reason):
    """ITK reads a missing or NaN spacing as 1 mm, as it does a NIfTI pixdim of 0, which is refused."""
    path = tmp_path / "v.nrrd"
    path.write_bytes(f"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\n{geometry}encoding: raw\nendian: little\n\n"
                     .encode() + b"\0" * 16)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: its NRRD header {reason}; set the voxel spacing "
                                          f"first \\(ITK would read 1 mm\\)\\.$"):
        read_image(path)


def test_a_detached_header_whose_data_file_is_a_folder_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    mhd = tmp_path / "v.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = data\n")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(mhd))}: its data file {re.escape(str(tmp_path / 'data'))} "
                                          f"is a folder\\.$"):
        read_image(mhd)


def test_the_nifti_librarys_own_complaint_is_the_sentences_reason_not_a_line_before_it(tmp_path, capfd):
    """The NIfTI library prints '** ERROR: nifti_convert_nhdr2nim: bad dim[0]' on the process's stderr
    (file descriptor 2, past Python) before ITK's exception: one sentence now says both."""
    path = tmp_path / "ct_image.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(path))
    data = bytearray(path.read_bytes())
    data[40:42] = struct.pack("<h", 9)                  # dim[0]: nine dimensions, where NIfTI has seven at most
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(VaeudaError, match=re.escape(f"{path}: cannot be read as an image: {path} is not recognized as "
                                                    f"a NIFTI file: bad dim[0] (readable:")):
        read_image(path)
    assert capfd.readouterr().err == ""


def test_c_stderr_is_held_back_only_from_a_refusal(capfd):
    """What C code prints while a read is checked: dropped with a refusal (which says it), let through,
    after the read, when the read succeeds (a warning); an enclosing hold keeps it for itself."""
    import os
    capfd.readouterr()
    with pytest.raises(VaeudaError, match="^refused$"):
        with volumes._held_c_stderr() as held:
            os.write(2, b"** ERROR: nifti_image_read: bad header\n")
            assert volumes._c_complaint(held()) == "bad header"
            raise VaeudaError("refused")
    assert capfd.readouterr().err == ""
    with volumes._held_c_stderr():
        os.write(2, b"a warning\n")
        with volumes._held_c_stderr() as inner:
            os.write(2, b"and another\n")
            assert inner() == "a warning\nand another\n"       # the outer hold's text
        assert capfd.readouterr().err == ""                       # not yet
    assert capfd.readouterr().err == "a warning\nand another\n"
    os.write(2, b"after\n")                                       # descriptor 2 is the terminal's again
    assert capfd.readouterr().err == "after\n"
    assert volumes._c_complaint("") == "" and volumes._c_complaint("WARNING: In x.cxx, line 3\nspacing 0\n") == \
        "spacing 0"


def test_an_earlier_line_in_the_same_hold_is_not_a_later_refusals_reason(tmp_path, capfd):
    """A hold spans a label and its reference image (read_label): what the first read printed had become the
    second's reason ('Unable to determine ImageIO reader ...: other.nii has an odd qform')."""
    import os
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"not an image at all" * 10)
    with volumes._held_c_stderr():
        os.write(2, b"other.nii has an odd qform\n")
        with pytest.raises(VaeudaError) as raised:
            read_image(junk)
    assert str(raised.value) == (f'{junk}: cannot be read as an image: Unable to determine ImageIO reader for "{junk}" '
                                 f"(readable: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd files and DICOM folders).")
    assert capfd.readouterr().err == "other.nii has an odd qform\n"      # the hold ended well: let through


def test_only_the_main_thread_holds_the_processs_stderr(capfd):
    """Descriptor 2 is the whole process's: a read in another thread must not take it from the main one."""
    import os
    import threading
    seen = []

    def read():
        with volumes._held_c_stderr() as held:
            os.write(2, b"from a thread\n")
            seen.append(held())
    capfd.readouterr()
    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert seen == [""] and capfd.readouterr().err == "from a thread\n"


@pytest.mark.parametrize("name", ["short.nii", "short.nii.gz"])
def test_a_nifti_one_byte_short_is_truncated(tmp_path, tmp_volume, name):
    """The size check is exact: the voxel data end one byte before the header's 352 + 4 x 120 bytes
    (a whole gzip stream of those bytes, for .nii.gz: its trailer's size differs, the inflated size
    is counted)."""
    path = tmp_volume(np.arange(120, dtype=np.float32).reshape(4, 5, 6), name=name)
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    assert len(raw) == 352 + 4 * 120
    path.write_bytes(gzip.compress(raw[:-1]) if name.endswith(".gz") else raw[:-1])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the file is truncated"):
        read_image(path)


def test_a_nifti2_cut_inside_its_540_byte_header_is_called_truncated(tmp_path):
    """A NIfTI-2 header (size field 540) cut after 400 bytes: longer than a NIfTI-1 header, still
    inside its own; ITK finds no reader, and the sentence is the truncated file's."""
    path = tmp_path / "cut2.nii"
    path.write_bytes((struct.pack("<i", 540) + b"n+2\0\r\n\x1a\n").ljust(400, b"\0"))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the file is truncated"):
        read_image(path)


def test_nifti_output_size_limit_is_32767_voxels_an_axis():
    """NIfTI-1's dim[] is int16: 32767 voxels along an axis can be written, 32768 cannot."""
    volumes.require_nifti_size(sitk.Image([32767, 2, 2], sitk.sitkUInt8), "fits")
    with pytest.raises(VaeudaError, match=r"^long: 32768 x 2 x 2 voxels; its output would be a NIfTI file, which "
                                          r"holds at most 32767 voxels along an axis\.$"):
        volumes.require_nifti_size(sitk.Image([32768, 2, 2], sitk.sitkUInt8), "long")


def test_a_class_index_the_convention_has_no_value_for_is_not_written(tmp_path):
    """Class 5 with the 5 values of MM-WHS (classes 0..4): refused, nothing written."""
    classes = sitk.GetImageFromArray(np.array([0, 1, 2, 3, 4, 5], np.uint8).reshape(1, 2, 3))
    with pytest.raises(ValueError, match="class index 5 has no value in the 'mmwhs' convention"):
        write_label(classes, tmp_path / "out.nii.gz", MMWHS)
    assert not (tmp_path / "out.nii.gz").exists()
