"""Readers for the preprocessed MM-WHS slices that the PnP-AdaNet and SIFA authors released.

No TensorFlow: the ``.tfrecords`` framing (with its CRC-32C checks) and the ``tf.train.Example``
protobuf are parsed by hand, the ``.npz`` files with numpy (never unpickling).

Released samples are coronal slices, 256 x 256, channel last on disk. Here they come back channels
first: images ``(3, 256, 256)`` / ``(N, 256, 256)`` float32 as stored (already z-scored), labels
``(256, 256)`` / ``(N, 256, 256)`` uint8 class indices 0..4. The released files carry a fifth
structure, value 5, that the released training loaders ignore (``tf.one_hot(label, 5)`` gives it
no class) and their evaluation counts as background: it becomes background here.
:func:`released_to_image` stacks slices into a 3D volume so :class:`vaeuda.volumes.SliceGrid`
cuts it back into the same slices, turned into the engine's layout (rows superior -> inferior).
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import VaeudaError
from .fileio import MAX_OUTPUT_NAME_BYTES, first_bytes, require_file
from .labels import SIFA_IGNORED_VALUE, Convention

PathLike = Union[str, Path]

# --- CRC-32C (Castagnoli), as TFRecord uses it ---------------------------------------------

def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected polynomial 0x1EDC6F41
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (pure Python, table driven; about 1 s for 10 MB)."""
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord stores: rotate right by 15 bits, add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord_payloads(path: Path, blob: bytes) -> Iterator[bytes]:
    """Each record's bytes; a record on disk is uint64 length, uint32 masked CRC of the length,
    the bytes, uint32 masked CRC of the bytes (all little endian)."""
    pos, index = 0, 0
    while pos < len(blob):
        if len(blob) - pos < 12:
            raise VaeudaError(f"{path}: record {index} is truncated (file is incomplete).")
        header = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked_crc32c(header) != header_crc:
            raise VaeudaError(f"{path}: record {index} fails its CRC check (file is corrupt).")
        start = pos + 12
        end = start + length
        if end + 4 > len(blob):
            raise VaeudaError(f"{path}: record {index} is truncated (file is incomplete).")
        payload = blob[start:end]
        (payload_crc,) = struct.unpack("<I", blob[end:end + 4])
        if masked_crc32c(payload) != payload_crc:
            raise VaeudaError(f"{path}: record {index} fails its CRC check (file is corrupt).")
        yield payload
        pos, index = end + 4, index + 1


# --- protobuf wire format, the little of it tf.train.Example needs -------------------------

