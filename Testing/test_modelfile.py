"""Model files: round trip, and refusal of files that are not ours, damaged or unsafe."""
import pickle
import re
from pathlib import Path

import pytest
import torch

from vaeuda.errors import VaeudaError
from vaeuda.modelfile import load_model, read_tensors, save_model
from vaeuda.nets import VAEUDANet, get_preset


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny"))
    with torch.no_grad():            # a train-mode pass moves BatchNorm's running statistics, as training does
        net.train().segment_logits(torch.randn(2, 3, 32, 32), "source")
    net.eval()
    path = tmp_path / "m.safetensors"
    save_model(path, net, REAL_META)
    return net, path


# What a trained model's metadata holds besides "config" (train._base_meta; values shortened).
REAL_META = {"stage": "source", "has_target_encoder": False, "preset": "tiny", "normalisation": {"method": "zscore"},
             "labels": {"convention": {"name": "mmwhs", "to_index": {"0": 0, "205": 1, "420": 2, "500": 3, "820": 4},
                                       "from_index": [0, 205, 420, 500, 820], "unknown": "background"}},
             "train": {"batch_size": 2, "gan_mode": "lsgan", "class_weights": [0.2, 1.1, 1.3, 1.0, 1.4]},
             "provenance": {"seed": 0, "source_data": ["/d/mr_1001_image.nii.gz"],
                            "source_labels": ["/d/mr_1001_label.nii.gz"]}}


def test_round_trip_gives_identical_networks(saved):
    """Every tensor comes back, BatchNorm's running statistics included (the saved net has moved them
    off a fresh net's 0 and 1: a file that lost them would still load)."""
    net, path = saved
    loaded, meta = load_model(path)
    assert meta["stage"] == "source" and meta["config"] == net.cfg.to_dict()
    assert list(net.state_dict()) == list(loaded.state_dict())
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    fresh = VAEUDANet(net.cfg).state_dict()
    running = [k for k in fresh if k.endswith(("running_mean", "running_var"))]
    assert running and all(not torch.equal(loaded.state_dict()[k], fresh[k]) for k in running)
    x = torch.randn(1, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.segment_logits(x, "source"), loaded.segment_logits(x, "source"))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_tensors_read_hold_no_map_of_the_file(saved):
    """safetensors' tensors are views of a memory map of the file; a resumed run kept its checkpoint's
    alive, and Windows refuses to replace or delete a mapped file (the run failed at its next checkpoint)."""
    _, path = saved
    tensors, _, _ = read_tensors(path)
    assert tensors and str(path.resolve()) not in Path("/proc/self/maps").read_text()


def test_pickled_file_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(r'%s', 'w').write('pwned')" % (tmp_path / "pwned"),))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"net": Boom()}))
    with pytest.raises(VaeudaError, match="not a VAE-UDA model file"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "torch.pt")
    with pytest.raises(VaeudaError, match="not a VAE-UDA model file"):
        load_model(tmp_path / "torch.pt")


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(VaeudaError, match="without the 'vaeuda-model' metadata"):
        load_model(path)


def test_tampered_weights_are_refused(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                        # flip bits inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(VaeudaError, match="checksum"):
        load_model(path)


def test_truncated_file_is_refused_as_damaged_not_foreign(saved):
    _, path = saved
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: a VAE-UDA model file that is truncated or "
                                          r"damaged \(.*\); copy it again"):
        load_model(path)
    named = whole.index(b'"format":"vaeuda-model"') + 23      # where in the header depends on its key order
    path.write_bytes(whole[:named + 5])  # the header itself cut after it named its format: still ours
    with pytest.raises(VaeudaError, match="a VAE-UDA model file that is truncated or damaged"):
        load_model(path)
    path.write_bytes(whole[:20])        # cut before it: nothing says it is ours
    with pytest.raises(VaeudaError, match="not a VAE-UDA model file \\(not a readable safetensors file"):
        load_model(path)


