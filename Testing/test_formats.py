"""formats: the released PnP-AdaNet/SIFA .tfrecords and .npz files, read without TensorFlow."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vaeuda.errors import VaeudaError
from vaeuda.cli import main
from vaeuda.data import find_pairs
from vaeuda.formats import (convert_released, crc32c, follows, masked_crc32c, parse_example, read_npz, read_tfrecords,
                             released_to_image)
from vaeuda.labels import BUILTIN_CONVENTIONS, MMWHS
from vaeuda.volumes import read_image, read_label
from vaeuda.volumes import SliceGrid, normalise

TFRECORDS = ["training_ct", "training_mr", "validation_ct", "validation_mr"]


# --- a minimal tf.train.Example / TFRecord writer, to build test files --------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example(features: dict) -> bytes:
    entries = b""
    for name, value in features.items():
        if isinstance(value, bytes):
            feature = _field(1, _field(1, value))  # bytes_list
        else:
            feature = _field(3, _field(1, b"".join(_varint(v) for v in value)))  # packed int64_list
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    return _field(1, entries)


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def _sample(image: np.ndarray, label: np.ndarray, **extra) -> bytes:
    """image, label (H, W, 3) -> one serialised Example as the released files have them."""
    features = {"data_vol": image.astype("<f4").tobytes(), "label_vol": label.astype("<f4").tobytes()}
    for prefix, array in (("dsize_dim", image), ("lsize_dim", label)):
        features.update({f"{prefix}{d}": [array.shape[d]] for d in range(3)})
    features.update(extra)
    return _example(features)


# --- CRC and framing ---------------------------------------------------------------------------

def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0


def test_masked_crc_matches_what_tensorflow_wrote(mmwhs_samples):
    """A TFRecord starts with the record length (8 bytes) and TensorFlow's masked CRC-32C of it."""
    for name in ("training_mr.tfrecords", "training_ct.tfrecords"):
        head = (mmwhs_samples / name).read_bytes()[:12]
        assert masked_crc32c(head[:8]) == int.from_bytes(head[8:12], "little"), name


def test_synthetic_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(4, 6, 3)).astype(np.float32) for _ in range(2)]
    labels = [np.stack([np.full((4, 6), 9.0), np.arange(24).reshape(4, 6) % 6, np.full((4, 6), 9.0)], -1)
              for _ in range(2)]
    path = tmp_path / "two.tfrecords"
    path.write_bytes(b"".join(_record(_sample(i, l, bias_dim0=[-27])) for i, l in zip(images, labels)))
    samples = read_tfrecords(path)
    assert len(samples) == 2
    for (image, label), raw_image in zip(samples, images):
        assert image.dtype == np.float32 and image.shape == (3, 4, 6)
        np.testing.assert_array_equal(image, raw_image.transpose(2, 0, 1))  # channels first
        assert label.dtype == np.uint8 and label.shape == (4, 6)
        # The middle channel (never the 9s of the others), with 5 -> background.
        expected = np.arange(24).reshape(4, 6) % 6
        expected[expected == 5] = 0
        np.testing.assert_array_equal(label, expected)
    assert parse_example(_sample(images[0], labels[0], bias_dim0=[-27]))["bias_dim0"] == [-27]


def test_record_with_wrong_sizes_or_label_values_is_refused(tmp_path):
    image = np.zeros((4, 6, 3), np.float32)
    path = tmp_path / "bad.tfrecords"
    path.write_bytes(_record(_sample(image, image, dsize_dim0=[5])))
    with pytest.raises(VaeudaError, match=r"record 0 has 288 bytes of 'data_vol', not the 360"):
        read_tfrecords(path)
    for value in (7, 6, -1):                    # (6: one past the release's ignored 5; -1 would wrap to 255)
        path.write_bytes(_record(_sample(image, np.full((4, 6, 3), float(value)))))
        with pytest.raises(VaeudaError, match=f"record 0 label values {value} are outside 0..5"):
            read_tfrecords(path)
    path.write_bytes(_record(b"\x0a\xff\xff"))  # a length that runs past the end
    with pytest.raises(VaeudaError, match="record 0 is not a valid tf.train.Example"):
        read_tfrecords(path)
    # the label grid differs from the image's in its second dimension only
    path.write_bytes(_record(_sample(image, np.zeros((4, 5, 3), np.float32))))
    with pytest.raises(VaeudaError, match=r"record 0 has image size \(4, 6, 3\) but label size \(4, 5, 3\)"):
        read_tfrecords(path)


def test_empty_file_and_record_without_the_image_are_refused(tmp_path):
    path = tmp_path / "empty.tfrecords"
    path.write_bytes(b"")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: file is empty.$"):
        read_tfrecords(path)
    image = np.zeros((4, 6, 3), np.float32)
    label_only = {"label_vol": image.tobytes(), **{f"lsize_dim{d}": [image.shape[d]] for d in range(3)}}
    path.write_bytes(_record(_example(label_only)))
    with pytest.raises(VaeudaError, match=r"record 0 lacks 'data_vol' or its whole-number sizes dsize_dim0..2"):
        read_tfrecords(path)


