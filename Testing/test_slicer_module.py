"""The Slicer module (VAEUDASegmentation/VAEUDASegmentation.py) driven outside Slicer.

The module runs against Testing/slicer_stub, a stand-in of exactly the Slicer API it uses. The job
machinery (progress, cancel, error sentences, temporary folders) is tested with a fake engine
(VAEUDASegmentationLib/standinengine.py); the end-to-end tests use the real engine with a tiny model and
compare with running ``vaeuda segment`` directly.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
STUB = HERE / "slicer_stub"
MODULE_DIR = HERE.parent / "VAEUDASegmentation"
FAKE_ENGINE = MODULE_DIR / "VAEUDASegmentationLib" / "standinengine.py"
STUB_MODULES = ("slicer", "vtk", "qt", "ctk", "VAEUDASegmentation", "VAEUDASegmentationLib")

sys.path.insert(0, str(FAKE_ENGINE.parent))
import standinengine as fake_engine  # noqa: E402

sys.path.remove(str(FAKE_ENGINE.parent))

# A non-identity IJK-to-RAS: axes permuted and flipped, anisotropic spacing, shifted origin.
IJK_TO_RAS = np.array([[0.0, 0.0, -1.5, 40.0],
                       [-0.8, 0.0, 0.0, 10.0],
                       [0.0, 1.2, 0.0, -30.0],
                       [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def mod():
    """The module imported against the stand-in; the stand-in leaves sys.path and sys.modules afterwards."""
    sys.path[:0] = [str(STUB), str(MODULE_DIR)]
    try:
        import VAEUDASegmentation
        yield VAEUDASegmentation
    finally:
        for path in (str(STUB), str(MODULE_DIR)):
            sys.path.remove(path)
        for name in list(sys.modules):
            if name.split(".")[0] in STUB_MODULES:
                del sys.modules[name]


@pytest.fixture
def slicer(mod, tmp_path, monkeypatch):
    """The stand-in's ``slicer`` with an empty scene, a private temporary path, and, as in Slicer,
    a ``PythonSlicer`` on the PATH: here a script that runs this Python."""
    import qt
    import slicer
    bin_dir = tmp_path / "slicer-bin"
    bin_dir.mkdir()
    (bin_dir / "PythonSlicer").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "PythonSlicer").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    slicer.mrmlScene.Clear()
    qt._pending.clear()
    slicer.app.temporaryPath = str(tmp_path / "slicer-temp")
    os.makedirs(slicer.app.temporaryPath)
    slicer.app._testingEnabled = False
    return slicer


@pytest.fixture
def fake_logic(mod, monkeypatch, tmp_path):
    logic = mod.VAEUDASegmentationLogic()
    logic.engineCommand = [sys.executable, str(FAKE_ENGINE)]
    monkeypatch.setenv("VAEUDA_FAKE_ARGS", str(tmp_path / "args.json"))
    return logic


def write_fake_model(path, convention):
    """A file with a safetensors header holding the engine's model metadata (no tensors)."""
    return fake_engine.write_model(path, convention.to_dict(), "vaeuda-model")


def write_header(path, header: bytes):
    """A file of a safetensors header alone: its 8-byte little-endian length, then ``header``."""
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def add_volume(slicer, array, name="ct_case"):
    return slicer.util.addVolumeFromArray(np.asarray(array), IJK_TO_RAS, name)


def pump(slicer, done, timeout=30.0):
    """Run Qt timers (the logic's polling) until ``done()``, as Slicer's event loop would."""
    start = time.monotonic()
    while not done():
        slicer.app.processEvents()
        time.sleep(0.01)
        assert time.monotonic() - start < timeout, "background job did not finish"


def scene_node_ids(slicer):
    return [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]


def is_alive(pid):
    """Running and not a zombie (a killed orphan may wait to be reaped by init). Linux's /proc, else
    ps (macOS has no /proc: reading it there had called every process dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def dies(pid, timeout=10.0):
    """Whether process ``pid`` is gone (or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_alive(pid)


# ----------------------------------------------------------------------------- pure helpers

@pytest.fixture
def engineprocess(mod):
    """VAEUDASegmentationLib.engineprocess, the module's plain-Python child-process runner."""
    from VAEUDASegmentationLib import engineprocess
    assert mod.EngineProcess is engineprocess.EngineProcess and mod.JobFailedError is engineprocess.JobFailedError
    return engineprocess


def test_parse_engine_line(engineprocess):
    assert engineprocess.parseEngineLine('{"event": "progress", "step": 3, "total": 10}\n') == \
        {"event": "progress", "step": 3, "total": 10}
    assert engineprocess.parseEngineLine("reading 2 volumes\n") == {"event": "log", "message": "reading 2 volumes"}
    # JSON that is not an event, and broken JSON, are text for the log
    assert engineprocess.parseEngineLine('{"step": 3}') == {"event": "log", "message": '{"step": 3}'}
    assert engineprocess.parseEngineLine('{"event": ') == {"event": "log", "message": '{"event": '}
    # an event name must be a string; JSON with a space after the brace is still an event
    assert engineprocess.parseEngineLine('{"event": 3}') == {"event": "log", "message": '{"event": 3}'}
    assert engineprocess.parseEngineLine('{ "event": "done", "outputs": []}') == {"event": "done", "outputs": []}
    # an engine on Windows ends its lines with "\r\n" (the pipe is read with newline="\n"): no "\r" stays
    assert engineprocess.parseEngineLine("reading 2 volumes\r\n") == {"event": "log", "message": "reading 2 volumes"}


def test_failure_message_prefers_the_last_engine_sentence(engineprocess):
    """The engine's own sentence (the last one, if a retry printed two) over other stderr text."""
    process = engineprocess.EngineProcess(["vaeuda"])
    for line in ("vaeuda: error: first sentence.", "a warning", "vaeuda: error: last sentence.", "Traceback tail"):
        process._stderrTail.append(line)
    assert process.failureMessage() == "last sentence."


def test_class_indices_from_label_values(mod):
    from vaeuda.labels import CONSECUTIVE, MMWHS
    mmwhs = np.array([[0, 205, 420], [500, 820, 600]])          # 600 (RV) is background for MM-WHS
    expected = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.uint8)
    assert np.array_equal(mod.classIndicesFromLabelValues(mmwhs), expected)            # guessed: MM-WHS
    engine_written = np.where(mmwhs == 600, 0, mmwhs)      # the engine writes only the model's own values
    assert np.array_equal(mod.classIndicesFromLabelValues(engine_written, list(MMWHS.from_index)), expected)
    consecutive = np.array([[0, 1, 2], [3, 4, 0]])
    assert np.array_equal(mod.classIndicesFromLabelValues(consecutive, list(CONSECUTIVE.from_index)), expected)
    assert np.array_equal(mod.classIndicesFromLabelValues(consecutive), expected)      # guessed: consecutive
    every = np.array([0, 205, 420, 421, 500, 550, 600, 820, 850])      # all MM-WHS values: still MM-WHS
    assert np.array_equal(mod.classIndicesFromLabelValues(every), [0, 1, 2, 2, 3, 0, 0, 4, 0])
    custom = [9, 10, 20, 30, 40]                                                       # background 9
    assert np.array_equal(mod.classIndicesFromLabelValues(np.array([9, 30, 40]), custom), [0, 3, 4])
    with pytest.raises(ValueError, match=r"out\.nii\.gz: label values 7 are not"):
        mod.classIndicesFromLabelValues(np.array([0, 1, 7]), source="out.nii.gz")
    with pytest.raises(ValueError, match="label values 205"):
        mod.classIndicesFromLabelValues(np.array([0, 205]), list(CONSECUTIVE.from_index))
    # every unknown value is named, in order, the first eight of them
    with pytest.raises(ValueError, match=r"^s: label values 7, 8, 9 are not values of the model's structures\.$"):
        mod.classIndicesFromLabelValues(np.array([9, 0, 7, 1, 8]), source="s")
    with pytest.raises(ValueError, match=r"^s: label values 5, 6, 7, 8, 9, 10, 11, 12 are not"):
        mod.classIndicesFromLabelValues(np.arange(20), source="s")


def test_terminology_entry_has_the_seven_parts_and_the_structure_code(mod):
    for structure in mod.STRUCTURES:
        parts = mod.terminologyEntry(structure).split("~")
        assert len(parts) == 7
        assert parts[1] == "SCT^123037004^Anatomical Structure"
        assert parts[2] == f"SCT^{structure.snomed_code}^{structure.snomed_meaning}"
        assert parts[3] == "^^"
        # context, anatomic context and the empty anatomic region and its modifier (Slicer's seven-part format)
        assert parts[0] == "Segmentation category and type - DICOM master list"
        assert parts[4:] == ["Anatomic codes - DICOM master list", "^^", "^^"]
    # Each code with its own meaning (SNOMED CT / DICOM CID 7152): 74281007 is the myocardium as a
    # whole; "left ventricle" is in the segment's name, not in that code.
    assert [mod.terminologyEntry(s).split("~")[2] for s in mod.STRUCTURES] == [
        "SCT^74281007^Myocardium", "SCT^82471001^Left atrium", "SCT^87878005^Left ventricle",
        "SCT^54247002^Ascending aorta"]


def test_read_model_metadata(mod, tmp_path):
    from vaeuda.labels import MMWHS
    meta = mod.readModelMetadata(write_fake_model(tmp_path / "m.safetensors", MMWHS))
    assert mod.labelValuesOfModel(meta) == [0, 205, 420, 500, 820]
    (tmp_path / "notes.txt").write_text("hello, not a model")
    with pytest.raises(ValueError, match=r"notes\.txt: not a VAE-UDA model file"):
        mod.readModelMetadata(tmp_path / "notes.txt")
    other = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    write_header(tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match="without the 'vaeuda-model' metadata"):
        mod.readModelMetadata(tmp_path / "other.safetensors")


def test_read_model_metadata_refuses_a_file_shorter_than_the_header_length_as_no_model(mod, tmp_path):
    """Fewer than the 8 bytes of the header length (struct.unpack raises struct.error, no ValueError, for them)."""
    for name, content in (("empty.safetensors", b""), ("short.safetensors", b"\x05\x00\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: not a VAE-UDA model file \(no readable"):
            mod.readModelMetadata(tmp_path / name)


def test_a_model_header_nested_past_the_recursion_limit_is_refused_in_one_sentence(mod, tmp_path):
    """json raises RecursionError (no ValueError) for arrays nested past Python's limit: the header, or its meta."""
    deep = b"[" * 100_000 + b"]" * 100_000
    write_header(tmp_path / "deep.safetensors", deep)
    with pytest.raises(ValueError, match=r"deep\.safetensors: not a VAE-UDA model file \(no readable"):
        mod.readModelMetadata(tmp_path / "deep.safetensors")
    header = json.dumps({"__metadata__": {"format": mod.MODEL_FORMAT, "meta": "[" * 100_000}}).encode()
    write_header(tmp_path / "deepmeta.safetensors", header)
    with pytest.raises(ValueError, match=r"deepmeta\.safetensors: the model file's metadata is damaged"):
        mod.readModelMetadata(tmp_path / "deepmeta.safetensors")


def test_a_model_file_without_meta_has_empty_metadata_and_no_label_values(mod, tmp_path):
    """A "vaeuda-model" header without its "meta" field is read as empty metadata (the label values
    then guessed from the file), not as damaged."""
    header = json.dumps({"__metadata__": {"format": mod.MODEL_FORMAT}}).encode()
    write_header(tmp_path / "bare.safetensors", header)
    assert mod.readModelMetadata(tmp_path / "bare.safetensors") == {}
    assert mod.labelValuesOfModel({}) is None


def test_label_values_of_a_model_are_whole_numbers_not_booleans(mod):
    """JSON true is a Python int too: a from_index of booleans is damaged metadata, not the values 0 and 1."""
    assert mod.labelValuesOfModel({"labels": {"from_index": [0, 1, 2, 3, 4]}}) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"label values \[False, True, 2, 3, 4\] are not whole numbers"):
        mod.labelValuesOfModel({"labels": {"from_index": [False, True, 2, 3, 4]}})


def test_engine_environment_finds_the_engine_and_lets_openmp_threads_sleep(mod, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = mod.VAEUDASegmentationLogic._engineEnvironment()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [mod.MODULE_DIR, "/elsewhere"]
    assert "OMP_WAIT_POLICY" not in os.environ          # the GUI process's own environment is untouched
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")     # a user's choice wins
    assert mod.VAEUDASegmentationLogic._engineEnvironment()["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["PYTHONIOENCODING"] == "utf-8"           # the pipes are read as UTF-8, whatever the platform's code page
    # without a PYTHONPATH of its own: the engine's folder alone (a trailing separator would add the current folder)
    monkeypatch.delenv("PYTHONPATH")
    assert mod.VAEUDASegmentationLogic._engineEnvironment()["PYTHONPATH"] == mod.MODULE_DIR


def test_stand_in_volume_io_converts_ras_to_lps_and_round_trips(slicer, tmp_path):
    """The geometry the other tests rely on: what the stand-in writes is what Slicer would write."""
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)       # (K, J, I)
    volume = add_volume(slicer, array)
    path = str(tmp_path / "v.nii.gz")
    assert slicer.util.exportNode(volume, path, {}, world=False)
    image = sitk.ReadImage(path)
    assert image.GetSize() == (6, 5, 4)
    # LPS = RAS with x and y negated: origin (40, 10, -30) RAS -> (-40, -10, -30) LPS
    assert np.allclose(image.GetOrigin(), (-40.0, -10.0, -30.0))
    assert np.allclose(image.GetSpacing(), (0.8, 1.2, 1.5))
    # column i of IJK-to-LPS is (0, 0.8, 0) / 0.8, column j (0, 0, 1), column k (1.5, 0, 0) / 1.5
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    loaded = slicer.util.loadLabelVolume(path, {"name": "back", "show": False})
    assert np.array_equal(slicer.util.arrayFromVolume(loaded), array)
    assert np.allclose(loaded._ijkToRAS, IJK_TO_RAS)
    again = slicer.util.loadVolume(path, {"name": "back", "show": False})   # Slicer's unique name for a taken one
    assert again.GetName() == "back_1" and loaded.GetName() == "back"
    assert slicer.util.loadVolume(path).GetName() == "v" and slicer.util.loadVolume(path).GetName() == "v_1"


# ----------------------------------------------------------------------------- job machinery (fake engine)

def test_engine_process_reports_events_outputs_and_text(engineprocess, tmp_path):
    out = tmp_path / "model.safetensors"
    process = engineprocess.EngineProcess([sys.executable, str(FAKE_ENGINE), "adapt", "--out", str(out)])
    process.start()
    events = []
    while not process.isFinished():
        events += process.events(timeout=0.1)
    events += process.events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stage" and kinds.count("progress") == 3 and kinds[-1] == "done"
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert {"event": "log", "message": "a plain text line"} in events
    assert process.returncode == 0
    assert process.outputs == [str(out)] and out.read_text() == "fake model\n"


def test_engine_process_keeps_a_redrawn_line_whole_and_names_a_killing_signal(engineprocess):
    """Lines end at "\\n" only (a progress bar's 200 redraws are one line, its last state), and an
    engine killed by a signal says so instead of quoting its last, unrelated, stderr line."""
    bar = "".join(f"\\r{i}%" for i in range(200))
    process = engineprocess.EngineProcess([sys.executable, "-c", f"import sys; sys.stderr.write('{bar}\\n')"])
    process.start()
    process.process.wait()
    deadline = time.monotonic() + 10
    while not process.isFinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["message"] for e in process.events()] == ["199%"]
    killed = engineprocess.EngineProcess([sys.executable, "-c", "import os, signal, sys; "
                                          "sys.stderr.write('UserWarning: unrelated\\n'); sys.stderr.flush(); "
                                          "os.kill(os.getpid(), signal.SIGKILL)"])
    killed.start()
    killed.process.wait()
    assert killed.failureMessage() == ("the VAE-UDA engine was killed by SIGKILL (out of memory? the system's "
                                       "OOM killer sends it).")


def test_a_failing_progress_callback_neither_strands_the_job_nor_stops_it(slicer, mod, fake_logic, tmp_path,
                                                                          monkeypatch):
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    results = []

    def broken(event):
        raise ValueError("a bug in the caller's callback")
    closed = []                # (each job's pipes closed at its end: no reader thread or descriptor outlives it)
    real_close = mod.EngineProcess.close
    monkeypatch.setattr(mod.EngineProcess, "close", lambda process: closed.append(process) or real_close(process))
    assert fake_logic.segment(volume, model, waitForCompletion=False, progressCallback=broken,
                              finishedCallback=results.append) is None
    pump(slicer, lambda: results)
    assert results[0].status == "done" and not fake_logic.isRunning()
    assert os.listdir(slicer.app.temporaryPath) == []
    assert len(closed) == 1 and closed[0]._stdout.closed and closed[0]._stderr.closed
    assert fake_logic.segment(volume, model, progressCallback=broken) is not None    # blocking, and again


def test_a_failing_finished_callback_leaves_the_jobs_result_standing(slicer, mod, fake_logic, tmp_path, caplog):
    """Raised from a blocking call, the caller's error would hide the segmentation it had just imported."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)

    def broken(result):
        raise ValueError("a bug in the caller's callback")
    segmentation = fake_logic.segment(volume, model, finishedCallback=broken)
    assert segmentation is not None and slicer.mrmlScene.GetNodeByID(segmentation.GetID()) is segmentation
    assert "the finished callback failed" in caplog.text and not fake_logic.isRunning()


def test_a_model_move_that_fails_midway_leaves_no_part_file(mod, tmp_path, monkeypatch):
    source = tmp_path / "job" / "model.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"model")
    destination = tmp_path / "models" / "adapted.safetensors"

    def disk_full(src, dst):
        Path(dst).write_bytes(b"mo")                       # part of the copy made, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mod.shutil, "move", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        mod._moveInPlace(str(source), destination)
    assert sorted(p.name for p in destination.parent.iterdir()) == [] and source.read_bytes() == b"model"


def test_a_model_the_engine_did_not_write_is_said_so_and_nothing_is_made(mod, tmp_path):
    """An engine that reported success without its file: one sentence naming it, no folder made for it."""
    missing = tmp_path / "job" / "model.safetensors"
    with pytest.raises(RuntimeError, match=rf"^{re.escape(str(missing))}: the engine finished without writing this file\.$"):
        mod._moveInPlace(str(missing), tmp_path / "models" / "adapted.safetensors")
    assert not (tmp_path / "models").exists()


def test_the_recorded_source_volumes_are_the_text_entries_of_the_provenance(mod):
    """A model's record of its source images and labels; entries that are no text (a damaged record) are no paths."""
    meta = {"provenance": {"source_data": ["/d/a_image.nii.gz", None, 5], "source_labels": ["/d/a_label.nii.gz"]}}
    assert mod._sourceVolumes(None, meta) == ["/d/a_image.nii.gz", "/d/a_label.nii.gz"]
    assert mod._sourceVolumes(None, {"provenance": "damaged"}) == [] and mod._sourceVolumes(None, {}) == []