def test_a_damaged_header_length_is_called_damaged_not_foreign(saved):
    """The 8-byte header length off by a few bytes, or wild: the JSON after it still names our format."""
    _, path = saved
    whole = path.read_bytes()
    length = int.from_bytes(whole[:8], "little")
    for damaged in (length + 3, length - 3, 2 ** 62):
        path.write_bytes(damaged.to_bytes(8, "little") + whole[8:])
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: a VAE-UDA model file that is truncated or "
                                              r"damaged \(.*\); copy it again"):
            load_model(path)
    foreign = path.with_name("notes.safetensors")      # our format's name in a file that is no safetensors header
    foreign.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'see "format":"vaeuda-model" ' * 4)
    with pytest.raises(VaeudaError, match="not a VAE-UDA model file \\(not a readable safetensors file"):
        load_model(foreign)


def test_files_of_other_kinds_are_named_for_what_they_are(tmp_path):
    """An empty file, torch.save's ZIP archive and a bare pickle each get a reason a user can act on
    (never unpickled), not the safetensors reader's "header too large"."""
    empty, zipped, pickled = (tmp_path / n for n in ("empty.safetensors", "model.pt", "old.pth"))
    empty.write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, str(zipped))
    torch.save({"w": torch.zeros(2)}, str(pickled), _use_new_zipfile_serialization=False)
    never = "such files are never unpickled here"
    expected = {empty: "the file is empty", zipped: f"a ZIP archive, as torch.save and NumPy's .npz write; {never}",
                pickled: f"a Python pickle, as older torch.save wrote; {never}"}
    for protocol in (4, 5):                 # framed pickles: "\x80\x04\x95", "\x80\x05\x95" (pickle.dump's defaults)
        framed = tmp_path / f"protocol{protocol}.pkl"
        framed.write_bytes(pickle.dumps({"w": list(range(8))}, protocol=protocol))
        assert framed.read_bytes()[:3] == bytes([0x80, protocol, 0x95])
        expected[framed] = f"a Python pickle, as older torch.save wrote; {never}"
    for path, reason in expected.items():
        with pytest.raises(VaeudaError, match=f"^{re.escape(f'{path}: not a VAE-UDA model file ({reason}).')}$"):
            load_model(path)


def test_newer_format_version_is_refused(saved, tmp_path):
    from safetensors.torch import save_file
    tensors, meta, header = read_tensors(saved[1])
    header = dict(header, format_version="99")
    path = tmp_path / "future.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(VaeudaError, match="format version 99 is not supported"):
        load_model(path)


def test_a_file_of_an_earlier_format_is_refused_with_the_reason(saved, tmp_path):
    """Format 1 (engine 0.1) had DRN-D-22's segmenter: its tensors do not fit, and the file says why."""
    from safetensors.torch import save_file
    tensors, meta, header = read_tensors(saved[1])
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=dict(header, format_version="1"))
    with pytest.raises(VaeudaError, match=r"format version 1 was written by an earlier engine and cannot be loaded: "
                                          r"its segmenter \(engine 0\.1\) has DRN-D-22's .*; train the model again\.$"):
        load_model(path)


def test_model_files_get_the_umask_permissions(saved, tmp_path):
    """safetensors' save_file writes a private (0600) file of its own; the model file is an ordinary one."""
    import os
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "shared.safetensors", saved[0], REAL_META)
    finally:
        os.umask(old)
    assert (tmp_path / "shared.safetensors").stat().st_mode & 0o777 == 0o644


