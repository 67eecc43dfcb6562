"""Does bf16 autocast change the segmentation? fp32 and bf16 on one labelled volume with a trained model.

    .venv/bin/python benchmarks/bf16_accuracy.py --model MODEL IMAGE LABEL [--device cpu|cuda] [--domain source|target]
        [--repeats N]

Prints one JSON object: time per volume (median of N calls per mode after a warm-up, the modes
alternating) and Dice / ASSD against the label for fp32 and for bf16, and the per-structure Dice
between the two segmentations (1.0: identical).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import count, forced_autocast, run_main, sync

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from vaeuda import volumes  # noqa: E402
from vaeuda.choices import DOMAINS  # noqa: E402
from vaeuda.labels import CLASS_KEYS, STRUCTURES, Convention  # noqa: E402
from vaeuda.metrics import dice, evaluate_volume, summarise  # noqa: E402
from vaeuda.modelfile import load_model  # noqa: E402
from vaeuda.predict import model_domain, segment_image  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model file")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--domain", default=None, choices=DOMAINS, help="default: as the model says")
    p.add_argument("--repeats", type=count(), default=5, help="timed calls per mode, alternating (median; default 5)")
    p.add_argument("image", help="a volume to segment")
    p.add_argument("label", help="its label file, in the model's label convention")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    net, meta = load_model(args.model, str(device))
    domain = args.domain or model_domain(meta)
    image = volumes.read_image(args.image)
    ref_image = volumes.read_label(args.label, Convention.from_dict(meta["labels"]["convention"]), reference=image)
    ref = sitk.GetArrayFromImage(ref_image)
    spacing_zyx = tuple(reversed(ref_image.GetSpacing()))
    out, segs = {"model": args.model, "image": args.image, "domain": domain, "device": str(device),
                 "repeats": args.repeats}, {}
    times = {"fp32": [], "bf16": []}
    modes = (("fp32", False), ("bf16", True))
    for name, bf16 in modes:                                           # one warm-up each, and the labels
        with forced_autocast(bf16):
            segs[name] = sitk.GetArrayFromImage(segment_image(net, meta, image, device, domain))
    sync(device)
    for repeat in range(args.repeats):        # alternating, each mode first in turn: neither pays for the other
        for name, bf16 in (modes if repeat % 2 == 0 else modes[::-1]):
            with forced_autocast(bf16):
                t = time.perf_counter()
                segment_image(net, meta, image, device, domain)
                sync(device)
                times[name].append(time.perf_counter() - t)
    for name, _ in modes:
        summary = summarise([evaluate_volume(segs[name], ref, spacing_zyx)])
        out[name] = {"seconds": statistics.median(times[name]), "seconds_each": times[name],
                     "dice_percent": {k: round(100 * summary[k]["dice"]["mean"], 2) for k in CLASS_KEYS + ("Mean",)},
                     "assd_vox_mean": summary["Mean"]["assd_vox"]["mean"]}
    out["dice_percent_fp32_vs_bf16"] = {s.key: round(100 * dice(segs["fp32"] == s.index, segs["bf16"] == s.index), 2)
                                        for s in STRUCTURES}        # in percent, as every other script reports Dice
    out["voxels_differing"] = float(np.mean(segs["fp32"] != segs["bf16"]))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
