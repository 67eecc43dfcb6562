"""The paper preset on a CUDA GPU, bf16 on and off: one prepared script for a GPU session.

    .venv/bin/python benchmarks/bench_gpu.py                          # `make bench-gpu`: CUDA, paper preset
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --smoke --out /tmp/g.json   # the same code on the CPU

For bf16 autocast on and off (the engine itself uses bf16 on CUDA):

* training throughput (images/s) and peak GPU memory of the source and the adaptation stage
  (``train.run_stage`` on synthetic slices, batch 8 as the paper preset trains);
* inference on a 256 x 256 x 200 coronal stack: the network alone on its 200 slices
  (``predict.slice_probabilities``) and the whole ``predict.segment_image`` (with the
  resampling back onto the input grid, which runs on the CPU), with peak GPU memory.

Prints a Markdown table and writes everything to ``--out`` (JSON, rewritten with what is measured
so far after every stage, ``"partial": true`` until the end). To fold it into Docs/benchmarks.md
without measuring the CPU again: ``benchmarks/bench_speed.py --from-json CPU_RUN.json --gpu-json
OUT.json --out Docs/benchmarks.md``, CPU_RUN.json being the run the page shows (its first line
names it; benchmarks/results/cpu-1thread-intel-engine0.2.json when this was written). Sized to
finish in a few minutes on an H100: budget about 5 minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from common import (REPO, count, forced_autocast, machine_info, md_table, median, random_volume, run_main,
                    stage_throughput, sync, time_call)

import torch  # noqa: E402

from vaeuda.fileio import atomic_path  # noqa: E402
from vaeuda.nets import VAEUDANet, get_preset  # noqa: E402
from vaeuda.predict import segment_image, slice_probabilities  # noqa: E402
from vaeuda.train import DEFAULT_BATCH  # noqa: E402
from vaeuda.volumes import DEFAULT_NORMALISATION, SliceGrid  # noqa: E402

SETTINGS = {  # preset, batch, timed iterations, repeats, warm-up iterations, volume (x, slices, z), inference repeats
    "full": {"preset": "paper", "batch": DEFAULT_BATCH["paper"], "iterations": 20, "repeats": 3, "warmup": 3,
             "volume": (256, 200, 256), "infer_repeats": 3},
    "smoke": {"preset": "tiny", "batch": 2, "iterations": 2, "repeats": 1, "warmup": 1,
              "volume": (64, 8, 64), "infer_repeats": 1},
}


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_inference(preset: str, volume_xyz, repeats: int, device: torch.device, bf16: bool) -> dict:
    """Network-only and whole-volume inference time on one random volume, with peak GPU memory."""
    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = VAEUDANet(cfg).to(device).eval()
    meta = {"normalisation": dict(DEFAULT_NORMALISATION)}
    image = random_volume(volume_xyz)
    grid = SliceGrid.from_image(image, cfg.input_size, cfg.slice_fov_mm)
    slices = grid.image_slices(image, meta["normalisation"])
    with forced_autocast(bf16):
        peak_reset(device)
        net_s = median(time_call(lambda: slice_probabilities(net, slices, "source", device), device, repeats))
        net_peak = peak_bytes(device)
        peak_reset(device)
        volume_s = median(time_call(lambda: segment_image(net, meta, image, device, domain="source"), device,
                                    repeats))
        volume_peak = peak_bytes(device)
    return {"slices": grid.n_slices, "network_s": net_s, "slices_per_s": grid.n_slices / net_s,
            "network_peak_bytes": net_peak, "volume_s": volume_s, "volume_peak_bytes": volume_peak}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny preset and sizes: checks the script in seconds")
    p.add_argument("--out", default=str(REPO / "Docs" / "benchmarks_gpu.json"),
                   help="JSON with every measurement (default: Docs/benchmarks_gpu.json, which bench_speed.py "
                        "folds in)")
    p.add_argument("--iterations", type=count(), default=None, help="timed training iterations per repeat")
    p.add_argument("--repeats", type=count(), default=None, help="timed repeats (default: the mode's)")
    p.add_argument("--batch", type=count(), default=None, help="batch size (default: the preset's)")
    p.add_argument("--threads", type=count(), default=None,
                   help="torch.set_num_threads for the CPU side (default: torch's choice; the record's machine says it)")
    args = p.parse_args(argv)
    if (args.smoke or args.device == "cpu") and args.out == p.get_default("out"):
        p.error("--smoke and --device cpu runs are not the GPU record Docs/benchmarks.md folds in: give --out")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: error: no CUDA GPU is available to PyTorch; run with --device cpu --smoke --out FILE to "
              "test the script on the CPU.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    s = dict(SETTINGS["smoke" if args.smoke else "full"])
    for key in ("iterations", "repeats", "batch"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False        # as the engine runs
    started = time.time()
    rows = []

    def save_partial(row) -> None:
        """What is measured so far, rewritten after every stage: a session stopped by its time limit
        keeps it (the complete record, with the table, replaces it at the end)."""
        partial = {"command": "benchmarks/bench_gpu.py " + " ".join(argv), "partial": True, "machine": machine_info(),
                   "device": str(device), "settings": s, "rows": rows + [row]}
        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(json.dumps(partial, indent=1) + "\n", encoding="utf-8")

    for bf16 in (True, False):
        row = {"bf16": bf16}
        for stage in ("source", "adapt"):
            peak_reset(device)
            r = stage_throughput(s["preset"], stage, s["batch"], s["iterations"], s["repeats"], device, bf16=bf16,
                                 warmup=s["warmup"])
            row[stage] = {"images_per_s": r["images_per_s"], "all_images_per_s": r["all_images_per_s"],
                          "seconds_per_iteration": r["seconds_per_iteration"], "peak_bytes": peak_bytes(device)}
            print(f"[bench_gpu] bf16={bf16} {stage}: {r['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
            save_partial(row)
        row["inference"] = measure_inference(s["preset"], s["volume"], s["infer_repeats"], device, bf16)
        print(f"[bench_gpu] bf16={bf16} inference: {row['inference']['volume_s']:.2f} s per volume",
              file=sys.stderr, flush=True)
        rows.append(row)
    sync(device)

    gib = 2 ** 30

    def mem(b):
        return None if b is None else b / gib
    table = md_table(
        ["bf16", "source images/s", "adapt images/s", "source peak GiB", "adapt peak GiB",
         f"network s / {rows[0]['inference']['slices']} slices", "slices/s", "volume s (segment_image)",
         "inference peak GiB"],
        [["on" if r["bf16"] else "off", r["source"]["images_per_s"], r["adapt"]["images_per_s"],
          mem(r["source"]["peak_bytes"]), mem(r["adapt"]["peak_bytes"]), r["inference"]["network_s"],
          r["inference"]["slices_per_s"], r["inference"]["volume_s"], mem(r["inference"]["volume_peak_bytes"])]
         for r in rows], "lrrrrrrrr")
    on, off = rows
    ratios = (f"bf16 on / off: source {on['source']['images_per_s'] / off['source']['images_per_s']:.2f}x, "
              f"adapt {on['adapt']['images_per_s'] / off['adapt']['images_per_s']:.2f}x, "
              f"network inference {off['inference']['network_s'] / on['inference']['network_s']:.2f}x faster.")
    flags = {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
             "bf16_supported": torch.cuda.is_bf16_supported() if device.type == "cuda" else None}
    volume = "x".join(map(str, s["volume"]))
    markdown = "\n".join([
        f"`{s['preset']}` preset on {device.type}, batch {s['batch']}, {s['iterations']} timed iterations x "
        f"{s['repeats']} repeats (median), after {s['warmup']} warm-up iterations; inference on a random {volume} "
        f"volume (x, coronal slices, z). bf16 off still lets cuDNN use TF32 for convolutions "
        f"(allow_tf32 = {flags['cudnn_allow_tf32']}).", "", table, ratios])
    result = {"command": "benchmarks/bench_gpu.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "machine": machine_info(), "device": str(device), "settings": s, "flags": flags, "rows": rows,
              "seconds": round(time.time() - started, 1), "markdown": markdown}
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(markdown)
    print(f"[bench_gpu] wrote {args.out} in {result['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
