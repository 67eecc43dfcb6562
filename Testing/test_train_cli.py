"""The method end to end through the command line at tiny size, and the training guarantees."""
import dataclasses
import errno
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

import vaeuda
from vaeuda import cli as cli_mod
from vaeuda import train as train_mod
from vaeuda.cli import main
from vaeuda.errors import VaeudaError
from vaeuda.modelfile import _digest, load_model, read_tensors
from vaeuda.nets import get_preset
from vaeuda.progress import null_reporter
from vaeuda.train import checkpoint_path, train_source


def test_cli_end_to_end(tiny_cohort, tmp_path, capsys):
    c = tiny_cohort
    src, ada, ora = tmp_path / "src.safetensors", tmp_path / "ada.safetensors", tmp_path / "ora.safetensors"
    assert main(["train-source", "--preset", "tiny", "--iterations", "3", "--out", str(src), "--progress", "none",
                 "--device", "cpu", str(c / "mr_1001_image.nii.gz")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "reading 1 labelled source volume(s)" and err[-1] == f"Wrote the source model to {src}."
    assert main(["adapt", "--model", str(src), "--out", str(ada), "--iterations", "3", "--progress", "json",
                 str(c / "ct_1001_image.nii.gz")]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines[-2:] == [{"event": "log", "message": f"Wrote the adapted model to {ada}."},
                          {"event": "done", "outputs": [str(ada)]}]
    assert any(l["event"] == "progress" and l["step"] == 3 for l in lines)
    assert main(["finetune", "--model", str(src), "--out", str(ora), "--iterations", "2", "--progress", "none",
                 str(c / "ct_1001_image.nii.gz")]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"Wrote the fine-tuned model to {ora}."
    _, meta = load_model(ada)
    assert meta["stage"] == "adapted" and meta["has_target_encoder"] is True
    assert meta["provenance"]["target_data"] == [str((c / "ct_1001_image.nii.gz").resolve())]
    assert load_model(src)[1]["has_target_encoder"] is False
    assert load_model(ora)[1]["stage"] == "finetuned"

    out = tmp_path / "seg"
    assert main(["segment", "--model", str(ada), "--out", str(out), "--progress", "none",
                 str(c / "ct_1002_image.nii.gz")]) == 0
    seg_path = out / "ct_1002_image_seg.nii.gz"
    seg, image = sitk.ReadImage(str(seg_path)), sitk.ReadImage(str(c / "ct_1002_image.nii.gz"))
    assert seg.GetSize() == image.GetSize() and seg.GetSpacing() == image.GetSpacing()
    assert seg.GetOrigin() == image.GetOrigin() and seg.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 205, 420, 500, 820}
    assert list(out.iterdir()) == [seg_path]          # nothing else (no temporary files) left
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"Wrote 1 segmentation(s) to {out}."
    assert main(["segment", "--model", str(ada), "--out", str(out), "--progress", "none",
                 str(c / "ct_1002_image.nii.gz")]) == 0                # again: the one it replaced is named
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"Wrote 1 segmentation(s) to {out}, replacing 1 earlier one(s): ct_1002_image_seg.nii.gz.")
    assert main(["evaluate", "--pred", str(out), "--ref", str(c), "--progress", "none"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"Wrote the scores to {out / 'evaluation.json'}."
    assert main(["evaluate", "--pred", str(c), "--ref", str(c) + "/", "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vaeuda: error: {c}: is given as both --pred and --ref; keep the segmentations in a folder of their own "
        f"(segment --out) and give the references' folder as --ref.") and not (c / "evaluation.json").exists()
    link = tmp_path / "cohort_link"                                       # the same folder under another name
    link.symlink_to(c, target_is_directory=True)
    assert main(["evaluate", "--pred", str(link), "--ref", str(c), "--progress", "none"]) == 2
    assert "is given as both --pred and --ref" in capsys.readouterr().err and not (c / "evaluation.json").exists()
    result = json.loads((out / "evaluation.json").read_text())
    assert result["n_volumes"] == 1


def test_segment_writes_the_conventions_values_for_every_class(tiny_cohort, tiny_source_model, tmp_path):
    """A tiny model calls every voxel background, so `<= {0, 205, 420, 500, 820}` above holds for a
    segment that wrote class indices as well. Here the head is rewritten (large seeded weights, a
    background bias that never wins) so that the structures appear: each class index k comes back
    as the MM-WHS value of structure k, voxel for voxel against the classes the network gives."""
    from vaeuda import predict
    from vaeuda.labels import MMWHS
    from vaeuda.modelfile import save_tensors
    tensors, meta, _ = read_tensors(tiny_source_model)
    weight = tensors["net.seg.head.weight"]
    weight[:] = 5.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    tensors["net.seg.head.bias"][:] = 0.0
    tensors["net.seg.head.bias"][0] = -10.0
    forced = tmp_path / "forced.safetensors"
    save_tensors(forced, tensors, meta)
    image = tiny_cohort / "ct_1002_image.nii.gz"
    assert main(["segment", "--model", str(forced), "--out", str(tmp_path / "seg"), "--device", "cpu",
                 "--progress", "none", str(image)]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg" / "ct_1002_image_seg.nii.gz")))
    net, model_meta = load_model(forced)
    classes = sitk.GetArrayFromImage(predict.segment_image(net, model_meta, sitk.ReadImage(str(image)),
                                                           torch.device("cpu")))
    assert len(set(np.unique(classes)) - {0}) >= 2                    # several structures, not a vacuous check
    values = (0, 205, 420, 500, 820)                                  # MM-WHS: background, LV-M, LA-B, LV-B, A-A
    assert MMWHS.from_index == values
    np.testing.assert_array_equal(written, np.asarray(values)[classes])


def test_bad_input_exits_2_with_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vaeuda", "segment", "--model", str(tmp_path / "m.safetensors"),
                           "--out", str(tmp_path / "o"), str(tmp_path / "missing.nii.gz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"vaeuda: error: {tmp_path / 'missing.nii.gz'}: file not found."]
    assert not (tmp_path / "o").exists()


def test_outputs_named_against_their_kind_are_refused_or_noted(tiny_cohort, tiny_source_model, tmp_path, capsys):
    """--out of segment or convert named like a file would become a folder of that name: refused.
    A model not named .safetensors is written, with a note (Slicer's dialogs would not list it)."""
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    for out in (tmp_path / "ct_1001_seg.nii.gz", tmp_path / "results.json"):
        assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none", ct]) == 2
        assert capsys.readouterr().err.strip() == (f"vaeuda: error: {out}: is named like a file, but --out takes the "
                                                   f"folder the outputs go in; give a folder.") and not out.exists()
    model = tmp_path / "m.pt"
    assert main(["train-source", "--preset", "tiny", "--iterations", "1", "--device", "cpu", "--progress", "none",
                 "--out", str(model), str(tiny_cohort / "mr_1001_image.nii.gz")]) == 0
    assert (f"note: {model} is written as a safetensors model file; the Slicer module's file dialogs list only "
            f"names ending in .safetensors") in capsys.readouterr().err.splitlines()
    assert load_model(model)[1]["stage"] == "source"


def test_a_refused_model_output_says_one_thing(tiny_cohort, tmp_path, capsys):
    """The .safetensors note came before the refusal of a folder given as --out; a folder where the
    checkpoint goes was refused with "give the output a file name", which the user had done."""
    mr = str(tiny_cohort / "mr_1001_image.nii.gz")
    run = ["train-source", "--preset", "tiny", "--iterations", "1", "--device", "cpu", "--progress", "none", mr]
    assert main(run + ["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vaeuda: error: {tmp_path}: is a folder; give the output a file name."]
    (tmp_path / "m.safetensors.ckpt").mkdir()
    assert main(run + ["--out", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vaeuda: error: {tmp_path / 'm.safetensors.ckpt'}: is a folder where this run keeps its checkpoint (the "
        f"model file's name plus '.ckpt'); move it away or choose another output."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors.ckpt"]


def test_usage_errors_are_json_events_too_and_an_empty_value_is_one(capsys):
    """The module docstring promises a json reader an error line; argparse's own errors (a bad number)
    gave none. An empty value ("") was taken as the current folder ("segment X --out ''" wrote there)."""
    for argv, message in (
            (["adapt", "--model", "m", "--out", "o", "--iterations", "1.5", "--progress", "json", "t"],
             "argument --iterations: invalid int value: '1.5'"),
            (["segment", "x", "--model", "m", "--out", "", "--progress=json"], "--out: an empty value was given"),
            (["synth", "", "--progress", "json"], "OUT_DIR: an empty value was given")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and [json.loads(line) for line in out.splitlines()] == [
            {"event": "error", "message": message}]          # the bare sentence, as every other error event
        assert err.strip().splitlines()[-1] == f"vaeuda {argv[0]}: error: {message}"
    with pytest.raises(SystemExit):
        main(["evaluate", "--pred", "p", "--ref", "r", "--json", ""])      # without json progress: stderr alone
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1] == "vaeuda evaluate: error: --json: an empty value was given"
    with pytest.raises(SystemExit):              # not a path: "" is the default convention there, as before
        main(["train-source", "--label-convention", "", "--progress", "none"])
    assert "required: IMAGE_OR_DIR" in capsys.readouterr().err      # (the error is the missing volumes)


@pytest.mark.parametrize("argv, name", [
    (["adapt", "", "--model", "m", "--out", "o"], "TARGET"),
    (["adapt", "t", "--model", "", "--out", "o"], "--model"),
    (["adapt", "t", "--model", "m", "--out", "o", "--source-data", "s", ""], "--source-data"),
    (["train-source", "x", "", "--out", "o"], "IMAGE_OR_DIR"),
    (["finetune", "x", "--model", "m", "--out", "o", "--labels", ""], "--labels"),
    (["segment", "x", "", "--model", "m", "--out", "o"], "INPUT"),
    (["evaluate", "--pred", "", "--ref", "r"], "--pred"),
    (["evaluate", "--pred", "p", "--ref", ""], "--ref"),
    (["info", ""], "MODEL"),
    (["demo", "--out", ""], "--out"),
    (["experiment", "table1", "--data", "", "--out", "o"], "--data"),
])
def test_an_empty_path_is_refused_for_every_argument_that_names_a_file_or_folder(capsys, argv, name):
    """Path("") is the current folder: an empty value (an unset variable in a script) would read or
    write there; every command's path arguments refuse it, naming the argument."""
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--progress", "none"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {name}: an empty value was given")


def test_usage_errors_follow_the_progress_mode_argparse_reads(capsys):
    """--prog json is argparse's --progress json, and the last --progress given is the one in force."""
    for argv, events in ((["segment", "x", "--model", "m", "--out", "o", "--prog", "json", "--batch-size", "b"], 1),
                         (["segment", "x", "--model", "m", "--out", "o", "--progress=json", "--progress", "none",
                           "--batch-size", "b"], 0)):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert [json.loads(line)["event"] for line in out.splitlines()] == ["error"] * events, argv


def test_repeated_list_options_add_up_and_a_short_slices_option_is_explained(tmp_path, capsys):
    """--labels A --labels B gave only B (and then '2 images but 1 label files'); --sl -1:4 got argparse's
    'expected one argument' where --slices -1:4 gets the range's own sentence."""
    from vaeuda.cli import build_parser, _joined_slice_ranges
    args = build_parser().parse_args(["train-source", "a", "b", "--out", "m", "--labels", "la", "--labels", "lb"])
    assert args.labels == ["la", "lb"]
    args = build_parser().parse_args(["adapt", "t", "--model", "m", "--out", "o", "--source-data", "s1",
                                      "--source-data", "s2", "s3"])
    assert args.source_data == ["s1", "s2", "s3"]
    assert _joined_slice_ranges(["adapt", "--sl", "-1:4"]) == ["adapt", "--sl=-1:4"]
    assert _joined_slice_ranges(["adapt", "--s", "-1:4"]) == ["adapt", "--s", "-1:4"]     # ambiguous: left alone
    assert _joined_slice_ranges(["adapt", "--slices", "--no-kl"]) == ["adapt", "--slices", "--no-kl"]   # no range
    target = tmp_path / "ct_image.nii.gz"
    target.write_bytes(b"")
    assert main(["adapt", str(target), "--model", "m", "--out", str(tmp_path / "o.safetensors"), "--sl", "-1:4",
                 "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vaeuda: error: --slices '-1:4' must have 0 <= A < B."


def test_iterations_beyond_the_bound_are_refused_before_any_work(tmp_path, capsys):
    from vaeuda.errors import MAX_ITERATIONS
    target = tmp_path / "ct_image.nii.gz"
    target.write_bytes(b"")
    assert main(["adapt", str(target), "--model", "m", "--out", str(tmp_path / "o.safetensors"), "--iterations",
                 str(MAX_ITERATIONS + 1), "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == (f"vaeuda: error: --iterations must be at most {MAX_ITERATIONS:,}, "
                                               f"not {MAX_ITERATIONS + 1:,}.")


def test_evaluate_json_named_as_a_model_or_volume_is_refused(tmp_path, capsys):
    """--json model.safetensors replaced a model with the scores."""
    for name in ("source.safetensors", "ct_image.nii.gz"):
        target = tmp_path / name
        target.write_bytes(b"precious")
        assert main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path / "r"), "--json", str(target),
                     "--progress", "none"]) == 2
        assert "--json writes the scores as JSON, but this is named as a" in capsys.readouterr().err
        assert target.read_bytes() == b"precious"


def test_a_closed_progress_pipe_stops_synth_without_writing_the_cohort(tmp_path):
    """synth's own OSError handling must not take the closed pipe for a failed write of the cohort."""
    proc = subprocess.Popen([sys.executable, "-m", "vaeuda", "synth", str(tmp_path / "c"), "--n-source", "3",
                             "--n-target", "3", "--n-train", "1", "--size", "32", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "stage"
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=300) == 141
    finally:
        proc.kill()
    assert stderr.strip().splitlines() == ["vaeuda: stopped: the output pipe was closed"]
    assert not (tmp_path / "c").exists()


def test_a_closed_output_pipe_stops_training_without_a_traceback(tiny_cohort, tmp_path):
    """`... --progress json | head -1`: the reader goes away after one line; the engine stops as on
    SIGPIPE (141), says so in one sentence, writes no model, and prints no traceback."""
    out = tmp_path / "m.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "vaeuda", "train-source", "--preset", "tiny", "--iterations",
                             "1000", "--device", "cpu", "--progress", "json", "--out", str(out),
                             str(tiny_cohort / "mr_1001_image.nii.gz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "log"
        proc.stdout.close()                               # as `head -1` does
        stderr = proc.stderr.read()
        assert proc.wait(timeout=300) == 141
    finally:
        proc.kill()                                       # a failed check leaves no 1000-iteration run behind
    assert stderr.strip().splitlines() == [
        "vaeuda: stopped: the output pipe was closed; no checkpoint had been written yet"] and not out.exists()


@pytest.mark.parametrize("progress", ["json", "none"])
def test_a_full_standard_output_is_one_sentence(progress):
    """`vaeuda numerics > /dev/full`: the result cannot be written, nor (in JSON mode) the error
    event after it; stderr says so in one sentence naming the standard output, no traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "vaeuda", "numerics", "--progress", progress],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["vaeuda: error: the standard output: No space left on device."]


@pytest.mark.parametrize("windows", [True, False])
def test_a_gone_reader_on_windows_stops_as_a_broken_pipe(monkeypatch, capsys, windows):
    """Windows reports a write to a pipe whose reader has gone as EINVAL: `vaeuda numerics | more`
    ended in a traceback there, where a broken pipe stops quietly (141). EINVAL elsewhere is no pipe."""
    from vaeuda import fileio

    class GoneReader:
        def write(self, text):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        def flush(self):
            pass
    monkeypatch.setattr(fileio, "WINDOWS", windows)
    monkeypatch.setattr(sys, "stdout", GoneReader())
    if windows:
        assert main(["numerics", "--progress", "none"]) == 141
        assert capsys.readouterr().err.strip() == "vaeuda: stopped: the output pipe was closed"
    else:                                   # an errno no check foresaw: seen whole, naming the stream
        with pytest.raises(OSError, match="the standard output") as raised:
            main(["numerics", "--progress", "none"])
        assert not isinstance(raised.value, BrokenPipeError)


def test_a_done_event_that_cannot_be_written_fails_the_command(tiny_source_model, monkeypatch, capsys):
    """The command's work is done but its JSON reader cannot be told: exit 2 with the sentence on
    stderr, not 0 (Slicer would wait for a `done` line that never comes)."""
    import vaeuda.progress as progress_mod
    real_write = progress_mod.write_stdout

    def refuse_done(text):
        if '"done"' in text or '"error"' in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), progress_mod.STDOUT_NAME)
        real_write(text)

    monkeypatch.setattr(progress_mod, "write_stdout", refuse_done)
    silenced = []          # (stdout pointed at the null device, or Python's exit flush fails again on it)
    monkeypatch.setattr(cli_mod, "_silence_stdout", lambda: silenced.append("stdout"))
    assert main(["info", str(tiny_source_model), "--progress", "json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["event"] == "info"       # the result went out
    assert captured.err.strip().splitlines()[-1] == (
        f"vaeuda: error: the standard output: {os.strerror(errno.ENOSPC)}.")
    assert silenced == ["stdout"]


def test_an_interrupted_event_that_cannot_be_written_still_ends_as_interrupted(tiny_source_model, monkeypatch,
                                                                               capsys):
    """Ctrl-C while the standard output refuses writes (a full disk): status 130 and the stderr line,
    not a traceback from writing the "interrupted" event."""
    import vaeuda.progress as progress_mod

    def refuse(text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), progress_mod.STDOUT_NAME)

    def interrupted(args, reporter):
        raise KeyboardInterrupt
    monkeypatch.setattr(progress_mod, "write_stdout", refuse)
    monkeypatch.setattr(cli_mod, "_run", interrupted)
    silenced = []
    monkeypatch.setattr(cli_mod, "_silence_stdout", lambda: silenced.append("stdout"))
    assert main(["info", str(tiny_source_model), "--progress", "json"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vaeuda: interrupted" and silenced == ["stdout"]


@pytest.mark.parametrize("stage, changed", [("train-source", "image"), ("adapt", "image"), ("finetune", "image"),
                                            ("adapt", "model"), ("finetune", "model")])
def test_an_input_that_changes_while_it_is_read_is_refused(tiny_cohort, tiny_source_model, tmp_path, monkeypatch,
                                                          stage, changed):
    """The model records its inputs' digests: taken after the reading, they named a file replaced
    meanwhile (a cohort made again, a copy still arriving, a source model trained again), not the
    data it learnt from. They are taken before, and a file that changed while it was read is
    refused; nothing is written."""
    import shutil
    scans = tmp_path / "scans"
    shutil.copytree(tiny_cohort, scans)
    image = scans / ("mr_1001_image.nii.gz" if stage == "train-source" else "ct_1001_image.nii.gz")
    model = shutil.copyfile(tiny_source_model, tmp_path / "source.safetensors")
    real_load = train_mod.load_slices

    def load_then_replace(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        if Path(args[0][0]) == image:                  # another program writes a file just read
            if changed == "image":
                shutil.copyfile(scans / "ct_1002_image.nii.gz", image)
            else:
                model.write_bytes(model.read_bytes() + b" ")
        return loaded
    monkeypatch.setattr(train_mod, "load_slices", load_then_replace)
    out = tmp_path / "m.safetensors"
    named = image if changed == "image" else model
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(named))}: changed while it was being read; run again "
                                          f"once nothing is writing it\\.$"):
        if stage == "train-source":
            train_source([image], [scans / "mr_1001_label.nii.gz"], out, preset="tiny", iterations=1, device="cpu")
        elif stage == "adapt":
            train_mod.adapt(model, [image], out, iterations=1, device="cpu")
        else:
            train_mod.finetune(model, [image], [scans / "ct_1001_label.nii.gz"], out, iterations=1, device="cpu")
    assert not out.exists() and not checkpoint_path(out).exists()


def test_segment_with_foreign_model_fails_cleanly(tiny_cohort, tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    code = main(["segment", "--model", str(bogus), "--out", str(tmp_path / "o"), "--progress", "json",
                 str(tiny_cohort / "ct_1002_image.nii.gz")])
    assert code == 2
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["event"] == "error" and "not a VAE-UDA model file" in last["message"]
    assert not (tmp_path / "o").exists()


def _train(cohort, out, iterations=4, **kw):
    return train_source([cohort / "mr_1001_image.nii.gz"], [cohort / "mr_1001_label.nii.gz"], out,
                        preset="tiny", iterations=iterations, seed=7, device="cpu", **kw)


def _interrupt_after_first_checkpoint(monkeypatch, cohort, out, run=None, **kw):
    """Train as ``_train`` does (or call ``run()``), but stop as if interrupted right after the first
    checkpoint is written."""
    real_save = train_mod.save_checkpoint

    def interrupt_after_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(train_mod, "save_checkpoint", interrupt_after_checkpoint)
        run() if run is not None else _train(cohort, out, **kw)


def test_the_end_of_a_run_removes_its_own_checkpoint_only(tiny_cohort, tmp_path, monkeypatch):
    """Two runs with one --out: the one that ended first removed the checkpoint the other had just
    written (its work since the start lost). A run removes the checkpoint it wrote, not another's."""
    out = tmp_path / "m.safetensors"
    ckpt = checkpoint_path(out)
    real_save_model = train_mod.save_model

    def another_run_checkpoints_first(path, *args, **kwargs):
        if Path(path) == out:                          # the final model: meanwhile another run checkpointed
            from vaeuda.modelfile import save_tensors
            tensors, meta, header = read_tensors(ckpt, what="training checkpoint")
            state = json.loads(header["train_state"])
            assert len(state["run"]) == 32             # this run's token
            for _ in range(2):                         # (twice: the file's inode number may come back)
                save_tensors(ckpt, tensors, meta, extra_header={"train_state": json.dumps({**state, "run": "other"})})
        return real_save_model(path, *args, **kwargs)
    monkeypatch.setattr(train_mod, "save_model", another_run_checkpoints_first)
    _train(tiny_cohort, out, iterations=4, overrides={"checkpoint_every": 2})
    assert out.is_file() and train_mod.checkpoint_run(ckpt) == "other"      # the other run's checkpoint stands
    monkeypatch.setattr(train_mod, "save_model", real_save_model)
    ckpt.unlink()
    _train(tiny_cohort, out, iterations=4, overrides={"checkpoint_every": 2})
    assert not ckpt.exists()                           # its own is removed


def test_a_checkpoint_of_an_engine_before_the_run_tokens_is_removed_once_resumed(tiny_cohort, tmp_path,
                                                                                monkeypatch):
    """Its header names no run: resumed to the end without writing another, it stayed beside the
    model, and the next run with that --out was refused for it."""
    from vaeuda.modelfile import save_tensors
    out = tmp_path / "m.safetensors"
    ckpt = checkpoint_path(out)
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4,
                                      overrides={"checkpoint_every": 2})
    tensors, meta, header = read_tensors(ckpt, what="training checkpoint")
    state = json.loads(header["train_state"])
    del state["run"]
    save_tensors(ckpt, tensors, meta, extra_header={"train_state": json.dumps(state)})
    assert train_mod.checkpoint_run(ckpt) is None
    _train(tiny_cohort, out, iterations=3, resume=True, overrides={"checkpoint_every": 2})   # writes none
    assert out.is_file() and not ckpt.exists()


def test_a_missing_damaged_or_foreign_file_has_no_run_token(tiny_source_model, tmp_path):
    """The end of a run reads the token of whatever is at its checkpoint's path (another run may have
    replaced it): a file that is not a checkpoint of ours is "no token", never an error after the work."""
    (tmp_path / "text.ckpt").write_text("not a safetensors file")
    for path in (tmp_path / "missing.ckpt", tmp_path / "text.ckpt", tiny_source_model):   # the last: no train_state
        assert train_mod.checkpoint_run(path) is None, path


def test_a_second_training_run_with_the_same_out_is_refused_while_the_first_lives(tiny_cohort, tmp_path, capsys):
    """Two runs with one --out removed or resumed each other's checkpoints; `adapt --resume` took
    over a running adaptation's. The first holds the model file (its lock file); the second is refused
    before any work, and the lock is gone once the first ends."""
    from vaeuda.fileio import exclusive_model_output
    out = tmp_path / "m.safetensors"
    lock = tmp_path / "m.safetensors.ckpt.lock"
    args = ["train-source", "--preset", "tiny", "--iterations", "2", "--device", "cpu", "--progress", "none",
            "--out", str(out), str(tiny_cohort / "mr_1001_image.nii.gz")]
    with exclusive_model_output(out):                   # a run in progress (here: this test holds it)
        assert lock.is_file()
        assert main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"vaeuda: error: {out}: another running vaeuda is training this model (it holds "
            f"m.safetensors.ckpt.lock); wait for it to end, or choose another --out.")
        assert not out.exists() and lock.is_file()      # the holder's lock stays
    assert not lock.exists()
    lock.write_text("")                                 # what a killed run leaves holds nothing
    assert main(args) == 0 and out.is_file() and not lock.exists()


def test_training_called_from_python_holds_its_model_file_too(tiny_cohort, tiny_source_model, tmp_path):
    """The hold was the command line's alone: train_source, adapt and finetune called from Python (a
    script, the demo) let a second run take the same model file. Each now holds it, and is refused
    while another run does; under the command line's own hold (this thread's) the call goes on."""
    import threading
    from vaeuda.fileio import exclusive_model_output
    out = tmp_path / "m.safetensors"
    lock = tmp_path / "m.safetensors.ckpt.lock"
    ct, ct_label = [tiny_cohort / "ct_1001_image.nii.gz"], [tiny_cohort / "ct_1001_label.nii.gz"]
    held, release = threading.Event(), threading.Event()

    def another_run():
        with exclusive_model_output(out):
            held.set()
            release.wait(60)
    holder = threading.Thread(target=another_run)
    holder.start()
    try:
        assert held.wait(60)
        for run in (lambda: _train(tiny_cohort, out),
                    lambda: train_mod.adapt(tiny_source_model, ct, out, iterations=1, device="cpu"),
                    lambda: train_mod.finetune(tiny_source_model, ct, ct_label, out, iterations=1, device="cpu")):
            with pytest.raises(VaeudaError) as refused:
                run()
            assert str(refused.value) == (f"{out}: another running vaeuda is training this model (it holds "
                                          f"m.safetensors.ckpt.lock); wait for it to end, or choose another --out.")
            assert not out.exists() and lock.is_file()
    finally:
        release.set()
        holder.join()
    assert not lock.exists()
    with exclusive_model_output(out):
        _train(tiny_cohort, out)
        assert out.is_file() and lock.is_file()
    assert not lock.exists()


def test_same_seed_same_numbers(tiny_cohort, tiny_source_model, tmp_path):
    """The same seed gives the same weights; another seed other ones (a run that ignored its seed
    would be deterministic too), in training and in adaptation, which starts from fixed weights."""
    _train(tiny_cohort, tmp_path / "a.safetensors")
    _train(tiny_cohort, tmp_path / "b.safetensors")
    ta, tb = read_tensors(tmp_path / "a.safetensors")[0], read_tensors(tmp_path / "b.safetensors")[0]
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"],
                 tmp_path / "c.safetensors", preset="tiny", iterations=4, seed=8, device="cpu")
    tc = read_tensors(tmp_path / "c.safetensors")[0]
    assert any(not torch.equal(ta[k], tc[k]) for k in ta if k.startswith("net.enc_s."))
    ct = [tiny_cohort / "ct_1001_image.nii.gz"]
    adapted = {}
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        train_mod.adapt(tiny_source_model, ct, tmp_path / f"{name}.safetensors", iterations=2, seed=seed, device="cpu")
        adapted[name] = read_tensors(tmp_path / f"{name}.safetensors")[0]
    target = [k for k in adapted["x"] if k.startswith("net.enc_t.")]
    assert target and all(torch.equal(adapted["x"][k], adapted["y"][k]) for k in adapted["x"])
    assert any(not torch.equal(adapted["x"][k], adapted["z"][k]) for k in target)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_stops_training_and_keeps_last_checkpoint(tiny_cohort, tmp_path, monkeypatch, poison):
    calls = {"n": 0}
    real = train_mod.reconstruction

    def poisoned(x_hat, x):
        calls["n"] += 1
        value = real(x_hat, x)
        return value * poison if calls["n"] > 5 else value     # the source stage calls it once per iteration

    monkeypatch.setattr(train_mod, "reconstruction", poisoned)
    out = tmp_path / "m.safetensors"
    with pytest.raises(VaeudaError, match=r"S_rec became NaN or infinite at iteration 6 .*last good checkpoint is kept at"):
        _train(tiny_cohort, out, iterations=10, overrides={"checkpoint_every": 2})
    assert not out.exists()
    _, _, header = read_tensors(checkpoint_path(out))
    assert json.loads(header["train_state"])["iteration"] == 4


@pytest.mark.parametrize("poisoned_at, iterations, checkpoint_every, when, kept", [
    (4, 10, 2, "by iteration 4 of the source stage", 2),
    # after the last checkpoint none is written (the model file is): refused before the model file, iteration 1 kept
    (2, 2, 1, "by the end of the source stage", 1),
])
def test_weights_that_a_finite_loss_stepped_to_nan_are_never_checkpointed_nor_saved(
        tiny_cohort, tmp_path, monkeypatch, poisoned_at, iterations, checkpoint_every, when, kept):
    """An infinite gradient under a finite loss makes Adam's step NaN; the checkpoint of that iteration
    (and the model file) would hold it, and the loss only shows it an iteration later."""
    calls = {"n": 0}
    real = train_mod.routed_backward

    def infinite_gradient(net, weighted):
        real(net, weighted)
        calls["n"] += 1
        if calls["n"] == poisoned_at:
            next(net.dec_s.parameters()).grad.fill_(float("inf"))
    monkeypatch.setattr(train_mod, "routed_backward", infinite_gradient)
    out = tmp_path / "m.safetensors"
    with pytest.raises(VaeudaError, match=rf"weights of dec_s became NaN or infinite {when}; "
                                          r"the last good checkpoint is kept at"):
        _train(tiny_cohort, out, iterations=iterations, overrides={"checkpoint_every": checkpoint_every})
    assert not out.exists()
    tensors, _, header = read_tensors(checkpoint_path(out))
    assert json.loads(header["train_state"])["iteration"] == kept
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_infinite_weights_of_any_network_discriminator_included_are_refused():
    """+inf is not NaN, and the discriminator (the last of the networks) is checked too; without a
    checkpoint the message says none was written."""
    from vaeuda.nets import VAEUDANet
    net = VAEUDANet(get_preset("tiny"))
    train_mod._refuse_non_finite_weights(net, "at the test", None)     # finite: nothing to say
    with torch.no_grad():
        next(net.disc.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(VaeudaError, match=r"^training diverged: weights of disc became NaN or infinite at the test; "
                                          r"no checkpoint had been written yet\.$"):
        train_mod._refuse_non_finite_weights(net, "at the test", None)


def test_weight_average_is_the_ema_of_the_iterates(tiny_cohort, tmp_path):
    """With ema_decay d the saved weights are d * w1 + (1 - d) * w2 after two steps (w_i: live weights);
    BatchNorm's batch counters are counts, not weights: the live network's."""
    w1, w2, avg = (tmp_path / f"{n}.safetensors" for n in ("w1", "w2", "avg"))
    _train(tiny_cohort, w1, iterations=1)
    _train(tiny_cohort, w2, iterations=2)
    _train(tiny_cohort, avg, iterations=2, overrides={"ema_decay": 0.25})
    t1, t2, ta = (read_tensors(p)[0] for p in (w1, w2, avg))
    moved, counters = 0, 0
    for k in ta:
        if k.startswith("net.") and not ta[k].is_floating_point():
            assert torch.equal(ta[k], t2[k]) and int(t2[k]) == 2, k
            counters += 1
        if not k.startswith("net.") or not ta[k].is_floating_point():
            continue
        expected = 0.25 * t1[k] + 0.75 * t2[k]
        assert torch.allclose(ta[k], expected, atol=1e-6), k
        moved += int(not torch.equal(t1[k], t2[k]))
    assert moved > 10      # the two iterates differ, so the test can tell an average from either
    assert counters > 0


def test_later_stages_keep_the_discriminators_loss(tiny_cohort, tmp_path):
    """A discriminator trained as a vanilla GAN outputs logits; adapting or fine-tuning it with the
    LSGAN loss would read them as scores. Both stages take gan_mode from the source model."""
    source = tmp_path / "vanilla.safetensors"
    _train(tiny_cohort, source, iterations=1, overrides={"gan_mode": "vanilla"})
    ct = [tiny_cohort / "ct_1001_image.nii.gz"]
    train_mod.adapt(source, ct, tmp_path / "a.safetensors", iterations=1, device="cpu")
    train_mod.finetune(source, ct, [tiny_cohort / "ct_1001_label.nii.gz"], tmp_path / "f.safetensors",
                       iterations=1, device="cpu")
    train_mod.adapt(source, ct, tmp_path / "l.safetensors", iterations=1, device="cpu",
                    overrides={"gan_mode": "lsgan"})
    modes = [load_model(tmp_path / f"{n}.safetensors")[1]["train"]["gan_mode"] for n in ("vanilla", "a", "f", "l")]
    assert modes == ["vanilla", "vanilla", "vanilla", "lsgan"]    # an explicit override still wins
    # a model of an engine before gan_mode was recorded: its Disc was an LSGAN's, the only one then
    assert train_mod._inherited_options({"train": {}}) == {"gan_mode": "lsgan"}


def test_input_size_replaces_the_presets_and_follows_the_model(tiny_cohort, tmp_path):
    """--input-size changes the slice size only; adapt keeps it, segment maps back to the input grid."""
    c, src, ada = tiny_cohort, tmp_path / "src.safetensors", tmp_path / "ada.safetensors"
    assert main(["train-source", "--preset", "tiny", "--input-size", "48", "--iterations", "1", "--out", str(src),
                 "--progress", "none", "--device", "cpu", str(c / "mr_1001_image.nii.gz")]) == 0
    net, meta = load_model(src)
    assert (net.cfg.input_size, meta["config"]["input_size"], meta["preset"]) == (48, 48, "tiny")
    assert net.cfg == dataclasses.replace(get_preset("tiny"), input_size=48)      # nothing else changed
    assert main(["adapt", "--model", str(src), "--out", str(ada), "--iterations", "1", "--progress", "none",
                 str(c / "ct_1001_image.nii.gz")]) == 0
    assert load_model(ada)[0].cfg.input_size == 48
    out = tmp_path / "seg"
    assert main(["segment", "--model", str(ada), "--out", str(out), "--progress", "none",
                 str(c / "ct_1002_image.nii.gz")]) == 0
    seg, image = sitk.ReadImage(str(out / "ct_1002_image_seg.nii.gz")), sitk.ReadImage(str(c / "ct_1002_image.nii.gz"))
    assert seg.GetSize() == image.GetSize() and seg.GetOrigin() == image.GetOrigin()


@pytest.mark.parametrize("argv, hint", [
    (["train-source", "--out", "m.safetensors", "--labels", "a_label.nii.gz", "a_image.nii.gz"],
     "IMAGE_OR_DIR (--labels took every value after it: give IMAGE_OR_DIR first)"),
    (["adapt", "--model", "s.safetensors", "--out", "a.safetensors", "--source-data", "mr/", "ct_image.nii.gz"],
     "TARGET (--source-data took every value after it: give TARGET first)"),
    (["finetune", "--model", "s.safetensors", "--out", "o.safetensors", "--labels", "a_label.nii.gz"],
     "IMAGE_OR_DIR (--labels took every value after it: give IMAGE_OR_DIR first)"),
    (["train-source", "--out", "m.safetensors"], "IMAGE_OR_DIR"),           # nothing swallowed: no hint
    (["finetune", "--labels", "a_label.nii.gz", "--model", "s.safetensors", "--out", "o.safetensors"],
     "IMAGE_OR_DIR"),                                                        # --model ended --labels: no hint
    (["train-source", "--labels", "a_label.nii.gz", "a_image.nii.gz", "--out", "m.safetensors"],
     "IMAGE_OR_DIR (--labels took every value after it: give IMAGE_OR_DIR first)"),   # two values, then --out
])
def test_volumes_taken_by_an_option_of_several_values_are_explained(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: the following arguments are required: {hint}")


def test_a_file_named_like_an_option_is_explained(capsys, tmp_path, monkeypatch):
    """argparse takes '-x.nii.gz' for an option even when the file is there: the sentence says how to
    give it; a word that names no file, or one given after --, gets no such hint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.nii.gz").write_bytes(b"")
    hint = "(-x.nii.gz was taken for an option: give a file whose name starts with '-' as ./-x.nii.gz, or after --)"
    for argv, error in ((["segment", "--model", "m", "--out", "o", "-x.nii.gz"],
                         "the following arguments are required: INPUT"),
                        (["segment", "--model", "m", "--out", "o", "ct.nii.gz", "-x.nii.gz"],
                         "unrecognized arguments: -x.nii.gz")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {error} {hint}")
    for argv in (["segment", "--model", "m", "--out", "o", "-y.nii.gz"],
                 ["segment", "--model", "m", "--out", "o", "--bogus", "--", "-x.nii.gz"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "was taken for an option" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, command", [(["segment", "--model", "m", "--out", "o", "x", "--seed", "3"], "segment"),
                                           (["experiment", "table1", "--data", "d", "--out", "o", "--bogus"],
                                            "experiment table1"),
                                           (["--bogus", "segment", "--model", "m", "--out", "o", "x"], "")])
def test_an_unknown_option_gets_its_commands_usage(capsys, argv, command):
    """Not the top-level usage listing every command: the one the option was given to."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    named = f"vaeuda {command}".strip()          # before any command: vaeuda's own usage
    assert exit_.value.code == 2 and err.startswith(f"usage: {named} [-h]")
    assert err.strip().splitlines()[-1].startswith(f"{named}: error: unrecognized arguments: ")


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), "1.5"])
def test_seed_outside_what_the_generators_take_is_a_usage_error(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "cohort"), "--seed", seed])
    assert exit_.value.code == 2
    assert f"--seed: must be a whole number from 0 to {2 ** 64 - 1}, not '{seed}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_seed_and_decay_bounds_themselves_are_accepted():
    """--seed takes 0 to MAX_SEED inclusive (a 64-bit generator seed); --ema-decay 0 (off) and values
    just inside (0, 1)."""
    from vaeuda.cli import _decay, _seed
    from vaeuda.errors import MAX_SEED
    assert MAX_SEED == 2 ** 64 - 1
    assert (_seed("0"), _seed(str(MAX_SEED))) == (0, MAX_SEED)
    assert (_decay("0"), _decay("0.999"), _decay("1e-6")) == (0.0, 0.999, 1e-6)


def test_every_commands_defaults_are_the_ones_its_help_states():
    """What each command does when an option is not given, as its --help and the docs say."""
    from vaeuda.cli import build_parser
    parser = build_parser()

    def defaults(*argv, **expected):
        args = vars(parser.parse_args(list(argv)))
        assert {k: args[k] for k in expected} == expected, argv
    common = dict(progress="auto", seed=0, device="auto", portable=False)
    training = dict(common, iterations=None, batch_size=None, resume=False)
    defaults("train-source", "x", "--out", "m", **training, preset=None, label_convention="mmwhs", input_size=None,
             intensity_remap=False, labels=None)
    defaults("adapt", "t", "--model", "m", "--out", "o", **training, no_kl=False, no_adv=False, no_cycle=False,
             no_task_consistency=False, slices=None, early_stop=None, source_data=None, ema_decay=None)
    defaults("finetune", "x", "--model", "m", "--out", "o", **training, labels=None)
    defaults("segment", "x", "--model", "m", "--out", "o", progress="auto", device="auto", portable=False,
             batch_size=16, domain=None, cpu_bf16=False)
    defaults("evaluate", "--pred", "p", "--ref", "r", progress="auto", label_convention="mmwhs",
             pred_label_convention=None, json=None)
    defaults("synth", "out", progress="auto", seed=0, size=None)
    defaults("demo", **common, out="demo_out", quick=False, intensity_remap=False)
    defaults("experiment", "table1", "--data", "d", "--out", "o", **common, repeats=6, preset=None,
             iterations_scale=1.0)


@pytest.mark.parametrize("preset, size, message", [
    ("tiny", 50, "not divisible by 4"), ("tiny", 8, "at least 16 pixels"),
    ("tiny", 8192, "input_size must be a whole number in [16, 4096], not 8192"),   # a model it could not load
    # the paper preset's 3-scale, 4-layer discriminator: its coarsest scale sees 60 px as 15, 7, 3, 1
    ("paper", 60, "too small for the 3-scale, 4-layer discriminator of this preset: it needs at least 64 pixels"),
])
def test_bad_input_size_exits_with_one_sentence(tiny_cohort, tmp_path, capsys, preset, size, message):
    out = tmp_path / "m.safetensors"
    assert main(["train-source", "--preset", preset, "--input-size", str(size), "--iterations", "1", "--out", str(out),
                 "--progress", "none", "--device", "cpu", str(tiny_cohort / "mr_1001_image.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_to_mix_portable_and_default_numerics(tiny_cohort, tmp_path, monkeypatch):
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    from vaeuda import machine
    monkeypatch.setattr(machine, "portable", lambda: True)           # as if run with --portable
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    assert read_tensors(checkpoint_path(out))[1]["provenance"]["numerics"]["portable"] is True
    monkeypatch.setattr(machine, "portable", lambda: False)
    with pytest.raises(VaeudaError, match="checkpoint was made with --portable; resume it with --portable too"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert checkpoint_path(out).exists() and not out.exists()
    monkeypatch.setattr(machine, "portable", lambda: True)
    _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert out.exists() and not checkpoint_path(out).exists()


def test_resume_refuses_to_mix_remapped_and_plain_source_training(tiny_cohort, tmp_path, monkeypatch):
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides,
                                      intensity_remap=True)
    with pytest.raises(VaeudaError, match="checkpoint was made with --intensity-remap; resume it with --intensity-remap too"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert checkpoint_path(out).exists() and not out.exists()
    _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True, intensity_remap=True)
    assert out.exists() and not checkpoint_path(out).exists()


@pytest.mark.parametrize("change, message", [
    (dict(seed=8), "checkpoint was made with a different --seed (7) from this run; resume with the interrupted run's "
                   "settings"),
    (dict(overrides={"checkpoint_every": 2, "lambda_kl": 0.5}), "checkpoint was made with different training options from this run"),
    (dict(batch_size=3), "checkpoint was made with different training options from this run"),
    (dict(images=["mr_1002"]), "checkpoint was made with different input volumes or source model from this run"),
    (dict(iterations=1), "checkpoint has done 2 iterations, more than the 1 asked for; resume with --iterations 2 or more"),
])
def test_resume_refuses_a_checkpoint_of_a_run_with_other_settings(tiny_cohort, tmp_path, monkeypatch, change, message):
    """Resumed with another seed, options, inputs or fewer iterations than it has done, a run would
    be neither the interrupted one nor the one its model file records."""
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    kw = dict(iterations=4, overrides=overrides, seed=7, batch_size=None, images=["mr_1001"])
    kw.update(change)
    names = kw.pop("images")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(checkpoint_path(out)))}: {re.escape(message)}"):
        train_source([tiny_cohort / f"{n}_image.nii.gz" for n in names], [tiny_cohort / f"{n}_label.nii.gz" for n in names],
                     out, preset="tiny", device="cpu", resume=True, **kw)
    assert checkpoint_path(out).exists() and not out.exists()


def test_resume_names_every_setting_that_differs(tmp_path):
    """Two differences are both named, in one sentence, the seed first."""
    ckpt = tmp_path / "m.safetensors.ckpt"
    then = {"provenance": {"seed": 1, "device": "cuda"}, "train": {"lr": 1e-4}}
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(ckpt))}: checkpoint was made with a different --seed \\(1\\) "
                                          f"and another --device from this run; resume with the interrupted run's "
                                          f"settings, or remove it to start afresh\\.$"):
        train_mod._refuse_other_settings(ckpt, then, {"provenance": {"seed": 2, "device": "cpu"},
                                                      "train": {"lr": 1e-4}}, 2, 4)


def test_resume_refuses_an_adaptation_checkpoint_of_other_target_slices(tmp_path):
    """--slices chooses what the adaptation trains on, with the same target file and digest: a
    checkpoint of --slices 2:5 resumed with 2:6 would be neither run (the record holds the slices as
    JSON: a list)."""
    ckpt = tmp_path / "a.safetensors.ckpt"
    then = {"provenance": {"seed": 0, "slices": [2, 5]}, "train": {"lr": 1e-4}}
    train_mod._refuse_other_settings(ckpt, then, {"provenance": {"seed": 0, "slices": [2, 5]}, "train": {"lr": 1e-4}}, 2, 4)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(ckpt))}: checkpoint was made with different input volumes "
                                          f"or source model from this run"):
        train_mod._refuse_other_settings(ckpt, then, {"provenance": {"seed": 0, "slices": [2, 6]}, "train": {"lr": 1e-4}},
                                         2, 4)


def test_resume_refuses_a_checkpoint_made_on_another_device(tiny_cohort, tmp_path, monkeypatch):
    """A GPU run computes in bf16 autocast: continued on the CPU it would be neither run."""
    from vaeuda.modelfile import save_tensors
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    tensors, meta, header = read_tensors(checkpoint_path(out))
    meta["provenance"]["device"] = "cuda"                          # as if interrupted on a GPU
    own = ("format", "format_version", "meta", "tensors_sha256")           # what save_tensors writes itself
    save_tensors(checkpoint_path(out), tensors, meta, {k: v for k, v in header.items() if k not in own})
    with pytest.raises(VaeudaError, match="checkpoint was made with another --device from this run"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert checkpoint_path(out).exists() and not out.exists()


def test_resume_refuses_source_files_changed_since_the_checkpoint(tiny_cohort, tmp_path, monkeypatch):
    """The same paths with other contents (a cohort made again there) are other inputs; a checkpoint
    of an older engine, which records no digests, resumes as before."""
    from vaeuda.modelfile import save_tensors
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    tensors, meta, header = read_tensors(checkpoint_path(out))
    own = ("format", "format_version", "meta", "tensors_sha256")           # what save_tensors writes itself

    def checkpoint_recording(digests):
        meta["provenance"]["source_sha256"] = digests
        save_tensors(checkpoint_path(out), tensors, meta, {k: v for k, v in header.items() if k not in own})
    checkpoint_recording(["0" * 64, "1" * 64])                    # as if the files were others then
    with pytest.raises(VaeudaError, match="checkpoint was made with different input volumes or source model"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    checkpoint_recording(None)
    _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert out.exists() and not checkpoint_path(out).exists()


def test_volume_digests_cover_files_that_hold_their_voxels(tmp_path):
    """A DICOM folder or a MetaImage header (voxels elsewhere) gets None, not a digest that would
    miss its changes (a folder had raised IsADirectoryError after the volumes were read)."""
    from vaeuda.fileio import file_sha256
    from vaeuda.train import volume_sha256
    image = sitk.Image([4, 5, 6], sitk.sitkInt16) + 7
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "a.mhd"))
    assert volume_sha256(tmp_path / "a.nii.gz") == file_sha256(tmp_path / "a.nii.gz")
    assert volume_sha256(tmp_path / "a.mhd") is None and volume_sha256(tmp_path) is None
    # a NRRD header with its voxels in another file is one too, and a suffix in capitals names the same format
    sitk.WriteImage(image, str(tmp_path / "n.nhdr"))
    (tmp_path / "B.MHD").write_bytes((tmp_path / "a.mhd").read_bytes())
    assert volume_sha256(tmp_path / "n.nhdr") is None and volume_sha256(tmp_path / "B.MHD") is None


def test_resume_of_a_finetuning_refuses_other_label_files(tiny_cohort, tiny_source_model, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setitem(train_mod.PRESET_TRAINING, "tiny", {"checkpoint_every": 2})
    image, label = tiny_cohort / "ct_1001_image.nii.gz", tiny_cohort / "ct_1001_label.nii.gz"
    other = shutil.copy(label, tmp_path / "other_label.nii.gz")         # the same voxels, another file
    out = tmp_path / "oracle.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, run=lambda: train_mod.finetune(
        tiny_source_model, [image], [label], out, iterations=4, device="cpu"))
    with pytest.raises(VaeudaError, match="checkpoint was made with different input volumes or source model"):
        train_mod.finetune(tiny_source_model, [image], [other], out, iterations=4, device="cpu", resume=True)
    meta = train_mod.finetune(tiny_source_model, [image], [label], out, iterations=4, device="cpu", resume=True)
    assert meta["provenance"]["finetune_labels"] == [str(label.resolve())]