def test_info_refuses_metadata_that_is_not_an_object_and_prints_one_line_in_json_mode(saved, tmp_path, capsys):
    import json
    from vaeuda.cli import main
    from vaeuda.modelfile import save_tensors
    tensors, _, _ = read_tensors(saved[1])
    listed = tmp_path / "listed.safetensors"
    save_tensors(listed, tensors, [1, 2])
    assert main(["info", str(listed)]) == 2
    assert "model file metadata is damaged (not a JSON object)" in capsys.readouterr().err
    assert main(["info", "--progress", "json", str(saved[1])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first = json.loads(lines[0])
    assert first["event"] == "info" and first["info"]["stage"] == "source" and json.loads(lines[-1])["event"] == "done"
    assert all("event" in json.loads(line) for line in lines)     # one event per line


def test_a_foreign_file_is_refused_before_its_tensors_are_read(saved, tmp_path, monkeypatch):
    """A large safetensors model of another kind must not be loaded whole only to be refused."""
    import safetensors
    from safetensors.torch import save_file
    path = tmp_path / "other_model.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    real, read = safetensors.safe_open, []

    class Spy:
        def __init__(self, *args, **kwargs):
            self._file = real(*args, **kwargs)

        def __enter__(self):
            self._open = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def metadata(self):
            return self._open.metadata()

        def keys(self):
            return self._open.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._open.get_tensor(key)
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    with pytest.raises(VaeudaError, match="without the 'vaeuda-model' metadata"):
        load_model(path)
    assert read == []
    load_model(saved[1])                                   # the spy does see a model file's reads
    assert len(read) == len(saved[0].state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(VaeudaError, match="model file not found"):
        load_model(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("normalisation"), "'normalisation' is missing"),
    (lambda m: m.pop("labels"), "'labels' is missing"),
    (lambda m: m["labels"].update(convention={"name": "x"}), "label convention is unreadable"),
    (lambda m: m.update(preset="huge"), "preset 'huge' is not one of"),
    (lambda m: m.update(train=[1]), "'train' is not a JSON object"),
    (lambda m: m["config"].update(input_size="abc"), r"input_size must be a whole number in \[16, 4096\], not 'abc'"),
    (lambda m: m["config"].update(input_size=16384), r"input_size must be a whole number in \[16, 4096\], not 16384"),
    (lambda m: m["config"].update(drn_channels=[]), "drn_channels must list the DRN's 8 stages"),
    (lambda m: m["config"].update(base=-4), r"base must be a whole number in \[1, 1024\], not -4"),
    (lambda m: m["config"].update(base=10 ** 9), r"base must be a whole number in \[1, 1024\]"),   # 588 GB before
    (lambda m: m["config"].update(base=1024), r"weights do not fit its configuration \(\d+ tensor\(s\) missing, "
                                              r"extra or of another shape"),                         # 14 GB before
    (lambda m: m["config"].update(drn_dilations=[0] * 8), "drn_dilations must be a whole number"),
    (lambda m: m["config"].update(slice_fov_mm=0), "slice_fov_mm must be a positive number, not 0"),
    (lambda m: m["config"].update(slice_fov_mm=float("nan")), "slice_fov_mm must be a positive number, not nan"),
    (lambda m: m["config"].update(slice_fov_mm="x"), "slice_fov_mm must be a positive number, not 'x'"),
    (lambda m: m["config"].update(logvar_clamp="x"), "logvar_clamp must be a positive number, not 'x'"),
    (lambda m: m["config"].update(slice_fov_mm=1e-300), r"slice_fov_mm must be in \[1.0, 10000.0\] mm, not 1e-300"),
    (lambda m: m.update(preset=["tiny"]), r"preset \['tiny'\] is not one of"),              # unhashable: a TypeError
    (lambda m: (m["labels"]["convention"]["from_index"].__setitem__(4, 10 ** 20),
                m["labels"]["convention"]["to_index"].update({str(10 ** 20): 4})),
     "a label value of its convention does not fit a 64-bit label file"),
    (lambda m: m.update(normalisation={"method": "fixed", "range": [float("-inf"), float("inf")]}),
     "the intensity normalisation gives non-finite intensities"),
    (lambda m: m["normalisation"].update(method="zscore", clip_lower_percentile=99, clip_upper_percentile=1),
     "clips at a lower percentile above its upper one"),
    (lambda m: m["normalisation"].update(method="fixed", range=[0, 1], clip_lower_percentile="x"),
     r"a clipping percentile of the intensity normalisation is 'x', not one in \[0, 100\]"),
    (lambda m: m["train"].update(intensity_remap="no"), "intensity_remap is not true or false"),
    (lambda m: m["provenance"].update(numerics="x"), "the numerics in its provenance are not a JSON object"),
    (lambda m: m.update(stage="bogus"), "stage 'bogus' is not one of source, adapted, finetuned"),
    (lambda m: m.update(has_target_encoder=True), "has_target_encoder is True in a model of stage 'source'"),
    (lambda m: m.pop("has_target_encoder"), "has_target_encoder is None in a model of stage 'source'"),
    (lambda m: m["labels"]["convention"].update(from_index=[0, 205]), "does not give each of the 5 classes its own"),
    (lambda m: m["labels"]["convention"].update(from_index=[0, 205, 205, 205, 205]), "its own label value"),
    (lambda m: m["labels"]["convention"]["to_index"].update({"420": 3}), "its own label value"),
    (lambda m: m["normalisation"].pop("method"), "the intensity normalisation has no method"),
    (lambda m: m["normalisation"].update(method="zscore", clip_upper_percentile="high"),
     "the intensity normalisation is unusable"),
    (lambda m: m["normalisation"].update(method="fixed", range=[1.0]), "the intensity normalisation is unusable"),
    # values the later stages read: tracebacks from deep in training before
    (lambda m: m["train"].update(gan_mode="foo"), "gan_mode 'foo' is not one of lsgan, vanilla"),
    (lambda m: m["train"].update(class_weights=[1, 2]), "class_weights is not a list of 5 positive numbers"),
    (lambda m: m["train"].update(class_weights=[1, 1, 1, 1, -1]), "class_weights is not a list of 5 positive"),
    (lambda m: m.update(provenance="x"), "'provenance' is not a JSON object"),
    (lambda m: m["provenance"].pop("source_labels"), "the source volumes in its provenance are not two lists"),
    (lambda m: m["provenance"]["source_labels"].pop(), "the source volumes in its provenance are not two lists"),
    (lambda m: m["provenance"].update(source_sha256=["0" * 64]), r"not one SHA-256 \(or null\) per image and label"),
    (lambda m: m["provenance"].update(source_sha256=["0" * 64, "x" * 64]), r"not one SHA-256 \(or null\) per image"),
    (lambda m: m["provenance"].update(target_data=["/ct.nii.gz"], target_sha256=["0" * 64, None]),
     r"the target_sha256 digests in its provenance are not one SHA-256 \(or null\) per target volume"),
    (lambda m: m["provenance"].update(target_sha256=["0" * 64]), r"not one SHA-256 \(or null\) per target volume"),
    (lambda m: m["provenance"].update(finetune_sha256=[None]), r"not one SHA-256 \(or null\) per image and label"),
    (lambda m: m["provenance"].update(source_model_sha256="0" * 63), r"source_model_sha256 .* is not a SHA-256"),
    # boundaries and the checks beside the ones above
    (lambda m: m["provenance"].update(source_model_sha256="0" * 65), r"source_model_sha256 .* is not a SHA-256"),
    (lambda m: m["provenance"].update(source_model_sha256="A" * 64), r"source_model_sha256 .* is not a SHA-256"),
    (lambda m: m["provenance"].update(finetune_data=["/a.nii", "/b.nii"], finetune_labels=["/a_label.nii"],
                                      finetune_sha256=["0" * 64, "1" * 64]),
     r"the finetune_sha256 digests in its provenance are not one SHA-256 \(or null\) per image and label file"),
    (lambda m: m.update(stage="adapted"), "has_target_encoder is False in a model of stage 'adapted'"),
    (lambda m: m["train"].update(class_weights=[1, 1, 1, 1, 0]), "class_weights is not a list of 5 positive"),
    (lambda m: m["train"].update(class_weights=[1, 1, 1, 1, float("inf")]), "class_weights is not a list of 5 positive"),
    (lambda m: m["train"].update(class_weights=[True, 1, 1, 1, 1]), "class_weights is not a list of 5 positive"),
    (lambda m: m.update(normalisation={"method": "fixed", "range": [0, 1], "clip_upper_percentile": 150}),
     r"a clipping percentile of the intensity normalisation is 150, not one in \[0, 100\]"),
    (lambda m: m["normalisation"].update(clip_upper_percentile=True),          # would clip at the 1st percentile
     r"a clipping percentile of the intensity normalisation is True, not one in \[0, 100\]"),
    (lambda m: m["normalisation"].update(clip_lower_percentile=50, clip_upper_percentile=50),   # every voxel one value
     "clips at a lower percentile above its upper one"),
    (lambda m: (m["labels"]["convention"]["from_index"].__setitem__(4, 2 ** 63),
                m["labels"]["convention"]["to_index"].update({str(2 ** 63): 4})),
     "a label value of its convention does not fit a 64-bit label file"),
])
def test_edited_metadata_is_refused_in_one_sentence(saved, tmp_path, edit, message):
    """JSON that parses but lacks what the stages read, or holds values they cannot use (the
    checksum covers only the tensors)."""
    from vaeuda.cli import main
    from vaeuda.modelfile import save_tensors
    _, path = saved
    tensors, meta, _ = read_tensors(path)
    edit(meta)
    edited = tmp_path / "edited.safetensors"
    save_tensors(edited, tensors, meta)
    with pytest.raises(VaeudaError, match=message):
        load_model(edited)
    assert main(["info", str(edited)]) != 0                       # info refuses what the stages refuse


def _resave_with_header(saved, tmp_path, edit):
    """Copy of the saved model file with its raw safetensors header edited by ``edit(header)``."""
    from safetensors.torch import save_file
    tensors, _, header = read_tensors(saved[1])
    header = dict(header)
    edit(header)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("edit, message", [
    # read as version 0, below the first format (catches a check of the upper bound only)
    (lambda h: h.pop("format_version"), "format version None is not valid"),
    (lambda h: h.update(format_version="0"), "format version '0' is not valid"),   # versions start at 1
    (lambda h: h.update(format_version="1.x"), "format version '1.x' is not valid"),  # not an integer
    (lambda h: h.update(format_version="\u0662"), "format version '\u0662' is not valid"),  # int() reads it as 2
    (lambda h: h.update(format_version=" 2"), "format version ' 2' is not valid"),
    # not taken as unchecked-but-fine (catches skipping the comparison when the field is absent)
    (lambda h: h.pop("tensors_sha256"), "do not match their checksum"),
    # the first version after this engine's (catches a bound off by one)
    (lambda h: h.update(format_version="3"), r"format version 3 is not supported by this engine \(.*, format 2\)"),
], ids=["no format version", "format version 0", "format version not an integer", "format version not ASCII",
        "format version with a space", "no checksum", "next format version"])
def test_edited_header_is_refused(saved, tmp_path, edit, message):
    with pytest.raises(VaeudaError, match=message):
        load_model(_resave_with_header(saved, tmp_path, edit))


def test_checksum_covers_dtype_not_only_bytes(saved, tmp_path):
    """The same bytes reinterpreted as int32 under the old header are refused (catches a digest
    of the raw bytes only; load_state_dict would silently cast the integers to float)."""
    from safetensors.torch import save_file
    tensors, _, header = read_tensors(saved[1])
    tensors["net.seg.head.bias"] = tensors["net.seg.head.bias"].view(torch.int32)   # (5,) float32 -> (5,) int32
    path = tmp_path / "retyped.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(VaeudaError, match="do not match their checksum"):
        load_model(path)


def test_missing_weight_tensor_is_refused(saved, tmp_path):
    """A file lacking one network tensor, with a valid checksum, is refused (catches
    load_state_dict(strict=False), which would keep the fresh initialisation)."""
    from vaeuda.modelfile import save_tensors
    tensors, meta, _ = read_tensors(saved[1])
    del tensors["net.seg.head.bias"]
    path = tmp_path / "incomplete.safetensors"
    save_tensors(path, tensors, meta)
    with pytest.raises(VaeudaError, match=r"^\S*incomplete.safetensors: model weights do not fit its configuration "
                                          r"\(1 tensor\(s\) missing, extra or of another shape or type, e.g. net.seg.head.bias\)\.$"):
        load_model(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"net.seg.head.bias": torch.full_like(t["net.seg.head.bias"], float("nan"))}),
     r"model weights hold NaN or infinite values \(e.g. net.seg.head.bias\); the file was altered or damaged"),
    (lambda t: t.update({"net.seg.head.bias": t["net.seg.head.bias"].half()}),
     r"model weights do not fit its configuration \(1 tensor\(s\) missing, extra or of another shape or type, "
     r"e.g. net.seg.head.bias\)"),
    (lambda t: t.update({"net.seg.head.bias": torch.full_like(t["net.seg.head.bias"], float("-inf"))}),
     r"model weights hold NaN or infinite values \(e.g. net.seg.head.bias\); the file was altered or damaged"),
    (lambda t: t.update({"net.seg.extra": torch.zeros(3)}),
     r"model weights do not fit its configuration \(1 tensor\(s\) missing, extra or of another shape or type, "
     r"e.g. net.seg.extra\)"),
    (lambda t: t.update({"optim.gen.0.step": torch.tensor(1.0)}),
     r"holds tensors a model file does not \(optim.gen.0.step, ...\): is it a training checkpoint\?"),
])
def test_weights_that_would_load_wrong_are_refused(saved, tmp_path, edit, message):
    """With a valid checksum: a NaN weight segmented everything as background with exit 0; a float16 or integer
    tensor was cast by load_state_dict without a word; a checkpoint's other states rode along as a model."""
    from vaeuda.cli import main
    from vaeuda.modelfile import save_tensors
    tensors, meta, _ = read_tensors(saved[1])
    edit(tensors)
    edited = tmp_path / "edited.safetensors"
    save_tensors(edited, tensors, meta)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(edited))}: {message}"):
        load_model(edited)
    assert main(["info", str(edited)]) == 2


