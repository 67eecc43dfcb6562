"""Finding volumes on disk and turning them into in-memory stacks of model input slices."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import VaeudaError
from .fileio import VOLUME_SUFFIXES, file_identity, full_suffix, is_volume_file, require_readable, stem, without_role
from .labels import MMWHS, Convention

def _label_for(image: Path, labels_option: bool = True) -> Path:
    """``X_image.ext`` -> ``X_label.ext`` (the MM-WHS convention), the role in any case: the
    ``_label`` file spelt as the ``_image`` one is (``X_IMAGE`` -> ``X_LABEL``), else the one file
    beside it whose name differs from that only in case. ``labels_option``: whether the command
    has ``--labels`` to suggest."""
    base = without_role(stem(image), "_image")
    if base is None and without_role(stem(image), "_label") is not None:
        raise VaeudaError(f"{image}: is a label file; give the images (X_image{full_suffix(image)}), and each finds "
                          f"its X_label{full_suffix(image)} beside it.")
    if base is None and image.is_dir():     # find_images took a folder without volume files as a DICOM series
        raise VaeudaError(f"{image}: folder holds no image volumes with labels (X_image beside X_label); its other "
                          f"files, read as one DICOM series, have no label file"
                          f"{': pass one with --labels' if labels_option else ''}.")
    if base is None:
        raise VaeudaError(f"{image}: cannot find its label: name it X_image{full_suffix(image)} beside "
                          f"X_label{full_suffix(image)}{', or pass --labels' if labels_option else ''}.")
    role = stem(image)[len(base):]
    label = image.with_name(base + "".join(c.upper() if r.isupper() else c for r, c in zip(role, "_label"))
                            + full_suffix(image))
    if not label.exists() and image.parent.is_dir():
        same = [q for q in image.parent.iterdir() if q.name.lower() == label.name.lower()]
        if len(same) == 1:
            return same[0]
    return label


def find_images(inputs: Sequence[str]) -> List[Path]:
    """Files as given; a folder means its ``*_image.*`` volumes (or, without such names, all volumes).

    DICOM series folders (no volume files, but files inside) are returned as folders.
    """
    found: List[Path] = []
    for item in inputs:
        p = Path(item)
        try:
            present = p.exists()
        except PermissionError as exc:      # a folder on its way may not be entered
            raise VaeudaError(f"{p}: cannot be read ({exc.strerror}).") from None
        if present:
            require_readable(p)             # (the OS's reason in the same sentence, before iterdir's bare one)
        if p.is_dir():
            vols = sorted(q for q in p.iterdir() if is_volume_file(q))
            images = [q for q in vols if without_role(stem(q), "_image") is not None]
            chosen = images or [q for q in vols if without_role(stem(q), "_label") is None]
            if not chosen:
                if vols:                  # only *_label volumes: not a DICOM folder
                    raise VaeudaError(f"{p}: folder holds label volumes (*_label) but no image volumes.")
                if any(q.is_file() for q in p.iterdir()):
                    chosen = [p]          # a DICOM series folder
                else:
                    raise VaeudaError(f"{p}: folder holds no image volumes.")
            found.extend(chosen)
        elif present:
            found.append(p)
        else:   # "nodir/" meant a folder (Path drops the slash), "scan.nii.gz" a file; "mr_train" either
            kind = ("folder" if str(item).endswith(("/", os.sep))
                    else "file" if full_suffix(p).lower() in VOLUME_SUFFIXES else "file or folder")
            raise VaeudaError(f"{p}: {kind} not found.")
    if not found:
        raise VaeudaError("no input volumes were given.")
    return found


# What each labelled-volume command trains on in a synthetic cohort: (modality in splits.json, what for)
SOURCE_TRAINING = ("mr", "a source model is trained on its MR training scans")
ORACLE_TRAINING = ("ct", "the oracle is fine-tuned on its CT training scans")


def _refuse_cohort_folder(folder: Path, use: Tuple[str, str]) -> None:
    """A cohort's folder (``vaeuda synth`` writes one: its splits.json lists MR and CT scans, training
    and test) holds the labels of both modalities and of the test scans: given whole to a training
    command it would train on all of them. Refused, naming the scans to give instead, unless the
    folder holds only those."""
    from .demo import read_splits                 # the one reader of a cohort's splits.json
    if not (folder / "splits.json").is_file():
        return
    try:
        splits = read_splits(folder)
    except VaeudaError:
        return                                    # not a cohort's splits.json: a folder like any other
    if not all(isinstance(splits.get(m), dict) for m in ("mr", "ct")):     # (read_splits gives a dict)
        return
    modality, purpose = use
    train = splits[modality].get("train")
    train = train if isinstance(train, list) and all(isinstance(t, str) for t in train) else []
    held = {without_role(stem(q), "_image") or stem(q) for q in folder.iterdir() if is_volume_file(q)
            and without_role(stem(q), "_label") is None}
    if held <= set(train):
        return                                    # only the scans meant for it: nothing else would be trained on
    named = ""
    if train:
        first, last = (folder / f"{t}_image.nii.gz" for t in (train[0], train[-1]))
        named = (f" ({first}, splits.json's \"{modality}\" -> \"train\")" if len(train) == 1 else
                 f" ({first} to {last}, the {len(train)} in splits.json's \"{modality}\" -> \"train\")")
    raise VaeudaError(f"{folder}: is a cohort's folder, whose labelled MR and CT scans, training and test alike, "
                      f"would all be trained on; {purpose}: give those files{named}, or a folder holding only them.")


def find_pairs(inputs: Sequence[str], labels: Optional[Sequence[str]] = None,
               cohort_use: Tuple[str, str] = SOURCE_TRAINING, labels_option: bool = True) -> List[Tuple[Path, Path]]:
    """Labelled volumes: each image with ``--labels`` in the same order, or its ``X_label`` twin.
    ``cohort_use``: which scans a synthetic cohort's folder should have been given as, for its refusal;
    ``labels_option``: whether the command has ``--labels`` to suggest (``--source-data`` has not)."""
    for item in inputs:
        if Path(item).is_dir():
            _refuse_cohort_folder(Path(item), cohort_use)
    images = find_images(inputs)
    if labels:
        folder = next((label for label in labels if Path(label).is_dir()), None)
        if folder is not None:      # (a DICOM label series is not a thing: it would be read as one and fail)
            raise VaeudaError(f"{folder}: is a folder; --labels takes label files, one per image in the same order "
                              f"(or leave --labels out: each X_image file is paired with its X_label file).")
        if len(labels) != len(images):
            raise VaeudaError(f"{len(images)} images but {len(labels)} label files were given; pass one label per image.")
        pairs = [(i, Path(l)) for i, l in zip(images, labels)]
    else:
        pairs = [(i, _label_for(i, labels_option)) for i in images]
    for _, lab in pairs:
        if not lab.exists():
            others = [] if labels or not lab.parent.is_dir() else sorted(
                q.name for q in lab.parent.iterdir() if is_volume_file(q) and stem(q) == stem(lab))
            way_out = "give it with --labels" if labels_option else "store the image and its label in one format"
            hint = f" ({', '.join(others)} is there: {way_out})" if others else ""
            raise VaeudaError(f"{lab}: label file not found{hint}.")
    # one pair twice would count twice in training's sampling, unasked; one image with two raters' labels,
    # or two co-registered images with one label, are pairs of their own
    seen = set()
    for image, label in pairs:
        key = (file_identity(image), file_identity(label))
        if key in seen:
            raise VaeudaError(f"{image}: given twice with the label {label}; give each labelled volume once.")
        seen.add(key)
    return pairs


@dataclass
class SliceSet:
    """Model input slices held in memory.

    images: (N, 3, S, S) float32; labels: (N, S, S) uint8 class indices or None;
    volume_index: (N,) which volume each slice came from; files: the volumes.
    """
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    volume_index: torch.Tensor
    files: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sampling_weights(self, background_weight: float = 0.25) -> torch.Tensor:
        """Slices showing any structure are drawn 1/background_weight times as often as empty ones."""
        if self.labels is None:
            return torch.ones(len(self))
        has_fg = (self.labels.view(len(self), -1) > 0).any(1).float()
        return has_fg + (1 - has_fg) * background_weight


def parse_slice_range(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"A:B"`` -> (A, B), the coronal slices A..B-1; None for all."""
    if not spec:
        return None
    try:
        if not spec.isascii():       # (int() takes other scripts' digits, "٣")
            raise ValueError
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise VaeudaError(f"--slices '{spec}' must look like A:B, for example 60:63.") from None
    if a < 0 or b <= a:
        raise VaeudaError(f"--slices '{spec}' must have 0 <= A < B.")
    return a, b


