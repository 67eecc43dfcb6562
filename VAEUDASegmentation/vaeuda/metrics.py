"""Segmentation metrics as the paper reports them: Dice and ASSD on the largest 3D component.

Ouyang et al. (MICCAI 2019), Sec. 3: "The Dice score, and average symmetric surface distance
(ASSD) of the largest 3D connected component for each label class". Here, for every structure
of :data:`labels.STRUCTURES`, the prediction mask is reduced to its largest 3D connected
component (26-connectivity, as MONAI's ``KeepLargestConnectedComponent`` and scikit-image's
``label`` default to), post-processing of the segmentation; the reference is scored as drawn, so
a piece of it the prediction misses counts against the prediction. Then:

* **Dice** = 2 |P n R| / (|P| + |R|).
* **ASSD** as ``medpy.metric.binary.assd`` up to medpy 0.4 (the definition the MM-WHS-based papers
  used; medpy 0.5 pools both surfaces' distances instead, as MONAI does): the mean of the two
  directed average surface distances,
  ``ASSD = (mean_{p in S(P)} d(p, S(R)) + mean_{r in S(R)} d(r, S(P))) / 2``,
  where the surface ``S(M)`` is the voxels of ``M`` with at least one 6-neighbour outside ``M``
  (``M xor erode(M)``, voxels on the array border count as surface) and ``d`` is the Euclidean
  distance between voxel centres. It is given in millimetres (``assd_mm``, voxel spacing) and
  in voxels (``assd_vox``, spacing 1), the unit of the paper's Table 1.

Empty masks:

* both empty: Dice 1.0, ASSD 0.0 (a correct "absent");
* exactly one empty: Dice 0.0, ASSD NaN (undefined). NaN ASSDs are left out of the ASSD
  means and standard deviations but counted: every summary cell carries ``n`` (values used)
  and ``n_missing`` (NaNs left out). JSON writes NaN as ``null``; tables mark such cells.

Summaries (:func:`summarise`): per structure, mean and standard deviation over volumes. The
"Mean" column is the mean over all structure x volume entries (equal to the mean over volumes
of each volume's 4-structure mean when nothing is missing) and its std is the std over all
those entries. This reproduces the paper's Table 1, whose "Mean" std is not the spread of
per-volume means: e.g. the Oracle row's Dice Mean std 7.11 follows exactly from its
per-structure means and stds only under the pooled definition. All stds are population stds
(``ddof=0``, numpy's default), which that reconstruction also confirms. The std of per-volume
means is reported beside it as ``std_of_volume_means``.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import fileio
from . import volumes as vol
from .errors import VaeudaError
from .labels import CLASS_KEYS, STRUCTURES, Convention

CONNECTIVITY = 26                 # neighbourhood of the largest-component step (3D)
METRICS = ("dice", "assd_mm", "assd_vox")
MEAN_KEY = "Mean"
METRIC_HEADERS = {"dice": "Dice [%]", "assd_vox": "ASSD [voxel]", "assd_mm": "ASSD [mm]"}
# the units of the values as evaluate_volume and summarise give them (the tables show Dice in percent)
METRIC_UNITS = {"dice": "fraction (0-1)", "assd_vox": "voxel", "assd_mm": "mm"}
MISSING_MARK = "\u2020"           # dagger: cell averages over fewer volumes (some ASSD undefined)


# ----------------------------------------------------------------------------- masks and metrics

def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a 3D boolean mask.

    ``mask``: bool ``(Z, Y, X)``. Returns a bool array of the same shape; an empty mask comes
    back empty. Ties go to the component met first in C (z, y, x) scan order.
    """
    mask = np.asarray(mask, dtype=bool)
    full = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # 26-neighbourhood in 3D
    components, count = ndimage.label(mask, structure=full)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap of two boolean masks of equal shape; 1.0 when both are empty."""
    pred, ref = _as_mask_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (medpy 0.4's definition) of two boolean masks.

    ``pred``, ``ref``: bool arrays of equal shape, e.g. ``(Z, Y, X)``. ``spacing``: voxel size
    per array axis in the same order (``(1, 1, 1)`` gives voxels). Returns the mean of the two
    directed average surface distances in the units of ``spacing``; 0.0 when both masks are
    empty, NaN when exactly one is.
    """
    pred, ref = _as_mask_pair(pred, ref)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {pred.ndim}-D mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return float("nan")
    # Distances only involve the two masks: work in their joint bounding box (exact: a mask voxel
    # on the box's faces has a neighbour outside the box, so it is surface either way; much
    # cheaper on big scans).
    box = _bounding_box(pred | ref)
    pred, ref = pred[box], ref[box]
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float((to_ref.mean() + to_pred.mean()) / 2.0)