def test_an_unset_path_is_none_whether_empty_or_a_dot(mod):
    """A ctkDirectoryButton shows an empty folder as "." (and Path("") is "."): both mean not chosen."""
    assert [mod._pathOrNone(p) for p in (None, "", ".", pathlib.Path(""), "a.safetensors", pathlib.Path("d"))] == \
        [None, None, None, None, "a.safetensors", "d"]


def test_numpys_booleans_are_on_off_arguments(mod):
    """A flag read from a numpy array is numpy.bool_, no bool: it is True or False all the same."""
    for value in (True, False, np.bool_(True), np.bool_(False)):
        mod._requireFlag("portable", value)
    with pytest.raises(ValueError, match=r"^portable must be True or False, not 1\.$"):
        mod._requireFlag("portable", 1)


def test_cancel_after_the_engine_has_ended_leaves_its_result_standing(engineprocess):
    """Cancel pressed between the engine's successful exit and the next poll: before, the job was
    reported cancelled and the model it had written was thrown away."""
    process = engineprocess.EngineProcess([sys.executable, "-c", "print('done')"])
    process.start()
    process.process.wait()
    process.cancel()
    assert not process.cancelRequested and process.returncode == 0
    running = engineprocess.EngineProcess([sys.executable, "-c", "import time; time.sleep(60)"])
    running.start()
    running.cancel()
    assert running.cancelRequested and running.returncode is not None     # killed and reaped
    process.cancel(evenIfEnded=True)                                      # a closing scene's cancel
    assert process.cancelRequested and process.returncode == 0
    failed = engineprocess.EngineProcess([sys.executable, "-c", "raise SystemExit(2)"])
    failed.start()
    failed.process.wait()
    failed.cancel(evenIfEnded=True)                                       # a failure stands: its sentence
    assert not failed.cancelRequested and failed.returncode == 2


def test_the_default_input_volume_is_one_the_selector_lists(slicer, mod):
    """getNodesByClass("vtkMRMLScalarVolumeNode") also returns label maps (a subclass), which the
    input selector hides: the panel must not preselect one."""
    logic = mod.VAEUDASegmentationLogic
    slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.uint8), IJK_TO_RAS, "labels", "vtkMRMLLabelMapVolumeNode")
    assert logic.defaultInputVolume() is None
    ct = add_volume(slicer, np.zeros((2, 2, 2), np.float32))
    assert logic.defaultInputVolume() is ct


def test_console_mistakes_are_refused_before_the_job_in_one_sentence(slicer, mod, fake_logic, tmp_path):
    """From a bad-input sweep of the batch API: each ran the engine first and then failed with a raw
    errno or AttributeError, or (an output equal to an input) replaced the input."""
    from vaeuda.labels import MMWHS
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    volume = add_volume(slicer, np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    seg = make_segmentation(slicer, volume, np.zeros((3, 4, 5), np.uint8), [("LV-M", "LV-M", None)], "seg")
    nodes = scene_node_ids(slicer)

    def header(body: bytes) -> str:
        return str(write_header(tmp_path / f"h{len(body)}.safetensors", body))

    cases = [
        (lambda: fake_logic.adapt(model, [volume], tmp_path / "folder"), "folder: is a folder; give the output a file name."),
        (lambda: fake_logic.adapt(model, [volume], tmp_path / "afile" / "a.safetensors"),
         f"a.safetensors: cannot be written ({tmp_path / 'afile'} is a file)."),
        (lambda: fake_logic.adapt(model, [volume], model), "is also an input, which is never overwritten"),
        (lambda: fake_logic.makeTryItCohort(tmp_path / "afile"), "afile: is an existing file, not a folder."),
        (lambda: fake_logic.segment(volume, header(b"[1,2]")), "not a VAE-UDA model file"),
        (lambda: fake_logic.segment(volume, header(b'{"__metadata__": {"format": "vaeuda-model", "meta": "[1]"}}')),
         "the model file's metadata is damaged"),
        (lambda: fake_logic.segment(volume, model, volume), "The output segmentation must be a vtkMRMLSegmentationNode "
                                                            "node, not node 'ct_case' (vtkMRMLScalarVolumeNode)"),
        (lambda: fake_logic.segment(volume.GetID(), model),
         f"The input volume must be a vtkMRMLScalarVolumeNode node, not '{volume.GetID()}'."),
        (lambda: fake_logic.adapt(model, [volume, "ct"], tmp_path / "a.safetensors"),
         "Target volume 2 must be a vtkMRMLScalarVolumeNode node, not 'ct'."),
        (lambda: fake_logic.trainSource(tmp_path, tmp_path / "s.safetensors", iterations=0),
         "iterations must be a whole number of at least 1 (or None for the default), not 0."),
        (lambda: fake_logic.adapt(model, [volume], tmp_path / "a.safetensors", seed=-1),
         "seed must be a whole number of at least 0 (or None for the default), not -1."),
        (lambda: fake_logic.segment(volume, model, cpuBf16=True, portable=True),
         "portable computes in float32; it cannot be combined with cpuBf16."),
        (lambda: fake_logic.trainSource(tmp_path, tmp_path / "s.safetensors", device="cuda", portable=True),
         "portable is for the CPU; it cannot be combined with device cuda."),
        (lambda: fake_logic.trainSource(tmp_path, f"{tmp_path / 'newdir'}/"),
         "newdir/: is named as a folder (it ends with a separator); give the output a file name."),
        (lambda: fake_logic.makeTryItCohort(tmp_path / "c", nTrain=-1), "nTrain must be a whole number of at least 0"),
        (lambda: fake_logic.evaluate(volume, seg), "The segmentation must be a vtkMRMLSegmentationNode node"),
        (lambda: fake_logic.evaluate(seg, seg, volume), "The output table must be a vtkMRMLTableNode node"),
        (lambda: mod.segmentMask(None, "LV-M", volume), "must be a vtkMRMLSegmentationNode node, not nothing"),
        (lambda: fake_logic.segment(volume, model, device="gpu"), "The device must be one of auto, cpu, cuda, not 'gpu'."),
        (lambda: fake_logic.adapt(model, [volume], tmp_path / "a.safetensors", device=None),
         "The device must be one of auto, cpu, cuda, not None."),
        (lambda: fake_logic.trainSource(tmp_path / "folder", tmp_path / "s.safetensors", preset="auto"),
         "The preset must be one of cpu, paper, tiny, not 'auto'."),
    ]
    for call, sentence in cases:
        with pytest.raises(ValueError, match=re.escape(sentence)):
            call()
    assert scene_node_ids(slicer) == nodes and os.listdir(slicer.app.temporaryPath) == []
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "x" and mod.readModelMetadata(model)   # untouched
    train = tmp_path / "train"
    train.mkdir()
    (train / "mr_1_image.nii.gz").write_bytes(b"image")
    with pytest.raises(ValueError, match="is also an input"):
        fake_logic.trainSource(train, train / "mr_1_image.nii.gz")
    assert (train / "mr_1_image.nii.gz").read_bytes() == b"image"


def test_evaluate_says_which_structures_the_reference_lacks(slicer, mod, fake_logic, caplog):
    """A reference without a segment for a structure scores it against nothing (Dice 0 where the
    segmentation has it), which lowers the mean: said in the log and to the progress callback (whose
    failure changes nothing), before the job."""
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    seg, ref = lv_myocardium_pair(slicer, volume)
    with caplog.at_level(logging.WARNING):
        table = fake_logic.evaluate(seg, ref)
    assert "the reference 'ref' has no segment for LA blood cavity, LV blood cavity, Ascending aorta" in caplog.text
    # the stand-in's Dice (the engine's are checked end to end with the real engine): LV-M the same, the rest
    # empty in both, scored 100 as the engine scores two empty masks, and marked as having no reference
    assert [table.GetCellText(row, 0) for row in range(5)] == [
        "LV myocardium", "LA blood cavity (no reference)", "LV blood cavity (no reference)",
        "Ascending aorta (no reference)", "Mean"]
    assert [table.GetCellText(row, 1) for row in range(5)] == ["100.00"] * 5
    assert table.GetCellText(0, 2) == "n/a"
    events = []

    def failingCallback(event):
        events.append(event)
        raise RuntimeError("the caller's bug")

    assert fake_logic.evaluate(seg, ref, progressCallback=failingCallback, outputTableNode=table) is table   # (the bug aside)
    assert events[0] == {"event": "log", "message": "note: the reference 'ref' has no segment for LA blood cavity, "
                                                    "LV blood cavity, Ascending aorta; scored as empty there."}
    assert events[1]["event"] == "stage"


def test_evaluate_refused_while_a_job_runs_sends_no_warning_first(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """A refused call says one thing: the missing-structure note is not sent before "a job is running"."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    seg, ref = lv_myocardium_pair(slicer, volume)
    fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), waitForCompletion=False)
    events = []
    try:
        with pytest.raises(RuntimeError, match=r"^Another VAE-UDA job \(segmenting\) is running; wait for it, or cancel it \(its Cancel button"):
            fake_logic.evaluate(seg, ref, progressCallback=events.append)
    finally:
        fake_logic.cancel()
    while fake_logic.isRunning():
        slicer.app.processEvents()
    assert events == []


def test_evaluate_refused_for_its_segmentation_sends_no_warning_first(slicer, mod, fake_logic):
    """The missing-structure note came before "has no segment for any of": a refused call says one thing."""
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    empty = make_segmentation(slicer, volume, labels, [], "empty")
    ref = make_segmentation(slicer, volume, labels, [("LV-M", "LV myocardium", None)], "ref")
    events = []
    with pytest.raises(ValueError, match="has no segment for any of"):
        fake_logic.evaluate(empty, ref, progressCallback=events.append)
    assert events == []


def test_evaluate_says_how_to_give_a_segmentation_its_reference_volume(slicer, mod, fake_logic):
    """A segmentation loaded from a file has no reference volume: the sentence names the call that sets one."""
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    ref = make_segmentation(slicer, volume, labels, [("LV-M", "LV-M", None)], "ref")
    loose = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(ValueError, match=re.escape(
            "Segmentation 'manual' has no reference volume to compare in: give it the volume it was drawn on, in "
            "the Python console with segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode) "
            "(Segment Editor does so with the first source volume chosen for a new segmentation).")):
        fake_logic.evaluate(loose, ref)


def test_a_node_removed_while_its_job_ran_gets_nothing_imported(slicer, mod, fake_logic, tmp_path):
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    out = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    results = []
    fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), out, waitForCompletion=False,
                       finishedCallback=results.append)
    slicer.mrmlScene.RemoveNode(out)
    pump(slicer, lambda: results)
    assert results[0].status == "failed"
    assert results[0].message == "The output segmentation 'out' was removed from the scene while the job ran; " \
                                 "nothing was imported."
    assert out.GetSegmentation().GetNumberOfSegments() == 0


def _ended_before_the_scene_closed(slicer, logic, start):
    """Start a background job with ``start(finishedCallback)``, let its engine end, then close the scene
    before any poll has run, cancelling as the widget does; the job's result."""
    results = []
    start(results.append)
    logic._job.process.process.wait()              # ended; no poll has run yet
    slicer.mrmlScene.Clear()
    logic.cancel(discardFinished=True)
    pump(slicer, lambda: results)
    return results[0]


def test_a_job_ended_before_its_scene_closed_imports_nothing(slicer, mod, fake_logic, tmp_path):
    """The engine exits, the scene closes before the next poll: the widget cancels with
    discardFinished, and the segmentation is not imported into whatever scene comes next; a model
    file an adaptation has finished is kept."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    result = _ended_before_the_scene_closed(slicer, fake_logic, lambda finished: fake_logic.segment(
        volume, model, waitForCompletion=False, finishedCallback=finished))
    assert result.status == "cancelled" and slicer.mrmlScene.GetNumberOfNodes() == 0
    assert os.listdir(slicer.app.temporaryPath) == []
    # A trained model is a file, not scene content: a closing scene does not throw it away.
    target = add_volume(slicer, np.ones((3, 4, 5)))
    result = _ended_before_the_scene_closed(slicer, fake_logic, lambda finished: fake_logic.adapt(
        model, [target], tmp_path / "adapted.safetensors", waitForCompletion=False, finishedCallback=finished))
    assert result.status == "done" and (tmp_path / "adapted.safetensors").read_text() == "fake model\n"


def test_a_job_failed_before_its_scene_closed_reports_its_failure(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """The engine fails, the scene closes before the next poll: the job is reported failed with the
    engine's sentence, not "cancelled" (the user would not learn what went wrong)."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "fail")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    result = _ended_before_the_scene_closed(slicer, fake_logic, lambda finished: fake_logic.segment(
        volume, model, waitForCompletion=False, finishedCallback=finished))
    assert result.status == "failed" and result.message == f"Volume '{volume.GetName()}': {fake_engine.FAIL_REASON}"
    assert os.listdir(slicer.app.temporaryPath) == []


def test_engine_process_is_not_finished_while_its_output_waits_to_be_drained(engineprocess):
    """Exited and read to the end is not enough: a poll that saw no events yet would otherwise
    complete the job and drop the last lines (the error sentence, the "done" event)."""
    process = engineprocess.EngineProcess([sys.executable, "-c", "print('first'); print('last')"])
    process.start()
    process.process.wait()
    for reader in process._readers:
        reader.join(timeout=10)
    assert not any(reader.is_alive() for reader in process._readers)
    assert not process.isFinished()
    assert [e["message"] for e in process.events()] == ["first", "last"]
    assert process.isFinished()


def test_engine_process_finishes_after_the_grace_time_when_a_grandchild_keeps_the_pipes(engineprocess,
                                                                                        monkeypatch):
    """A grandchild that inherited stdout keeps the reader waiting; the child's exit plus the
    grace time ends the job anyway (and cancel still reaches the grandchild, same process group)."""
    monkeypatch.setattr(engineprocess.EngineProcess, "READER_GRACE_S", 0.5)
    process = engineprocess.EngineProcess(["/bin/sh", "-c", "sleep 60 & echo started"])
    process.start()
    try:
        process.process.wait()
        assert process.events(timeout=10) == [{"event": "log", "message": "started"}]
        assert not process.isFinished()                    # exited, but the reader is still open
        assert any(reader.is_alive() for reader in process._readers)
        time.sleep(0.7)
        assert process.isFinished()
    finally:
        process.cancel()


def _finish(process, timeout=20.0):
    """Drain a started EngineProcess until it is finished; its events."""
    events, deadline = [], time.monotonic() + timeout
    while not process.isFinished():
        events += process.events(timeout=0.05)
        assert time.monotonic() < deadline, "the engine process did not finish"
    return events + process.events()


def test_a_line_the_reader_cannot_use_does_not_stop_it(engineprocess, tmp_path):
    """A "done" whose outputs are a number, and an object nested past Python's recursion limit,
    killed the stdout reader: nothing drained the pipe any more, and an engine that went on
    printing blocked on it for good. Such lines are log text; the reading goes on."""
    deep = "{" + '"a":[' * 100000
    code = (f"import json, sys; print(json.dumps({{'event': 'done', 'outputs': 3}})); print({deep!r}); "
            f"[print('y' * 1000) for _ in range(2000)]; "
            f"print(json.dumps({{'event': 'done', 'outputs': ['a', 7, 'b']}}))")
    script = tmp_path / "engine.py"              # (the deep line is too long for a command line)
    script.write_text(code, encoding="utf-8")
    process = engineprocess.EngineProcess([sys.executable, str(script)])
    process.start()
    events = _finish(process)
    assert process.returncode == 0 and process.doneSeen
    assert process.outputs == ["a", "b"]                       # the strings of the last "done"
    cap = engineprocess.EngineProcess.MAX_LINE_CHARS          # (what reaches the log and the panel)
    assert len(events) == 2 + 1 + 2000 and events[1] == {"event": "log", "message": deep[:cap]}
    assert engineprocess.parseEngineLine(deep) == {"event": "log", "message": deep}
    valid = '{"event": "done", "a": ' + "[" * 100000 + "]" * 100000 + "}"     # well-formed: json recurses
    assert engineprocess.parseEngineLine(valid) == {"event": "log", "message": valid}


def _engine_leaving_a_child(engineprocess, ownSession=False):
    """A started EngineProcess whose engine starts a child that prints forever (in a session of its own
    when ``ownSession``, out of reach of the engine's group), says "done" and exits -> (process, child pid)."""
    script = ("import subprocess, sys, json; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: print(1, flush=True); "
              f"time.sleep(0.01)'], start_new_session={ownSession}); print('pid', child.pid, flush=True); "
              "print(json.dumps({'event': 'done', 'outputs': []}))")
    process = engineprocess.EngineProcess([sys.executable, "-c", script])
    process.start()
    events, deadline = [], time.monotonic() + 10
    while not any(e["message"].startswith("pid ") for e in events) and time.monotonic() < deadline:
        events += process.events(timeout=0.1)             # (the child's lines may come first)
    return process, int(next(e["message"] for e in events if e["message"].startswith("pid ")).split()[1])


def test_what_the_engine_left_running_is_killed_when_the_job_ends(engineprocess, monkeypatch):
    """A child still printing after the engine's "done" and exit kept the queue from emptying: the
    job never ended, and cancel() did nothing once the engine itself had exited. After the grace
    time the group is killed and the job ends; close() leaves no reader thread or pipe behind."""
    monkeypatch.setattr(engineprocess.EngineProcess, "READER_GRACE_S", 0.5)
    process, grandchild = _engine_leaving_a_child(engineprocess)
    _finish(process)
    assert dies(grandchild)
    process.close()
    assert not any(reader.is_alive() for reader in process._readers) and process._stdout.closed


