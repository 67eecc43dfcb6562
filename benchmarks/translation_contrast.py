"""The LV myocardium's border contrast in real and translated images (vaeuda.diagnose), as a table.

    python benchmarks/translation_contrast.py --model adapted.safetensors --cohort demo_out/cohort

MR rows use the cohort's MR test split, CT rows its CT test split (``splits.json``), unless
``--mr`` / ``--ct`` name scan prefixes. Units: the normalised model input (z-scores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# common also puts the engine on sys.path, as for every benchmark script
from common import check_output, cohort_slices, run_main

from vaeuda.demo import cohort_split  # noqa: E402
from vaeuda.diagnose import CONTRAST_KEYS as COLUMNS, translation_contrast  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.fileio import atomic_path  # noqa: E402
from vaeuda.modelfile import load_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an adapted model file")
    p.add_argument("--cohort", required=True, help="cohort folder with splits.json")
    p.add_argument("--mr", nargs="+", help="MR scan prefixes (default: the MR test split)")
    p.add_argument("--ct", nargs="+", help="CT scan prefixes (default: the CT test split)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    check_output(args.out, [args.model])         # at start-up: not a traceback after the whole run
    cohort = Path(args.cohort)
    net, meta = load_model(args.model)
    if not meta.get("has_target_encoder"):        # x_ST and x_TS of an encoder no adaptation trained mean nothing
        raise VaeudaError(f"{args.model}: is a '{meta.get('stage')}' model; the translations need an adapted one.")
    mr_scans = args.mr or cohort_split(cohort, "mr", "test")
    ct_scans = args.ct or cohort_split(cohort, "ct", "test")
    for modality, scans in (("mr", mr_scans), ("ct", ct_scans)):   # a CT scan in the MR rows would pass unsaid
        listed = cohort_split(cohort, modality, "train") + cohort_split(cohort, modality, "test")
        stray = [scan for scan in scans if scan not in listed]
        if stray:
            raise VaeudaError(f"{stray[0]}: is not one of the cohort's {modality.upper()} scans (splits.json).")
    mr, ct = (cohort_slices(cohort, scans, net.cfg, meta["normalisation"], labelled=True)
              for scans in (mr_scans, ct_scans))
    rows = translation_contrast(net, mr.images, mr.labels, ct.images, ct.labels)
    lines = [f"LV border contrast, model `{Path(args.model).name}`, MR {', '.join(mr_scans)}, CT {', '.join(ct_scans)} "
             "(mean normalised intensity; ring = one pixel outside the LV myocardium)", "",
             "| image | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |" for name, row in rows.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with atomic_path(Path(args.out)) as tmp:     # its folder made if missing, as the other scripts' records
            tmp.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