def test_adapted_and_finetuned_models_record_their_inputs_digests(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.fileio import file_sha256
    ct, ct_label = tiny_cohort / "ct_1001_image.nii.gz", tiny_cohort / "ct_1001_label.nii.gz"
    mr, mr_label = tiny_cohort / "mr_1001_image.nii.gz", tiny_cohort / "mr_1001_label.nii.gz"
    adapted = train_mod.adapt(tiny_source_model, [ct], tmp_path / "a.safetensors", iterations=1, device="cpu",
                              source_data=[str(mr)])["provenance"]
    assert adapted["source_model_sha256"] == file_sha256(tiny_source_model)
    assert adapted["target_sha256"] == [file_sha256(ct)]
    assert adapted["source_sha256"] == [file_sha256(mr), file_sha256(mr_label)]
    oracle = train_mod.finetune(tiny_source_model, [ct], [ct_label], tmp_path / "o.safetensors", iterations=1,
                                device="cpu")["provenance"]
    assert oracle["source_model_sha256"] == file_sha256(tiny_source_model)
    assert oracle["finetune_sha256"] == [file_sha256(ct), file_sha256(ct_label)]
    assert load_model(tmp_path / "a.safetensors")[1]["provenance"]["target_sha256"] == [file_sha256(ct)]


def test_a_source_model_records_its_inputs_seed_and_the_presets_iteration_count_it_ran(tiny_cohort, tmp_path,
                                                                                       monkeypatch):
    """Without --iterations the run takes the preset's count: the model records that number (what
    resuming and Table 1 compare), not the absent option; the inputs as absolute paths, their digests
    image then label."""
    from vaeuda.fileio import file_sha256
    monkeypatch.setitem(train_mod.DEFAULT_ITERATIONS["tiny"], "source", 1)     # one iteration, not the preset's 20
    monkeypatch.chdir(tiny_cohort)
    mr, mr_label = Path("mr_1001_image.nii.gz"), Path("mr_1001_label.nii.gz")  # relative: recorded resolved
    train_source([mr], [mr_label], tmp_path / "m.safetensors", preset="tiny", seed=5, device="cpu")
    prov = load_model(tmp_path / "m.safetensors")[1]["provenance"]
    assert prov["iterations"] == prov["iterations_done"] == 1 and prov["seed"] == 5
    assert prov["source_data"] == [str(tiny_cohort.resolve() / mr)]
    assert prov["source_labels"] == [str(tiny_cohort.resolve() / mr_label)]
    assert prov["source_sha256"] == [file_sha256(mr), file_sha256(mr_label)]


def test_a_model_file_named_safetensors_in_capitals_gets_no_note(tmp_path):
    """The note is for names the Slicer module's dialogs would not list; their filter ignores case."""
    import types
    seen = []
    reporter = types.SimpleNamespace(log=seen.append)
    train_mod._check_output(tmp_path / "M.SafeTensors", [], False, reporter)
    assert seen == []
    train_mod._check_output(tmp_path / "m.pt", [], False, reporter)
    assert len(seen) == 1 and "is written as a safetensors model file" in seen[0]


def test_an_adaptation_records_relative_inputs_as_absolute_paths_and_its_slices(tiny_cohort, tiny_source_model,
                                                                                 tmp_path, monkeypatch):
    """A later adaptation of this model, or its resume, reads these records from another folder:
    the target and the --source-data volumes (given relative here) are recorded resolved; --slices,
    which chooses what it trained on, as the JSON list a resumed run compares."""
    monkeypatch.chdir(tiny_cohort)
    prov = train_mod.adapt(tiny_source_model, [Path("ct_1001_image.nii.gz")], tmp_path / "a.safetensors",
                           iterations=1, device="cpu", source_data=["mr_1001_image.nii.gz"],
                           slice_range=(2, 5))["provenance"]
    assert load_model(tmp_path / "a.safetensors")[1]["provenance"]["slices"] == [2, 5]
    folder = tiny_cohort.resolve()
    assert prov["target_data"] == [str(folder / "ct_1001_image.nii.gz")]
    assert prov["source_data"] == [str(folder / "mr_1001_image.nii.gz")]
    assert prov["source_labels"] == [str(folder / "mr_1001_label.nii.gz")]


def test_a_source_model_that_records_no_source_volumes_asks_for_source_data():
    """A model without the record (or with an empty one) cannot name the volumes to adapt with."""
    for meta in ({"provenance": {}}, {"provenance": {"source_data": [], "source_labels": []}}):
        with pytest.raises(VaeudaError, match=r"^m\.safetensors: records no labelled source volumes; pass them "
                                              r"with --source-data\.$"):
            train_mod._source_pairs(meta, "m.safetensors", None, null_reporter())


def test_a_source_models_one_missing_label_file_is_named_as_moved(tiny_cohort, tmp_path):
    """One file gone (here the label; the image is where the model says) is enough to ask for
    --source-data: the image alone cannot train Seg."""
    gone = tmp_path / "mr_1001_label.nii.gz"
    meta = {"provenance": {"source_data": [str(tiny_cohort / "mr_1001_image.nii.gz")], "source_labels": [str(gone)]}}
    with pytest.raises(VaeudaError, match=f"^m\\.safetensors: 1 of the 2 labelled source files it was trained on are "
                                          f"not at their recorded paths \\(the first: {re.escape(str(gone))}\\)"):
        train_mod._source_pairs(meta, "m.safetensors", None, null_reporter())


def test_a_label_file_or_a_labelled_source_volume_is_refused_as_a_training_output(tiny_cohort, tiny_source_model,
                                                                                  tmp_path):
    """Labels are inputs too (of the source stage, and of an adaptation through its source volumes):
    never overwritten by the model file."""
    import shutil
    image, label = (shutil.copy(tiny_cohort / n, tmp_path / n) for n in ("mr_1001_image.nii.gz", "mr_1001_label.nii.gz"))
    before = Path(label).read_bytes()
    message = f"^{re.escape(str(label))}: is also an input, which is never overwritten"
    with pytest.raises(VaeudaError, match=message):
        train_source([image], [label], label, preset="tiny", iterations=1, device="cpu")
    with pytest.raises(VaeudaError, match=message):
        train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], label, iterations=1, device="cpu",
                        source_data=[str(image)])
    assert Path(label).read_bytes() == before