@pytest.mark.parametrize("ending", ["cancel", "close"])
def test_cancel_or_close_after_the_engine_exited_kills_what_it_left_running(engineprocess, ending):
    """An engine that has exited but left a child printing into its pipes, before any grace time:
    cancel() kills that child, the job's result standing; close() kills it too, lets the readers
    meet the end of its output and closes the pipes."""
    process, grandchild = _engine_leaving_a_child(engineprocess)
    deadline = time.monotonic() + 10
    try:
        while process.returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.returncode == 0 and is_alive(grandchild)
        if ending == "cancel":
            process.cancel()
            assert not process.cancelRequested
        else:
            process.close()
            assert process._stdout.closed and process._stderr.closed
            assert not any(reader.is_alive() for reader in process._readers)
        assert dies(grandchild)
    finally:
        if is_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        process.close()


def test_events_come_at_most_limit_at_a_time_and_the_rest_wait(engineprocess):
    """The panel takes at most EVENTS_PER_POLL events per poll, so that a chatty engine cannot freeze
    the GUI; what a call leaves waits, in order, for the next."""
    process = engineprocess.EngineProcess([sys.executable, "-c", "[print(i) for i in range(10)]"])
    process.start()
    deadline = time.monotonic() + 20
    while process.returncode is None or process._outputHeld():
        assert time.monotonic() < deadline, "the engine process did not finish"
        time.sleep(0.05)
    assert [e["message"] for e in process.events(limit=3)] == ["0", "1", "2"]
    assert [e["message"] for e in process.events(limit=3)] == ["3", "4", "5"]
    assert [e["message"] for e in process.events()] == ["6", "7", "8", "9"] and process.isFinished()


def test_a_background_job_ending_with_events_waiting_forwards_them_all(slicer, mod, fake_logic, engineprocess,
                                                                      monkeypatch, tmp_path):
    """A job can end with more than a poll's share of events waiting: a process outside the engine's
    group printed them and keeps the output open, and the grace time ran out. The last poll forwards
    every one of them, in order, not one more share."""
    monkeypatch.setattr(mod.VAEUDASegmentationLogic, "EVENTS_PER_POLL", 1)
    monkeypatch.setattr(engineprocess.EngineProcess, "READER_GRACE_S", 0.3)
    printed = tmp_path / "printed"    # the chatter's process id, once its lines are out
    chatter = tmp_path / "chatter.py"
    chatter.write_text(f"import os, pathlib, time\n"
                       f"for i in range(50):\n    print('line', i, flush=True)\n"
                       f"pathlib.Path({str(printed)!r}).write_text(str(os.getpid()))\n"
                       f"time.sleep(60)\n")
    engine = tmp_path / "engine.py"
    engine.write_text(f"import json, os, subprocess, sys, time\n"
                      f"subprocess.Popen([sys.executable, {str(chatter)!r}], start_new_session=True)\n"
                      f"deadline = time.monotonic() + 20\n"
                      f"while not os.path.exists({str(printed)!r}) and time.monotonic() < deadline:\n"
                      f"    time.sleep(0.01)\n"
                      f"print(json.dumps({{'event': 'done', 'outputs': []}}))\n")
    fake_logic.engineCommand = [sys.executable, str(engine)]
    events, results = [], []
    fake_logic.trainSource(str(tmp_path), str(tmp_path / "m.safetensors"), waitForCompletion=False,
                           progressCallback=events.append, finishedCallback=results.append)
    try:
        pump(slicer, lambda: results)
    finally:
        if printed.exists() and printed.read_text():
            os.kill(int(printed.read_text()), signal.SIGKILL)
    lines = [e["message"] for e in events if str(e.get("message")).startswith("line ")]
    assert lines == [f"line {i}" for i in range(50)]


def test_a_job_ends_when_a_process_outside_its_group_keeps_its_output_open(engineprocess, monkeypatch):
    """A grandchild in its own session cannot be killed with the engine's group; after the grace time
    the job ends all the same (its readers are left to that process), rather than never."""
    monkeypatch.setattr(engineprocess.EngineProcess, "READER_GRACE_S", 0.5)
    monkeypatch.setattr(engineprocess.EngineProcess, "CLOSE_WAIT_S", 0.2)
    process, grandchild = _engine_leaving_a_child(engineprocess, ownSession=True)
    try:
        _finish(process)                     # (fails if the job never ends)
        assert process.succeeded and is_alive(grandchild) and process._outputHeld()
        process.close()                      # the pipes stay with their readers, which that process feeds
        assert not process._stdout.closed
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_a_done_event_is_no_success_with_a_nonzero_exit_status(engineprocess):
    """Success is exit 0 with a "done" event and no "error" event (Docs/engine-contract.md): all three."""
    process = engineprocess.EngineProcess([sys.executable, "-c", "import json, sys; "
                                           "print(json.dumps({'event': 'done', 'outputs': []})); sys.exit(3)"])
    process.start()
    _finish(process)
    assert process.doneSeen and not process.succeeded
    assert process.failureMessage() == "the VAE-UDA engine stopped with exit status 3."


def test_an_interruption_without_a_reason_is_named_interrupted(engineprocess):
    """An "interrupted" event with an empty message: the sentence still says what happened."""
    process = engineprocess.EngineProcess(["vaeuda"])
    process.interruptedMessage = ""
    assert process.failureMessage() == ("the VAE-UDA engine was stopped before it finished (interrupted); "
                                        "nothing was kept.")


def test_the_failure_sentence_for_each_way_the_engine_can_end(engineprocess):
    """A real-time signal (no name: signal.Signals raised, and the panel stayed "running"), an
    engine stopped by SIGTERM (its checkpoint was in the job's folder, which is gone), exit 0 without
    "done", and PythonSlicer's launcher reporting its Python child's crash."""
    def ended(code):
        process = engineprocess.EngineProcess([sys.executable, "-c", code])
        process.start()
        _finish(process)
        return process.failureMessage()

    assert ended("import os; os.kill(os.getpid(), 40)") == "the VAE-UDA engine was killed by signal 40."
    interrupted = ("import json, sys; print(json.dumps({'event': 'interrupted', 'message': 'terminated (SIGTERM); "
                   "the last checkpoint is kept at m.safetensors.ckpt', 'checkpoint': 'm.safetensors.ckpt'})); "
                   "sys.exit(143)")
    assert ended(interrupted) == ("the VAE-UDA engine was stopped before it finished (terminated (SIGTERM)); "
                                  "nothing was kept.")
    assert ended("print('a plain line')") == "the VAE-UDA engine ended without reporting its result."
    launcher = ("import sys; sys.stderr.write('error: [/opt/Slicer/bin/python-real] exit abnormally - Report the "
                "problem.\\n'); sys.exit(1)")
    assert ended(launcher) == ("the VAE-UDA engine crashed or was killed (out of memory? the system's OOM killer "
                               "kills it).")
    # blank stderr lines are no message: the last line with text is the reason
    assert ended("import sys; sys.stderr.write('boom\\n\\n\\n'); sys.exit(1)") == \
        "the VAE-UDA engine stopped with an error: boom"
    long_line = ended("import sys; sys.stderr.write('z' * 10 ** 6 + '\\n'); sys.exit(1)")
    assert long_line == "the VAE-UDA engine stopped with an error: " + "z" * engineprocess.EngineProcess.MAX_LINE_CHARS


@pytest.mark.parametrize("code, message", [
    ("import json; print(json.dumps({'event': 'error', 'message': 'the engine refused it.'}))", "the engine refused it."),
    ("print('no done line')", "the VAE-UDA engine ended without reporting its result."),
    ("import json; print(json.dumps({'event': 'error', 'message': None})); print(json.dumps({'event': 'done'}))",
     "the VAE-UDA engine reported an error without saying what it was."),
])
def test_exit_0_is_no_success_without_done_or_with_an_error_event(slicer, mod, fake_logic, tmp_path, code, message):
    """Success is exit 0 with a "done" event and no "error" event (Docs/engine-contract.md): an
    engine that said why it failed, or said nothing, and exited 0 had its job reported done."""
    fake_logic.engineCommand = [sys.executable, "-c", code]
    out = tmp_path / "adapted.safetensors"
    with pytest.raises(mod.JobFailedError) as raised:
        fake_logic.trainSource(str(tmp_path), str(out))
    assert str(raised.value) == message
    assert not out.exists() and not fake_logic.isRunning() and os.listdir(slicer.app.temporaryPath) == []


def test_a_failed_jobs_sentence_names_the_arguments_not_the_engines_flags(slicer, mod, fake_logic, tmp_path):
    """The engine's out-of-memory remedy names --batch-size; the console user passed batchSize."""
    sentence = "out of memory (2 GiB could not be allocated): try a smaller --batch-size, or a machine with more memory."
    fake_logic.engineCommand = [sys.executable, "-c", "import json, sys; print(json.dumps({'event': 'error', "
                                f"'message': {sentence!r}}})); sys.exit(1)"]
    with pytest.raises(mod.JobFailedError) as raised:
        fake_logic.trainSource(str(tmp_path), str(tmp_path / "m.safetensors"))
    assert str(raised.value) == sentence.replace("--batch-size", "batchSize")


def test_a_blocking_call_cut_short_leaves_no_job_behind(slicer, mod, fake_logic, tmp_path, monkeypatch):
    """Ctrl-C in Slicer's console (or a callback's SystemExit) during a blocking call left the job
    registered for good: the engine ran on, and every later call was refused as "another job"."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    monkeypatch.setenv("VAEUDA_FAKE_PIDFILE", str(tmp_path / "pid"))
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)

    def interrupt():                  # Ctrl-C arrives while the call keeps the window painting
        if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip():    # (written, not just made)
            raise KeyboardInterrupt
    painting = slicer.app.processEvents
    monkeypatch.setattr(slicer.app, "processEvents", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fake_logic.segment(volume, model)
    monkeypatch.setattr(slicer.app, "processEvents", painting)
    assert not fake_logic.isRunning() and os.listdir(slicer.app.temporaryPath) == []
    assert dies(int((tmp_path / "pid").read_text()))          # the engine's own child too
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "done")
    assert fake_logic.segment(volume, model) is not None                # the next call runs


def test_ctrl_c_just_after_the_engine_succeeded_imports_nothing(slicer, mod, fake_logic, tmp_path, monkeypatch):
    """Ctrl-C cancels: arriving after the engine's successful exit, it had the segmentation imported
    (and the callback told "done") before it went on up."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    before, results = scene_node_ids(slicer), []

    def interrupt():
        fake_logic._job.process.process.wait()         # the engine has succeeded
        raise KeyboardInterrupt
    monkeypatch.setattr(slicer.app, "processEvents", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fake_logic.segment(volume, model, finishedCallback=results.append)
    assert [r.status for r in results] == ["cancelled"] and fake_logic._job is None
    assert scene_node_ids(slicer) == before and os.listdir(slicer.app.temporaryPath) == []


def test_the_progress_line_shows_only_what_makes_sense(mod):
    """NaN, text or a missing field raised in the handler (a traceback per event, the status
    frozen); a negative or absurd ETA was shown; a fraction beyond 1 set the bar past its end."""
    panel = _bare_panel(mod, _PanelParameters())
    values = []
    panel.ui.progressBar.setValue = values.append
    for event, status, value in [
        ({"stage": "adapt", "step": 3, "total": 10, "fraction": 0.3, "eta_s": 125.0}, "adapt: 3/10, about 2 min 5 s left", 30),
        ({"stage": "adapt", "step": 4, "total": 10, "fraction": float("nan"), "eta_s": -42}, "adapt: 4/10", None),
        ({"stage": "adapt", "step": 5, "total": 10, "fraction": 7.0, "eta_s": 1e12}, "adapt: 5/10", 100),
        ({"stage": "adapt", "fraction": "half", "eta_s": "soon"}, "adapt", None),
        ({"stage": "adapt", "step": True, "total": 10, "fraction": True}, "adapt", None),     # JSON true is no number
        ({}, "", None),
    ]:
        values.clear()
        panel._onProgress({"event": "progress", **event})
        assert panel.ui.statusLabel.text == status and values == ([] if value is None else [value])


def test_failing_engine_raises_its_sentence_and_leaves_the_scene(slicer, mod, fake_logic, monkeypatch, tmp_path):
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "fail")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    before = scene_node_ids(slicer)
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    with pytest.raises(mod.JobFailedError) as raised:
        fake_logic.segment(volume, model, device="cpu")
    # the engine's sentence named the job's temporary file; the user is told the volume's name
    sentence = f"Volume '{volume.GetName()}': {fake_engine.FAIL_REASON}"
    assert str(raised.value) == sentence
    assert scene_node_ids(slicer) == before
    assert os.listdir(slicer.app.temporaryPath) == []
    assert not fake_logic.isRunning()
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[:3] == ["segment", "--progress", "json"]
    assert args[args.index("--model") + 1] == model and args[args.index("--device") + 1] == "cpu"
    assert args[-1].endswith("input.nii.gz")

    # The same failure in the background reaches finishedCallback, and the error event the progress callback.
    results, events = [], []
    assert fake_logic.segment(volume, model, waitForCompletion=False, progressCallback=events.append,
                              finishedCallback=results.append) is None
    pump(slicer, lambda: results)
    assert results[0].status == "failed" and results[0].message == sentence
    assert {"event": "error", "message": sentence} in events
    assert scene_node_ids(slicer) == before and os.listdir(slicer.app.temporaryPath) == []


def test_the_engine_runs_in_pythonslicer_found_on_the_path_and_nowhere_else(slicer, mod, monkeypatch, tmp_path):
    """As slicer.pydeps: PythonSlicer from the PATH, else a clear error (inside Slicer sys.executable
    is the application, which would not run ``-m vaeuda``), with the job's folder removed."""
    from vaeuda.labels import MMWHS
    logic = mod.VAEUDASegmentationLogic()
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    before = scene_node_ids(slicer)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"^Cannot start the VAE-UDA engine: the PythonSlicer executable is not on the PATH"):
        logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS))
    assert scene_node_ids(slicer) == before and os.listdir(slicer.app.temporaryPath) == [] and not logic.isRunning()
    monkeypatch.setenv("PATH", str(tmp_path / "slicer-bin"))                # the fixture's PythonSlicer
    assert logic._engineArgs() == [str(tmp_path / "slicer-bin" / "PythonSlicer"), "-m", "vaeuda"]


def test_crash_without_an_error_line_shows_the_last_stderr_line(slicer, mod, fake_logic, monkeypatch, tmp_path):
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "crash")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    with pytest.raises(mod.JobFailedError, match="ZeroDivisionError: division by zero"):
        fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS))
    assert os.listdir(slicer.app.temporaryPath) == []


