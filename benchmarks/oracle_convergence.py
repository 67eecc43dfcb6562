"""Is the oracle converged? Held-out Dice of ``vaeuda finetune`` against its iteration count.

    python benchmarks/oracle_convergence.py --model demo_out/models/source.safetensors \\
        --cohort demo_out/cohort --iterations 200 400 800 1600 --out oracle.json \\
        [--validation 4] [--splits validation test] [--threads 2]

The oracle is the source model fine-tuned on the labelled CT training pool; the ratio issue 3
asks for (adapted / oracle) is only meaningful against an oracle that has stopped improving. For
each iteration count this script fine-tunes twice, with the engine's defaults otherwise:

- **validation** (to choose with): on the pool less its first ``--validation`` scans, scored on
  those held-out pool scans;
- **test** (for the record): on the whole pool, as ``make demo`` does, scored on the test split.

Writes ``{"args", "machine", "runs": [{"iterations", "split", "dice": {structure: %}, "seconds"}]}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# common also puts the engine on sys.path, as for every benchmark script
from common import check_output, count, machine_info, run_main, scored_dice, write_record

import torch  # noqa: E402

from vaeuda import train  # noqa: E402
from vaeuda.demo import cohort_split, image_of, label_of  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a source model file")
    p.add_argument("--cohort", required=True, help="cohort folder with splits.json")
    p.add_argument("--iterations", type=count(), nargs="+", required=True, help="fine-tuning iteration counts to try")
    p.add_argument("--validation", type=int, default=4, help="pool scans held out for validation (default 4)")
    p.add_argument("--splits", nargs="+", choices=("validation", "test"), default=["validation", "test"],
                   help="which fine-tunings to run (default both)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (default 0, as make demo)")
    p.add_argument("--threads", type=count(), default=2, help="torch threads (default 2, as make demo on 2 cores)")
    p.add_argument("--out", help="write the record to this JSON file")
    args = p.parse_args(argv)
    check_output(args.out, [args.model])         # at start-up: not a traceback after the whole run
    if min(args.iterations) < 1:
        p.error("--iterations must be at least 1")
    torch.set_num_threads(args.threads)
    cohort = Path(args.cohort)
    runs = []
    pool, tests = cohort_split(cohort, "ct", "train"), cohort_split(cohort, "ct", "test")
    if "validation" in args.splits and not 0 < args.validation < len(pool):   # (a test run uses the pool whole)
        p.error(f"--validation must be between 1 and {len(pool) - 1} (the pool has {len(pool)} scans)")
    held_out, kept = pool[:args.validation], pool[args.validation:]
    with tempfile.TemporaryDirectory() as scratch:
        for iterations in args.iterations:
            for split, train_on, score_on in (("validation", kept, held_out), ("test", pool, tests)):
                if split not in args.splits:
                    continue
                started = time.time()
                model = Path(scratch) / f"oracle_{split}_{iterations}.safetensors"
                train.finetune(args.model, [image_of(cohort, s) for s in train_on],
                               [label_of(cohort, s) for s in train_on], model, iterations=iterations,
                               seed=args.seed, device="cpu")
                dice = scored_dice(model, cohort, score_on, Path(scratch) / f"pred_{split}_{iterations}")
                runs.append({"iterations": iterations, "split": split, "dice": dice,
                             "seconds": round(time.time() - started, 1)})
                print(json.dumps(runs[-1]), flush=True)
    record = {"args": vars(args), "machine": machine_info(), "runs": runs}
    if args.out:
        write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
