"""One model file: safetensors tensors plus a JSON metadata block. Loading never unpickles.

Metadata (safetensors' string header fields):

- ``format``: ``"vaeuda-model"``; ``format_version``: integer, refused when newer than this engine's
  or one of :data:`EARLIER_FORMATS` (networks that changed shape);
- ``meta``: JSON with ``engine_version``, ``preset``, ``config`` (:class:`nets.NetConfig`),
  ``labels`` (the label convention), ``normalisation``, ``stage`` (source / adapted /
  finetuned), ``has_target_encoder``, ``provenance`` (data, iterations, seed, device, time,
  and the CPU, threads and kernel variables that decide the rounding: ``machine.numerics``);
- ``tensors_sha256``: digest of all tensors in key order, so an edited or damaged file is
  refused instead of silently giving wrong segmentations.

A training checkpoint is the same format with extra ``optim.*`` tensors and ``train_state`` metadata.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import __version__
from .errors import VaeudaError
from .fileio import atomic_path, image_then_label, require_file
from .nets import NetConfig, VAEUDANet

FORMAT = "vaeuda-model"
FORMAT_VERSION = 2
# Earlier format versions this engine cannot load, and why (the same tensors would not fit).
EARLIER_FORMATS = {1: "its segmenter (engine 0.1) has DRN-D-22's single convolutions in stages 1-2 and 7-8, "
                      "where this engine's has DRN-C-26's basic blocks"}
# What a model file holds: a source model (E_S path only), an adapted one (with a trained E_T),
# a fine-tuned one (the oracle: the source path trained on labelled target volumes).
STAGES = ("source", "adapted", "finetuned")


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path, tensors: Dict[str, torch.Tensor], meta: dict, extra_header: Optional[dict] = None) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta),
              "tensors_sha256": _digest(tensors)}
    header.update(extra_header or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


# How far into a damaged file our format's name is looked for: past any header we write (tens of kB).
_DECLARED_FORMAT_SCAN_BYTES = 16 * 1024 * 1024


def _declared_format(path: Path) -> Optional[str]:
    """The ``format`` a safetensors file's own header declares (8-byte little-endian length, then
    JSON), read without the tensors; None when there is no such header. A header cut short, or
    whose length field is damaged, is ours if the JSON object it begins names our format."""
    marker = f'"format":"{FORMAT}"'.encode()       # (safetensors writes compact JSON, keys in any order)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            text = f.read(length if 0 < length <= _DECLARED_FORMAT_SCAN_BYTES else _DECLARED_FORMAT_SCAN_BYTES)
        try:
            return str(json.loads(text)["__metadata__"]["format"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return FORMAT if text.startswith(b"{") and marker in text else None
    except OSError:
        return None


def _foreign_kind(path: Path) -> str:
    """What a file that is not a safetensors file is, where its first bytes tell: the reason a user
    can act on, in place of the safetensors reader's ("header too large")."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive, as torch.save and NumPy's .npz write; such files are never unpickled here"
    # torch.save's legacy format (protocol 2, then its magic number as a LONG1), or protocol 4/5 with a
    # frame: four bytes a safetensors header length would hardly begin with
    if head == b"\x80\x02\x8a\x0a" or head[:3] in (b"\x80\x04\x95", b"\x80\x05\x95"):
        return "a Python pickle, as older torch.save wrote; such files are never unpickled here"
    return ""


def read_tensors(path, what: str = "model file") -> Tuple[Dict[str, torch.Tensor], dict, Dict[str, str]]:
    """Read and verify a model file (or training checkpoint: ``what`` names it in errors) ->
    (tensors, meta, raw header). VaeudaError if it is not ours or damaged."""
    from safetensors import SafetensorError, safe_open

    path = require_file(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:   # before its tensors are read: it may be a large model of another kind
                raise VaeudaError(f"{path}: not a VAE-UDA {what} (safetensors without the '{FORMAT}' metadata).")
            # copies: the tensors safetensors gives are views of its memory map of the file, which
            # Windows will not let a resumed run replace or delete while they live
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if _declared_format(path) == FORMAT:    # ours by its header, but its tensors are cut short or damaged
            raise VaeudaError(f"{path}: a VAE-UDA {what} that is truncated or damaged ({exc}); copy it again from "
                              f"where it was made.") from None
        kind = _foreign_kind(path)
        raise VaeudaError(f"{path}: not a VAE-UDA {what} "
                          f"({kind or f'not a readable safetensors file: {exc}'}).") from None
    text = header.get("format_version", "0")
    version = int(text) if text.isascii() and text.isdigit() else -1     # (int() takes "٢" and " 2")
    if version < 1:
        raise VaeudaError(f"{path}: model file format version {header.get('format_version')!r} is not valid "
                          f"(the file was altered or damaged).")
    if version in EARLIER_FORMATS:
        raise VaeudaError(f"{path}: model file format version {version} was written by an earlier engine and cannot "
                          f"be loaded: {EARLIER_FORMATS[version]}; train the model again.")
    if version > FORMAT_VERSION:
        raise VaeudaError(f"{path}: model file format version {header.get('format_version')} is not supported "
                          f"by this engine ({__version__}, format {FORMAT_VERSION}); update the extension.")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError, RecursionError):
        raise VaeudaError(f"{path}: model file metadata is damaged.") from None
    if header.get("tensors_sha256") != _digest(tensors):
        raise VaeudaError(f"{path}: model file weights do not match their checksum (the file was altered or damaged).")
    return tensors, meta, header