def test_cancel_mid_job_kills_the_process_tree_and_leaves_nothing(slicer, mod, fake_logic, monkeypatch, tmp_path):
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    pidfile = tmp_path / "grandchild.pid"
    monkeypatch.setenv("VAEUDA_FAKE_PIDFILE", str(pidfile))
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    before = scene_node_ids(slicer)
    events, results = [], []
    fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), waitForCompletion=False,
                       progressCallback=events.append, finishedCallback=results.append)
    pump(slicer, lambda: any(e["event"] == "progress" for e in events) and pidfile.exists()
         and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    assert is_alive(grandchild)
    assert len(os.listdir(slicer.app.temporaryPath)) == 1          # the job's folder, while it runs
    with pytest.raises(RuntimeError, match=r"Another VAE-UDA job \(segmenting\) is running"):
        fake_logic.segment(volume, str(tmp_path / "m.safetensors"))   # one job at a time
    started = time.monotonic()
    fake_logic.cancel()
    pump(slicer, lambda: results)
    assert time.monotonic() - started < 10                       # not the fake engine's 60 s sleep
    assert results[0].status == "cancelled"
    assert scene_node_ids(slicer) == before
    assert os.listdir(slicer.app.temporaryPath) == []
    assert dies(grandchild, timeout=5), "the engine's own child process survived the cancel"


def test_cancel_with_detach_calls_nothing_back_and_still_cleans_up(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """The widget's cleanup cancels with detach=True: its callbacks would reach deleted Qt objects."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    events, results = [], []
    fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), waitForCompletion=False,
                       progressCallback=events.append, finishedCallback=results.append)
    pump(slicer, lambda: any(e["event"] == "progress" for e in events))
    seen = len(events)
    fake_logic.cancel(detach=True)
    pump(slicer, lambda: not fake_logic.isRunning())
    assert results == [] and len(events) == seen
    assert os.listdir(slicer.app.temporaryPath) == []


def test_cancel_from_a_progress_callback_stops_a_blocking_call(slicer, mod, fake_logic, monkeypatch, tmp_path):
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))

    def cancel_on_progress(event):
        if event["event"] == "progress":
            fake_logic.cancel()

    with pytest.raises(mod.JobCancelledError):
        fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS),
                           progressCallback=cancel_on_progress)
    assert os.listdir(slicer.app.temporaryPath) == [] and not fake_logic.isRunning()


def test_a_blocking_call_keeps_processing_events_and_refuses_a_second_job(slicer, mod, fake_logic, monkeypatch,
                                                                          tmp_path):
    """From the console a blocking call must not freeze Slicer's window: Qt events (here a timer,
    as a button press would be) run while it waits, and a job they start is refused."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    seen = []

    def press_segment_again():
        try:
            fake_logic.segment(volume, model, waitForCompletion=False)
        except RuntimeError as exc:
            seen.append(str(exc))
        fake_logic.cancel()   # end the sleeping job

    import qt
    qt.QTimer.singleShot(0, press_segment_again)
    with pytest.raises(mod.JobCancelledError):
        fake_logic.segment(volume, model)
    assert seen == ["Another VAE-UDA job (segmenting) is running; wait for it, or cancel it (its Cancel button in the "
                    "panel, or VAEUDASegmentationLogic().cancel() in the Python console)."]
    assert not fake_logic.isRunning() and os.listdir(slicer.app.temporaryPath) == []


def test_a_second_logic_cannot_start_a_job_while_another_runs(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """The panel's logic and one made in the console share the engine: one job at a time in Slicer
    (two had run at once and written the same model)."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    other = mod.VAEUDASegmentationLogic()
    other.engineCommand = fake_logic.engineCommand
    fake_logic.segment(volume, model, waitForCompletion=False)
    try:
        with pytest.raises(RuntimeError, match=r"^Another VAE-UDA job \(segmenting\) is running; wait for it, or cancel it \(its Cancel button"):
            other.segment(volume, model, waitForCompletion=False)
    finally:
        fake_logic.cancel()
    while fake_logic.isRunning():
        slicer.app.processEvents()
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "done")       # once it has ended, the other logic may start one
    assert other.segment(volume, model) is not None


def test_engine_sentences_name_the_batch_apis_arguments(mod):
    """The engine speaks of its flags; the console user passed Python arguments."""
    assert mod._asArguments("m: 4 files are not at their recorded paths; pass the volumes with --source-data.") == \
        "m: 4 files are not at their recorded paths; pass the volumes with sourceDataFolder."
    assert mod._asArguments("--n-train 3 is larger; a --label-convention JSON file") == \
        "nTrain 3 is larger; a labelConvention JSON file"
    assert mod._asArguments("--sizes and --seeded stay") == "--sizes and --seeded stay"     # whole flags only
    # the out-of-memory sentence's remedy, which the batch API and the panel now offer
    assert mod._asArguments("out of memory (2 GiB could not be allocated): try a smaller --batch-size, or a "
                            "machine with more memory.") == \
        "out of memory (2 GiB could not be allocated): try a smaller batchSize, or a machine with more memory."
    # ... and the panel names its own fields, the one the failed job reads
    panel = mod.VAEUDASegmentationWidget
    sentence = "out of memory (2 GiB could not be allocated): try a smaller batchSize, or a machine with more memory."
    assert panel.asPanelFields("segment", sentence) == sentence.replace("batchSize",
                                                                         "'Segmentation batch size' (Advanced)")
    for action in ("train", "adapt"):
        assert panel.asPanelFields(action, sentence) == sentence.replace("batchSize",
                                                                         "'Training batch size' (Advanced)")
    assert panel.asPanelFields("adapt", "pass the volumes with sourceDataFolder.") == \
        "pass the volumes with 'Source training data' (2. Adapt)."
    assert panel.asPanelFields("evaluate", sentence) == sentence


def test_bad_inputs_are_refused_with_one_sentence_before_anything_runs(slicer, mod, fake_logic, tmp_path):
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"absent\.safetensors: model file not found\."):
        fake_logic.segment(volume, tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=r"notes\.txt: not a VAE-UDA model file"):
        fake_logic.segment(volume, tmp_path / "notes.txt")
    label = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match=f"The input volume must be a scalar volume, not the label map "
                                         f"'{label.GetName()}'"):
        fake_logic.segment(label, write_fake_model(tmp_path / "m.safetensors", MMWHS))
    rgb = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5, 3), np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="has 3 components per voxel; select a single-channel"):
        fake_logic.segment(rgb, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="at least one target volume"):
        fake_logic.adapt(tmp_path / "m.safetensors", [], tmp_path / "adapted.safetensors")
    assert not (tmp_path / "args.json").exists()          # the engine never ran
    assert os.listdir(slicer.app.temporaryPath) == []


def test_adapt_never_writes_its_model_over_a_labelled_source_volume(slicer, mod, fake_logic, tmp_path, monkeypatch):
    """The engine writes a temporary file, moved into place after the job: it cannot see an output
    that replaces a volume of sourceDataFolder or one the source model records (both had been
    overwritten). A relative sourceDataFolder reaches the engine, which runs elsewhere, made absolute."""
    from vaeuda.labels import MMWHS
    source = write_fake_model(tmp_path / "source.safetensors", MMWHS)
    target = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    data = tmp_path / "mr"
    data.mkdir()
    image = data / "mr_1001_image.nii.gz"
    image.write_bytes(b"labelled MR")
    with pytest.raises(ValueError, match=f"^{re.escape(str(image))}: is also an input, which is never overwritten"):
        fake_logic.adapt(source, target, image, sourceDataFolder=data)
    meta = mod.readModelMetadata(source)
    meta["provenance"] = {"source_data": [str(image)], "source_labels": [str(data / "mr_1001_label.nii.gz")]}
    header = json.dumps({"__metadata__": {"format": mod.MODEL_FORMAT, "format_version": "2",
                                          "meta": json.dumps(meta)}}).encode()
    write_header(tmp_path / "recorded.safetensors", header)
    with pytest.raises(ValueError, match="is also an input, which is never overwritten"):
        fake_logic.adapt(tmp_path / "recorded.safetensors", target, image)
    (data / "mr_1001_label.nii.gz").write_bytes(b"MR labels")           # the recorded labels are inputs too
    with pytest.raises(ValueError, match="mr_1001_label.nii.gz: is also an input, which is never overwritten"):
        fake_logic.adapt(tmp_path / "recorded.safetensors", target, data / "mr_1001_label.nii.gz")
    assert image.read_bytes() == b"labelled MR" and not (tmp_path / "args.json").exists()
    assert (data / "mr_1001_label.nii.gz").read_bytes() == b"MR labels"
    monkeypatch.chdir(tmp_path)
    fake_logic.adapt("source.safetensors", target, tmp_path / "adapted.safetensors", sourceDataFolder="mr")
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[args.index("--source-data") + 1] == str(data)
    assert args[args.index("--model") + 1] == source                  # the model file too


def test_console_arguments_are_refused_as_the_console_passed_them(slicer, mod, fake_logic, tmp_path):
    """A removed node ran a whole job before "was removed while the job ran"; None for a cohort count
    reached the engine as the text 'None'; the output folder's refusal named the engine's --out; an
    unset training folder read "None: training data folder not found"."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    slicer.mrmlScene.RemoveNode(volume)
    with pytest.raises(ValueError, match=r"^The input volume 'ct_case' is in no scene \(removed from it\?\)"):
        fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS))
    with pytest.raises(ValueError, match=r"^nSource must be a whole number of at least 1, not None\.$"):
        fake_logic.makeTryItCohort(tmp_path / "c", nSource=None)
    with pytest.raises(ValueError, match=r"is named like a file, but outputFolder takes the folder"):
        fake_logic.makeTryItCohort(tmp_path / "c.json")
    for unset in (None, ""):
        with pytest.raises(ValueError, match=r"^Choose the training data folder\.$"):
            fake_logic.trainSource(unset, tmp_path / "m2.safetensors")
    assert not (tmp_path / "args.json").exists() and os.listdir(slicer.app.temporaryPath) == []


def test_adapt_writes_every_target_and_moves_the_model_into_place(slicer, mod, fake_logic, tmp_path):
    from vaeuda.labels import MMWHS
    source = write_fake_model(tmp_path / "source.safetensors", MMWHS)
    targets = [add_volume(slicer, np.zeros((3, 4, 5), np.float32), name) for name in ("ct_a", "ct_b")]
    destination = tmp_path / "models" / "adapted.safetensors"
    result = fake_logic.adapt(source, targets, destination, iterations=5, seed=3, device="cpu", portable=True,
                              batchSize=4)
    assert result == str(destination) and destination.read_text() == "fake model\n"
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[0] == "adapt" and args[args.index("--model") + 1] == source
    assert args[args.index("--iterations") + 1] == "5" and args[args.index("--seed") + 1] == "3"
    assert args[args.index("--batch-size") + 1] == "4"
    assert args[args.index("--device") + 1] == "cpu" and "--portable" in args
    assert [os.path.basename(a) for a in args[-2:]] == ["target_0.nii.gz", "target_1.nii.gz"]
    # the engine wrote into the job's temporary folder, which is gone; only the destination remains
    assert os.path.dirname(args[args.index("--out") + 1]) != str(destination.parent)
    assert os.listdir(slicer.app.temporaryPath) == [] and os.listdir(destination.parent) == ["adapted.safetensors"]
    # a name without .safetensors reaches the engine as it is, which notes that the dialogs will not list it
    fake_logic.adapt(source, targets, tmp_path / "models" / "adapted")
    args = json.loads((tmp_path / "args.json").read_text())
    assert os.path.basename(args[args.index("--out") + 1]) == "model"
    # an emptied source-data field is no folder: the source model's own record of its MR volumes is read
    fake_logic.adapt(source, targets, tmp_path / "models" / "adapted", sourceDataFolder="")
    assert "--source-data" not in json.loads((tmp_path / "args.json").read_text())


def test_train_source_gives_the_engine_absolute_paths_conventions_by_name_and_a_seed_of_0(slicer, mod, fake_logic,
                                                                                          monkeypatch, tmp_path):
    """The engine runs in the job's temporary folder: a relative data folder or label-mapping file reaches it
    made absolute, a built-in convention by its name; seed 0 is a seed like any other (None is the default)."""
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "mr_1_image.nii.gz").write_bytes(b"image")
    (tmp_path / "conv.json").write_text('{"LV-M": 205, "LA-B": 420, "LV-B": 500, "A-A": 820}')
    monkeypatch.chdir(tmp_path)
    fake_logic.trainSource("mr", "out.safetensors", labelConvention="conv.json", seed=0)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[-1] == str(tmp_path / "mr")
    assert args[args.index("--label-convention") + 1] == str(tmp_path / "conv.json")
    assert args[args.index("--seed") + 1] == "0" and "--iterations" not in args
    for name in ("mmwhs", "consecutive"):
        fake_logic.trainSource("mr", "out.safetensors", labelConvention=name)
        args = json.loads((tmp_path / "args.json").read_text())
        assert args[args.index("--label-convention") + 1] == name and "--seed" not in args


def test_segment_reads_the_label_values_the_model_file_names(slicer, mod, fake_logic, tmp_path):
    """The engine writes each structure with the model's own convention (its from_index): a model whose LV
    myocardium is 500 and LV blood cavity 205 gets its segments from those values, not from the MM-WHS guess."""
    array = np.random.default_rng(3).normal(size=(5, 6, 7)).astype(np.float32)
    volume = add_volume(slicer, array)
    swapped = {"name": "swapped", "from_index": [0, 500, 420, 205, 820], "unknown": "error"}
    model = fake_engine.write_model(tmp_path / "swapped.safetensors", swapped, mod.MODEL_FORMAT)
    result = fake_logic.segment(volume, model)
    written = fake_engine.fake_labels(array)          # the stand-in writes MM-WHS values whatever the model
    for structure, value in zip(mod.STRUCTURES, (500, 420, 205, 820)):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result, structure.key)
        assert np.count_nonzero(mask) and np.array_equal(mask > 0, written == value), structure.name


def test_engine_sentences_name_the_volumes_not_the_jobs_temporary_files(slicer, mod, fake_logic, monkeypatch,
                                                                          tmp_path):
    from vaeuda.labels import MMWHS
    source = write_fake_model(tmp_path / "source.safetensors", MMWHS)
    targets = [add_volume(slicer, np.zeros((3, 4, 5), np.float32), name) for name in ("ct_a", "ct_b")]
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "fail")   # its sentence names the last target's file
    with pytest.raises(mod.JobFailedError, match=rf"^Volume 'ct_b': {re.escape(fake_engine.FAIL_REASON)}$"):
        fake_logic.adapt(source, targets, tmp_path / "adapted.safetensors")
    # the longer of two paths that begin alike is named first; a name inside a sentence keeps its case
    names = {"/t/in.nii": "volume 'a'", "/t/in.nii.gz": "volume 'b'"}
    assert mod._namePaths("/t/in.nii.gz: bad; /t/in.nii: worse", names) == "Volume 'b': bad; volume 'a': worse"
    assert mod._namePaths("cannot read /t/in.nii", names) == "cannot read volume 'a'"


def test_segment_into_an_existing_node_replaces_its_segments(slicer, mod, fake_logic, tmp_path):
    """Importing a label file: value -> structure, names, colours, terminology, reference, study."""
    from vaeuda.labels import MMWHS
    rng = np.random.default_rng(0)
    array = rng.normal(size=(6, 7, 8)).astype(np.float32)
    volume = add_volume(slicer, array)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    existing = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "old")
    existing.GetSegmentation().AddEmptySegment("junk", "junk", [1.0, 0.0, 0.0])
    before = scene_node_ids(slicer)

    result = fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), existing)
    assert result is existing and scene_node_ids(slicer) == before       # no temporary node left behind
    args = json.loads((tmp_path / "args.json").read_text())
    assert "--cpu-bf16" not in args and "--portable" not in args      # fp32, this CPU's kernels, unless asked
    segmentation = existing.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == \
        ["LV-M", "LA-B", "LV-B", "A-A"]
    expected = fake_engine.fake_labels(array)
    for structure in mod.STRUCTURES:
        segment = segmentation.GetSegment(structure.key)
        assert segment.GetName() == structure.name and segment.GetColor() == structure.color
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        import vtk
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        assert tag.get() == mod.terminologyEntry(structure)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(existing, structure.key)   # in the reference geometry
        assert np.array_equal(mask > 0, expected == structure.mmwhs_value)
    assert all(np.count_nonzero(expected == s.mmwhs_value) for s in mod.STRUCTURES)   # every structure compared
    assert existing.GetNodeReference(existing.GetReferenceImageGeometryReferenceRole()) is volume
    assert sh.GetItemParent(sh.GetItemByDataNode(existing)) == study
    fake_logic.segment(volume, str(tmp_path / "m.safetensors"), existing, cpuBf16=True)
    args = json.loads((tmp_path / "args.json").read_text())
    assert "--cpu-bf16" in args and "--portable" not in args and args[-1].endswith("input.nii.gz")
    fake_logic.segment(volume, str(tmp_path / "m.safetensors"), existing, portable=True)
    args = json.loads((tmp_path / "args.json").read_text())
    assert "--portable" in args and "--cpu-bf16" not in args and args[-1].endswith("input.nii.gz")
    assert "--batch-size" not in args                                  # the engine's default
    fake_logic.segment(volume, str(tmp_path / "m.safetensors"), existing, batchSize=2)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[args.index("--batch-size") + 1] == "2" and args[-1].endswith("input.nii.gz")


