"""The benchmark scripts at smoke size: they run, their outputs parse, and what can be checked by
hand is right (CI runs only these; the real measurements are `make bench` / `make bench-gpu`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    """A benchmark script imported as a module (for its helpers); sys.path is left as it was."""
    import importlib
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # One thread: the smoke sizes gain nothing from two, and lose a lot when the cores are busy.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    proc = _run("bench_gpu.py", "--device", "cpu", "--smoke", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


@pytest.fixture(scope="module")
def speed_smoke(tmp_path_factory, gpu_smoke):
    folder = tmp_path_factory.mktemp("bench")
    md = folder / "bench.md"
    proc = _run("bench_speed.py", "--smoke", "--presets", "tiny", "cpu", "--threads", "1", "--out", str(md),
                "--gpu-json", str(gpu_smoke[0]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return md, json.loads((folder / "bench.json").read_text())


def test_bench_gpu_runs_on_the_cpu(gpu_smoke):
    out, proc = gpu_smoke
    result = json.loads(out.read_text())
    assert result["machine"]["torch_threads"] == 1                       # --threads, as the other benchmarks
    assert [r["bf16"] for r in result["rows"]] == [True, False]
    for row in result["rows"]:
        for stage in ("source", "adapt"):
            assert row[stage]["images_per_s"] > 0 and row[stage]["peak_bytes"] is None   # no CUDA memory on a CPU
        assert row["inference"]["slices"] == 8 and row["inference"]["volume_s"] > 0
    assert result["markdown"] in proc.stdout and "| on |" in result["markdown"]


def test_bench_gpu_refuses_cuda_without_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run("bench_gpu.py", "--out", "/nonexistent/never-written.json")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_bench_speed_smoke_outputs(speed_smoke):
    md, js = speed_smoke
    text = md.read_text()
    for heading in ("## Machine", "## FLOPs per image", "## Training throughput", "## Inference against the limit",
                    "## Inference time per volume", "## Peak memory", "## Inference variants", "## GPU"):
        assert heading in text
    assert "Measured by `benchmarks/bench_gpu.py" in text            # the GPU JSON was folded in
    # the page's own command reproduces it (a smoke run is refused Docs/benchmarks.md)
    assert ("bench_speed.py --smoke --presets tiny cpu --threads 1 --paper-slices 200 --out /tmp/bench.md   "
            "# this page's settings") in text
    assert [(r["preset"], r["stage"]) for r in js["training"]] == [
        ("tiny", "source"), ("tiny", "adapt"), ("cpu", "source"), ("cpu", "adapt")]
    assert all(r["images_per_s"] > 0 and r["train_flops_per_image"] > 0 for r in js["training"])
    for r in js["inference_rate"]:
        assert 0 < r["achieved_over_attainable"] and r["attainable_conv_gflops_per_s"] > 0
    assert js["memory"]["rss_peak"] >= js["memory"]["rss_with_input"] > 0
    assert js["variants"]["rows"][0]["speedup"] == 1.0
    assert set(js["load"]) >= {"flops", "training", "memory"}


def test_flop_count_matches_a_hand_count(speed_smoke):
    _, js = speed_smoke
    # tiny Disc, 32x32 input, 2 scales of [pad 1, conv 4x4/2] x 2 then a 1x1 conv:
    # scale 1: 16*16*4*(3*16) + 8*8*8*(4*16) + 8*8*8 = 82432 multiply-adds
    # scale 2 (input pooled to 16x16): 8*8*4*48 + 4*4*8*64 + 4*4*8 = 20608
    assert js["flops"]["tiny"]["Disc"] == 2 * (82432 + 20608)
    # the inference path is E_S + E_Z + Seg
    f = js["flops"]["cpu"]
    assert f["inference path"] == f["E_S / E_T"] + f["E_Z"] + f["Seg (DRN)"]


@pytest.mark.parametrize("threads, hi, idle", [(1, 1.1, True), (1, 2.1, False), (None, 2.9, True), (1, 5.1, False)])
def test_the_load_sentence_discounts_the_benchmarks_own_threads(threads, hi, idle):
    """2 logical cores: a 1-thread run alone reads a load of about 1; other work is at least half the
    cores beyond it."""
    sentence = _bench_module("bench_speed")._load_sentence(
        {"machine": {"logical_cores": 2}, "settings": {"threads": threads},
         "load": {"flops": {"before": [0.6, 0.7, 0.4], "after": [hi, 0.8, 0.4]}}})
    assert sentence.startswith("The machine was otherwise idle" if idle else "Other work was running")
    assert f"0.6 to {hi:.1f} on 2 logical cores" in sentence


def test_forced_autocast_switches_bf16_where_the_engine_does_not():
    import torch
    forced_autocast = _bench_module("common").forced_autocast
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with forced_autocast(True), torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):
        assert conv(x).dtype == torch.bfloat16
    with forced_autocast(False), torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=True):
        assert conv(x).dtype == torch.float32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):
        assert conv(x).dtype == torch.float32          # restored afterwards


def test_translation_contrast_table(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.train import adapt
    md = tmp_path / "contrast.md"
    proc = _run("translation_contrast.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--out", str(md))        # a source model's E_T was never trained: its x_ST, x_TS mean nothing
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {tiny_source_model}: is a 'source' model; the translations need an adapted one.") and not md.exists()
    adapted = tmp_path / "adapted.safetensors"
    adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], adapted, iterations=1, device="cpu")
    proc = _run("translation_contrast.py", "--model", str(adapted), "--cohort", str(tiny_cohort), "--mr", "ct_1001")
    assert (proc.returncode, proc.stderr) == (1, "error: ct_1001: is not one of the cohort's MR scans (splits.json).\n")
    proc = _run("translation_contrast.py", "--model", str(adapted), "--cohort", str(tiny_cohort), "--out", str(md))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| x_")]
    assert [r.split(" | ")[0] for r in rows] == ["| x_S (real MR)", "| x_SS", "| x_ST (MR as CT)", "| x_T (real CT)",
                                                  "| x_TT", "| x_TS (CT as MR)"]
    # the real-image rows do not depend on the model: check one against border_contrast directly
    from vaeuda.data import load_slices
    from vaeuda.diagnose import border_contrast
    from vaeuda.labels import MMWHS
    from vaeuda.modelfile import load_model
    net, meta = load_model(tiny_source_model)
    ct = load_slices([tiny_cohort / "ct_1002_image.nii.gz"], net.cfg.input_size, net.cfg.slice_fov_mm,
                     meta["normalisation"], [tiny_cohort / "ct_1002_label.nii.gz"], MMWHS)
    expected = border_contrast(ct.images[:, 1].numpy(), ct.labels.numpy())["ring - myocardium"]
    assert rows[3].rstrip(" |").split(" | ")[-1] == f"{expected:.2f}"


def test_released_contrast_of_the_real_samples(mmwhs_samples):
    from vaeuda.formats import read_tfrecords
    files = [mmwhs_samples / f for f in ("training_mr.tfrecords", "validation_ct.tfrecords")]
    proc = _run("released_contrast.py", *map(str, files))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:]
            for line in proc.stdout.splitlines() if ".tfrecords" in line}
    assert rows["validation_ct.tfrecords"] == ["no LV"] * 5        # that slice shows only the LA
    # blood - myocardium by hand: the middle channel's mean over label 3 minus its mean over label 1
    (image, label), = read_tfrecords(files[0])
    expected = image[1][label == 3].mean() - image[1][label == 1].mean()
    assert rows["training_mr.tfrecords"][3] == f"{expected:.2f}"


def test_released_contrast_refuses_a_foreign_file(mmwhs_samples, tmp_path):
    """Named as what it is, before any row is printed (the table is all or nothing)."""
    proc = _run("released_contrast.py", str(mmwhs_samples / "example_mr.npz"), str(mmwhs_samples / "README.md"))
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == (
        f"error: {mmwhs_samples / 'README.md'}: is not a released .tfrecords or .npz file.\n")
    damaged = tmp_path / "damaged.tfrecords"                 # named as a record file: its checksum tells
    damaged.write_bytes((mmwhs_samples / "README.md").read_bytes())
    proc = _run("released_contrast.py", str(damaged))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "CRC" in proc.stderr


@pytest.mark.parametrize("switch", [None, "--no-adv"])
def test_adaptation_curves(tiny_cohort, tiny_source_model, tmp_path, switch):
    out = tmp_path / "curves.json"
    model = tmp_path / "adapted.safetensors"
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--val", "ct_1002", "--iterations", "4", "--every", "2",
                "--out", str(out), "--model-out", str(model), *([switch] if switch else []))
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = json.loads(out.read_text())["curve"]
    assert [row["iteration"] for row in curve] == [0, 2, 4]
    assert all(0 <= row["val"] <= 100 and 0 <= row["test"] <= 100 for row in curve)
    assert all(set(row["disc"]) == {"x_S", "x_SS", "x_TS", "x_T"} for row in curve)
    # the ablation reaches the engine: without the adversarial terms Disc is never stepped, so its
    # score on the same real MR slices cannot change between evaluations; with them it does
    same = curve[1]["disc"]["x_S"] == curve[2]["disc"]["x_S"]
    assert same if switch == "--no-adv" else not same
    from vaeuda.modelfile import load_model
    assert load_model(model)[1]["train"]["use_adv"] is (switch is None)


def test_adaptation_curves_reads_a_vanilla_discriminators_logits_as_scores(tiny_cohort, tmp_path):
    """A source model trained with the log-form GAN loss keeps it in adaptation (train.adapt inherits
    it), so its discriminator gives logits; the curve must show them through the sigmoid (real 1,
    fake 0) without --set gan_mode saying so."""
    import torch
    from vaeuda.modelfile import load_model
    from vaeuda.train import train_source
    source, out = tmp_path / "vanilla.safetensors", tmp_path / "curves.json"
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"], source,
                 preset="tiny", iterations=2, seed=0, device="cpu", overrides={"gan_mode": "vanilla"})
    proc = _run("adaptation_curves.py", "--model", str(source), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--val", "ct_1002", "--iterations", "1", "--every", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads(out.read_text())["curve"][0]["disc"]["x_S"]
    curves, common = _bench_module("adaptation_curves"), _bench_module("common")
    net, meta = load_model(source)
    from vaeuda.demo import cohort_split
    mr = common.cohort_slices(tiny_cohort, cohort_split(tiny_cohort, "mr", "train")[:2], net.cfg,
                              meta["normalisation"]).images
    with torch.no_grad():
        expected = curves.mean_score(net.disc, curves.fixed_slices(mr, curves.DISC_SLICES, 0), "vanilla")
    assert recorded == pytest.approx(expected, abs=1e-4) and 0 < recorded < 1


def test_adaptation_curves_records_the_translations_contrast(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.diagnose import translation_contrast
    from vaeuda.modelfile import load_model
    out, model = tmp_path / "curves.json", tmp_path / "adapted.safetensors"
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--val", "ct_1002", "--iterations", "4", "--every", "2", "--contrast",
                "--out", str(out), "--model-out", str(model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = json.loads(out.read_text())["curve"]

    cohort_slices = _bench_module("common").cohort_slices

    def contrast(path):
        net, meta = load_model(path)
        mr, ct = (cohort_slices(tiny_cohort, [scan], net.cfg, meta["normalisation"], labelled=True)
                  for scan in ("mr_1001", "ct_1002"))
        return translation_contrast(net, mr.images, mr.labels, ct.images, ct.labels)

    short_names = _bench_module("adaptation_curves").CONTRAST_COLUMNS

    def recorded(row, name, column):
        return row["contrast"][name][short_names[column]]

    # iteration 0: D_T is D_S's copy, so MR rendered as CT is the source model's own reconstruction
    before = contrast(tiny_source_model)
    # the last row is the weight average the saved model keeps
    after = contrast(model)
    for column in ("blood - myocardium", "ring - myocardium"):
        assert recorded(curve[0], "x_ST", column) == pytest.approx(before["x_SS"][column], abs=1e-3)
        assert recorded(curve[-1], "x_ST", column) == pytest.approx(after["x_ST (MR as CT)"][column], abs=1e-3)
        assert recorded(curve[-1], "x_TS", column) == pytest.approx(after["x_TS (CT as MR)"][column], abs=1e-3)
    assert recorded(curve[-1], "x_ST", "ring - myocardium") != recorded(curve[0], "x_ST", "ring - myocardium")


def test_adaptation_curves_overrides_reach_the_engine(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.modelfile import load_model
    model = tmp_path / "adapted.safetensors"
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--iterations", "2", "--every", "2", "--model-out", str(model),
                "--set", "lambda_adv=10", "--set", "ema_decay=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = load_model(model)[1]["train"]
    assert (train["lambda_adv"], train["ema_decay"], train["lambda_cyc"]) == (10, 0.5, 10.0)


@pytest.mark.parametrize("setting, message", [("lambda_advv=1", "unknown training option 'lambda_advv'"),
                                              ("lambda_adv", "expected NAME=VALUE")])
def test_adaptation_curves_refuses_a_bad_override(tiny_cohort, tiny_source_model, tmp_path, setting, message):
    out = tmp_path / "curves.json"
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--iterations", "2", "--out", str(out), "--set", setting)
    assert proc.returncode != 0 and message in proc.stderr and not out.exists()


def test_adaptation_curves_reads_both_gan_forms_as_real_1_fake_0():
    import torch
    mean_score = _bench_module("adaptation_curves").mean_score
    logits = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-2.0]])]      # two scales

    def disc(images):
        return logits
    assert mean_score(disc, None) == pytest.approx((1.0 + -2.0) / 2, abs=1e-4)     # LSGAN: scores as they are
    sigmoid_2 = 1 / (1 + 2.718281828 ** -2)
    vanilla = ((0.5 + sigmoid_2) / 2 + (1 - sigmoid_2)) / 2              # patch mean of sigmoid, then scale mean
    assert mean_score(disc, None, "vanilla") == pytest.approx(vanilla, abs=1e-4)


def test_latent_probe_reads_separable_and_identical_encodings():
    import torch
    latent_probe = _bench_module("adaptation_curves").latent_probe
    g = torch.Generator().manual_seed(0)
    noise = lambda: torch.randn(24, 8, 6, 6, generator=g)          # noqa: E731
    # shifted by 3 noise stds in every channel: any location tells its domain
    far = latent_probe(noise() + 3, noise(), noise() + 3, noise(), seed=0)
    assert far["accuracy"] > 0.99 and far["pad"] == pytest.approx(2 * (2 * far["accuracy"] - 1), abs=1e-3)
    # the same distribution on both sides: the held-out balanced accuracy is near chance
    same = latent_probe(noise(), noise(), noise(), noise(), seed=0)
    assert abs(same["accuracy"] - 0.5) < 0.1 and same["pad"] == pytest.approx(2 * (2 * same["accuracy"] - 1), abs=1e-3)
    # its own randomness: the global generator is where it was
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    latent_probe(noise(), noise(), noise(), noise(), seed=1, steps=3)
    assert torch.equal(torch.rand(1), expected)


def test_adaptation_curves_latent_probe_leaves_the_curve_unchanged(tiny_cohort, tiny_source_model, tmp_path):
    curves = {}
    for flags in ((), ("--latent-probe",), ("--latent-probe", "--contrast")):
        out = tmp_path / f"curves{len(flags)}.json"
        proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                    "--target", "ct_1001", "--val", "ct_1002", "--iterations", "4", "--every", "2", "--out", str(out),
                    *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
        curves[flags] = json.loads(out.read_text())["curve"]
    with_probe = curves[("--latent-probe",)]
    assert all(0.0 <= row["latent"]["accuracy"] <= 1.0 for row in with_probe)
    assert [{k: v for k, v in row.items() if k != "latent"} for row in with_probe] == curves[()]
    # with --contrast the probe scores the validation slices read once for both: the same numbers
    assert [row["latent"] for row in curves[("--latent-probe", "--contrast")]] == [row["latent"] for row in with_probe]


def test_adaptation_curves_refuses_a_missing_cohort(tiny_source_model, tmp_path):
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tmp_path / "none"),
                "--target", "ct_1001")
    assert proc.returncode == 1 and "splits.json" in proc.stderr


def test_adaptation_curves_can_freeze_the_target_encoder(tiny_cohort, tiny_source_model, tmp_path):
    import torch
    from vaeuda.modelfile import load_model
    source, _ = load_model(tiny_source_model)
    for scale in ("0", "1"):
        model = tmp_path / f"adapted_{scale}.safetensors"
        proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                    "--target", "ct_1001", "--iterations", "3", "--every", "3", "--model-out", str(model),
                    "--target-encoder-lr-scale", scale)
        assert proc.returncode == 0, proc.stderr[-2000:]
        adapted, _ = load_model(model)
        frozen = all(torch.equal(a, b) for a, b in zip(adapted.enc_t.state_dict().values(),
                                                       source.enc_s.state_dict().values()))
        assert frozen is (scale == "0")          # E_T stays E_S's copy only when frozen
        assert not torch.equal(adapted.dec_t.net[-1][1].weight, source.dec_s.net[-1][1].weight)  # D_T learns either way


def test_one_scan_draws_adapts_once_per_draw_and_summarises(tiny_cohort, tiny_source_model, tmp_path):
    out = tmp_path / "draws.json"
    # the tiny cohort's CT pool is one scan, so two draws take it twice: same scan, same seed
    proc = _run("one_scan_draws.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--draws", "2", "--iterations", "2", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    first, second = record["draws"]
    assert first["scan"] == second["scan"] == "ct_1001"
    assert first["dice"] == second["dice"]                      # deterministic per seed
    assert set(first["dice"]) == {"LV-M", "LA-B", "LV-B", "A-A", "Mean"}
    mean = first["dice"]["Mean"]
    assert mean == pytest.approx(sum(first["dice"][k] for k in ("LV-M", "LA-B", "LV-B", "A-A")) / 4, abs=0.02)
    assert record["summary"]["mean_dice"]["Mean"] == mean
    assert record["summary"]["draw_mean_dice"] == {"median": mean, "min": mean, "max": mean, "std": 0.0}


def test_one_scan_draws_passes_set_options_to_the_engine(tiny_cohort, tiny_source_model):
    """--set reaches train.adapt (the engine refuses a batch size of 0 in its own sentence); a
    malformed one is a usage error before anything runs."""
    base = ("one_scan_draws.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort), "--draws", "1",
            "--iterations", "1", "--threads", "1")
    proc = _run(*base, "--set", "batch_size=0")
    assert proc.returncode == 1 and "--batch-size must be a whole number of at least 1, not 0" in proc.stderr
    proc = _run(*base, "--set", "lr_scale")
    assert proc.returncode == 2 and "--set lr_scale: expected NAME=VALUE" in proc.stderr


def test_one_scan_draws_refuses_a_missing_cohort(tiny_source_model, tmp_path):
    proc = _run("one_scan_draws.py", "--model", str(tiny_source_model), "--cohort", str(tmp_path / "none"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "splits.json" in proc.stderr


def test_paired_alignment_moves_the_target_encoding_towards_the_mr_latent(tiny_cohort, tiny_source_model,
                                                                          tmp_path):
    out = tmp_path / "paired.json"
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--iterations", "6", "--every", "3", "--out", str(out), "--latent-probe", "ct_1002")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert all(0.0 <= row["latent"]["accuracy"] <= 1.0 for row in record["curve"])
    assert record["pairing"]["slices"] == 32                            # one MR training volume of 32 coronal slices
    assert record["pairing"]["label_agreement"] > 0.6                   # the CT of the same body overlays its MR
    curve = record["curve"]
    assert [row["iteration"] for row in curve] == [0, 3, 6]
    assert curve[-1]["latent_mse"] < curve[0]["latent_mse"]
    assert set(record["kl"]) == {"E_T on CT, before", "E_T on CT, after", "E_S on MR"}


def test_paired_alignment_refuses_a_cohort_it_cannot_redraw(tiny_cohort, tiny_source_model, tmp_path):
    import shutil
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    splits = json.loads((cohort / "splits.json").read_text())
    (cohort / "splits.json").write_text(json.dumps(dict(splits, seed=splits["seed"] + 1)))
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(cohort), "--iterations", "1")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "is not the subject its seed draws" in proc.stderr
    for not_a_seed in ("7", True):
        (cohort / "splits.json").write_text(json.dumps(dict(splits, seed=not_a_seed)))
        proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(cohort), "--iterations", "1")
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no integer cohort seed" in proc.stderr
    (cohort / "splits.json").write_text(json.dumps(splits)[:-5])          # cut short: not JSON
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(cohort), "--iterations", "1")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "cannot be read as JSON" in proc.stderr
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tmp_path / "none"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "splits.json: not found" in proc.stderr
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--latent-probe", "ct_1001")                     # the tiny cohort's only CT training scan
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no validation CT scan to score the latent probe on" in proc.stderr


def test_paired_alignment_plays_e_t_against_an_informed_discriminator(tiny_cohort, tiny_source_model, tmp_path):
    out = tmp_path / "adversarial.json"
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--disc-on", "ct_1001", "--disc-steps", "20", "--objective", "adversarial",
                "--iterations", "20", "--every", "20", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, last = json.loads(out.read_text())["curve"]
    assert first["disc"]["x_S"] > first["disc"]["x_TS"]                 # 20 steps already tell MR from x_TS
    assert last["disc"]["x_S"] == first["disc"]["x_S"]                  # held fixed without --disc-learns
    assert last["disc"]["x_TS"] > first["disc"]["x_TS"]                 # E_T learns to fool it
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--objective", "adversarial")
    assert proc.returncode == 2 and "needs --disc-on" in proc.stderr


def test_paired_alignment_measures_an_adapted_models_own_target_encoder(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.train import adapt
    adapted = tmp_path / "adapted.safetensors"
    adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], adapted, iterations=3, seed=0, device="cpu")
    rows = {}
    for name, model, extra in (("copy of E_S", adapted, []), ("own", adapted, ["--own-target-encoder"])):
        out = tmp_path / f"{name}.json"
        proc = _run("paired_alignment.py", "--model", str(model), "--cohort", str(tiny_cohort), "--iterations", "0",
                    "--out", str(out), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows[name], = json.loads(out.read_text())["curve"]                 # --iterations 0: the start only
    assert rows["own"]["latent_mse"] != rows["copy of E_S"]["latent_mse"]   # E_T after adaptation, not E_S's copy
    proc = _run("paired_alignment.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--own-target-encoder", "--iterations", "0")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "needs an adapted model" in proc.stderr


def test_study_records_name_their_machine_and_commit_and_are_written_whole(tmp_path, monkeypatch):
    common = _bench_module("common")
    path = tmp_path / "r.json"
    path.write_text("earlier", encoding="utf-8")
    common.write_record(path, {"args": {"draws": 6}})
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["args"] == {"draws": 6} and record["machine"]["logical_cores"] >= 1
    assert record["engine_commit"] == common.engine_commit() and record["engine_commit"]   # this is a checkout

    def unserialisable(*a, **k):
        raise TypeError("not JSON")
    monkeypatch.setattr(common.json, "dumps", unserialisable)
    with pytest.raises(TypeError, match="^not JSON$"):
        common.write_record(path, {"args": {}})
    assert json.loads(path.read_text(encoding="utf-8"))["args"] == {"draws": 6}     # the old record stands


def test_a_gpu_run_stopped_midway_is_folded_in_as_partial(tmp_path):
    """bench_gpu.py rewrites its JSON after every stage (a session's time limit may stop it); the page
    says so instead of failing on the missing table."""
    root = BENCH.parent
    partial = tmp_path / "gpu.json"
    partial.write_text(json.dumps({"command": "benchmarks/bench_gpu.py", "partial": True, "machine": {"gpu": "H100"},
                                   "device": "cuda", "settings": {}, "rows": [{"bf16": True}]}), encoding="utf-8")
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--from-json",
                           "benchmarks/results/cpu-1thread-loaded.json", "--gpu-json", str(partial), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "`benchmarks/bench_gpu.py` on H100 was stopped before it finished" in out.read_text()


def test_docs_benchmarks_is_the_render_of_its_record_and_notes(tmp_path):
    """Docs/benchmarks.md is generated (`bench_speed.py --from-json`, from the recorded run and
    benchmarks/NOTES.md): an edit made in the page instead of NOTES.md would be lost by `make bench`."""
    root = BENCH.parent
    page = (root / "Docs" / "benchmarks.md").read_text()
    record = re.search(r"this page rendered from `(benchmarks/results/[^`]+\.json)`", page.splitlines()[2]).group(1)
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--from-json", record, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=root)   # the page names the path
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == page


def test_kernel_paths_strips_every_kernel_variable_and_sets_only_its_own():
    kernel_paths = _bench_module("kernel_paths")
    from vaeuda.machine import KERNEL_VARIABLES
    assert {k for env in kernel_paths.KERNEL_PATHS.values() for k in env} <= set(KERNEL_VARIABLES)
    base = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "HOME": "/home/u", "PYTHONPATH": "/elsewhere"}
    engine = str(BENCH.parent / "VAEUDASegmentation")
    assert kernel_paths.variant_env("default", base) == {"HOME": "/home/u", "PYTHONPATH": engine + os.pathsep + "/elsewhere"}
    cnr = kernel_paths.variant_env("mkl-cnr-compatible", base)
    assert cnr["MKL_CBWR"] == "COMPATIBLE" and "OMP_NUM_THREADS" not in cnr and "ONEDNN_MAX_CPU_ISA" not in cnr
    assert kernel_paths.variant_env("one-thread", {})["OMP_NUM_THREADS"] == "1"
    assert base["MKL_CBWR"] == "AVX2"                                      # the caller's environment is not edited


def test_kernel_paths_under_portable_numerics_leaves_out_the_variants_that_set_their_variables():
    kernel_paths = _bench_module("kernel_paths")
    assert kernel_paths.portable_conflicts(list(kernel_paths.KERNEL_PATHS)) == ["mkl-cnr-compatible"]
    proc = _run("kernel_paths.py", "--portable", "--variants", "default", "mkl-cnr-compatible")
    assert proc.returncode == 2
    assert "--portable sets MKL_CBWR, ATEN_CPU_CAPABILITY itself; leave out mkl-cnr-compatible" in proc.stderr
    command = kernel_paths.demo_command(Path("out"), 2, quick=False, portable=True)
    assert command[1:] == ["-m", "vaeuda", "demo", "--out", "out", "--seed", "2", "--device", "cpu",
                           "--progress", "none", "--portable"]
    assert "--portable" not in kernel_paths.demo_command(Path("out"), 0, quick=True, portable=False)


def test_kernel_paths_tabulates_each_variants_demo_report(tmp_path):
    out, keep = tmp_path / "paths.json", tmp_path / "runs"
    proc = _run("kernel_paths.py", "--variants", "one-thread", "--quick", "--keep", str(keep), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row, = json.loads(out.read_text())["variants"]
    report = json.loads((keep / "one-thread" / "report.json").read_text())
    assert report["quick"] is True
    assert ", 1 thread, " in report["machine"] and ", OMP_NUM_THREADS=1, kernel fingerprint " in report["machine"]
    from vaeuda.demo import ROW_ADAPTED, ROW_ORACLE, ROW_UNADAPTED
    unadapted, adapted, oracle = (report["mean_dice"][k] for k in (ROW_UNADAPTED, ROW_ADAPTED, ROW_ORACLE))
    assert row["env"] == {"OMP_NUM_THREADS": "1"}
    assert row["gain"] == round(adapted - unadapted, 2)
    assert row["ratio_to_oracle"] == (round(100 * adapted / oracle, 1) if oracle > 0 else None)
    assert f"| one-thread | `OMP_NUM_THREADS=1` | {unadapted:.2f} | {adapted:.2f} | {oracle:.2f} |" in proc.stdout


def test_kernel_paths_fingerprints_name_the_library_path_a_variant_changes(tmp_path):
    """MKL's reproducible branch changes MKL's matrix product and leaves torch's own kernels alone."""
    out = tmp_path / "prints.json"
    proc = _run("kernel_paths.py", "--fingerprints", "--variants", "default", "mkl-cnr-compatible", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, cnr = json.loads(out.read_text())["variants"]
    assert cnr["env"] == {"MKL_CBWR": "COMPATIBLE"} and cnr["numerics"]["environment"] == cnr["env"]
    assert default["fingerprint"]["gemm"] != cnr["fingerprint"]["gemm"]
    assert default["fingerprint"]["norm"] == cnr["fingerprint"]["norm"]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mkl-cnr-compatible |"))
    assert f"**{cnr['fingerprint']['gemm']}**" in row and f"**{cnr['fingerprint']['norm']}**" not in row
    assert f" {cnr['fingerprint']['norm']} " in row


def test_oracle_convergence_fine_tunes_per_count_and_split(tiny_source_model, tmp_path):
    """Two counts x (validation, test); the same count and seed gives the same scores in another run;
    holding out the whole pool is a usage error."""
    from vaeuda.phantom import make_cohort
    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_source=2, n_target=3, n_train=2, seed=3, size=32)      # a CT pool of two
    base = ("oracle_convergence.py", "--model", str(tiny_source_model), "--cohort", str(cohort), "--validation", "1",
            "--threads", "1")
    out = tmp_path / "oracle.json"
    proc = _run(*base, "--iterations", "1", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["iterations"], r["split"]) for r in runs] == [(1, "validation"), (1, "test"), (2, "validation"), (2, "test")]
    assert all(set(r["dice"]) == {"LV-M", "LA-B", "LV-B", "A-A", "Mean"} for r in runs)
    again = tmp_path / "again.json"
    assert _run(*base, "--iterations", "2", "--splits", "test", "--out", str(again)).returncode == 0
    assert [(r["split"], r["dice"]) for r in json.loads(again.read_text())["runs"]] == [("test", runs[3]["dice"])]
    proc = _run(*base[:-4], "--validation", "2", "--iterations", "1")
    assert proc.returncode == 2 and "--validation must be between 1 and 1 (the pool has 2 scans)" in proc.stderr