def evaluate_volume(pred_classes: np.ndarray, ref_classes: np.ndarray,
                    spacing_zyx: Sequence[float]) -> Dict[str, Dict[str, float]]:
    """Dice and ASSD of every structure: the prediction's largest component against the whole reference.

    ``pred_classes``, ``ref_classes``: integer class indices ``(Z, Y, X)`` (0 background, 1..4 as
    :data:`labels.STRUCTURES`). ``spacing_zyx``: voxel size in mm in array order (SimpleITK's
    ``GetSpacing()`` reversed). Returns ``{"LV-M": {"dice", "assd_mm", "assd_vox"}, ...}`` in
    STRUCTURES order; ASSD is NaN where exactly one of the two masks is empty.
    """
    pred_classes, ref_classes = np.asarray(pred_classes), np.asarray(ref_classes)
    if pred_classes.shape != ref_classes.shape or pred_classes.ndim != 3:
        raise VaeudaError(f"prediction shape {pred_classes.shape} and reference shape {ref_classes.shape} "
                          "must be the same 3D shape.")
    result: Dict[str, Dict[str, float]] = OrderedDict()
    for s in STRUCTURES:
        pred = largest_component(pred_classes == s.index)
        ref = ref_classes == s.index          # the ground truth is never edited
        result[s.key] = {
            "dice": dice(pred, ref),
            "assd_mm": assd(pred, ref, spacing_zyx),
            "assd_vox": assd(pred, ref, (1.0,) * 3),
        }
    return result


# ----------------------------------------------------------------------------- summaries, tables

