"""Segmenting volumes with a model file, in bounded memory.

Slices go through the network in batches; class probabilities are kept as float16
(N, C, S, S) on the model's slice grid (never at the input's resolution), then resampled
class by class onto the exact input grid and arg-maxed (``volumes.SliceGrid.scores_to_image``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .choices import DOMAINS, check_choice
from .errors import VaeudaError, require_count
from .fileio import (MAX_NAME_BYTES, MAX_OUTPUT_NAME_BYTES, atomic_dir, check_output_dir, file_identity,
                     require_file, same_file, stem)
from .labels import Convention
from .modelfile import load_model
from .nets import VAEUDANet
from .progress import Reporter, listed, null_reporter
from .train import resolve_device


def model_domain(meta: dict) -> str:
    """The encoder to segment with: the target one after adaptation, else the source one (unadapted)."""
    return "target" if meta.get("has_target_encoder") else "source"


def check_domain(meta: dict, domain: Optional[str], model_path="the model") -> str:
    """The encoder to segment with: ``domain`` if given and usable, else :func:`model_domain`.
    Only adaptation trains E_T; in a source or fine-tuned model it holds its random initial weights."""
    if domain is None:
        return model_domain(meta)
    check_choice("--domain", domain, DOMAINS)
    if domain == "target" and not meta.get("has_target_encoder"):
        raise VaeudaError(f"{model_path}: a {meta.get('stage', 'non-adapted')} model has no trained target encoder; "
                          "segment with --domain source or adapt it first.")
    return domain


def slice_probabilities(net: VAEUDANet, slices: np.ndarray, domain: str, device: torch.device,
                        batch_size: int = 16, cpu_bf16: bool = False) -> np.ndarray:
    """slices (N, 3, S, S) float32 -> softmax probabilities (N, C, S, S) float16.

    bf16 autocast always on CUDA; on the CPU only with ``cpu_bf16`` (opt-in: 1.6-1.9x faster where
    the CPU has native bf16, AVX512-BF16 or AMX, slower where it is emulated, and a few voxels
    may change label; Docs/benchmarks.md).
    """
    require_count("--batch-size", batch_size)
    net.eval()
    out = np.empty((slices.shape[0], net.cfg.n_classes) + slices.shape[2:], dtype=np.float16)
    use_bf16 = device.type == "cuda" or (cpu_bf16 and device.type == "cpu")
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for start in range(0, slices.shape[0], batch_size):
            x = torch.from_numpy(slices[start:start + batch_size]).to(device)
            logits = net.segment_logits(x, domain).float()
            out[start:start + x.shape[0]] = torch.softmax(logits, 1).cpu().numpy().astype(np.float16)
    return out


def segment_image(net: VAEUDANet, meta: dict, image: sitk.Image, device: torch.device,
                  domain: Optional[str] = None, batch_size: int = 16, cpu_bf16: bool = False) -> sitk.Image:
    """image (any 3D grid) -> class-index image (uint8, 0..4) on exactly the same grid."""
    from .volumes import SliceGrid

    grid = SliceGrid.from_image(image, net.cfg.input_size, net.cfg.slice_fov_mm)
    slices = grid.image_slices(image, meta["normalisation"])
    probs = slice_probabilities(net, slices, check_domain(meta, domain), device, batch_size, cpu_bf16)
    return grid.scores_to_image(probs)


def output_path(out_dir, input_path) -> Path:
    """``DIR/<input file name without extension>_seg.nii.gz``. The name as given, made absolute
    without following links (a DICOM folder given as ``.`` is named by the folder; a link into an
    annexed store by the link, not by the store's hashed file). A folder keeps its whole name (a
    DICOM series UID such as ``1.2.840.55`` has no extension)."""
    absolute = Path(os.path.abspath(input_path))
    return Path(out_dir) / f"{absolute.name if absolute.is_dir() else stem(absolute)}_seg.nii.gz"


def segment_files(model_path, inputs: Sequence[Path], out_dir, device: str = "auto", batch_size: int = 16,
                  domain: Optional[str] = None, reporter: Optional[Reporter] = None,
                  cpu_bf16: bool = False) -> List[Path]:
    """Segment each input volume; write label files with the model's label values. Returns their paths.

    All or nothing: the segmentations are written to a staging folder and moved into ``out_dir``
    only when every input has been segmented. Refused before any work: a missing input, two
    inputs that would write the same file (names that differ only in case included), an output
    that would replace an input, an unusable ``out_dir``, a missing model file; and, before the
    model is loaded, a first input that is no volume (a label map, a single slice).
    """
    from . import volumes

    reporter = reporter or null_reporter()
    require_count("--batch-size", batch_size)   # before the model is loaded
    if domain is not None:
        check_choice("--domain", domain, DOMAINS)
    check_output_dir(out_dir)
    for path in inputs:                         # before the model is loaded and earlier inputs segmented
        volumes.require_existing(path)
    targets = [output_path(out_dir, path) for path in inputs]
    input_files = {file_identity(p) for p in inputs}
    if file_identity(out_dir) in input_files:    # a DICOM series folder: a volume file in it ends the series
        raise VaeudaError(f"{out_dir}: is an input folder (a DICOM series), which is never written to; choose "
                          f"another --out.")
    seen = {}
    for path, target in zip(inputs, targets):
        # Names that differ only in case are one file on macOS and Windows, where Slicer runs too.
        key = target.name.casefold()
        if key in seen:
            first, first_target = seen[key]
            if same_file(first, path):
                raise VaeudaError(f"{path}: given twice; give each input once.")
            if first_target.name == target.name:
                raise VaeudaError(f"{path}: {first} would write the same {target.name}; rename one of them.")
            raise VaeudaError(f"{path}: its {target.name} and the {first_target.name} of {first} are one file where "
                              f"file names ignore case (macOS, Windows); rename one of them.")
        seen[key] = (path, target)
        if len(target.name.encode("utf-8")) > MAX_OUTPUT_NAME_BYTES:    # (and is_dir() would raise for it)
            raise VaeudaError(f"{path}: its segmentation's name ({len(target.name.encode('utf-8'))} bytes with "
                              f"'_seg.nii.gz') is longer than an output's may be ({MAX_OUTPUT_NAME_BYTES}: file "
                              f"systems allow {MAX_NAME_BYTES}, and it is written under a longer temporary name "
                              f"first); give the input a shorter name.")
        if target.is_dir():
            raise VaeudaError(f"{target}: is a folder where the segmentation of {path} would go.")
        if file_identity(target) in input_files:
            raise VaeudaError(f"{target}: the segmentation of {path} would replace this input; choose another --out.")
    dev = resolve_device(device)
    require_file(model_path, "model file")
    # the first input read before the model loads: a wrong one (a label map, one slice) is refused at once
    first_image = volumes.read_image(inputs[0])
    volumes.require_nifti_size(first_image, inputs[0])
    net, meta = load_model(model_path, str(dev))
    convention = Convention.from_dict(meta["labels"]["convention"])
    dom = check_domain(meta, domain, model_path)
    reporter.log(f"segmenting {len(inputs)} volume(s) with the {dom} encoder of {model_path}")
    reporter.stage("segment", len(inputs))
    replaced = [target.name for target in targets if target.exists()]
    with atomic_dir(out_dir) as staging:
        for i, (path, target) in enumerate(zip(inputs, targets), 1):
            image = first_image if i == 1 else volumes.read_image(path)
            first_image = None          # not held while the later inputs are segmented
            volumes.require_nifti_size(image, path)
            classes = segment_image(net, meta, image, dev, dom, batch_size, cpu_bf16)
            volumes.write_label(classes, staging / target.name, convention)
            reporter.step(i, force=True)
    reporter.close()
    reporter.log(f"Wrote {len(targets)} segmentation(s) to {out_dir}"
                 + (f", replacing {len(replaced)} earlier one(s): {listed(replaced)}" if replaced else "") + ".")
    return targets