def test_a_failed_import_leaves_an_existing_segmentation_as_it_was(slicer, mod, fake_logic, tmp_path, monkeypatch):
    """The labels go into a new node first: before, the node's segments were removed, then the import failed."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32))
    existing = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my manual work")
    existing.GetSegmentation().AddEmptySegment("tumour", "tumour", [1.0, 0.0, 0.0])
    before = scene_node_ids(slicer)
    monkeypatch.setattr(slicer.modules.segmentations.logic(), "ImportLabelmapToSegmentationNode", lambda *a: False)
    with pytest.raises(mod.JobFailedError, match="^The segmentation the engine wrote: could not import the labels "
                                                 "into segmentation 'my manual work'") as raised:
        fake_logic.segment(volume, write_fake_model(tmp_path / "m.safetensors", MMWHS), existing)
    assert slicer.app.temporaryPath not in str(raised.value)      # the job's folder is named as the user knows it
    segmentation = existing.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ["tumour"]
    assert scene_node_ids(slicer) == before and os.listdir(slicer.app.temporaryPath) == []


def test_segment_a_transformed_volume_into_a_surface_segmentation(slicer, mod, fake_logic, tmp_path):
    """A volume under a transform: labels, segmentation and reference geometry share that transform
    (Slicer would resample the labels or transform the geometry otherwise; the stand-in refuses);
    a reused node whose source representation is closed surface is switched to binary labelmap."""
    from vaeuda.labels import MMWHS
    array = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    volume = add_volume(slicer, array)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    surfaces = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    converter = slicer.vtkSegmentationConverter
    surfaces.GetSegmentation().SetSourceRepresentationName(converter.GetSegmentationClosedSurfaceRepresentationName())
    surfaces.GetSegmentation().AddEmptySegment("old")
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)

    for output in (None, surfaces):
        result = fake_logic.segment(volume, model, output)
        assert result.GetTransformNodeID() == transform.GetID()
        assert result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole()) is volume
        assert (result.GetSegmentation().GetSourceRepresentationName()
                == converter.GetSegmentationBinaryLabelmapRepresentationName())
        expected = fake_engine.fake_labels(array)
        for structure in mod.STRUCTURES:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(result, structure.key)
            assert np.array_equal(mask > 0, expected == structure.mmwhs_value)
    assert surfaces.GetSegmentation().GetNumberOfSegments() == len(mod.STRUCTURES)


def test_stand_in_segment_ids_follow_slicer(slicer):
    """vtkSegmentation::GenerateUniqueSegmentID: a taken or empty ID gets ``_<counter>``, never refused."""
    segmentation = slicer.vtkSegmentation()
    assert segmentation.AddEmptySegment("LV-M") == "LV-M"
    assert segmentation.AddEmptySegment("LV-M") == "LV-M_1"
    assert segmentation.AddEmptySegment("") == "Segment_2"
    assert segmentation.GetNumberOfSegments() == 3
    segmentation.RemoveAllSegments()                      # and the counter starts again
    assert segmentation.AddEmptySegment("") == "Segment_1"


def test_stand_in_import_adds_a_segment_for_an_unknown_id_and_skips_an_empty_one(slicer):
    """vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode(labelmap, segmentation,
    vtkStringArray*): label value v -> the v-th ID; an ID not in the segmentation becomes a new
    segment named after it; an empty ID leaves its label value out."""
    import vtk
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    ids = vtk.vtkStringArray()
    for segmentId in ("", "new"):
        ids.InsertNextValue(segmentId)
    labels = np.array([[[0, 1, 2, 2]]], np.uint8)
    labelmap = slicer.util.addVolumeFromArray(labels, IJK_TO_RAS, "l", "vtkMRMLLabelMapVolumeNode")
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, node, ids)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ["new"]
    assert segmentation.GetSegment("new").GetName() == "new"
    node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, "new"), labels == 2)


def test_stand_in_add_volume_from_array_refuses_what_slicer_refuses(slicer):
    """util.addVolumeFromArray goes through updateVolumeFromArray: 3-D or 4-D arrays only, no int64."""
    with pytest.raises(RuntimeError, match=r"Unsupported numpy array shape: \(4, 5\)"):
        slicer.util.addVolumeFromArray(np.zeros((4, 5), np.float32))
    with pytest.raises(RuntimeError, match="Unsupported numpy array type: long long"):
        slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.int64))


def test_stand_in_table_columns_are_string_arrays(slicer):
    """vtkMRMLTableNode::AddColumn returns the vtkStringArray it appended, as long as the table; a
    row added later grows every column."""
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    first = table.AddColumn()
    assert first.GetNumberOfValues() == 0
    assert table.AddEmptyRow() == 0 and table.AddEmptyRow() == 1
    second = table.AddColumn()
    assert second.GetNumberOfValues() == 2 and first.GetNumberOfValues() == 2
    table.SetCellText(1, 1, "x")
    assert second.GetValue(1) == "x" and table.GetCellText(1, 1) == "x" and table.GetCellText(1, 0) == ""
    # a cell outside the table: Slicer logs an error and answers False / "", it does not raise
    assert table.SetCellText(2, 0, "y") is False and table.SetCellText(0, 2, "y") is False
    assert table.GetCellText(2, 0) == "" and table.GetNumberOfRows() == 2


def test_stand_in_scene_names_and_references_follow_slicer(slicer):
    """vtkMRMLScene: GenerateUniqueName hands a name out once (UniqueNames), Clear forgets them; RemoveNode
    makes the nodes that referred to the removed one drop their references to nodes not in the scene
    (vtkMRMLNode::UpdateReferences); a node that did not refer to it keeps its own."""
    scene = slicer.mrmlScene
    assert [scene.GenerateUniqueName("x") for _ in range(3)] == ["x", "x_1", "x_2"]
    scene.AddNewNodeByClass("vtkMRMLTableNode", "y_1")
    assert [scene.GenerateUniqueName("y") for _ in range(2)] == ["y", "y_2"]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    kept = scene.AddNewNodeByClass("vtkMRMLTableNode", "kept")
    bystander = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "b")
    segmentation.SetNodeReferenceID("table", table.GetID())
    segmentation.SetNodeReferenceID("dangling", "vtkMRMLTableNode99")
    segmentation.SetNodeReferenceID("kept", kept.GetID())
    bystander.SetNodeReferenceID("dangling", "vtkMRMLTableNode99")
    scene.RemoveNode(table)
    assert segmentation.GetNodeReferenceID("table") is None and segmentation.GetNodeReferenceID("dangling") is None
    assert segmentation.GetNodeReferenceID("kept") == kept.GetID()
    assert bystander.GetNodeReferenceID("dangling") == "vtkMRMLTableNode99"
    scene.Clear()
    assert scene.GenerateUniqueName("x") == "x"
    from slicer.parameterNodeWrapper import GuiConnector

    class Incomplete(GuiConnector):              # Slicer's GuiConnector is an abc.ABC with seven abstract methods
        @staticmethod
        def canRepresent(widget, datatype):
            return False
    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_stand_in_get_node_and_save_node_follow_slicer(slicer, tmp_path):
    """util.getNode: the first node whose name or ID matches, MRMLNodeNotFoundException for none; util.saveNode:
    True once written; a segmentation file holds one label value per segment, named in its Segment<N>_ keys, on
    the reference volume's grid. A file type the stand-in does not write is its limit, not a Slicer refusal."""
    volume = add_volume(slicer, np.zeros((2, 3, 4), np.float32), "ct_case")
    assert slicer.util.getNode("ct_*") is volume and slicer.util.getNode(volume.GetID()) is volume
    with pytest.raises(slicer.util.MRMLNodeNotFoundException):
        slicer.util.getNode("nothing by this name")
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 1, 1:3], labels[1, 2, 3] = 1, 2
    node = make_segmentation(slicer, volume, labels, [("LV-M", "LV myocardium", None), ("LA-B", "LA", None)], "s")
    assert slicer.util.saveNode(node, str(tmp_path / "s.seg.nrrd"))
    image = sitk.ReadImage(str(tmp_path / "s.seg.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(image), labels)
    assert [image.GetMetaData(f"Segment{n}_{key}") for n in (0, 1) for key in ("ID", "LabelValue")] == \
        ["LV-M", "1", "LA-B", "2"]
    with pytest.raises(NotImplementedError, match="stand-in writes segmentations as"):
        slicer.util.saveNode(node, str(tmp_path / "s.vtk"))
    assert not (tmp_path / "s.vtk").exists()


def lv_myocardium_pair(slicer, volume):
    """A segmentation "seg" and a reference "ref" on ``volume`` (3, 4, 5), each one LV myocardium piece, the
    same; neither has the other structures."""
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    return (make_segmentation(slicer, volume, labels, [("LV-M", "LV-M", None)], "seg"),
            make_segmentation(slicer, volume, labels, [("LV-M", "LV myocardium", None)], "ref"))


def make_segmentation(slicer, volume, labels, segments, name):
    """A segmentation node on ``volume``'s geometry: label value v of ``labels`` (K, J, I) -> ``segments[v-1]``,
    each ``(segment ID, name, terminology entry or None)``, imported as a user's own segmentation would be."""
    import vtk
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    segmentIds = vtk.vtkStringArray()
    for segmentId, segmentName, terminology in segments:
        segmentId = segmentation.AddEmptySegment(segmentId, segmentName)
        if terminology is not None:
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        segmentIds.InsertNextValue(segmentId)
    labelmap = slicer.util.addVolumeFromArray(np.asarray(labels), IJK_TO_RAS, "labels", "vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, node, segmentIds)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
    return node


def test_segment_for_structure_prefers_terminology_then_name_then_the_last_number(slicer, mod):
    """Matching reference segments to structures: rank 0 terminology code, 1 name or key, 2 the last
    number in the name (an MM-WHS value or 1..4); the best rank wins whatever the segment order."""
    lvm, lab, lvb, aa = mod.STRUCTURES
    find = mod.VAEUDASegmentationLogic._segmentIdForStructure
    volume = add_volume(slicer, np.zeros((2, 2, 2), np.float32))
    empty = np.zeros((2, 2, 2), np.uint8)

    # Worst rank first, best last: the tagged segment wins over the named and the numbered one.
    node = make_segmentation(slicer, volume, empty, [("Segment_205", "Segment_205", None),
                                                     ("named", "LV myocardium", None),
                                                     ("tagged", "heart muscle", mod.terminologyEntry(lvm))], "ranks")
    assert find(node, lvm) == "tagged"
    node = make_segmentation(slicer, volume, empty, [("Segment_205", "Segment_205", None),
                                                     ("named", "lv-m", None)], "name beats number")
    assert find(node, lvm) == "named"
    assert find(node, lab) is None

    # The label is the last number in the name: "ct_1017 205" is LV-M (205), not 1017 (nothing).
    node = make_segmentation(slicer, volume, empty, [("s1", "ct_1017 205", None), ("s2", "ct_1017 label 3", None),
                                                     ("s3", "Segment_820", None)], "numbers")
    assert [find(node, s) for s in mod.STRUCTURES] == ["s1", None, "s2", "s3"]

    # Rank 1 is also a segment ID equal to the key, whatever the name, and a name padded with spaces.
    node = make_segmentation(slicer, volume, empty, [("LA-B", "my atrium", None), ("x", "  LV blood cavity ", None)],
                             "ids and spaces")
    assert [find(node, s) for s in mod.STRUCTURES] == [None, "LA-B", "x", None]


def like_slicers_pip_install(slicer, body):
    """A fake ``slicer.packaging.pip_install`` with the stand-in's (Slicer's) exact signature: a call
    Slicer's would refuse fails, and ``body`` gets every parameter by name, defaults filled in."""
    signature = inspect.signature(slicer.packaging.pip_install)

    def pip_install(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(**bound.arguments)

    pip_install.__signature__ = signature   # what the module inspects
    return pip_install


def test_requirements_are_installed_only_after_asking_and_never_replace_numpy(slicer, mod, monkeypatch, tmp_path):
    from importlib import metadata
    logic = mod.VAEUDASegmentationLogic()
    logic.requirementsPath = str(tmp_path / "requirements.txt")
    Path(logic.requirementsPath).write_text("# comment\nvaeuda-test-absent-package>=1\nscipy>=1.0\n")
    assert logic.missingPythonRequirements() == ["vaeuda-test-absent-package>=1"]

    importlib.import_module("slicer.packaging")
    asked, installs = [], []

    def record(requirements, constraints, requester, **_):
        installs.append((requirements, Path(constraints).read_text(), requester))

    monkeypatch.setattr(slicer.packaging, "pip_install", like_slicers_pip_install(slicer, record))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or False)
    assert logic.setupPythonRequirements() is False and installs == []       # the user said Cancel
    assert "vaeuda-test-absent-package>=1" in asked[0]

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or True)
    assert logic.setupPythonRequirements() is False                          # still missing after the fake install
    (requirements, constraints, requester), = installs
    assert requirements == ["vaeuda-test-absent-package>=1"] and requester == "VAE-UDA Segmentation"
    assert f"numpy=={metadata.version('numpy')}\n" in constraints
    assert f"SimpleITK=={metadata.version('SimpleITK')}\n" in constraints
    assert f"torch=={metadata.version('torch')}\n" in constraints        # the PyTorch extension's build stays

    slicer.app._testingEnabled = True                                         # Slicer's testing mode: no installs
    asked.clear()
    assert logic.setupPythonRequirements() is False and asked == [] and len(installs) == 1


def test_a_failed_install_returns_false_with_one_message_on_any_slicer(slicer, mod, monkeypatch, tmp_path, caplog):
    """Slicer 5.11 and later: slicer.packaging.pip_install(requirements, constraints=...) shows its
    own failure dialog and raises CalledProcessError; older Slicer has no slicer.packaging, and its
    util.pip_install(requirements) passes a list to pip as its arguments (the constraints file as
    ``-c``). Either way the user sees one error message."""
    import subprocess as sp
    logic = mod.VAEUDASegmentationLogic()
    logic.requirementsPath = str(tmp_path / "requirements.txt")
    Path(logic.requirementsPath).write_text("vaeuda-test-absent-package>=1\n")
    importlib.import_module("slicer.packaging")
    shown, constraintFiles = [], []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: shown.append(text))

    def failed(constraints, requester, **_):
        constraintFiles.append(constraints)
        # as slicer.packaging's progress dialog ends (_pip_install_with_dialog): its own error, then the raise
        slicer.util.errorDisplay("Package installation failed.", windowTitle=f"{requester} - Installation Failed",
                                 detailedText="pip's log")
        raise sp.CalledProcessError(1, "pip install")

    monkeypatch.setattr(slicer.packaging, "pip_install", like_slicers_pip_install(slicer, failed))
    with caplog.at_level(logging.ERROR):
        assert logic.setupPythonRequirements(askConfirmation=False) is False
    assert shown == ["Package installation failed."]                  # one dialog, Slicer's, not a second one
    assert "VAE-UDA Segmentation could not install vaeuda-test-absent-package>=1" in caplog.text
    assert not os.path.exists(constraintFiles[0])                      # its temporary folder is gone

    def refused(**_):
        raise RuntimeError("pip_install(blocking=False) is only supported on the main thread")   # no dialog

    monkeypatch.setattr(slicer.packaging, "pip_install", like_slicers_pip_install(slicer, refused))
    assert logic.setupPythonRequirements(askConfirmation=False) is False
    assert len(shown) == 2 and shown[1].startswith("VAE-UDA Segmentation could not install vaeuda-test-absent-package>=1")

    calls = []

    def oldPipInstall(requirements):                                    # before slicer.packaging
        calls.append(requirements)
        raise sp.CalledProcessError(1, ["pip", "install"])

    monkeypatch.setitem(sys.modules, "slicer.packaging", None)         # `from slicer import packaging` fails
    monkeypatch.delattr(slicer, "packaging")
    monkeypatch.setattr(slicer.util, "pip_install", oldPipInstall)
    assert logic.setupPythonRequirements(askConfirmation=False) is False
    (arguments,) = calls
    assert arguments[0] == "-c" and arguments[2:] == ["vaeuda-test-absent-package>=1"] and len(shown) == 3
    assert not os.path.exists(arguments[1])


def test_requirements_install_through_slicer_pydeps_where_slicer_names_it_so(slicer, mod, monkeypatch, tmp_path):
    """Slicer's main branch had the package installer as slicer.pydeps before naming it slicer.packaging
    (Base/Python/slicer/pydeps.py, the same pip_install signature): found under either name."""
    import types
    logic = mod.VAEUDASegmentationLogic()
    logic.requirementsPath = str(tmp_path / "requirements.txt")
    Path(logic.requirementsPath).write_text("vaeuda-test-absent-package>=1\n")
    importlib.import_module("slicer.packaging")
    installs = []
    pydeps = types.ModuleType("slicer.pydeps")
    pydeps.pip_install = like_slicers_pip_install(
        slicer, lambda requirements, constraints, requester, **_: installs.append((requirements, requester)))
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)         # `import slicer.packaging` fails
    monkeypatch.delattr(slicer, "packaging")
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("util.pip_install was called"))
    assert logic.setupPythonRequirements(askConfirmation=False) is False       # still missing after the fake
    assert installs == [(["vaeuda-test-absent-package>=1"], "VAE-UDA Segmentation")]


@pytest.mark.parametrize("currentUtil", [False, True])
def test_segment_mask_removes_only_the_colour_table_its_export_added(slicer, mod, monkeypatch, currentUtil):
    """Scene names are not unique: a user's node that happens to have the export's name stays. The
    stand-in's util leaves the export's colour table in the scene, as older Slicer does; current
    util.py removes it in its own ``finally`` (modelled here), and segmentMask then removes nothing."""
    removedByUtil = []
    if currentUtil:
        older = slicer.util.arrayFromSegmentBinaryLabelmap

        def current(segmentationNode, segmentId, referenceVolumeNode=None):
            before = {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLColorTableNode")}
            try:
                return older(segmentationNode, segmentId, referenceVolumeNode)
            finally:
                for node in slicer.util.getNodesByClass("vtkMRMLColorTableNode"):
                    if node.GetID() not in before:
                        removedByUtil.append(node.GetName())
                        slicer.mrmlScene.RemoveNode(node)
        monkeypatch.setattr(slicer.util, "arrayFromSegmentBinaryLabelmap", current)
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    labels = np.zeros((3, 4, 5), np.int16)
    labels[1, 1:3, 2:4] = 1
    node = make_segmentation(slicer, volume, labels, [("s1", "LV-M", None)], "user's")
    users = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", mod.TEMPORARY_COLOR_TABLE)
    before = scene_node_ids(slicer)
    mask = mod.segmentMask(node, "s1", volume)
    assert np.array_equal(mask > 0, labels == 1)
    assert removedByUtil == ([mod.TEMPORARY_COLOR_TABLE] if currentUtil else [])   # the export did add one
    assert scene_node_ids(slicer) == before and slicer.mrmlScene.GetNodeByID(users.GetID()) is users


def test_stand_in_geometry_matches_within_slicers_tolerance(slicer):
    """vtkOrientedImageDataResample::DoGeometriesMatch: closer than 1e-4 in every IJK-to-RAS element is the
    same geometry (a NIfTI round trip in float32 moves a -172.4 mm origin by ~6e-6); 1e-3 is not."""
    import vtk
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentIds = vtk.vtkStringArray()
    segmentIds.InsertNextValue(node.GetSegmentation().AddEmptySegment("s1"))
    for offset, matches in ((6e-6, True), (1e-3, False)):
        shifted = IJK_TO_RAS.copy()
        shifted[:3, 3] += offset
        labelmap = slicer.util.addVolumeFromArray(np.ones((3, 4, 5), np.int16), shifted, "l", "vtkMRMLLabelMapVolumeNode")
        assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, node, segmentIds)
        if matches:
            assert slicer.util.arrayFromSegmentBinaryLabelmap(node, "s1", volume).sum() == 60
        else:
            with pytest.raises(NotImplementedError, match="does not resample"):
                slicer.util.arrayFromSegmentBinaryLabelmap(node, "s1", volume)


def test_torch_missing_without_the_pytorch_extension_says_how_to_get_it(slicer, mod, monkeypatch):
    logic = mod.VAEUDASegmentationLogic()
    monkeypatch.setattr(logic, "missingPythonRequirements", lambda: ["torch>=2.1"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)                  # `import PyTorchUtils` fails
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: shown.append(text))
    assert logic.setupPythonRequirements(askConfirmation=False) is False
    assert len(shown) == 1 and "install the PyTorch extension from the Extensions Manager" in shown[0]


# ----------------------------------------------------------------------------- real engine, tiny model

def run_engine(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    done = subprocess.run([sys.executable, "-m", "vaeuda", *map(str, args), "--progress", "none"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# After one iteration the tiny model calls every voxel background, which would make the comparison
# vacuous: rewrite its head (through the engine's own model-file API) with large seeded random
# weights and a background bias that never wins, so the untrained features split the volume
# among the structures.
NO_BACKGROUND = """
import torch
from vaeuda.modelfile import read_tensors, save_tensors
tensors, meta, _ = read_tensors("M.safetensors")
weight = tensors["net.seg.head.weight"]
# random head weights give several structures on the nearly uniform features of a 1-iteration model;
# seed 3 gives three with DRN-C-26 (the test below refuses fewer than two, so a weak fixture shows)
weight[:] = 5.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
bias = tensors["net.seg.head.bias"]
bias[:] = 0.0
bias[0] = -10.0
save_tensors("M.safetensors", tensors, meta)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model from a tiny synthetic cohort, made with the engine's command line."""
    work = tmp_path_factory.mktemp("tiny")
    run_engine("synth", "D", "--n-source", 2, "--n-target", 2, "--n-train", 1, "--size", 32, "--seed", 0, cwd=work)
    run_engine("train-source", "--preset", "tiny", "--iterations", 1, "--out", "M.safetensors",
               "D/mr_1001_image.nii.gz", cwd=work)          # its MR training scan: not the whole cohort
    subprocess.run([sys.executable, "-c", NO_BACKGROUND], cwd=work, check=True,
                   env=dict(os.environ, PYTHONPATH=str(MODULE_DIR)))
    return work / "M.safetensors", work / "D"


def test_segment_end_to_end_matches_the_engine_run_directly(slicer, mod, tiny_model, tmp_path):
    model, cohort = tiny_model
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "ct_1002_image.nii.gz")))
    volume = add_volume(slicer, ct, "ct_1002")
    before = scene_node_ids(slicer)

    # The engine on the same file, directly.
    direct_input = tmp_path / "ct_1002.nii.gz"
    slicer.util.exportNode(volume, str(direct_input), {}, world=False)
    run_engine("segment", "--model", model, "--out", tmp_path / "direct", "--device", "cpu", direct_input, cwd=tmp_path)
    direct = sitk.ReadImage(str(tmp_path / "direct" / "ct_1002_seg.nii.gz"))
    given = sitk.ReadImage(str(direct_input))
    assert direct.GetSize() == given.GetSize() and np.allclose(direct.GetOrigin(), given.GetOrigin())
    assert np.allclose(direct.GetDirection(), given.GetDirection()) and np.allclose(direct.GetSpacing(), given.GetSpacing())
    direct_labels = sitk.GetArrayFromImage(direct)

    logic = mod.VAEUDASegmentationLogic()
    events = []
    segmentationNode = logic.segment(volume, str(model), device="cpu", progressCallback=events.append)
    assert events[-1]["event"] == "done" and any(e["event"] == "stage" for e in events)
    # the engine's log names the job's temporary files as the user knows them, not by their paths
    logged = [e["message"] for e in events if e["event"] == "log"]
    assert "Wrote 1 segmentation(s) to a temporary folder, imported from there." in logged
    assert not any(slicer.app.temporaryPath in message for message in logged)
    assert segmentationNode.GetName() == "ct_1002 segmentation"
    assert scene_node_ids(slicer) == before + [segmentationNode.GetID()]
    assert os.listdir(slicer.app.temporaryPath) == []
    role = segmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentationNode.GetNodeReference(role) is volume
    segmentation = segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    for index, structure in enumerate(mod.STRUCTURES):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        assert (segment.GetName(), segment.GetColor()) == (structure.name, structure.color)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)
        assert mask.shape == ct.shape
        assert np.count_nonzero(mask) == np.count_nonzero(direct_labels == structure.mmwhs_value)
        assert np.array_equal(mask > 0, direct_labels == structure.mmwhs_value)
    assert len(set(np.unique(direct_labels).tolist()) - {0}) >= 2, "too few structures found: the comparison would be weak"

    # Evaluating the segmentation against itself: what the engine's metrics give on the same labels
    # (each structure's largest component against the whole of it: 100 % where it is one piece).
    from vaeuda import metrics
    from vaeuda.labels import MMWHS
    classes = MMWHS.encode(direct_labels)
    expected = metrics.evaluate_volume(classes, classes, tuple(reversed(direct.GetSpacing())))
    events.clear()
    table = logic.evaluate(segmentationNode, segmentationNode, progressCallback=events.append)
    assert "Wrote the scores to a temporary file, shown as a table." in [e.get("message") for e in events]
    assert [table.GetColumnName(c) for c in range(4)] == ["Structure", "Dice [%]", "ASSD [mm]", "ASSD [voxel]"]
    assert [table.GetCellText(r, 0) for r in range(5)] == [s.name for s in mod.STRUCTURES] + ["Mean"]
    for row, structure in enumerate(mod.STRUCTURES):
        scores = expected[structure.key]
        assert [table.GetCellText(row, c) for c in (1, 2, 3)] == \
            [f"{scores['dice'] * 100:.2f}", f"{scores['assd_mm']:.2f}", f"{scores['assd_vox']:.2f}"]
    assert any(table.GetCellText(row, 1) == "100.00" for row in range(4))
    assert os.listdir(slicer.app.temporaryPath) == []