def load_slices(images: Sequence[Path], size: int, fov_mm: Optional[float], normalisation: dict,
                labels: Optional[Sequence[Path]] = None, convention: Convention = MMWHS,
                slice_range: Optional[Tuple[int, int]] = None) -> SliceSet:
    """Read volumes and cut them into (N, 3, size, size) slices (and (N, size, size) labels).

    ``size``, ``fov_mm``: the slice grid, as ``volumes.SliceGrid.from_image``."""
    from . import volumes

    all_images, all_labels, index = [], [], []
    for k, path in enumerate(images):
        image = volumes.read_image(path)
        grid = volumes.SliceGrid.from_image(image, size, fov_mm)
        x = grid.image_slices(image, normalisation)
        y = None
        if labels is not None:
            lab = volumes.read_label(labels[k], convention, reference=image, reference_name=str(path))
            y = grid.label_slices(lab)
        if slice_range is not None:
            a, b = slice_range
            if b > x.shape[0]:
                raise VaeudaError(f"{path}: --slices {a}:{b} is outside its {x.shape[0]} coronal slices.")
            x = x[a:b]
            y = None if y is None else y[a:b]
        all_images.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if y is not None:
            all_labels.append(torch.from_numpy(np.ascontiguousarray(y, dtype=np.uint8)))
        index.append(torch.full((x.shape[0],), k, dtype=torch.int32))
    return SliceSet(torch.cat(all_images), torch.cat(all_labels) if labels is not None else None,
                    torch.cat(index), [str(p) for p in images])
