"""``vaeuda experiment table1``: the paper's Table 1 protocol and its ablations on a cohort.

Ouyang et al. (MICCAI 2019), Sec. 3. One source model is trained on the labelled MR training
scans; every row below starts from it and is evaluated on the CT test split (Dice and ASSD on
the largest 3D component, :mod:`metrics`). Rows, in the paper's order (Table 1, then the
ablation and few-shot paragraphs):

=============================  ==================================================================
Oracle                         supervised fine-tuning on all labelled CT training scans
Unadapted                      the source model applied to CT
Proposed-16                    adaptation with all CT training scans (labels unused)
Proposed-1                     adaptation with ONE CT scan, repeated on ``repeats`` seeded draws;
                               mean (std) pool all repeats x test volumes
Proposed-1, no KL              the same draws and seeds, prior matching off (``use_kl=False``)
Proposed-1, no adversarial     the same draws and seeds, adversarial terms off (``use_adv=False``)
Few-shot (3 slices)            3 consecutive coronal slices of the first draw that cross at least
                               3 of the 4 structures, with early stopping
=============================  ==================================================================

The few-shot slices are picked with the scan's label (as the paper did); adaptation never sees
a label. Adaptation curves (test Dice against iteration) are recorded for the first draw of
Proposed-1, both ablations and few-shot through ``train.adapt``'s ``callback``.

Outputs in ``DIR``: ``table1.md``, ``table1.json``, ``table1_dice.png``, ``curves.png``,
``models/`` and ``pred/``. Each model has a ``<name>.run.json`` record beside it; a rerun with
the same settings reuses a model whose record matches instead of training it again, so an
interrupted run picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import machine
from .demo import (METRICS, REFERENCE_ROWS, ROW_ORACLE, ROW_UNADAPTED, cohort_convention, cohort_split, evaluate_model,
                   image_of, label_of, note_replaced, read_splits)
from .errors import MAX_ITERATIONS, MAX_SEED, VaeudaError, require_count
from .fileio import atomic_path, check_output_dir, make_dir
from .labels import CLASS_KEYS, STRUCTURES
from .metrics import MEAN_KEY, METRIC_UNITS, _json_ready, evaluate_volume, summarise, table_markdown
from .progress import Reporter, null_reporter

ROW_P16 = "Proposed-16"
ROW_P1 = "Proposed-1"
ROW_NO_KL = "Proposed-1, no KL"
ROW_NO_ADV = "Proposed-1, no adversarial"
ROW_FEW_SHOT = "Few-shot (3 slices)"
ROWS = REFERENCE_ROWS + (ROW_P16, ROW_P1, ROW_NO_KL, ROW_NO_ADV, ROW_FEW_SHOT)     # the paper's order
CURVE_ROWS = (ROW_P1, ROW_NO_KL, ROW_NO_ADV, ROW_FEW_SHOT)

CURVE_POINTS = 20          # evaluations per adaptation run: eval_every = adapt iterations // this
FEW_SHOT_SLICES = 3
FEW_SHOT_MIN_STRUCTURES = 3
FEW_SHOT_PATIENCE = 3      # early stop after this many evaluations without improvement of the proxy
MAX_REPEATS = 1000         # the paper draws 6; each repeat trains four adaptations: more is a slip, not a plan
# The few-shot run evaluates its proxy as `vaeuda adapt --early-stop` does (its eval_every), not
# at the curves' spacing: the patience counts evaluations, so a finer curve would otherwise stop
# the run after fewer iterations (3 x 12 instead of 3 x 50 at the cpu preset).
OSCILLATION_MARGIN = 1.0   # Dice points of second-half std above Proposed-1's that count as oscillating

# Ouyang et al. 2019, Table 1 (MM-WHS, MR -> CT): (mean, std) for LV-M, LA-B, LV-B, A-A, Mean.
PAPER_UNITS = {"dice": "percent", "assd_vox": "voxel"}
PAPER_TABLE1 = OrderedDict([
    ("Oracle", {"dice": ((82.35, 2.29), (88.45, 1.92), (89.28, 3.42), (87.92, 12.33), (87.00, 7.11)),
                "assd_vox": ((6.03, 1.16), (8.26, 2.67), (7.08, 3.08), (1.61, 1.13), (5.74, 3.34))}),
    ("Unadapted", {"dice": ((12.25, 14.92), (46.05, 20.32), (1.42, 2.31), (20.39, 10.96), (20.03, 21.47)),
                   "assd_vox": ((24.46, 12.07), (22.81, 21.91), (47.11, 17.91), (42.72, 12.61), (34.28, 19.81))}),
    ("PnP-AdaNet-16", {"dice": ((49.89, 5.13), (77.37, 3.71), (60.41, 11.97), (78.75, 3.88), (66.61, 13.96)),
                       "assd_vox": ((10.00, 3.20), (4.04, 0.76), (8.60, 1.93), (2.28, 0.84), (6.22, 3.72))}),
    ("SIFA-16", {"dice": ((63.58, 3.30), (80.03, 3.21), (79.90, 7.51), (79.58, 3.64), (75.77, 8.50)),
                 "assd_vox": ((3.44, 0.40), (3.89, 0.85), (3.31, 1.41), (2.64, 1.85), (3.32, 1.32))}),
    ("PnP-AdaNet-1", {"dice": ((29.00, 17.34), (48.06, 21.70), (33.48, 23.51), (58.19, 19.81), (42.19, 23.75)),
                      "assd_vox": ((25.18, 28.10), (27.19, 37.18), (27.74, 28.70), (7.14, 5.43), (21.81, 28.79))}),
    ("SIFA-1", {"dice": ((39.76, 19.86), (76.65, 6.29), (53.36, 24.42), (80.27, 5.81), (62.51, 23.35)),
                "assd_vox": ((12.58, 11.16), (4.12, 1.19), (7.70, 4.45), (2.72, 1.07), (6.78, 7.16))}),
    ("Proposed-1", {"dice": ((60.21, 15.89), (78.25, 9.88), (71.88, 17.93), (78.38, 13.21), (72.18, 16.31)),
                    "assd_vox": ((7.37, 10.87), (3.87, 1.23), (6.44, 2.18), (2.77, 3.21), (5.11, 6.09))}),
])
# What the paper's text says of the rows its table does not hold (mean Dice [%]).
PAPER_TEXT = {ROW_NO_KL: "< 55, oscillates", ROW_NO_ADV: "< 55, oscillates",
              ROW_FEW_SHOT: "> 60 with early stopping", ROW_P16: "not reported (SIFA-16: 75.77)"}
PAPER_BOUNDS = {ROW_NO_KL: 55.0, ROW_NO_ADV: 55.0, ROW_FEW_SHOT: 60.0}   # the same, as numbers for the figure


# ----------------------------------------------------------------------------- protocol pieces

def _clear_predictions(folder: Path) -> None:
    """Remove what an earlier run wrote in a run's prediction folder (``*_seg.nii.gz``,
    ``evaluation.json``), so that no stale prediction is scored; other files (a user's) are kept."""
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.is_file() and (item.name.endswith("_seg.nii.gz") or item.name == "evaluation.json"):
            item.unlink()


def scaled_iterations(preset: str, stage: str, scale: float) -> int:
    """``round(DEFAULT_ITERATIONS[preset][stage] * scale)``, at least 1."""
    from .train import DEFAULT_ITERATIONS
    return max(1, int(round(DEFAULT_ITERATIONS[preset][stage] * scale)))


def draw_targets(pool: Sequence[str], repeats: int, seed: int) -> List[str]:
    """``repeats`` scans from ``pool`` drawn with ``random.Random(seed)``: without replacement when
    the pool is large enough, else with. The first draw is the demo's (``Random(seed).choice``)."""
    rng = random.Random(seed)
    if repeats <= len(pool):
        return rng.sample(list(pool), repeats)
    return [rng.choice(list(pool)) for _ in range(repeats)]


def structures_per_slice(label_slices: np.ndarray) -> np.ndarray:
    """``label_slices`` (N, S, S) class indices -> (N, 4) bool: which structures each slice shows."""
    return np.stack([(label_slices == s.index).any(axis=(1, 2)) for s in STRUCTURES], axis=1)


def pick_few_shot_window(label_slices: np.ndarray, n: int = FEW_SHOT_SLICES,
                         min_structures: int = FEW_SHOT_MIN_STRUCTURES) -> Tuple[int, int]:
    """The ``n`` consecutive slices ``[a, a + n)`` that together cross at least ``min_structures``
    structures. ``label_slices``: (N, S, S) class indices, as ``SliceGrid.label_slices``.

    Among qualifying windows the one whose poorest slice shows the most structures wins, then
    the one with the most structure voxels (a window in the middle of the heart), then the
    first (the lowest slice index). Raises ValueError when no window qualifies.
    """
    present = structures_per_slice(label_slices)
    area = (label_slices > 0).reshape(len(label_slices), -1).sum(axis=1)
    best, best_key = None, None
    for a in range(len(label_slices) - n + 1):
        window = present[a:a + n]
        if window.any(axis=0).sum() < min_structures:
            continue
        key = (int(window.sum(axis=1).min()), int(area[a:a + n].sum()))
        if best_key is None or key > best_key:
            best, best_key = a, key
    if best is None:
        raise ValueError(f"no {n} consecutive slices cross {min_structures} structures")
    return best, best + n


def _few_shot_slices(cohort: Path, prefix: str, size: int, fov_mm: Optional[float]) -> dict:
    """Pick the few-shot window of scan ``prefix`` from its label -> {"scan", "slices", "structures"}."""
    from . import volumes

    image = volumes.read_image(image_of(cohort, prefix))
    grid = volumes.SliceGrid.from_image(image, size, fov_mm)
    labels = grid.label_slices(volumes.read_label(label_of(cohort, prefix), cohort_convention(cohort),
                                                  reference=image))
    try:
        a, b = pick_few_shot_window(labels)
    except ValueError:
        raise VaeudaError(f"{label_of(cohort, prefix)}: no {FEW_SHOT_SLICES} consecutive coronal slices cross "
                          f"{FEW_SHOT_MIN_STRUCTURES} of the 4 structures, so the few-shot row cannot be run.") from None
    shown = structures_per_slice(labels[a:b])
    return {"scan": prefix, "slices": [a, b],
            "structures": [[k for k, on in zip(CLASS_KEYS, row) if on] for row in shown],
            "union": [k for k, on in zip(CLASS_KEYS, shown.any(axis=0)) if on]}


class HeldOutDiceProbe:
    """``train.adapt`` callback: Dice on the CT test volumes of the network the model file will hold
    (the weight average, when one is kept).

    The test volumes are cut into model slices once (``SliceGrid.image_slices``); each call runs
    the target encoder path on them, puts the scores back on the volume grid (what
    ``predict.segment_image`` does after slicing) and scores every volume with
    ``metrics.evaluate_volume``. Returns ``{"test_dice_mean", "test_dice": {structure: mean},
    "test_assd_vox_mean", "test_assd_vox_undefined"}`` (per structure, means over volumes; the
    ``_mean`` keys pool structures x volumes, which is the mean of the structures' means when
    nothing is missing; Dice as a fraction;
    the ASSD mean leaves out the structure x volume entries whose ASSD is undefined, a structure
    missing from the prediction or the reference, and the last key counts them).
    """

    def __init__(self, cohort: Path, prefixes: Sequence[str], size: int, fov_mm: Optional[float],
                 normalisation: dict, device):
        import SimpleITK as sitk

        from . import volumes
        self.device = device
        self.seconds = 0.0          # time spent in calls, so run timings can leave it out
        self.volumes = []
        convention = cohort_convention(cohort)
        for prefix in prefixes:
            image = volumes.read_image(image_of(cohort, prefix))
            grid = volumes.SliceGrid.from_image(image, size, fov_mm)
            ref = volumes.read_label(label_of(cohort, prefix), convention, reference=image)
            self.volumes.append((grid, grid.image_slices(image, normalisation), sitk.GetArrayFromImage(ref),
                                 tuple(reversed(ref.GetSpacing()))))

    def __call__(self, iteration: int, net, live=None) -> dict:
        import SimpleITK as sitk

        from .predict import slice_probabilities
        started = time.time()
        scores = []
        for grid, slices, ref, spacing_zyx in self.volumes:
            probs = slice_probabilities(net, slices, "target", self.device)
            # a copy: a view into the temporary image would outlive it and read freed memory
            pred = sitk.GetArrayFromImage(grid.scores_to_image(probs))
            scores.append(evaluate_volume(pred, ref, spacing_zyx))
        summary = summarise(scores)
        assd = summary[MEAN_KEY]["assd_vox"]
        self.seconds += time.time() - started
        return {"test_dice_mean": round(summary[MEAN_KEY]["dice"]["mean"], 5),
                "test_dice": {k: round(summary[k]["dice"]["mean"], 5) for k in CLASS_KEYS},
                "test_assd_vox_mean": None if math.isnan(assd["mean"]) else round(assd["mean"], 4),
                "test_assd_vox_undefined": assd["n_missing"]}


def curve_stats(values: Sequence[float]) -> dict:
    """Summary of a test-Dice curve: final and best value, and how much the second half moves
    (std, and mean |change| between consecutive evaluations): small for a converged run."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0, "final": None, "best": None, "second_half_std": None, "second_half_mean_abs_step": None}
    half = v[v.size // 2:]
    return {"n": int(v.size), "final": float(v[-1]), "best": float(v.max()),
            "second_half_std": float(half.std()),
            "second_half_mean_abs_step": float(np.abs(np.diff(half)).mean()) if half.size > 1 else 0.0}


# ----------------------------------------------------------------------------- runs

def _json_text(value) -> str:
    return json.dumps(_json_ready(value), indent=1, allow_nan=False) + "\n"


def _normalised(spec: dict) -> dict:
    """The spec as it reads back from JSON (tuples become lists), so records compare equal."""
    return json.loads(json.dumps(_json_ready(spec)))


def cohort_state(cohort: Path) -> str:
    """A digest of the cohort as it is now: ``splits.json`` and the files of every scan it names
    (names, sizes, modification times). A cohort made again in the same folder (another seed) is
    another cohort; files it does not name (reports written beside it) do not count."""
    prefixes = [p for modality in ("mr", "ct") for split in ("train", "test")
                for p in cohort_split(cohort, modality, split)]
    h = hashlib.sha256()
    for item in sorted(Path(cohort).iterdir()):
        if item.is_file() and (item.name == "splits.json" or any(item.name.startswith(p + "_") for p in prefixes)):
            stat = item.stat()
            h.update(f"{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def run_settings(cohort: Path, preset: str, device_type: str) -> dict:
    """What every model of a Table-1 run shares; a model whose record holds other settings is not
    reused. The engine's training defaults are among them (a model an older engine trained is
    retrained): every training option as the stages resolve it (batch size, learning rates, loss
    weights, augmentation, ...), the preset's networks and the engine's version; so are
    ``--portable`` (a portable rerun must not reuse default-numerics models) and the cohort's files
    (:func:`cohort_state`)."""
    from . import __version__
    from .nets import get_preset
    from .train import ADAPT_TRAINING, resolve_train_config
    training = {"all": resolve_train_config(None, None, preset).to_dict(),
                "adapt": resolve_train_config(None, None, preset, ADAPT_TRAINING.get(preset)).to_dict()}
    return {"cohort": str(Path(cohort).resolve()), "cohort_state": cohort_state(cohort), "preset": preset,
            "device": device_type, "training": training, "network": get_preset(preset).to_dict(),
            "engine_version": __version__, "portable": machine.portable()}


def _trained(models: Path, name: str, spec: dict, train: Callable[[Path], dict],
             reporter: Reporter, curve_clock: Callable[[], float] = lambda: 0.0) -> Tuple[Path, dict]:
    """Train ``models/<name>.safetensors`` with ``train(path) -> meta``, or reuse it when its
    record ``<name>.run.json`` holds the same ``spec``. Returns (model path, record). The record
    keeps the training's seconds and, of those, the seconds ``curve_clock`` (a running total of
    held-out evaluations) advanced by, so that a reused model reports both as first measured."""
    spec = _normalised(spec)
    model, record_path = models / f"{name}.safetensors", models / f"{name}.run.json"
    if model.exists() and record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and record.get("spec") == spec:
            reporter.log(f"reusing {model}: trained earlier with the same settings")
            return model, dict(record, reused=True)
    t, curve_before = time.time(), curve_clock()
    meta = train(model)
    record = {"spec": spec, "seconds": round(time.time() - t, 2),
              "seconds_curve": round(curve_clock() - curve_before, 2), "history": meta.get("history", []),
              "normalisation": meta.get("normalisation"), "provenance": meta.get("provenance", {})}
    with atomic_path(record_path) as tmp:
        tmp.write_text(_json_text(record), encoding="utf-8")
    return model, dict(_normalised(record), reused=False)


def _volume_results(result: dict) -> List[dict]:
    """evaluate_dirs' JSON volumes (undefined ASSD as None) -> [{"name", "metrics"}] with NaN back."""
    def nan(v):
        return float("nan") if v is None else v
    return [{"name": v["name"],
             "metrics": OrderedDict((k, {m: nan(x) for m, x in cell.items()}) for k, cell in v["metrics"].items())}
            for v in result["volumes"]]