def test_save_model_fills_in_the_engine_version_and_format(saved):
    """The metadata names the engine that wrote it (the module docstring's ``engine_version``), and
    the header its format and version."""
    from vaeuda import __version__
    from vaeuda.modelfile import FORMAT_VERSION
    _, meta, header = read_tensors(saved[1])
    assert meta["engine_version"] == __version__ and "engine_version" not in REAL_META
    assert header["format"] == "vaeuda-model" and header["format_version"] == str(FORMAT_VERSION)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("provenance"),
    lambda m: m["train"].pop("gan_mode"),                  # read as lsgan
    lambda m: m["train"].pop("class_weights"),
    lambda m: (m["labels"]["convention"]["from_index"].__setitem__(4, -2 ** 63),   # the lowest int64 fits
               m["labels"]["convention"]["to_index"].update({str(-2 ** 63): 4})),
], ids=["no provenance", "no gan_mode", "no class_weights", "lowest int64 label value"])
def test_metadata_without_its_optional_fields_loads(saved, tmp_path, edit):
    """What check_metadata takes as absent-and-default (or at the edge of its range) is not refused
    (catches a default dropped from a ``get``, or a range bound made strict)."""
    from vaeuda.modelfile import save_tensors
    tensors, meta, _ = read_tensors(saved[1])
    edit(meta)
    edited = tmp_path / "optional.safetensors"
    save_tensors(edited, tensors, meta)
    _, loaded = load_model(edited)
    assert loaded == dict(meta)


