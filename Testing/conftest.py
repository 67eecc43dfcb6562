"""Shared pytest fixtures (keep this file small: fixtures only)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

# CI clones the repository with the shared folder beside it: <clone>/../shared.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def mmwhs_samples() -> Path:
    """The folder of real MM-WHS sample files (PnP-AdaNet/SIFA release format), see its README.md."""
    folder = SHARED / "data" / "mmwhs-samples"
    if not (folder / "training_mr.tfrecords").is_file():
        message = f"MM-WHS sample files not found in {folder}"
        if os.environ.get("VAEUDA_REQUIRE_SAMPLES"):     # CI sets it: there a missing folder is a failure
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture
def portable_torch() -> None:
    """Skips a test that runs portable numerics where this torch cannot give them: before torch 2.3,
    NNPACK has no switch (the engine refuses; the minimum-versions run of Docs/results.md)."""
    try:
        import torch.backends.nnpack  # noqa: F401
    except ImportError:
        pytest.skip("portable numerics need torch 2.3 or later")


@pytest.fixture
def tmp_volume(tmp_path):
    """Factory: ``tmp_volume(array, spacing, origin, direction, name=None)`` -> sitk.Image, or,
    with ``name`` (e.g. ``"img.nii.gz"``), the path of that image written into ``tmp_path``.

    ``array`` is numpy (z, y, x); defaults: a (6, 7, 8) float32 ramp, unit spacing, origin 0,
    identity direction.
    """
    def make(array: Optional[np.ndarray] = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
             origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Optional[Sequence[float]] = None,
             name: Optional[str] = None):
        if array is None:
            array = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
        image = sitk.GetImageFromArray(np.asarray(array))
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in origin])
        if direction is not None:
            image.SetDirection([float(d) for d in direction])
        if name is None:
            return image
        path = tmp_path / name
        sitk.WriteImage(image, str(path))
        return path
    return make


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A synthetic cohort of 2 MR + 2 CT subjects at 32 voxels a side (1 train, 1 test each)."""
    from vaeuda.phantom import make_cohort
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, n_source=2, n_target=2, n_train=1, seed=3, size=32)
    return out


@pytest.fixture(scope="session")
def tiny_source_model(tiny_cohort, tmp_path_factory) -> Path:
    """A source model of the ``tiny`` preset trained for a few iterations on the tiny cohort."""
    from vaeuda.train import train_source
    out = tmp_path_factory.mktemp("models") / "source.safetensors"
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"], out,
                 preset="tiny", iterations=4, seed=0, device="cpu")
    return out


@pytest.fixture
def segmented_domains(monkeypatch) -> list:
    """The ``domain`` of every ``predict.slice_probabilities`` call from now on, in order (the calls still run)."""
    from vaeuda import predict
    seen = []
    real = predict.slice_probabilities
    monkeypatch.setattr(predict, "slice_probabilities",
                        lambda net, slices, domain, *a, **k: seen.append(domain) or real(net, slices, domain, *a, **k))
    return seen


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """GDCM's DICOM writer (tests that make DICOM series use it) sets the process's LC_CTYPE to "C";
    later tests must not depend on which ran before them."""
    import locale
    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    locale.setlocale(locale.LC_CTYPE, saved)