@pytest.mark.parametrize("sizes, what", [
    ({"dsize_dim2": [1]}, r"'data_vol' the sizes \(4, 6, 1\); a released slice is H x W x 3"),       # one channel
    ({"dsize_dim0": [3], "dsize_dim1": [4], "dsize_dim2": [6]}, r"the sizes \(3, 4, 6\)"),           # channels first
    ({"dsize_dim0": [2 ** 62 + 49152], "dsize_dim1": [4]}, r"H and W at most 4096"),           # overflows int64 products
    ({"dsize_dim0": [-4], "dsize_dim1": [-6]}, r"the sizes \(-4, -6, 3\)"),
    ({"dsize_dim0": [0]}, r"the sizes \(0, 6, 3\)"),                                          # an empty slice
    ({"dsize_dim0": [4097]}, r"the sizes \(4097, 6, 3\); .* H and W at most 4096"),          # one past the limit
    ({"dsize_dim0": [4, 4]}, r"record 0 lacks 'data_vol' or its whole-number sizes dsize_dim0..2"),   # two values
])
def test_record_sizes_that_are_not_a_released_slice_are_refused(tmp_path, sizes, what):
    """The bytes would fit each of these shapes (or overflow) but the slice would be garbage."""
    image = np.zeros((4, 6, 3), np.float32)
    path = tmp_path / "sizes.tfrecords"
    path.write_bytes(_record(_sample(image, image, **sizes)))
    with pytest.raises(VaeudaError, match=what):
        read_tfrecords(path)


def test_a_single_channel_label_is_read(tmp_path):
    """lsize_dim2 1 (the PnP-AdaNet README's size) is the middle slice's label itself."""
    path = tmp_path / "one.tfrecords"
    label = np.arange(24, dtype=np.float32).reshape(4, 6, 1) % 5
    path.write_bytes(_record(_sample(np.zeros((4, 6, 3), np.float32), label)))
    np.testing.assert_array_equal(read_tfrecords(path)[0][1], label[:, :, 0])


def test_float_sizes_are_refused(tmp_path):
    """A float_list size would be truncated (256.4 read as 256): sizes must be int64."""
    image = np.zeros((4, 6, 3), np.float32)
    features = {"data_vol": image.tobytes(), "label_vol": image.tobytes(),
                **{f"lsize_dim{d}": [image.shape[d]] for d in range(3)}, "dsize_dim1": [6], "dsize_dim2": [3]}
    payload = _example(features)
    floats = _field(1, _field(1, b"dsize_dim0") + _field(2, _field(2, _field(1, struct.pack("<f", 4.4)))))
    path = tmp_path / "float.tfrecords"
    path.write_bytes(_record(_field(1, _fields_of(payload) + floats)))
    with pytest.raises(VaeudaError, match="lacks 'data_vol' or its whole-number sizes"):
        read_tfrecords(path)


def _fields_of(example: bytes) -> bytes:
    """The Features message's bytes of an Example made by _example (its one field 1)."""
    from vaeuda.formats import _fields
    return next(value for number, _, value in _fields(example) if number == 1)


def test_record_cut_inside_its_last_crc_is_truncated(tmp_path):
    """The payload whole, its 4-byte CRC cut to 2: still a truncated record, not a struct error."""
    path = tmp_path / "cut.tfrecords"
    path.write_bytes(_record(_sample(np.zeros((4, 6, 3), np.float32), np.zeros((4, 6, 3), np.float32)))[:-2])
    with pytest.raises(VaeudaError, match="record 0 is truncated"):
        read_tfrecords(path)


def test_record_cut_inside_its_length_crc_is_truncated(tmp_path):
    """A record of 10 bytes: its length whole, the CRC of the length cut to 2 bytes."""
    path = tmp_path / "cut.tfrecords"
    path.write_bytes(_record(_sample(np.zeros((4, 6, 3), np.float32), np.zeros((4, 6, 3), np.float32)))[:10])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: record 0 is truncated \\(file is incomplete\\)\\.$"):
        read_tfrecords(path)


def test_example_fields_by_hand():
    """The wire format's corners: a bytes_list of two values gives its first; int64 at both ends of
    its range; one unpacked fixed32 float (wire type 5) after another; an unknown fixed64 field (wire
    type 1, 8 bytes) skipped."""
    two = _field(1, b"name") + _field(2, _field(1, _field(1, b"first") + _field(1, b"second")))
    fixed32 = bytes([1 << 3 | 5]) + struct.pack("<f", 1.5)              # FloatList.value, unpacked
    floats = _field(1, b"spacing") + _field(2, _field(2, fixed32 + fixed32))
    fixed64 = bytes([7 << 3 | 1]) + struct.pack("<d", 2.0)              # Example field 7: not ours
    example = _field(1, _field(1, two) + _field(1, floats)) + fixed64 + _example({"ints": [-2 ** 63, -1, 2 ** 63 - 1]})
    assert parse_example(example) == {"name": b"first", "spacing": [1.5, 1.5], "ints": [-2 ** 63, -1, 2 ** 63 - 1]}