def _check_cohort(cohort: Path) -> Tuple[List[str], List[str], List[str]]:
    """(MR train, CT train, CT test) prefixes of a cohort folder; VaeudaError for anything missing,
    a scan listed twice in a split, or a CT test scan that is also a training one."""
    if not cohort.is_dir():
        raise VaeudaError(f"{cohort}: cohort folder not found.")
    names = (("mr", "train"), ("ct", "train"), ("ct", "test"))
    splits = [cohort_split(cohort, m, s) for m, s in names]
    for (modality, split), prefixes in zip(names, splits):
        if not prefixes:
            raise VaeudaError(f"{cohort / 'splits.json'}: the {modality} {split} split is empty; Table 1 needs "
                              f"labelled MR training scans and CT training and test scans.")
    for (modality, split), prefixes in zip(names, splits):
        twice = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if twice:
            raise VaeudaError(f"{cohort / 'splits.json'}: {twice[0]} is listed twice in the {modality} {split} split.")
    leaked = sorted(set(splits[1]) & set(splits[2]))
    if leaked:    # the oracle would fine-tune on it and adaptation could draw it, then it is scored as held out
        raise VaeudaError(f"{cohort / 'splits.json'}: {leaked[0]} is in both the ct train and test splits; a "
                          f"held-out test scan must not be trained on.")
    for (modality, split), prefixes in zip(names, splits):
        for prefix in prefixes:
            for path in (image_of(cohort, prefix), label_of(cohort, prefix)):
                if not path.is_file():
                    raise VaeudaError(f"{path}: listed in splits.json ({modality} {split}) but not found.")
    return splits[0], splits[1], splits[2]


