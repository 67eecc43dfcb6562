"""The Table 1 protocol (vaeuda.experiment): the whole run at the tiny preset, and its pieces."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from vaeuda.train import DEFAULT_ITERATIONS

from vaeuda import experiment
from vaeuda import train as train_mod
from vaeuda.errors import VaeudaError
from vaeuda.experiment import (ROWS, ROW_FEW_SHOT, ROW_NO_ADV, ROW_NO_KL, ROW_ORACLE, ROW_P1, ROW_P16, ROW_UNADAPTED,
                               curve_stats, draw_targets, pick_few_shot_window, scaled_iterations)
from vaeuda.labels import CLASS_KEYS
from vaeuda.progress import Reporter

REPEATS = 2
SCALE = 0.4          # tiny preset: source 8, adapt 4, fine-tune 4 iterations; a curve point every iteration


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from vaeuda.phantom import make_cohort
    out = tmp_path_factory.mktemp("t1cohort")
    make_cohort(out, n_source=3, n_target=5, n_train=3, seed=0, size=32)
    return out


@pytest.fixture(scope="module")
def table1(cohort, tmp_path_factory):
    import torch
    out = tmp_path_factory.mktemp("table1")
    # Tiny networks gain nothing from a second thread and lose several-fold when the cores are
    # shared (see Docs/benchmarks.md): one thread keeps this test fast on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = experiment.run_table1(cohort, out, repeats=REPEATS, preset="tiny", seed=1, device="cpu",
                                      iterations_scale=SCALE, reporter=Reporter("none"))
    finally:
        torch.set_num_threads(threads)
    return out, files, json.loads((out / "table1.json").read_text())


def test_writes_every_output(table1):
    out, files, _ = table1
    assert [f.name for f in files] == ["table1.md", "table1.json", "table1_dice.png", "curves.png"]
    for f in files:
        assert f.is_file() and f.stat().st_size > 0
    for png in files[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.part*")), "temporary files left behind"
    md = files[0].read_text()
    for row in ROWS + ("SIFA-1", "PnP-AdaNet-16"):
        assert row in md
    assert "72.18 (16.31)" in md          # the paper's Proposed-1 mean Dice, as printed in its Table 1
    # a tiny, shortened run on a phantom cohort says so, and judges none of the paper's findings on it
    protocol = table1[2]["protocol"]
    assert protocol["synthetic"] is True and protocol["smoke"] is True
    assert "**Smoke run**" in md and "The cohort is synthetic" in md
    assert "Proposed-16 adapts on the whole target pool (3 scans here)" in md
    findings = [line for line in md.splitlines() if line.startswith("| ") and "criterion" in line]
    assert findings and all(line.endswith("| not judged (smoke run) |") for line in findings)


def test_this_runs_table_has_the_demos_metric_groups_and_the_json_states_its_units(table1):
    """As the demo's report: ASSD [mm] beside the paper's two groups (the paper's table keeps its own two), and
    the units of each number in table1.json, whose rows hold Dice as a fraction and mean_dice_percent in %."""
    out, files, js = table1
    this_run, paper = files[0].read_text().split("## The paper's Table 1")
    groups = lambda text: [c.strip() for c in next(l for l in text.splitlines() if l.startswith("|  | Dice [%]"))  # noqa
                           .split("|") if c.strip()]
    assert groups(this_run) == ["Dice [%]", "ASSD [voxel]", "ASSD [mm]"]
    assert groups(paper) == ["Dice [%]", "ASSD [voxel]"]
    assert js["units"] == {"mean_dice_percent": "percent",
                           "rows": {"dice": "fraction (0-1)", "assd_vox": "voxel", "assd_mm": "mm"},
                           "paper_table1": {"dice": "percent", "assd_vox": "voxel"}}
    mean = js["rows"][ROW_ORACLE]["summary"]["Mean"]
    assert js["mean_dice_percent"][ROW_ORACLE] == pytest.approx(100 * mean["dice"]["mean"])
    assert 0 <= mean["dice"]["mean"] <= 1 and set(mean) == set(js["units"]["rows"])


def test_table1_and_the_demo_open_with_the_papers_first_two_rows():
    """The paper's Table 1 lists Oracle, then Unadapted, then the methods; both reports keep that order."""
    from vaeuda import demo
    assert list(experiment.PAPER_TABLE1)[:2] == [ROW_ORACLE, ROW_UNADAPTED] == list(demo.REFERENCE_ROWS)
    assert ROWS[:2] == demo.ROWS[:2] == demo.REFERENCE_ROWS and demo.ROWS[2:] == (demo.ROW_ADAPTED,)


def test_rows_in_paper_order_with_four_structures(table1):
    _, _, js = table1
    assert list(js["rows"]) == list(ROWS)
    for row in ROWS:
        summary = js["rows"][row]["summary"]
        assert list(summary) == list(CLASS_KEYS) + ["Mean"]
        for key in CLASS_KEYS:
            assert 0.0 <= summary[key]["dice"]["mean"] <= 1.0


def test_proposed1_pools_repeats_times_test_volumes(table1):
    _, _, js = table1
    n_test = len(js["protocol"]["ct_test"])
    assert n_test == 2
    row = js["rows"][ROW_P1]
    assert row["n_runs"] == REPEATS and row["n_volumes"] == REPEATS * n_test
    for key in CLASS_KEYS:
        assert row["summary"][key]["dice"]["n"] == REPEATS * n_test
    # Dice is never undefined, every run has n_test volumes: the pooled mean is the mean of run means.
    run_means = [r["summary"]["Mean"]["dice"]["mean"] for r in row["runs"]]
    assert row["summary"]["Mean"]["dice"]["mean"] == pytest.approx(np.mean(run_means), abs=1e-12)
    assert js["rows"][ROW_UNADAPTED]["n_volumes"] == n_test


def test_draws_and_ablations_share_them(table1):
    _, _, js = table1
    p = js["protocol"]
    draws = p["draws"]
    assert len(draws) == REPEATS and len(set(draws)) == REPEATS and set(draws) <= set(p["ct_train"])
    assert draws[0] == random.Random(1).choice(p["ct_train"])      # the demo's draw for the same seed
    p1 = [(r["targets"], r["seed"]) for r in js["rows"][ROW_P1]["runs"]]
    assert p1 == [([d], 1 + k) for k, d in enumerate(draws)]
    for row in (ROW_NO_KL, ROW_NO_ADV):
        assert [(r["targets"], r["seed"]) for r in js["rows"][row]["runs"]] == p1
    # the switches reached the models: their records say which term was off
    out = table1[0]
    nokl = json.loads((out / "models" / f"nokl_r1_{draws[0]}.run.json").read_text())["spec"]
    noadv = json.loads((out / "models" / f"noadv_r1_{draws[0]}.run.json").read_text())["spec"]
    assert (nokl["use_kl"], nokl["use_adv"], noadv["use_kl"], noadv["use_adv"]) == (False, True, True, False)
    # ... and the trained models' own configurations (what TrainConfig.weights() zeroes) agree
    from vaeuda.modelfile import read_tensors
    trained = [read_tensors(out / "models" / f"{n}_r1_{draws[0]}.safetensors")[1]["train"] for n in ("nokl", "noadv")]
    assert [(t["use_kl"], t["use_adv"]) for t in trained] == [(False, True), (True, False)]
    # and the engine's training defaults are in every record, so other defaults retrain
    RUN_SPECIFIC = ("use_kl", "class_weights", "eval_every")   # the run's switch, its data, the curve's spacing
    assert nokl["training"]["adapt"]["ema_decay"] == 0.98 and nokl["training"]["adapt"]["batch_size"] == 2
    assert {k: v for k, v in trained[0].items() if k not in RUN_SPECIFIC} == \
        {k: v for k, v in nokl["training"]["adapt"].items() if k not in RUN_SPECIFIC}


def test_few_shot_slices_cross_three_structures(table1, cohort):
    from vaeuda import volumes
    from vaeuda.labels import MMWHS
    from vaeuda.nets import get_preset
    out, _, js = table1
    fs = js["protocol"]["few_shot"]
    a, b = fs["slices"]
    assert b - a == 3 and fs["scan"] == js["protocol"]["draws"][0]
    # independently of the code that picked them: cut the label again and look
    image = volumes.read_image(cohort / f"{fs['scan']}_image.nii.gz")
    labels = volumes.SliceGrid.from_image(image, get_preset("tiny").input_size).label_slices(
        volumes.read_label(cohort / f"{fs['scan']}_label.nii.gz", MMWHS, reference=image))
    crossed = {int(c) for c in np.unique(labels[a:b]) if c > 0}
    assert len(crossed) >= 3 and len(fs["union"]) == len(crossed)
    run = js["rows"][ROW_FEW_SHOT]["runs"][0]
    assert run["targets"] == [fs["scan"]]
    # the report names the slices three ways that must agree: inclusive, as --slices, as the model file does
    assert (f"coronal slices {a}-{b - 1} of {fs['scan']} (`--slices {a}:{b}`, the model file's `{a}-{b}`)"
            in (out / "table1.md").read_text()) and Path(run["model"]).name.startswith(f"fewshot_{fs['scan']}_{a}-{b}")
    from vaeuda.modelfile import read_tensors
    trained = read_tensors(out / "models" / Path(run["model"]).name)[1]["train"]
    assert trained["eval_every"] == js["protocol"]["few_shot_eval_every"] == 4
    # the early-stopped run's record names the proxy that stopped it, so a model stopped by another
    # proxy is trained again; runs without early stopping do not name one, and stay reusable
    from vaeuda.train import EARLY_STOP_PROXY
    spec = json.loads((out / "models" / (Path(run["model"]).name.replace(".safetensors", ".run.json"))).read_text())["spec"]
    assert spec["early_stop"] == 3 and spec["early_stop_proxy"] == EARLY_STOP_PROXY
    p1 = js["rows"][ROW_P1]["runs"][0]["model"]
    assert "early_stop_proxy" not in json.loads(
        (out / "models" / Path(p1).name.replace(".safetensors", ".run.json")).read_text())["spec"]


def test_curves_have_entries(table1):
    _, _, js = table1
    adapt_iterations = js["protocol"]["iterations"]["adapt"]
    assert js["protocol"]["eval_every"] == 1 and adapt_iterations == 4
    for row in (ROW_P1, ROW_NO_KL, ROW_NO_ADV):
        curve = js["curves"][row]
        assert [e["iteration"] for e in curve] == list(range(1, adapt_iterations + 1))
        assert all(0.0 <= e["test_dice_mean"] <= 1.0 for e in curve)
        assert set(curve[0]["test_dice"]) == set(CLASS_KEYS)
    # few-shot evaluates its early-stop proxy at the engine's spacing (TrainConfig.eval_every = 50,
    # capped at the run's 4 iterations), not the curves' 1: the stopping rule of `vaeuda adapt --early-stop`
    from vaeuda.train import TrainConfig
    assert js["protocol"]["few_shot_eval_every"] == min(TrainConfig().eval_every, adapt_iterations) == 4
    assert [e["iteration"] for e in js["curves"][ROW_FEW_SHOT]] == [4]
    assert len(js["findings"]) == 8


def _write_splits(folder):
    splits = {m: {"train": [f"{m}_1001"], "test": [f"{m}_1002"]} for m in ("mr", "ct")}
    (folder / "splits.json").write_text(json.dumps(splits))


def test_portable_and_default_numerics_runs_do_not_share_models(tmp_path, monkeypatch):
    from vaeuda import machine
    _write_splits(tmp_path)
    monkeypatch.setattr(machine, "portable", lambda: False)
    default = experiment.run_settings(tmp_path, "cpu", "cpu")
    monkeypatch.setattr(machine, "portable", lambda: True)
    portable = experiment.run_settings(tmp_path, "cpu", "cpu")
    assert default != portable and {k for k in default if default[k] != portable[k]} == {"portable"}
    assert default["cohort"] == str(tmp_path.resolve()) and default["training"]["adapt"]["ema_decay"] == 0.995


def test_models_trained_with_other_engine_defaults_are_not_reused(tmp_path, monkeypatch):
    """The settings hold every training option as the stages resolve it, not only the preset's
    extras: a default batch size, a TrainConfig default or a network width changed since the
    models were trained means training them again."""
    import dataclasses
    from vaeuda import nets, train
    _write_splits(tmp_path)
    before = experiment.run_settings(tmp_path, "cpu", "cpu")
    assert before["training"]["all"]["batch_size"] == 8 and before["training"]["all"]["lr"] == 3e-4
    assert before["training"]["adapt"]["lr"] == 5e-4 and before["network"]["base"] == 16
    monkeypatch.setitem(train.DEFAULT_BATCH, "cpu", 4)
    assert experiment.run_settings(tmp_path, "cpu", "cpu")["training"]["all"]["batch_size"] == 4
    monkeypatch.undo()
    monkeypatch.setattr(train.TrainConfig, "__init__", _with_default(train.TrainConfig.__init__, lambda_cyc=5.0))
    assert experiment.run_settings(tmp_path, "cpu", "cpu")["training"]["adapt"]["lambda_cyc"] == 5.0
    monkeypatch.undo()
    monkeypatch.setitem(nets.PRESETS, "cpu", dataclasses.replace(nets.PRESETS["cpu"], base=32))
    changed = experiment.run_settings(tmp_path, "cpu", "cpu")
    assert {k for k in before if before[k] != changed[k]} == {"network"}


def _with_default(init, **defaults):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**defaults, **kwargs})
    return patched