def test_resume_of_an_adaptation_refuses_a_target_or_source_model_changed_since(tiny_cohort, tiny_source_model,
                                                                                 tmp_path, monkeypatch):
    """The same paths with other contents (the CT written again, a source model trained again at its
    path) are other inputs: resumed, the run would be neither the interrupted one nor the one asked for."""
    import shutil
    ct, source = tmp_path / "ct.nii.gz", tmp_path / "source.safetensors"
    shutil.copy(tiny_cohort / "ct_1001_image.nii.gz", ct)
    shutil.copy(tiny_source_model, source)
    out = tmp_path / "a.safetensors"
    kw = dict(iterations=4, device="cpu", overrides={"checkpoint_every": 2})
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out,
                                      run=lambda: train_mod.adapt(source, [ct], out, **kw))
    refused = "checkpoint was made with different input volumes or source model"
    original = ct.read_bytes()
    sitk.WriteImage(sitk.ReadImage(str(ct)) + 1, str(ct))                          # the same path, other voxels
    with pytest.raises(VaeudaError, match=refused):
        train_mod.adapt(source, [ct], out, resume=True, **kw)
    ct.write_bytes(original)
    _, meta = load_model(source)
    tensors = read_tensors(source)[0]
    from vaeuda.modelfile import save_tensors
    save_tensors(source, {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, meta)
    with pytest.raises(VaeudaError, match=refused):
        train_mod.adapt(source, [ct], out, resume=True, **kw)
    shutil.copy(tiny_source_model, source)
    assert train_mod.adapt(source, [ct], out, resume=True, **kw)["provenance"]["iterations_done"] == 4


def test_resume_with_more_iterations_continues_as_a_longer_run(tiny_cohort, tmp_path, monkeypatch):
    overrides = {"checkpoint_every": 2}
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    _train(tiny_cohort, full, iterations=5, overrides=overrides)
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, part, iterations=3, overrides=overrides)
    meta = _train(tiny_cohort, part, iterations=5, overrides=overrides, resume=True)
    assert meta["provenance"]["iterations"] == meta["provenance"]["iterations_done"] == 5
    ta, tb = read_tensors(full)[0], read_tensors(part)[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_with_as_many_iterations_as_the_checkpoint_has_done_saves_its_weights(tiny_cohort, tmp_path, monkeypatch):
    """Only fewer iterations than the checkpoint has done are refused: resumed with exactly as many,
    the run trains no further and saves the checkpoint's weights."""
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    checkpointed = read_tensors(checkpoint_path(out))[0]
    meta = _train(tiny_cohort, out, iterations=2, overrides=overrides, resume=True)
    assert meta["provenance"]["iterations_done"] == 2 and not checkpoint_path(out).exists()
    saved = read_tensors(out)[0]
    assert all(torch.equal(saved[k], checkpointed[k]) for k in saved if k.startswith("net."))


def test_resume_refuses_a_file_that_is_not_a_training_checkpoint(tiny_cohort, tiny_source_model, tmp_path, capsys):
    """A model file copied to the checkpoint's path has the format but no training state."""
    import shutil
    out = tmp_path / "m.safetensors"
    shutil.copy(tiny_source_model, checkpoint_path(out))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(checkpoint_path(out)))}: not a training checkpoint "
                                          r"\(its training state is missing or damaged\); remove it to start afresh"):
        _train(tiny_cohort, out, iterations=1, resume=True)
    assert not out.exists()