@pytest.mark.parametrize("payload", [
    _field(1, _field(1, _field(1, b"name") + _field(2, _field(1, _field(1, b"value")))))[:-1],   # the last byte cut
    bytes([7 << 3 | 1]) + b"\0\0\0",                 # a fixed64 of 3 bytes
    bytes([7 << 3 | 5]) + b"\0\0",                    # a fixed32 of 2 bytes
    b"\x80" * 10 + b"\x00\x00",                        # a key varint of 11 bytes (64 bits take 10)
], ids=["length past the end", "fixed64 cut", "fixed32 cut", "varint too long"])
def test_a_malformed_example_is_refused_not_read_short(payload):
    """Fields that run past the message's end are malformed (a ValueError), never values cut short."""
    with pytest.raises(ValueError):
        parse_example(payload)


def test_float_list_features_are_little_endian_float32():
    """A float_list feature, packed (wire type 2): values 1.5 and -2.0 as little-endian float32."""
    floats = _field(1, struct.pack("<2f", 1.5, -2.0))                    # FloatList.value, packed
    entry = _field(1, b"spacing") + _field(2, _field(2, floats))         # key, Feature.float_list
    assert parse_example(_field(1, _field(1, entry)))["spacing"] == [1.5, -2.0]


# --- the released fixtures ---------------------------------------------------------------------

@pytest.mark.parametrize("name", TFRECORDS)
def test_released_tfrecords(mmwhs_samples, name):
    samples = read_tfrecords(mmwhs_samples / f"{name}.tfrecords")
    assert len(samples) == 1
    image, label = samples[0]
    assert image.shape == (3, 256, 256) and image.dtype == np.float32
    assert label.shape == (256, 256) and label.dtype == np.uint8
    assert -1.5 < image.min() < -1.0 and 1.5 < image.max() < 2.7  # README: z-scored, about -1.4 .. 2.7
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and label.max() > 0
    assert not np.array_equal(image[0], image[1])  # three different slices, not one repeated
    # The file's value 5 became background: zeros = raw zeros + raw fives of the middle channel.
    raw = parse_example((mmwhs_samples / f"{name}.tfrecords").read_bytes()[12:-4])
    raw_label = np.frombuffer(raw["label_vol"], "<f4").reshape(256, 256, 3)[:, :, 1]
    assert 5 in raw_label
    assert (label == 0).sum() == np.isin(raw_label, (0, 5)).sum()


def test_corrupt_and_truncated_tfrecords_are_refused(mmwhs_samples, tmp_path):
    blob = bytearray((mmwhs_samples / "validation_mr.tfrecords").read_bytes())
    for where in (3, 12 + 500_000):  # in the length, then in the data
        corrupt = bytearray(blob)
        corrupt[where] ^= 0x10
        path = tmp_path / f"corrupt_{where}.tfrecords"
        path.write_bytes(bytes(corrupt))
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: record 0 fails its CRC check \\(file is corrupt\\)\\.$"):
            read_tfrecords(path)
    truncated = tmp_path / "truncated.tfrecords"
    truncated.write_bytes(bytes(blob[:-100]))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(truncated))}: record 0 is truncated"):
        read_tfrecords(truncated)
    two_and_a_bit = tmp_path / "more.tfrecords"
    two_and_a_bit.write_bytes(bytes(blob) * 2 + b"\x01\x02")
    with pytest.raises(VaeudaError, match="record 2 is truncated"):
        read_tfrecords(two_and_a_bit)
    with pytest.raises(VaeudaError, match="file not found"):
        read_tfrecords(tmp_path / "absent.tfrecords")


def test_released_npz_matches_the_same_sample_as_tfrecords(mmwhs_samples):
    image, label = read_npz(mmwhs_samples / "example_mr.npz")
    assert image.shape == (3, 256, 256) and image.dtype == np.float32
    assert label.shape == (3, 256, 256) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
    # README: the npz is the training MR sample; two independent code paths must agree.
    tf_image, tf_label = read_tfrecords(mmwhs_samples / "training_mr.tfrecords")[0]
    np.testing.assert_array_equal(image, tf_image)
    np.testing.assert_array_equal(label[1], tf_label)