def test_gpu_session_runs_every_step_on_the_cpu(tmp_path):
    """benchmarks/gpu_session.sh --smoke: the prepared GPU session's steps on the CPU at toy sizes,
    so that the script has not rotted when a session is next lent a GPU for a few minutes."""
    out = tmp_path / "session"
    env = dict(os.environ, PYTHON=sys.executable, MPLBACKEND="Agg", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out), "--smoke"], capture_output=True,
                          text=True, timeout=960, env=env)   # past the script's own 900 s deadline
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # at most 8 files: what the GPU tool brings back from a session
    assert sorted(p.name for p in out.iterdir()) == ["bench_gpu.json", "bf16.json", "demos.json", "demos.md",
                                                    "env.txt", "fig2.png", "logs.tar.gz", "paper_cli.log"]
    assert not list(tmp_path.glob("gpu_session.*"))                 # its scratch folder is gone
    demos = json.loads((out / "demos.json").read_text())
    assert list(demos) == ["demo_s0"]
    report = demos["demo_s0"]
    assert report["quick"] is True and report["seed"] == 0
    assert sorted(report["mean_dice"]) == ["Oracle", "Proposed-1 (adapted)", "Unadapted"]
    assert all(len(d) == 64 for d in report["weights_sha256"].values())
    assert "# demo_s0" in (out / "demos.md").read_text()
    cli = (out / "paper_cli.log").read_text()
    assert "on the input grid: True" in cli and cli.rstrip().endswith("paper_cli rc=0")
    bf16 = json.loads((out / "bf16.json").read_text())
    assert bf16["domain"] == "target" and 0.0 <= bf16["voxels_differing"] <= 1.0
    assert json.loads((out / "bench_gpu.json").read_text())["settings"]["preset"] == "tiny"
    assert re.search(r"^python \S+ torch \S+ cuda", (out / "env.txt").read_text(), re.M)


