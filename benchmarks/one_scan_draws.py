"""One-scan adaptation over several draws of the adaptation scan, as the paper's Proposed-1 row.

    python benchmarks/one_scan_draws.py --model demo_out/models/source.safetensors \\
        --cohort demo_out/cohort --draws 6 --out draws.json [--threads 2] [--iterations N] [--set NAME=VALUE]

``make demo`` adapts on one scan drawn from the 16-scan CT training pool; the paper averages six
adaptations on six randomly chosen scans ("to avoid being biased on one particular target
training scan"). This script adapts the given source model on each of ``--draws`` scans, drawn
as ``vaeuda experiment table1`` draws them (``experiment.draw_targets`` with ``--draw-seed``), with
the engine's defaults (or the ``--set`` overrides) and the adaptation seed ``--seed``, and scores
each adapted model on the cohort's CT test split. On the cohort of ``vaeuda demo --seed S``, ``--draw-seed S --seed S`` makes
the first draw that demo's own adaptation (scan and seed). It reuses the source model instead of
training one (unlike ``table1``), so it measures the draw alone.

Writes ``{"args", "machine", "draws": [{"scan", "dice": {structure: %}, "seconds"}], "summary"}``:
per-structure means over the draws, and the median, min, max and population std of the draws'
mean Dice.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# common also puts the engine on sys.path, as for every benchmark script
from common import (add_set_option, check_output, count, machine_info, parsed_set_options, run_main, scored_dice,
                    write_record)

import torch  # noqa: E402

from vaeuda import train  # noqa: E402
from vaeuda.demo import cohort_split, image_of  # noqa: E402
from vaeuda.experiment import draw_targets  # noqa: E402
from vaeuda.metrics import MEAN_KEY  # noqa: E402


def summary(draws) -> dict:
    """Per-structure mean Dice over the draws, and the spread of the draws' mean Dice."""
    keys = list(draws[0]["dice"])
    means = [d["dice"][MEAN_KEY] for d in draws]
    return {"mean_dice": {k: round(statistics.fmean(d["dice"][k] for d in draws), 2) for k in keys},
            "draw_mean_dice": {"median": round(statistics.median(means), 2), "min": min(means), "max": max(means),
                               "std": round(statistics.pstdev(means), 2)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a source model file")
    p.add_argument("--cohort", required=True, help="cohort folder with splits.json")
    p.add_argument("--draws", type=int, default=6, help="adaptation scans to draw (default 6, as the paper)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--seed", type=int, default=0, help="adaptation seed (default 0, as make demo)")
    p.add_argument("--iterations", type=count(), help="adaptation iterations (default: the preset's)")
    p.add_argument("--threads", type=count(), default=2, help="torch threads (default 2, as make demo on 2 cores)")
    p.add_argument("--out", help="write the record to this JSON file")
    add_set_option(p)
    args = p.parse_args(argv)
    check_output(args.out, [args.model])         # at start-up: not a traceback after the whole run
    if args.draws < 1:
        p.error("--draws must be at least 1")
    overrides = parsed_set_options(p, args.set)
    torch.set_num_threads(args.threads)
    cohort = Path(args.cohort)
    pool, tests = cohort_split(cohort, "ct", "train"), cohort_split(cohort, "ct", "test")
    if args.draws > len(pool):    # as experiment table1 says it: a scan drawn twice adapts twice alike
        print(f"note: {args.draws} draws from a pool of {len(pool)} CT training scans are made with replacement",
              file=sys.stderr)
    draws = []
    with tempfile.TemporaryDirectory() as scratch:
        for scan in draw_targets(pool, args.draws, args.draw_seed):
            started = time.time()
            model = Path(scratch) / f"adapted_{scan}.safetensors"
            train.adapt(args.model, [image_of(cohort, scan)], model, iterations=args.iterations,
                        seed=args.seed, device="cpu", overrides=overrides or None)
            dice = scored_dice(model, cohort, tests, Path(scratch) / f"pred_{scan}")
            draws.append({"scan": scan, "dice": dice, "seconds": round(time.time() - started, 1)})
            print(json.dumps(draws[-1]), flush=True)
    record = {"args": vars(args), "machine": machine_info(), "draws": draws, "summary": summary(draws)}
    print(json.dumps(record["summary"]))
    if args.out:
        write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
