"""The one table of segmented structures, and the label-value conventions.

Everything that needs a structure's name, value or colour reads it from here: the engine,
the reports, the Slicer module (which imports this file directly) and the docs.

Class indices inside the engine are always consecutive: 0 background, 1..4 the structures
in the order of :data:`STRUCTURES`. A *convention* maps the values found in label files to
these indices and back.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import VaeudaError


@dataclass(frozen=True)
class Structure:
    index: int          # class index inside the engine (1..4)
    key: str            # short column name, as the paper's Table 1
    name: str           # segment name shown to users
    mmwhs_value: int    # value in MM-WHS label files
    color: Tuple[float, float, float]  # RGB in 0..1, as Slicer segments use
    snomed_code: str    # SNOMED CT code of the anatomic structure (terminology entry)
    snomed_meaning: str  # the code's meaning, as DICOM lists it (not the segment name)


STRUCTURES: Tuple[Structure, ...] = (
    Structure(1, "LV-M", "LV myocardium", 205, (0.85, 0.55, 0.25), "74281007", "Myocardium"),
    Structure(2, "LA-B", "LA blood cavity", 420, (0.30, 0.60, 0.90), "82471001", "Left atrium"),
    Structure(3, "LV-B", "LV blood cavity", 500, (0.90, 0.25, 0.25), "87878005", "Left ventricle"),
    Structure(4, "A-A", "Ascending aorta", 820, (0.95, 0.85, 0.30), "54247002", "Ascending aorta"),
)
N_CLASSES = 1 + len(STRUCTURES)
CLASS_KEYS = tuple(s.key for s in STRUCTURES)
CLASS_NAMES = ("background",) + tuple(s.name for s in STRUCTURES)

# MM-WHS values of the other annotated structures (RA 550, RV 600, pulmonary artery 850).
# They, and any other value, are background under the MM-WHS convention.
MMWHS_OTHER_VALUES = (550, 600, 850)
# A known slip in the challenge's own files: one MR training label marks part of the LA blood cavity
# 421, not 420. Public MM-WHS pipelines map it to 420; as an unknown value it would be background,
# and that scan's LA would be trained (and scored) as background.
MMWHS_ALIASES = {421: 420}
# The PnP-AdaNet/SIFA released files carry a fifth structure (value 5): their training loaders give it
# no class (ignored), their evaluation counts it as background.
SIFA_IGNORED_VALUE = 5
# More values outside the built-in MM-WHS convention (or a mapping that refuses unknown values) than
# this, and a "label map" is taken for an image given in its place.
MAX_UNKNOWN_VALUES = 32


# ``evaluate``'s note on a reference that holds none of some structures. The Slicer module, which
# says it in its own terms (segment names), recognises the engine's by its start.
REFERENCE_LACKS_NOTE = ("note: the reference {reference} holds no {keys}; scored as empty there (Dice 100 where the "
                        "segmentation is empty too, 0 where it is not)")


def reference_lacks_note(reference: str, keys) -> str:
    return REFERENCE_LACKS_NOTE.format(reference=reference, keys=", ".join(keys))


@dataclass(frozen=True)
class Convention:
    """How raw label-file values map to class indices 0..4.

    ``to_index``: raw value -> class index. ``unknown``: what to do with a value not in
    ``to_index``: "background" (MM-WHS: anything else is background) or "error".
    ``from_index``: class index -> value written to output label files.
    """
    name: str
    to_index: Dict[int, int]
    from_index: Tuple[int, ...]
    unknown: str = "error"

    def to_dict(self) -> dict:
        return {"name": self.name, "to_index": {str(k): v for k, v in self.to_index.items()},
                "from_index": list(self.from_index), "unknown": self.unknown}

    @classmethod
    def from_dict(cls, d: dict) -> "Convention":
        """The convention a model file stores. The built-in MM-WHS one as written before MMWHS_ALIASES
        (which read 421 as background) reads as today's."""
        stored = cls(d["name"], {int(k): int(v) for k, v in d["to_index"].items()},
                     tuple(int(v) for v in d["from_index"]), d.get("unknown", "error"))
        return MMWHS if stored == _MMWHS_BEFORE_ALIASES else stored

    def encode(self, raw: np.ndarray, source: str = "label map", option: str = "--label-convention") -> np.ndarray:
        """Raw label values (any integer array) -> class indices (uint8, same shape).

        Raises VaeudaError naming ``source`` when a value is outside the mapping and the
        convention refuses unknown values, or when the map holds values outside the mapping and
        none of its structures (the whole map must be given, not a crop of it). ``option``: the
        command-line option that chooses this convention, which the sentence names as the way out.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind == "c":       # (numpy would drop the imaginary part, with a warning on stderr)
            raise VaeudaError(f"{source}: label values must be whole numbers, found complex values.")
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
                raise VaeudaError(f"{source}: label values must be whole numbers, found fractional or non-finite values.")
        values = [int(v) for v in np.unique(raw)]   # Python ints: a uint64 beyond int64 is shown as it is
        out = np.zeros(raw.shape, dtype=np.uint8)
        unknown = [int(v) for v in values if int(v) not in self.to_index]
        # a float file's huge whole values read as they were written (1e+300), not as 301 digits
        shown = ", ".join(f"{float(v):g}" if raw.dtype.kind == "f" and abs(v) >= 10**16 else str(v) for v in unknown[:8])
        if len(unknown) > MAX_UNKNOWN_VALUES and (self.unknown == "error" or self == MMWHS):
            # MM-WHS's few stray values become background; hundreds of them are image intensities.
            # A mapping whose author chose "unknown": "background" may mean a map of many labels.
            raise VaeudaError(f"{source}: {len(unknown)} of its values ({shown}, ...) are not in the '{self.name}' "
                              f"label mapping; is it an image rather than a label map?")
        if unknown and self.unknown == "error":
            other = next((c for c in BUILTIN_CONVENTIONS.values() if c.name != self.name
                          and all(int(v) in c.to_index for v in values) and any(c.to_index[int(v)] for v in values)),
                         None)
            if other is not None:   # e.g. MM-WHS files read as consecutive: the way out is the other convention
                raise VaeudaError(f"{source}: label values {shown} are not in the '{self.name}' label mapping; they "
                                  f"are '{other.name}' values: read it with {option} {other.name}.")
            raise VaeudaError(f"{source}: label values {shown} are not in the '{self.name}' label mapping (a "
                              f"{option} JSON file can list them under \"background\" or set "
                              f"\"unknown\": \"background\").")
        if unknown and not any(self.to_index.get(int(v), 0) for v in values):
            # Unknown values are background here (MM-WHS), but a map with no structure at all and
            # values this convention does not know is in another one (1..4 read as MM-WHS): every
            # structure would silently become background, and a score of it 0.
            raise VaeudaError(f"{source}: none of its label values ({shown}) is a structure of the '{self.name}' "
                              f"label mapping; is it in another label convention?")
        for v in values:
            idx = self.to_index.get(int(v), 0)
            if idx:
                out[raw == v] = idx
        return out

    def decode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices -> label-file values (the smallest integer dtype that holds all the
        convention's values: uint8 for MM-WHS's up to 255, uint16 up to 65535, signed ones for
        negative values)."""
        lut = np.asarray(self.from_index, dtype=np.int64)
        lo, hi = int(lut.min()), int(lut.max())
        # not numpy's promotion: a negative value beside one beyond int32 would make it float64
        widths = (np.int8, np.int16, np.int32, np.int64) if lo < 0 else (np.uint8, np.uint16, np.uint32, np.uint64)
        dtype = next(t for t in widths if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        return lut[np.asarray(classes, dtype=np.int64)].astype(dtype)


MMWHS = Convention(
    "mmwhs",
    {0: 0, **{s.mmwhs_value: s.index for s in STRUCTURES}, **{v: 0 for v in MMWHS_OTHER_VALUES},
     **{alias: next(s.index for s in STRUCTURES if s.mmwhs_value == value) for alias, value in MMWHS_ALIASES.items()}},
    (0,) + tuple(s.mmwhs_value for s in STRUCTURES),
    unknown="background",
)
# The built-in MM-WHS convention as model files stored it before MMWHS_ALIASES (Convention.from_dict).
_MMWHS_BEFORE_ALIASES = Convention(MMWHS.name, {k: v for k, v in MMWHS.to_index.items() if k not in MMWHS_ALIASES},
                                   MMWHS.from_index, MMWHS.unknown)
CONSECUTIVE = Convention(
    "consecutive",
    {0: 0, **{s.index: s.index for s in STRUCTURES}, SIFA_IGNORED_VALUE: 0},
    tuple(range(N_CLASSES)),
    unknown="error",
)

# The conventions a --label-convention / --labels value names; any other value is a mapping file.
BUILTIN_CONVENTIONS: Dict[str, Convention] = {"mmwhs": MMWHS, "consecutive": CONSECUTIVE}


def load_convention(spec: Optional[str]) -> Convention:
    """``"mmwhs"`` (default), ``"consecutive"``, or a path to a JSON mapping file.

    The JSON file maps structure keys or names to raw values, with optional background values::

        {"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": [0, 7], "unknown": "error"}
    """
    if spec in (None, ""):
        return MMWHS
    if spec in BUILTIN_CONVENTIONS:
        return BUILTIN_CONVENTIONS[spec]
    path = Path(spec)
    if not path.is_file():
        raise VaeudaError(f"{spec}: label mapping is neither 'mmwhs', 'consecutive' nor an existing JSON file.")
    def once(pairs):      # json keeps a repeated key's last value without a word
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise VaeudaError(f"{path}: '{repeated}' is given twice in the label mapping; give each key once.")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=once)
    except (OSError, ValueError, RecursionError) as exc:    # (RecursionError: nested too deep)
        raise VaeudaError(f"{path}: label mapping file is not valid JSON ({exc}).") from None
    lookup = {}
    for s in STRUCTURES:
        lookup[s.key.lower()] = s
        lookup[s.name.lower()] = s
    if not isinstance(data, dict):
        raise VaeudaError(f"{path}: label mapping must be a JSON object of structure -> value.")

    def whole(value, key):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value)):
            raise VaeudaError(f"{path}: the value of '{key}' must be a whole number, not {value!r}.")
        if not -2**63 <= int(value) < 2**63:   # what a label file's widest integer type holds
            raise VaeudaError(f"{path}: the value of '{key}' ({int(value)}) does not fit a 64-bit label file.")
        return int(value)

    background = data.get("background", [0])
    if not isinstance(background, list):
        background = [background]
    if not background:
        raise VaeudaError(f"{path}: 'background' must give at least one value (the first is what background is written as).")
    to_index: Dict[int, int] = {whole(v, "background"): 0 for v in background}
    owner = {v: "background" for v in to_index}        # value -> who has it: one value, one meaning
    from_index: List[Optional[int]] = [int(background[0])] + [None] * (N_CLASSES - 1)
    for key, value in data.items():
        if key in ("background", "unknown"):
            continue
        s = lookup.get(key.lower())
        if s is None:
            raise VaeudaError(f"{path}: '{key}' is not one of the structures {', '.join(CLASS_KEYS)}.")
        if from_index[s.index] is not None:
            raise VaeudaError(f"{path}: '{key}' gives {s.key} a second value.")
        v = whole(value, key)
        if v in owner:
            raise VaeudaError(f"{path}: '{key}' and '{owner[v]}' have the same value {v}; "
                              f"each structure and the background need values of their own.")
        owner[v] = key
        to_index[v] = s.index
        from_index[s.index] = v
    missing = [s.key for s in STRUCTURES if from_index[s.index] is None]
    if missing:
        raise VaeudaError(f"{path}: label mapping gives no value for {', '.join(missing)}.")
    unknown = data.get("unknown", "error")
    if unknown not in ("error", "background"):
        raise VaeudaError(f"{path}: 'unknown' must be 'error' or 'background', not '{unknown}'.")
    # named by the file's name, extension included: a mapping file called mmwhs.json is not the built-in 'mmwhs'
    return Convention(path.name, to_index, tuple(from_index), unknown)