def test_gpu_session_keeps_its_deadline_and_collects_what_it_has(tmp_path):
    """Past GPU_SESSION_SECONDS every step is cut short (its limit is what is left of the deadline),
    and what there is is still collected; an earlier run's files do not survive."""
    out = tmp_path / "session"
    out.mkdir()
    (out / "bf16.json").write_text("{}")                              # left by an earlier run
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path), GPU_SESSION_SECONDS="16")
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out), "--smoke"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "these steps failed or ran out of time: bench_gpu demo_s0 paper_cli bf16_accuracy" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["demos.json", "demos.md", "env.txt", "logs.tar.gz",
                                                    "paper_cli.log"]
    assert set(json.loads((out / "demos.json").read_text()).values()) <= {None}   # no demo got to its report
    assert not list(tmp_path.glob("gpu_session.*"))


def test_gpu_session_exits_non_zero_naming_the_steps_that_failed(tmp_path):
    """Every step runs even when the ones before it fail, and the script fails naming them: here an
    interpreter that runs only `-c` snippets (the environment probes), so every script step fails."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$1" in -c) exec "{sys.executable}" "$@";; esac\nexit 7\n')
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(tmp_path / "session"), "--smoke"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("these steps failed or ran out of time: bench_gpu demo_s0 paper_cli bf16_accuracy"
            in proc.stderr), proc.stderr
    assert "no cohort" in (tmp_path / "session" / "paper_cli.log").read_text()


class _PointwiseNet:
    """A stand-in network for ``selection_proxies``: the latent is the image itself, decoding to the
    target domain adds ``target_offset``, and Seg labels each pixel by its centre channel's value
    (class k where k <= 10 x < k + 1, as confident logits, or all-zero logits when ``uniform``)."""

    def __init__(self, n_classes: int = 5, target_offset: float = 0.0, uniform: bool = False):
        import types
        self.cfg = types.SimpleNamespace(n_classes=n_classes)
        self.target_offset, self.uniform = target_offset, uniform

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):       # train.target_proxy restores the mode it found
        return self

    def posterior(self, x, domain):
        import torch
        return x, torch.zeros_like(x)

    def decode(self, z, domain):
        return z + self.target_offset if domain == "target" else z

    def seg(self, z):
        import torch
        labels = (10 * z[:, 1]).floor().long().clamp(0, self.cfg.n_classes - 1)
        logits = 100.0 * torch.nn.functional.one_hot(labels, self.cfg.n_classes).permute(0, 3, 1, 2).float()
        return torch.zeros_like(logits) if self.uniform else logits

    def segment_logits(self, x, domain):
        return self.seg(self.posterior(x, domain)[0])


def test_selection_proxies_on_a_hand_built_network():
    import torch
    proxies = _bench_module("adaptation_curves").selection_proxies
    # 2 slices of 3 x 8 x 8: the left half class 0, the right half class 1 (x = 0.15)
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :, 4:] = 0.15
    source_fractions = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    out = proxies(_PointwiseNet(target_offset=0.25), x, source_fractions, chunk=1)
    # x_TT = x + 0.25; x_TS = x, re-encoded by E_S and rendered as CT: x + 0.25 again
    assert out["rec_l1"] == pytest.approx(0.25) and out["cycle_l1"] == pytest.approx(0.25)
    # confident logits: no entropy; x_TS = x and a pointwise Seg: both agreements are perfect
    assert out["entropy"] == pytest.approx(0.0, abs=1e-5) and out["fg_entropy"] == pytest.approx(0.0, abs=1e-5)
    assert out["semantic_cycle"] == 0.0 and out["shift_disagreement"] == 0.0
    # predicted fractions 0.5, 0.5, 0, 0, 0 against the source's: |0.5-0.3| + 0.1 + 0.1 + 0.1
    assert out["class_fraction_l1"] == pytest.approx(0.5)
    # all-zero logits: the uniform distribution, one log(n_classes) of entropy; everything class 0
    flat = proxies(_PointwiseNet(uniform=True), x, source_fractions)
    assert flat["entropy"] == pytest.approx(1.0, abs=1e-5) and flat["rec_l1"] == 0.0
    assert flat["class_fraction_l1"] == pytest.approx(0.6) and flat["semantic_cycle"] == 1.0


def test_proxy_study_scores_a_curve_by_hand():
    study = _bench_module("proxy_study")
    curve = [{"iteration": 0, "val": 10, "test": 11, "proxies": {"a": 9.0, "b": 0.0}},
             {"iteration": 25, "val": 20, "test": 21, "proxies": {"a": 3.0, "b": 1.0}},
             {"iteration": 50, "val": 40, "test": 41, "proxies": {"a": 1.0, "b": 3.0}},
             {"iteration": 75, "val": 30, "test": 31, "proxies": {"a": 2.0, "b": 2.0}},
             {"iteration": 100, "val": 50, "test": 51, "proxies": {"a": 0.0, "b": 4.0}}]
    scores = study.score_curve(curve, horizon=75)       # iterations 25, 50, 75; iteration 0 is no choice
    # a orders 25 < 75 < 50 as val does: rank correlation 1, picks 50, no regret
    assert scores["a"] == {"spearman": 1.0, "picked": 50, "val": 40, "test": 41, "regret": 0.0}
    # b is lowest at 25 (val 20): regret 40 - 20; -b ranks 3, 1, 2 against val's 1, 3, 2:
    # rho = 1 - 6 (4 + 4 + 0) / (3 (9 - 1)) = -1
    assert scores["b"] == {"spearman": -1.0, "picked": 25, "val": 20, "test": 21, "regret": 20.0}
    assert scores["last"]["picked"] == 75 and scores["last"]["regret"] == 10.0
    assert scores["best val"]["picked"] == 50
    with pytest.raises(ValueError, match="only 2 evaluations"):
        study.score_curve(curve, horizon=50)


def test_adaptation_curves_records_proxies_on_the_slices_it_adapts_on(tiny_cohort, tiny_source_model, tmp_path):
    out, model = tmp_path / "curves.json", tmp_path / "adapted.safetensors"
    proc = _run("adaptation_curves.py", "--model", str(tiny_source_model), "--cohort", str(tiny_cohort),
                "--target", "ct_1001", "--val", "ct_1002", "--iterations", "4", "--every", "2", "--proxies",
                "--slices", "2:5", "--out", str(out), "--model-out", str(model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = json.loads(out.read_text())["curve"]
    names = {"cycle_l1", "rec_l1", "entropy", "fg_entropy", "semantic_cycle", "shift_disagreement",
             "class_fraction_l1"}
    assert set(curve[0]["proxies"]) == names                          # the source model: no engine history yet
    assert all(set(row["proxies"]) == names | {"engine_proxy"} for row in curve[1:])
    from vaeuda.modelfile import load_model
    meta = load_model(model)[1]
    assert meta["provenance"]["slices"] == [2, 5]
    assert [row["proxies"]["engine_proxy"] for row in curve[1:]] == [h["proxy"] for h in meta["history"]]
    # 3 slices (fewer than train.PROXY_MAX_SLICES): cycle_l1 reads what the engine's proxy reads, on the
    # network the file keeps; the whole scan, or the live network, would give other numbers
    assert all(row["proxies"]["cycle_l1"] == pytest.approx(row["proxies"]["engine_proxy"], abs=6e-6)
               for row in curve[1:])


def test_scripts_refuse_bad_arguments_at_start_up(tiny_cohort, tiny_source_model, tmp_path):
    """Counts below their minimum are usage errors (status 2), outputs that cannot be written and a
    test scan to adapt on are refused before any work (status 1), and the published pages are never a
    smoke run's default output: each one sentence, no traceback, nothing written."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    model, cohort = str(tiny_source_model), str(tiny_cohort)
    usage, refused = 2, 1                        # argparse's usage error; the script's own one sentence
    cases = [
        (("adaptation_curves.py", "--model", model, "--cohort", cohort, "--target", "ct_1001", "--every", "0"),
         usage, "argument --every: must be a whole number of at least 1, not 0"),
        (("paired_alignment.py", "--model", model, "--cohort", cohort, "--lr", "-1"), usage,
         "argument --lr: must be above 0"),
        (("one_scan_draws.py", "--model", model, "--cohort", cohort, "--threads", "x"), usage,
         "argument --threads: must be a whole number, not 'x'"),
        (("bench_speed.py", "--smoke"), usage, "--smoke measures tiny sizes, not the published page's: give --out"),
        (("bench_speed.py", "--out", str(tmp_path / "r.json")), usage, "--out is the Markdown report"),
        (("bench_gpu.py", "--device", "cpu", "--smoke"), usage, "--smoke and --device cpu runs are not the GPU record"),
        (("oracle_convergence.py", "--model", model, "--cohort", cohort, "--iterations", "8", "--out", str(folder)),
         refused, f"error: {folder}: is a folder; give the output a file name."),
        (("adaptation_curves.py", "--model", model, "--cohort", cohort, "--target", "ct_1002"), refused,
         "error: ct_1002: is one of the cohort's CT test scans; adapt on one of its CT training scans."),
        (("adaptation_curves.py", "--model", model, "--cohort", cohort, "--target", "ct_1001", "--val"), usage,
         "--val needs at least one scan prefix"),
        (("kernel_paths.py", "--fingerprints", "--keep", str(folder)), usage,
         "--keep keeps each variant's demo folder, and --fingerprints runs no demo"),
    ]
    for args, status, message in cases:
        proc = _run(*args)
        assert proc.returncode == status and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"] and not any(folder.iterdir())


