"""`vaeuda demo` under other floating-point kernel paths of the same CPU: how much of the demo's
numbers is rounding.

    python benchmarks/kernel_paths.py --out kernel_paths.json [--variants default mkl-avx2 ...] [--quick] [--portable]
    python benchmarks/kernel_paths.py --fingerprints [--portable] --out fingerprints.json

The engine is bit-reproducible on one machine with one set of kernels, but MKL and oneDNN pick
their kernels by the CPU's instruction set (and the thread count changes reduction orders), so
another CPU computes the same training with different rounding. This script runs the whole demo
(same seed, same cohort, same draw) in a fresh process per variant, each with the environment
variables below that make MKL / oneDNN / OpenMP take another path on this CPU, and tabulates the
three rows of each report. The variables are the libraries' own; the demo's code is unchanged.
With ``--portable`` each demo runs with the engine's ``--portable``, which should make every
variant give the same numbers (the variants that set one of its own variables are left out, and
refused when named).

Writes ``{"args", "machine", "variants": [{"name", "env", "mean_dice": {row: %}, "gain",
"ratio_to_oracle", "demo_total_s", "seconds"}], "markdown"}`` and prints the Markdown table.

``--fingerprints`` runs ``vaeuda numerics`` instead of the demo (seconds, not minutes): each
variant's kernel fingerprint (``vaeuda.machine.fingerprint``), which says which library paths a
variant changes on this CPU, and, recorded on two computers, which ones differ between them.
Its records have ``"fingerprint"`` in place of the demo's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

# common also puts the engine on sys.path, as for every benchmark script
from common import REPO, check_output, machine_info, run_main, write_record

from vaeuda.demo import ROW_ADAPTED as ADAPTED, ROW_ORACLE as ORACLE, ROW_UNADAPTED as UNADAPTED  # noqa: E402
from vaeuda.machine import KERNEL_VARIABLES, PORTABLE_ENVIRONMENT  # noqa: E402

# name -> environment overrides, all of them among the engine's KERNEL_VARIABLES (which a model
# file records). Every one of those is removed for the others, so "default" is the libraries'
# own choice on this CPU whatever the calling shell exported.
KERNEL_PATHS: Dict[str, Dict[str, str]] = {
    "default": {},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},          # MKL's AVX2 kernels, not AVX-512
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},            # oneDNN's (the convolutions) likewise
    # MKL's conditional numerical reproducibility on its SSE2 branch: the one branch MKL documents
    # as giving the same results on Intel and non-Intel CPUs (with a fixed thread count)
    "mkl-cnr-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def variant_env(name: str, base: Dict[str, str]) -> Dict[str, str]:
    """``base`` without any of the kernel variables, plus variant ``name``'s own."""
    env = {k: v for k, v in base.items() if k not in KERNEL_VARIABLES}
    env.update(KERNEL_PATHS[name])
    # the engine of this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "VAEUDASegmentation"), base.get("PYTHONPATH")]))
    return env


def demo_command(out: Path, seed: int, quick: bool, portable: bool) -> List[str]:
    """The demo one variant runs, in a fresh process."""
    return ([sys.executable, "-m", "vaeuda", "demo", "--out", str(out), "--seed", str(seed), "--device", "cpu",
             "--progress", "none"] + (["--quick"] if quick else []) + (["--portable"] if portable else []))


def numerics_command(portable: bool) -> List[str]:
    """``vaeuda numerics`` in a fresh process: the kernels a variant's environment gives."""
    return [sys.executable, "-m", "vaeuda", "numerics"] + (["--portable"] if portable else [])


def portable_conflicts(names: List[str]) -> List[str]:
    """The variants that set a variable ``--portable`` itself sets (the engine refuses them)."""
    return [n for n in names if set(KERNEL_PATHS[n]) & set(PORTABLE_ENVIRONMENT)]


def summarise(name: str, report: dict, seconds: float) -> dict:
    """One variant's row from its demo ``report.json``: the three mean Dice, the gain, the ratio."""
    unadapted, adapted, oracle = (report["mean_dice"][row] for row in (UNADAPTED, ADAPTED, ORACLE))
    return {"name": name, "env": KERNEL_PATHS[name],
            "mean_dice": {UNADAPTED: round(unadapted, 2), ADAPTED: round(adapted, 2), ORACLE: round(oracle, 2)},
            "gain": round(adapted - unadapted, 2),
            "ratio_to_oracle": round(100 * adapted / oracle, 1) if oracle > 0 else None,   # a --quick oracle may be 0
            "demo_total_s": round(report["total_s"], 1), "seconds": round(seconds, 1)}