def test_a_cohort_made_again_in_the_same_folder_is_another_cohort(tmp_path):
    import os
    (tmp_path / "ct_1001_image.nii.gz").write_bytes(b"first")
    _write_splits(tmp_path)
    before = experiment.run_settings(tmp_path, "cpu", "cpu")
    assert experiment.run_settings(tmp_path, "cpu", "cpu") == before          # unchanged: reused
    (tmp_path / "table1.md").write_text("a report written beside the cohort")
    assert experiment.run_settings(tmp_path, "cpu", "cpu") == before          # not the cohort's
    (tmp_path / "ct_1001_image.nii.gz").write_bytes(b"other")                 # same size, written again
    os.utime(tmp_path / "ct_1001_image.nii.gz", ns=(1, 1))
    after = experiment.run_settings(tmp_path, "cpu", "cpu")
    assert {k for k in before if before[k] != after[k]} == {"cohort_state"}


def test_a_cohort_names_its_label_convention_or_is_refused(tmp_path):
    """splits.json's "labels": absent is mmwhs; a built-in name is that convention; an empty name or a
    number names none (the empty one would be read as the cohort folder itself)."""
    from vaeuda.demo import cohort_convention
    _write_splits(tmp_path)
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert cohort_convention(tmp_path).name == "mmwhs"
    (tmp_path / "splits.json").write_text(json.dumps(dict(splits, labels="consecutive")))
    assert cohort_convention(tmp_path).name == "consecutive"
    for labels in ("", 7):
        (tmp_path / "splits.json").write_text(json.dumps(dict(splits, labels=labels)))
        with pytest.raises(VaeudaError, match=rf'"labels" must name a label convention .*, not {re.escape(repr(labels))}\.$'):
            cohort_convention(tmp_path)