def test_the_scripts_say_the_oses_refusals_in_one_sentence_as_the_command_line_does(capsys):
    """run_main follows the command line's rule (errors.os_error_sentence): a path the OS refuses is one
    sentence and status 1; any other OSError is a bug and keeps its traceback."""
    import errno
    run_main = _bench_module("common").run_main

    def refused():
        raise PermissionError(errno.EACCES, "Permission denied", "/data/ct_1001_image.nii.gz")
    assert run_main(refused) == 1
    assert capsys.readouterr().err == "error: /data/ct_1001_image.nii.gz: Permission denied.\n"

    def broken():
        raise OSError(errno.EBADF, "Bad file descriptor", "/dev/fd/99")
    with pytest.raises(OSError, match="Bad file descriptor"):
        run_main(broken)

    def piped():       # `script | head`: one sentence, no traceback
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    assert run_main(piped) == 1
    assert capsys.readouterr().err == "error: the output pipe was closed.\n"


def test_peak_memory_reads_in_bytes():
    """``ru_maxrss`` is KiB on Linux and bytes on macOS: the peak of this process, which has just held a
    64 MiB buffer it wrote to, reads at least that many bytes and not a thousand times more."""
    import resource

    import numpy as np
    common = _bench_module("common")
    buffer = np.ones(64 * 2 ** 20, np.uint8)       # (written: the pages are resident)
    peak = common.max_rss_bytes(resource.RUSAGE_SELF)
    assert int(buffer.sum()) == 64 * 2 ** 20
    assert 64 * 2 ** 20 <= peak < 1024 * 64 * 2 ** 20