def cubes(shape, corners):
    """Class indices 1..4: a 4x4x4 cube of class n+1 with its lowest (k, j, i) corner at ``corners[n]``."""
    labels = np.zeros(shape, np.uint8)
    for value, (k, j, i) in enumerate(corners, start=1):
        labels[k:k + 4, j:j + 4, i:i + 4] = value
    return labels


def test_evaluate_scores_shifted_cubes_in_mm_and_voxels_in_the_volume_geometry(slicer, mod):
    """Each structure a 4x4x4 cube; the reference is shifted one voxel along k (LV-M), j (LA-B), i (LV-B)
    or not at all (A-A), on a volume with spacing i 0.8, j 1.2, k 1.5 mm (IJK_TO_RAS).

    Expected, by hand, from Docs/metrics.md: Dice = 2*48/(64+64) = 0.75. A cube's surface is its
    64 - 8 = 56 voxels outside the 2x2x2 core. For a shift of one voxel along axis a: the 16 voxels
    of the face left behind are one step (spacing s_a) from the other cube's surface, the 4 core-adjacent
    voxels of the opposite face lie in the other cube's core, one step from its surface along the
    finest axis (i, 0.8 mm); the other 36 are on both surfaces (0). Both directions are alike, so
    ASSD = (16 s_a + 4 * 0.8) / 56: k 27.2/56, j 22.4/56, i 16/56 mm; 20/56 voxels for every shift.
    """
    shape = (7, 7, 25)                                    # (K, J, I), cubes apart and off the border
    corners = [(1, 1, 1), (1, 1, 7), (1, 1, 13), (1, 1, 19)]
    shifts = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)]
    volume = add_volume(slicer, np.zeros(shape, np.float32))
    prediction = make_segmentation(
        slicer, volume, cubes(shape, corners),
        [(s.key, s.name, mod.terminologyEntry(s)) for s in mod.STRUCTURES], "ct_case segmentation")
    # The reference as a user's file import names it: by value, key, name, or number.
    reference = make_segmentation(
        slicer, volume, cubes(shape, [tuple(np.add(c, d)) for c, d in zip(corners, shifts)]),
        [("Segment_1", "Segment_205", None), ("Segment_2", "LA-B", None), ("Segment_3", "lv blood cavity", None),
         ("Segment_4", "ct_1017 820", None)], "ct_case reference")
    before = scene_node_ids(slicer)

    table = mod.VAEUDASegmentationLogic().evaluate(prediction, reference)
    assert scene_node_ids(slicer) == before + [table.GetID()] and os.listdir(slicer.app.temporaryPath) == []
    assert [table.GetColumnName(c) for c in range(4)] == ["Structure", "Dice [%]", "ASSD [mm]", "ASSD [voxel]"]
    expected = [(75.0, 27.2 / 56, 20 / 56), (75.0, 22.4 / 56, 20 / 56), (75.0, 16 / 56, 20 / 56), (100.0, 0.0, 0.0)]
    expected.append(tuple(np.mean(expected, axis=0)))    # Mean: 81.25, 65.6/224, 15/56
    names = [s.name for s in mod.STRUCTURES] + ["Mean"]
    assert [[table.GetCellText(r, c) for c in range(4)] for r in range(5)] == \
        [[name] + [f"{v:.2f}" for v in values] for name, values in zip(names, expected)]
    assert [table.GetCellText(4, c) for c in (1, 2, 3)] == ["81.25", "0.29", "0.27"]


def test_try_it_cohort_with_the_panel_defaults_separates_the_mr_training_volumes(slicer, mod, tmp_path):
    """The panel calls makeTryItCohort with its defaults; its source-training folder is what the
    panel trains on, so it must hold the labelled MR training pairs and nothing else (no CT)."""
    cohort = mod.VAEUDASegmentationLogic().makeTryItCohort(tmp_path / "cohort")
    splits = json.loads((Path(cohort.folder) / "splits.json").read_text())
    assert len(splits["mr"]["train"]) == 4 and splits["ct"]["test"]
    # Docs/slicer.md: 6 MR, 6 CT, 4 of each for training, 64 voxels a side
    assert [(len(splits[m]["train"]), len(splits[m]["test"])) for m in ("mr", "ct")] == [(4, 2), (4, 2)]
    assert sitk.ReadImage(str(Path(cohort.folder) / f"{splits['ct']['test'][0]}_image.nii.gz")).GetSize() == (64, 64, 64)
    assert sorted(os.listdir(cohort.sourceTrainingFolder)) == sorted(
        f"{prefix}_{kind}.nii.gz" for prefix in splits["mr"]["train"] for kind in ("image", "label"))
    for name in os.listdir(cohort.sourceTrainingFolder):
        assert (Path(cohort.sourceTrainingFolder) / name).read_bytes() == (Path(cohort.folder) / name).read_bytes()
    assert cohort.volumeNode.GetName() == splits["ct"]["test"][0]


def test_a_try_it_cohort_that_fails_to_load_leaves_no_node_and_no_folder(slicer, mod, tmp_path, monkeypatch):
    """All or nothing: before, the CT stayed loaded and the folder stayed, refusing the next try."""
    before = scene_node_ids(slicer)
    logic = mod.VAEUDASegmentationLogic()
    with monkeypatch.context() as failing:
        failing.setattr(slicer.modules.segmentations.logic(), "ImportLabelmapToSegmentationNode", lambda *a: False)
        with pytest.raises(mod.JobFailedError, match="could not import the labels"):
            logic.makeTryItCohort(tmp_path / "cohort", nSource=2, nTarget=2, nTrain=1, size=16)
    assert scene_node_ids(slicer) == before and not (tmp_path / "cohort").exists()
    assert os.listdir(slicer.app.temporaryPath) == []
    assert logic.makeTryItCohort(tmp_path / "cohort", nSource=2, nTarget=2, nTrain=1, size=16).volumeNode is not None


def test_try_it_cohort_then_train_source_with_the_real_engine(slicer, mod, tmp_path, portable_torch):
    logic = mod.VAEUDASegmentationLogic()
    cohort = logic.makeTryItCohort(tmp_path / "cohort", nSource=2, nTarget=2, nTrain=1, size=32)
    assert (Path(cohort.folder) / "splits.json").is_file()
    assert cohort.volumeNode.GetName() == "ct_1002"                    # the first test CT
    reference = cohort.referenceSegmentationNode
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cohort" / "ct_1002_label.nii.gz")))
    for structure in mod.STRUCTURES:
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(reference, structure.key, cohort.volumeNode)
        assert np.array_equal(mask > 0, label == structure.mmwhs_value)
    with pytest.raises(ValueError, match="must be new or empty"):
        logic.makeTryItCohort(tmp_path / "cohort")

    model = logic.trainSource(cohort.sourceTrainingFolder, tmp_path / "out" / "tiny.safetensors", preset="tiny",
                              iterations=1, seed=0, device="cpu", inputSize=48, portable=True, intensityRemap=True)
    assert model == str(tmp_path / "out" / "tiny.safetensors")
    metadata = mod.readModelMetadata(model)
    assert [Path(p).name for p in metadata["provenance"]["source_data"]] == ["mr_1001_image.nii.gz"]
    assert mod.labelValuesOfModel(metadata) == [0, 205, 420, 500, 820]
    assert metadata["config"]["input_size"] == 48                       # the tiny preset's own is 32
    assert metadata["provenance"]["numerics"]["portable"] is True
    assert metadata["train"]["intensity_remap"] is True
    assert os.listdir(slicer.app.temporaryPath) == []


DOCS_SLICER = HERE.parent / "Docs" / "slicer.md"


def docs_console_examples():
    """The Python blocks of Docs/slicer.md that follow a ``<!-- console-example: ... -->`` marker, in order."""
    text = DOCS_SLICER.read_text(encoding="utf-8")
    return re.findall(r"^<!-- console-example:[^\n]*-->\n```python\n(.*?)^```", text, re.S | re.M)


def test_the_docs_console_examples_run_as_written(slicer, mod, tmp_path, monkeypatch, capsys):
    """Docs/slicer.md's scripting examples, run as a user pastes them, but on a tiny cohort (its "/data/"
    paths moved here) and short (the tiny preset, 1 iteration): a renamed method, argument or event key
    there fails here. The background example runs twice: waited for, then cancelled at once as written."""
    batch, background = docs_console_examples()
    assert "# ... later, if needed:\n" in background, "the test splits the background example at this line"
    data = tmp_path / "data"
    run_engine("synth", "cohort", "--n-source", 2, "--n-target", 3, "--n-train", 1, "--size", 32, cwd=tmp_path)
    for source, target in (("mr_1001_image", "mmwhs/mr_train/mr_1001_image"),
                           ("mr_1001_label", "mmwhs/mr_train/mr_1001_label"),
                           ("ct_1002_image", "ct/ct_1017_image"), ("ct_1002_label", "ct/ct_1017_label"),
                           ("ct_1003_image", "ct/ct_1018_image")):
        (data / target).parent.mkdir(parents=True, exist_ok=True)
        os.link(tmp_path / "cohort" / f"{source}.nii.gz", data / f"{target}.nii.gz")
    logic_class = mod.VAEUDASegmentationLogic
    train, adapt = logic_class.trainSource, logic_class.adapt   # the docs' preset and defaults take minutes
    monkeypatch.setattr(logic_class, "trainSource",
                        lambda self, *a, **k: train(self, *a, **{**k, "preset": "tiny", "iterations": 1}))
    monkeypatch.setattr(logic_class, "adapt", lambda self, *a, **k: adapt(self, *a, **{**k, "iterations": 1}))
    console = {"getNode": slicer.util.getNode}    # Slicer's console has slicer.util's names (slicerqt.py)

    def paste(code):
        assert '"/data/' in code
        exec(compile(code.replace("/data/", f"{data}/"), str(DOCS_SLICER), "exec"), console)

    paste(batch)
    assert capsys.readouterr().out.splitlines() == ["ct_1017 done", "ct_1018 done"]
    assert sorted(os.listdir(data / "ct_segmented")) == ["ct_1017.seg.nrrd", "ct_1018.seg.nrrd"]
    for case in ("ct_1017", "ct_1018"):
        saved = sitk.ReadImage(str(data / "ct_segmented" / f"{case}.seg.nrrd"))
        assert [saved.GetMetaData(f"Segment{n}_ID") for n in range(4)] == [s.key for s in mod.STRUCTURES]
    assert mod.labelValuesOfModel(mod.readModelMetadata(data / "models" / "adapted.safetensors"))
    assert [n.GetName() for n in slicer.util.getNodes().values()] == ["ct_1017_image"]   # firstCT stays

    start = background.split("# ... later, if needed:\n")[0]
    paste(start)                                   # waited for: progress, then done
    pump(slicer, lambda: not console["logic"].isRunning(), timeout=120)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == ["segment: 100 %", "finished: done "]
    assert slicer.util.getNode("ct_1017_image segmentation").IsA("vtkMRMLSegmentationNode")
    before = scene_node_ids(slicer)
    paste(background)                              # as written: cancelled at once
    pump(slicer, lambda: not console["logic"].isRunning(), timeout=60)
    assert capsys.readouterr().out.splitlines()[-1] == "finished: cancelled Cancelled by the user."
    assert scene_node_ids(slicer) == before and os.listdir(slicer.app.temporaryPath) == []


def test_module_self_test_runs_to_the_end_against_the_stand_in(slicer, mod, capsys):
    """The self-test users run inside Slicer (tiny cohort, tiny model, segment, segment again under a
    transform) also runs here, against the stand-in and the real engine: it must not skip."""
    assert mod.VAEUDASegmentationLogic().missingPythonRequirements() == []
    mod.VAEUDASegmentationTest().runTest()
    printed = capsys.readouterr().out
    assert "Segmenting the volume under a transform" in printed and printed.rstrip().endswith("Test passed")


def test_module_self_test_checks_the_slicer_side_with_the_stand_in_engine_without_torch(slicer, mod, capsys,
                                                                                       monkeypatch):
    """On a fresh install in Slicer's testing mode the engine's packages are missing: the self-test
    then runs the stand-in engine through PythonSlicer and checks the segments against its labels."""
    monkeypatch.setattr(mod.VAEUDASegmentationLogic, "missingPythonRequirements", lambda self: ["torch>=2.1"])
    mod.VAEUDASegmentationTest().runTest()
    printed = capsys.readouterr().out
    assert "stand-in engine" in printed and "Segmenting the volume under a transform" in printed
    assert printed.rstrip().endswith("Test passed")


def test_every_panel_widget_names_a_parameter_of_its_type(mod):
    """The .ui binds widgets to the parameter node by SlicerParameterName; a typo or a type the
    widget cannot show would leave the control silently unconnected in Slicer."""
    import typing
    import xml.etree.ElementTree as ET
    ui = ET.parse(os.path.join(mod.MODULE_DIR, "Resources", "UI", "VAEUDASegmentation.ui"))
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    fields = typing.get_type_hints(mod.VAEUDASegmentationParameterNode, include_extras=True)
    assert set(bound) == set(fields)                       # every parameter shown, every widget bound
    # What Slicer's guiConnectors.py accepts for each widget class the panel uses.
    # ctkPathLineEdit takes pathlib.Path there, and str through the module's own connector.
    shown_by = {"QCheckBox": (bool,), "QSpinBox": (int,), "QComboBox": (int, float, str, bool),
                "ctkPathLineEdit": (pathlib.Path, str), "ctkDirectoryButton": (pathlib.Path,)}
    from slicer.parameterNodeWrapper import Choice
    for name, widget_class in bound.items():
        hint = fields[name]
        annotated = typing.get_origin(hint) is typing.Annotated
        base, extras = (typing.get_args(hint)[0], hint.__metadata__) if annotated else (hint, ())
        if widget_class == "qMRMLNodeComboBox":
            assert base.__name__.startswith("vtkMRML"), name
            continue
        assert base in shown_by[widget_class], (name, widget_class, base)
        if widget_class == "QComboBox":                   # Slicer requires the Choice annotation there
            assert any(isinstance(e, Choice) for e in extras), name


def test_every_parameter_default_passes_its_validators(mod):
    """Slicer's validators check a parameter's values as they are set, and the stand-in's decorator
    checks nothing: a default outside its WithinRange or Choice (a preset renamed in the engine,
    "auto" dropped from the devices) would fail in Slicer only. Each validator refuses what it must."""
    import typing
    from slicer.parameterNodeWrapper import Choice, WithinRange
    fields = typing.get_type_hints(mod.VAEUDASegmentationParameterNode, include_extras=True)
    checked = []
    for name, hint in fields.items():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        default = getattr(mod.VAEUDASegmentationParameterNode, name)
        for validator in hint.__metadata__:
            validator.validate(default)
            checked.append(name)
            outside = validator.maximum + 1 if isinstance(validator, WithinRange) else "not a choice"
            assert isinstance(validator, (WithinRange, Choice)), (name, validator)
            with pytest.raises(ValueError):
                validator.validate(outside)
    assert sorted(checked) == ["adaptIterations", "device", "preset", "seed", "segmentBatchSize", "trainBatchSize",
                               "trainIterations"]


def test_an_unset_model_file_leaves_its_field_empty_not_a_dot(mod):
    """Slicer binds a ctkPathLineEdit to a pathlib.Path, and an unset Path is Path("."): the panel's
    model fields opened reading ".". They are text, bound by the module's own connector, which
    Slicer's registry finds for a ctkPathLineEdit and a str parameter; so is the adaptation's
    source-data folder, which the user must be able to empty again."""
    import typing
    import ctk
    from slicer.parameterNodeWrapper import createGuiConnector
    fields = typing.get_type_hints(mod.VAEUDASegmentationParameterNode, include_extras=True)
    assert {name for name, hint in fields.items() if hint is str} == set(mod.PATH_TEXT_PARAMETERS)
    edit = ctk.ctkPathLineEdit()
    connector = createGuiConnector(edit, fields["segmentModelPath"])
    assert isinstance(connector, mod.PathLineEditToTextConnector) and connector.widget() is edit
    connector.write("")                                    # the parameter's unset value
    assert edit.currentPath == "" and connector.read() == ""
    seen = []
    connector.onChanged(lambda: seen.append(connector.read()))
    edit.currentPath = "/models/adapted.safetensors"        # the user picks a file
    assert seen == ["/models/adapted.safetensors"]
    connector.onChanged(None)                              # disconnected: the widget no longer reports
    edit.currentPath = "/models/other.safetensors"
    assert seen == ["/models/adapted.safetensors"]
    assert mod.PathLineEditToTextConnector.create(edit, pathlib.Path) is None      # Slicer's own connector's type