def test_bad_npz_files(tmp_path):
    missing = tmp_path / "missing.npz"
    np.savez(missing, image=np.zeros((4, 4, 2)))
    with pytest.raises(VaeudaError, match=r"lacks the array\(s\) arr_0, arr_1 \(found image\)"):
        read_npz(missing)
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, np.zeros((4, 4, 2)), np.zeros((4, 4, 3)))
    with pytest.raises(VaeudaError, match=r"same shape H x W x N \(N slices, at least one\), found \(4, 4, 2\) and \(4, 4, 3\)"):
        read_npz(mismatched)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, np.array([{"a": 1}], dtype=object), np.zeros(1))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(pickled))}: is not a readable .npz file \\(Object arrays"):
        read_npz(pickled)
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(not_zip))}: is not a readable .npz file \\(neither a ZIP "
                                          f"archive of arrays nor a .npy array\\)"):    # not numpy's 'load it unsafely'
        read_npz(not_zip)
    labels = tmp_path / "labels.npz"
    np.savez(labels, np.zeros((2, 2, 1)), np.full((2, 2, 1), 2.5))
    with pytest.raises(VaeudaError, match="arr_1 label values are not whole numbers"):
        read_npz(labels)
    text = tmp_path / "strings.npz"
    np.savez(text, np.full((2, 2, 1), "a"), np.zeros((2, 2, 1)))
    with pytest.raises(VaeudaError, match="arr_0 and arr_1 must be numeric, found <U1 and float64"):
        read_npz(text)
    np.savez(text, np.zeros((2, 2, 1)), np.full((2, 2, 1), "a"))       # the label's type is checked too
    with pytest.raises(VaeudaError, match="arr_0 and arr_1 must be numeric, found float64 and <U1"):
        read_npz(text)
    lone = tmp_path / "lone.npz"                    # np.save's .npy bytes under an .npz name
    with open(lone, "wb") as f:
        np.save(f, np.zeros((4, 4, 2)))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(lone))}: holds a single array, not the arr_0"):
        read_npz(lone)
    for name, value, count in (("nan.npz", np.nan, 1), ("huge.npz", 1e300, 1)):   # 1e300: inf as float32
        image = np.zeros((2, 2, 3))
        image[1, 0, 2] = value
        np.savez(tmp_path / name, image, np.zeros((2, 2, 3)))
        with pytest.raises(VaeudaError, match=f"{name}: arr_0 has {count} NaN or infinite intensities"):
            read_npz(tmp_path / name)


def test_npz_that_is_not_a_released_volume_is_refused_in_one_sentence(tmp_path):
    import zipfile
    raw = tmp_path / "raw.npz"                      # zip members that are not .npy: numpy returns bytes
    with zipfile.ZipFile(raw, "w") as z:
        z.writestr("arr_0", b"abc")
        z.writestr("arr_1", b"def")
    with pytest.raises(VaeudaError, match=r"arr_0 and arr_1 are not numpy arrays"):
        read_npz(raw)
    empty = tmp_path / "empty.npz"
    np.savez(empty, np.zeros((4, 4, 0)), np.zeros((4, 4, 0)))
    with pytest.raises(VaeudaError, match=r"at least one\), found \(4, 4, 0\)"):
        read_npz(empty)
    header = tmp_path / "header.npz"                # a damaged .npy header: numpy's text spans lines
    np.savez(header, np.zeros((2, 2, 1)), np.zeros((2, 2, 1)))
    data = header.read_bytes().replace(b"'descr'", b"'d\xd8cr'")
    header.write_bytes(data)
    with pytest.raises(VaeudaError) as raised:
        read_npz(header)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(f"{header}: is not a readable .npz file (")


def test_a_sifa_test_volume_is_flipped_back_on_both_in_plane_axes(tmp_path):
    """SIFA's evaluate.py: np.flip(data, axis=0) and np.flip(data, axis=1) before use."""
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)          # H x W x N
    label = (np.arange(24).reshape(2, 3, 4) % 5).astype(np.float32)
    path = tmp_path / "test_volume.npz"
    np.savez(path, image, label)
    stored, _ = read_npz(path)
    flipped, flipped_label = read_npz(path, flip_test_volume=True)
    np.testing.assert_array_equal(stored[1], image[:, :, 1])
    np.testing.assert_array_equal(flipped[1], image[::-1, ::-1, 1])
    np.testing.assert_array_equal(flipped_label[3], label[::-1, ::-1, 3])
    assert flipped[0, 0, 0] == image[1, 2, 0]


def test_records_with_non_finite_intensities_are_refused(tmp_path):
    image = np.zeros((4, 6, 3), np.float32)
    image[2, 1, 0] = np.nan
    image[0, 5, 2] = np.inf
    path = tmp_path / "nan.tfrecords"
    zeros = np.zeros((4, 6, 3), np.float32)
    path.write_bytes(_record(_sample(zeros, zeros)) + _record(_sample(image, zeros)))
    with pytest.raises(VaeudaError, match=r"nan.tfrecords: record 1 has 2 NaN or infinite intensities"):
        read_tfrecords(path)


def test_released_slices_come_back_from_slice_grid_turned():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 256, 256)).astype(np.float32)
    labels = rng.integers(0, 5, size=(4, 256, 256)).astype(np.uint8)
    image, label = released_to_image(images, labels)
    grid = SliceGrid.from_image(image, 256)
    assert grid.n_slices == 4
    turned = images.transpose(0, 2, 1)[:, ::-1, ::-1]       # (x, z) -> rows z downwards, columns x leftwards
    recipe = {"method": "zscore", "clip_upper_percentile": 98.0, "clip_lower_percentile": None}
    slices = grid.image_slices(image, recipe)
    np.testing.assert_allclose(slices[:, 1], normalise(turned, recipe), atol=1e-5)
    np.testing.assert_allclose(slices[1:3, 0], normalise(turned, recipe)[0:2], atol=1e-5)
    np.testing.assert_array_equal(grid.label_slices(label), labels.transpose(0, 2, 1)[:, ::-1, ::-1])