def test_rerun_reuses_models_with_the_same_settings(tmp_path):
    calls = []

    def train(path):
        calls.append(path)
        path.write_bytes(b"model")
        return {"history": [{"iteration": 1}], "normalisation": {"method": "zscore"}, "provenance": {"started": "t"}}

    null = Reporter("none")
    curve_total = iter([10.0, 12.5, 99.0, 99.0, 99.0])   # the probe's running seconds: 2.5 s during training
    clock = lambda: next(curve_total)   # noqa: E731
    _, first = experiment._trained(tmp_path, "m", {"iterations": 3, "targets": ("a",)}, train, null, clock)
    _, again = experiment._trained(tmp_path, "m", {"iterations": 3, "targets": ["a"]}, train, null, clock)
    _, changed = experiment._trained(tmp_path, "m", {"iterations": 4, "targets": ["a"]}, train, null)
    assert len(calls) == 2 and (first["reused"], again["reused"], changed["reused"]) == (False, True, False)
    assert again["history"] == [{"iteration": 1}]
    # a reused model reports the curve time of its first training, not the 0 s of this run
    assert first["seconds_curve"] == again["seconds_curve"] == 2.5 and changed["seconds_curve"] == 0.0


class _Stop(Exception):
    pass


def test_a_run_says_which_of_its_outputs_an_earlier_run_left(cohort, tmp_path, monkeypatch, capsys):
    """`demo` and `experiment` replace their own reports of the same names in an existing --out;
    they say so, before any work, and name only those (a user's other files are not theirs)."""
    from vaeuda import demo, phantom

    def stop(*args, **kwargs):
        raise _Stop

    out = tmp_path / "out"
    out.mkdir()
    for name in ("table1.md", "curves.png", "report.md", "notes.txt"):
        (out / name).write_text("earlier", encoding="utf-8")
    monkeypatch.setattr(experiment, "_trained", stop)
    monkeypatch.setattr(phantom, "make_cohort", stop)
    monkeypatch.setattr(demo, "is_phantom_cohort", lambda *a: False)
    for run in (lambda: experiment.run_table1(cohort, out, repeats=1, preset="tiny", device="cpu",
                                              reporter=Reporter("json")),
                lambda: demo.run_demo(out, quick=True, device="cpu", reporter=Reporter("json"))):
        with pytest.raises(_Stop):
            run()
    logged = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()]
    assert f"{out} holds an earlier run's table1.md, curves.png; this run replaces them." in logged
    assert f"{out} holds an earlier run's report.md; this run replaces it." in logged
    for name in ("models/source.safetensors", "models/adapted.safetensors", "fig2.png"):
        (out / name).write_bytes(b"earlier")
    (out / "pred").mkdir()                                       # an earlier run's segmentations
    with pytest.raises(_Stop):
        demo.run_demo(out, quick=True, device="cpu", reporter=Reporter("json"))
    assert json.loads(capsys.readouterr().out.splitlines()[0])["message"] == (
        f"{out} holds an earlier run's report.md, fig2.png, models/source.safetensors and 2 more; this run "
        f"replaces them.")
    with pytest.raises(_Stop):
        experiment.run_table1(cohort, out, repeats=1, preset="tiny", device="cpu", reporter=Reporter("json"))
    assert f"{out} holds an earlier run's table1.md, curves.png, pred; this run replaces them." in [
        json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "earlier"


# ----------------------------------------------------------------------------- pieces

def test_scaled_iterations():
    assert scaled_iterations("cpu", "adapt", 1.0) == DEFAULT_ITERATIONS["cpu"]["adapt"]
    assert scaled_iterations("cpu", "source", 0.1) == round(0.1 * DEFAULT_ITERATIONS["cpu"]["source"])
    assert scaled_iterations("tiny", "adapt", 0.01) == 1       # never zero


def test_draw_targets_without_then_with_replacement():
    pool = [f"ct_{i}" for i in range(16)]
    six = draw_targets(pool, 6, seed=0)
    assert len(set(six)) == 6 and six == draw_targets(pool, 6, seed=0) != draw_targets(pool, 6, seed=1)
    assert sorted(draw_targets(pool[:6], 6, seed=3)) == sorted(pool[:6])    # as many as the pool: each once
    many = draw_targets(pool[:2], 5, seed=0)
    assert len(many) == 5 and set(many) <= set(pool[:2])


def test_pick_few_shot_window_prefers_the_fullest_window():
    labels = np.zeros((8, 4, 4), dtype=np.uint8)
    labels[1, 0, 0] = 1                                  # slices 1-3: union of 3 structures, poorest slice 1
    labels[2, 0, 1] = 2
    labels[3, 0, 2] = 3
    for j in (4, 5, 6):                                  # slices 4-6: 3 structures in every slice
        labels[j, 1, :3] = (1, 2, 3)
    assert pick_few_shot_window(labels) == (4, 7)
    only_union = labels.copy()
    only_union[4:] = 0
    assert pick_few_shot_window(only_union) == (1, 4)
    last = np.zeros((6, 4, 4), dtype=np.uint8)          # only the last three slices qualify
    last[3:, 0, :3] = (1, 2, 3)
    assert pick_few_shot_window(last) == (3, 6)
    # the poorest slice decides, not the richest: slices 0-2 show 3, 3, 1 structures, slices 4-6 show 2, 2, 2
    poorest = np.zeros((7, 4, 4), dtype=np.uint8)
    for j, shown in enumerate(((1, 2, 3), (1, 2, 3), (1,), (), (1, 2), (2, 3), (1, 3))):
        poorest[j, 0, :len(shown)] = shown
    assert pick_few_shot_window(poorest) == (4, 7)
    # two windows tied on both counts: the first wins
    tied = np.zeros((7, 4, 4), dtype=np.uint8)
    tied[0:3, 0, :3] = tied[4:7, 0, :3] = (1, 2, 3)
    assert pick_few_shot_window(tied) == (0, 3)
    with pytest.raises(ValueError, match="^no 3 consecutive slices cross 3 structures$"):
        pick_few_shot_window(np.where(labels == 3, 0, labels))   # never 3 structures


def test_curve_stats_hand_computed():
    s = curve_stats([10.0, 20.0, 30.0, 50.0, 40.0, 60.0])
    # second half 50, 40, 60: std sqrt(200/3), steps 10 and 20
    assert s["final"] == 60.0 and s["best"] == 60.0 and s["n"] == 6
    assert s["second_half_std"] == pytest.approx((200 / 3) ** 0.5)
    assert s["second_half_mean_abs_step"] == pytest.approx(15.0)
    odd = curve_stats([1.0, 2.0, 3.0, 4.0, 5.0])      # odd length: the second half keeps the middle, 3, 4, 5
    assert odd["second_half_std"] == pytest.approx((2 / 3) ** 0.5) and odd["second_half_mean_abs_step"] == 1.0


def test_findings_criteria_by_hand():
    """Each claim's criterion on made-up mean Dice where it and its likeliest misreading disagree."""
    md = {ROW_UNADAPTED: 20.0, ROW_P1: 40.0, ROW_P16: 50.0, ROW_ORACLE: 70.0,
          ROW_NO_KL: 37.0, ROW_NO_ADV: 39.0, ROW_FEW_SHOT: 61.0}
    stats = {ROW_P1: {"n": 5, "second_half_std": 1.0}, ROW_NO_KL: {"n": 5, "second_half_std": 3.0},
             ROW_NO_ADV: {"n": 2, "second_half_std": 0.5}}
    findings = experiment.check_findings(md, stats)
    # a std only a little above Proposed-1's is not oscillation: 1.9 vs 1.0 does not hold, 2.0 does
    for std, holds in ((1.9, False), (2.0, True)):
        near = experiment.check_findings(md, dict(stats, **{ROW_NO_KL: {"n": 5, "second_half_std": std}}))
        assert near[4]["holds"] is holds and near[4]["this_run"] == f"std {std:.2f} vs 1.00 points"
    assert [f["holds"] for f in findings] == [
        True,     # gain +20 >= 10 (Proposed-16's +30 would read the same, hence the text below)
        False,    # Proposed-1 40 is not within 5 of Proposed-16 50
        True,     # the oracle 70 >= 40
        True,     # no KL 37: 3 points below Proposed-1
        True,     # and its curve moves more (std 3 vs 1)
        False,    # no adversarial 39: only 1 point below
        None,     # its curve has two evaluations: cannot tell
        True,     # few-shot 61 > 60 (Proposed-1's 40 would not be)
    ]
    assert findings[0]["this_run"] == "+20.00 (20.00 -> 40.00)"
    assert findings[3]["this_run"] == "37.00 vs 40.00 (-3.00)"


def test_findings_criteria_hold_at_their_bounds():
    """Each criterion's bound belongs to it: a gain of exactly 10 points, Proposed-1 exactly 5 below
    Proposed-16, an oracle equal to Proposed-1, a drop of exactly 2 and a std exactly 1 point above hold;
    four curve points are enough to judge; few-shot at exactly 60 is not "over 60"."""
    md = {ROW_UNADAPTED: 30.0, ROW_P1: 40.0, ROW_P16: 45.0, ROW_ORACLE: 40.0,
          ROW_NO_KL: 38.0, ROW_NO_ADV: 38.0, ROW_FEW_SHOT: 60.0}
    stats = {ROW_P1: {"n": 4, "second_half_std": 1.0}, ROW_NO_KL: {"n": 4, "second_half_std": 2.0},
             ROW_NO_ADV: {"n": 4, "second_half_std": 1.5}}
    assert [f["holds"] for f in experiment.check_findings(md, stats)] == [
        True, True, True, True, True, True, False, False]
    assert experiment.check_findings(md, dict(stats, **{ROW_P1: {"n": 3, "second_half_std": 1.0}}))[4]["holds"] is None


def test_the_largest_seed_is_taken_for_as_many_repeats_as_fit(tmp_path):
    """Repeat k adapts with seed + k: --seed MAX_SEED leaves room for exactly one repeat, MAX_SEED - 1 for two
    (each run refused only later, for its missing cohort); --iterations-scale 0 is no positive number."""
    from vaeuda.errors import MAX_SEED
    for seed, repeats in ((MAX_SEED, 1), (MAX_SEED - 1, 2)):
        with pytest.raises(VaeudaError, match="splits.json: not found"):
            experiment.run_table1(tmp_path, tmp_path / "out", repeats=repeats, seed=seed, preset="tiny", device="cpu")
    with pytest.raises(VaeudaError, match=r"^--iterations-scale must be a positive number, not 0\.$"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu", iterations_scale=0)
    assert not (tmp_path / "out").exists()


# Made-up mean Dice (fractions) of each run, by its model file name's start.
FAKE_DICE = {"oracle": 0.8, "source": 0.2, "proposed16": 0.5, "proposed1": 0.5, "nokl": 0.45, "noadv": 0.49,
             "fewshot": 0.65}


def _fake_table1(tmp_path, monkeypatch):
    """run_table1 on a cohort of empty files (no generator named: not synthetic) whose training, scoring,
    curve probe and few-shot pick are made up here, so every number of the report is known. Returns
    (cohort, the keyword arguments of each adaptation by model file name)."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    splits = {"mr": {"train": ["mr_1", "mr_2"], "test": []}, "ct": {"train": ["ct_1", "ct_2", "ct_3"],
                                                                    "test": ["ct_4", "ct_5"]}}
    (cohort / "splits.json").write_text(json.dumps(splits))
    for prefix in splits["mr"]["train"] + splits["ct"]["train"] + splits["ct"]["test"]:
        for kind in ("image", "label"):
            (cohort / f"{prefix}_{kind}.nii.gz").write_bytes(b"")
    adapted = {}

    def trained(path, iterations, history):
        Path(path).write_bytes(b"model")
        return {"history": history, "normalisation": {"method": "zscore"},
                "provenance": {"started": "t", "iterations_done": iterations}}

    def adapt(source, targets, path, **kw):
        adapted[Path(path).name] = kw
        every = kw["overrides"]["eval_every"]
        points = list(range(every, kw["iterations"] + 1, every))
        if kw["callback"] is None:
            return trained(path, kw["iterations"], [{"iteration": i, "proxy": 0.1} for i in points])
        # the curve without adversarial training is cut to 3 evaluations: too few to judge its oscillation
        points = points if kw["use_adv"] else points[:3]
        return trained(path, kw["iterations"], [dict(kw["callback"](i, None), iteration=i) for i in points])

    class FlatCurve:                          # the same held-out Dice at every evaluation: no oscillation
        seconds = 0.0

        def __init__(self, *args):
            pass

        def __call__(self, iteration, net, live=None):
            return {"test_dice_mean": 0.5, "test_dice": {k: 0.5 for k in CLASS_KEYS}, "test_assd_vox_mean": 2.0,
                    "test_assd_vox_undefined": 0}

    def scores(model, cohort_, prefixes, *args):
        dice = FAKE_DICE[Path(model).name.split("_")[0].split(".")[0]]
        return {"volumes": [{"name": p, "metrics": {k: {"dice": dice, "assd_vox": 2.0, "assd_mm": 3.0}
                                                    for k in CLASS_KEYS}} for p in prefixes]}
    monkeypatch.setattr(train_mod, "train_source",
                        lambda images, labels, path, **kw: trained(path, kw["iterations"], [{"iteration": 1}]))
    monkeypatch.setattr(train_mod, "finetune",
                        lambda source, images, labels, path, **kw: trained(path, kw["iterations"], []))
    monkeypatch.setattr(train_mod, "adapt", adapt)
    monkeypatch.setattr(experiment, "HeldOutDiceProbe", FlatCurve)
    monkeypatch.setattr(experiment, "evaluate_model", scores)
    monkeypatch.setattr(experiment, "_few_shot_slices", lambda cohort_, prefix, *a: {
        "scan": prefix, "slices": [5, 8], "structures": [["LV-M", "LA-B", "LV-B"]] * 3, "union": ["LV-M", "LA-B", "LV-B"]})
    monkeypatch.setattr(experiment, "plot_dice_rows", lambda rows, png: None)
    monkeypatch.setattr(experiment, "plot_curves", lambda curves, unadapted, png: None)
    monkeypatch.setattr(experiment.machine, "description", lambda: "a test machine")     # (its fingerprint takes seconds)
    return cohort, adapted


def test_a_full_length_run_judges_the_findings_on_numbers_worked_out_by_hand(tmp_path, monkeypatch):
    """The cpu preset at full length (no smoke run): mean Dice 80 / 20 / 50 / 50 / 45 / 49 / 65 % give
    the verdicts below; the curves are evaluated every 300 // 20 = 15 adaptation iterations for the first
    draw of each Proposed-1 row only, the few-shot run at the engine's 50 with early stopping; a stale
    prediction of an earlier run is removed before scoring."""
    from vaeuda.train import ADAPT_TRAINING, TrainConfig
    cohort, adapted = _fake_table1(tmp_path, monkeypatch)
    out = tmp_path / "out"
    (out / "pred" / "oracle").mkdir(parents=True)
    for name in ("ct_4_image_seg.nii.gz", "notes.txt"):
        (out / "pred" / "oracle" / name).write_text("earlier")
    import types
    ticks = iter(range(10 ** 6))        # a clock that moves one second per reading: each training and scoring takes 1 s
    monkeypatch.setattr(experiment, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))
    experiment.run_table1(cohort, out, repeats=2, preset="cpu", seed=1, device="cpu", reporter=Reporter("none"))
    js = json.loads((out / "table1.json").read_text())
    p = js["protocol"]
    assert (p["smoke"], p["synthetic"], p["eval_every"], p["iterations"]) == (
        False, False, 15, {"source": 700, "adapt": 300, "finetune": 1600})
    assert "eval_every" not in ADAPT_TRAINING["cpu"] and p["few_shot_eval_every"] == TrainConfig().eval_every == 50
    d1, d2 = p["draws"]
    curved = {name: (kw["overrides"]["eval_every"], kw["early_stop"], kw["slice_range"])
              for name, kw in adapted.items() if kw["callback"] is not None}
    assert curved == {f"proposed1_r1_{d1}.safetensors": (15, None, None), f"nokl_r1_{d1}.safetensors": (15, None, None),
                      f"noadv_r1_{d1}.safetensors": (15, None, None),
                      f"fewshot_{d1}_5-8.safetensors": (50, 3, (5, 8))}
    assert not any("test_dice_mean" in e for e in js["rows"][ROW_P1]["runs"][1]["history"])    # the second draw's
    assert js["rows"][ROW_UNADAPTED]["runs"][0]["history"] == []          # the source model was not adapted
    assert sorted(p.name for p in (out / "pred" / "oracle").iterdir()) == ["notes.txt"]
    md = (out / "table1.md").read_text()
    assert "Smoke run" not in md and "synthetic" not in md and "Machine: a test machine." in md
    assert f"Proposed-1 adapts on one scan, 2 times, on the draws {d1}, {d2}; its row pools all 2 x 2" in md
    this_run = md[:md.index("## The paper's Table 1")]
    labels = [cell for cell in (line.split("|")[1].strip() for line in this_run.splitlines() if line.startswith("| "))
              if cell.split(" (n=")[0] in ROWS]
    assert labels == ["Oracle", "Unadapted", "Proposed-16", "Proposed-1 (n=4)", "Proposed-1, no KL (n=4)",
                      "Proposed-1, no adversarial (n=4)", "Few-shot (3 slices)"]
    for row in ("| Oracle | 80.00 | 87.00 |", "| Unadapted | 20.00 | 20.03 |", "| Proposed-1 | 50.00 | 72.18 |",
                "| Proposed-16 | 50.00 | not reported (SIFA-16: 75.77) |", "| Proposed-1, no KL | 45.00 | < 55, oscillates |"):
        assert row in md
    findings = md[md.index("## The paper's findings"):].split("\n\n")[1].splitlines()[2:]
    # the time table adds up each row's runs: two draws, 2 s of training and 2 s of scoring
    assert "| Oracle | 1 | 1.0 | 0.0 | 1.0 |" in md and "| Proposed-1, no KL | 2 | 2.0 | 0.0 | 2.0 |" in md
    verdicts = [line.rsplit("|", 2)[1].strip() for line in findings]
    assert verdicts == ["holds",           # gain +30 >= 10
                        "holds",           # 50 within 5 of Proposed-16's 50
                        "holds",           # the oracle 80 >= 50
                        "holds",           # no KL: 5 below
                        "does not hold",   # its curve is as flat as Proposed-1's
                        "does not hold",   # no adversarial: 1 below
                        "cannot tell",     # 3 evaluations
                        "holds"]           # few-shot 65 > 60


@pytest.mark.parametrize("preset, scale, repeats", [("tiny", 1.0, 1), ("cpu", 0.5, 4)])
def test_tiny_networks_or_shortened_training_is_a_smoke_run_and_repeated_draws_are_noted(
        tmp_path, monkeypatch, capsys, preset, scale, repeats):
    """Either the tiny preset or a scale below 1 makes a smoke run; more draws than the 3 CT training
    scans repeat some, which the log says; one draw is "1 time"."""
    cohort, _ = _fake_table1(tmp_path, monkeypatch)
    experiment.run_table1(cohort, tmp_path / "out", repeats=repeats, preset=preset, seed=0, device="cpu",
                          iterations_scale=scale, reporter=Reporter("json"))
    assert json.loads((tmp_path / "out" / "table1.json").read_text())["protocol"]["smoke"] is True
    md = (tmp_path / "out" / "table1.md").read_text()
    assert md.count("| not judged (smoke run) |") == 8
    assert f"Proposed-1 adapts on one scan, {repeats} time{'s' if repeats > 1 else ''}, on the draws" in md
    logged = [json.loads(line).get("message") for line in capsys.readouterr().out.splitlines()]
    note = f"note: {repeats} draws from 3 CT training scan(s): drawn with replacement, so some scans repeat"
    assert (note in logged) is (repeats > 3)


def test_paper_rows_keep_dice_in_percent_and_assd_in_voxels(table1):
    """The reference table shows the paper's numbers as printed: Mean Dice 72.18 for Proposed-1,
    ASSD 5.11 voxels (a fraction for Dice inside, like every summary; ASSD not divided)."""
    summary = experiment._paper_summary(experiment.PAPER_TABLE1[ROW_P1])
    assert summary["Mean"]["dice"]["mean"] == pytest.approx(0.7218)
    assert summary["Mean"]["assd_vox"]["mean"] == pytest.approx(5.11)
    assert summary["LV-M"]["assd_vox"]["std"] == pytest.approx(10.87)
    md = table1[1][0].read_text()
    side_by_side = md[md.index("## Mean Dice [%] side by side"):]
    mine = table1[2]["mean_dice_percent"][ROW_P1]
    assert f"| {ROW_P1} | {mine:.2f} | 72.18 |" in side_by_side        # the Mean column, not A-A's 78.38


def test_held_out_probe_segments_through_the_target_encoder(tiny_cohort, tiny_source_model, segmented_domains):
    """The curves score what the adapted model segments with: the target encoder path."""
    import torch

    from vaeuda.modelfile import load_model
    net, meta = load_model(tiny_source_model)
    probe = experiment.HeldOutDiceProbe(tiny_cohort, ["ct_1002"], net.cfg.input_size, net.cfg.slice_fov_mm,
                                        meta["normalisation"], torch.device("cpu"))
    result = probe(1, net)
    assert segmented_domains == ["target"] and 0.0 <= result["test_dice_mean"] <= 1.0


def test_held_out_probe_counts_the_undefined_assds(tiny_cohort, tiny_source_model, monkeypatch):
    """A prediction of background everywhere: Dice 0 for each structure, and every ASSD undefined,
    so the ASSD mean is None and the count says how many entries it lost (4 structures x 2 volumes)."""
    import numpy as np
    import torch

    from vaeuda import predict
    from vaeuda.modelfile import load_model

    def background(net, slices, domain, *a, **k):
        probs = np.zeros((slices.shape[0], net.cfg.n_classes) + slices.shape[2:], dtype=np.float16)
        probs[:, 0] = 1.0
        return probs

    net, meta = load_model(tiny_source_model)
    probe = experiment.HeldOutDiceProbe(tiny_cohort, ["ct_1001", "ct_1002"], net.cfg.input_size,
                                        net.cfg.slice_fov_mm, meta["normalisation"], torch.device("cpu"))
    monkeypatch.setattr(predict, "slice_probabilities", background)
    result = probe(1, net)
    assert result["test_dice_mean"] == 0.0
    assert result["test_assd_vox_mean"] is None and result["test_assd_vox_undefined"] == 8


def test_bad_cohort_is_one_clear_error(tmp_path):
    with pytest.raises(VaeudaError, match="splits.json: not found"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps([["mr_1"], ["ct_1"]]))
    with pytest.raises(VaeudaError, match="splits.json: holds no JSON object of splits"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1"]}, "ct": {"train": ["ct_1"], "test": []}}))
    with pytest.raises(VaeudaError, match="ct test split is empty"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1"]}, "ct": {"train": ["ct_1", "ct_2"], "test": ["ct_2"]}}))
    with pytest.raises(VaeudaError, match="ct_2 is in both the ct train and test splits; a held-out test scan must not"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1", "mr_1"]}, "ct": {"train": ["ct_1"], "test": ["ct_2"]}}))
    with pytest.raises(VaeudaError, match="mr_1 is listed twice in the mr train split"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1"]}, "ct": {"train": ["ct_1"], "test": ["ct_2"]}}))
    with pytest.raises(VaeudaError, match="mr_1_image.nii.gz: listed in splits.json"):
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1"]}, "ct": {"train": [1001], "test": ["ct_2"]}}))
    with pytest.raises(VaeudaError, match='splits.json: has no "ct" -> "train" list of scan prefixes'):   # a number, no name
        experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    for repeats in (0, 3.0, True):          # the Python API is held to what the command line takes
        with pytest.raises(VaeudaError, match=f"--repeats must be a whole number of at least 1, not {repeats!r}"):
            experiment.run_table1(tmp_path, tmp_path / "out", repeats=repeats)
    # repeat k adapts with seed + k: refused before any training, not as an overflow after hours of it
    with pytest.raises(VaeudaError, match=r"--seed 18446744073709551615 leaves no room for 2 repeats"):
        experiment.run_table1(tmp_path, tmp_path / "out", repeats=2, seed=2 ** 64 - 1)
    assert not (tmp_path / "out").exists()


def test_held_out_probe_scores_what_segment_and_evaluate_score(cohort, table1):
    """The curve probe and the table's file-based scoring agree on the same model and volumes."""
    import torch

    from vaeuda.demo import image_of, label_of
    from vaeuda.labels import MMWHS
    from vaeuda.metrics import evaluate_volume, summarise
    from vaeuda.modelfile import load_model
    from vaeuda.predict import segment_image
    from vaeuda import volumes
    import SimpleITK as sitk

    out, _, _ = table1
    model = sorted((out / "models").glob("proposed1_*.safetensors"))[0]
    net, meta = load_model(model)
    # The tiny model segments nothing yet, and two all-background scorings agree whatever they read:
    # a random classifier head (fixed seed) whose scores are standardised over each slice makes the
    # classes appear in it, so the two scorings agree only if they read the same slices the same way.
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(net.seg.head.weight)
    net.seg.head.register_forward_hook(
        lambda module, args, out: (out - out.mean((2, 3), keepdim=True)) / out.std((2, 3), keepdim=True))
    tests = json.loads((cohort / "splits.json").read_text())["ct"]["test"]
    probe = experiment.HeldOutDiceProbe(cohort, tests, net.cfg.input_size, net.cfg.slice_fov_mm,
                                        meta["normalisation"], torch.device("cpu"))
    got = probe(0, net)
    scores = []
    for prefix in tests:
        image = volumes.read_image(image_of(cohort, prefix))
        pred = sitk.GetArrayFromImage(segment_image(net, meta, image, torch.device("cpu"), "target"))
        ref = sitk.GetArrayFromImage(volumes.read_label(label_of(cohort, prefix), MMWHS, reference=image))
        scores.append(evaluate_volume(pred, ref, tuple(reversed(image.GetSpacing()))))
    expected = summarise(scores)
    assert sum(expected[key]["dice"]["mean"] > 0.005 for key in CLASS_KEYS) >= 2, expected     # not all background
    assert got["test_dice_mean"] == pytest.approx(expected["Mean"]["dice"]["mean"], abs=1e-5)
    for key in CLASS_KEYS:
        assert got["test_dice"][key] == pytest.approx(expected[key]["dice"]["mean"], abs=1e-5)


def test_a_cohort_in_another_label_convention_gives_the_same_table(cohort, table1, tmp_path):
    """splits.json's "labels" names the convention of the cohort's label files: the same cohort with
    consecutive values (1-4) trains and scores exactly as with MM-WHS values."""
    import shutil

    import SimpleITK as sitk
    import torch
    from vaeuda.demo import cohort_convention
    from vaeuda.labels import CONSECUTIVE, MMWHS
    from vaeuda.modelfile import read_tensors

    recoded = tmp_path / "consecutive"
    shutil.copytree(cohort, recoded)
    for label in recoded.glob("*_label.nii.gz"):
        image = sitk.ReadImage(str(label))
        classes = sitk.GetImageFromArray(CONSECUTIVE.decode(MMWHS.encode(sitk.GetArrayFromImage(image))))
        classes.CopyInformation(image)
        sitk.WriteImage(classes, str(label))
    splits = json.loads((recoded / "splits.json").read_text())
    (recoded / "splits.json").write_text(json.dumps(dict(splits, labels="consecutive")))
    assert cohort_convention(recoded).name == "consecutive" and cohort_convention(cohort).name == "mmwhs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        experiment.run_table1(recoded, tmp_path / "out", repeats=REPEATS, preset="tiny", seed=1, device="cpu",
                              iterations_scale=SCALE, reporter=Reporter("none"))
    finally:
        torch.set_num_threads(threads)
    again = json.loads((tmp_path / "out" / "table1.json").read_text())
    assert {r: v["summary"] for r, v in again["rows"].items()} == {r: v["summary"] for r, v in table1[2]["rows"].items()}
    # The tiny models segment nothing yet, so equal tables alone would pass whatever labels were read:
    # trained on the same classes, every model has the same weights to the bit.
    models = sorted(p.name for p in (table1[0] / "models").glob("*.safetensors"))
    assert len(models) == 10 and models == sorted(p.name for p in (tmp_path / "out" / "models").glob("*.safetensors"))
    for name in models:
        first, second = (read_tensors(root / "models" / name)[0] for root in (table1[0], tmp_path / "out"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
    (recoded / "splits.json").write_text(json.dumps(dict(splits, labels=7)))
    with pytest.raises(VaeudaError, match=r"\"labels\" must name a label convention"):
        cohort_convention(recoded)


def test_a_scan_prefix_with_a_path_in_it_is_refused(tmp_path):
    """A prefix such as ../../victim/scan in splits.json made experiment write models and predictions outside
    --out, and a rerun delete a folder of the user's there."""
    for bad in ("../victim/scan", "/tmp/scan", "a\\b", "..", "", "c:scan"):
        (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1"]},
                                                          "ct": {"train": [bad], "test": ["ct_2"]}}))
        with pytest.raises(VaeudaError, match=f'{re.escape(repr(bad))} in "ct" -> "train" is not a scan prefix'):
            experiment.run_table1(tmp_path, tmp_path / "out", preset="tiny", device="cpu")
    assert not (tmp_path / "out").exists()


def test_repeats_and_the_iteration_scale_are_bounded_before_any_folder_is_made(cohort, tmp_path, monkeypatch):
    """--repeats 1000000000 built a billion draws in memory before any training; --iterations-scale 1e6 was
    refused by the training stage (naming --iterations, which experiment has not) after making folders."""
    with pytest.raises(VaeudaError, match=f"--repeats must be at most {experiment.MAX_REPEATS:,}"):
        experiment.run_table1(cohort, tmp_path / "out", repeats=experiment.MAX_REPEATS + 1, preset="tiny", device="cpu")
    with pytest.raises(VaeudaError, match=r"^--iterations-scale 1000000.0 gives 20,000,000 source iterations; at most "
                                          r"10,000,000 are run\.$"):
        experiment.run_table1(cohort, tmp_path / "out", preset="tiny", device="cpu", iterations_scale=1e6)
    # the cpu preset fine-tunes longest (1,600 iterations against the source model's 700): that stage is the bound's
    # (the work after the check is stopped at once, should the check let the run through)
    monkeypatch.setattr(experiment, "_few_shot_slices", lambda *a: pytest.fail("the run went past the bound"))
    with pytest.raises(VaeudaError, match=r"^--iterations-scale 10000.0 gives 16,000,000 finetune iterations; at most "
                                          r"10,000,000 are run\.$"):
        experiment.run_table1(cohort, tmp_path / "out", preset="cpu", device="cpu", iterations_scale=1e4)
    assert not (tmp_path / "out").exists()


def test_a_rerun_clears_only_its_own_predictions(tmp_path):
    """The prediction folder was removed whole before scoring again, with a user's file in it."""
    folder = tmp_path / "proposed1_r1_ct_1001"
    folder.mkdir()
    for name in ("ct_1017_image_seg.nii.gz", "evaluation.json", "notes.txt"):
        (folder / name).write_text(name)
    experiment._clear_predictions(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    experiment._clear_predictions(tmp_path / "none")                  # no folder yet: nothing to do