# ----------------------------------------------------------------------------- the protocol

def run_table1(data, out, repeats: int = 6, preset: Optional[str] = None, seed: int = 0, device: str = "auto",
               iterations_scale: float = 1.0, reporter: Optional[Reporter] = None) -> List[Path]:
    """Run the Table 1 protocol on the cohort folder ``data`` (with ``splits.json``) into ``out``.

    ``preset``: None picks "paper" with a CUDA GPU, else "cpu" (as ``train_source``). Each stage
    runs ``round(DEFAULT_ITERATIONS[preset][stage] * iterations_scale)`` iterations (at least 1).
    Returns ``[table1.md, table1.json, table1_dice.png, curves.png]`` in ``out``.
    """
    from .nets import get_preset
    from .train import EARLY_STOP_PROXY, adapt, finetune, resolve_device, train_source

    reporter = reporter or null_reporter()
    require_count("--repeats", repeats, maximum=MAX_REPEATS)
    if seed + repeats - 1 > MAX_SEED:      # repeat k adapts with seed + k
        raise VaeudaError(f"--seed {seed} leaves no room for {repeats} repeats: they use seeds {seed} to "
                          f"{seed + repeats - 1}, and the largest is {MAX_SEED}.")
    if not (isinstance(iterations_scale, (int, float)) and iterations_scale > 0 and math.isfinite(iterations_scale)):
        raise VaeudaError(f"--iterations-scale must be a positive number, not {iterations_scale}.")
    cohort, out = Path(data), check_output_dir(out)
    mr_train, ct_train, ct_test = _check_cohort(cohort)
    dev = resolve_device(device)
    preset = preset or ("paper" if dev.type == "cuda" else "cpu")
    size, fov = get_preset(preset).input_size, get_preset(preset).slice_fov_mm
    iterations = {stage: scaled_iterations(preset, stage, iterations_scale) for stage in ("source", "adapt", "finetune")}
    most = max(iterations, key=iterations.get)
    if iterations[most] > MAX_ITERATIONS:       # (before any folder is made)
        raise VaeudaError(f"--iterations-scale {iterations_scale} gives {iterations[most]:,} {most} iterations; at most "
                          f"{MAX_ITERATIONS:,} are run.")
    eval_every = max(1, iterations["adapt"] // CURVE_POINTS)
    draws = draw_targets(ct_train, repeats, seed)
    few_shot = _few_shot_slices(cohort, draws[0], size, fov)      # fails before any training if impossible
    models, preds = out / "models", out / "pred"
    make_dir(models)
    md, js = out / "table1.md", out / "table1.json"
    dice_png, curves_png = out / "table1_dice.png", out / "curves.png"
    note_replaced(reporter, out, (md, js, dice_png, curves_png, preds))   # (its models are reused when they match)
    if repeats > len(ct_train):     # said: repeated scans make the draws' spread look smaller than it is
        reporter.log(f"note: {repeats} draws from {len(ct_train)} CT training scan(s): drawn with replacement, so "
                     f"some scans repeat")
    reporter.log(f"Table 1 on {cohort}: preset {preset}, iterations {iterations}, draws {draws}, "
                 f"few-shot slices {few_shot['slices'][0]}:{few_shot['slices'][1]} of {few_shot['scan']}")
    started = time.time()

    base = run_settings(cohort, preset, dev.type)
    # the spacing `vaeuda adapt` evaluates its early-stop proxy at, as the stage resolves it
    few_shot_eval_every = min(base["training"]["adapt"]["eval_every"], iterations["adapt"])
    source_model, source_record = _trained(
        models, "source", dict(base, stage="source", scans=mr_train, iterations=iterations["source"], seed=seed),
        lambda path: train_source([image_of(cohort, p) for p in mr_train], [label_of(cohort, p) for p in mr_train],
                                  path, preset=preset, iterations=iterations["source"], seed=seed, device=device,
                                  convention=cohort_convention(cohort), reporter=reporter),
        reporter)
    # Downstream models name the source run they start from, so a retrained source retrains them.
    base["source_started"] = source_record["provenance"].get("started")
    normalisation = source_record["normalisation"]
    probe: Optional[HeldOutDiceProbe] = None

    def adapt_run(name: str, targets: Sequence[str], run_seed: int, use_kl: bool = True, use_adv: bool = True,
                  slices: Optional[Sequence[int]] = None, curve: bool = False) -> Tuple[Path, dict]:
        nonlocal probe
        if curve and probe is None:
            probe = HeldOutDiceProbe(cohort, ct_test, size, fov, normalisation, dev)
        early_stop = FEW_SHOT_PATIENCE if slices else None
        every = few_shot_eval_every if slices else eval_every
        spec = dict(base, stage="adapt", targets=list(targets), iterations=iterations["adapt"], seed=run_seed,
                    use_kl=use_kl, use_adv=use_adv, slices=slices, early_stop=early_stop, eval_every=every,
                    curve=curve, **({"early_stop_proxy": EARLY_STOP_PROXY} if early_stop else {}))
        return _trained(models, name, spec, lambda path: adapt(
            source_model, [image_of(cohort, t) for t in targets], path, iterations=iterations["adapt"],
            seed=run_seed, device=device, use_kl=use_kl, use_adv=use_adv,
            slice_range=tuple(slices) if slices else None, early_stop=early_stop, reporter=reporter,
            callback=probe if curve else None, overrides={"eval_every": every}), reporter,
            curve_clock=lambda: probe.seconds if probe is not None else 0.0)

    # name -> list of (model file name stem, targets, seed, thunk giving (model, record))
    plan: "OrderedDict[str, List[Tuple[str, List[str], int, Callable[[], Tuple[Path, dict]]]]]" = OrderedDict()
    plan[ROW_ORACLE] = [("oracle", list(ct_train), seed, lambda: _trained(
        models, "oracle", dict(base, stage="finetune", scans=ct_train, iterations=iterations["finetune"], seed=seed),
        lambda path: finetune(source_model, [image_of(cohort, p) for p in ct_train],
                              [label_of(cohort, p) for p in ct_train], path, iterations=iterations["finetune"],
                              seed=seed, device=device, reporter=reporter), reporter))]
    plan[ROW_UNADAPTED] = [("source", [], seed, lambda: (source_model, source_record))]
    plan[ROW_P16] = [("proposed16", list(ct_train), seed, lambda: adapt_run("proposed16", ct_train, seed))]
    for row, stem_, switches in ((ROW_P1, "proposed1", {}), (ROW_NO_KL, "nokl", {"use_kl": False}),
                                 (ROW_NO_ADV, "noadv", {"use_adv": False})):
        plan[row] = []
        for k, target in enumerate(draws):
            name = f"{stem_}_r{k + 1}_{target}"
            # Repeat k uses seed + k in all three rows: the ablations differ from Proposed-1 only by the switch.
            plan[row].append((name, [target], seed + k,
                              lambda name=name, target=target, k=k, sw=switches:
                              adapt_run(name, [target], seed + k, curve=k == 0, **sw)))
    fs_name = f"fewshot_{few_shot['scan']}_{few_shot['slices'][0]}-{few_shot['slices'][1]}"
    plan[ROW_FEW_SHOT] = [(fs_name, [few_shot["scan"]], seed,
                           lambda: adapt_run(fs_name, [few_shot["scan"]], seed, slices=few_shot["slices"], curve=True))]

    rows: "OrderedDict[str, dict]" = OrderedDict()
    total_runs = sum(len(v) for v in plan.values())
    done = 0
    for row, runs in plan.items():
        row_runs = []
        for name, targets, run_seed, train_it in runs:
            done += 1
            reporter.log(f"[{done}/{total_runs}] {row}: {name}")
            model, record = train_it()
            t = time.time()
            _clear_predictions(preds / name)     # no stale predictions in the scores; nothing else of the folder
            result = evaluate_model(model, cohort, ct_test, preds / name, device, reporter)
            volumes_ = _volume_results(result)
            row_runs.append({"name": name, "model": str(model), "targets": targets, "seed": run_seed,
                             "seconds_train": record.get("seconds", 0.0),
                             "seconds_curve": record.get("seconds_curve", 0.0),
                             "seconds_eval": round(time.time() - t, 2),
                             "reused": bool(record.get("reused")), "iterations_done":
                                 record.get("provenance", {}).get("iterations_done"),
                             "early_stopped_at": record.get("provenance", {}).get("early_stopped_at"),
                             "summary": summarise([v["metrics"] for v in volumes_]), "volumes": volumes_,
                             "history": record.get("history", []) if row != ROW_UNADAPTED else []})
        pooled = [v["metrics"] for r in row_runs for v in r["volumes"]]
        rows[row] = {"n_runs": len(row_runs), "n_volumes": len(pooled), "summary": summarise(pooled), "runs": row_runs}

    curves = OrderedDict((row, [{k: e.get(k) for k in ("iteration", "test_dice_mean", "test_dice",
                                                         "test_assd_vox_mean", "test_assd_vox_undefined", "proxy")}
                                for e in rows[row]["runs"][0]["history"] if "test_dice_mean" in e])
                         for row in CURVE_ROWS)
    mean_dice = OrderedDict((row, 100 * rows[row]["summary"][MEAN_KEY]["dice"]["mean"]) for row in ROWS)
    stats = OrderedDict((row, curve_stats([100 * e["test_dice_mean"] for e in c])) for row, c in curves.items())
    findings = check_findings(mean_dice, stats)
    timings = OrderedDict((row, {"train_s": round(sum(r["seconds_train"] for r in rows[row]["runs"]), 1),
                                 "curve_s": round(sum(r["seconds_curve"] for r in rows[row]["runs"]), 1),
                                 "eval_s": round(sum(r["seconds_eval"] for r in rows[row]["runs"]), 1)})
                          for row in ROWS)
    protocol = {"cohort": str(cohort), "preset": preset, "seed": seed, "repeats": repeats, "device": str(dev),
                "iterations_scale": iterations_scale, "iterations": iterations, "eval_every": eval_every,
                "few_shot_patience": FEW_SHOT_PATIENCE, "few_shot_eval_every": few_shot_eval_every,
                "mr_train": mr_train, "ct_train": ct_train, "ct_test": ct_test, "draws": draws, "few_shot": few_shot,
                # made by `vaeuda synth` (its splits.json names the generator), not real scans
                "synthetic": bool(read_splits(cohort).get("generator")),
                # the tiny networks, or training cut short: the findings are not judged on it
                "smoke": preset == "tiny" or iterations_scale < 1}
    total_s = round(time.time() - started, 1)

    plot_dice_rows(rows, dice_png)
    plot_curves(curves, mean_dice[ROW_UNADAPTED], curves_png)
    machine_line = machine.description()        # one reading for both reports
    payload = {"protocol": protocol, "rows": rows, "mean_dice_percent": mean_dice, "curves": curves,
               "curve_stats": stats, "findings": findings, "timings_s": timings, "total_s": total_s,
               "units": {"mean_dice_percent": "percent", "rows": METRIC_UNITS, "paper_table1": PAPER_UNITS},
               "machine": machine_line,
               "paper_table1": PAPER_TABLE1, "paper_text": PAPER_TEXT}
    with atomic_path(js) as tmp:
        tmp.write_text(_json_text(payload), encoding="utf-8")
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(protocol, rows, mean_dice, findings, timings, total_s, machine_line), encoding="utf-8")
    reporter.log(f"Table 1 written to {md}")
    return [md, js, dice_png, curves_png]