@pytest.mark.parametrize("name", ["training_ct", "training_mr"])
def test_released_slices_land_in_the_engine_layout_with_the_aorta_above_and_right_of_the_lv(mmwhs_samples, name):
    """Anatomy fixes the released slices' orientation: in the engine's slices (rows superior ->
    inferior, columns along LPS x, towards the patient's left) the ascending aorta lies above the
    LV cavity (smaller row) and to the patient's right of it (smaller column). Taking the released
    rows as superior -> inferior, as this function once did, puts the aorta below the ventricle."""
    (channels, label), = read_tfrecords(mmwhs_samples / f"{name}.tfrecords")
    image, label_image = released_to_image(channels[1][None], label[None])
    cut = SliceGrid.from_image(image, 256).label_slices(label_image)[0]
    lv_cavity, aorta = (np.argwhere(cut == index).mean(axis=0) for index in (3, 4))   # (row, column)
    assert aorta[0] < lv_cavity[0] - 20                    # superior
    assert aorta[1] < lv_cavity[1] - 20                    # to the patient's right (LPS x smaller)


def test_released_fixture_round_trip(mmwhs_samples):
    images, labels = read_npz(mmwhs_samples / "example_mr.npz")
    image, label = released_to_image(images, labels)
    grid = SliceGrid.from_image(image, 256)
    keep = {"method": "fixed", "range": [-1000.0, 1000.0]}  # v -> v / 1000, no clipping
    np.testing.assert_allclose(grid.image_slices(image, keep)[:, 1] * 1000.0,
                               images.transpose(0, 2, 1)[:, ::-1, ::-1], atol=1e-3)
    one_hot = (np.arange(5)[None, :, None, None] == grid.label_slices(label)[:, None]).astype(np.float16)
    back = grid.scores_to_image(one_hot)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


# --- convert: released files as the engine's image / label pairs --------------------------------

def _released_slices(scan: np.ndarray, labels: np.ndarray) -> list:
    """A scan (N, H, W) as the release stores it: slice k with slices k-1, k, k+1 as channels (the
    ends repeated) and slice k's label, one serialised record each."""
    n = len(scan)
    return [_record(_sample(np.stack([scan[max(k - 1, 0)], scan[k], scan[min(k + 1, n - 1)]], axis=-1),
                            np.repeat(labels[k][..., None], 3, axis=-1))) for k in range(n)]


def _scan(seed: int, n: int, size=(8, 6)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *size)).astype(np.float32),
            rng.integers(0, 5, size=(n, *size)).astype(np.float32))


def _one_slice_files(paths, records) -> None:
    """Each record in a file of its own, as the release stores its slices."""
    for path, record in zip(paths, records):
        path.write_bytes(record)


def _assert_written_as(image_path, label_path, images, classes) -> None:
    """The pair on disk holds what :func:`released_to_image` makes of the slices (labels read back
    through the MM-WHS convention, on the image's grid)."""
    expected_image, expected_label = released_to_image(images, classes.astype(np.uint8))
    image = read_image(image_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected_image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_label(label_path, MMWHS, reference=image)),
                                  sitk.GetArrayFromImage(expected_label))


def test_convert_writes_a_released_volume_as_the_pair_the_engine_reads(mmwhs_samples, tmp_path):
    out = tmp_path / "converted"
    written, breaks = convert_released([mmwhs_samples / "example_mr.npz"], out, MMWHS)
    assert [p.name for p in written] == ["example_mr_image.nii.gz", "example_mr_label.nii.gz"] and breaks == []
    (image_path, label_path), = find_pairs([str(out)])          # train-source's pairing of a folder
    images, classes = read_npz(mmwhs_samples / "example_mr.npz")
    _assert_written_as(image_path, label_path, images, classes)
    # MM-WHS values on disk: LV-M 205, LA-B 420, LV-B 500, A-A 820, as the challenge's own files
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    expected_label = sitk.GetArrayFromImage(released_to_image(images, classes)[1])
    for index, value in enumerate((0, 205, 420, 500, 820)):
        assert np.array_equal(raw == value, expected_label == index), value


def test_a_volume_too_long_for_nifti_is_refused_naming_the_input_not_the_staging_file(tmp_path):
    """NIfTI-1 holds at most 32767 voxels along an axis; ITK's refusal named the hidden staging file."""
    path = tmp_path / "long.npz"
    np.savez(path, np.zeros((2, 40000, 3), np.float32), np.zeros((2, 40000, 3), np.uint8))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: .*voxels; its output would be a NIfTI file, "
                                          f"which holds at most 32767 voxels along an axis\\.$"):
        convert_released([path], tmp_path / "out", MMWHS)
    assert not (tmp_path / "out").exists()


