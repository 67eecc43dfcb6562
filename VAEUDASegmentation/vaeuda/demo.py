"""``vaeuda demo``: the main job, end to end on the synthetic cohort.

Make a cohort, train the source model on the 16 MR training volumes, adapt it with ONE CT
drawn (seeded) from the 16-scan CT training pool, fine-tune an oracle on the 16 labelled
CT training volumes, segment the 4 CT test volumes with the unadapted, adapted and oracle
models, and write ``report.md``, ``report.json`` and a figure like the paper's Fig. 2.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import machine
from .errors import VaeudaError
from .fileio import atomic_path, check_output_dir, make_dir
from .labels import STRUCTURES
from .metrics import METRIC_UNITS, evaluate_dirs, table_markdown
from .progress import Reporter, listed, null_reporter, write_stdout

# The report's three rows (report.json "mean_dice" / "results" keys).
ROW_UNADAPTED, ROW_ADAPTED, ROW_ORACLE = "Unadapted", "Proposed-1 (adapted)", "Oracle"
# The paper's Table 1 opens with its bound and its baseline, then the methods: this report and
# `vaeuda experiment table1` (experiment.ROWS) both start with these, in this order.
REFERENCE_ROWS = (ROW_ORACLE, ROW_UNADAPTED)
ROWS = REFERENCE_ROWS + (ROW_ADAPTED,)
METRICS = ("dice", "assd_vox", "assd_mm")      # the paper's two groups, then ASSD in mm (compares across data sets)
# report.json's units: "mean_dice" keeps the percent its readers and the recorded reports have; "results" holds
# each model's evaluation as `vaeuda evaluate` writes it, Dice a fraction there
UNITS = {"mean_dice": "percent", "results": METRIC_UNITS}


def read_splits(cohort: Path) -> dict:
    """``cohort/splits.json`` as a dict, or VaeudaError in one sentence (missing, unreadable, not an object)."""
    from .fileio import require_readable
    path = Path(cohort) / "splits.json"
    try:
        if path.exists():
            require_readable(path)       # (a pipe of that name would hang the read)
        splits = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaeudaError(f"{path}: not found; a cohort folder needs it (make one with `vaeuda synth`).") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise VaeudaError(f"{path}: cannot be read as JSON ({exc}).") from None
    if not isinstance(splits, dict):
        raise VaeudaError(f"{path}: holds no JSON object of splits.")
    return splits


def cohort_split(cohort: Path, modality: str, split: str) -> List[str]:
    """The scan prefixes of ``splits.json`` -> ``modality`` -> ``split`` (e.g. "ct", "test")."""
    entry = read_splits(cohort).get(modality)
    prefixes = entry.get(split) if isinstance(entry, dict) else None
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise VaeudaError(f"{Path(cohort) / 'splits.json'}: has no \"{modality}\" -> \"{split}\" list of scan prefixes.")
    for prefix in prefixes:
        # a prefix names files in the cohort folder and, in experiment, outputs: never a path elsewhere
        if not prefix or prefix in (".", "..") or any(sep in prefix for sep in ("/", "\\", "\0")) or ":" in prefix:
            raise VaeudaError(f"{Path(cohort) / 'splits.json'}: {prefix!r} in \"{modality}\" -> \"{split}\" is not "
                              f"a scan prefix (a file name's start in the cohort folder, with no path in it).")
    return prefixes


def cohort_convention(cohort: Path):
    """The label convention of a cohort's label files: ``splits.json``'s ``"labels"`` (``mmwhs``,
    ``consecutive``, or a JSON mapping file, relative to the cohort folder), ``mmwhs`` without one."""
    from .labels import BUILTIN_CONVENTIONS, load_convention
    spec = read_splits(cohort).get("labels", "mmwhs")
    if not isinstance(spec, str) or not spec:
        raise VaeudaError(f"{Path(cohort) / 'splits.json'}: \"labels\" must name a label convention (mmwhs, "
                          f"consecutive or a mapping file), not {spec!r}.")
    return load_convention(spec if spec in BUILTIN_CONVENTIONS else str(Path(cohort) / spec))


def is_phantom_cohort(cohort: Path, seed: int, size: Optional[int]) -> bool:
    """True if ``cohort`` holds the default phantom cohort (20 MR and 20 CT subjects, 16 of each
    training) of this generator version, seed and size, so that it can be reused."""
    from .phantom import GENERATOR, N_SOURCE, N_TARGET, N_TRAIN, phantom_splits, split_prefixes
    splits = phantom_splits(cohort)
    return (splits is not None and splits.get("generator") == GENERATOR and splits.get("seed") == seed
            and splits.get("size") == size and splits.get("mr") == split_prefixes("mr", N_SOURCE, N_TRAIN)
            and splits.get("ct") == split_prefixes("ct", N_TARGET, N_TRAIN))


def image_of(cohort: Path, prefix: str) -> Path:
    return cohort / f"{prefix}_image.nii.gz"


def label_of(cohort: Path, prefix: str) -> Path:
    return cohort / f"{prefix}_label.nii.gz"


def evaluate_model(model: Path, cohort: Path, prefixes: Sequence[str], out_dir: Path, device: str,
                   reporter: Reporter) -> dict:
    """Segment ``prefixes`` of the cohort with ``model`` into ``out_dir`` and score them -> summary dict
    (label values in the cohort's convention, :func:`cohort_convention`)."""
    from .predict import segment_files

    segment_files(model, [image_of(cohort, p) for p in prefixes], out_dir, device=device, reporter=reporter)
    _, result = evaluate_dirs(out_dir, cohort, cohort_convention(cohort), out_dir / "evaluation.json",
                              ignore_unmatched_refs=True)
    return result


def coronal_slice_with_most_structure(labels: np.ndarray) -> int:
    """The coronal (y) index of a canonical LPS label array (z, y, x) that shows the most structures,
    and of those the one holding the most labelled voxels (a slice without one structure would
    leave it out of the figure's ground truth)."""
    shown = np.stack([(labels == c).any(axis=(0, 2)) for c in range(1, int(labels.max(initial=0)) + 1)]
                     ).sum(axis=0) if labels.max(initial=0) > 0 else np.zeros(labels.shape[1], int)
    voxels = (labels > 0).sum(axis=(0, 2))
    return int(np.lexsort((-voxels, -shown))[0])


def figure_fig2(cohort: Path, prefix: str, preds: Dict[str, Path], png: Path) -> int:
    """The paper's Fig. 2 layout: CT slice, ground truth, and one overlay per model (the whole
    prediction, before the largest-component step the scores take), a legend of the structures'
    colours, and the scan and slice in the title. Returns the coronal slice index shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from . import volumes
    from .labels import MMWHS

    image = volumes.to_canonical(volumes.read_image(image_of(cohort, prefix)))
    ref = volumes.to_canonical(volumes.read_label(label_of(cohort, prefix), MMWHS))
    import SimpleITK as sitk
    img = sitk.GetArrayFromImage(image)                      # (z, y, x) in LPS
    lab = sitk.GetArrayFromImage(ref)
    j = coronal_slice_with_most_structure(lab)
    panels = [("CT", None), ("Ground truth", lab)]
    for name, path in preds.items():
        pred = volumes.to_canonical(volumes.read_label(path, MMWHS))
        panels.append((name, sitk.GetArrayFromImage(pred)))
    colours = ListedColormap([(0, 0, 0, 0)] + [(*s.color, 0.55) for s in STRUCTURES])
    sx, _, sz = image.GetSpacing()
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    ct = img[::-1, j, :]
    lo, hi = np.percentile(ct, [1, 99])
    for ax, (name, mask) in zip(axes, panels):
        ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, aspect=sz / sx)
        if mask is not None:
            ax.imshow(mask[::-1, j, :], cmap=colours, vmin=0, vmax=len(STRUCTURES), interpolation="nearest",
                      aspect=sz / sx)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=s.color, label=s.name) for s in STRUCTURES], loc="lower center",
               ncol=len(STRUCTURES), fontsize=8, frameon=False)
    fig.suptitle(f"{prefix}, coronal slice {j} (of {lab.shape[1]}); overlays: whole predictions", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.94))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return j


SMOKE_NOTE = ("**Smoke run** (`--quick`): tiny networks, a few dozen iterations, small volumes. It shows that the "
              "pipeline runs end to end; its numbers say nothing about the method.")


def _training_record(preset: str, stage_meta: "OrderedDict[str, dict]") -> dict:
    """What each stage ran (report.json "training"): preset, device, engine, batch, iterations."""
    first = next(iter(stage_meta.values()))
    return {"preset": preset, "device": first["provenance"]["device"], "engine": first["provenance"]["engine"],
            "batch_size": first["train"]["batch_size"],
            "iterations": {stage: meta["provenance"]["iterations_done"] for stage, meta in stage_meta.items()}}


def _training_line(training: dict, n_mr: int, n_ct: int) -> str:
    its = training["iterations"]
    on_gpu = training["device"].startswith("cuda")
    return (f"Training: `{training['preset']}` preset on {training['device']}{' (bf16 autocast)' if on_gpu else ''}, "
            f"engine {training['engine']}, batch {training['batch_size']}: source model {its['source']} iterations "
            f"({n_mr} labelled MR), adaptation {its['adapt']} (1 unlabelled CT), oracle fine-tuning "
            f"{its['finetune']} ({n_ct} labelled CT).")


def _voxel_sizes(volumes: Sequence[dict]) -> str:
    """``"1.36-1.40 x 1.36-1.40 x 2.21-2.38"``: the spacing (x, y, z) of the scored volumes, which ASSD [voxel]
    counts in, each axis as its range over them (the phantom's volumes differ) or one value."""
    spacing = np.array([v["spacing_zyx"][::-1] for v in volumes], dtype=float)
    ends = [(f"{lo:.2f}", f"{hi:.2f}") for lo, hi in zip(spacing.min(axis=0), spacing.max(axis=0))]
    return " x ".join(lo if lo == hi else f"{lo}-{hi}" for lo, hi in ends)


def _paper_line() -> str:
    """The paper's mean Dice of the demo's three rows (Table 1), and the adapted / oracle ratio."""
    from .experiment import PAPER_TABLE1
    una, ada, ora = (PAPER_TABLE1[row]["dice"][-1][0] for row in ("Unadapted", "Proposed-1", "Oracle"))
    return (f"unadapted {una:.2f}, Proposed-1 {ada:.2f}, oracle {ora:.2f} mean Dice "
            f"({100 * ada / ora:.1f} % of the oracle)")


def note_replaced(reporter: Reporter, out: Path, outputs: Sequence[Path]) -> None:
    """Say which of a run's own outputs (files, and the ``pred`` folder whose segmentations it
    replaces) an earlier run left in ``out``: this run replaces them."""
    there = [str(path.relative_to(out)) for path in outputs if os.path.lexists(path)]
    if there:
        reporter.log(f"{out} holds an earlier run's {listed(there)}; this run replaces "
                     f"{'it' if len(there) == 1 else 'them'}.")


def run_demo(out, quick: bool = False, seed: int = 0, device: str = "auto",
             reporter: Optional[Reporter] = None, intensity_remap: bool = False) -> List[Path]:
    """Run the whole pipeline; returns the report files. ``quick``: small cohort, few iterations.
    ``intensity_remap``: the source model is trained with ``train_source(intensity_remap=True)``
    (not the paper's method)."""
    from .phantom import make_cohort
    from .train import adapt, finetune, resolve_device, train_source

    reporter = reporter or null_reporter()
    resolve_device(device)               # --device cuda without a GPU: refused before the cohort is made
    out = make_dir(check_output_dir(out))
    cohort = out / "cohort"
    models = out / "models"
    source_model, adapted_model, oracle_model = (models / f"{name}.safetensors"
                                                 for name in ("source", "adapted", "oracle"))
    report_md, report_json, png = out / "report.md", out / "report.json", out / "fig2.png"
    note_replaced(reporter, out, (report_md, report_json, png, source_model, adapted_model, oracle_model,
                                  out / "pred"))
    timings: Dict[str, float] = OrderedDict()
    # quick: a smoke run of the same pipeline (tiny preset, small volumes); default: the cpu preset,
    # on a GPU too (train-source alone would take the paper preset there: hours, not minutes)
    preset = "tiny" if quick else "cpu"
    # 3x the tiny preset's own counts (DEFAULT_ITERATIONS["tiny"], sized for unit tests): still seconds
    iters = {"source": 60, "adapt": 30, "finetune": 30} if quick else {}

    t = time.time()
    size = 48 if quick else None
    reused = is_phantom_cohort(cohort, seed, size)
    if not reused:
        reporter.log(f"making the synthetic cohort in {cohort}")
        make_cohort(cohort, seed=seed, size=size, reporter=reporter)
    timings["cohort (reused from an earlier run)" if reused else "cohort"] = time.time() - t
    mr_train = cohort_split(cohort, "mr", "train")
    ct_train, ct_test = cohort_split(cohort, "ct", "train"), cohort_split(cohort, "ct", "test")
    target = random.Random(seed).choice(ct_train)   # the one unlabelled CT scan
    reporter.log(f"adapting with one CT scan: {target}")

    t = time.time()
    stage_meta = OrderedDict()
    stage_meta["source"] = train_source(
                 [image_of(cohort, p) for p in mr_train], [label_of(cohort, p) for p in mr_train], source_model,
                 preset=preset, iterations=iters.get("source"), seed=seed, device=device, reporter=reporter,
                 intensity_remap=intensity_remap)
    timings[f"train source ({len(mr_train)} MR)"] = time.time() - t

    t = time.time()
    stage_meta["adapt"] = adapt(source_model, [image_of(cohort, target)], adapted_model,
                                iterations=iters.get("adapt"), seed=seed, device=device, reporter=reporter)
    timings["adapt (1 CT)"] = time.time() - t

    t = time.time()
    stage_meta["finetune"] = finetune(
        source_model, [image_of(cohort, p) for p in ct_train], [label_of(cohort, p) for p in ct_train],
        oracle_model, iterations=iters.get("finetune"), seed=seed, device=device, reporter=reporter)
    timings[f"oracle fine-tune ({len(ct_train)} labelled CT)"] = time.time() - t

    t = time.time()
    runs = OrderedDict([(ROW_UNADAPTED, source_model), (ROW_ADAPTED, adapted_model), (ROW_ORACLE, oracle_model)])
    results = OrderedDict()
    for name in ROWS:                   # the report's order: the table and report.json list them so
        pred_dir = out / "pred" / name.split()[0].lower()
        results[name] = evaluate_model(runs[name], cohort, ct_test, pred_dir, device, reporter)
    timings["segment + evaluate 4 test CT x 3 models"] = time.time() - t

    first = ct_test[0]
    slice_shown = figure_fig2(cohort, first, OrderedDict(
        (name, out / "pred" / name.split()[0].lower() / f"{first}_image_seg.nii.gz") for name in runs), png)

    from .modelfile import read_tensors
    # what two computers compare to tell the same models from other ones (`vaeuda info` prints it too)
    weights = OrderedDict((name, read_tensors(model)[2]["tensors_sha256"]) for name, model in runs.items())
    summaries = OrderedDict((name, r["summary"]) for name, r in results.items())
    table = table_markdown(summaries, metrics=METRICS)
    mean = OrderedDict((name, s["Mean"]["dice"]["mean"] * 100) for name, s in summaries.items())
    # as shown: the gain is their difference
    una, ada, ora = (round(mean[k], 2) for k in (ROW_UNADAPTED, ROW_ADAPTED, ROW_ORACLE))
    total = sum(timings.values())
    training = _training_record(preset, stage_meta)
    n_test = len(ct_test)
    summary = [
        "# VAE-UDA demo report", "",
        *([SMOKE_NOTE, ""] if quick else []),
        f"Synthetic cohort (seed {seed}, which also draws the adaptation scan and seeds every training): source = "
        f"{len(mr_train)} labelled MR, target = ONE unlabelled CT ({target}), evaluated on the {n_test} held-out CT "
        f"test volumes ({', '.join(ct_test)})."
        + (" The source model was trained with `--intensity-remap` (random intensity remapping, GIN; not part of "
           "the 2019 method)." if intensity_remap else ""), "",
        _training_line(training, len(mr_train), len(ct_train)), "",
        f"Dice [%], ASSD [voxel] and ASSD [mm] per structure on the largest 3D component, mean (population std) "
        f"over the {n_test} test volumes; the Mean column pools all structure x volume values, as the paper's "
        f"Table 1 does, and the rows come in its order ({', '.join(ROWS)}). ASSD [voxel] is the paper's unit: "
        f"the distance counted in voxels of each test volume, which measure "
        f"{_voxel_sizes(results[ROW_ORACLE]['volumes'])} mm (x, y, z) here; the paper's voxels are those of its "
        f"resampled 256 x 256 slices, so the two compare in kind, not in size. ASSD [mm] is the same distance in "
        f"millimetres.", "",
        table,
        f"- Adaptation gain in mean Dice: {ada - una:+.2f} points (unadapted {una:.2f} -> adapted {ada:.2f}).",
        f"- Adapted / oracle mean Dice: {100 * ada / ora if ora else float('nan'):.1f}%.",
        "- One draw of the adaptation scan; the paper averages six: `benchmarks/one_scan_draws.py` adapts "
        "this source model on six.",
        f"- The paper, on real MM-WHS scans (six draws, 3x256x256 slices, a GPU): {_paper_line()}; these are "
        f"synthetic scans and one draw.", "",
    ]
    machine_line = machine.description()        # one reading for both reports
    lines = summary + [
        "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        f"| **total** | **{total:.1f}** |", "",
        f"Machine: {machine_line}.", "",
        "Weights, SHA-256 of the tensors (first 16 hex digits; `vaeuda info MODEL` prints them whole): "
        + ", ".join(f"{runs[name].name} `{digest[:16]}`" for name, digest in weights.items()) + ".", "",
        f"![{ct_test[0]}, coronal slice {slice_shown}: CT, ground truth and the three models' segmentations]"
        f"(fig2.png)", "",
    ]
    with atomic_path(report_md) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    payload = {"seed": seed, "quick": quick, "intensity_remap": intensity_remap, "target_scan": target,
               "test_scans": ct_test, "training": training,
               "figure": {"scan": ct_test[0], "coronal_slice": slice_shown},
               "timings_s": timings, "total_s": total, "machine": machine_line,
               "units": UNITS, "mean_dice": mean, "weights_sha256": weights, "results": results}
    with atomic_path(report_json) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=lambda v: None), encoding="utf-8")
    reporter.log(f"report written to {report_md}")
    if reporter.mode != "json":
        write_stdout("\n".join(summary + [f"Total {total:.1f} s; the full report with the stage times: {report_md}"]))
    return [report_md, report_json, png]