# ----------------------------------------------------------------------------- findings, report

def check_findings(mean_dice: Dict[str, float], stats: Dict[str, dict]) -> List[dict]:
    """The paper's claims, each checked on this run's mean Dice [%] and curves.

    Returns ``[{"claim", "paper", "this_run", "holds"}]``; ``holds`` is None when the run has
    too few curve points to judge.
    """
    md = mean_dice
    gain = md[ROW_P1] - md[ROW_UNADAPTED]
    out = [
        {"claim": "adapting with one unlabelled scan lifts mean Dice far above the unadapted model "
                  "(criterion: by at least 10 points)",
         "paper": "+52.15 (20.03 -> 72.18)",
         "this_run": f"{gain:+.2f} ({md[ROW_UNADAPTED]:.2f} -> {md[ROW_P1]:.2f})", "holds": gain >= 10.0},
        {"claim": "one scan comes close to using all sixteen (criterion: Proposed-1 within 5 points of Proposed-16)",
         "paper": "72.18 vs SIFA-16 75.77 (no Proposed-16 row)",
         "this_run": f"{md[ROW_P1]:.2f} vs {md[ROW_P16]:.2f}", "holds": md[ROW_P1] >= md[ROW_P16] - 5.0},
        {"claim": "the oracle bounds the adapted model from above", "paper": "87.00 vs 72.18",
         "this_run": f"{md[ROW_ORACLE]:.2f} vs {md[ROW_P1]:.2f}", "holds": md[ROW_ORACLE] >= md[ROW_P1]},
    ]
    for row, what in ((ROW_NO_KL, "prior matching (KL)"), (ROW_NO_ADV, "adversarial training")):
        drop = md[ROW_P1] - md[row]
        out.append({"claim": f"removing {what} lowers mean Dice (criterion: by at least 2 points)",
                    "paper": "below 55 vs 72.18", "this_run": f"{md[row]:.2f} vs {md[ROW_P1]:.2f} ({-drop:+.2f})",
                    "holds": drop >= 2.0})
        mine, ref = stats[row]["second_half_std"], stats[ROW_P1]["second_half_std"]
        enough = stats[row]["n"] >= 4 and stats[ROW_P1]["n"] >= 4
        out.append({"claim": f"without {what} the test Dice oscillates instead of converging "
                             f"(criterion: a std over the second half of the curve at least {OSCILLATION_MARGIN:g} "
                             "point above Proposed-1's)",
                    "paper": "oscillates (no numbers given)",
                    "this_run": "too few evaluations" if not enough else f"std {mine:.2f} vs {ref:.2f} points",
                    "holds": (mine >= ref + OSCILLATION_MARGIN) if enough else None})
    out.append({"claim": "three target slices with early stopping still give a usable model (criterion: mean Dice > 60)",
                "paper": "over 60", "this_run": f"{md[ROW_FEW_SHOT]:.2f}", "holds": md[ROW_FEW_SHOT] > 60.0})
    return out