def test_checksum_covers_shapes_not_only_bytes(saved, tmp_path):
    """A tensor reshaped under the old header (the same bytes, dtype and name) is refused by the
    checksum, as a retyped one is (catches a digest without the shapes; the optimiser states of a
    checkpoint have no other shape check)."""
    from safetensors.torch import save_file
    tensors, _, header = read_tensors(saved[1])
    reshaped = dict(tensors, **{"net.seg.head.weight": tensors["net.seg.head.weight"].reshape(-1)})
    path = tmp_path / "reshaped.safetensors"
    save_file(reshaped, str(path), metadata=header)
    with pytest.raises(VaeudaError, match="do not match their checksum"):
        load_model(path)


def test_a_header_read_to_its_length_is_parsed_as_json_not_searched(saved):
    """A truncated file whose header is valid JSON of exactly its stated length is ours by that JSON,
    even spaced as another writer may space it (the compact marker is not in it); a wild length with
    our format's name in bytes that do not open a JSON object is not ours."""
    import json
    _, path = saved
    whole = path.read_bytes()
    length = int.from_bytes(whole[:8], "little")
    spaced = json.dumps(json.loads(whole[8:8 + length]), indent=1).encode()
    assert b'"format":"vaeuda-model"' not in spaced
    path.write_bytes(len(spaced).to_bytes(8, "little") + spaced + whole[8 + length:-100])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: a VAE-UDA model file that is truncated or "
                                          r"damaged \(.*\); copy it again"):
        load_model(path)
    foreign = path.with_name("notes.safetensors")
    foreign.write_bytes((2 ** 62).to_bytes(8, "little") + b'see "format":"vaeuda-model" ' * 4)
    with pytest.raises(VaeudaError, match="not a VAE-UDA model file \\(not a readable safetensors file"):
        load_model(foreign)