def test_source_variant_builds_the_networks_its_net_fields_name(tiny_cohort, tmp_path):
    """benchmarks/source_variant.py --net: the model file holds the replaced configuration and the
    networks built from it (one more residual block in each domain encoder and decoder), so adapt
    rebuilds them; a field the configuration lacks, or a value no network has, is refused before
    any training, and nothing is written."""
    from vaeuda.modelfile import load_model
    from vaeuda.train import adapt
    out = tmp_path / "res.safetensors"
    proc = _run("source_variant.py", "--cohort", str(tiny_cohort), "--out", str(out), "--preset", "tiny",
                "--iterations", "1", "--net", "n_res_domain=2", "--net", "n_res_shared=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.endswith(f"Wrote {out}: the tiny preset's networks with {{'n_res_domain': 2, 'n_res_shared': 0}}, "
                                "PyTorch's initialisation.\n")
    net, meta = load_model(out)
    assert (net.cfg.n_res_domain, net.cfg.n_res_shared, net.cfg.base) == (2, 0, 4)
    assert meta["preset"] == "tiny"
    blocks = {name.split(".")[0]: sum(1 for m in module.modules() if type(m).__name__ == "ResBlock")
              for name, module in net.named_children()}
    assert {k: blocks[k] for k in ("enc_s", "enc_t", "enc_z", "dec_z", "dec_s", "dec_t")} == {
        "enc_s": 2, "enc_t": 2, "enc_z": 2, "dec_z": 1, "dec_s": 2, "dec_t": 2}     # (tiny: D_Z 1; branches 1 each)
    adapted = tmp_path / "adapted.safetensors"
    adapt(out, [tiny_cohort / "ct_1001_image.nii.gz"], adapted, iterations=1, device="cpu")
    assert load_model(adapted)[0].cfg == net.cfg
    for net_field, message in (("n_res_foo=2", "error: --net n_res_foo: the network configuration has no such field; "
                                               "it has input_size, "),
                               ("n_res_domain=-1", "error: model configuration: n_res_domain must be a whole number in "
                                                   "[0, 32], not -1.\n")):
        refused = tmp_path / "refused.safetensors"
        proc = _run("source_variant.py", "--cohort", str(tiny_cohort), "--out", str(refused), "--preset", "tiny",
                    "--iterations", "1", "--net", net_field)
        assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr
        assert not refused.exists()
    proc = _run("source_variant.py", "--cohort", str(tiny_cohort), "--out", str(refused), "--net", "n_res_domain")
    assert proc.returncode == 2 and "--net n_res_domain: expected NAME=VALUE with a JSON value, e.g. n_res_domain=2" in proc.stderr