def _paper_summary(entry: dict) -> dict:
    """A PAPER_TABLE1 entry in ``summarise``'s layout (fractions for Dice), for ``table_markdown``."""
    summary: Dict[str, dict] = OrderedDict()
    for i, key in enumerate(CLASS_KEYS + (MEAN_KEY,)):
        summary[key] = {m: {"mean": entry[m][i][0] / (100.0 if m == "dice" else 1.0),
                            "std": entry[m][i][1] / (100.0 if m == "dice" else 1.0), "n": 1, "n_missing": 0}
                        for m in ("dice", "assd_vox")}
    return summary


SMOKE_NOTE = ("**Smoke run**: the `tiny` preset or training cut short (`--iterations-scale` below 1). It shows that "
              "the protocol runs end to end; its numbers say nothing about the method, and the paper's findings "
              "are not judged on it.")


def _markdown(protocol: dict, rows: dict, mean_dice: dict, findings: List[dict], timings: dict,
              total_s: float, machine_line: str) -> str:
    p = protocol
    fs = p["few_shot"]
    n_test = len(p["ct_test"])
    ours = OrderedDict((f"{row} (n={rows[row]['n_volumes']})" if rows[row]["n_runs"] > 1 else row, rows[row]["summary"])
                       for row in ROWS)
    paper = OrderedDict((name, _paper_summary(entry)) for name, entry in PAPER_TABLE1.items())
    verdict = {True: "holds", False: "does not hold", None: "cannot tell"}
    lines = [
        f"# Table 1 protocol on `{Path(p['cohort']).name}`", "",
        *([SMOKE_NOTE, ""] if p.get("smoke") else []),
        *(["The cohort is synthetic (`vaeuda synth`: phantom MR and CT scans), not MM-WHS.", ""]
          if p.get("synthetic") else []),
        f"Source model: {len(p['mr_train'])} labelled MR scans. Target pool: {len(p['ct_train'])} CT training scans "
        f"(labels used only by the Oracle and to pick the few-shot slices). Evaluated on {n_test} CT test scans "
        f"({', '.join(p['ct_test'])}). Preset `{p['preset']}` on {p['device']}, seed {p['seed']}, iterations "
        f"source {p['iterations']['source']} / adapt {p['iterations']['adapt']} / fine-tune "
        f"{p['iterations']['finetune']} (scale {p['iterations_scale']}). {ROW_P16} adapts on the whole target pool "
        f"({len(p['ct_train'])} scans here), as the paper's -16 rows on its sixteen.", "",
        f"Proposed-1 adapts on one scan, {p['repeats']} time{'' if p['repeats'] == 1 else 's'}, on the draws "
        f"{', '.join(p['draws'])}; its row pools "
        f"all {p['repeats']} x {n_test} (draw x test volume) results. The ablations use the same draws and seeds. "
        f"Few-shot: coronal slices {fs['slices'][0]}-{fs['slices'][1] - 1} of {fs['scan']} "
        f"(`--slices {fs['slices'][0]}:{fs['slices'][1]}`, the model file's `{fs['slices'][0]}-{fs['slices'][1]}`) "
        f"(structures per slice: {'; '.join(', '.join(s) for s in fs['structures'])}), early stopping after "
        f"{p['few_shot_patience']} evaluations (every {p['few_shot_eval_every']} iterations) "
        f"without improvement of the cycle-consistency proxy (the mean T->S->T error on those slices).", "",
        "Dice [%] and ASSD [voxel] on the largest 3D component, mean (population std), and, which the paper does "
        "not give, ASSD [mm].", "",
        "## This run", "",
        table_markdown(ours, metrics=METRICS),
        "## The paper's Table 1 (MM-WHS MR -> CT), for reference", "",
        table_markdown(paper, metrics=("dice", "assd_vox")),
        "The paper's text adds: without prior matching or without adversarial training mean Dice drops below 55% "
        "and training oscillates instead of converging; few-shot (3 slices) with early stopping reaches over 60%.", "",
        "## Mean Dice [%] side by side", "",
        "| row | this run | paper |", "|---|---:|---:|",
        *[f"| {row} | {mean_dice[row]:.2f} | "
          f"{PAPER_TABLE1[row]['dice'][4][0]:.2f} |" if row in PAPER_TABLE1 else
          f"| {row} | {mean_dice[row]:.2f} | {PAPER_TEXT.get(row, '')} |" for row in ROWS], "",
        "## The paper's findings, checked on this run", "",
        "| finding | paper | this run | |", "|---|---|---|---|",
        *[f"| {f['claim']} | {f['paper']} | {f['this_run']} | "
          f"{'not judged (smoke run)' if p.get('smoke') else verdict[f['holds']]} |" for f in findings], "",
        "![Mean Dice per test volume, per row](table1_dice.png)", "",
        "![Test Dice during adaptation](curves.png)", "",
        "## Runs and time", "",
        "| row | runs | train [s] | of which curve evaluations [s] | evaluate [s] |", "|---|---:|---:|---:|---:|",
        *[f"| {row} | {rows[row]['n_runs']} | {timings[row]['train_s']:.1f} | {timings[row]['curve_s']:.1f} | "
          f"{timings[row]['eval_s']:.1f} |" for row in ROWS],
        "",
        f"This run took {total_s:.1f} s of wall clock. Unadapted's training time is the source model's, which every "
        "other row starts from. Models reused from an earlier run with the same settings count their original "
        "training and curve times (and took no time in this run).", "",
        f"Machine: {machine_line}.", "",
    ]
    return "\n".join(lines)