def test_convert_writes_consecutive_values_when_asked(mmwhs_samples, tmp_path):
    convert_released([mmwhs_samples / "example_mr.npz"], tmp_path, BUILTIN_CONVENTIONS["consecutive"])
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "example_mr_label.nii.gz")))
    _, classes = read_npz(mmwhs_samples / "example_mr.npz")
    assert np.array_equal(np.sort(raw.ravel()), np.sort(classes.ravel()))


def test_convert_stacks_tfrecords_in_the_order_given_and_names_the_breaks(tmp_path):
    scan, labels = _scan(3, 5)
    records = _released_slices(scan, labels)
    first, second = tmp_path / "slice_0.tfrecords", tmp_path / "slice_1.tfrecords"
    first.write_bytes(b"".join(records[:3]))     # slices 0-2
    second.write_bytes(b"".join(records[3:]))    # slices 3-4
    written, breaks = convert_released([first, second], tmp_path / "in_order", MMWHS, name="ct_9")
    assert breaks == [] and [p.name for p in written] == ["ct_9_image.nii.gz", "ct_9_label.nii.gz"]
    _assert_written_as(*written, scan, labels)
    # the second file first: slices 3, 4, 0, 1, 2; only slice 0 does not follow the one before it
    _, breaks = convert_released([second, first], tmp_path / "swapped", MMWHS, name="ct_9")
    assert breaks == ["slice_0.tfrecords record 0"]
    one_per_file = [tmp_path / f"s{k}.tfrecords" for k in range(5)]
    _one_slice_files(one_per_file, records)
    _, breaks = convert_released([one_per_file[k] for k in (0, 1, 4, 3, 2)], tmp_path / "reversed", MMWHS, name="ct_9")
    assert breaks == ["s4.tfrecords", "s3.tfrecords", "s2.tfrecords"]


@pytest.mark.parametrize("split", [False, True])
def test_records_none_of_which_follows_another_are_refused_as_no_scan(mmwhs_samples, tmp_path, split):
    """The release's training and validation .tfrecords are augmented slices in shuffled order: stacked
    they make no scan, and split they make one-slice volumes that no other command reads."""
    scan, labels = _scan(3, 4)
    files = [tmp_path / f"s{k}.tfrecords" for k in range(4)]
    _one_slice_files(files, _released_slices(scan, labels))
    message = (r"^none of the 4 \.tfrecords records follows the one before it as its record stores, so stacked they "
               r"make no scan: .*shuffled order, which cannot be stacked back into scans; convert its \.npz volumes, "
               r"or use the MM-WHS volumes themselves\)\.$")
    with pytest.raises(VaeudaError, match=message):
        convert_released(files[::-1], tmp_path / "reversed", MMWHS, name="ct_9", split=split)
    real = [mmwhs_samples / f"{name}.tfrecords" for name in ("training_mr", "validation_mr")]
    with pytest.raises(VaeudaError, match=r"^none of the 2 \.tfrecords records follows"):
        convert_released(real, tmp_path / "released", MMWHS, name="mr", split=split)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in files]     # nothing written
    written, breaks = convert_released(files, tmp_path / "in_order", MMWHS, name="ct_9", split=split)
    assert breaks == [] and len(written) == 2                   # in order they are one scan


def test_follows_needs_both_stored_neighbours():
    a, b, c = (np.full((4, 4), v, np.float32) for v in (1, 2, 3))
    assert follows(np.stack([a, a, b]), np.stack([a, b, c]))
    assert not follows(np.stack([a, a, b]), np.stack([c, b, c]))       # b's first channel is not a
    assert not follows(np.stack([a, a, c]), np.stack([a, b, c]))       # a's third channel is not b
    assert not follows(np.stack([a, a, b]), np.stack([a, b, c])[:, :3])


def test_split_cuts_the_release_into_its_scans(tmp_path):
    """The release numbers its one-slice files across all scans: given them in order, --split gives
    back each scan as a volume of its own."""
    scans = [_scan(5, 4), _scan(6, 3)]
    records = [r for scan, labels in scans for r in _released_slices(scan, labels)]
    files = [tmp_path / f"mr_train_slice{k}.tfrecords" for k in range(len(records))]
    _one_slice_files(files, records)
    written, breaks = convert_released(files, tmp_path / "out", MMWHS, name="mr_train", split=True)
    assert breaks == []
    assert [p.name for p in written] == ["mr_train_001_image.nii.gz", "mr_train_001_label.nii.gz",
                                         "mr_train_002_image.nii.gz", "mr_train_002_label.nii.gz"]
    for (scan, labels), image_path, label_path in zip(scans, written[::2], written[1::2]):
        _assert_written_as(image_path, label_path, scan, labels)