def test_reference_init_draws_each_convolution_as_unit_does():
    """benchmarks/source_variant.py --reference-init: N(0, 0.02) in the discriminator, Kaiming-normal (fan in) elsewhere, the
    biases 0, the norm layers untouched; drawn from torch's generator, so a seed repeats it."""
    import math

    import torch
    from torch import nn
    from vaeuda.nets import VAEUDANet, get_preset
    refinit = _bench_module("source_variant")
    torch.manual_seed(0)
    net = refinit.ReferenceInitNet(get_preset("paper"))     # (wide layers: the sample stds are close)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert {name.split(".")[0] for name in convs} == {"enc_s", "enc_t", "enc_z", "dec_z", "dec_s", "dec_t", "seg",
                                                      "disc"}
    for name, conv in convs.items():
        fan_in = conv.weight[0].numel()
        expected = 0.02 if name.startswith("disc.") else math.sqrt(2.0 / fan_in)
        if conv.weight.numel() >= 10_000:
            assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=0.1), name
        assert conv.bias is None or not conv.bias.any(), name
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine]
    assert norms and all(bool((m.weight == 1).all()) and not m.bias.any() for m in norms)
    torch.manual_seed(0)
    again = refinit.ReferenceInitNet(get_preset("paper"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(0)
    default = VAEUDANet(get_preset("paper"))
    assert not torch.equal(next(default.disc.parameters()), next(net.disc.parameters()))   # (re-drawn)