def test_a_checkpoint_another_run_left_is_not_called_the_last_good_one(tiny_cohort, tiny_source_model, tmp_path,
                                                                       monkeypatch):
    """Without --resume a leftover checkpoint is another run's: a NaN before this run's first
    checkpoint must not send the user to it."""
    import shutil
    out = tmp_path / "m.safetensors"
    shutil.copy(tiny_source_model, checkpoint_path(out))
    monkeypatch.setattr(train_mod, "reconstruction", lambda a, b: torch.tensor(float("nan")))
    with pytest.raises(VaeudaError, match="became NaN or infinite at iteration 1 of the source stage; no checkpoint "
                                          "had been written yet"):
        _train(tiny_cohort, out, iterations=2)


def test_resume_with_early_stopping_stops_and_keeps_what_an_uninterrupted_run_does(tiny_cohort, tiny_source_model,
                                                                                   tmp_path, monkeypatch):
    """Early stopping's best proxy, patience count and best weights travel in the checkpoint. The
    proxy is read negated, still a function of the weights alone: the cycle error falls as the tiny
    model trains, so the negated one stops the run early, at a point the checkpoint lies before."""
    real = train_mod.target_proxy
    monkeypatch.setattr(train_mod, "target_proxy", lambda *args, **kw: -real(*args, **kw))
    ct = [tiny_cohort / "ct_1001_image.nii.gz"]
    kw = dict(iterations=14, device="cpu", early_stop=3, overrides={"eval_every": 1, "checkpoint_every": 2})
    full = train_mod.adapt(tiny_source_model, ct, tmp_path / "full.safetensors", **kw)

    def interrupt(iteration, averaged, live):
        if iteration == 3:                 # after the checkpoint of iteration 2; patience 3 stops at 4 at the earliest
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_mod.adapt(tiny_source_model, ct, tmp_path / "part.safetensors", callback=interrupt, **kw)
    part = train_mod.adapt(tiny_source_model, ct, tmp_path / "part.safetensors", resume=True, **kw)
    for key in ("early_stopped_at", "iterations_done"):
        assert part["provenance"][key] == full["provenance"][key]
    assert full["provenance"]["iterations_done"] < 14            # it did stop early
    assert [h["proxy"] for h in part["history"]] == [h["proxy"] for h in full["history"]]
    ta, tb = read_tensors(tmp_path / "full.safetensors")[0], read_tensors(tmp_path / "part.safetensors")[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_refuses_a_checkpoint_of_another_input_size(tiny_cohort, tmp_path, monkeypatch):
    """The networks' weights fit any slice size, so only the recorded configuration can tell a
    checkpoint of another --input-size apart; resuming it would silently change the data."""
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    with pytest.raises(VaeudaError, match="different network configuration"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True, input_size=48)
    assert checkpoint_path(out).exists() and not out.exists()
    _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)      # the same configuration resumes
    assert out.exists() and not checkpoint_path(out).exists()


def test_lr_scale_steps_each_named_network_at_its_multiple(tiny_cohort, tmp_path):
    """lr_scale {"enc_s": 0} freezes E_S (weight decay included) while the rest learns; the
    optimiser holds every generator parameter once, at lr x its network's scale."""
    from vaeuda.nets import VAEUDANet
    torch.manual_seed(7)                     # train_source seeds, then builds the network
    initial = VAEUDANet(get_preset("tiny"))
    out = tmp_path / "m.safetensors"
    _train(tiny_cohort, out, iterations=2, overrides={"lr_scale": {"enc_s": 0}})
    trained, meta = load_model(out)
    assert meta["train"]["lr_scale"] == {"enc_s": 0}
    assert all(torch.equal(a, b) for a, b in zip(trained.enc_s.parameters(), initial.enc_s.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(trained.dec_s.parameters(), initial.dec_s.parameters()))

    cfg = train_mod.TrainConfig(lr=1e-3, lr_scale={"enc_t": 0.0, "seg": 0.5})
    gen_opt, _ = train_mod._optimizers(initial, cfg)
    lr_of = {id(p): group["lr"] for group in gen_opt.param_groups for p in group["params"]}
    assert sum(len(g["params"]) for g in gen_opt.param_groups) == len(lr_of)        # none twice
    for name in train_mod.GENERATOR_NETS:
        expected = {"enc_t": 0.0, "seg": 5e-4}.get(name, 1e-3)
        assert {lr_of[id(p)] for p in getattr(initial, name).parameters()} == {expected}, name
    assert all(id(p) not in lr_of for p in initial.disc.parameters())


@pytest.mark.parametrize("lr_scale, message", [({"disc": 0}, "generator networks only"),
                                               ({"enc_t": -1}, "at least 0"), ({"enc_t": "0"}, "at least 0"),
                                               ({"enc_t": True}, "at least 0"),     # a bool is no multiple
                                               (0.5, "must map generator network names")])
def test_lr_scale_refuses_what_it_cannot_scale(tiny_cohort, tmp_path, lr_scale, message):
    with pytest.raises(VaeudaError, match=message):
        _train(tiny_cohort, tmp_path / "m.safetensors", iterations=1, overrides={"lr_scale": lr_scale})
    assert not (tmp_path / "m.safetensors").exists()


def test_training_defaults_are_units_adam_an_lsgan_and_no_weight_average():
    """Docs/method.md: Adam lr 1e-4, betas (0.5, 0.999), weight decay 1e-4 (UNIT), for the generators
    and the Disc alike (the Disc's optimiser holds its parameters alone); the tiny and paper presets
    keep them, the cpu preset steps at 3e-4. Batches: 8 slices (paper, cpu), 2 (tiny). The Disc is an
    LSGAN's, the early-stop proxy is read every 50 iterations, and no weight average is kept unless
    a stage asks for one (as the paper: the last iterate)."""
    from vaeuda.nets import VAEUDANet
    net = VAEUDANet(get_preset("tiny"))
    cfg = train_mod.TrainConfig()
    assert (cfg.gan_mode, cfg.eval_every, cfg.ema_decay) == ("lsgan", 50, 0.0)
    gen_opt, disc_opt = train_mod._optimizers(net, cfg)
    for opt in (gen_opt, disc_opt):
        assert type(opt) is torch.optim.Adam
        assert {(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in opt.param_groups} == {(1e-4, (0.5, 0.999), 1e-4)}
    assert [id(p) for g in disc_opt.param_groups for p in g["params"]] == [id(p) for p in net.disc.parameters()]
    resolved = {preset: train_mod.resolve_train_config(None, None, preset) for preset in ("paper", "cpu", "tiny")}
    assert {preset: (cfg.lr, cfg.batch_size) for preset, cfg in resolved.items()} == {
        "paper": (1e-4, 8), "cpu": (3e-4, 8), "tiny": (1e-4, 2)}


def test_adaptation_callback_sees_the_average_and_the_live_network(tiny_cohort, tiny_source_model, tmp_path,
                                                                   monkeypatch):
    """callback(iteration, averaged, live) every eval_every iterations: with a weight average the
    two differ; what the callback returns joins the run's history, beside the iteration's proxy and
    loss terms. A callback that evaluates the live network (eval mode) does not leave the training
    in eval mode: BatchNorm would stop learning its statistics."""
    seen, modes = [], []
    real_source_terms = train_mod.source_terms
    monkeypatch.setattr(train_mod, "source_terms", lambda net, *args: modes.append(net.training)
                        or real_source_terms(net, *args))

    def callback(iteration, averaged, live):
        differs = any(not torch.equal(a, b) for a, b in zip(averaged.enc_t.parameters(), live.enc_t.parameters()))
        seen.append((iteration, averaged is live, differs))
        live.eval()
        return {"probe": iteration * 10}

    meta = train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "a.safetensors",
                           iterations=4, device="cpu", callback=callback,
                           overrides={"eval_every": 2, "ema_decay": 0.5})
    assert seen == [(2, False, True), (4, False, True)]
    assert [entry["probe"] for entry in meta["history"]] == [20, 40]
    assert modes == [True] * 4
    assert set(meta["history"][0]) == {"iteration", "proxy", "probe", "S_rec", "S_kl", "seg", "S_adv", "T_rec", "T_kl",
                                       "T_adv", "T_cyc", "task"}


def test_weight_average_rejects_bad_decay(tiny_cohort, tmp_path):
    with pytest.raises(VaeudaError, match="ema_decay must be 0"):
        _train(tiny_cohort, tmp_path / "m.safetensors", iterations=1, overrides={"ema_decay": 1.5})
    from vaeuda.nets import VAEUDANet
    net = VAEUDANet(get_preset("tiny"))
    for decay in (1.0, -0.5):         # 1 would never move from the first weights; the bounds are open
        with pytest.raises(VaeudaError, match=re.escape(f"ema_decay must be 0 (off) or between 0 and 1, not {decay}.")):
            train_mod._weight_average(net, decay)
    assert train_mod._weight_average(net, 0.0) is None and train_mod._weight_average(net, 0.5) is not None


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan", "x"])
def test_ema_decay_out_of_range_is_a_usage_error_before_any_volume_is_read(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["adapt", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "a.safetensors"),
              "--ema-decay", value, str(tmp_path / "missing_ct.nii.gz")])
    assert exit_.value.code == 2
    assert f"--ema-decay: must be 0 (off) or a number between 0 and 1, not '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_resume_continues_from_checkpoint(tiny_cohort, tmp_path, monkeypatch, ema_decay):
    """An interrupted run resumed with --resume ends with the same weights as an uninterrupted one
    (with and without the weight average, which the checkpoint carries)."""
    overrides = {"checkpoint_every": 3, "ema_decay": ema_decay}
    full = tmp_path / "full.safetensors"
    _train(tiny_cohort, full, iterations=6, overrides=overrides)
    part = tmp_path / "part.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, part, iterations=6, overrides=overrides)
    _train(tiny_cohort, part, iterations=6, overrides=overrides, resume=True)
    ta, tb = read_tensors(full)[0], read_tensors(part)[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not checkpoint_path(part).exists()


@pytest.mark.parametrize("quick, preset", [(False, "cpu"), (True, "tiny")])
def test_demo_trains_the_preset_its_report_names_whatever_the_device(tmp_path, monkeypatch, quick, preset):
    """train-source alone takes the paper preset where CUDA is present; the demo stays the cpu one."""
    from vaeuda import demo

    class Stop(Exception):
        pass

    asked = {}

    def record(*args, **kwargs):
        asked.update(kwargs)
        raise Stop
    monkeypatch.setattr(demo, "is_phantom_cohort", lambda *args: True)      # no cohort is made
    monkeypatch.setattr(demo, "cohort_split", lambda cohort, modality, split: ["x_1001"])
    monkeypatch.setattr(train_mod, "train_source", record)
    monkeypatch.setattr(train_mod, "resolve_device", torch.device)           # as if a GPU were there
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "demo", quick=quick, device="cuda")
    assert asked["preset"] == preset and asked["device"] == "cuda"


def _fake_demo_pipeline(monkeypatch, oracle_dice=0.8):
    """run_demo with every stage replaced: the cohort split, the trainings (their records), the scores
    and the figure are made up here, so the report's numbers can be worked out by hand. Returns the
    keyword arguments each training stage was called with."""
    from vaeuda import demo, modelfile
    from vaeuda.labels import CLASS_KEYS
    names = {("mr", "train"): [f"mr_{1001 + i}" for i in range(16)],
             ("ct", "train"): [f"ct_{1001 + i}" for i in range(16)],
             ("ct", "test"): [f"ct_{1017 + i}" for i in range(4)]}
    called = {}

    def stage(name, iterations_done):
        def run(*args, **kwargs):
            called[name] = dict(kwargs, args=args)
            return {"provenance": {"device": "cuda:0", "engine": "9.9", "iterations_done": iterations_done},
                    "train": {"batch_size": 8}}
        return run

    def scores(dice, std):
        cell = lambda mean, spread: {"mean": mean, "std": spread, "n": 4, "n_missing": 0}   # noqa: E731
        summary = {k: {"dice": cell(dice, std), "assd_vox": cell(3.0, 1.0), "assd_mm": cell(4.0, 2.0)}
                   for k in CLASS_KEYS + ("Mean",)}
        # the scored volumes' spacing (z, y, x): x 1.25 to 1.30, y 1.50 in both, z 2.00 to 2.50
        return {"summary": summary, "volumes": [{"spacing_zyx": [2.0, 1.5, 1.25]}, {"spacing_zyx": [2.5, 1.5, 1.3]}]}
    dice = {"source": (0.2, 0.1), "adapted": (0.5, 0.05), "oracle": (oracle_dice, 0.025)}
    monkeypatch.setattr(demo, "is_phantom_cohort", lambda *args: True)               # no cohort is made
    monkeypatch.setattr(demo, "cohort_split", lambda cohort, modality, split: names[(modality, split)])
    monkeypatch.setattr(train_mod, "train_source", stage("source", 700))
    monkeypatch.setattr(train_mod, "adapt", stage("adapt", 300))
    monkeypatch.setattr(train_mod, "finetune", stage("finetune", 1600))
    monkeypatch.setattr(demo, "evaluate_model", lambda model, *a: scores(*dice[Path(model).name.split(".")[0]]))
    monkeypatch.setattr(demo, "figure_fig2", lambda *args: 7)
    monkeypatch.setattr(modelfile, "read_tensors", lambda model: (None, None, {"tensors_sha256": "ab" * 32}))
    monkeypatch.setattr(demo.machine, "description", lambda: "a test machine")     # (its fingerprint takes seconds)
    return called


