"""The LV border contrast (vaeuda.diagnose) of real released MM-WHS slices, to compare with the phantom.

    python benchmarks/released_contrast.py ../shared/data/mmwhs-samples/*.tfrecords ../shared/data/mmwhs-samples/*.npz

Reads PnP-AdaNet/SIFA ``.tfrecords`` or ``.npz`` files (z-scored per volume by their authors) and
prints, per file, the mean intensity of LV blood, LV myocardium and the one-pixel ring outside
the LV on the labelled middle slice; files whose slices show no LV are listed as such. The same
columns as ``translation_contrast.py`` prints for the phantom's x_S and x_T rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# common also puts the engine on sys.path, as for every benchmark script
from common import run_main

from vaeuda.diagnose import CONTRAST_KEYS as COLUMNS, border_contrast  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.formats import read_npz, read_tfrecords  # noqa: E402


def released_slices(path: Path):
    """(images (N, S, S) middle channels, labels (N, S, S) class indices) of one released file."""
    if path.is_dir():
        raise VaeudaError(f"{path}: is a folder; give the released files themselves (e.g. {path}/*.npz).")
    if path.suffix.lower() not in (".npz", ".tfrecords"):     # else read as records and called corrupt
        raise VaeudaError(f"{path}: is not a released .tfrecords or .npz file.")
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    samples = read_tfrecords(path)
    return (np.stack([image[image.shape[0] // 2] for image, _ in samples]),
            np.stack([label for _, label in samples]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="released .tfrecords or .npz files")
    args = p.parse_args(argv)
    # every file read before the table starts: a bad one leaves no half table
    rows = [(path, border_contrast(*released_slices(path))) for path in args.files]
    print("| file | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS))
    for path, row in rows:
        if np.isnan(row["blood - myocardium"]):
            print(f"| {path.name} | " + " | ".join("no LV" for _ in COLUMNS) + " |")
        else:
            print(f"| {path.name} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