def test_a_home_relative_path_typed_in_the_console_is_expanded(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """No shell expands "~" in Slicer's console: the logic does, instead of making a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    train = tmp_path / "train"
    train.mkdir()
    model = fake_logic.trainSource("~/train", "~/m.safetensors")
    assert model == str(tmp_path / "m.safetensors") and os.path.isfile(model) and not (tmp_path / "~").exists()


def test_the_evaluation_table_marks_structures_the_reference_lacks(slicer, mod):
    """Their Dice of 0 is no miss of the segmentation's: the row says so, not only the log."""
    scores = {"dice": 0.0, "assd_mm": None, "assd_vox": None}
    result = {"volumes": [{"metrics": {s.key: scores for s in mod.STRUCTURES}}],
              "summary": {"Mean": {"dice": {"mean": 0.0}, "assd_mm": None, "assd_vox": None}}}
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    lacking = mod.STRUCTURES[1].name
    table = mod.VAEUDASegmentationLogic._evaluationTable(result, segmentation, None, [lacking])
    names = [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())]
    assert names == [s.name + (" (no reference)" if s.name == lacking else "") for s in mod.STRUCTURES] + ["Mean"]
    assert [table.GetCellText(1, c) for c in (1, 2, 3)] == ["0.00", "n/a", "n/a"]


class _PanelParameters:
    """The parameter-node wrapper's fields the panel's handlers below read, without the wrapper."""

    def __init__(self, inputVolume=None, outputSegmentation=None):
        self.inputVolume, self.outputSegmentation = inputVolume, outputSegmentation
        self.device, self.cpuBf16, self.portable = "auto", False, False        # Advanced, as the panel starts

    def disconnectGui(self, tag):
        pass


def _bare_panel(mod, parameters):
    """The widget without setup() (the stand-in has no Qt widgets): its handlers' decisions alone."""
    import types
    widget = mod.VAEUDASegmentationWidget()
    widget._parameterNode = parameters
    widget.updates = []
    widget._updateButtonStates = lambda *a: widget.updates.append(parameters.outputSegmentation)
    widget.ui = types.SimpleNamespace(logTextEdit=types.SimpleNamespace(lines=[]), statusLabel=types.SimpleNamespace(),
                                      progressBar=types.SimpleNamespace(setValue=lambda value: None))
    widget.ui.logTextEdit.appendPlainText = widget.ui.logTextEdit.lines.append
    return widget


def test_the_panels_buttons_pass_each_batch_size_to_its_job(mod):
    """Train and Adapt read Advanced's training batch size, Apply its segmentation batch size; 0, the
    panel's default, leaves the engine's own."""
    import types
    jobs = {}

    class RecordingLogic:
        def __getattr__(self, method):
            return lambda *args, **kwargs: jobs.__setitem__(method, kwargs)

    p = _PanelParameters(inputVolume=object())
    p.trainDataFolder, p.trainOutputModelPath = pathlib.Path("/data/mr"), "/models/source.safetensors"
    p.sourceModelPath, p.adaptedModelPath = "/models/source.safetensors", "/models/adapted.safetensors"
    p.segmentModelPath, p.adaptSourceDataFolder = "/models/adapted.safetensors", ""
    p.preset, p.seed, p.trainIterations, p.adaptIterations, p.intensityRemap = "auto", 0, 0, 0, False
    panel = _bare_panel(mod, p)
    panel.logic, panel._runAction = RecordingLogic(), lambda name, start: start()
    panel.ui.targetVolumesSelector = types.SimpleNamespace(checkedNodes=lambda: [])
    for train, segment in ((0, 0), (4, 16)):
        p.trainBatchSize, p.segmentBatchSize = train, segment
        panel.onTrainButton(), panel.onAdaptButton(), panel.onApplyButton()
        assert jobs["trainSource"]["batchSize"] == jobs["adapt"]["batchSize"] == (train or None)
        assert jobs["segment"]["batchSize"] == (segment or None)
    assert mod.VAEUDASegmentationParameterNode.trainBatchSize == 0
    assert mod.VAEUDASegmentationParameterNode.segmentBatchSize == 0


# An engine that writes, to its --json argument, the evaluation a test puts in VAEUDA_TEST_EVALUATION, and ends.
EVALUATING_ENGINE = [sys.executable, "-c", "import json, os, sys; a = sys.argv; "
                     "open(a[a.index('--json') + 1], 'w').write(os.environ['VAEUDA_TEST_EVALUATION']); "
                     "print(json.dumps({'event': 'done', 'outputs': []}))"]


def _evaluating_panel(slicer, mod, monkeypatch, referenceSegments):
    """The panel with the segmentation "seg" (one LV myocardium segment) and the reference "ref" of
    ``referenceSegments`` chosen; its Evaluate runs the module's logic on EVALUATING_ENGINE."""
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    p = _PanelParameters(volume, make_segmentation(slicer, volume, labels, [("LV-M", "LV myocardium", None)], "seg"))
    p.referenceSegmentation = make_segmentation(slicer, volume, labels, referenceSegments, "ref")
    panel = _bare_panel(mod, p)
    panel.logic = mod.VAEUDASegmentationLogic()
    panel.logic.engineCommand = EVALUATING_ENGINE
    monkeypatch.setattr(panel.logic, "setupPythonRequirements", lambda askConfirmation=True: True)
    return panel


def _click_evaluate(slicer, mod, panel, monkeypatch, dice, whileRunning=lambda: None):
    """Press Evaluate with an engine that scores every structure ``dice``; wait for the panel to be ready again."""
    monkeypatch.setenv("VAEUDA_TEST_EVALUATION", json.dumps({
        "volumes": [{"metrics": {s.key: {"dice": dice, "assd_mm": 1.0, "assd_vox": 0.5} for s in mod.STRUCTURES}}],
        "summary": {"Mean": {"dice": {"mean": dice}, "assd_mm": {"mean": 1.0}, "assd_vox": {"mean": 0.5}}}}))
    panel.onEvaluateButton()
    whileRunning()
    pump(slicer, lambda: panel._runningAction is None)


def test_another_input_volume_sets_back_the_output_apply_made_for_the_first(slicer, mod):
    """Apply's result becomes the output (Evaluate takes it); with another input volume the next Apply
    would replace that volume's segments under its name, so the output goes back to a new segmentation.
    A segmentation the user chose, or another change of parameters, is left alone."""
    first, second = (add_volume(slicer, np.zeros((3, 4, 5), np.float32), name) for name in ("ct_a", "ct_b"))
    result = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct_a segmentation")
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    p = _PanelParameters(first, result)
    panel = _bare_panel(mod, p)
    panel._inputVolumeID = first.GetID()
    panel._segmentedVolumes[result.GetID()] = first.GetID()
    panel._onParameterNodeModified()                     # another parameter changed: the result stays
    assert p.outputSegmentation is result
    p.inputVolume = second
    panel._onParameterNodeModified()
    assert p.outputSegmentation is None
    p.inputVolume, p.outputSegmentation = first, result  # back to its own volume: it is that volume's output
    panel._onParameterNodeModified()
    assert p.outputSegmentation is result
    p.outputSegmentation = chosen                        # one the user chose is no result of Apply's
    p.inputVolume = second
    panel._onParameterNodeModified()
    assert p.outputSegmentation is chosen


def test_closing_the_scene_cancels_only_the_jobs_whose_result_belongs_to_it(slicer, mod):
    """Training and adaptation make a file and need no scene: hours of work go on; a segmentation,
    an evaluation or the Try-it cohort belongs to the scene and is cancelled."""
    import types
    for action, cancelled in (("segment", True), ("tryIt", True), ("train", False), ("adapt", False)):
        panel = _bare_panel(mod, _PanelParameters())
        calls = []
        panel.logic = types.SimpleNamespace(isRunning=lambda: True, cancel=lambda **kw: calls.append(kw))
        panel._runningAction = action
        panel._segmentedVolumes["vtkMRMLSegmentationNode1"] = "vtkMRMLScalarVolumeNode1"
        panel.onSceneStartClose(None, None)
        assert calls == ([{"discardFinished": True}] if cancelled else []), action
        assert any("goes on" in line for line in panel.ui.logTextEdit.lines) is not cancelled
        assert panel._segmentedVolumes == {} and panel._parameterNode is None


def test_a_disabled_button_says_what_it_waits_for(mod):
    """Slicer's template puts the reason on the button; a running job's own button cancels it."""
    import types
    p = _PanelParameters()
    p.trainDataFolder, p.trainOutputModelPath = pathlib.Path("."), ""         # unset, as the panel stores them
    p.sourceModelPath = p.adaptedModelPath = p.segmentModelPath = ""
    p.referenceSegmentation = None
    panel = mod.VAEUDASegmentationWidget()
    panel._parameterNode = p
    panel.ui = types.SimpleNamespace(targetVolumesSelector=types.SimpleNamespace(checkedNodes=lambda: []))
    panel._actionButtons = {name: types.SimpleNamespace(enabled=None, text=name, toolTip=f"{name} tip")
                            for name in ("tryIt", "train", "adapt", "segment", "evaluate")}
    panel._buttonTexts = {name: name for name in panel._actionButtons}
    panel._buttonTips = {name: f"{name} tip" for name in panel._actionButtons}
    panel._updateButtonStates()
    buttons = panel._actionButtons
    assert buttons["tryIt"].enabled and buttons["tryIt"].toolTip == "tryIt tip"
    assert not buttons["train"].enabled and buttons["train"].toolTip == mod.VAEUDASegmentationWidget.NOT_READY["train"]
    p.trainDataFolder, p.trainOutputModelPath = pathlib.Path("/data/mr"), "/models/source.safetensors"
    panel._updateButtonStates()
    assert buttons["train"].enabled and buttons["train"].toolTip == "train tip"
    # Advanced settings the engine refuses keep the run buttons waiting, saying which to change
    p.inputVolume, p.segmentModelPath = object(), "/models/adapted.safetensors"
    p.portable, p.device = True, "cuda"
    panel._updateButtonStates()
    assert not buttons["train"].enabled and not buttons["segment"].enabled and buttons["tryIt"].enabled
    assert buttons["train"].toolTip == buttons["segment"].toolTip == (
        "Portable numerics runs on the CPU: set Device to auto or cpu, or uncheck it (Advanced).")
    p.device, p.cpuBf16 = "cpu", True
    panel._updateButtonStates()
    assert buttons["train"].enabled and not buttons["segment"].enabled
    assert buttons["segment"].toolTip.startswith("Portable numerics computes in float32: uncheck it or")
    p.portable = False
    panel._updateButtonStates()
    assert buttons["segment"].enabled and buttons["segment"].toolTip == "segment tip"
    panel._runningAction = "train"
    panel._updateButtonStates()
    assert buttons["train"].text == "Cancel" and buttons["train"].toolTip == mod.CANCEL_TIP
    assert not buttons["segment"].enabled and "Another job is running" in buttons["segment"].toolTip


def test_evaluating_a_segmentation_again_refills_its_table_even_renamed_and_a_deleted_one_is_made_anew(
        slicer, mod, monkeypatch):
    """Each Evaluate added another table named "<segmentation> evaluation". The panel keeps one table per
    segmentation, found by a node reference (the user may rename it), refills and shows it; a new one only
    when it has none or it was deleted. A table deleted while the job runs fails the job in one sentence."""
    panel = _evaluating_panel(slicer, mod, monkeypatch, [("LV-M", "LV myocardium", None)])
    selection = slicer.app.applicationLogic().GetSelectionNode()
    tables = lambda: slicer.util.getNodesByClass("vtkMRMLTableNode")  # noqa: E731
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.5)
    [table] = tables()
    assert table.GetName() == "seg evaluation" and table.GetCellText(0, 1) == "50.00"
    assert selection.GetActiveTableID() == table.GetID()
    assert slicer.app.layoutManager().layout == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView

    table.SetName("seg, first model")                   # renamed: still the segmentation's table
    nodes = scene_node_ids(slicer)
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.75)
    assert tables() == [table] and scene_node_ids(slicer) == nodes and selection.GetActiveTableID() == table.GetID()
    assert table.GetName() == "seg, first model" and table.GetNumberOfRows() == len(mod.STRUCTURES) + 1
    assert [table.GetCellText(row, 1) for row in range(table.GetNumberOfRows())] == ["75.00"] * 5

    slicer.mrmlScene.RemoveNode(table)                  # deleted: the next Evaluate makes a new one
    _click_evaluate(slicer, mod, panel, monkeypatch, 1.0)
    [second] = tables()
    assert second is not table and second.GetName() == "seg evaluation" and second.GetCellText(0, 1) == "100.00"
    assert selection.GetActiveTableID() == second.GetID()

    _click_evaluate(slicer, mod, panel, monkeypatch, 0.25, whileRunning=lambda: slicer.mrmlScene.RemoveNode(second))
    assert tables() == [] and panel.ui.statusLabel.text == "Evaluating: failed."
    assert panel.ui.logTextEdit.lines[-1] == ("Failed: The output table 'seg evaluation' was removed from the scene "
                                              "while the job ran; nothing was imported.")
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.25)
    [third] = tables()
    assert third.GetCellText(0, 1) == "25.00"

    panel._parameterNode.outputSegmentation = make_segmentation(
        slicer, panel._parameterNode.inputVolume, np.zeros((3, 4, 5), np.uint8), [("LV-M", "LV-M", None)], "other")
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.0)     # another segmentation: a table of its own
    assert [t.GetName() for t in tables()] == ["seg evaluation", "other evaluation"]
    assert third.GetCellText(0, 1) == "25.00" and tables()[1].GetCellText(0, 1) == "0.00"


def test_a_table_made_before_the_back_reference_is_still_refilled(slicer, mod, monkeypatch):
    """Tables of scenes saved before the table referred back to its segmentation: refilled as before,
    unless another segmentation refers to it too (then it may be a clone's original's)."""
    panel = _evaluating_panel(slicer, mod, monkeypatch, [("LV-M", "LV myocardium", None)])
    tables = lambda: slicer.util.getNodesByClass("vtkMRMLTableNode")  # noqa: E731
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.5)
    [table] = tables()
    table.SetNodeReferenceID(mod.EVALUATED_SEGMENTATION_REFERENCE_ROLE, None)    # as an older module left it
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.75)
    assert tables() == [table] and table.GetCellText(0, 1) == "75.00"


def test_a_cloned_segmentation_gets_a_table_of_its_own(slicer, mod, monkeypatch):
    """Slicer's vtkMRMLNode::Copy copies node references: a segmentation cloned after Evaluate points at its
    original's table. Evaluating the clone must not overwrite the original's numbers."""
    panel = _evaluating_panel(slicer, mod, monkeypatch, [("LV-M", "LV myocardium", None)])
    tables = lambda: slicer.util.getNodesByClass("vtkMRMLTableNode")  # noqa: E731
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.5)
    [original] = tables()
    p = panel._parameterNode
    clone = make_segmentation(slicer, p.inputVolume, np.zeros((3, 4, 5), np.uint8), [("LV-M", "LV-M", None)],
                              "seg clone")
    clone.SetNodeReferenceID(mod.EVALUATION_TABLE_REFERENCE_ROLE,    # what Copy's CopyReferences leaves
                             p.outputSegmentation.GetNodeReferenceID(mod.EVALUATION_TABLE_REFERENCE_ROLE))
    p.outputSegmentation = clone
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.25)
    assert [t.GetName() for t in tables()] == ["seg evaluation", "seg clone evaluation"]
    assert original.GetCellText(0, 1) == "50.00" and tables()[1].GetCellText(0, 1) == "25.00"
    assert clone.GetNodeReference(mod.EVALUATION_TABLE_REFERENCE_ROLE) is tables()[1]
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.75)            # the clone's own table is refilled
    assert len(tables()) == 2 and tables()[1].GetCellText(0, 1) == "75.00" and original.GetCellText(0, 1) == "50.00"
    # With the original segmentation deleted, Slicer drops its table's back-reference: a second clone of it,
    # which points at that table, takes it over instead of making a third.
    second = make_segmentation(slicer, p.inputVolume, np.zeros((3, 4, 5), np.uint8), [("LV-M", "LV-M", None)],
                               "seg clone 2")
    second.SetNodeReferenceID(mod.EVALUATION_TABLE_REFERENCE_ROLE, original.GetID())
    slicer.mrmlScene.RemoveNode(slicer.mrmlScene.GetFirstNodeByName("seg"))
    assert original.GetNodeReferenceID(mod.EVALUATED_SEGMENTATION_REFERENCE_ROLE) is None
    p.outputSegmentation = second
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.1)
    assert len(tables()) == 2 and original.GetCellText(0, 1) == "10.00"
    assert original.GetNodeReferenceID(mod.EVALUATED_SEGMENTATION_REFERENCE_ROLE) == second.GetID()


def test_evaluate_fills_a_console_table_that_is_in_no_scene(slicer, mod, monkeypatch):
    """Only a table removed from its scene while the job ran fails the job: one made in the console and
    never added to a scene is filled, as before the panel's table reuse."""
    panel = _evaluating_panel(slicer, mod, monkeypatch, [(s.key, s.name, None) for s in mod.STRUCTURES])
    monkeypatch.setenv("VAEUDA_TEST_EVALUATION", json.dumps({
        "volumes": [{"metrics": {s.key: {"dice": 0.5, "assd_mm": 1.0, "assd_vox": 0.5} for s in mod.STRUCTURES}}],
        "summary": {"Mean": {"dice": {"mean": 0.5}, "assd_mm": {"mean": 1.0}, "assd_vox": {"mean": 0.5}}}}))
    table = slicer.vtkMRMLTableNode()
    assert table.GetScene() is None
    p = panel._parameterNode
    assert panel.logic.evaluate(p.outputSegmentation, p.referenceSegmentation, table) is table
    assert table.GetCellText(0, 1) == "50.00" and table.GetScene() is None