def environment_cell(env: Dict[str, str]) -> str:
    """A variant's environment as a table cell."""
    return ", ".join(f"`{k}={v}`" for k, v in env.items()) or "(none)"


def markdown(rows: List[dict]) -> str:
    lines = ["| kernel path | environment | unadapted | adapted | oracle | gain | adapted / oracle | demo s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        env = environment_cell(r["env"])
        d = r["mean_dice"]
        ratio = "-" if r["ratio_to_oracle"] is None else f"{r['ratio_to_oracle']:.1f} %"
        lines.append(f"| {r['name']} | {env} | {d[UNADAPTED]:.2f} | {d[ADAPTED]:.2f} | {d[ORACLE]:.2f} | "
                     f"{r['gain']:+.2f} | {ratio} | {r['demo_total_s']:.1f} |")
    return "\n".join(lines)


def fingerprint_markdown(rows: List[dict]) -> str:
    """One row per variant, one column per fingerprint entry; an entry that differs from the first
    row's is in bold."""
    keys = list(rows[0]["fingerprint"])
    lines = ["| kernel path | environment | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        env = environment_cell(r["env"])
        cells = [f"**{r['fingerprint'][k]}**" if r["fingerprint"][k] != rows[0]["fingerprint"][k]
                 else r["fingerprint"][k] for k in keys]
        lines.append(f"| {r['name']} | {env} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))   # the first paragraph
    p.add_argument("--variants", nargs="+", choices=list(KERNEL_PATHS),
                   help="default: all (with --portable, all that leave its variables alone)")
    p.add_argument("--seed", type=int, default=0, help="the demo's seed (default 0, as make demo)")
    p.add_argument("--quick", action="store_true", help="the demo's smoke run (numbers mean nothing)")
    p.add_argument("--portable", action="store_true", help="run each demo with the engine's --portable")
    p.add_argument("--fingerprints", action="store_true",
                   help="print each variant's kernel fingerprint (vaeuda numerics) instead of running the demo")
    p.add_argument("--keep", help="keep each variant's demo folder under this folder")
    p.add_argument("--out", help="write the record to this JSON file")
    args = p.parse_args(argv)
    check_output(args.out)                       # at start-up: not a traceback after the whole run
    if args.fingerprints and args.keep:
        p.error("--keep keeps each variant's demo folder, and --fingerprints runs no demo")
    if args.variants is None:
        left_out = portable_conflicts(list(KERNEL_PATHS)) if args.portable else []
        args.variants = [n for n in KERNEL_PATHS if n not in left_out]
    if args.portable and portable_conflicts(args.variants):
        p.error(f"--portable sets {', '.join(PORTABLE_ENVIRONMENT)} itself; leave out "
                f"{', '.join(portable_conflicts(args.variants))}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        parent = Path(args.keep or scratch)
        for name in args.variants:
            out = parent / name
            what, command = (("vaeuda numerics", numerics_command(args.portable)) if args.fingerprints
                             else ("the demo", demo_command(out, args.seed, args.quick, args.portable)))
            started = time.time()
            proc = subprocess.run(command, env=variant_env(name, dict(os.environ)), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"error: {what} under {name} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            if args.fingerprints:
                numerics = json.loads(proc.stdout)
                rows.append({"name": name, "env": KERNEL_PATHS[name], "fingerprint": numerics["fingerprint"],
                             "numerics": numerics})
                print(json.dumps(rows[-1]["fingerprint"]), flush=True)
                continue
            rows.append(summarise(name, json.loads((out / "report.json").read_text(encoding="utf-8")), time.time() - started))
            print(json.dumps(rows[-1]), flush=True)
    table = fingerprint_markdown(rows) if args.fingerprints else markdown(rows)
    print(table)
    if args.out:
        write_record(args.out, {"args": vars(args), "machine": machine_info(), "variants": rows, "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