def test_convert_notes_where_the_slices_break(tmp_path, capsys):
    scan, labels = _scan(4, 4)
    records = _released_slices(scan, labels)
    files = [tmp_path / f"slice{k}.tfrecords" for k in (0, 1, 2, 3)]
    _one_slice_files(files, records)
    code = main(["convert", "--out", str(tmp_path / "out"), "--name", "ct_9", "--progress", "none",
                 *map(str, [files[2], files[3], files[0], files[1]])])
    assert code == 0
    assert ("in ct_9, 1 slice(s) do not follow the one before as their records store (slice0.tfrecords): another "
            "scan begins there, or the files are out of order; --split cuts the volume there"
            ) in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("nothing", r"no released file was given"),
    ("folder", r"is a folder; give the released files themselves"),
    ("suffix", r"slices\.nii\.gz: is not a released file; convert reads \.npz and \.tfrecords files"),
    ("no name", r"the \.tfrecords files make one volume; give it a name \(--name\)"),
    ("name without records", r"--name is for the volume stacked from \.tfrecords files, and none was given"),
    ("split without records", r"--split is for the volume stacked from \.tfrecords files, and none was given"),
    ("flip without npz", r"--flip-test-volume flips SIFA's released \.npz test volumes, and none was given"),
    ("name with a folder", r"--name 'a/b' cannot name a volume: it must be a plain, visible file name"),
    ("name too long", r"--name 'aaaa.*' cannot name a volume: .* at most 227 bytes"),
    ("name too long in bytes", r"--name 'éééé.*' cannot name a volume: .* at most 227 bytes"),   # 114 characters
    ("hidden npz", r"\.hidden\.npz: its name '\.hidden' cannot name a volume"),
    ("same name", r"example_mr and EXAMPLE_MR would both be written as EXAMPLE_MR_image\.nii\.gz"),
    ("sizes", r"large\.tfrecords: record 0 is a 8 x 6 slice, the first was 4 x 6; one volume needs one size"),
    ("damaged", r"broken\.npz: is not a readable \.npz file"),
    ("write fails", r"the disk is full"),
])
def test_convert_refuses_in_one_sentence_and_writes_nothing(mmwhs_samples, tmp_path, monkeypatch, case, message):
    npz = mmwhs_samples / "example_mr.npz"
    small = tmp_path / "small.tfrecords"
    small.write_bytes(_record(_sample(np.zeros((4, 6, 3)), np.zeros((4, 6, 3)))))
    large = tmp_path / "large.tfrecords"
    large.write_bytes(_record(_sample(np.zeros((8, 6, 3)), np.zeros((8, 6, 3)))))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "EXAMPLE_MR.npz").write_bytes(npz.read_bytes())
    (tmp_path / ".hidden.npz").write_bytes(npz.read_bytes())
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    (tmp_path / "slices.nii.gz").write_bytes(b"")
    if case == "write fails":      # the second volume's label: the first volume's files are already staged
        import vaeuda.volumes
        calls = []

        def write_label(*args):
            calls.append(args)
            if len(calls) == 2:
                raise VaeudaError("the disk is full")
            return real_write_label(*args)
        real_write_label = vaeuda.volumes.write_label
        monkeypatch.setattr(vaeuda.volumes, "write_label", write_label)
    inputs, options = {
        "nothing": ([], {}),
        "folder": ([tmp_path / "copy"], {}),
        "suffix": ([tmp_path / "slices.nii.gz"], {}),
        "no name": ([small], {}),
        "name without records": ([npz], {"name": "x"}),
        "split without records": ([npz], {"split": True}),
        "flip without npz": ([small], {"name": "x", "flip_test_volume": True}),
        "name with a folder": ([small], {"name": "a/b"}),
        "name too long": ([small], {"name": "a" * 228}),
        "name too long in bytes": ([small], {"name": "é" * 114}),      # 228 bytes of UTF-8
        "hidden npz": ([tmp_path / ".hidden.npz"], {}),
        "same name": ([npz, tmp_path / "copy" / "EXAMPLE_MR.npz"], {}),
        "sizes": ([small, large], {"name": "x"}),
        "damaged": ([npz, tmp_path / "broken.npz"], {}),
        "write fails": ([npz, small], {"name": "x"}),
    }[case]
    out = tmp_path / "out"
    with pytest.raises(VaeudaError, match=message):
        convert_released(inputs, out, MMWHS, **options)
    assert not out.exists()
    if case == "write fails":
        assert len(calls) == 2