def test_the_demo_report_states_the_runs_numbers_as_worked_out_by_hand(tmp_path, monkeypatch, capsys):
    """The full demo (not --quick) with made-up scores: mean Dice 20, 50 and 80 % give a gain of +30.00
    points and 62.5 % of the oracle; the table lists mean (std) in the paper's row order; the stages run
    the cpu preset at its own iterations; the voxel sizes are each axis's range; the summary is printed."""
    from vaeuda import demo
    from vaeuda.progress import Reporter
    called = _fake_demo_pipeline(monkeypatch)
    out = tmp_path / "demo"
    assert [p.name for p in demo.run_demo(out, seed=5, device="cpu", reporter=Reporter("none"))] == [
        "report.md", "report.json", "fig2.png"]
    target = random.Random(5).choice([f"ct_{1001 + i}" for i in range(16)])          # the one CT, drawn
    assert [str(p) for p in called["adapt"]["args"][1]] == [str(out / "cohort" / f"{target}_image.nii.gz")]
    assert all(called[s]["iterations"] is None and called[s]["seed"] == 5 for s in ("source", "adapt", "finetune"))
    assert called["source"]["preset"] == "cpu" and called["source"]["intensity_remap"] is False
    assert len(called["source"]["args"][0]) == 16 and len(called["finetune"]["args"][1]) == 16
    text = (out / "report.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "Smoke run" not in text                                   # only --quick is one
    assert ("Training: `cpu` preset on cuda:0 (bf16 autocast), engine 9.9, batch 8: source model 700 iterations "
            "(16 labelled MR), adaptation 300 (1 unlabelled CT), oracle fine-tuning 1600 (16 labelled CT).") in lines
    assert "which measure 1.25-1.30 x 1.50 x 2.00-2.50 mm (x, y, z) here" in text
    assert (f"target = ONE unlabelled CT ({target}), evaluated on the 4 held-out CT test volumes "
            f"(ct_1017, ct_1018, ct_1019, ct_1020).") in text
    # the rows in the paper's Table 1 order, each Dice cell mean (std) in percent
    rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip() in demo.ROWS]
    assert [r.split("|")[1].strip() for r in rows] == ["Oracle", "Unadapted", "Proposed-1 (adapted)"]
    assert [r.split("|")[2].strip() for r in rows] == ["80.00 (2.50)", "20.00 (10.00)", "50.00 (5.00)"]
    assert "- Adaptation gain in mean Dice: +30.00 points (unadapted 20.00 -> adapted 50.00)." in lines
    assert "- Adapted / oracle mean Dice: 62.5%." in lines
    # the paper's Table 1 Mean column: 20.03, 72.18 and 87.00; 72.18 / 87.00 = 83.0 %
    assert ("- The paper, on real MM-WHS scans (six draws, 3x256x256 slices, a GPU): unadapted 20.03, Proposed-1 "
            "72.18, oracle 87.00 mean Dice (83.0 % of the oracle); these are synthetic scans and one draw.") in lines
    assert "source.safetensors `abababababababab`" in text and "![ct_1017, coronal slice 7:" in text
    assert "Machine: a test machine." in lines
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["mean_dice"] == pytest.approx({"Oracle": 80.0, "Unadapted": 20.0, "Proposed-1 (adapted)": 50.0})
    assert list(report["results"]) == list(demo.ROWS) and report["target_scan"] == target
    assert report["figure"] == {"scan": "ct_1017", "coronal_slice": 7} and report["quick"] is False
    assert report["training"] == {"preset": "cpu", "device": "cuda:0", "engine": "9.9", "batch_size": 8,
                                  "iterations": {"source": 700, "adapt": 300, "finetune": 1600}}
    printed = capsys.readouterr().out
    assert "- Adapted / oracle mean Dice: 62.5%." in printed and "| stage | seconds |" not in printed


def test_the_demo_prints_no_summary_in_json_mode_and_a_zero_oracle_gives_no_ratio(tmp_path, monkeypatch, capsys):
    """Under --progress json every stdout line is an event (the summary would break the reader); an
    oracle at 0 % Dice leaves the adapted / oracle ratio undefined, written as nan, not a crash."""
    from vaeuda import demo
    from vaeuda.progress import Reporter
    _fake_demo_pipeline(monkeypatch, oracle_dice=0.0)
    demo.run_demo(tmp_path / "demo", device="cpu", reporter=Reporter("json"))
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert events and set(events) <= {"log", "stage", "progress"}
    assert "- Adapted / oracle mean Dice: nan%." in (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")


def test_quick_demo_end_to_end(tmp_path, capsys):
    """`vaeuda demo --quick`: the whole pipeline at the tiny preset writes its report, JSON and figure,
    and prints the report's results (not a cut-off stage table) with the total time."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--progress", "none"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-4].startswith("- One draw of the adaptation scan") and printed[-1].startswith("Total ")
    assert printed[-3].startswith("- The paper, on real MM-WHS scans") and "72.18" in printed[-3]
    assert printed[-1].endswith(str(out / "report.md")) and not any(l.startswith("| stage") for l in printed)
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and len(report["test_scans"]) == 4
    assert set(report["mean_dice"]) == {"Unadapted", "Proposed-1 (adapted)", "Oracle"}
    # the one CT scan is drawn from the training pool with the seed; the test scans are never it
    splits = json.loads((out / "cohort" / "splits.json").read_text())
    assert report["target_scan"] == random.Random(0).choice(splits["ct"]["train"])
    assert report["test_scans"] == splits["ct"]["test"]
    # README: a cohort of 48x48x48-voxel volumes
    for name in (report["target_scan"], splits["mr"]["train"][0]):
        assert sitk.ReadImage(str(out / "cohort" / f"{name}_image.nii.gz")).GetSize() == (48, 48, 48)
    # the summary lines are the results' mean Dice, their difference and their ratio
    mean = {name: r["summary"]["Mean"]["dice"]["mean"] * 100 for name, r in report["results"].items()}
    assert mean == pytest.approx(report["mean_dice"])
    una, ada, ora = (round(mean[k], 2) for k in ("Unadapted", "Proposed-1 (adapted)", "Oracle"))   # as shown
    assert f"- Adaptation gain in mean Dice: {ada - una:+.2f} points (unadapted {una:.2f} -> adapted {ada:.2f})." in printed
    assert f"- Adapted / oracle mean Dice: {100 * ada / ora:.1f}%." in printed
    text = (out / "report.md").read_text()
    # a smoke run says so; what each stage ran is in both reports
    assert "**Smoke run** (`--quick`)" in text
    assert report["training"] == {"preset": "tiny", "device": "cpu", "engine": vaeuda.__version__, "batch_size": 2,
                                  "iterations": {"source": 60, "adapt": 30, "finetune": 30}}
    assert ("Training: `tiny` preset on cpu, engine " + vaeuda.__version__ + ", batch 2: source model 60 iterations "
            "(16 labelled MR), adaptation 30 (1 unlabelled CT), oracle fine-tuning 30 (16 labelled CT).") in text
    assert report["figure"]["scan"] == "ct_1017" and f"coronal slice {report['figure']['coronal_slice']}" in text
    assert text.count("| Unadapted |") == 1 and "Oracle" in text
    # the rows in the paper's Table 1 order; ASSD in the paper's voxels, then in mm, each cell report.json's number
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| **Structure** |"))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head - 2:head + 4]]
    assert [(i, g) for i, g in enumerate(cells[0]) if g] == [(1, "Dice [%]"), (6, "ASSD [voxel]"), (11, "ASSD [mm]")]
    assert [row[0] for row in cells[3:]] == ["Oracle", "Unadapted", "Proposed-1 (adapted)"] == list(report["results"])
    for row in cells[3:]:
        summary = report["results"][row[0]]["summary"]
        for group, metric in ((6, "assd_vox"), (11, "assd_mm")):
            for i, key in enumerate(("LV-M", "LA-B", "LV-B", "A-A", "Mean")):
                stat = summary[key][metric]
                if stat["mean"] is None:
                    assert row[group + i] == "n/a"
                elif stat["n_missing"]:             # the dagger's count follows
                    assert row[group + i].startswith(f"{stat['mean']:.2f}")
                else:
                    assert row[group + i] == f"{stat['mean']:.2f} ({stat['std']:.2f})"
    assert "ASSD [voxel] is the paper's unit" in text and "ASSD [mm] is the same distance in millimetres" in text
    xs = sorted(v["spacing_zyx"][2] for v in report["results"]["Oracle"]["volumes"])     # the phantom's vary
    assert f"which measure {xs[0]:.2f}-{xs[-1]:.2f} x " in text
    # report.json says its units: the mean Dice in percent (as its readers take it), the results' Dice a fraction
    assert report["units"] == {"mean_dice": "percent",
                               "results": {"dice": "fraction (0-1)", "assd_vox": "voxel", "assd_mm": "mm"}}
    assert report["intensity_remap"] is False and "intensity-remap" not in text      # the paper's method
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each model's weight digest, as `vaeuda info` prints it and as the tensors on disk hash
    models = {"Unadapted": "source", "Proposed-1 (adapted)": "adapted", "Oracle": "oracle"}
    for row, name in models.items():
        path = out / "models" / f"{name}.safetensors"
        assert main(["info", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert report["weights_sha256"][row] == info["weights_sha256"] == _digest(load_file(path))
        assert info["stage"] == load_model(path)[1]["stage"]                        # the metadata follows it
        assert f"{name}.safetensors `{info['weights_sha256'][:16]}`" in text
    assert len(set(report["weights_sha256"].values())) == 3


def test_cpu_bf16_is_opt_in_and_stays_close_to_fp32(tiny_cohort, tiny_source_model, tmp_path):
    from vaeuda.predict import slice_probabilities
    from vaeuda.volumes import SliceGrid, read_image
    net, meta = load_model(tiny_source_model)
    image = read_image(tiny_cohort / "ct_1002_image.nii.gz")
    slices = SliceGrid.from_image(image, net.cfg.input_size, net.cfg.slice_fov_mm).image_slices(image, meta["normalisation"])
    cpu = torch.device("cpu")
    fp32 = slice_probabilities(net, slices, "source", cpu).astype(np.float32)
    assert np.array_equal(slice_probabilities(net, slices, "source", cpu, cpu_bf16=False), fp32)   # the default
    bf16 = slice_probabilities(net, slices, "source", cpu, cpu_bf16=True).astype(np.float32)
    assert not np.array_equal(bf16, fp32)                 # autocast did engage
    assert np.abs(bf16 - fp32).max() < 0.01               # bf16's 8-bit mantissa, not another network (5e-4 here)

    outs = {}
    for flag in ([], ["--cpu-bf16"]):
        out = tmp_path / ("bf16" if flag else "fp32")
        assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--device", "cpu",
                     "--progress", "none", *flag, str(tiny_cohort / "ct_1002_image.nii.gz")]) == 0
        outs[bool(flag)] = sitk.ReadImage(str(out / "ct_1002_image_seg.nii.gz"))
    assert outs[True].GetSize() == image.GetSize() and outs[True].GetOrigin() == image.GetOrigin()
    agree = np.mean(sitk.GetArrayFromImage(outs[True]) == sitk.GetArrayFromImage(outs[False]))
    assert agree > 0.99


@pytest.mark.parametrize("flags, message", [
    (["--iterations", "0"], "--iterations must be a whole number of at least 1, not 0"),
    (["--iterations", "-3"], "--iterations must be a whole number of at least 1, not -3"),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1, not 0"),
    (["--batch-size", "100000"], "--batch-size 100000 is more than 512 slices per step"),   # the OOM killer before
])
def test_counts_below_one_are_refused_not_replaced_by_defaults(tiny_cohort, tmp_path, capsys, flags, message):
    out = tmp_path / "m.safetensors"
    rc = main(["train-source", "--preset", "tiny", "--progress", "none", "--out", str(out), *flags,
               str(tiny_cohort / "mr_1001_image.nii.gz")])
    assert rc == 2 and message in capsys.readouterr().err and not out.exists()


def test_the_stages_own_checks_bound_every_count_and_the_overrides_too():
    """What a script calling train_source, adapt or finetune meets without the command line's checks:
    the bounds themselves are allowed, one past them refused; a batch size set through the overrides
    is checked as --batch-size is; overrides win over the stage's defaults, and those over the preset's."""
    from vaeuda.errors import MAX_BATCH_SIZE, MAX_ITERATIONS
    train_mod._check_run_arguments(MAX_ITERATIONS, MAX_BATCH_SIZE, 1)
    for args, message in (((MAX_ITERATIONS + 1, None), "--iterations must be at most 10,000,000, not 10,000,001."),
                          ((None, MAX_BATCH_SIZE + 1), "--batch-size 513 is more than 512 slices per step"),
                          ((None, None, 0), "--early-stop must be a whole number of at least 1, not 0.")):
        with pytest.raises(VaeudaError, match=re.escape(message)):
            train_mod._check_run_arguments(*args)
    with pytest.raises(VaeudaError, match=re.escape("--batch-size must be a whole number of at least 1, not 0.")):
        train_mod.resolve_train_config({"batch_size": 0}, None, "tiny")
    with pytest.raises(VaeudaError, match=re.escape("unknown training option 'lambda_foo'.")):
        train_mod.resolve_train_config({"lambda_foo": 1.0}, None, "tiny")
    cfg = train_mod.resolve_train_config({"lr": 0.01, "ema_decay": 0.5}, None, "cpu", {"lr": 5e-4, "ema_decay": 0.995})
    assert (cfg.lr, cfg.ema_decay) == (0.01, 0.5)
    assert train_mod.resolve_train_config(None, None, "cpu", {"lr": 5e-4}).lr == 5e-4      # the cpu preset's is 3e-4


def test_bad_paths_and_values_get_sentences_that_name_the_real_problem(tiny_cohort, tiny_source_model, tmp_path,
                                                                        capsys):
    """Each used to get a misleading sentence, argparse's usage text, or (a target given twice) none."""
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    cases = [
        (["info", str(tiny_cohort)], f"{tiny_cohort}: is a folder, not a model file."),
        (["evaluate", "--pred", str(tiny_source_model), "--ref", str(tiny_cohort)],
         f"{tiny_source_model}: is a file; --pred takes the folder of segmentations."),
        (["adapt", "--model", str(tiny_source_model), "--out", str(tmp_path / "a.safetensors"), "--slices", "-1:5",
          ct], "--slices '-1:5' must have 0 <= A < B."),
        (["adapt", "--model", str(tiny_source_model), "--out", str(tmp_path / "a.safetensors"), ct, ct],
         f"{ct}: given twice; give each target volume once."),
    ]
    for argv, sentence in cases:
        assert main([*argv[:1], "--progress", "none", *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().endswith(sentence) and err.count("\n") == 1, err
    assert not (tmp_path / "a.safetensors").exists()
    # a checkpoint that is no checkpoint, with --resume: named as what it should have been
    out = tmp_path / "m.safetensors"
    Path(str(out) + ".ckpt").write_text("{}", encoding="utf-8")
    assert main(["train-source", "--progress", "none", "--preset", "tiny", "--iterations", "1", "--resume",
                 "--out", str(out), str(tiny_cohort / "mr_1001_image.nii.gz")]) == 2
    assert f"{out}.ckpt: not a VAE-UDA training checkpoint (not a readable safetensors file" in capsys.readouterr().err


def test_outputs_that_would_replace_an_input_or_a_folder_are_refused_before_work(tiny_cohort, tiny_source_model,
                                                                              tmp_path, capsys):
    import shutil
    image = tmp_path / "mr_1001_image.nii.gz"
    shutil.copy(tiny_cohort / "mr_1001_image.nii.gz", image)
    shutil.copy(tiny_cohort / "mr_1001_label.nii.gz", tmp_path / "mr_1001_label.nii.gz")
    model = tmp_path / "source.safetensors"
    shutil.copy(tiny_source_model, model)
    shutil.copy(tiny_source_model, tmp_path / "src.ckpt")           # a model that is also OUT.ckpt of --out src
    (tmp_path / "map.json").write_text('{"LV-M": 205, "LA-B": 420, "LV-B": 500, "A-A": 820}')
    (tmp_path / "stale.safetensors.ckpt").write_text("an interrupted run's work")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "c.safetensors.ckpt").mkdir()
    cases = [
        (["train-source", "--preset", "tiny", "--label-convention", str(tmp_path / "map.json"),
          "--out", str(tmp_path / "map.json"), str(image)], "map.json: is also an input"),
        (["adapt", "--model", str(tmp_path / "src.ckpt"), "--out", str(tmp_path / "src"), "--resume",
          str(tiny_cohort / "ct_1001_image.nii.gz")], "src.ckpt: is also an input"),   # without --resume: "interrupted run"
        (["finetune", "--model", str(model), "--out", str(tmp_path / "c.safetensors"), str(image)],
         "c.safetensors.ckpt: is a folder"),
        (["train-source", "--preset", "tiny", "--out", str(tmp_path / "stale.safetensors"), str(image)],
         "stale.safetensors.ckpt: an interrupted run left this checkpoint; continue it with --resume, or delete it"),
        (["train-source", "--preset", "tiny", "--out", str(image), str(image)], "is also an input"),
        (["adapt", "--model", str(model), "--out", str(model), str(tiny_cohort / "ct_1001_image.nii.gz")],
         "is also an input"),
        (["finetune", "--model", str(model), "--out", str(tmp_path / "folder"), str(image)], "is a folder"),
        (["train-source", "--preset", "tiny", "--out", str(tmp_path / "a_file" / "m.safetensors"), str(image)],
         "a_file is a file"),
        (["adapt", "--model", str(model), "--out", str(tmp_path / "b.safetensors"), "--early-stop", "0",
          str(tiny_cohort / "ct_1001_image.nii.gz")], "--early-stop must be a whole number of at least 1"),
    ]
    for args, message in cases:
        assert main([*args, "--progress", "none"]) == 2
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in before), "folder", "a_file",
                                                                 "c.safetensors.ckpt"])


def test_segment_is_all_or_nothing_and_never_replaces_an_input(tiny_cohort, tiny_source_model, tmp_path, capsys,
                                                                 monkeypatch):
    import shutil
    ct = tiny_cohort / "ct_1002_image.nii.gz"
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(5, 6, sitk.sitkInt16), str(flat))
    out = tmp_path / "seg"
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none",
                 str(ct), str(flat)]) == 2
    assert "expected a 3D scalar image, found a 2D image" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["flat.nrrd"]   # no ct_1002 result, no staging
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ct, other / "ct_1002_image.nii.gz")
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none",
                 str(ct), str(other / "ct_1002_image.nii.gz")]) == 2
    assert "would write the same ct_1002_image_seg.nii.gz" in capsys.readouterr().err
    with monkeypatch.context() as here:                       # the same file, written another way
        here.chdir(tiny_cohort)
        assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none",
                     str(ct), "ct_1002_image.nii.gz"]) == 2
    assert capsys.readouterr().err.strip().endswith("ct_1002_image.nii.gz: given twice; give each input once.")
    victim = other / "ct_1002_image_seg.nii.gz"
    shutil.copy(ct, victim)
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(other), "--progress", "none",
                 str(other / "ct_1002_image.nii.gz"), str(victim)]) == 2
    assert "would replace this input" in capsys.readouterr().err
    assert victim.read_bytes() == ct.read_bytes()
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none",
                 "--batch-size", "0", str(ct)]) == 2
    assert "--batch-size must be a whole number of at least 1, not 0" in capsys.readouterr().err