def plot_dice_rows(rows: dict, png: Path) -> None:
    """Box plot of per-volume mean Dice [%] per row, every volume as a point, paper means as diamonds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    values = [[100 * float(np.nanmean([v["metrics"][k]["dice"] for k in CLASS_KEYS]))
               for r in rows[n]["runs"] for v in r["volumes"]] for n in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.2))
    ax.boxplot(values, showfliers=False, widths=0.55)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, 1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.7, color="tab:blue", zorder=3)
        if names[i - 1] in PAPER_TABLE1:
            ax.scatter([i], [PAPER_TABLE1[names[i - 1]]["dice"][4][0]], marker="D", color="tab:red", zorder=4,
                       label="paper (MM-WHS)" if i == 1 else None)
        elif names[i - 1] in PAPER_BOUNDS:    # the paper gives only a bound in its text
            bound = PAPER_BOUNDS[names[i - 1]]
            ax.plot([i - 0.3, i + 0.3], [bound, bound], color="tab:red", linestyle="--", zorder=4)
            ax.annotate(PAPER_TEXT[names[i - 1]].split(",")[0].replace(" with early stopping", ""), (i + 0.3, bound),
                        fontsize=7, color="tab:red", va="center")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([n.replace(", ", ",\n") for n in names], fontsize=8)
    ax.set_ylabel("mean Dice over structures [%]")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Dice per CT test volume (Proposed-1 rows: all draws x volumes)", fontsize=10)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_curves(curves: dict, unadapted_dice: float, png: Path) -> None:
    """Test mean Dice [%] against adaptation iteration, one line per curve row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row, entries in curves.items():
        if entries:
            ax.plot([e["iteration"] for e in entries], [100 * e["test_dice_mean"] for e in entries],
                    marker="o", markersize=3, linestyle="--" if row == ROW_FEW_SHOT else "-", label=row)
    ax.axhline(unadapted_dice, color="grey", linestyle=":", label="Unadapted")
    ax.set_xlabel("adaptation iteration")
    ax.set_ylabel("mean Dice on the CT test volumes [%]")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Adaptation curves (first draw)", fontsize=10)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