def test_converted_released_files_train_segment_and_score_through_the_command_line(mmwhs_samples, tiny_source_model,
                                                                                    tmp_path, capsys):
    data, pred = tmp_path / "released", tmp_path / "pred"
    assert main(["convert", "--out", str(data), "--progress", "none", str(mmwhs_samples / "example_mr.npz")]) == 0
    assert capsys.readouterr().err == (f"Wrote 1 volume(s) to {data} as X_image / X_label .nii.gz pairs: example_mr.\n"
                                       f"note: the .npz volumes are written as stored; SIFA's released test volumes "
                                       f"are stored flipped on both in-plane axes, which its evaluate.py undoes: "
                                       f"convert those with --flip-test-volume\n")
    assert main(["convert", "--out", str(tmp_path / "flipped"), "--flip-test-volume", "--progress", "none",
                 str(mmwhs_samples / "example_mr.npz")]) == 0
    assert "note" not in capsys.readouterr().err
    assert main(["convert", "--out", str(data), "--name", "two_mr", "--progress", "none",
                 str(mmwhs_samples / "training_mr.tfrecords"), str(mmwhs_samples / "validation_mr.tfrecords")]) == 2
    assert capsys.readouterr().err.startswith("vaeuda: error: none of the 2 .tfrecords records follows the one before")
    assert sorted(p.name for p in data.iterdir()) == ["example_mr_image.nii.gz", "example_mr_label.nii.gz"]
    assert main(["convert", "--out", str(data), "--progress", "none", str(mmwhs_samples / "example_mr.npz")]) == 0
    assert ("Replaced 2 file(s) that were there: example_mr_image.nii.gz, example_mr_label.nii.gz.\n"
            in capsys.readouterr().err)
    assert main(["train-source", "--preset", "tiny", "--iterations", "1", "--out", str(tmp_path / "m.safetensors"),
                 "--progress", "none", "--device", "cpu", str(data)]) == 0
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(pred), "--progress", "none",
                 "--device", "cpu", str(data / "example_mr_image.nii.gz")]) == 0
    assert main(["evaluate", "--pred", str(pred), "--ref", str(data), "--progress", "none"]) == 0
    scored = json.loads((pred / "evaluation.json").read_text())
    assert [Path(v["ref"]).name for v in scored["volumes"]] == ["example_mr_label.nii.gz"]


def test_convert_notes_a_volume_of_one_slice(mmwhs_samples, tmp_path, capsys):
    """One .tfrecords record is one slice: written as asked, with a note that the other commands read
    volumes of several slices; two records of a scan converted together get no note."""
    out = tmp_path / "one"
    assert main(["convert", "--out", str(out), "--name", "ct1", "--progress", "none",
                 str(mmwhs_samples / "training_ct.tfrecords")]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "note: ct1 hold(s) a single slice; segment and the training commands read volumes of several slices: "
        "give all of a scan's .tfrecords files to one convert, in slice order (the release's own training "
        ".tfrecords are shuffled slices, which make no scan)")
    scan, labels = _scan(2, 4)
    files = [tmp_path / f"s{k}.tfrecords" for k in range(2)]
    _one_slice_files(files, _released_slices(scan, labels))
    assert main(["convert", "--out", str(out), "--name", "ct2", "--progress", "none", *map(str, files)]) == 0
    assert "single slice" not in capsys.readouterr().err
    thin = tmp_path / "thin.npz"                 # a released volume one voxel thick: no .tfrecords to give
    np.savez(thin, np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), np.uint8))
    assert main(["convert", "--out", str(tmp_path / "thin"), "--progress", "none", str(thin)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "note: thin hold(s) a single slice; segment and the training commands read volumes of several slices")


def test_convert_refuses_a_file_given_twice(mmwhs_samples, tmp_path):
    npz = mmwhs_samples / "example_mr.npz"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(npz))}: given twice; give each input once\\.$"):
        convert_released([npz, npz], tmp_path / "out", MMWHS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", [False, True])
def test_a_folder_of_the_users_where_convert_writes_a_file_is_refused_not_deleted(tmp_path, split):
    """It was moved aside and deleted with what it held; refused before the work where the names are known
    (split volumes are named as the records are read: refused before anything moves)."""
    scan, labels = _scan(3, 3)
    files = [tmp_path / f"s{k}.tfrecords" for k in range(3)]
    _one_slice_files(files, _released_slices(scan, labels))
    out = tmp_path / "out"
    name = "v_001" if split else "v"
    (out / f"{name}_label.nii.gz").mkdir(parents=True)
    (out / f"{name}_label.nii.gz" / "precious.txt").write_text("mine")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(out / (name + '_label.nii.gz')))}: is a folder where "
                                          f"this run writes a file; move it away or choose another output folder\\.$"):
        convert_released(files, out, MMWHS, name="v", split=split)
    assert sorted(p.name for p in out.iterdir()) == [f"{name}_label.nii.gz"]
    assert (out / f"{name}_label.nii.gz" / "precious.txt").read_text() == "mine"


def test_released_readers_name_a_pipe_a_folder_and_arrays_too_large_for_memory(tmp_path):
    """A pipe read "file not found" (it is there); a .npz whose .npy headers declare petabytes gave numpy's
    MemoryError traceback."""
    import os
    import struct
    import zipfile
    for suffix, read in ((".npz", read_npz), (".tfrecords", read_tfrecords)):
        pipe = tmp_path / f"pipe{suffix}"
        os.mkfifo(pipe)
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(pipe))}: is a pipe, socket or device"):
            read(pipe)
        folder = tmp_path / f"folder{suffix}"
        folder.mkdir()
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: is a folder, not a released file\\.$"):
            read(folder)
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / ('none' + suffix)))}: released file not found\\.$"):
            read(tmp_path / f"none{suffix}")

    def npy(shape):       # a .npy header declaring ``shape``, and a few bytes
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (shape,)
        header = header + " " * (118 - len(header)) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w") as archive:
        for member in ("arr_0.npy", "arr_1.npy"):
            archive.writestr(member, npy((100000, 100000, 100000)))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(huge))}: its arrays, as their headers declare them, do "
                                          f"not fit in this computer's memory\\.$"):
        read_npz(huge)