def test_written_files_get_the_umask_permissions_not_private_ones(tmp_path):
    import os
    from vaeuda.fileio import atomic_path
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.json") as tmp:      # mkstemp alone would leave it 0600
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_resume_refuses_a_checkpoint_of_another_stage(tiny_cohort, tiny_source_model, tmp_path, monkeypatch):
    """A source run's checkpoint left at the path a fine-tune resumes from has the same network
    configuration; only its stage tells it apart, and resuming it would fine-tune from a half-trained
    source model."""
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=6, overrides={"checkpoint_every": 3})
    with pytest.raises(VaeudaError, match="checkpoint is of the 'source' stage, not 'finetuned'"):
        train_mod.finetune(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"],
                           [tiny_cohort / "ct_1001_label.nii.gz"], out, iterations=4, device="cpu", resume=True)
    assert not out.exists() and checkpoint_path(out).exists()


def test_early_stop_keeps_the_weights_of_the_best_proxy(tiny_cohort, tiny_source_model, tmp_path, monkeypatch):
    """With the proxy reading 3, 2, 1, 5, 5 the best is iteration 3, and two evaluations without
    improvement stop the run at 5. The saved weights are those of iteration 3, which a 3-iteration
    run reproduces; the history records the proxy as read."""
    readings = iter([3.0, 2.0, 1.0, 5.0, 5.0, 5.0])
    monkeypatch.setattr(train_mod, "target_proxy", lambda *args, **kw: next(readings))
    target = [tiny_cohort / "ct_1001_image.nii.gz"]
    stopped = train_mod.adapt(tiny_source_model, target, tmp_path / "stopped.safetensors", iterations=6,
                              device="cpu", early_stop=2, overrides={"eval_every": 1})
    assert stopped["provenance"]["early_stopped_at"] == 3 and stopped["provenance"]["iterations_done"] == 5
    assert [e["proxy"] for e in stopped["history"]] == [3.0, 2.0, 1.0, 5.0, 5.0]
    readings = iter([3.0, 2.0, 1.0])
    train_mod.adapt(tiny_source_model, target, tmp_path / "three.safetensors", iterations=3, device="cpu",
                    overrides={"eval_every": 1})
    a, b = read_tensors(tmp_path / "stopped.safetensors")[0], read_tensors(tmp_path / "three.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_scores_the_last_iteration_between_evaluations(tiny_cohort, tiny_source_model, tmp_path,
                                                                   monkeypatch):
    """Evaluating every 4 of 6 iterations, early stopping also reads the proxy at 6, and keeps it
    when it is the best: before, iterations 5 and 6 were trained and thrown away unscored (and a
    run shorter than eval_every never evaluated). Without early stopping nothing changes."""
    readings = iter([2.0, 1.0])
    monkeypatch.setattr(train_mod, "target_proxy", lambda *args, **kw: next(readings))
    target = [tiny_cohort / "ct_1001_image.nii.gz"]
    meta = train_mod.adapt(tiny_source_model, target, tmp_path / "a.safetensors", iterations=6, device="cpu",
                           early_stop=2, overrides={"eval_every": 4})
    assert [e["iteration"] for e in meta["history"]] == [4, 6]
    assert meta["provenance"]["early_stopped_at"] == 6 and meta["provenance"]["iterations_done"] == 6
    readings = iter([2.0])
    plain = train_mod.adapt(tiny_source_model, target, tmp_path / "b.safetensors", iterations=6, device="cpu",
                            overrides={"eval_every": 4})
    assert [e["iteration"] for e in plain["history"]] == [4]


class _ShiftingNet(torch.nn.Module):
    """For ``target_proxy``: the latent is the image, decoding to CT adds 0.25 and to MR doubles it.
    ``calls`` records each encoder (E) and decoder (D) with its domain."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def posterior(self, x, domain):
        self.calls.append(("E", domain))
        return x, torch.zeros_like(x)

    def decode(self, z, domain):
        self.calls.append(("D", domain))
        return z + 0.25 if domain == "target" else 2 * z


def test_target_proxy_by_hand():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 100
    net = _ShiftingNet().train()
    # x_TT = x + 0.25; x_TS = 2 x, re-encoded and rendered as CT: 2 x + 0.25, so |x_TST - x_T| = x + 0.25
    assert train_mod.target_proxy(net, x, use_cycle=False, device=torch.device("cpu")) == pytest.approx(0.25)
    assert train_mod.target_proxy(net, x, use_cycle=True, device=torch.device("cpu"), batch_size=1) == \
        pytest.approx(float(x.mean()) + 0.25)
    assert net.training                                        # the caller's mode is restored
    net.calls.clear()
    train_mod.target_proxy(net, x[:1], use_cycle=True, device=torch.device("cpu"))
    # Eq. 6's path: E_T, D_S, then x_TS encoded by E_S and rendered by D_T; without the cycle E_T, D_T
    assert net.calls == [("E", "target"), ("D", "source"), ("E", "source"), ("D", "target")]
    net.calls.clear()
    train_mod.target_proxy(net, x[:1], use_cycle=False, device=torch.device("cpu"))
    assert net.calls == [("E", "target"), ("D", "target")]
    train_mod.target_proxy(net.eval(), x, True, torch.device("cpu"))
    assert not net.training


def test_target_proxy_is_the_same_for_the_same_weights_and_draws_no_random_number(tiny_source_model):
    net, _ = load_model(tiny_source_model)
    net.copy_source_to_target()
    x = torch.randn(5, net.cfg.in_channels, net.cfg.input_size, net.cfg.input_size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    first = train_mod.target_proxy(net, x, True, torch.device("cpu"), batch_size=2)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert train_mod.target_proxy(net, x, True, torch.device("cpu"), batch_size=5) == pytest.approx(first, rel=1e-6)
    assert torch.equal(torch.rand(1), after)


def test_proxy_slices_are_all_or_evenly_spaced():
    few = torch.arange(10).float().reshape(10, 1, 1, 1)
    assert torch.equal(train_mod.proxy_slices(few), few)
    many = torch.arange(127).float().reshape(127, 1, 1, 1)
    picked = train_mod.proxy_slices(many).flatten()
    assert len(picked) == train_mod.PROXY_MAX_SLICES == 64
    # 0, 2, 4, ..., 126: 126 / 63 = 2 apart
    assert torch.equal(picked, torch.arange(0, 127, 2).float())
    # 100 slices: 99 / 63 = 11 / 7 apart, rounded to the nearest slice (never a half: sevenths),
    # not truncated: the second is slice 2 (1.57), the last 99
    uneven = train_mod.proxy_slices(torch.arange(100).float().reshape(100, 1, 1, 1)).flatten()
    assert uneven.tolist() == [float(round(i * 11 / 7)) for i in range(64)]
    assert uneven[:3].tolist() == [0.0, 2.0, 3.0] and uneven[-1] == 99


def test_a_restored_early_stopping_state_without_best_tensors_has_no_best_weights():
    """Every checkpoint keeps the early-stopping header, but best.* tensors only once a reading was
    the best: none found is "no best yet" (None, which the end of the run tests for), not an empty
    state dict that it would load as the model's weights."""
    header = {"bad_evals": 1, "best_proxy": None, "best_iteration": None}
    assert train_mod.EarlyStopState.restored(header, {}).best_weights is None
    assert train_mod.EarlyStopState.restored(header, None).best_weights is None
    kept = {"w": torch.ones(1)}
    assert train_mod.EarlyStopState.restored({**header, "best_iteration": 50}, kept).best_weights is kept


def test_resume_refuses_early_stopping_state_of_the_earlier_proxy():
    """An earlier engine's checkpoint (its header has ``proxy_ema``) is refused with or without early
    stopping: without, its history's proxy readings would sit unmarked beside this engine's."""
    for old in ({"proxy_ema": 0.41, "bad_evals": 1, "best_proxy": 0.40, "best_iteration": 100},
                {"proxy_ema": 0.41, "bad_evals": 0, "best_proxy": None}):
        with pytest.raises(VaeudaError, match="proxy readings are an earlier engine's"):
            train_mod.EarlyStopState.restored(old, None)
    assert train_mod.EarlyStopState.restored({"bad_evals": 2, "best_proxy": 0.3, "best_iteration": 50},
                                             None).bad_evals == 2


def test_a_non_finite_proxy_reading_is_never_the_best_and_is_recorded_as_null(tiny_cohort, tiny_source_model,
                                                                              tmp_path, monkeypatch):
    """Readings nan, 2, inf, 3, 3: the best is iteration 2 (nan and inf count as evaluations without
    improvement), patience 2 stops at 4; the history is JSON (null for the non-finite readings)."""
    readings = iter([float("nan"), 2.0, float("inf"), 3.0, 3.0])
    monkeypatch.setattr(train_mod, "target_proxy", lambda *args, **kw: next(readings))
    meta = train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "a.safetensors",
                           iterations=5, device="cpu", early_stop=2, overrides={"eval_every": 1})
    assert meta["provenance"]["early_stopped_at"] == 2 and meta["provenance"]["iterations_done"] == 4
    assert [e["proxy"] for e in meta["history"]] == [None, 2.0, None, 3.0]
    json.loads(json.dumps(meta["history"], allow_nan=False))


@pytest.mark.parametrize("readings, best, done", [
    ([2.0, 2.0, 2.0, 2.0], 1, 3),        # a reading equal to the best is no improvement
    ([3.0, 4.0, 2.0, 5.0, 5.0, 5.0], 3, 5),   # an improvement starts the count of bad evaluations again
])
def test_early_stopping_counts_evaluations_since_the_last_strict_improvement(tiny_cohort, tiny_source_model, tmp_path,
                                                                              monkeypatch, readings, best, done):
    """Patience 2: the run stops at the second evaluation in a row that is not below the best so far."""
    readings = iter(readings)
    monkeypatch.setattr(train_mod, "target_proxy", lambda *args, **kw: next(readings))
    meta = train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "a.safetensors",
                           iterations=6, device="cpu", early_stop=2, overrides={"eval_every": 1})
    assert (meta["provenance"]["early_stopped_at"], meta["provenance"]["iterations_done"]) == (best, done)


def test_early_stopping_reads_the_network_the_file_keeps(tiny_cohort, tiny_source_model, tmp_path, monkeypatch):
    """The proxy reads the weight average the file keeps, not the live network the optimisers step;
    with --no-cycle it is the target reconstruction error (the cycle is no term of that run)."""
    real, seen, cycles = train_mod.target_proxy, [], []

    def recording(net, images, use_cycle, *args, **kw):
        seen.append(net)
        cycles.append(use_cycle)
        return real(net, images, use_cycle, *args, **kw)
    monkeypatch.setattr(train_mod, "target_proxy", recording)
    nets = []
    train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "a.safetensors",
                    iterations=2, device="cpu", early_stop=3, overrides={"eval_every": 1},
                    callback=lambda iteration, averaged, live: nets.append((averaged, live)) and None)
    assert len(seen) == len(nets) == 2
    assert all(read is averaged and averaged is not live for read, (averaged, live) in zip(seen, nets))
    train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "b.safetensors",
                    iterations=1, device="cpu", early_stop=3, use_cycle=False, overrides={"eval_every": 1})
    assert cycles == [True, True, False]


def test_resume_refuses_a_checkpoint_of_another_early_stop_patience(tiny_cohort, tiny_source_model, tmp_path,
                                                                    monkeypatch):
    """Patience decides where a run stops and which weights it keeps: a checkpoint of a run without
    --early-stop resumed with it (or with another patience) would be neither run."""
    ct, out = [tiny_cohort / "ct_1001_image.nii.gz"], tmp_path / "a.safetensors"
    kw = dict(iterations=4, device="cpu", overrides={"eval_every": 1, "checkpoint_every": 2})
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out,
                                      run=lambda: train_mod.adapt(tiny_source_model, ct, out, **kw))
    for patience in (3, 1):
        with pytest.raises(VaeudaError, match=re.escape("checkpoint was made with a different --early-stop (none) "
                                                        "from this run")):
            train_mod.adapt(tiny_source_model, ct, out, resume=True, early_stop=patience, **kw)
    meta = train_mod.adapt(tiny_source_model, ct, out, resume=True, **kw)
    assert meta["provenance"]["early_stop"] is None and meta["provenance"]["iterations_done"] == 4


def test_adaptation_starts_the_target_networks_from_the_source_ones(tiny_source_model, tiny_cohort, tmp_path):
    """E_T and D_T start as copies of E_S and D_S; frozen (lr_scale 0) they stay those copies."""
    out = tmp_path / "a.safetensors"
    train_mod.adapt(tiny_source_model, [tiny_cohort / "ct_1001_image.nii.gz"], out, iterations=2, device="cpu",
                    overrides={"lr_scale": {"enc_t": 0, "dec_t": 0}})
    source, _ = load_model(tiny_source_model)
    adapted, meta = load_model(out)
    for target, origin in (("enc_t", "enc_s"), ("dec_t", "dec_s")):
        assert all(torch.equal(a, b) for a, b in zip(getattr(adapted, target).state_dict().values(),
                                                     getattr(source, origin).state_dict().values())), target
    assert not all(torch.equal(a, b) for a, b in zip(adapted.seg.parameters(), source.seg.parameters()))


def test_models_segment_with_the_encoder_of_their_stage():
    """Adapted models segment through E_T; source and fine-tuned ones (no target encoder) through E_S."""
    from vaeuda.predict import model_domain
    assert model_domain({"stage": "adapted", "has_target_encoder": True}) == "target"
    assert model_domain({"stage": "source", "has_target_encoder": False}) == "source"
    assert model_domain({"stage": "finetuned", "has_target_encoder": False}) == "source"


def test_intensity_remap_is_opt_in_and_only_in_the_source_stage(tiny_cohort, tmp_path, monkeypatch):
    """train-source --intensity-remap remaps every source batch of its own stage and records it;
    adaptation and fine-tuning of that model read the images as they are."""
    calls = []
    real_remap = train_mod.random_intensity_remap
    monkeypatch.setattr(train_mod, "random_intensity_remap", lambda x, gen: calls.append(x.shape) or real_remap(x, gen))
    plain, remapped, cli = (tmp_path / f"{n}.safetensors" for n in ("plain", "remapped", "cli"))
    _train(tiny_cohort, plain, iterations=3)
    assert calls == []
    _train(tiny_cohort, remapped, iterations=3, intensity_remap=True)
    assert len(calls) == 3
    ta, tb = read_tensors(plain)[0], read_tensors(remapped)[0]        # same seed: only the remap differs
    assert not torch.equal(ta["net.enc_s.net.0.1.weight"], tb["net.enc_s.net.0.1.weight"])
    ct = [tiny_cohort / "ct_1001_image.nii.gz"]
    train_mod.adapt(remapped, ct, tmp_path / "a.safetensors", iterations=2, device="cpu")
    train_mod.finetune(remapped, ct, [tiny_cohort / "ct_1001_label.nii.gz"], tmp_path / "f.safetensors",
                       iterations=2, device="cpu")
    assert len(calls) == 3
    assert main(["train-source", "--preset", "tiny", "--iterations", "1", "--device", "cpu", "--progress", "none",
                 "--intensity-remap", "--out", str(cli), str(tiny_cohort / "mr_1001_image.nii.gz")]) == 0
    flags = [load_model(tmp_path / f"{n}.safetensors")[1]["train"]["intensity_remap"]
             for n in ("plain", "remapped", "a", "f", "cli")]
    assert flags == [False, True, False, False, True]


def test_quick_demo_with_intensity_remap_says_so_and_remaps_only_the_source_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--intensity-remap", "--out", str(out), "--progress", "none"]) == 0
    assert "trained with `--intensity-remap`" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["intensity_remap"] is True
    assert "trained with `--intensity-remap`" in (out / "report.md").read_text()
    flags = {n: load_model(out / "models" / f"{n}.safetensors")[1]["train"]["intensity_remap"]
             for n in ("source", "adapted", "oracle")}
    assert flags == {"source": True, "adapted": False, "oracle": False}