def test_evaluate_shows_in_the_panels_log_which_structures_the_reference_lacks(slicer, mod, monkeypatch):
    """That warning went to the Python console alone: the panel shows it in its log box, with the job's
    messages, as the engine's own warnings are shown. A reference with every structure raises none."""
    panel = _evaluating_panel(slicer, mod, monkeypatch, [("LV-M", "LV myocardium", None)])
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.5)
    lines = panel.ui.logTextEdit.lines
    assert lines[:2] == ["--- Evaluating", "note: the reference 'ref' has no segment for LA blood cavity, "
                                           "LV blood cavity, Ascending aorta; scored as empty there."]
    assert panel.ui.statusLabel.text == "Evaluating: done."

    labels = np.zeros((3, 4, 5), np.uint8)
    panel._parameterNode.referenceSegmentation = make_segmentation(
        slicer, panel._parameterNode.inputVolume, labels, [(s.key, s.name, None) for s in mod.STRUCTURES], "full")
    del lines[:]
    _click_evaluate(slicer, mod, panel, monkeypatch, 0.5)
    assert lines[0] == "--- Evaluating" and not any("Warning" in line for line in lines)
    assert panel.ui.statusLabel.text == "Evaluating: done."


def test_entering_and_leaving_the_module_again_and_again_leaves_one_observer_and_one_gui_connection(mod):
    """Each enter() wraps the parameter node anew (logic.getParameterNode). As in Slicer's template
    (TemplateKey.py), setParameterNode disconnects the previous wrapper's GUI and removes its observer, and
    exit() its own: while the panel is shown the node has one observer and one GUI connection of the
    panel's, after it none, however often the user comes and goes."""
    import types

    class ObservedNode:
        """The MRML parameter node: its observers by tag, as vtkObject::AddObserver / RemoveObserver keep them."""

        def __init__(self):
            self.observers, self._tags = {}, iter(range(1, 1000))

        def AddObserver(self, event, callback, priority=0.0):
            tag = next(self._tags)
            self.observers[tag] = (event, callback)
            return tag

        def RemoveObserver(self, tag):
            self.observers.pop(tag, None)

    class Wrapper:
        """A parameterNodeWrapper instance (Slicer's wrapper.py): AddObserver / RemoveObserver go to the wrapped
        node; connectGui returns a tag that disconnectGui takes, ignoring one it did not give (None after exit)."""

        def __init__(self, parameterNode):
            self.parameterNode, self.inputVolume, self._nextTag = parameterNode, None, 0
            for name in mod.PATH_TEXT_PARAMETERS:
                setattr(self, name, "")

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, gui):
            self._nextTag += 1
            connected.add((self, self._nextTag))
            return self._nextTag

        def disconnectGui(self, tag):
            connected.discard((self, tag))

    node, connected, wrappers = ObservedNode(), set(), []

    def getParameterNode():
        wrappers.append(Wrapper(node))
        return wrappers[-1]

    panel = mod.VAEUDASegmentationWidget()
    panel.ui, panel._updateButtonStates = types.SimpleNamespace(), lambda *a: None
    panel.logic = types.SimpleNamespace(getParameterNode=getParameterNode, defaultInputVolume=lambda: None,
                                        isRunning=lambda: False)
    panel.initializeParameterNode()                     # the end of setup(); Slicer then calls enter()
    for _ in range(3):
        panel.enter()
        assert len(node.observers) == 1 and len(connected) == 1
        assert list(connected)[0][0] is wrappers[-1] is panel._parameterNode
        panel.exit()
        assert node.observers == {} and connected == set()
    assert len(wrappers) == 4                           # a new wrapper each time: the old ones hold nothing
    panel.enter()
    panel.cleanup()                                     # a reload or leaving Slicer: nothing stays either
    assert node.observers == {} and connected == set()


def test_the_time_left_reads_in_hours_past_an_hour(mod):
    """A paper-preset training's estimate read "about 183 min 20 s left"."""
    assert [mod._duration(s) for s in (59.9, 125, 3599, 3600, 11000)] == [
        "0 min 59 s", "2 min 5 s", "59 min 59 s", "1 h 0 min", "3 h 3 min"]


def test_the_engines_note_on_what_the_reference_lacks_is_left_to_evaluates_own(mod):
    """evaluate() names the missing segments before the job; the engine's note on the same would name the
    job's temporary reference file. It is dropped for evaluation jobs only; other notes pass, paths named."""
    import types
    from vaeuda.labels import reference_lacks_note
    seen = []
    job = types.SimpleNamespace(name="evaluate", pathNames={"/tmp/x/ref/case_label.nii.gz": "reference segmentation 'r'"},
                                progressCallback=seen.append)
    engine_note = reference_lacks_note(mod.EVALUATION_REFERENCE_FILE, ["LA-B"])
    other = {"event": "log", "message": "note: /tmp/x/ref/case_label.nii.gz is read"}
    mod.VAEUDASegmentationLogic._forward(job, [{"event": "log", "message": engine_note}, other])
    assert seen == [{"event": "log", "message": "note: reference segmentation 'r' is read"}]
    job.name = "segment"
    mod.VAEUDASegmentationLogic._forward(job, [{"event": "log", "message": engine_note}])
    assert seen[-1]["message"] == engine_note


def test_console_arguments_refused_in_one_sentence_before_any_work(slicer, mod, fake_logic, tmp_path):
    """What a console user may type: truthy text for on/off options ("False" switched --portable on), a
    callback that is no function, a folder for a model file, a file for the data folder, a seed the
    generators cannot take, a mistyped convention (the engine had named a path in its temporary
    folder), non-numbers for sizes (argparse's wording before)."""
    from vaeuda.labels import MMWHS
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    data = tmp_path / "mr"
    data.mkdir()
    out = tmp_path / "out.safetensors"
    cases = [
        (lambda: fake_logic.segment(volume, model, portable="False"), "portable must be True or False, not 'False'."),
        (lambda: fake_logic.segment(volume, model, cpuBf16="no"), "cpuBf16 must be True or False, not 'no'."),
        (lambda: fake_logic.segment(volume, model, waitForCompletion=0), "waitForCompletion must be True or False, not 0."),
        (lambda: fake_logic.segment(volume, model, progressCallback=5),
         "progressCallback must be a function (or None), not 5."),
        (lambda: fake_logic.segment(volume, str(tmp_path)), f"{tmp_path}: is a folder, not a model file."),
        (lambda: fake_logic.trainSource(model, out),
         f"{model}: is a file; choose the folder that holds the X_image / X_label pairs."),
        (lambda: fake_logic.trainSource(data, out, seed=2 ** 70),
         f"seed must be at most {2 ** 64 - 1:,}, not {2 ** 70:,}."),
        (lambda: fake_logic.trainSource(data, out, inputSize="abc"),
         "inputSize must be a whole number of at least 1 (or None for the default), not 'abc'."),
        (lambda: fake_logic.trainSource(data, out, labelConvention="MMWHS"),
         "labelConvention 'MMWHS' is neither a built-in convention ('mmwhs', 'consecutive'; lower case) nor an "
         "existing label-mapping JSON file."),
        (lambda: fake_logic.makeTryItCohort(str(tmp_path / "cohort"), size=True),
         "size must be a whole number of at least 1 (or None for the default), not True."),
        (lambda: fake_logic.segment(volume, model, batchSize=0),
         "batchSize must be a whole number of at least 1 (or None for the default), not 0."),
        (lambda: fake_logic.trainSource(data, out, batchSize=513), "batchSize must be at most 512, not 513."),
        (lambda: fake_logic.adapt(model, [volume], out, batchSize=513), "batchSize must be at most 512, not 513."),
        (lambda: fake_logic.adapt(model, [volume], out, batchSize=2.0),
         "batchSize must be a whole number of at least 1 (or None for the default), not 2.0."),
        (lambda: fake_logic.trainSource(data, out, labelConvention=""),
         "labelConvention must be a built-in convention ('mmwhs', 'consecutive') or a label-mapping JSON file, not ''."),
        (lambda: fake_logic.trainSource(data, out, iterations=10_000_001),
         "iterations must be at most 10,000,000, not 10,000,001."),
        (lambda: fake_logic.adapt(model, [volume], out, iterations=10_000_001),
         "iterations must be at most 10,000,000, not 10,000,001."),
        (lambda: fake_logic.makeTryItCohort(str(tmp_path / "cohort"), seed=2 ** 64),
         f"seed must be at most {2 ** 64 - 1:,}, not {2 ** 64:,}."),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
    assert os.listdir(slicer.app.temporaryPath) == [] and not (tmp_path / "args.json").exists()
    # NumPy's integers are whole numbers (an np.int64 read from an array)
    (data / "mr_1_image.nii.gz").write_bytes(b"image")
    fake_logic.trainSource(data, out, iterations=np.int64(5), seed=np.int64(2), batchSize=np.int64(3))
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[args.index("--iterations") + 1] == "5" and args[args.index("--seed") + 1] == "2"
    assert args[args.index("--batch-size") + 1] == "3"


def test_inputs_the_engine_reads_beside_the_given_ones_are_never_overwritten(slicer, mod, fake_logic, tmp_path):
    """The engine writes a temporary model file and cannot see the move that follows: a single source image's
    X_label twin, or the label-mapping file, given as the output were replaced by the model."""
    from vaeuda.labels import MMWHS
    source = write_fake_model(tmp_path / "source.safetensors", MMWHS)
    mr = tmp_path / "mr"
    mr.mkdir()
    (mr / "mr_1_image.nii.gz").write_bytes(b"image")
    (mr / "mr_1_label.nii.gz").write_bytes(b"label")
    target = add_volume(slicer, np.ones((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=f"^{re.escape(str(mr / 'mr_1_label.nii.gz'))}: is also an input"):
        fake_logic.adapt(source, target, mr / "mr_1_label.nii.gz", sourceDataFolder=mr / "mr_1_image.nii.gz")
    (mr / "mr_2_image.nii.gz").write_bytes(b"image")
    (mr / "mr_2_Label.nii.gz").write_bytes(b"label")        # its twin in another case: the engine reads it too
    with pytest.raises(ValueError, match=f"^{re.escape(str(mr / 'mr_2_Label.nii.gz'))}: is also an input"):
        fake_logic.adapt(source, target, mr / "mr_2_Label.nii.gz", sourceDataFolder=mr / "mr_2_image.nii.gz")
    assert (mr / "mr_2_Label.nii.gz").read_bytes() == b"label"
    mapping = tmp_path / "conv.json"
    mapping.write_text('{"LV-M": 205, "LA-B": 420, "LV-B": 500, "A-A": 820}')
    with pytest.raises(ValueError, match=f"^{re.escape(str(mapping))}: is also an input"):
        fake_logic.trainSource(mr, mapping, labelConvention=str(mapping))
    assert (mr / "mr_1_label.nii.gz").read_bytes() == b"label" and mapping.read_text().startswith('{"LV-M"')
    assert os.listdir(slicer.app.temporaryPath) == []


def test_a_sheared_or_empty_volume_is_refused_before_its_job(slicer, mod, fake_logic, tmp_path):
    """NIfTI keeps only perpendicular axes: a sheared volume came back segmented on another grid, without
    a word; a volume of 0 voxels got "could not write" naming a deleted temporary file."""
    from vaeuda.labels import MMWHS
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    sheared = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32),
                                             [[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "sheared")
    with pytest.raises(ValueError, match=r"^Volume 'sheared': its IJK-to-RAS axes are not perpendicular \(off by 0.45"):
        fake_logic.segment(sheared, model)
    # the tolerance is 1e-4: column j (3e-4, 1, 0) is 3e-4 (cosine) off perpendicular to column i; 5e-5 passes
    slight = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32),
                                            [[1, 3e-4, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "slight")
    with pytest.raises(ValueError, match=r"^Volume 'slight': its IJK-to-RAS axes are not perpendicular \(off by 0.0003:"):
        fake_logic.segment(slight, model)
    within = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32),
                                            [[1, 5e-5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "within")
    fake_logic._requireUsableVolume(within)
    empty = slicer.util.addVolumeFromArray(np.zeros((0, 4, 5), np.float32), IJK_TO_RAS, "nothing")
    with pytest.raises(ValueError, match="^Volume 'nothing' has no voxels.$"):
        fake_logic.segment(empty, model)
    assert os.listdir(slicer.app.temporaryPath) == [] and not (tmp_path / "args.json").exists()
    assert mod.AXES_TOLERANCE == __import__("vaeuda.volumes", fromlist=["x"]).GEOMETRY_TOLERANCE


def test_a_second_job_is_refused_before_its_volumes_are_written_and_any_logic_cancels(slicer, mod, fake_logic,
                                                                                       monkeypatch, tmp_path):
    """The refusal came after every target volume had been compressed to a file; cancel() on a logic made
    in the console did nothing to the panel's job."""
    from vaeuda.labels import MMWHS
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    model = write_fake_model(tmp_path / "m.safetensors", MMWHS)
    results = []
    fake_logic.segment(volume, model, waitForCompletion=False, finishedCallback=results.append)
    written = []
    monkeypatch.setattr(slicer.util, "exportNode", lambda *a, **k: written.append(a) or True)
    console = mod.VAEUDASegmentationLogic()
    with pytest.raises(RuntimeError, match=r"^Another VAE-UDA job \(segmenting\) is running"):
        console.adapt(model, [volume, volume], tmp_path / "a.safetensors")
    assert written == [] and len(os.listdir(slicer.app.temporaryPath)) == 1      # the running job's folder alone
    console.cancel()
    pump(slicer, lambda: results)
    assert results[0].status == "cancelled" and not fake_logic.isRunning()


def test_evaluate_imports_nothing_for_a_segmentation_removed_while_it_ran(slicer, mod, fake_logic, monkeypatch):
    """segment refused to import for a removed node; evaluate made a table for it."""
    monkeypatch.setenv("VAEUDA_FAKE_MODE", "sleep")
    volume = add_volume(slicer, np.zeros((3, 4, 5), np.float32))
    seg, ref = lv_myocardium_pair(slicer, volume)
    results = []
    fake_logic.evaluate(seg, ref, waitForCompletion=False, finishedCallback=results.append)
    job = fake_logic._job
    slicer.mrmlScene.RemoveNode(seg)
    job.process.cancel()                                            # stop the sleeping stand-in engine, then let
    job.process.cancelRequested = False                             # the job end as one that succeeded would
    monkeypatch.setattr(job.process.process, "poll", lambda: 0)
    job.process.doneSeen = True
    pump(slicer, lambda: results)
    assert results[0].status == "failed"
    assert results[0].message == "The segmentation 'seg' was removed from the scene while the job ran; nothing was imported."
    assert not slicer.util.getNodesByClass("vtkMRMLTableNode")


def test_a_volume_far_from_the_origin_gets_its_segmentation_on_its_exact_grid(slicer, mod, tiny_model):
    """NIfTI stores the grid in 32-bit floats: an origin 1e5 mm away came back 3e-3 mm off, beyond the 1e-4
    within which Slicer takes two grids for one; the labels now take the volume's own grid."""
    model, cohort = tiny_model
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "ct_1002_image.nii.gz")))
    far = IJK_TO_RAS.copy()
    far[:3, 3] = (100000.3, -54321.7, 76543.1)
    volume = slicer.util.addVolumeFromArray(ct, far, "far")
    segmentationNode = mod.VAEUDASegmentationLogic().segment(volume, str(model), device="cpu")
    segmentId = segmentationNode.GetSegmentation().GetNthSegmentID(0)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)   # refuses another grid
    assert mask.shape == ct.shape
    assert np.array_equal(volume._ijkToRAS, far)                                                # the input unchanged


def test_a_relative_output_is_the_one_of_the_folder_current_at_the_call(slicer, mod, fake_logic, monkeypatch, tmp_path):
    """The model is moved into place when a background job ends: after an os.chdir meanwhile, a relative
    output had landed in the new current folder."""
    from vaeuda.labels import MMWHS
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    results = []
    fake_logic.adapt(write_fake_model(tmp_path / "source.safetensors", MMWHS),
                     [add_volume(slicer, np.ones((3, 4, 5), np.float32))], "adapted.safetensors",
                     waitForCompletion=False, finishedCallback=results.append)
    monkeypatch.chdir(second)
    pump(slicer, lambda: results)
    assert results[0].status == "done" and results[0].value == str(first / "adapted.safetensors")
    assert (first / "adapted.safetensors").is_file() and os.listdir(second) == []


def test_labels_on_another_grid_are_not_snapped_to_the_volumes_even_far_from_the_origin(slicer, mod):
    """Only float32 rounding is forgiven, element by element: a spacing 10 % off (or a rotation) next to an
    origin 1e5 mm away stays as it is, to show."""
    far = IJK_TO_RAS.copy()
    far[:3, 3] = (100000.3, -54321.7, 76543.1)
    volume = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), far, "far")
    rounded = far.astype(np.float32).astype(float)
    shifted = rounded.copy()
    shifted[0, 3] += 0.5          # half a millimetre: float32 steps are 1/128 mm at 1e5 mm, the tolerance 8 of its eps
    for labelsGrid, snapped in ((rounded, True), (rounded @ np.diag([1.1, 1.0, 1.0, 1.0]), False), (shifted, False)):
        labels = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.uint8), labelsGrid, "labels",
                                                "vtkMRMLLabelMapVolumeNode")
        mod.VAEUDASegmentationLogic._snapToVolumeGrid(labels, volume)
        assert np.array_equal(labels._ijkToRAS, far) is snapped
        assert np.array_equal(labels._ijkToRAS, far if snapped else labelsGrid)


def test_a_try_it_folder_given_as_a_link_or_filled_meanwhile(slicer, mod, tmp_path):
    """A link to an empty folder ended in "[Errno 20] Not a directory" after the cohort was made; a folder
    filled while the job ran, in "[Errno 39] Directory not empty"."""
    logic = mod.VAEUDASegmentationLogic()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cohort = logic.makeTryItCohort(tmp_path / "link", nSource=2, nTarget=2, nTrain=1, size=16, loadVolume=False)
    assert cohort.folder == str((tmp_path / "real").resolve()) and (tmp_path / "real" / "splits.json").is_file()
    (tmp_path / "empty").mkdir()
    results = []
    logic.makeTryItCohort(tmp_path / "empty", nSource=2, nTarget=2, nTrain=1, size=16, loadVolume=False,
                          waitForCompletion=False, finishedCallback=results.append)
    (tmp_path / "empty" / "mine.txt").write_text("mine")                 # while the job runs
    pump(slicer, lambda: results, timeout=120)
    assert results[0].status == "failed" and results[0].message.startswith(
        f"{(tmp_path / 'empty').resolve()}: cannot take the synthetic cohort (Directory not empty; files were put in it")
    assert os.listdir(tmp_path / "empty") == ["mine.txt"] and os.listdir(slicer.app.temporaryPath) == []