def save_model(path, net: VAEUDANet, meta: dict, extra_tensors: Optional[Dict[str, torch.Tensor]] = None,
               extra_header: Optional[dict] = None) -> None:
    """Save all networks (prefix ``net.``) with ``meta``; ``config`` and ``engine_version`` are filled in."""
    meta = dict(meta)
    meta["config"] = net.cfg.to_dict()
    meta["engine_version"] = __version__
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update(extra_tensors or {})
    save_tensors(path, tensors, meta, extra_header)


def refuse_unfit_weights(stored: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    """Refuse ``stored`` tensors (names as in ``expected``) that are missing, extra, of another shape
    or dtype than ``expected`` holds (load_state_dict would cast a float16 or integer tensor without a
    word), or hold NaN or infinite values (a network that segments nothing, without an error)."""
    differing = sorted(set(expected) ^ set(stored)) or sorted(
        k for k in expected if tuple(stored[k].shape) != tuple(expected[k].shape) or stored[k].dtype != expected[k].dtype)
    if differing:
        raise VaeudaError(f"model weights do not fit its configuration ({len(differing)} tensor(s) missing, extra or "
                          f"of another shape or type, e.g. {differing[0]}).")
    bad = next((k for k, v in stored.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise VaeudaError(f"model weights hold NaN or infinite values (e.g. {bad}); the file was altered or damaged.")


def _net_state(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``net.*`` tensors of a model file or checkpoint, named as ``net.state_dict()`` names them."""
    return {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}


def load_networks(net: VAEUDANet, tensors: Dict[str, torch.Tensor], path) -> None:
    """Load the ``net.*`` tensors of a model file or checkpoint into ``net`` (VaeudaError if they do not fit)."""
    state = _net_state(tensors)
    try:
        refuse_unfit_weights(state, net.state_dict())
    except VaeudaError as exc:
        raise VaeudaError(f"{path}: {exc}") from None
    _load_state(net, state, path)


def _load_state(net: VAEUDANet, state: Dict[str, torch.Tensor], path) -> None:
    """``net.load_state_dict(state)`` for weights already checked (:func:`refuse_unfit_weights`)."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise VaeudaError(f"{path}: model weights do not fit its configuration ({first}).") from None


def check_metadata(path, meta) -> None:
    """Refuse metadata that parses as JSON but lacks what the stages read, or holds values they
    cannot use (an edited file: the checksum covers the tensors only): preset, stage, label
    convention, normalisation, training options (the discriminator's loss, the class weights),
    network configuration, the source volumes of its provenance."""
    import math

    import numpy as np

    from .labels import N_CLASSES, Convention
    from .losses import GAN_MODES
    from .nets import PRESETS
    from .volumes import normalise

    def damaged(what: str) -> VaeudaError:
        return VaeudaError(f"{path}: model file metadata is damaged ({what}).")

    if not isinstance(meta, dict):
        raise damaged("not a JSON object")
    if not isinstance(meta.get("preset"), str) or meta["preset"] not in PRESETS:
        raise damaged(f"preset {meta.get('preset')!r} is not one of {', '.join(PRESETS)}")
    for key in ("stage", "labels", "normalisation", "train", "config"):
        if key not in meta:
            raise damaged(f"'{key}' is missing")
    if meta["stage"] not in STAGES:
        raise damaged(f"stage {meta['stage']!r} is not one of {', '.join(STAGES)}")
    if meta.get("has_target_encoder") is not (meta["stage"] == "adapted"):
        raise damaged(f"has_target_encoder is {meta.get('has_target_encoder')!r} in a model of stage "
                      f"'{meta['stage']}', and only adaptation trains a target encoder")
    for key in ("labels", "normalisation", "train", "config"):
        if not isinstance(meta[key], dict):
            raise damaged(f"'{key}' is not a JSON object")
    try:
        convention = Convention.from_dict(meta["labels"]["convention"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise damaged("the label convention is unreadable") from None
    # Segmentations are written with from_index and read back with to_index: one value per class,
    # each read back as its own class.
    if any(not -2**63 <= value < 2**63 for value in (*convention.from_index, *convention.to_index)):
        raise damaged("a label value of its convention does not fit a 64-bit label file")
    if len(convention.from_index) != N_CLASSES or len(set(convention.from_index)) != N_CLASSES or any(
            convention.to_index.get(value) != index for index, value in enumerate(convention.from_index)):
        raise damaged(f"the label convention does not give each of the {N_CLASSES} classes its own label value")
    if not isinstance(meta["normalisation"].get("method"), str):
        raise damaged("the intensity normalisation has no method")
    try:
        with np.errstate(all="ignore"):     # (an infinite range would warn, then give NaN)
            probe = normalise(np.arange(8, dtype=np.float32).reshape(2, 2, 2), meta["normalisation"])
    except (VaeudaError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise damaged(f"the intensity normalisation is unusable: {str(exc).rstrip('.')}") from None
    if not np.isfinite(probe).all():
        raise damaged("the intensity normalisation gives non-finite intensities")
    lower = meta["normalisation"].get("clip_lower_percentile")
    upper = meta["normalisation"].get("clip_upper_percentile")
    for value in (lower, upper):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 100):
            raise damaged(f"a clipping percentile of the intensity normalisation is {value!r}, not one in [0, 100]")
    if lower is not None and upper is not None and not lower < upper:
        raise damaged("the intensity normalisation clips at a lower percentile above its upper one")
    # the training options that later stages read from the source model
    train = meta["train"]
    if train.get("gan_mode", "lsgan") not in GAN_MODES:
        raise damaged(f"gan_mode {train.get('gan_mode')!r} is not one of {', '.join(GAN_MODES)}")
    weights = train.get("class_weights")
    if weights is not None and not (isinstance(weights, list) and len(weights) == N_CLASSES and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights)):
        raise damaged(f"class_weights is not a list of {N_CLASSES} positive numbers")
    if not isinstance(train.get("intensity_remap", False), bool):
        raise damaged("intensity_remap is not true or false")
    provenance = meta.get("provenance", {})
    if not isinstance(provenance, dict):
        raise damaged("'provenance' is not a JSON object")
    if not isinstance(provenance.get("numerics", {}), dict):
        raise damaged("the numerics in its provenance are not a JSON object")
    images, labels = provenance.get("source_data"), provenance.get("source_labels")
    if (images, labels) != (None, None) and not (
            all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in (images, labels))
            and len(images) == len(labels)):
        raise damaged("the source volumes in its provenance are not two lists of paths of one length")
    # SHA-256 digests of the run's inputs (null for a file whose voxels lie elsewhere): one per file
    finetune_files = _pairs_files(provenance.get("finetune_data"), provenance.get("finetune_labels"))
    for key, files, what in (("source_sha256", _pairs_files(images, labels), "image and label file"),
                             ("finetune_sha256", finetune_files, "image and label file"),
                             ("target_sha256", provenance.get("target_data"), "target volume")):
        digests = provenance.get(key)
        if digests is not None and not (isinstance(digests, list) and isinstance(files, list)
                                        and len(digests) == len(files) and all(map(_is_digest, digests))):
            raise damaged(f"the {key} digests in its provenance are not one SHA-256 (or null) per {what}")
    if not _is_digest(provenance.get("source_model_sha256")):
        raise damaged("the source_model_sha256 in its provenance is not a SHA-256 (or null)")


def _is_digest(value) -> bool:
    """A SHA-256 digest as the provenance records it (lower-case hex), or None."""
    return value is None or isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _pairs_files(images, labels) -> Optional[list]:
    """``[image 1, label 1, ...]`` of two lists of paths of one length, else None."""
    if isinstance(images, list) and isinstance(labels, list) and len(images) == len(labels):
        return image_then_label(images, labels)
    return None


def load_model(path, device: str = "cpu") -> Tuple[VAEUDANet, dict]:
    """Rebuild the networks from a model file -> (net in eval mode on ``device``, meta)."""
    tensors, meta, _ = read_tensors(path)
    check_metadata(path, meta)
    net = build_from_meta(path, meta, tensors)      # (checks the weights: not again when loading them)
    _load_state(net, _net_state(tensors), path)
    return net.to(device).eval(), meta


def build_from_meta(path, meta: dict, tensors: Optional[Dict[str, torch.Tensor]] = None) -> VAEUDANet:
    """The networks ``meta["config"]`` describes, freshly initialised. With the file's ``tensors``,
    their names and shapes are compared first on a network without memory (torch's meta device),
    so an edited width is refused before it allocates (a 1024-wide configuration: 14 GB)."""
    try:
        cfg = NetConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise VaeudaError(f"{path}: model configuration is missing or damaged ({exc}).") from None
    except VaeudaError as exc:
        raise VaeudaError(f"{path}: {exc}") from None
    try:
        if tensors is not None:
            others = sorted(k for k in tensors if not k.startswith("net."))
            if others:      # a checkpoint's optimiser, generator and average states
                raise VaeudaError(f"holds tensors a model file does not ({others[0]}, ...): is it a training checkpoint? "
                                  f"Give the model file its run wrote.")
            with torch.device("meta"):
                expected = {f"net.{k}": v for k, v in VAEUDANet(cfg).state_dict().items()}
            refuse_unfit_weights(tensors, expected)
        return VAEUDANet(cfg)
    except VaeudaError as exc:
        raise VaeudaError(f"{path}: {exc}") from None
    except (TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
        # e.g. an edited width: a negative channel count, DRN stages missing
        raise VaeudaError(f"{path}: model configuration is missing or damaged ({exc}).") from None