def test_adapt_passes_each_ablation_switch_and_option_through_unchanged(tiny_cohort, tmp_path, monkeypatch):
    """`vaeuda adapt` flags -> train.adapt arguments: each switch turns off its own term only, --slices
    is the half-open coronal range, --ema-decay the one override, --source-data the given files."""
    from vaeuda import train as train_mod
    calls = []
    monkeypatch.setattr(train_mod, "adapt", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    common = ["adapt", "--model", "m.safetensors", "--out", str(tmp_path / "a.safetensors"), "--progress", "none"]
    assert main(common + [ct]) == 0
    assert main(common + ["--source-data", str(tiny_cohort / "mr_1001_image.nii.gz"), "--no-kl", "--no-cycle",
                          "--slices", "2:5", "--ema-decay", "0", ct]) == 0
    assert main(common + ["--no-adv", "--no-task-consistency", "--early-stop", "4", "--iterations", "7", "--batch-size",
                          "3", "--seed", "9", "--device", "cpu", "--resume", ct]) == 0
    (args, plain), (_, switched), (_, others) = calls
    assert args[0] == "m.safetensors" and [str(p) for p in args[1]] == [ct]
    flags = ("use_kl", "use_adv", "use_cycle", "use_task")
    assert [plain[f] for f in flags] == [True, True, True, True]
    assert plain["slice_range"] is None and plain["overrides"] is None and not plain["source_data"]
    assert [switched[f] for f in flags] == [False, True, False, True]
    assert switched["slice_range"] == (2, 5) and switched["overrides"] == {"ema_decay": 0.0}
    assert switched["source_data"] == [str(tiny_cohort / "mr_1001_image.nii.gz")]
    assert [others[f] for f in flags] == [True, False, True, False]
    counts = ("early_stop", "iterations", "batch_size", "seed", "device", "resume")
    assert [plain[k] for k in counts] == [None, None, None, 0, "auto", False]
    assert [others[k] for k in counts] == [4, 7, 3, 9, "cpu", True]


def test_each_commands_options_reach_the_engine_unchanged(tiny_cohort, tmp_path, monkeypatch):
    """The values given on the command line are the ones the engine's functions receive (a dropped
    keyword would silently run the function's default)."""
    from vaeuda import demo, experiment, predict
    calls = {}

    def record(name):
        return lambda *args, **kwargs: calls.__setitem__(name, (args, kwargs)) or []
    for module, name in ((train_mod, "train_source"), (train_mod, "finetune"), (predict, "segment_files"),
                         (demo, "run_demo"), (experiment, "run_table1")):
        monkeypatch.setattr(module, name, record(name))
    mr, ct = str(tiny_cohort / "mr_1001_image.nii.gz"), str(tiny_cohort / "ct_1001_image.nii.gz")
    quiet = ["--progress", "none"]
    assert main(["train-source", mr, "--out", str(tmp_path / "s.safetensors"), "--preset", "tiny", "--iterations", "7",
                 "--batch-size", "3", "--seed", "9", "--device", "cpu", "--input-size", "48", "--intensity-remap",
                 "--label-convention", "consecutive"] + quiet) == 0
    _, kw = calls["train_source"]
    assert {k: kw[k] for k in ("preset", "iterations", "batch_size", "seed", "device", "resume", "input_size",
                               "intensity_remap")} == dict(preset="tiny", iterations=7, batch_size=3, seed=9,
                                                           device="cpu", resume=False, input_size=48,
                                                           intensity_remap=True)
    assert kw["convention"].name == "consecutive"
    assert main(["finetune", ct, "--model", "m.safetensors", "--out", str(tmp_path / "f.safetensors"), "--iterations",
                 "5", "--batch-size", "2", "--seed", "4", "--device", "cpu"] + quiet) == 0
    args, kw = calls["finetune"]
    assert args[0] == "m.safetensors" and [str(p) for p in args[1]] == [ct]
    assert [str(p) for p in args[2]] == [str(tiny_cohort / "ct_1001_label.nii.gz")]
    assert {k: kw[k] for k in ("iterations", "batch_size", "seed", "device", "resume")} == dict(
        iterations=5, batch_size=2, seed=4, device="cpu", resume=False)
    for extra, expected in (([], dict(batch_size=16, domain=None, cpu_bf16=False, device="auto")),
                            (["--batch-size", "4", "--domain", "source", "--cpu-bf16", "--device", "cpu"],
                             dict(batch_size=4, domain="source", cpu_bf16=True, device="cpu"))):
        assert main(["segment", ct, "--model", "m.safetensors", "--out", str(tmp_path / "seg")] + extra + quiet) == 0
        assert {k: calls["segment_files"][1][k] for k in expected} == expected
    assert main(["demo", "--quick", "--seed", "5", "--device", "cpu", "--intensity-remap", "--out",
                 str(tmp_path / "d")] + quiet) == 0
    args, kw = calls["run_demo"]
    assert args == (str(tmp_path / "d"),) and kw == dict(quick=True, seed=5, device="cpu", reporter=kw["reporter"],
                                                         intensity_remap=True)
    assert main(["experiment", "table1", "--data", "c", "--out", "o", "--repeats", "2", "--preset", "tiny", "--seed",
                 "4", "--device", "cpu", "--iterations-scale", "0.5"] + quiet) == 0
    args, kw = calls["run_table1"]
    assert args == ("c", "o") and kw == dict(repeats=2, preset="tiny", seed=4, device="cpu", iterations_scale=0.5,
                                             reporter=kw["reporter"])


def test_the_stages_hand_the_loop_their_switches_and_the_source_models_class_weights(tiny_cohort, tiny_source_model,
                                                                                     tmp_path, monkeypatch):
    """adapt: each switch reaches its own TrainConfig field; adapt and finetune keep the class weights
    the source model was trained with (not recomputed from their own labels: here other scans' ones),
    and train_source keeps class weights given as an option."""
    configs = []
    monkeypatch.setattr(train_mod, "run_stage", lambda net, stage, cfg, *args, **kw: configs.append(cfg) or {})
    ct, mr2 = tiny_cohort / "ct_1001_image.nii.gz", tiny_cohort / "mr_1002_image.nii.gz"
    flags = ("use_kl", "use_adv", "use_cycle", "use_task")
    for switches in ((False, True, False, True), (True, False, True, False)):
        train_mod.adapt(tiny_source_model, [ct], tmp_path / "a.safetensors", device="cpu", source_data=[str(mr2)],
                        **dict(zip(flags, switches)))
    train_mod.finetune(tiny_source_model, [ct], [tiny_cohort / "ct_1001_label.nii.gz"], tmp_path / "f.safetensors",
                       device="cpu")
    _train(tiny_cohort, tmp_path / "s.safetensors", overrides={"class_weights": (0.5, 1.0, 1.5, 2.0, 2.5)})
    assert [tuple(getattr(cfg, f) for f in flags) for cfg in configs[:2]] == [(False, True, False, True),
                                                                             (True, False, True, False)]
    recorded = tuple(load_model(tiny_source_model)[1]["train"]["class_weights"])
    mr2_labels = train_mod.load_slices([mr2], 32, None, load_model(tiny_source_model)[1]["normalisation"],
                                       [tiny_cohort / "mr_1002_label.nii.gz"]).labels
    assert train_mod.class_weights_from(mr2_labels) != recorded          # so a recomputation would show
    assert [cfg.class_weights for cfg in configs] == [recorded, recorded, recorded, (0.5, 1.0, 1.5, 2.0, 2.5)]


def test_without_a_preset_a_run_without_a_gpu_takes_the_cpu_preset(tiny_cohort, tmp_path, monkeypatch):
    """The paper preset is for a CUDA GPU; on the CPU (here --device cpu) no --preset means 'cpu'."""
    stages = []
    monkeypatch.setattr(train_mod, "run_stage", lambda net, stage, *args, **kw: stages.append((net, stage)) or {})
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"],
                 tmp_path / "m.safetensors", device="cpu")
    ((net, stage),) = stages
    assert stage.meta["preset"] == "cpu" and net.cfg == get_preset("cpu")


def test_adapt_refuses_a_label_map_as_target_before_reading_the_source_volumes(tiny_cohort, tiny_source_model,
                                                                               tmp_path, capsys, monkeypatch):
    read = []
    real = train_mod.load_slices
    monkeypatch.setattr(train_mod, "load_slices", lambda images, *a, **k: read.append(images) or real(images, *a, **k))
    label = tiny_cohort / "ct_1001_label.nii.gz"
    out = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(tiny_source_model), "--out", str(out), "--iterations", "1",
                 "--progress", "none", str(label)]) == 2
    assert f"{label}: is a label map" in capsys.readouterr().err
    assert read == [[label]] and not out.exists()


def test_adapt_refuses_a_target_that_is_also_a_labelled_source_volume(tiny_cohort, tiny_source_model, tmp_path,
                                                                      capsys):
    """--source-data a folder that holds the target with its label too (here a copy of the cohort's scans)."""
    import shutil
    out = tmp_path / "adapted.safetensors"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("mr_1001_image.nii.gz", "mr_1001_label.nii.gz", "ct_1001_image.nii.gz", "ct_1001_label.nii.gz"):
        shutil.copy(tiny_cohort / name, mixed / name)
    ct = tiny_cohort / "ct_1001_image.nii.gz"
    assert main(["adapt", "--model", str(tiny_source_model), "--out", str(out), "--iterations", "1",
                 "--progress", "none", str(mixed / ct.name), "--source-data", str(mixed)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{mixed / ct.name}: is also one of the labelled source volumes, so adapting would train on its labels; give "
        f"source volumes without it (--source-data).") and not out.exists()
    # a target among several, not only the first, is checked
    assert main(["adapt", "--model", str(tiny_source_model), "--out", str(out), "--iterations", "1",
                 "--progress", "none", str(ct), str(mixed / ct.name), "--source-data", str(mixed)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{mixed / ct.name}: is also one of the labelled source volumes, so adapting would train on its labels; give "
        f"source volumes without it (--source-data).") and not out.exists()


def test_a_synthetic_cohorts_folder_is_refused_where_labelled_training_volumes_are_wanted(tiny_cohort,
                                                                                         tiny_source_model, tmp_path,
                                                                                         capsys):
    """Given whole, a cohort's folder would train on the labels of both modalities and of the test scans:
    train-source, --source-data and finetune each refuse it and name the scans the cohort means for them."""
    out = tmp_path / "m.safetensors"
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    commands = {"mr": [["train-source", "--preset", "tiny", "--iterations", "1", str(tiny_cohort)],
                       ["adapt", "--model", str(tiny_source_model), "--iterations", "1", ct,
                        "--source-data", str(tiny_cohort)]],
                "ct": [["finetune", "--model", str(tiny_source_model), "--iterations", "1", str(tiny_cohort)]]}
    purposes = {"mr": "a source model is trained on its MR training scans",
                "ct": "the oracle is fine-tuned on its CT training scans"}
    for modality, runs in commands.items():
        for args in runs:
            assert main(args + ["--out", str(out), "--progress", "none"]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"vaeuda: error: {tiny_cohort}: is a cohort's folder, whose labelled MR and CT scans, "
                f"training and test alike, would all be trained on; {purposes[modality]}: give those files "
                f"({tiny_cohort / (modality + '_1001_image.nii.gz')}, splits.json's \"{modality}\" -> \"train\"), "
                f"or a folder holding only them.")
            assert not out.exists()
    # a cohort of several training scans names the first and the last; a folder holding only them is taken
    from vaeuda.data import SOURCE_TRAINING, _refuse_cohort_folder
    (tmp_path / "splits.json").write_text(json.dumps({"mr": {"train": ["mr_1001", "mr_1002", "mr_1003"]}, "ct": {}}))
    (tmp_path / "mr_1004_image.nii.gz").write_bytes(b"")          # a scan it does not list as MR training
    with pytest.raises(VaeudaError, match=re.escape(
            f"({tmp_path / 'mr_1001_image.nii.gz'} to {tmp_path / 'mr_1003_image.nii.gz'}, the 3 in splits.json's")):
        _refuse_cohort_folder(tmp_path, SOURCE_TRAINING)
    (tmp_path / "mr_1004_image.nii.gz").unlink()
    for name in ("mr_1001_image.nii.gz", "mr_1001_label.nii.gz", "mr_1003_image.nii.gz"):
        (tmp_path / name).write_bytes(b"")                         # only MR training scans (and labels): taken
    _refuse_cohort_folder(tmp_path, SOURCE_TRAINING)
    (tmp_path / "splits.json").write_text("{not json")           # not a cohort's splits.json: no refusal
    (tmp_path / "ct_1001_image.nii.gz").write_bytes(b"")
    _refuse_cohort_folder(tmp_path, SOURCE_TRAINING)


def _source_model_on_a_copy(cohort, tmp_path):
    """(a folder holding a copy of the cohort's mr_1001 image and label, a tiny source model trained on it)."""
    import shutil
    folder = tmp_path / "mr"
    folder.mkdir()
    for name in ("mr_1001_image.nii.gz", "mr_1001_label.nii.gz"):
        shutil.copy(cohort / name, folder / name)
    src = tmp_path / "source.safetensors"
    assert main(["train-source", "--preset", "tiny", "--iterations", "2", "--out", str(src), "--progress", "none",
                 "--device", "cpu", str(folder)]) == 0
    return folder, src


def test_adapt_names_the_way_out_when_the_source_volumes_have_moved(tiny_cohort, tmp_path, capsys):
    """The model records where its MR volumes were; moved, adaptation asks for --source-data in one
    sentence, and with it adaptation runs."""
    import shutil
    moved, src = _source_model_on_a_copy(tiny_cohort, tmp_path)
    shutil.rmtree(moved)
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    out = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(src), "--out", str(out), "--iterations", "1", "--progress", "none", ct]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"2 of the 2 labelled source files it was trained on are not at their recorded paths "
                            f"(the first: {(moved / 'mr_1001_image.nii.gz').resolve()}); pass the volumes with "
                            f"--source-data.") and not out.exists()
    assert main(["adapt", "--source-data", str(tiny_cohort / "mr_1001_image.nii.gz"), "--model", str(src),
                 "--out", str(out), "--iterations", "1", "--progress", "none", ct]) == 0
    assert out.is_file()


def test_adapt_notes_source_volumes_changed_since_training(tiny_cohort, tmp_path, capsys):
    """The model records a SHA-256 per source file; a file changed since (a cohort made again in its
    folder) is named in a note, and adaptation goes on with the files as they are."""
    from vaeuda.fileio import file_sha256
    mr, src = _source_model_on_a_copy(tiny_cohort, tmp_path)
    assert load_model(src)[1]["provenance"]["source_sha256"] == [file_sha256(mr / "mr_1001_image.nii.gz"),
                                                                 file_sha256(mr / "mr_1001_label.nii.gz")]
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    adapt = ["adapt", "--model", str(src), "--iterations", "1", "--progress", "none", "--device", "cpu", ct]
    assert main(adapt + ["--out", str(tmp_path / "a1.safetensors")]) == 0
    assert "have changed since" not in capsys.readouterr().err
    label = sitk.ReadImage(str(mr / "mr_1001_label.nii.gz"))                            # the label edited
    array = sitk.GetArrayFromImage(label)
    array[array == 205] = 0                                                            # LV-M erased
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(label)
    sitk.WriteImage(edited, str(mr / "mr_1001_label.nii.gz"))
    assert main(adapt + ["--out", str(tmp_path / "a2.safetensors")]) == 0
    assert (f"note: 1 of the 2 labelled source files {src} was trained on have changed since (the first: "
            f"{(mr / 'mr_1001_label.nii.gz').resolve()}); adapting trains on them as they are now"
            in capsys.readouterr().err.splitlines())