def summarise(per_volume: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Mean and std over volumes, per structure and for the "Mean" column.

    ``per_volume``: results of :func:`evaluate_volume`. Returns, for each structure key and
    ``"Mean"``, ``{metric: {"mean", "std", "n", "n_missing"}}`` for metric in
    ``dice, assd_mm, assd_vox``. The "Mean" cell pools all structure x volume entries (mean and
    population std over them, as the paper's Table 1) and adds ``std_of_volume_means``, the std
    over volumes of each volume's structure mean. NaNs (undefined ASSD) are left out of means and
    stds and counted in ``n_missing``; a cell with no value has mean and std NaN.
    """
    if not per_volume:
        raise VaeudaError("there are no evaluated volumes to summarise.")
    summary: Dict[str, Dict[str, dict]] = OrderedDict()
    for key in CLASS_KEYS:
        summary[key] = {m: _stats([vol[key][m] for vol in per_volume]) for m in METRICS}
    summary[MEAN_KEY] = {}
    for m in METRICS:
        table = np.array([[vol[key][m] for key in CLASS_KEYS] for vol in per_volume], dtype=float)
        cell = _stats(table.ravel())
        volume_means = [float(np.mean(row[~np.isnan(row)])) for row in table if (~np.isnan(row)).any()]
        cell["std_of_volume_means"] = float(np.std(volume_means)) if volume_means else float("nan")
        summary[MEAN_KEY][m] = cell
    return summary


def table_markdown(rows: "OrderedDict[str, dict]", metrics: Sequence[str] = ("dice", "assd_vox")) -> str:
    """Table 1 of the paper as Markdown: one row per run (or volume), cells "mean (std)".

    ``rows``: row name -> a :func:`summarise` result (cells "mean (std)"), or one
    :func:`evaluate_volume` result (cells are plain values, Mean the mean over its structures).
    ``metrics``: column groups, among
    ``dice`` (Dice [%]), ``assd_vox`` (ASSD [voxel]) and ``assd_mm`` (ASSD [mm]); each group has the
    columns LV-M, LA-B, LV-B, A-A, Mean. Dice is shown in percent, everything with 2 decimals. The
    first line names the groups, the first body line the structures. A cell averaged over fewer
    volumes because some ASSDs are undefined carries a dagger, explained under the table; a cell
    with no value reads "n/a".
    """
    for m in metrics:
        if m not in METRIC_HEADERS:
            raise ValueError(f"unknown metric {m!r}; expected one of {', '.join(METRIC_HEADERS)}")
    columns = list(CLASS_KEYS) + [MEAN_KEY]
    group_row, align_row, key_row = [""], ["---"], ["**Structure**"]
    for m in metrics:
        group_row += [METRIC_HEADERS[m]] + [""] * (len(columns) - 1)
        align_row += ["---:"] * len(columns)
        key_row += [f"**{c}**" for c in columns]
    lines = [_md_row(group_row), _md_row(align_row), _md_row(key_row)]
    any_missing = False
    for name, row in rows.items():
        one_volume = MEAN_KEY not in row
        summary = summarise([row]) if one_volume else row
        cells = [str(name)]
        for m in metrics:
            scale = 100.0 if m == "dice" else 1.0
            for c in columns:
                stat = summary[c][m]
                missing = stat.get("n_missing", 0) if stat["n"] else 0
                # a std of one value is no spread: shown without one
                text = _format_cell(stat["mean"], None if one_volume or (missing and stat["n"] == 1) else stat["std"],
                                    scale)
                if missing:
                    text += f" {MISSING_MARK}{stat['n']}/{stat['n'] + missing}"
                    any_missing = True
                cells.append(text)
        lines.append(_md_row(cells))
    if any_missing:
        lines += ["", f"{MISSING_MARK}k/N: ASSD defined for k of the N values (it is undefined where a structure is "
                      "empty in the prediction or in the reference only), averaged over those k: a model that finds "
                      "a structure in few volumes is scored on those alone."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- folders

def pairing_key(path) -> str:
    """The name two files are paired on: stem, minus a trailing ``_seg``, minus ``_image``/``_label``
    (each in any case, :func:`fileio.without_role`)."""
    key = fileio.stem(path)
    for roles in (("_seg",), ("_image", "_label")):
        for role in roles:
            base = fileio.without_role(key, role)
            if base is not None:
                key = base
                break
    return key


def _for_predictions(message: str, convention: Convention, option_given: bool) -> str:
    """A segmentation's label error (naming --pred-label-convention) once its reference read: without
    that option, say how the references read, which the segmentations were read as too."""
    if option_given:
        return message
    given = f"the references read with --label-convention {convention.name}"
    if "read it with --pred-label-convention" in message:        # the values are another built-in's
        return f"{message.rstrip('.')} ({given})."
    if message.endswith("is it in another label convention?"):
        return f"{message} {given[0].upper()}{given[1:]}; give the segmentations' own with --pred-label-convention."
    return message


def evaluate_dirs(pred_dir, ref_dir, convention: Convention, json_path=None, ignore_unmatched_refs: bool = False,
                  pred_convention: Optional[Convention] = None) -> Tuple[str, dict]:
    """Score every prediction in ``pred_dir`` against its reference in ``ref_dir``.

    Pairing by file name: a name's *key* is its stem (no extension) with a trailing ``_seg``
    removed, then a trailing ``_image`` or ``_label`` removed. ``ct_1017_image_seg.nii.gz`` and
    ``ct_1017_label.nii.gz`` share the key ``ct_1017``; so do ``case7_seg.nrrd`` and ``case7.nrrd``.
    Image files only (``.nii.gz .nii .nrrd .nhdr .mha .mhd``, hidden files skipped); if any file
    in ``ref_dir`` has a stem ending in ``_label``, only those are references (a cohort folder's
    ``_image`` files are skipped). Both folders are read with ``convention``, unless
    ``pred_convention`` gives the predictions' own (a model's labels in other values than the references').

    Raises VaeudaError for an empty folder, two files with one key, a prediction without
    reference, a reference without prediction (unless ``ignore_unmatched_refs``), differing
    geometry (size, spacing, origin, direction) and unreadable files; nothing is written then.

    Returns ``(markdown, result)``: a table with one row per volume and a last row over all
    volumes (Dice [%], ASSD [voxel], ASSD [mm]), and the JSON-able dict
    ``{"convention", "pred_convention", "connectivity", "n_volumes", "volumes": [{"name", "pred", "ref",
    "spacing_zyx", "metrics"}], "summary", "unscored_references", "references_lacking"}`` with NaN as
    ``None`` (``unscored_references``: the references skipped for want of a prediction;
    ``references_lacking``: reference path -> the structure keys it does not hold, scored as empty
    there). ``json_path``: also write the dict there, atomically.
    """
    preds = _keyed_files(Path(pred_dir), "prediction")
    refs = _keyed_files(Path(ref_dir), "reference")
    for key, path in preds.items():
        if key not in refs:
            raise VaeudaError(f"{path}: prediction has no reference named '{key}' (or '{key}_label') in {ref_dir}.")
    if not ignore_unmatched_refs:
        for key, path in refs.items():
            if key not in preds:
                raise VaeudaError(f"{path}: reference has no prediction named '{key}_seg' or '{key}_image_seg' "
                                  f"in {pred_dir}.")
    if json_path is not None:
        fileio.check_output_file(json_path, [*preds.values(), *refs.values()])
    pred_convention_given = pred_convention is not None
    pred_convention = pred_convention or convention
    volumes, per_volume, lacking = [], [], {}
    for key in sorted(preds):
        ref_image = vol.read_label(refs[key], convention)
        held = set(np.unique(sitk.GetArrayViewFromImage(ref_image)).tolist())
        if not held.issuperset(s.index for s in STRUCTURES):
            lacking[str(refs[key])] = [s.key for s in STRUCTURES if s.index not in held]
        try:
            pred_image = vol.read_label(preds[key], pred_convention, option="--pred-label-convention")
        except VaeudaError as exc:    # the reference read: the way out is the segmentations' own option
            raise VaeudaError(_for_predictions(str(exc), convention, pred_convention_given)) from None
        mismatch = vol.geometry_mismatch(pred_image, ref_image, names=("prediction", "reference"))
        if mismatch:
            raise VaeudaError(f"{preds[key]} and {refs[key]}: prediction and reference differ in {mismatch}.")
        spacing_zyx = tuple(reversed(ref_image.GetSpacing()))
        scores = evaluate_volume(sitk.GetArrayViewFromImage(pred_image), sitk.GetArrayViewFromImage(ref_image),
                                 spacing_zyx)
        per_volume.append(scores)
        volumes.append({"name": key, "pred": str(preds[key]), "ref": str(refs[key]),
                        "spacing_zyx": list(spacing_zyx), "metrics": scores})
    summary = summarise(per_volume)
    rows: "OrderedDict[str, dict]" = OrderedDict((v["name"], v["metrics"]) for v in volumes)
    rows[f"All ({len(volumes)} volume{'' if len(volumes) == 1 else 's'})"] = summary
    markdown = table_markdown(rows, metrics=("dice", "assd_vox", "assd_mm"))
    unscored = [str(path) for key, path in sorted(refs.items()) if key not in preds]
    result = _json_ready({"convention": convention.name, "pred_convention": pred_convention.name,
                          "connectivity": CONNECTIVITY,
                          "n_volumes": len(volumes), "volumes": volumes, "summary": summary,
                          "unscored_references": unscored, "references_lacking": lacking})
    if json_path is not None:
        text = json.dumps(result, indent=2, allow_nan=False) + "\n"
        with fileio.atomic_path(json_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return markdown, result


# ----------------------------------------------------------------------------- helpers

def _as_mask_pair(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    return pred, ref


def _bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """Slices of the smallest box holding the non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (outside the array counts as outside)."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _stats(values) -> dict:
    """Mean, population std, count and NaN count of a list of floats."""
    values = np.asarray(values, dtype=float).ravel()
    present = values[~np.isnan(values)]
    n = int(present.size)
    return {"mean": float(present.mean()) if n else float("nan"),
            "std": float(present.std()) if n else float("nan"),
            "n": n, "n_missing": int(values.size - n)}


def _format_cell(mean: Optional[float], std: Optional[float], scale: float) -> str:
    """``"75.00 (0.00)"``; without ``std`` just ``"75.00"``; ``"n/a"`` for NaN or None (NaN read back from JSON)."""
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.2f}" if std is None else f"{mean * scale:.2f} ({std * scale:.2f})"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _json_ready(value):
    """Copy of ``value`` with tuples as lists, numpy scalars as Python numbers, NaN as None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _keyed_files(folder: Path, role: str) -> Dict[str, Path]:
    """Image files of ``folder`` by pairing key; VaeudaError if missing, empty or ambiguous."""
    if folder.is_file():
        raise VaeudaError(f"{folder}: is a file; give the {role} folder that holds it (files are paired by name).")
    if not folder.is_dir():
        raise VaeudaError(f"{folder}: {role} folder not found.")
    files = sorted(p for p in folder.iterdir() if fileio.is_volume_file(p))
    if not files:
        raise VaeudaError(f"{folder}: {role} folder holds no image files ({', '.join(fileio.VOLUME_SUFFIXES)}).")
    keyed: Dict[str, Path] = {}
    labelled_only = role == "reference" and any(fileio.without_role(fileio.stem(p), "_label") is not None
                                                for p in files)
    for path in files:
        if labelled_only and fileio.without_role(fileio.stem(path), "_label") is None:
            continue
        key = pairing_key(path)
        if key in keyed:
            raise VaeudaError(f"{path}: {role} file pairs under the same name '{key}' as {keyed[key].name}; "
                              "keep one of them.")
        keyed[key] = path
    return keyed
