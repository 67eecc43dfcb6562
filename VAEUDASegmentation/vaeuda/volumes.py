"""Volumes in and out: SimpleITK I/O, canonical orientation, normalisation, and coronal slicing.

The model sees a volume as a stack of coronal slices (see ``Docs/engine-contract.md``, "Slices"):
the volume is brought to LPS, each coronal (posterior-index) plane is resampled in-plane to
``size x size`` with rows superior -> inferior and columns along the canonical x axis, and the
planes either side of it become channels 0 and 2. :class:`SliceGrid` does this cut and its exact
inverse: per-class scores on the slices go back onto the input's own grid, so a segmentation has
exactly the input's origin, spacing, direction and size.

Array conventions: ``sitk.GetArrayFromImage`` order, i.e. a 3D image of size ``(x, y, z)`` is a
numpy array ``(z, y, x)``.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import math
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import VaeudaError
from .fileio import (SPECIAL_FILE, VOLUME_SUFFIXES, atomic_path, first_bytes, full_suffix, require_readable,
                     require_utf8_name)
from .labels import BUILTIN_CONVENTIONS, Convention

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

# Single-file formats only: a two-file format (.mhd/.nhdr) written under a temporary name
# would point at a data file that is not renamed with it.
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

# PnP-AdaNet recipe: clip the top 2% of the histogram, then z-score per volume.
DEFAULT_NORMALISATION = {"method": "zscore", "clip_upper_percentile": 98.0, "clip_lower_percentile": None}

CANONICAL_ORIENTATION = "LPS"


# --- geometry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Where a 3D image's voxels are: size (x, y, z), spacing, origin, direction (row-major 3x3)."""
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def stamp(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (same size) this geometry, in place; returns it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def resampler(self, interpolator: int, extrapolate: bool = True) -> sitk.ResampleImageFilter:
        """A resample filter onto this grid (no reference image needs to be allocated).

        ``extrapolate``: samples outside the input take the nearest input value (so that those a
        rounding error outside, in the outermost half voxel, are not 0); else they are 0."""
        f = sitk.ResampleImageFilter()
        f.SetSize([int(s) for s in self.size])
        f.SetOutputSpacing(self.spacing)
        f.SetOutputOrigin(self.origin)
        f.SetOutputDirection(self.direction)
        f.SetInterpolator(interpolator)
        f.SetUseNearestNeighborExtrapolator(extrapolate)
        return f


# NIfTI stores origin, spacing and direction as 32-bit floats, so a grid written as NIfTI (every
# segmentation the engine writes) comes back with each coordinate rounded to float32: up to half
# a unit in the last place, 6e-8 of it (0.1 um at 2000 mm from the scanner's origin).
FLOAT32_EPS = float(np.finfo(np.float32).eps)

# Relative spacing and origin, absolute direction cosines: how far two grids may differ and still
# be one grid, and how far a direction may be from orthonormal.
GEOMETRY_TOLERANCE = 1e-4


def geometry_mismatch(image: Union[sitk.Image, Geometry], reference: Union[sitk.Image, Geometry],
                      rtol: float = GEOMETRY_TOLERANCE, names: Optional[Tuple[str, str]] = None) -> Optional[str]:
    """None when both lie on the same grid, else a short phrase such as ``"size (4, 5, 6) vs (4, 5, 7)"``,
    or with ``names`` (what ``image`` and ``reference`` are) ``"size: label (4, 5, 6), image (4, 5, 7)"``.

    Spacing is compared relatively, origin relative to the reference's largest spacing,
    direction absolutely, all with tolerance ``rtol``; the origin also allows the rounding of its
    coordinates to float32 (one unit in the last place), so that a grid read back from NIfTI
    matches the one it was written from, however far from the scanner's origin it lies.
    """
    a = image if isinstance(image, Geometry) else Geometry.of(image)
    b = reference if isinstance(reference, Geometry) else Geometry.of(reference)
    if a.size != b.size:
        return _phrase("size", str(a.size), str(b.size), names)
    if not np.allclose(a.spacing, b.spacing, rtol=rtol, atol=0):
        return _phrase("spacing", *_fmt_pair(a.spacing, b.spacing), names)
    origin_tolerance = rtol * max(b.spacing) + FLOAT32_EPS * max(abs(v) for v in b.origin)
    if not np.allclose(a.origin, b.origin, rtol=0, atol=origin_tolerance):
        return _phrase("origin", *_fmt_pair(a.origin, b.origin), names)
    if not np.allclose(a.direction, b.direction, rtol=0, atol=rtol):
        return _phrase("direction", *_fmt_pair(a.direction, b.direction), names)
    return None


def _phrase(what: str, left: str, right: str, names: Optional[Tuple[str, str]]) -> str:
    return f"{what} {left} vs {right}" if names is None else f"{what}: {names[0]} {left}, {names[1]} {right}"


def _fmt_pair(a: Iterable[float], b: Iterable[float]) -> Tuple[str, str]:
    """``("(1, 2)", "(1, 2.5)")``, with as many digits as it takes for two different tuples to read differently."""
    a, b = tuple(a), tuple(b)
    for digits in range(6, 18):
        left, right = (_fmt(v, digits) for v in (a, b))
        if left != right:
            break
    return left, right


def _fmt(values: Iterable[float], digits: int = 6) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


# --- reading and writing ---------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"


# NIfTI datatype codes of floating-point voxels (nifti1.h) -> numpy type, without byte order
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


class _NiftiLayout(NamedTuple):
    offset: int                      # where the voxel data start
    nbytes: int                      # how many bytes of voxel data the header promises
    float_dtype: Optional[np.dtype]  # the voxels' type with the file's byte order; None unless floating-point
    pixdim: Tuple[float, float, float]   # the voxel spacing the header records (pixdim[1..3])
    damaged: Optional[str] = None    # what in the header contradicts itself (ITK reads past it, silently)


# Bits per voxel of each NIfTI datatype (nifti1.h); a header whose bitpix differs is read wrongly by ITK.
_NIFTI_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _nifti_damage(order: str, header: bytes, version: int, offset: float, datatype: int, bitpix: int) -> Optional[str]:
    """What a NIfTI header states that ITK would read past without a word: voxel data that start
    inside the header or at no number, a bitpix its datatype does not have, a position (qoffset,
    or the sform rows when used) that is not a number (read as 0)."""
    if not math.isfinite(offset) or offset < (352 if version == 1 else 544):
        return f"vox_offset {offset} is inside the header or not a number"
    if datatype in _NIFTI_BITPIX and bitpix != _NIFTI_BITPIX[datatype]:
        return f"bitpix {bitpix} for datatype {datatype}, which has {_NIFTI_BITPIX[datatype]}"
    if version == 1:
        qform, sform = struct.unpack(order + "2h", header[252:256])
        qoffset, srows = struct.unpack(order + "3f", header[268:280]), struct.unpack(order + "12f", header[280:328])
    else:
        qform, sform = struct.unpack(order + "2i", header[344:352])
        qoffset, srows = struct.unpack(order + "3d", header[376:400]), struct.unpack(order + "12d", header[400:496])
    used = (qoffset if qform > 0 else ()) + (srows if sform > 0 else ())
    if not all(math.isfinite(v) for v in used):
        return "its position (qoffset or sform) is not a number"
    return None


def _nifti_layout(header: bytes) -> Optional[_NiftiLayout]:
    """The voxel data's place, size and (floating-point) type from a NIfTI-1 or NIfTI-2 header
    (either byte order), as the file stores them; None if not NIfTI. Taken from the header's own
    ``dim``, ``bitpix`` and ``datatype``, not from the image ITK returns: with ``scl_slope`` /
    ``scl_inter`` set (dcm2niix's CT: int16 on disk, ``scl_inter`` -1024) ITK hands back float32 voxels."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            version, raw_offset = 1, struct.unpack(order + "f", header[108:112])[0]
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            pixdim = struct.unpack(order + "8f", header[76:108])
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            version, raw_offset = 2, float(struct.unpack(order + "q", header[168:176])[0])
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            pixdim = struct.unpack(order + "8d", header[104:168])
        else:
            continue
        damaged = _nifti_damage(order, header, version, raw_offset, datatype, bitpix)
        offset = int(raw_offset) if math.isfinite(raw_offset) else 0
        n_dims = min(max(int(dims[0]), 0), 7)
        voxels = int(np.prod([max(int(d), 1) for d in dims[1:1 + n_dims]], dtype=np.int64))
        kind = _NIFTI_FLOATS.get(datatype)
        return _NiftiLayout(offset, voxels * max(int(bitpix), 0) // 8, np.dtype(order + kind) if kind else None,
                            tuple(float(v) for v in pixdim[1:4]), damaged)
    if len(header) >= 348 and header[344:348] in (b"n+1\0", b"ni1\0") or header[4:8] in (b"n+2\0", b"ni2\0"):
        # the magic of a NIfTI header whose size field is neither 348 nor 540
        return _NiftiLayout(0, 0, None, (1.0, 1.0, 1.0), "its header size field is not NIfTI's")
    return None


class _NiftiFile(NamedTuple):
    compressed: bool                 # its bytes are gzip's (a ``.nii.gz`` may not be: ITK reads it all the same)
    layout: Optional[_NiftiLayout]   # None: not a NIfTI header (ITK's own check then rules)


def _nifti_unset_spacing(layout: Optional[_NiftiLayout]) -> List[str]:
    """The axes ('x', 'y', 'z') whose spacing a NIfTI header leaves 0 or not a number: ITK reads
    each as 1 mm without a word, whatever the sform says; [] without a header."""
    if layout is None:
        return []
    return [axis for axis, value in zip("xyz", layout.pixdim) if not (math.isfinite(value) and value != 0)]


def _nifti_non_finite(path: Path, nifti: _NiftiFile) -> int:
    """How many voxels of a floating-point NIfTI file are NaN or infinite, counted on the file's bytes.

    ITK's NIfTI reader hands such voxels back as 0 and says nothing, so the image it returns cannot
    tell. 0 for integer voxels, or a header this cannot read (ITK's check then rules).
    """
    layout = nifti.layout
    if layout is None or layout.float_dtype is None:
        return 0
    dtype = layout.float_dtype
    with (gzip.open if nifti.compressed else open)(path, "rb") as f:
        f.seek(layout.offset)
        remaining, bad = layout.nbytes, 0
        chunk = (1 << 24) // dtype.itemsize * dtype.itemsize
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                break
            values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            remaining -= len(data)
    return bad


def _voxels(count: int) -> str:
    return "1 voxel is" if count == 1 else f"{count} voxels are"


def _refuse_non_finite(path: Path, count: int) -> None:
    """Refuse an image with ``count`` NaN or infinite voxels (none: nothing to refuse)."""
    if count:
        raise VaeudaError(f"{path}: {_voxels(count)} NaN or infinite; set such voxels to a number first.")


def _truncated(path: Path) -> VaeudaError:
    return VaeudaError(f"{path}: the file is truncated (incomplete copy or download).")


def _nifti_cut_in_header(path: Path) -> bool:
    """A file named as NIfTI that ITK could not read because it ends inside its header: a gzip stream
    that ends early, or uncompressed bytes that open with a NIfTI header size (348, or NIfTI-2's 540)
    but hold less than it. Corrupt bytes or another kind of file are not."""
    if full_suffix(path).lower() not in (".nii", ".nii.gz"):
        return False
    if first_bytes(path, 2) == GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(540)
        except EOFError:
            return True
        except (OSError, zlib.error):
            return False
    else:
        head = first_bytes(path, 540)
    sizes = {struct.unpack(order + "i", head[:4])[0] for order in "<>"} if len(head) >= 4 else set()
    return bool(sizes & {348, 540}) and len(head) < min(sizes & {348, 540})


def _check_nifti_header(path: Path) -> _NiftiFile:
    """A NIfTI file's header, refused when it contradicts itself (:func:`_nifti_damage`)."""
    compressed = first_bytes(path, 2) == GZIP_MAGIC
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            nifti = _NiftiFile(compressed, _nifti_layout(f.read(540)))
    except (EOFError, OSError, zlib.error):
        raise _truncated(path) from None
    if nifti.layout is not None and nifti.layout.damaged:
        raise VaeudaError(f"{path}: its NIfTI header is damaged ({nifti.layout.damaged}).")
    return nifti


def _check_nifti_complete(path: Path) -> Optional[_NiftiFile]:
    """Refuse a truncated NIfTI file (ITK's NIfTI reader fills missing voxels with zeros and says
    nothing); returns its header, parsed once for the checks that follow; None if not named as NIfTI.

    A ``.nii.gz`` that is not compressed (ITK reads it all the same) is checked as a ``.nii``.
    """
    if full_suffix(path).lower() not in (".nii", ".nii.gz"):
        return None
    nifti = _check_nifti_header(path)
    truncated = _truncated(path)
    compressed = nifti.compressed
    if not compressed:
        if nifti.layout is not None and path.stat().st_size < nifti.layout.offset + nifti.layout.nbytes:
            raise truncated
        return nifti
    try:
        if nifti.layout is None:
            return nifti
        expected = nifti.layout.offset + nifti.layout.nbytes
        with open(path, "rb") as f:   # fast path: the gzip trailer holds the size modulo 2**32
            f.seek(-4, 2)
            if struct.unpack("<I", f.read(4))[0] == expected % 2 ** 32:
                return nifti
        total = 0
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise truncated from None
    if total < expected:
        raise truncated
    return nifti


# MetaImage element types and their sizes in bytes (MetaIO's metaTypes.h).
_META_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                       "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
                       "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage_complete(path: Path) -> None:
    """Refuse a truncated MetaImage before ITK reads it (MetaIO reports it on stderr, in two lines of its own).

    Checks the one-file case (``ElementDataFile = LOCAL``, the data after the header) and a
    ``.mhd``'s single data file; a compressed file is checked against ``CompressedDataSize``.
    Anything this cannot size (a file list, a missing field) is left to ITK.
    """
    if full_suffix(path).lower() not in (".mha", ".mhd"):
        return
    fields, header_bytes = {}, 0
    with open(path, "rb") as f:
        for raw in iter(lambda: f.readline(4096), b""):
            header_bytes += len(raw)
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                return   # not a MetaImage header: ITK's own refusal follows
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    _check_metaimage_header(path, fields)
    data_file = fields.get("ElementDataFile")
    if data_file and data_file.split()[0] == "LIST":       # the data files' names follow, one a line
        with open(path, "rb") as f:
            f.seek(header_bytes)
            names = [line.strip() for line in f.read(1 << 20).decode("latin-1").splitlines() if line.strip()]
        if not names:       # MetaIO reads uninitialised memory for the voxels
            raise VaeudaError(f"{path}: its MetaImage header lists no data files after ElementDataFile = LIST.")
        for name in names:
            _require_data_file(path, path.parent / name)
        return
    compressed = fields.get("CompressedData", "False").lower() == "true"
    try:
        voxel_bytes = (int(np.prod([int(v) for v in fields["DimSize"].split()]))
                       * int(fields.get("ElementNumberOfChannels", "1"))
                       * _META_ELEMENT_BYTES[fields["ElementType"]])
        # (without CompressedDataSize MetaIO inflates a separate data file whole, from its first byte)
        expected = (int(fields["CompressedDataSize"]) if "CompressedDataSize" in fields else None) if compressed \
            else voxel_bytes
        offset = int(fields.get("HeaderSize", "0"))
    except (KeyError, ValueError):
        return
    if data_file == "LOCAL":
        if expected is None:        # MetaIO then inflates from the wrong place and reads noise
            raise VaeudaError(f"{path}: its MetaImage header is damaged (CompressedData = True without the "
                              f"CompressedDataSize that data in the same file need).")
        data_path, start = path, header_bytes
    elif data_file and not data_file.startswith("LIST") and "%" not in data_file:
        data_path = path.parent / data_file
        _require_data_file(path, data_path)
        if expected is None:
            start = 0       # (HeaderSize is not looked at then)
        elif offset >= 0:
            start = offset
        else:               # HeaderSize = -1: the data are the file's last bytes
            start = max(data_path.stat().st_size - expected, 0)
    else:
        return
    size = data_path.stat().st_size
    if expected is None:
        expected = size
    if size - start < expected:
        raise _truncated(path)
    if compressed:
        _check_metaimage_stream(path, data_path, start, expected, voxel_bytes)


# Bytes read, and most bytes inflated, at a time (a stream of zeros inflates about a thousandfold).
_READ_CHUNK, _INFLATE_CHUNK = 1 << 20, 1 << 22


def _check_metaimage_stream(path: Path, data_path: Path, start: int, compressed_bytes: int, voxel_bytes: int) -> None:
    """Refuse compressed MetaImage data that do not inflate to the header's voxels: MetaIO fills
    what it cannot inflate with zeros and says so only on stderr ("Uncompress failed"), so a
    damaged file would be segmented as a volume that is partly black. A stream that gives every
    voxel is whole to MetaIO even without its end (the checksum after it). (It costs about what
    ITK's own inflating does: 0.5 s for 150 MB of voxels.)"""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)        # zlib or gzip framing, as MetaIO takes both
    inflated, left = 0, compressed_bytes
    try:
        with open(data_path, "rb") as f:
            f.seek(start)
            while left > 0 and not inflater.eof and inflated <= voxel_bytes:
                data = f.read(min(_READ_CHUNK, left))
                if not data:
                    break
                left -= len(data)
                while data and not inflater.eof and inflated <= voxel_bytes:
                    inflated += len(inflater.decompress(data, _INFLATE_CHUNK))
                    data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise VaeudaError(f"{path}: its compressed image data are damaged ({exc}); MetaIO would read the damaged "
                          f"part as zeros.") from None
    if inflated > voxel_bytes:
        raise VaeudaError(f"{path}: its compressed image data inflate to more than the {voxel_bytes} bytes its "
                          f"header's DimSize and ElementType give; the header does not describe them.")
    if inflated < voxel_bytes:
        raise VaeudaError(f"{path}: its compressed image data are damaged (they end after {inflated} of the "
                          f"{voxel_bytes} bytes its header's DimSize and ElementType give); MetaIO would read the "
                          f"rest as zeros.")


def _require_data_file(header: Path, data_path: Path) -> None:
    """A detached header's data file: there, readable, and not a pipe or device (a reader would wait
    on one forever)."""
    if not data_path.exists():
        raise VaeudaError(f"{header}: its data file {data_path} was not found.")
    if data_path.is_dir():
        raise VaeudaError(f"{header}: its data file {data_path} is a folder.")
    if not data_path.is_file():
        raise VaeudaError(f"{header}: its data file {data_path} {SPECIAL_FILE}")
    require_readable(data_path)


def _meta_numbers(value: str) -> Optional[List[float]]:
    try:
        return [float(v) for v in value.split()]
    except ValueError:
        return None


def _check_metaimage_header(path: Path, fields: Dict[str, str]) -> None:
    """Refuse a MetaImage header whose geometry MetaIO would misread: more dimensions than a volume
    has (NDims = 100 with a 3x3 matrix crashed the process), sizes that are not whole positive
    numbers (2.5 read as 2; 0 gave a traceback), fields of the wrong length, and a spacing, origin or
    matrix that is not a number (read as 1 or 0 without a word)."""
    def damaged(what: str) -> VaeudaError:
        return VaeudaError(f"{path}: its MetaImage header is damaged ({what}).")

    text = fields.get("NDims")
    if text is None:
        return              # MetaIO's own refusal follows
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 4:
        raise damaged(f"NDims = {text}; an image here has 3 dimensions")
    n = int(text)
    sizes = fields.get("DimSize", "").split()
    if len(sizes) != n or not all(v.isascii() and v.isdigit() and int(v) > 0 for v in sizes):
        raise damaged(f"DimSize = {fields.get('DimSize', '')}, not {n} whole positive numbers")
    for keys, count in ((("ElementSpacing", "ElementSize"), n), (("Offset", "Origin", "Position"), n),
                        (("TransformMatrix", "Rotation", "Orientation"), n * n)):
        for key in keys:
            if key in fields:
                values = _meta_numbers(fields[key])
                if values is None or len(values) != count or not all(map(math.isfinite, values)):
                    raise damaged(f"{key} = {fields[key]}, not {count} numbers")
                if key in ("ElementSpacing", "ElementSize") and not all(v > 0 for v in values):
                    raise damaged(f"{key} = {fields[key]}: a spacing must be positive")


# NRRD axis kinds of a spatial axis (the others: list, vector, colour, matrix axes ...; nrrd format 5).
_NRRD_SPATIAL_KINDS = ("domain", "space", "time")


def _check_nrrd_header(path: Path) -> None:
    """Refuse a NRRD (or detached .nhdr) header that ITK would read without a word into the wrong
    image: a spatial axis with no spacing, or one that is not a number (read as 1 mm), and a
    detached data file that is missing, or a pipe or device (the reader waited on it forever)."""
    if full_suffix(path).lower() not in (".nrrd", ".nhdr"):
        return
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline(64).startswith(b"NRRD"):
            return                  # ITK's own refusal follows
        for raw in iter(lambda: f.readline(1 << 16), b""):
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break               # the data follow (attached) or the header ends
            if line.startswith("#") or ":=" in line:
                continue            # comments and key/value pairs
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()

    def damaged(what: str) -> VaeudaError:
        return VaeudaError(f"{path}: its NRRD header {what}; set the voxel spacing first (ITK would read 1 mm).")

    data_file = fields.get("data file", fields.get("datafile"))
    if data_file and not data_file.startswith("LIST") and "%" not in data_file and len(data_file.split()) == 1:
        _require_data_file(path, path.parent / data_file)
    try:
        n = int(fields.get("dimension", "0"))
    except ValueError:
        return
    kinds = fields.get("kinds", "").split()
    spatial = [axis for axis in range(n) if len(kinds) != n or kinds[axis].lower() in _NRRD_SPATIAL_KINDS
               or kinds[axis] == "???"]
    directions = fields.get("space directions")
    if directions is not None:
        vectors = re.findall(r"\(([^)]*)\)|none", directions)
        if len(vectors) != n:
            return                  # ITK's own reading of it rules
        for axis in spatial:
            if not vectors[axis]:
                raise damaged(f"gives spatial axis {axis} no direction ('none')")
            values = _meta_numbers(vectors[axis].replace(",", " "))
            if values is None or not all(map(math.isfinite, values)) or not any(values):
                raise damaged(f"gives spatial axis {axis} the direction ({vectors[axis]})")
        return
    spacings = _meta_numbers(fields.get("spacings", ""))
    if spacings is None or len(spacings) != n:
        raise damaged("records no spacings")
    bad = [axis for axis in spatial if not (math.isfinite(spacings[axis]) and spacings[axis] > 0)]
    if bad:
        raise damaged(f"records no spacing along axis {', '.join(map(str, bad))} (NaN, 0 or negative)")


# What ITK and SimpleITK put before the reason in an exception's text (itk:: in the NRRD reader's).
_ITK_ERROR_PREFIX = re.compile(r"sitk::ERROR:|itk::ERROR:|ITK ERROR:")


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's own reason for a failed read: its exception's text after the last error prefix and the
    object's name, on one line (a matrix it prints spans several), e.g. 'ITK only supports
    orthonormal direction cosines. No orthonormal definition found' or 'Bad direction, determinant
    is 0. Refusing to change direction from 1 0 0 0 1 0 0 0 1 to 1 1 0 0 0 0 0 0 1'."""
    parts = _ITK_ERROR_PREFIX.split(str(exc))
    text = parts[-1] if len(parts) > 1 else (str(exc).strip().splitlines() or [""])[-1]   # no prefix: the last line
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):", "", text)      # 'Image(0x55e2...):'
    return " ".join(text.split()).rstrip(".!") or "unknown error"


# What reads the text held by the active _held_c_stderr (the list is empty while none is active):
# a nested use shares it.
_HELD_STDERR: List[Callable[[], str]] = []


@contextlib.contextmanager
def _held_c_stderr() -> Iterator[Callable[[], str]]:
    """Hold back what C code under ITK's readers (the NIfTI library, MetaIO, GDCM, vnl) prints
    straight on the process's stderr: before a refusal it is a second, rawer account of the one
    sentence the engine gives (``** ERROR: nifti_convert_nhdr2nim: bad dim[0]``). Yields a function
    giving the text held so far. If the block raises, the text is dropped (the refusal says it,
    with :func:`_c_complaint`'s help); if it ends normally, the text is let through then, as the
    warnings it is. Nested uses share the outermost one. File descriptor 2 is the whole
    process's, so only the main thread holds it (a read in another thread prints as before);
    without one (a GUI process without a console), or without a temporary file to hold it in,
    nothing is held."""
    if _HELD_STDERR:
        yield _HELD_STDERR[-1]
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda: ""
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lambda: ""
        return
    try:
        held = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield lambda: ""
        return

    def text() -> str:
        os.lseek(held.fileno(), 0, os.SEEK_SET)     # (then at the end again, where the next write goes)
        chunks = []
        while True:
            chunk = os.read(held.fileno(), 1 << 16)
            if not chunk:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(chunk)

    succeeded = False
    try:
        os.dup2(held.fileno(), 2)
        _HELD_STDERR.append(text)
        yield text
        succeeded = True
    finally:
        try:
            sys.stderr.flush()                      # Python's own lines of the block, into the hold
        except (OSError, ValueError, AttributeError):
            pass
        finally:
            os.dup2(saved, 2)                       # first of all: what follows reaches the terminal again
            os.close(saved)
            if _HELD_STDERR and _HELD_STDERR[-1] is text:
                _HELD_STDERR.pop()
        with held:
            warnings = text() if succeeded else ""
        if warnings:
            sys.stderr.write(warnings)
            sys.stderr.flush()


def _holding_c_stderr(read: Callable) -> Callable:
    """``read`` run inside :func:`_held_c_stderr`, for the whole of its checks: a warning the C code
    printed while reading is dropped with a refusal that comes after the read."""
    @functools.wraps(read)
    def holding(*args, **kwargs):
        with _held_c_stderr():
            return read(*args, **kwargs)
    return holding


def _c_complaint(held: str) -> str:
    """The last line C code printed, as a reason: 'bad dim[0]' from '** ERROR: nifti_convert_nhdr2nim:
    bad dim[0]' (its marker and the function's name dropped); '' when it printed nothing."""
    lines = [line.strip() for line in held.splitlines() if line.strip()]
    if not lines:
        return ""
    line = re.sub(r"^\**\s*(ERROR|WARNING)?:?\s*", "", lines[-1])
    return re.sub(r"^[A-Za-z_][\w:]*:\s+", "", line).rstrip(".!")


def _gzip_named_nii(path: Path) -> bool:
    """A ``.nii`` file whose bytes are gzip's (ITK picks its reader by the name, and no reader takes it)."""
    return path.name.lower().endswith(".nii") and first_bytes(path, 2) == GZIP_MAGIC


def require_existing(path: PathLike) -> None:
    """Refuse an input image file or DICOM folder that is not there, may not be read, or whose name
    ITK cannot take (:func:`fileio.require_utf8_name`)."""
    require_utf8_name(path)
    if not Path(path).exists():
        raise VaeudaError(f"{path}: file or folder not found.")
    require_readable(path)


DICOM_PREAMBLE = 128          # bytes before a DICOM file's "DICM" magic
SOP_CLASS_UID = "0008|0016"   # a DICOM tag every DICOM file carries; ITK keeps it in the metadata


@_holding_c_stderr
def _read_any(path: Path) -> sitk.Image:
    """Read an image file or the largest DICOM series in a folder, checking it is 3D scalar and whole."""
    require_existing(path)
    nifti = None
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.stat().st_size == 0:     # ITK: "Unable to determine ImageIO reader"
            raise VaeudaError(f"{path}: file is empty.")
        _check_metaimage_complete(path)
        _check_nrrd_header(path)
        with _held_c_stderr() as held:     # (the decorator's hold: this read's own lines start here)
            held_before = len(held())
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as exc:
                if _gzip_named_nii(path):
                    raise VaeudaError(f"{path}: is gzip-compressed but named .nii; rename it {path.name}.gz.") from None
                if _nifti_cut_in_header(path):   # said as for one cut short further in, not "no reader"
                    raise _truncated(path) from None
                said = _c_complaint(held()[held_before:])
                raise VaeudaError(f"{path}: cannot be read as an image: {_itk_reason(exc)}"
                                  f"{f': {said}' if said else ''} (readable: {', '.join(VOLUME_SUFFIXES)} files and "
                                  f"DICOM folders).") from None
        nifti = _check_nifti_complete(path)
    if image.GetDimension() != 3:
        raise VaeudaError(f"{path}: expected a 3D scalar image, found a {image.GetDimension()}D image.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VaeudaError(f"{path}: expected a 3D scalar image, found a vector image with "
                          f"{image.GetNumberOfComponentsPerPixel()} components per voxel.")
    if nifti is not None:
        unset = _nifti_unset_spacing(nifti.layout)
        if unset:   # a scan taken as 1 mm would be cut and resampled at the wrong scale, silently
            raise VaeudaError(f"{path}: its NIfTI header records no voxel spacing along {', '.join(unset)} (pixdim 0 "
                              f"or not a number), which would be read as 1 mm; set the spacing first.")
        try:
            non_finite = _nifti_non_finite(path, nifti)
        except (OSError, EOFError, zlib.error) as exc:    # ITK read it; its compressed data are damaged further on
            raise VaeudaError(f"{path}: the file is damaged ({exc}).") from None
        _refuse_non_finite(path, non_finite)
    return image


# How far a gap between a DICOM series' slices may differ from their mean spacing, as a fraction of
# it. Position jitter of real scanners stays far below a tenth.
NON_UNIFORM_TOLERANCE = 0.1


def _dicom_numbers(reader: sitk.ImageFileReader, tag: str) -> Optional[np.ndarray]:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        return np.array([float(v) for v in reader.GetMetaData(tag).split("\\")])
    except ValueError:
        return np.array([math.nan])


def _check_dicom_geometry(path: Path, series: str, files: Sequence[str]) -> None:
    """Refuse a series ITK would stack into the wrong volume without a word, from each slice's
    orientation (0020,0037), position (0020,0032) and pixel spacing (0028,0030): slices of more than
    one orientation or pixel spacing (stacked with the first's), an orientation that is not
    orthonormal or a spacing that is not positive (read as identity, 1 mm), all slices at one
    position, slices not stacked along their normal, as a gantry tilt leaves them (ITK stacks them
    straight: a volume sheared by as much as the tilt moves the last slice aside), and slices not
    evenly spaced (a missing one). The headers are read once, here, for all of it."""
    reader = sitk.ImageFileReader()
    orientations, positions, spacings = [], [], []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return                      # the series reader's own refusal follows
        orientation, position = _dicom_numbers(reader, "0020|0037"), _dicom_numbers(reader, "0020|0032")
        spacing = _dicom_numbers(reader, "0028|0030")
        if orientation is None or position is None or spacing is None:
            return                      # a series without them: ITK's defaults are all there is
        orientations.append(orientation)
        positions.append(position)
        spacings.append(spacing)

    def refuse(what: str) -> VaeudaError:
        return VaeudaError(f"{path}: the slices of DICOM series {series} {what}; ITK would stack them into a "
                           f"wrong volume.")

    if any(o.shape != (6,) or not np.isfinite(o).all() for o in orientations) or any(
            p.shape != (3,) or not np.isfinite(p).all() for p in positions):
        raise refuse("carry an orientation or position that is not a set of numbers")
    if any(np.abs(o - orientations[0]).max() > 1e-4 for o in orientations):
        raise refuse("have more than one orientation")
    row, col = orientations[0][:3], orientations[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(np.dot(row, col)) > 1e-3:
        raise refuse(f"have an orientation that is not orthonormal ({', '.join(f'{v:g}' for v in orientations[0])})")
    if any(s.shape != (2,) or not (np.isfinite(s).all() and (s > 0).all()) for s in spacings) or any(
            np.abs(s - spacings[0]).max() > 1e-4 for s in spacings):
        raise refuse("have no single positive pixel spacing")
    if len(positions) < 2:
        return
    normal = np.cross(row, col)
    offsets = np.array(positions) - positions[0]
    along = offsets @ normal
    if np.ptp(along) < 1e-6:
        raise refuse(f"all lie at one position ({len(positions)} slices)")
    aside = float(np.linalg.norm(offsets - np.outer(along, normal), axis=1).max())
    if aside > 0.5 * float(spacings[0].min()):
        raise refuse(f"are not stacked along their normal (a gantry tilt?): one lies {aside:.3g} mm aside of the "
                     f"first's line")
    # ITK stacks unevenly spaced slices at their mean spacing and only warns (the command line
    # silences ITK's warnings): every slice after a gap would sit at the wrong place. The gaps, in
    # the order the series reader stacks the files:
    gaps = np.diff(along)
    mean = float(np.mean(gaps))
    deviation = float(np.max(np.abs(gaps - mean)))
    if deviation > NON_UNIFORM_TOLERANCE * abs(mean):
        raise VaeudaError(f"{path}: the slices of DICOM series {series} are not evenly spaced (missing or repeated "
                          f"slices? a gap differs by {deviation:.3g} mm from the mean spacing of {abs(mean):.3g} mm).")


def _media_sop_class(path: Path) -> Optional[str]:
    """The Media Storage SOP Class UID (0002,0002) of a DICOM Part 10 file, read from its file meta
    header (always explicit VR little endian, right after the preamble and "DICM"); None for
    another file. Read by hand: GDCM cannot parse a file cut short, and its header is all it holds."""
    head = first_bytes(path, 4096)
    if head[DICOM_PREAMBLE:DICOM_PREAMBLE + 4] != b"DICM":
        return None
    at = DICOM_PREAMBLE + 4
    while at + 8 <= len(head):
        group, element = struct.unpack("<HH", head[at:at + 4])
        if group != 0x0002:
            return None
        vr = head[at + 4:at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):    # 2 reserved bytes, then a 4-byte length
            length, at = struct.unpack("<I", head[at + 8:at + 12])[0] if at + 12 <= len(head) else 0, at + 12
        else:
            length, at = struct.unpack("<H", head[at + 6:at + 8])[0], at + 8
        if element == 0x0002:
            return head[at:at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at += length
    return None


def _read_dicom_folder(path: Path) -> sitk.Image:
    # GDCM's scan of the folder stops short, at random, at a pipe or a broken link in it: the files
    # after it then read as not part of the series
    odd = sorted(entry.name for entry in os.scandir(path)
                 if not (entry.is_file() or entry.is_dir()))       # (both follow links: a broken one is neither)
    if odd:
        raise VaeudaError(f"{path}: holds {', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}, not a regular file "
                          f"(a pipe, socket, device or broken link), which the DICOM reader cannot pass; move it "
                          f"away.")
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()
    except RuntimeError:
        series = ()
    if not series:
        # a folder of other files reaches here too (data.find_images takes any folder without
        # volume files for a DICOM folder): name both things that were looked for
        raise VaeudaError(f"{path}: folder holds no DICOM series and no image volumes ({', '.join(VOLUME_SUFFIXES)}).")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files[sid]))
    # GDCM leaves out a DICOM file it cannot parse (one cut short, say): the scan would lose that slice
    # without a word, or, in the middle, be refused as unevenly spaced without naming the file. Such a
    # file still opens with its meta header, whose SOP class is the series' (a DICOMDIR or a report
    # beside the series has another and is no slice of it).
    listed = {Path(f).resolve() for names in files.values() for f in names}
    slice_class = _media_sop_class(Path(files[chosen][0]))
    unread = sorted(p.name for p in path.iterdir() if p.is_file() and p.resolve() not in listed
                    and slice_class is not None and _media_sop_class(p) == slice_class)
    if unread:
        raise VaeudaError(f"{path}: {len(unread)} DICOM file(s) in it cannot be read as part of a series (damaged or "
                          f"cut short?): {', '.join(unread[:5])}{', ...' if len(unread) > 5 else ''}; mend or remove "
                          f"them.")
    if len(series) > 1:
        log.info("%s: %d DICOM series, reading the largest (%s, %d files)", path, len(series), chosen, len(files[chosen]))
    _check_dicom_geometry(path, chosen, files[chosen])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        image = reader.Execute()
    except RuntimeError:
        raise VaeudaError(f"{path}: DICOM series {chosen} cannot be read (corrupt or incomplete).") from None
    return image


_INTEGER_PIXELS = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                   sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


def _refuse_label_map(image: sitk.Image, path: Path) -> None:
    """Refuse a label map given where an image belongs: voxels (integer, or floating-point holding
    whole numbers) whose only values are a known label convention's, a structure's among them (no
    scan has so few values)."""
    if image.GetPixelID() not in _INTEGER_PIXELS + (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    array = sitk.GetArrayViewFromImage(image)
    label_values = {int(v) for convention in BUILTIN_CONVENTIONS.values() for v in convention.to_index}
    if np.unique(array.ravel()[:: max(1, array.size // 65536)]).size > len(label_values):
        return                                   # a sample already has too many values: the usual case
    unique = np.unique(array)
    if not (np.isfinite(unique).all() and np.array_equal(unique, np.round(unique))):
        return                                   # fractional values are intensities; non-finite ones are refused later
    values = [int(v) for v in unique]
    if max(values) > 0 and set(values) <= label_values:
        raise VaeudaError(f"{path}: is a label map (its only values are {', '.join(map(str, values))}), not an "
                          f"image; give the image it labels.")


@_holding_c_stderr
def read_image(path: PathLike) -> sitk.Image:
    """A 3D scalar image as float32, geometry and metadata kept.

    ``path``: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), or a folder
    holding a DICOM series (the largest series if there are several).
    """
    path = Path(path)
    image = _read_any(path)
    if 1 in image.GetSize():
        # A 2D slice saved as 3D, or one file of a DICOM series: cut across, it gives rows, not slices.
        size = " x ".join(map(str, image.GetSize()))
        raise VaeudaError(f"{path}: is a single slice ({size} voxels), not a volume; give the whole scan"
                          f"{' (the folder that holds the DICOM series)' if image.HasMetaDataKey(SOP_CLASS_UID) else ''}.")
    _refuse_label_map(image, path)
    _refuse_skewed_grid(image, path)
    _refuse_non_finite(path, _count_non_finite(image))   # of the file's own values, before 32-bit floats can overflow
    if image.GetPixelID() != sitk.sitkFloat32:
        try:
            cast = sitk.Cast(image, sitk.sitkFloat32)
        except RuntimeError:
            raise VaeudaError(f"{path}: voxel type {image.GetPixelIDTypeAsString()} cannot be used as intensities.") from None
        for key in image.GetMetaDataKeys():
            cast.SetMetaData(key, image.GetMetaData(key))
        image = cast
        beyond = _count_non_finite(image)
        if beyond:
            raise VaeudaError(f"{path}: {_voxels(beyond)} beyond the range of 32-bit floats (+-3.4e38), which the "
                              f"networks read; rescale the intensities first.")
    return image


def _count_non_finite(image: sitk.Image) -> int:
    """How many voxels of ``image`` are NaN or infinite (none for integer voxels)."""
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind != "f":
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _refuse_skewed_grid(image: sitk.Image, path: Path) -> None:
    """Refuse direction cosines that are not orthonormal (a sheared grid, e.g. a gantry tilt kept in
    the header, or cosines rounded by hand), within the tolerance the geometry checks use: the
    segmentation is written as NIfTI, which stores only an orthonormal direction, so it could
    not lie on the input's grid."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > GEOMETRY_TOLERANCE:
        raise VaeudaError(f"{path}: its direction cosines are not orthonormal (off by {deviation:.2g}: a sheared "
                          f"or gantry-tilted grid, or rounded cosines), so no segmentation can lie on its grid; "
                          f"resample the scan onto an orthonormal grid first.")


@_holding_c_stderr
def read_label(path: PathLike, convention: Convention, reference: Union[sitk.Image, PathLike, None] = None,
               option: str = "--label-convention", reference_name: Optional[str] = None) -> sitk.Image:
    """A label file as a uint8 class-index image (0 background, 1..4 structures).

    Raw values are mapped with ``convention.encode`` (unknown values are refused or become
    background, as the convention says; ``option`` is the one its sentences name). With
    ``reference`` (an image, or the path of one) the label must lie on the same grid;
    ``reference_name`` names an image given as such in that sentence (else "the image").
    """
    path = Path(path)
    raw = _read_any(path)
    if reference is not None:
        if isinstance(reference, sitk.Image):
            ref_image, ref_name = reference, reference_name or "the image"
        else:
            ref_image, ref_name = _read_any(Path(reference)), str(reference)
        mismatch = geometry_mismatch(raw, ref_image, names=("label", "image"))
        if mismatch:
            raise VaeudaError(f"{path}: geometry does not match {ref_name} ({mismatch}).")
    return label_classes(raw, convention, source=str(path), option=option)


def label_classes(raw: sitk.Image, convention: Convention, source: str = "label map",
                  option: str = "--label-convention") -> sitk.Image:
    """A label image of raw values as a uint8 class-index image on the same grid
    (``convention.encode``; ``source`` names it in the error for an unknown value, ``option`` the way out)."""
    out = sitk.GetImageFromArray(convention.encode(sitk.GetArrayViewFromImage(raw), source=source, option=option))
    out.CopyInformation(raw)
    return out


def _checked_suffix(path: Path) -> str:
    suffix = full_suffix(path).lower()
    if suffix not in WRITE_SUFFIXES:
        raise VaeudaError(f"{path}: cannot write '{suffix or 'no extension'}' files; use one of {', '.join(WRITE_SUFFIXES)}.")
    return suffix


NIFTI_MAX_VOXELS = 32767     # per axis: NIfTI-1 stores dim[] as int16


def require_nifti_size(image: sitk.Image, source) -> None:
    """Refuse, before the work that leads to it, an image whose NIfTI output (a segmentation, a
    converted volume) could not be written: more than NIFTI_MAX_VOXELS voxels along an axis."""
    if max(image.GetSize()) > NIFTI_MAX_VOXELS:
        raise VaeudaError(f"{source}: {' x '.join(map(str, image.GetSize()))} voxels; its output would be a NIfTI file, "
                          f"which holds at most {NIFTI_MAX_VOXELS} voxels along an axis.")


def write_image(image: sitk.Image, path: PathLike) -> Path:
    """Write ``image`` atomically (all or nothing); the format follows the extension
    (.nii, .nii.gz, .nrrd, .mha). Returns the path."""
    path = Path(path)
    _checked_suffix(path)
    require_utf8_name(path)
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
    except RuntimeError as exc:
        raise VaeudaError(f"{path}: cannot be written ({_itk_reason(exc)}).") from None
    return path


def write_label(classes_image: sitk.Image, path: PathLike, convention: Convention) -> Path:
    """Write a class-index image as the label-file values of ``convention``, same geometry."""
    path = Path(path)
    _checked_suffix(path)
    classes = sitk.GetArrayViewFromImage(classes_image)
    if classes.size and int(classes.max()) >= len(convention.from_index):
        raise ValueError(f"class index {int(classes.max())} has no value in the '{convention.name}' convention")
    out = sitk.GetImageFromArray(convention.decode(classes))
    out.CopyInformation(classes_image)
    return write_image(out, path)


def to_canonical(image: sitk.Image) -> sitk.Image:
    """The same voxels with axes permuted/flipped so that x, y, z point Left, Posterior, Superior
    (the nearest such axes for an oblique image, whose small rotation stays in its direction)."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


# --- intensities -----------------------------------------------------------------------------

def normalised_image(image: sitk.Image, recipe: Mapping = DEFAULT_NORMALISATION) -> sitk.Image:
    """:func:`normalise` of a whole image, as a float32 image on the same grid."""
    out = sitk.GetImageFromArray(normalise(sitk.GetArrayViewFromImage(image), recipe))
    out.CopyInformation(image)
    return out


def normalise(array: np.ndarray, recipe: Mapping = DEFAULT_NORMALISATION) -> np.ndarray:
    """Intensity normalisation of a whole volume; returns a new float32 array of the same shape.

    ``recipe["method"]``:
      - ``"zscore"``: clip at the ``clip_lower_percentile`` / ``clip_upper_percentile``
        percentiles (each optional, None = no clip), then subtract the mean, divide by the std.
      - ``"minmax"``: the same optional clipping, then map [min, max] linearly to [-1, 1].
      - ``"fixed"``: map ``recipe["range"] = [lo, hi]`` linearly to [-1, 1], then clip to [-1, 1]
        (ranges such as the SIFA loaders' MR (-1.8, 4.4), CT (-2.8, 3.2); SIFA maps its already
        z-scored slices with them and does not clip).
    A constant volume becomes all zeros.
    """
    method = recipe.get("method", "zscore")
    if method not in ("zscore", "minmax", "fixed"):
        raise VaeudaError(f"normalisation method '{method}' is unknown: use zscore, minmax or fixed.")
    lower, upper = recipe.get("clip_lower_percentile"), recipe.get("clip_upper_percentile")
    clip = None
    if method != "fixed" and (lower is not None or upper is not None):
        # Percentiles of the input before the copy below (np.percentile makes its own).
        q = [0.0 if lower is None else float(lower), 100.0 if upper is None else float(upper)]
        clip = np.percentile(array, q)
    out = np.array(array, dtype=np.float32, copy=True)
    if clip is not None:
        np.clip(out, clip[0], clip[1], out=out)
    if method == "fixed":
        lo, hi = (float(v) for v in recipe["range"])
        if not hi > lo:
            raise VaeudaError(f"normalisation range {recipe['range']} is empty: it needs low < high.")
        out -= lo
        out *= 2.0 / (hi - lo)
        out -= 1.0
        return np.clip(out, -1.0, 1.0, out=out)
    if method == "zscore":
        mean, std = _mean_std(out)
        out -= mean
        if std > 0:
            out /= std
        return out
    lo, hi = float(out.min()), float(out.max())
    if hi > lo:
        out -= lo
        out *= 2.0 / (hi - lo)
        out -= 1.0
    else:
        out[...] = 0.0
    return out


def _mean_std(values: np.ndarray, chunk: int = 1 << 18) -> Tuple[float, float]:
    """Mean and standard deviation in float64, a chunk at a time (``np.std`` would make a
    float64 temporary twice the size of a float32 volume)."""
    flat = values.reshape(-1)
    mean = float(flat.mean(dtype=np.float64))
    squares = 0.0
    for start in range(0, flat.size, chunk):
        deviation = flat[start:start + chunk].astype(np.float64) - mean
        squares += float(np.dot(deviation, deviation))
    return mean, (squares / max(flat.size, 1)) ** 0.5


# --- coronal slicing -------------------------------------------------------------------------

ScoreChunks = Iterable[Tuple[int, np.ndarray]]


# A volume whose canonical direction is rotated by more than this from LPS is sliced along the
# patient's axes (:func:`_oblique_slice_grid`). Below it, slicing in the volume's own frame tilts
# the coronal planes by less than the training's rotation augmentation does, and keeps the
# slice grid on the volume's voxel centres (an exact round trip of labels).
OBLIQUE_DEGREES = 1.0


def obliquity_degrees(direction: Iterable[float]) -> float:
    """The rotation angle [degrees] of a canonical (nearest-to-LPS) direction matrix from the identity."""
    trace = float(np.trace(np.asarray(tuple(direction), dtype=float).reshape(3, 3)))
    return math.degrees(math.acos(min(1.0, max(-1.0, (trace - 1.0) / 2.0))))


def _oblique_slice_grid(canonical: Geometry, size: int, fov_mm: Optional[float]) -> Geometry:
    """The slice grid of an oblique volume: LPS-aligned (identity direction) over the physical
    bounding box of its voxels (edge to edge), coronal planes a voxel's extent along y apart, and
    x and z as :meth:`SliceGrid.from_image` lays them out over that box. Slicing in the volume's own
    tilted frame would show the model coronal planes rotated by the scan's obliquity, which it
    never saw in training (+-10 degrees of rotation augmentation, in-plane)."""
    direction = np.asarray(canonical.direction).reshape(3, 3)
    spacing = np.asarray(canonical.spacing)
    n = np.asarray(canonical.size)
    edges = np.array([[-0.5 if bit == 0 else n[axis] - 0.5 for axis, bit in enumerate(corner)]
                      for corner in np.ndindex(2, 2, 2)])        # the 8 corners, continuous index
    corners = np.asarray(canonical.origin) + (edges * spacing) @ direction.T
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = high - low
    # a voxel's extent along the patient's y: the canonical y spacing for an untilted volume, and
    # never the long z or x spacing a tilt brings into y (which would multiply the slices)
    sy = float(np.linalg.norm(direction[1] * spacing))
    ny = max(1, int(math.ceil(extent[1] / sy - 1e-9)))
    if fov_mm is None:
        gx, gz = extent[0] / size, extent[2] / size
    else:
        gx = gz = float(fov_mm) / size
    middle = (low + high) / 2
    origin = (middle[0] - (size - 1) / 2 * gx, middle[1] - (ny - 1) / 2 * sy, middle[2] - (size - 1) / 2 * gz)
    return Geometry((int(size), ny, int(size)), (float(gx), sy, float(gz)), tuple(float(v) for v in origin),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


class SliceGrid:
    """How one volume is cut into model input slices and how predictions go back.

    ``original``: the input's grid. ``canonical``: the same voxels in LPS. ``grid``: the slice
    grid, in the canonical frame: the same y samples (one coronal slice per canonical y index,
    ``n_slices`` of them) and ``size`` samples spanning the same physical extent along x and z.
    A volume oblique by more than ``OBLIQUE_DEGREES`` (a rotation left in the canonical direction)
    is sliced along the patient's axes instead, over its physical bounding box, as the model was
    trained: see :func:`_oblique_slice_grid`.
    Slice ``j`` is grid plane ``y = j`` as a ``(size, size)`` array, rows = z from superior to
    inferior, columns = x.
    """

    def __init__(self, original: Geometry, canonical: Geometry, grid: Geometry, size: int):
        self.original, self.canonical, self.grid, self.size = original, canonical, grid, int(size)
        self.n_slices = int(grid.size[1])

    @classmethod
    def from_image(cls, image: sitk.Image, size: int, fov_mm: Optional[float] = None) -> "SliceGrid":
        """The slice grid of ``image`` (3D) for ``size x size`` model slices.

        ``fov_mm``: None stretches the whole x-z extent onto the slice; a number gives a square
        field of view of that many millimetres centred on the volume (pixels of ``fov_mm / size``
        mm), so anatomy has the same scale in every scanner's images; outside the volume the
        nearest edge value is repeated.
        """
        if image.GetDimension() != 3:
            raise ValueError(f"SliceGrid needs a 3D image, got {image.GetDimension()}D")
        if int(size) < 1:
            raise ValueError(f"slice size must be positive, got {size}")
        # Only the canonical geometry is needed: orient a uint8 stand-in on the same grid
        # (a quarter of the memory of a float image), as label_slices/scores_to_image orient.
        stand_in = sitk.Image([int(s) for s in image.GetSize()], sitk.sitkUInt8)
        stand_in.CopyInformation(image)
        canonical = Geometry.of(to_canonical(stand_in))
        del stand_in
        direction = np.asarray(canonical.direction).reshape(3, 3)
        if obliquity_degrees(canonical.direction) > OBLIQUE_DEGREES:
            return cls(Geometry.of(image), canonical, _oblique_slice_grid(canonical, size, fov_mm), size)
        nx, ny, nz = canonical.size
        sx, sy, sz = canonical.spacing
        if fov_mm is None:
            gx, gz = nx * sx / size, nz * sz / size  # same extent (voxel edge to voxel edge)
            # First grid sample in canonical continuous index: half a grid voxel in from the edge.
            first = (-0.5 + 0.5 * gx / sx, 0.0, -0.5 + 0.5 * gz / sz)
        else:
            gx = gz = float(fov_mm) / size
            # Centred: the middle of the slice grid is the middle of the volume.
            first = ((nx - 1) / 2 - (size - 1) / 2 * gx / sx, 0.0, (nz - 1) / 2 - (size - 1) / 2 * gz / sz)
        origin = np.asarray(canonical.origin) + direction @ (np.asarray(first) * np.asarray(canonical.spacing))
        grid = Geometry((int(size), ny, int(size)), (gx, sy, gz), tuple(float(v) for v in origin),
                        canonical.direction)
        return cls(Geometry.of(image), canonical, grid, size)

    # ---- volume -> slices

    def _check(self, image: sitk.Image, what: str) -> None:
        mismatch = geometry_mismatch(image, self.original, names=(f"this {what}", "the grid's"))
        if mismatch:
            raise VaeudaError(f"{what}: geometry does not match the image the slice grid was made for ({mismatch}).")

    def _to_grid(self, image: sitk.Image, interpolator: int) -> np.ndarray:
        """Image (any orientation: resampling works in physical space) -> grid array
        (size, n_slices, size), i.e. (z, y, x). Outside the image, the nearest edge value, for
        labels as for images: beyond a field of view wider than the volume, and in the corners of an
        oblique volume's bounding box. Measured on a demo CT tilted 30 degrees (Docs/engine-contract.md),
        filling the corners with the lowest value instead lowered the agreement with the untilted
        scan's segmentation (0.98 to 0.89 about y), and background labels under repeated image
        values would teach the model that tissue there is background."""
        return sitk.GetArrayFromImage(self.grid.resampler(interpolator).Execute(image))

    @staticmethod
    def _planes(grid_array: np.ndarray) -> np.ndarray:
        """Grid array (z, y, x) -> coronal planes (n_slices, size, size), rows superior -> inferior (a view)."""
        return grid_array[::-1].swapaxes(0, 1)

    def image_slices(self, image: sitk.Image, normalisation: Mapping = DEFAULT_NORMALISATION) -> np.ndarray:
        """Model input ``(n_slices, 3, size, size)`` float32: channel 1 is coronal slice ``j``,
        channels 0 and 2 its neighbours ``j-1`` and ``j+1`` (edges repeat). The whole volume is
        normalised with ``normalisation`` (see :func:`normalise`) before it is resampled
        (linearly) and cut."""
        self._check(image, "image")
        normalised = normalised_image(image, normalisation)
        # Resampled straight from the input's own grid: trilinear interpolation does not depend
        # on axis order or direction, so this equals resampling the LPS copy, minus the copy.
        grid_array = self._to_grid(normalised, sitk.sitkLinear)
        del normalised
        return self._with_neighbours(grid_array)

    def resampled_slices(self, image: sitk.Image) -> np.ndarray:
        """As :meth:`image_slices`, of an image that is already normalised: ``(n_slices, 3, size,
        size)`` float32. ``image`` may lie anywhere in physical space (on another volume's grid,
        e.g.); outside it the nearest edge value is repeated."""
        return self._with_neighbours(self._to_grid(image, sitk.sitkLinear))

    def _with_neighbours(self, grid_array: np.ndarray) -> np.ndarray:
        """Grid array (z, y, x) -> (n_slices, 3, size, size): each coronal plane between its neighbours."""
        n = self.n_slices
        out = np.empty((n, 3, self.size, self.size), dtype=np.float32)
        planes = self._planes(grid_array)
        out[:, 1] = planes
        out[1:, 0] = planes[:-1]
        out[0, 0] = planes[0]
        out[:-1, 2] = planes[1:]
        out[-1, 2] = planes[-1]
        return out

    def label_slices(self, classes_image: sitk.Image) -> np.ndarray:
        """Training targets ``(n_slices, size, size)`` uint8: the class-index image cut like
        :meth:`image_slices` (middle slice only), nearest-neighbour resampled."""
        self._check(classes_image, "label")
        canonical = to_canonical(sitk.Cast(classes_image, sitk.sitkUInt8))
        grid_array = self._to_grid(canonical, sitk.sitkNearestNeighbor)
        return np.ascontiguousarray(self._planes(grid_array))

    # ---- scores -> volume

    def _score_volumes(self, scores: Union[np.ndarray, ScoreChunks]):
        """(number of classes, function class -> grid array (z, y, x) of that class's scores)."""
        n, s = self.n_slices, self.size
        if isinstance(scores, np.ndarray):
            if scores.ndim != 4 or scores.shape[0] != n or scores.shape[2:] != (s, s):
                raise ValueError(f"scores must be ({n}, C, {s}, {s}), got {scores.shape}")

            def class_volume(c: int) -> np.ndarray:
                grid = np.empty((s, n, s), dtype=np.float32)
                grid[::-1] = scores[:, c].swapaxes(0, 1)  # (n, rows, x) -> (rows, n, x), rows flipped to z
                return grid
            return scores.shape[1], class_volume

        # Chunks arrive once, in any order: gather them in grid layout, class first,
        # keeping their dtype (float16 halves the memory).
        buffer = None
        seen = np.zeros(n, dtype=bool)
        for start, batch in scores:
            batch = np.asarray(batch)
            if batch.ndim != 4 or batch.shape[2:] != (s, s) or not 0 <= start <= n - batch.shape[0]:
                raise ValueError(f"score chunk at {start} of shape {batch.shape} does not fit ({n}, C, {s}, {s})")
            if buffer is None:
                dtype = np.float16 if batch.dtype == np.float16 else np.float32
                buffer = np.zeros((batch.shape[1], s, n, s), dtype=dtype)
            elif batch.shape[1] != buffer.shape[0]:
                raise ValueError(f"score chunk at {start} has {batch.shape[1]} classes, earlier ones {buffer.shape[0]}")
            stop = start + batch.shape[0]
            buffer[:, ::-1, start:stop, :] = batch.transpose(1, 2, 0, 3)  # (b, C, rows, x) -> (C, rows, b, x)
            seen[start:stop] = True
        if buffer is None or not seen.all():
            missing = np.flatnonzero(~seen)
            raise ValueError(f"scores for {missing.size} of {n} slices are missing (first: {missing[:1].tolist()})")
        return buffer.shape[0], lambda c: buffer[c].astype(np.float32)

    def scores_to_image(self, scores: Union[np.ndarray, ScoreChunks]) -> sitk.Image:
        """Per-class scores on the slices -> uint8 class-index image on exactly the input grid.

        ``scores``: ``(n_slices, C, size, size)`` float (float16 or float32: probabilities or
        logits), or an iterable of ``(start_slice, (b, C, size, size))`` chunks covering every
        slice once. Each class is resampled linearly onto the canonical grid in turn while a
        running max/argmax is kept, so memory holds a few input-sized volumes, not C of them.
        The argmax is then put back on the input's own grid (a permutation/flip: exact). Voxels
        outside the slices' field of view (see :meth:`from_image`) are background.
        """
        n_classes, class_volume = self._score_volumes(scores)
        to_canonical_grid = self.canonical.resampler(sitk.sitkLinear)
        best = labels = None
        for c in range(n_classes):
            grid_image = self.grid.stamp(sitk.GetImageFromArray(class_volume(c)))
            resampled_image = to_canonical_grid.Execute(grid_image)
            del grid_image
            if best is None:
                best = sitk.GetArrayFromImage(resampled_image)  # owns its memory: it is updated in place
                labels = np.zeros(best.shape, dtype=np.uint8)
            else:
                resampled = sitk.GetArrayViewFromImage(resampled_image)
                better = resampled > best  # strict: ties keep the lower class
                labels[better] = c
                np.maximum(best, resampled, out=best)
                del resampled, better
            del resampled_image
        del best
        # Outside the slices' field of view (a volume taller or wider than it) the model saw
        # nothing: background there, not the edge row's classes repeated outwards.
        ones = self.grid.stamp(sitk.Image([int(v) for v in self.grid.size], sitk.sitkUInt8) + 1)
        seen = self.canonical.resampler(sitk.sitkNearestNeighbor, extrapolate=False).Execute(ones)
        labels[sitk.GetArrayViewFromImage(seen) == 0] = 0
        del ones, seen
        canonical_labels = self.canonical.stamp(sitk.GetImageFromArray(labels))
        del labels
        # Canonical voxel centres coincide with the input's, so nearest neighbour is exact,
        # and it also handles oblique directions, for which DICOMOrient only picks the nearest axes.
        return self.original.resampler(sitk.sitkNearestNeighbor).Execute(canonical_labels)