def test_cuda_without_a_gpu_and_an_interrupt_each_end_in_one_sentence(tiny_cohort, tmp_path, capsys, monkeypatch):
    """--device cuda on a machine without CUDA: exit 2 and the sentence; Ctrl-C: exit 130, "interrupted",
    and no output file."""
    import torch
    from vaeuda import train as train_mod
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "m.safetensors"
    args = ["train-source", "--preset", "tiny", "--iterations", "1", "--out", str(out), "--progress", "none",
            str(tiny_cohort / "mr_1001_image.nii.gz")]
    assert main(args + ["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--device cuda was asked for, but no CUDA GPU is available to PyTorch.")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "run_stage", interrupted)
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "vaeuda: interrupted; no checkpoint had been written yet") and not out.exists()
    json_args = [a if a != "none" else "json" for a in args]       # --progress json: a last event says so too
    assert main(json_args) == 130
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "event": "interrupted", "message": "interrupted; no checkpoint had been written yet", "checkpoint": None}
    monkeypatch.setattr("vaeuda.modelfile.read_tensors", interrupted)     # not a training command: nothing to add
    assert main(["info", str(tmp_path / "none.safetensors")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vaeuda: interrupted"


def test_an_interrupt_names_the_kept_checkpoint_and_resume_says_when_there_is_none(tiny_cohort, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "m.safetensors"

    def train(model):
        return ["train-source", "--preset", "tiny", "--iterations", "4", "--out", str(model), "--progress", "none",
                "--device", "cpu", str(tiny_cohort / "mr_1001_image.nii.gz")]
    args = train(out)
    real_save = train_mod.save_checkpoint

    def interrupt_after_checkpoint(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setitem(train_mod.PRESET_TRAINING, "tiny",
                        {**train_mod.PRESET_TRAINING.get("tiny", {}), "checkpoint_every": 2})
    with monkeypatch.context() as patched:
        patched.setattr(train_mod, "save_checkpoint", interrupt_after_checkpoint)
        assert main(args) == 130
    ckpt = checkpoint_path(out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"vaeuda: interrupted; the last checkpoint is kept at {ckpt}: give the same command with --resume to continue")
    assert ckpt.is_file() and not out.exists()
    with monkeypatch.context() as patched:      # resumed under --progress json, interrupted again: the event names it
        patched.setattr(train_mod, "run_stage", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args + ["--resume", "--progress", "json"]) == 130
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (event["event"], event["checkpoint"]) == ("interrupted", str(ckpt)) and str(ckpt) in event["message"]
    assert ckpt.is_file() and not out.exists()
    assert main(args + ["--resume"]) == 0
    assert "resuming source from iteration 2" in capsys.readouterr().err

    fresh = tmp_path / "fresh.safetensors"
    assert main(train(fresh) + ["--resume"]) == 0
    assert (f"note: no checkpoint at {checkpoint_path(fresh)} to resume; training from the first iteration"
            in capsys.readouterr().err) and fresh.is_file()


def test_an_interrupted_adaptation_or_fine_tuning_says_whether_a_checkpoint_is_kept(tiny_cohort, tiny_source_model,
                                                                                   tmp_path, capsys, monkeypatch):
    """Every training command, not only train-source, ends Ctrl-C with where its checkpoint is (here:
    none written yet), so that the user knows whether --resume has something to continue."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "run_stage", interrupted)
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    for command in ("adapt", "finetune"):
        out = tmp_path / f"{command}.safetensors"
        assert main([command, ct, "--model", str(tiny_source_model), "--out", str(out), "--iterations", "1",
                     "--device", "cpu", "--progress", "none"]) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "vaeuda: interrupted; no checkpoint had been written yet"), command
        assert not out.exists()


def test_segment_refuses_a_folder_where_a_segmentation_would_go(tiny_cohort, tiny_source_model, tmp_path, capsys):
    out = tmp_path / "seg"
    (out / "ct_1001_image_seg.nii.gz").mkdir(parents=True)
    ct = tiny_cohort / "ct_1001_image.nii.gz"
    assert main(["segment", "--model", str(tiny_source_model), "--out", str(out), "--progress", "none", str(ct)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"ct_1001_image_seg.nii.gz: is a folder where the segmentation of {ct} would go.")
    assert sorted(p.name for p in out.iterdir()) == ["ct_1001_image_seg.nii.gz"]


def test_an_unknown_device_is_refused_in_one_sentence():
    from vaeuda.train import resolve_device
    with pytest.raises(VaeudaError, match=r"^--device must be one of auto, cpu, cuda, not 'gpu'\.$"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_synth_defaults_and_size_range_are_the_phantoms():
    """The command line writes them out (importing phantom would load SimpleITK for --help)."""
    from vaeuda import phantom
    from vaeuda.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["synth", "out"])
    assert (args.n_source, args.n_target, args.n_train) == (phantom.N_SOURCE, phantom.N_TARGET, phantom.N_TRAIN)
    synth = next(a for a in parser._subparsers._group_actions[0].choices["synth"]._actions if a.dest == "size")
    assert f"{phantom.MIN_SIZE} to {phantom.MAX_SIZE}" in synth.help


def test_synth_passes_its_options_and_its_done_event_names_the_splits_file(tmp_path, monkeypatch, capsys):
    """The cohort's record, splits.json, is the output a JSON reader (Slicer) is told of."""
    from vaeuda import phantom
    calls = []
    monkeypatch.setattr(phantom, "make_cohort", lambda out, **kwargs: calls.append((out, kwargs)))
    out = str(tmp_path / "cohort")
    assert main(["synth", out, "--n-source", "3", "--n-target", "4", "--n-train", "2", "--seed", "5", "--size", "32",
                 "--progress", "json"]) == 0
    assert calls == [(out, dict(n_source=3, n_target=4, n_train=2, seed=5, size=32, reporter=calls[0][1]["reporter"]))]
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"event": "done",
                                                                  "outputs": [str(tmp_path / "cohort" / "splits.json")]}


def test_every_argument_of_every_command_says_what_it_is():
    """`vaeuda CMD --help` explains each option and positional (argparse shows none for those without)."""
    import argparse
    from vaeuda.cli import build_parser

    def parsers(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, f"{path} {name}")

    silent = [f"{path}: {action.option_strings or action.dest}"
              for path, parser in parsers(build_parser(), "vaeuda") for action in parser._actions
              if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert silent == []


def test_adapting_or_fine_tuning_a_model_that_is_not_a_source_model_says_what_it_does(tiny_cohort, tiny_source_model,
                                                                                     tmp_path, capsys):
    ct = str(tiny_cohort / "ct_1001_image.nii.gz")
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(tiny_source_model), "--out", str(adapted), "--iterations", "1",
                 "--progress", "none", ct]) == 0
    capsys.readouterr()
    assert main(["finetune", "--model", str(adapted), "--out", str(tmp_path / "oracle.safetensors"),
                 "--iterations", "1", "--progress", "none", ct]) == 0
    assert (f"note: {adapted} is not a source model (its stage: 'adapted'); fine-tuning its source path (E_S, E_Z, "
            f"D_Z, D_S, Seg) anyway: the result segments with the source encoder") in capsys.readouterr().err
    assert main(["adapt", "--model", str(adapted), "--out", str(tmp_path / "again.safetensors"), "--iterations", "1",
                 "--progress", "none", ct]) == 0
    assert f"note: {adapted} is not a source model (its stage: 'adapted'); adapting" in capsys.readouterr().err
    label = str(tiny_cohort / "ct_1001_label.nii.gz")      # a wrong target is refused alone, before the note
    assert main(["adapt", "--model", str(adapted), "--out", str(tmp_path / "third.safetensors"), "--iterations", "1",
                 "--progress", "none", label]) == 2
    err = capsys.readouterr().err
    assert "is a label map" in err and "is not a source model" not in err


def test_an_os_error_no_check_foresaw_is_one_sentence_and_leaves_nothing(tiny_cohort, tmp_path, capsys, monkeypatch):
    """An OS refusal met during the run (here a name too long, as a 252-byte model name met it for its
    checkpoint before the checks counted the checkpoint's and temporary names): the OS's reason in one
    sentence, status 2, nothing written (before: a traceback and status 1)."""
    import errno
    out = tmp_path / ("m" * 200 + ".safetensors")

    def refused(path, *args, **kwargs):
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
    monkeypatch.setattr(train_mod, "save_model", refused)
    code = main(["train-source", "--preset", "tiny", "--iterations", "1", "--out", str(out), "--progress", "json",
                 str(tiny_cohort / "mr_1001_image.nii.gz")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == f"vaeuda: error: {out}: File name too long."
    last = json.loads(captured.out.splitlines()[-1])
    assert last == {"event": "error", "message": f"{out}: File name too long."}
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_the_work(tiny_cohort, tmp_path, capsys):
    """A 247-byte model name is legal, but it is written under a name 15 bytes longer first (and its
    checkpoint's is 5 longer still): refused before training, not after."""
    out = tmp_path / ("m" * 235 + ".safetensors")
    code = main(["train-source", "--preset", "tiny", "--iterations", "1", "--out", str(out), "--progress", "none",
                 str(tiny_cohort / "mr_1001_image.nii.gz")])
    assert code == 2
    assert capsys.readouterr().err == (f"vaeuda: error: {out}: its name is 247 bytes; an output's may have at most 240 "
                                       f"(file systems allow 255, and it is written under a longer temporary name "
                                       f"first); give a shorter name.\n")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_other_files_is_not_asked_for_a_label_name(tmp_path, capsys):
    """A folder without volume files reads as one DICOM series; a training command says that it has no
    label, and names --labels only where the command has it."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("scans to come")
    from vaeuda.data import find_pairs
    with pytest.raises(VaeudaError, match=re.escape(f"{folder}: folder holds no image volumes with labels (X_image "
                                                    f"beside X_label); its other files, read as one DICOM series, "
                                                    f"have no label file: pass one with --labels.")):
        find_pairs([str(folder)])
    with pytest.raises(VaeudaError, match=r"have no label file\.$"):
        find_pairs([str(folder)], labels_option=False)


def test_training_on_labels_without_a_structure_is_refused(tiny_cohort, tmp_path):
    """All-background label maps would train a model that says 'background' everywhere, with status 0."""
    label = sitk.ReadImage(str(tiny_cohort / "mr_1001_label.nii.gz")) * 0
    empty = tmp_path / "empty_label.nii.gz"
    sitk.WriteImage(label, str(empty))
    out = tmp_path / "m.safetensors"
    with pytest.raises(VaeudaError, match=re.escape("none of the 1 label file holds a structure of the 'mmwhs' label "
                                                    "convention in the slices the model reads")):
        train_source([tiny_cohort / "mr_1001_image.nii.gz"], [empty], out, preset="tiny", iterations=1, device="cpu")
    assert not out.exists()


def test_one_pixel_of_the_first_structure_is_enough_to_train_on():
    """Any label above 0 is a structure (class 1 included); the refusal counts its label files."""
    from vaeuda.data import SliceSet
    from vaeuda.labels import MMWHS
    labels = torch.zeros(2, 4, 4, dtype=torch.uint8)
    data = SliceSet(torch.zeros(2, 3, 4, 4), labels, torch.zeros(2, dtype=torch.int32), ["a_label.nii.gz", "b_label.nii.gz"])
    with pytest.raises(VaeudaError, match=re.escape("none of the 2 label files holds a structure of the 'mmwhs' label "
                                                    "convention in the slices the model reads")):
        train_mod.require_structures(data, MMWHS)
    labels[1, 2, 3] = 1
    train_mod.require_structures(data, MMWHS)


def test_an_os_error_that_is_no_refusal_of_the_users_paths_stays_a_traceback(monkeypatch):
    """Only the OS's refusals (permissions, names, space) become one sentence: any other OSError is a
    bug to be seen whole."""
    import errno
    import vaeuda.cli as cli

    def broken(args, reporter):
        raise OSError(errno.EBADF, "Bad file descriptor", "/dev/fd/99")
    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["info", "x.safetensors", "--progress", "none"])


def _drop_first(tensors, prefix, key):
    name = next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(key))
    del tensors[name]


def _n_generator_parameters():
    from vaeuda.nets import VAEUDANet
    net = VAEUDANet(get_preset("tiny"))
    return sum(1 for name in train_mod.GENERATOR_NETS for _ in getattr(net, name).parameters())


@pytest.mark.parametrize("edit, message", [
    (lambda t, s: s.update(iteration=-5), "not a training checkpoint (its training state is missing or damaged)"),
    (lambda t, s: s.update(iteration=True), "not a training checkpoint (its training state is missing or damaged)"),
    (lambda t, s: s.update(history="abc"), "not a training checkpoint (its training state is missing or damaged)"),
    (lambda t, s: t.update({"rng.gen": t["rng.gen"][:100].clone()}),
     "checkpoint is damaged (its random generator state is not one)"),
    (lambda t, s: t.update({"optim.gen.abc": torch.zeros(1)}),
     "checkpoint is damaged (its optimiser state holds optim.gen.abc, which no parameter of this run has)"),
    # the first index past the generators' parameters (0-based): an IndexError's traceback, were it let through
    (lambda t, s: t.update({f"optim.gen.{_n_generator_parameters()}.step": torch.tensor(1.0)}),
     "checkpoint is damaged (its optimiser state holds optim.gen.{n}.step, which no parameter of this run has)"),
    (lambda t, s: t.update({next(k for k in sorted(t) if k.startswith("optim.gen.") and k.endswith("exp_avg")):
                            torch.zeros(3, 3)}), "checkpoint is damaged (its optimiser state for optim.gen."),
    (lambda t, s: _drop_first(t, "optim.gen.", ".exp_avg_sq"), "checkpoint is damaged (its optimiser state for"),
    (lambda t, s: t.update({k: v.double() for k, v in t.items() if k.startswith("optim.gen.") and k.endswith(".exp_avg")}),
     "checkpoint is damaged (its optimiser state for optim.gen."),
    (lambda t, s: [t.pop(k) for k in [k for k in t if k.startswith("optim.disc.")]],
     "checkpoint is damaged (it holds no state of the disc optimiser, which iteration 2 had)"),
    (lambda t, s: t.update({"net.seg.head.bias": torch.full_like(t["net.seg.head.bias"], float("nan"))}),
     "model weights hold NaN or infinite values (e.g. seg.head.bias)"),
    (lambda t, s: t.update({"net.seg.head.bias": t["net.seg.head.bias"].half()}),
     "model weights do not fit its configuration (1 tensor(s) missing, extra or of another shape or type"),
])
def test_resume_refuses_a_damaged_checkpoint_in_one_sentence(tiny_cohort, tmp_path, monkeypatch, edit, message):
    """Edited with a valid checksum: tracebacks from torch's generator, Adam's first step or the weight
    average's loading; a negative iteration or no optimiser state resumed silently as another run; a NaN
    weight was blamed on the training, the damaged checkpoint called the last good one."""
    from vaeuda.modelfile import save_tensors
    overrides = {"checkpoint_every": 2}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    ckpt = checkpoint_path(out)
    tensors, meta, header = read_tensors(ckpt, what="training checkpoint")
    state = json.loads(header["train_state"])
    edit(tensors, state)
    save_tensors(ckpt, tensors, meta, {"train_state": json.dumps(state)})
    before = ckpt.read_bytes()
    message = message.replace("{n}", str(_n_generator_parameters()))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(ckpt))}: {re.escape(message)}"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)
    assert ckpt.read_bytes() == before and not out.exists()


def test_resume_refuses_a_checkpoint_without_the_weight_average_its_run_kept(tiny_cohort, tmp_path, monkeypatch):
    """A checkpoint of a run with ema_decay whose ema.* tensors are gone (edited, checksum valid) is
    named for what it lacks."""
    from vaeuda.modelfile import save_tensors
    overrides = {"checkpoint_every": 2, "ema_decay": 0.5}
    out = tmp_path / "m.safetensors"
    _interrupt_after_first_checkpoint(monkeypatch, tiny_cohort, out, iterations=4, overrides=overrides)
    ckpt = checkpoint_path(out)
    tensors, meta, header = read_tensors(ckpt, what="training checkpoint")
    save_tensors(ckpt, {k: v for k, v in tensors.items() if not k.startswith("ema.")}, meta,
                 {"train_state": header["train_state"]})
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(ckpt))}: checkpoint has no weight average, but this run "
                                          r"keeps one \(ema_decay\)\.$"):
        _train(tiny_cohort, out, iterations=4, overrides=overrides, resume=True)


def test_a_refused_model_output_says_one_thing_not_notes_first(tiny_cohort, tiny_source_model, tmp_path, capsys):
    """--out an input found only by pairing (the image's X_label twin), with --resume and no .safetensors
    name: the refusal alone, not two notes on a file that is never written."""
    image = tmp_path / "ct_1001_image.nii.gz"
    label = tmp_path / "ct_1001_label.nii.gz"
    for name in (image.name, label.name):
        (tmp_path / name).write_bytes((tiny_cohort / name).read_bytes())
    before = label.read_bytes()
    capsys.readouterr()
    assert main(["finetune", str(image), "--model", str(tiny_source_model), "--out", str(label), "--resume",
                 "--iterations", "1", "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vaeuda: error: {label}: is also an input, which is never overwritten; choose another output."]
    assert label.read_bytes() == before


def test_running_out_of_memory_is_one_sentence_with_a_remedy(monkeypatch, tmp_path, capsys):
    """torch's CPU allocator raises RuntimeError('... DefaultCPUAllocator: can't allocate memory: you tried to
    allocate 25769803776 bytes ...'): it had reached the user as a traceback, with no JSON event."""
    import signal
    from vaeuda import cli
    handler = signal.getsignal(signal.SIGTERM)

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25769803776 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(cli, "run", allocate)
    assert main(["segment", "x", "--model", "m", "--out", "o", "--progress", "json"]) == 2
    out, err = capsys.readouterr()
    sentence = "out of memory (24 GiB could not be allocated): try a smaller --batch-size, or a machine with more memory."
    assert json.loads(out.strip().splitlines()[-1]) == {"event": "error", "message": sentence}
    assert err.strip() == f"vaeuda: error: {sentence}"
    def allocate_on_windows(*args, **kwargs):     # torch's Windows wording (alloc_cpu.cpp, _MSC_VER)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 25769803776 bytes.")
    monkeypatch.setattr(cli, "run", allocate_on_windows)
    assert main(["segment", "x", "--model", "m", "--out", "o", "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == f"vaeuda: error: {sentence}"
    monkeypatch.setattr(cli, "run", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert main(["synth", str(tmp_path / "c"), "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == ("vaeuda: error: out of memory (a buffer could not be allocated): try a "
                                              "machine with more memory.")
    monkeypatch.setattr(cli, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):       # any other RuntimeError is a bug: seen whole
        main(["synth", str(tmp_path / "c"), "--progress", "none"])
    assert signal.getsignal(signal.SIGTERM) is handler          # main() gives the caller's SIGTERM handler back


def test_out_of_memory_on_the_gpu_or_without_a_size_is_one_sentence_too(monkeypatch, capsys):
    """torch's CUDA allocator says "CUDA out of memory. Tried to allocate 2.00 GiB ..." (its error type
    OutOfMemoryError): the sentence says the GPU ran out; an allocation error naming no size still gets
    one; train-source's remedy names its own options."""
    from vaeuda import cli

    class OutOfMemoryError(RuntimeError):       # torch.cuda.OutOfMemoryError's name, whatever the torch build
        pass
    for error, command, sentence in (
            (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"),
             ["segment", "x", "--model", "m", "--out", "o"],
             "out of memory (2.00 GiB could not be allocated on the GPU): try a smaller --batch-size, or a machine "
             "with more memory."),
            (OutOfMemoryError("the allocator gave up"), ["train-source", "x", "--out", "m.safetensors"],
             "out of memory (an allocation failed): try a smaller --batch-size or --input-size, or the cpu preset, "
             "or a machine with more memory.")):
        monkeypatch.setattr(cli, "run", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        assert main(command + ["--progress", "none"]) == 2
        assert capsys.readouterr() == ("", f"vaeuda: error: {sentence}\n")      # no JSON event without json mode


def test_sigterm_before_the_command_runs_ends_with_143(monkeypatch, capsys):
    """A SIGTERM while the command line is parsed or torch imported (before the run reports anything)
    ends as one during the run does: the sentence and 128 + 15."""
    def terminated(argv):
        raise cli_mod._Terminated()
    monkeypatch.setattr(cli_mod, "_main", terminated)
    assert main(["numerics"]) == 143
    assert capsys.readouterr().err.strip() == "vaeuda: terminated (SIGTERM)"


def test_main_gives_back_the_callers_sigterm_handler_and_runs_in_another_thread(capsys):
    """main() sets its SIGTERM handler for the run and puts the caller's own back after it; called in
    another thread (where Python lets no one set a handler) it runs without touching signals."""
    import signal
    import threading

    def callers_handler(signum, frame):
        pass
    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        assert main(["info", "missing.safetensors", "--progress", "none"]) == 2
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        codes = []
        worker = threading.Thread(target=lambda: codes.append(main(["info", "missing.safetensors", "--progress",
                                                                    "none"])))
        worker.start()
        worker.join(60)
        assert codes == [2] and signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err.count("missing.safetensors") == 2


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """kill / timeout send SIGTERM, whose default action killed segment mid-way and left its staging
    folder (.OUT.XXXXXXXX.part) behind, without a word; now it ends as Ctrl-C does, exit 143."""
    import signal
    import subprocess
    import sys
    import textwrap
    out = tmp_path / "seg"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from vaeuda import cli, fileio
        def run(args, reporter):
            with fileio.atomic_dir({str(out)!r}) as staging:
                (staging / "half.nii.gz").write_bytes(b"half")
                print("staged", flush=True)
                time.sleep(60)
        cli.run = run
        sys.exit(cli.main(["segment", "x", "--model", "m", "--out", {str(out)!r}, "--progress", "json"]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 143
    assert json.loads(stdout.strip().splitlines()[-1]) == {"event": "interrupted", "message": "terminated (SIGTERM)",
                                                           "checkpoint": None}
    assert stderr.strip() == "vaeuda: terminated (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # no staging folder, no output folder
