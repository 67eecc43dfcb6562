"""A stand-in for ``python -m vaeuda ... --progress json``: the engine's protocol without torch.

The module's self-test runs it in the engine's place where the engine's packages are missing (a
fresh install in Slicer's testing mode), so that the Slicer side (volume out, job, labels back as
segments) is still checked; Testing/test_slicer_module.py uses it to test the job machinery.
It needs numpy and SimpleITK (both ship with Slicer) and ``vaeuda.labels``.

The behaviour comes from environment variables (the child inherits its parent's environment):

- ``VAEUDA_FAKE_MODE``:
  ``done``  - the default: progress lines, a plain text line, then the outputs: for ``segment``,
              a label file ``OUT/<stem>_seg.nii.gz`` on the input's grid (:func:`fake_labels`); for
              ``evaluate``, the ``--json`` scores (:func:`write_evaluation`, Dice only);
              otherwise a small file at ``--out``; then ``{"event": "done", "outputs": [...]}``, exit 0;
  ``sleep`` - a stage and one progress line, starts a grandchild process that sleeps too, then
              sleeps 60 s (to be cancelled);
  ``fail``  - the engine's error protocol: an error event on stdout, ``vaeuda: error: ...`` on
              stderr (a sentence naming the last argument, ``PATH:`` :data:`FAIL_REASON`), exit 2;
  ``crash`` - a Python traceback on stderr and exit 1, with no JSON error line.
- ``VAEUDA_FAKE_ARGS``: write the command line (JSON list) there, for a test to inspect.
- ``VAEUDA_FAKE_PIDFILE``: write the grandchild's process id there (``sleep`` mode).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

FAIL_REASON = "the fake engine refuses this volume on purpose."   # after the last argument's path, as the engine's sentences name a file


def emit(event, **fields):
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def write_model(path, convention: dict, model_format: str) -> str:
    """A file with only a safetensors header holding the engine's model metadata (the label
    convention, ``Convention.to_dict()``), no tensors: what the module reads before running the
    engine. ``model_format``: the module's MODEL_FORMAT."""
    meta = {"labels": {"convention": convention}}
    header = json.dumps({"__metadata__": {"format": model_format, "format_version": "2",
                                          "meta": json.dumps(meta)}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    return str(path)


def option(args, name):
    return args[args.index(name) + 1] if name in args else None


def fake_labels(image):
    """MM-WHS label values from intensity ranks, so a test can predict them: the brightest fifth of the
    voxels 820 (aorta), the next 500, the next 420, the next 205 (every structure has voxels); the
    darkest fifth background."""
    import numpy as np
    from vaeuda.labels import STRUCTURES
    value = {s.key: s.mmwhs_value for s in STRUCTURES}
    q1, q2, q3, q4 = np.quantile(image, [0.2, 0.4, 0.6, 0.8])
    return np.select([image > q4, image > q3, image > q2, image > q1],
                     [value["A-A"], value["LV-B"], value["LA-B"], value["LV-M"]], 0).astype(np.uint16)


def write_segmentation(input_path, out_dir):
    import SimpleITK as sitk
    image = sitk.ReadImage(input_path)
    labels = sitk.GetImageFromArray(fake_labels(sitk.GetArrayFromImage(image)))
    labels.CopyInformation(image)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(input_path).split(".")[0]
    path = os.path.join(out_dir, f"{name}_seg.nii.gz")
    sitk.WriteImage(labels, path, True)
    return path


def write_evaluation(pred_dir, ref_dir, json_path):
    """``evaluate``'s JSON for the one segmentation in ``pred_dir`` against the one label file in ``ref_dir``
    (consecutive label values, as the module writes them), in the shape of the engine's
    ``metrics.evaluate_dirs``: Dice per structure on the whole masks (1 where both are empty, as the
    engine scores it); no surface distances (null), which the stand-in does not compute."""
    import numpy as np
    import SimpleITK as sitk
    from vaeuda.labels import STRUCTURES
    pred, ref = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, sorted(os.listdir(folder))[0])))
                 for folder in (pred_dir, ref_dir))
    metrics = {}
    for structure in STRUCTURES:
        p, r = pred == structure.index, ref == structure.index
        total = int(p.sum() + r.sum())
        dice = 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total
        metrics[structure.key] = {"dice": dice, "assd_mm": None, "assd_vox": None}
    mean = sum(m["dice"] for m in metrics.values()) / len(metrics)
    result = {"n_volumes": 1, "volumes": [{"name": "case", "metrics": metrics}],
              "summary": {"Mean": {"dice": {"mean": mean}, "assd_mm": None, "assd_vox": None}},
              "references_lacking": {}}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return json_path


def main(args):
    mode = os.environ.get("VAEUDA_FAKE_MODE", "done")
    if os.environ.get("VAEUDA_FAKE_ARGS"):
        with open(os.environ["VAEUDA_FAKE_ARGS"], "w", encoding="utf-8") as f:
            json.dump(args, f)
    command = args[0] if args else ""
    emit("stage", stage=command, total=3)
    if mode == "fail":
        sentence = f"{args[-1]}: {FAIL_REASON}"
        emit("error", message=sentence)
        print(f"vaeuda: error: {sentence}", file=sys.stderr, flush=True)
        return 2
    if mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "standinengine.py", line 1, in <module>', file=sys.stderr)
        print("ZeroDivisionError: division by zero", file=sys.stderr, flush=True)
        return 1
    if mode == "sleep":
        emit("progress", stage=command, step=1, total=3, fraction=0.3333, eta_s=120.0)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if os.environ.get("VAEUDA_FAKE_PIDFILE"):
            with open(os.environ["VAEUDA_FAKE_PIDFILE"], "w", encoding="utf-8") as f:
                f.write(str(grandchild.pid))
        time.sleep(60)
        return 0
    for step in (1, 2, 3):
        emit("progress", stage=command, step=step, total=3, fraction=round(step / 3, 4), eta_s=0.0)
    print("a plain text line", flush=True)
    out = option(args, "--out")
    outputs = []
    if command == "segment":
        outputs.append(write_segmentation(args[-1], out))
    elif command == "evaluate":
        outputs.append(write_evaluation(option(args, "--pred"), option(args, "--ref"), option(args, "--json")))
    elif out:
        with open(out, "w", encoding="utf-8") as f:
            f.write("fake model\n")
        outputs.append(out)
    emit("done", outputs=outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
