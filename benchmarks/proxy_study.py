"""Which label-free signal tells when to stop adapting? Scores the ``proxies`` of adaptation curves.

    python benchmarks/adaptation_curves.py ... --proxies --every 25 --out run.json   # one per run
    python benchmarks/proxy_study.py run1.json run2.json ... [--horizon 250] [--out study.json]

For each curve (``adaptation_curves.py --proxies``) and each proxy (lower = better), over the
evaluations after iteration 0 and up to ``--horizon`` iterations (the default adaptation length;
later points are ignored, as a run of that length would not have them):

- ``spearman``: the rank correlation between -proxy and validation Dice (1: the proxy orders the
  checkpoints as the held-out labels do; 0: no relation);
- ``picked``: the iteration where the proxy is lowest, with validation and test Dice there, and
  ``regret``: the best validation Dice on the curve minus that at the picked iteration.

A row ``last`` gives the curve's end (what a fixed iteration count keeps) and ``best val`` the
point labels would choose. Validation scans are the CT pool scans other than the adaptation scan;
test scans are reported, never used to choose.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy.stats import spearmanr


def score_curve(curve: List[dict], horizon: int) -> Dict[str, dict]:
    """``curve``: rows with ``iteration``, ``val``, ``test`` and ``proxies`` -> {proxy: scores}."""
    rows = [r for r in curve if 0 < r["iteration"] <= horizon and "proxies" in r]
    if len(rows) < 3:
        raise ValueError(f"only {len(rows)} evaluations with proxies between iteration 1 and {horizon}")
    val = np.array([r["val"] for r in rows])
    best_val = float(val.max())
    out: Dict[str, dict] = {}
    for name in rows[0]["proxies"]:
        values = np.array([r["proxies"].get(name, np.nan) for r in rows], dtype=float)
        if np.isnan(values).any():
            continue
        k = int(np.argmin(values))
        # a flat proxy ranks nothing: null (JSON has no NaN)
        rho = round(float(spearmanr(-values, val)[0]), 3) if np.ptp(values) > 0 else None
        out[name] = {"spearman": rho, "picked": rows[k]["iteration"],
                     "val": rows[k]["val"], "test": rows[k]["test"], "regret": round(best_val - rows[k]["val"], 2)}
    last = rows[-1]
    out["last"] = {"picked": last["iteration"], "val": last["val"], "test": last["test"],
                   "regret": round(best_val - last["val"], 2)}
    k = int(np.argmax(val))
    out["best val"] = {"picked": rows[k]["iteration"], "val": rows[k]["val"], "test": rows[k]["test"], "regret": 0.0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("curves", nargs="+", help="adaptation_curves.py --proxies outputs")
    p.add_argument("--horizon", type=int, default=250,
                   help="last iteration a run would reach (default 250: the adaptation length the recorded curves "
                        "were studied at, engine 0.1's default; engine 0.2's cpu preset adapts 300)")
    p.add_argument("--out", help="write the scores as JSON")
    args = p.parse_args(argv)
    study = {}
    for path in args.curves:
        try:
            if Path(path).stem in study:   # runs are named by file name: two of one name would merge
                raise ValueError(f"another curve file is also named {Path(path).stem}")
            curve = json.loads(Path(path).read_text(encoding="utf-8"))["curve"]
            study[Path(path).stem] = score_curve(curve, args.horizon)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
    names = list(dict.fromkeys(n for scores in study.values() for n in scores))
    print("| proxy | " + " | ".join(study) + " | mean regret |")
    print("|---|" + "---:|" * (len(study) + 1))
    for name in names:
        cells, regrets = [], []
        for scores in study.values():
            s = scores.get(name)
            if s is None:
                cells.append("")
                continue
            rho = f"rho {s['spearman']:+.2f}, " if s.get("spearman") is not None else ""
            cells.append(f"{rho}it {s['picked']}: {s['val']:.2f} / {s['test']:.2f}")
            regrets.append(s["regret"])
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(regrets):.2f} |")
    if args.out:
        from common import write_record   # the engine and torch only when a record is written
        write_record(args.out, {"horizon": args.horizon, "runs": study})
    return 0


if __name__ == "__main__":
    sys.exit(main())