class _WireError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[Tuple[int, int, Union[int, bytes]]]:
    """(field number, wire type, value) of one message: int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _WireError("field runs past the end")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _WireError("field runs past the end")
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise _WireError(f"unsupported wire type {wire}")
        yield number, wire, value


def _int64s(buf: bytes) -> List[int]:
    """Int64List{repeated int64 value = 1}, packed or not."""
    out: List[int] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 0:
            raws = [value]
        elif wire == 2:
            raws, pos = [], 0
            while pos < len(value):
                raw, pos = _varint(value, pos)
                raws.append(raw)
        else:
            raise _WireError("bad int64 list")
        out.extend(r - (1 << 64) if r >= 1 << 63 else r for r in raws)
    return out


def parse_example(payload: bytes) -> Dict[str, Union[bytes, List[int], List[float]]]:
    """A serialised ``tf.train.Example`` -> {feature name: bytes (first bytes_list value) or list}.

    Example{Features features = 1}; Features{map<string, Feature> feature = 1};
    Feature{BytesList bytes_list = 1 | FloatList float_list = 2 | Int64List int64_list = 3}.
    Raises ValueError on malformed input.
    """
    features: Dict[str, Union[bytes, List[int], List[float]]] = {}
    for number, _, features_msg in _fields(payload):
        if number != 1 or not isinstance(features_msg, bytes):
            continue
        for entry_number, _, entry in _fields(features_msg):
            if entry_number != 1 or not isinstance(entry, bytes):
                continue
            name, feature = "", b""
            for n, _, v in _fields(entry):
                if n == 1 and isinstance(v, bytes):
                    name = v.decode("utf-8")
                elif n == 2 and isinstance(v, bytes):
                    feature = v
            for kind, _, lst in _fields(feature):
                if not isinstance(lst, bytes):
                    continue
                if kind == 1:
                    values = [v for n, _, v in _fields(lst) if n == 1]
                    features[name] = values[0] if values else b""
                elif kind == 2:
                    floats: List[float] = []
                    for n, w, v in _fields(lst):
                        if n == 1 and isinstance(v, bytes):  # packed (wire 2) or single fixed32 (wire 5)
                            floats.extend(np.frombuffer(v, "<f4").tolist())
                    features[name] = floats
                elif kind == 3:
                    features[name] = _int64s(lst)
    return features


# --- the released files --------------------------------------------------------------------

def _check_labels(path: Path, labels: np.ndarray, where: str) -> np.ndarray:
    """Float or integer label values 0..5 -> uint8 class indices 0..4 (5 becomes background)."""
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        raise VaeudaError(f"{path}: {where} label values are not whole numbers.")
    found = np.unique(labels)
    bad = [int(v) for v in found if not 0 <= v <= SIFA_IGNORED_VALUE]
    if bad:
        raise VaeudaError(f"{path}: {where} label values {', '.join(map(str, bad[:8]))} are outside 0..{SIFA_IGNORED_VALUE}.")
    classes = labels.astype(np.uint8)
    classes[classes == SIFA_IGNORED_VALUE] = 0
    return classes


def _check_intensities(path: Path, image: np.ndarray, where: str) -> np.ndarray:
    """``image`` as contiguous float32 (one copy at most), refused if a value is NaN or infinite
    there (a float64 beyond float32's range included)."""
    with np.errstate(over="ignore"):    # beyond float32's range becomes inf, refused below
        image = np.ascontiguousarray(image, dtype=np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        raise VaeudaError(f"{path}: {where} has {finite.size - np.count_nonzero(finite)} NaN or infinite intensities.")
    return image


MAX_SLICE_SIZE = 4096   # pixels per side: far above the released 256, far below a size that overflows


def _volume_feature(path: Path, index: int, features: dict, name: str, size_prefix: str,
                    channels: Tuple[int, ...]) -> np.ndarray:
    """Raw little-endian float32 bytes of feature ``name`` -> array of shape (dim0, dim1, dim2),
    dim2 (the slice channels, last on disk) one of ``channels``."""
    raw = features.get(name)
    sizes = [features.get(f"{size_prefix}{d}") for d in range(3)]
    if not isinstance(raw, bytes) or not all(isinstance(s, list) and len(s) == 1 and isinstance(s[0], int)
                                             for s in sizes):
        raise VaeudaError(f"{path}: record {index} lacks '{name}' or its whole-number sizes {size_prefix}0..2.")
    shape = tuple(s[0] for s in sizes)
    if not all(1 <= n <= MAX_SLICE_SIZE for n in shape[:2]) or shape[2] not in channels:
        raise VaeudaError(f"{path}: record {index} gives '{name}' the sizes {shape}; a released slice is "
                          f"H x W x {' or '.join(map(str, channels))}, channels last, H and W at most {MAX_SLICE_SIZE}.")
    if len(raw) != 4 * shape[0] * shape[1] * shape[2]:
        raise VaeudaError(f"{path}: record {index} has {len(raw)} bytes of '{name}', "
                          f"not the {4 * shape[0] * shape[1] * shape[2]} that float32 {shape} needs.")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def read_tfrecords(path: PathLike) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Every sample of a released ``.tfrecords`` file, after checking both CRCs of each record.

    Returns a list of ``(image, label)``: image ``(3, H, W)`` float32 (the 3 adjacent coronal
    slices, channels first; 256 x 256 in the released files), label ``(H, W)`` uint8 class
    indices 0..4 of the middle slice (the label's middle channel; value 5 -> 0).
    """
    path = require_file(path, "released file")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise VaeudaError(f"{path}: cannot be read ({exc.strerror}).") from None
    if not blob:
        raise VaeudaError(f"{path}: file is empty.")
    samples = []
    for index, payload in enumerate(_tfrecord_payloads(path, blob)):
        try:
            features = parse_example(payload)
        except (_WireError, UnicodeDecodeError):
            raise VaeudaError(f"{path}: record {index} is not a valid tf.train.Example.") from None
        data = _volume_feature(path, index, features, "data_vol", "dsize_dim", (3,))
        label = _volume_feature(path, index, features, "label_vol", "lsize_dim", (1, 3))
        if data.shape[:2] != label.shape[:2]:
            raise VaeudaError(f"{path}: record {index} has image size {data.shape} but label size {label.shape}.")
        middle = label[:, :, label.shape[2] // 2]
        samples.append((_check_intensities(path, data.transpose(2, 0, 1), f"record {index}"),
                        _check_labels(path, middle, f"record {index}")))
    return samples


def read_npz(path: PathLike, flip_test_volume: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """A released ``.npz``: ``arr_0`` image and ``arr_1`` label, each ``(H, W, N)`` (N slices).

    Returns image ``(N, H, W)`` float32 and label ``(N, H, W)`` uint8 class indices 0..4 (5 -> 0).
    SIFA's released test volumes are stored flipped on both in-plane axes against its training
    slices (its ``evaluate.py`` flips them back "to make the orientation of test data match with
    the training data"); ``flip_test_volume`` does the same, so that the slices come back in the
    training slices' orientation, the one :func:`released_to_image` expects. Without it they come
    back as stored (right for ``example_mr.npz``, the source of a training slice).
    """
    path = require_file(path, "released file")     # (numpy's reason for a file it may not open would be lost below)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):    # a lone .npy array under an .npz name
            raise VaeudaError(f"{path}: holds a single array, not the arr_0 (image) and arr_1 (label) of a released .npz.")
        with loaded as npz:
            missing = [k for k in ("arr_0", "arr_1") if k not in npz.files]
            if missing:
                raise VaeudaError(f"{path}: lacks the array(s) {', '.join(missing)} (found {', '.join(npz.files) or 'none'}).")
            image, label = npz["arr_0"], npz["arr_1"]
    except VaeudaError:
        raise
    except MemoryError:         # the .npy headers declare arrays larger than memory
        raise VaeudaError(f"{path}: its arrays, as their headers declare them, do not fit in this computer's "
                          f"memory.") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # numpy's header errors span lines and quote raw bytes: the first line, escaped
        reason = ascii(str(exc).splitlines()[0])[1:-1] if str(exc) else type(exc).__name__
        head = first_bytes(path, 6)
        if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
            # numpy takes any other file for a pickle, and advises loading it unsafely
            reason = "neither a ZIP archive of arrays nor a .npy array"
        raise VaeudaError(f"{path}: is not a readable .npz file ({reason}).") from None
    if not isinstance(image, np.ndarray) or not isinstance(label, np.ndarray):   # a zip member that is not .npy
        raise VaeudaError(f"{path}: arr_0 and arr_1 are not numpy arrays (.npy members of the .npz).")
    if image.ndim != 3 or image.shape != label.shape or 0 in image.shape:
        raise VaeudaError(f"{path}: expected arr_0 and arr_1 of the same shape H x W x N (N slices, at least one), "
                          f"found {image.shape} and {label.shape}.")
    if image.dtype.kind not in "fiu" or label.dtype.kind not in "fiu":
        raise VaeudaError(f"{path}: arr_0 and arr_1 must be numeric, found {image.dtype} and {label.dtype}.")
    if flip_test_volume:
        image, label = image[::-1, ::-1], label[::-1, ::-1]
    return (_check_intensities(path, image.transpose(2, 0, 1), "arr_0"),
            _check_labels(path, np.ascontiguousarray(label.transpose(2, 0, 1)), "arr_1"))


def released_to_image(images: np.ndarray, labels: np.ndarray) -> Tuple[sitk.Image, sitk.Image]:
    """Stack released coronal slices into a 3D image and class-index label volume, in the
    orientation :class:`vaeuda.volumes.SliceGrid` cuts.

    ``images`` ``(N, H, W)`` float, ``labels`` ``(N, H, W)`` class indices, as the readers return
    them (a SIFA test volume read with ``read_npz(..., flip_test_volume=True)``). A released slice
    is a coronal plane stored as (x, z), the axis order of a nibabel array cut at fixed y: its rows
    run from the patient's left to right and its columns from inferior to superior. The labelled
    samples in ``../shared/data/mmwhs-samples`` show it: the ascending aorta lies at larger
    columns than the LV cavity (superior to it) and at larger rows (to its right),
    the LV's apex towards row 0 and column 0 (left, inferior), and the lateral ribs of
    ``validation_ct`` run along row 0. The slices are turned so that rows run superior ->
    inferior and columns along LPS x (right -> left), the engine's layout: slice ``j`` becomes
    coronal index ``y = j`` of a volume in LPS (identity direction), unit spacing, origin 0, and
    ``SliceGrid.from_image(image, H)`` with ``H == W`` cuts out slice ``j`` turned,
    ``images[j].T[::-1, ::-1]``. Returns (float32 image of H x N x W voxels along x, y, z; uint8 label).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.shape != labels.shape:
        raise ValueError(f"images and labels must both be (N, H, W), got {images.shape} and {labels.shape}")

    def volume(slices: np.ndarray, dtype) -> sitk.Image:
        # (N, x from the left, z upwards) -> numpy (z, y, x) of an LPS volume: z upwards, x to the left
        return sitk.GetImageFromArray(np.ascontiguousarray(slices.transpose(2, 0, 1)[:, :, ::-1], dtype=dtype))

    return volume(images, np.float32), volume(labels, np.uint8)


# --- released files as the engine's volumes ---------------------------------------------------

RELEASED_SUFFIXES = (".npz", ".tfrecords")


def follows(previous: np.ndarray, current: np.ndarray) -> bool:
    """Whether released slice ``current`` ``(3, H, W)`` is the stored neighbour of ``previous``:
    ``previous``'s third channel is ``current``'s middle one and ``current``'s first channel
    ``previous``'s middle one (equal to the bit for one scan's adjacent slices)."""
    return (previous.shape == current.shape and np.array_equal(previous[2], current[1])
            and np.array_equal(current[0], previous[1]))


# A file name's bytes on common file systems, less the longest suffix written ("_label.nii.gz").
_MAX_NAME_BYTES = MAX_OUTPUT_NAME_BYTES - len("_label.nii.gz")


def _check_volume_name(name: str, what: str) -> None:
    if (not name.strip() or Path(name).name != name or name.startswith(".") or not name.isprintable()
            or len(name.encode("utf-8")) > _MAX_NAME_BYTES):
        raise VaeudaError(f"{what} {name!r} cannot name a volume: it must be a plain, visible file name (no folders, "
                          f"not starting with '.', at most {_MAX_NAME_BYTES} bytes).")


def convert_released(inputs: Sequence[PathLike], out_dir: PathLike, convention: Convention,
                     name: Optional[str] = None, flip_test_volume: bool = False,
                     split: bool = False) -> Tuple[List[Path], List[str]]:
    """Write released files as the image / label volume pairs that ``train-source``, ``finetune``,
    ``segment`` and ``evaluate`` read: ``OUT/<volume>_image.nii.gz`` and ``OUT/<volume>_label.nii.gz``.

    - Each ``.npz`` (a released volume, ``(H, W, N)``) is one volume named after its file
      (``gt_ct_1003.npz`` -> ``gt_ct_1003``); ``flip_test_volume`` as :func:`read_npz`.
    - The ``.tfrecords`` files (one 3-slice sample per record, as SIFA's ``utils/gettfrecords.py``
      writes them) are stacked record by record, in the order given, into a volume called
      ``name``: the middle channel of each. The engine takes a slice's neighbours from the volume,
      so they must be one scan's slices in slice order. A *break* is a slice that does not
      :func:`follow <follows>` the one before it: another scan begins there, or the order is wrong.
      With ``split`` the stack is cut at every break into volumes ``name_001``, ``name_002``, ...
      Records none of which follows the one before are refused: they make no scan. The release's
      own training and validation ``.tfrecords`` are such records: augmented slices in shuffled
      order (its authors, cchen-cc/SIFA issues 49 and 59), which no tool can stack back into scans.

    Geometry as :func:`released_to_image` (unit spacing: the released files keep none); labels
    in ``convention``'s values (value 5 of the release is background, as its readers treat it).
    All files appear, or none: a refused input leaves ``out_dir`` as it was. Returns the paths
    written and, without ``split``, where the breaks are (file names, with the record for a file
    of several; with ``split`` none are reported: each begins a volume).
    """
    from .fileio import atomic_dir, check_output_dir, refuse_folder_in_the_way, refuse_repeated, stem
    from .volumes import require_nifti_size, write_image, write_label

    paths = [Path(p) for p in inputs]
    if not paths:
        raise VaeudaError("no released file was given.")
    for path in paths:
        if path.is_dir():
            raise VaeudaError(f"{path}: is a folder; give the released files themselves (e.g. {path}/*.npz).")
        if path.suffix.lower() not in RELEASED_SUFFIXES:
            raise VaeudaError(f"{path}: is not a released file; convert reads {' and '.join(RELEASED_SUFFIXES)} files.")
    records = [p for p in paths if p.suffix.lower() == ".tfrecords"]
    volumes = [p for p in paths if p.suffix.lower() == ".npz"]
    if records and not name:
        raise VaeudaError("the .tfrecords files make one volume; give it a name (--name).")
    if not records and (name or split):
        raise VaeudaError(f"{'--name' if name else '--split'} is for the volume stacked from .tfrecords files, "
                          f"and none was given.")
    if flip_test_volume and not volumes:
        raise VaeudaError("--flip-test-volume flips SIFA's released .npz test volumes, and none was given.")
    if records:
        _check_volume_name(name, "--name")
    for path in volumes:
        _check_volume_name(stem(path), f"{path}: its name")
    refuse_repeated(paths)             # as segment says it: one input twice is not two volumes of one name
    check_output_dir(out_dir)
    known = [stem(p) for p in volumes] + ([name] if records and not split else [])   # split names come later
    for volume_name in known:
        for role in ("image", "label"):
            refuse_folder_in_the_way(Path(out_dir) / f"{volume_name}_{role}.nii.gz")

    written: List[Path] = []
    taken: Dict[str, str] = {}      # casefolded (case-insensitive file systems: A and a are one file)
    breaks: List[str] = []

    def write(staging: Path, volume_name: str, images: np.ndarray, labels: np.ndarray, source=None) -> None:
        if volume_name.casefold() in taken:
            raise VaeudaError(f"{taken[volume_name.casefold()]} and {volume_name} would both be written as "
                              f"{volume_name}_image.nii.gz; rename one of them.")
        taken[volume_name.casefold()] = volume_name
        image, label = released_to_image(images, labels)
        require_nifti_size(image, source or f"the volume {volume_name}")   # (ITK's error would name the staging)
        write_image(image, staging / f"{volume_name}_image.nii.gz")
        write_label(label, staging / f"{volume_name}_label.nii.gz", convention)
        written.extend(Path(out_dir) / f"{volume_name}_{role}.nii.gz" for role in ("image", "label"))

    with atomic_dir(out_dir) as staging:       # files are read as they are written: one scan in memory
        for path in volumes:
            write(staging, stem(path), *read_npz(path, flip_test_volume), source=path)
        run: List[Tuple[np.ndarray, np.ndarray]] = []      # (middle slice, label) of the volume being stacked
        previous, first_shape, number, count, followed = None, None, 0, 0, 0
        for path in records:
            samples = read_tfrecords(path)
            for index, (image, label) in enumerate(samples):
                first_shape = first_shape or image.shape
                if image.shape != first_shape:
                    raise VaeudaError(f"{path}: record {index} is a {image.shape[1]} x {image.shape[2]} slice, the "
                                      f"first was {first_shape[1]} x {first_shape[2]}; one volume needs one size.")
                count += 1
                if previous is not None and follows(previous, image):
                    followed += 1
                elif previous is not None:
                    if split:
                        number += 1
                        write(staging, f"{name}_{number:03d}", *map(np.stack, zip(*run)))
                        run = []
                    else:
                        breaks.append(path.name if len(samples) == 1 else f"{path.name} record {index}")
                run.append((image[1], label))
                previous = image
        if count > 1 and not followed:
            raise VaeudaError(
                f"none of the {count} .tfrecords records follows the one before it as its record stores, so stacked "
                f"they make no scan: they are from different scans, or out of order (the PnP-AdaNet/SIFA release's "
                f"training and validation .tfrecords are augmented slices in shuffled order, which cannot be stacked "
                f"back into scans; convert its .npz volumes, or use the MM-WHS volumes themselves).")
        if run:
            write(staging, f"{name}_{number + 1:03d}" if split else name, *map(np.stack, zip(*run)))
    return written, breaks
