"""predict: batched probabilities equal one pass of the network in eval mode; the domain asked for is used; outputs are named by the input as given."""
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vaeuda import predict
from vaeuda.errors import VaeudaError
from vaeuda.modelfile import load_model


@pytest.fixture()
def net_and_slices(tiny_source_model):
    net, meta = load_model(tiny_source_model)
    size = net.cfg.input_size
    slices = np.random.default_rng(0).normal(size=(7, 3, size, size)).astype(np.float32)
    return net, meta, slices


@pytest.mark.parametrize("batch_size, batches", [(1, [1] * 7), (3, [3, 3, 1]), (7, [7]), (16, [7])])
def test_batched_probabilities_equal_one_eval_pass(net_and_slices, monkeypatch, batch_size, batches):
    """7 slices in batches of 1, 3 (a short last batch), 7 or 16 give the softmax over classes of
    one pass in eval mode (BatchNorm's running statistics), even for a network left in train mode."""
    net, _, slices = net_and_slices
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net.segment_logits(torch.from_numpy(slices), "source"), 1).numpy()
    net.train()
    seen, real = [], net.segment_logits

    def counted(x, domain):
        seen.append(x.shape[0])
        return real(x, domain)

    monkeypatch.setattr(net, "segment_logits", counted)
    probs = predict.slice_probabilities(net, slices, "source", torch.device("cpu"), batch_size=batch_size)
    assert seen == batches                                  # the batches asked for, the last one short
    assert probs.shape == expected.shape == (7, net.cfg.n_classes) + slices.shape[2:]
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)     # float16 storage
    np.testing.assert_allclose(probs.astype(np.float32).sum(1), 1.0, atol=5e-3)


def test_target_probabilities_come_from_the_target_encoder(monkeypatch):
    """E_T and E_S with different (random) weights: for "target" Seg reads mu = E_Z(E_T(x)), built
    here from the parts by hand, not E_Z(E_S(x)) (a path that ignored the domain passed to it), and
    the probabilities are its softmax."""
    from vaeuda.nets import VAEUDANet, get_preset
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny")).eval()
    x = np.random.default_rng(2).normal(size=(3, 3, net.cfg.input_size, net.cfg.input_size)).astype(np.float32)
    with torch.no_grad():
        mu_t, _ = net.enc_z(net.enc_t(torch.from_numpy(x)))
        mu_s, _ = net.enc_z(net.enc_s(torch.from_numpy(x)))
        expected = torch.softmax(net.seg(mu_t), 1).numpy()
    read, real_seg = [], net.seg.forward
    monkeypatch.setattr(net.seg, "forward", lambda z: read.append(z.detach().clone()) or real_seg(z))
    target = predict.slice_probabilities(net, x, "target", torch.device("cpu")).astype(np.float32)
    (seen,) = read
    torch.testing.assert_close(seen, mu_t, atol=1e-5, rtol=0)
    assert (seen - mu_s).abs().max() > 0.1
    np.testing.assert_allclose(target, expected, atol=1e-3)          # float16 output


def test_segment_image_uses_the_domain_asked_for(net_and_slices, segmented_domains, tmp_volume):
    """segment_image(domain=None) takes the model's own encoder; an explicit domain wins."""
    net, meta, _ = net_and_slices
    adapted = dict(meta, stage="adapted", has_target_encoder=True)
    image = tmp_volume(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    for model_meta, domain in ((meta, None), (adapted, None), (adapted, "source"), (meta, "source")):
        predict.segment_image(net, model_meta, image, torch.device("cpu"), domain=domain)
    assert segmented_domains == ["source", "target", "source", "source"]


def test_the_target_encoder_of_a_model_that_was_never_adapted_is_refused(net_and_slices, segmented_domains,
                                                                        tmp_volume, tiny_source_model, tmp_path):
    """Only adaptation trains E_T: in a source (or fine-tuned) model it holds random weights, and
    segmenting with it wrote all-background files without a word. An unknown domain is refused too
    (any string but "source" used to select E_T)."""
    net, meta, _ = net_and_slices
    image = tmp_volume(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    with pytest.raises(VaeudaError, match="a source model has no trained target encoder"):
        predict.segment_image(net, meta, image, torch.device("cpu"), domain="target")
    with pytest.raises(VaeudaError, match="--domain must be one of source, target, not 'Source'"):
        predict.segment_image(net, meta, image, torch.device("cpu"), domain="Source")
    assert segmented_domains == []
    volume = tmp_volume(np.zeros((6, 7, 8), np.float32), name="ct_image.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tiny_source_model))}: a source model has no trained"):
        predict.segment_files(tiny_source_model, [volume], tmp_path / "out", domain="target")
    assert not (tmp_path / "out").exists()


def test_outputs_are_named_by_the_input_as_given_not_by_where_a_link_points(tmp_path, monkeypatch):
    from vaeuda.predict import output_path
    store = tmp_path / "annex"
    store.mkdir()
    (store / "SHA256E-s123--ab12.nii.gz").write_bytes(b"")
    link = tmp_path / "ct_1017_image.nii.gz"
    link.symlink_to(store / "SHA256E-s123--ab12.nii.gz")
    assert output_path(tmp_path / "out", link) == tmp_path / "out" / "ct_1017_image_seg.nii.gz"
    (tmp_path / "ct_1018_dicom").mkdir()
    monkeypatch.chdir(tmp_path / "ct_1018_dicom")          # a DICOM folder given as "."
    assert output_path("out", ".") == Path("out") / "ct_1018_dicom_seg.nii.gz"


def test_bad_inputs_are_refused_before_the_model_is_read(tmp_path):
    from vaeuda.predict import output_path, segment_files
    model = tmp_path / "never_read.safetensors"          # does not exist: each refusal must come first
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "Case1.nii.gz").write_bytes(b"")
    (second / "case1.nii.gz").write_bytes(b"")
    with pytest.raises(VaeudaError, match=r"case1.nii.gz: its case1_seg.nii.gz and the Case1_seg.nii.gz of "
                                          r".*Case1.nii.gz are one file where file names ignore case"):
        segment_files(model, [first / "Case1.nii.gz", second / "case1.nii.gz"], tmp_path / "out")
    gone = tmp_path / "gone.nii.gz"
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(gone))}: file or folder not found"):
        segment_files(model, [first / "Case1.nii.gz", gone], tmp_path / "out")
    label_map = tmp_path / "ct_1_label.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 6, 6), 205, np.uint16)), str(label_map))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(model))}: model file not found"):
        segment_files(model, [label_map], tmp_path / "out")
    model.write_bytes(b"not a model")                      # there, but never read: the first input is read first
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(label_map))}: is a label map"):
        segment_files(model, [label_map], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    wide = tmp_path / "wide.nrrd"                            # a NIfTI segmentation could not hold it
    sitk.WriteImage(sitk.Image([40000, 2, 2], sitk.sitkFloat32) + 1.5, str(wide))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(wide))}: 40000 x 2 x 2 voxels; its output would be a "
                                          f"NIfTI file"):
        segment_files(model, [wide], tmp_path / "out")
    series = tmp_path / "1.2.840.113619.2.55"               # a DICOM folder named by its series UID
    series.mkdir()
    assert output_path(tmp_path / "out", series).name == "1.2.840.113619.2.55_seg.nii.gz"
    (series / "IM0001").write_bytes(b"")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(series))}: is an input folder \\(a DICOM series\\), "
                                          f"which is never written to"):   # a volume file there ends the series
        segment_files(model, [series], series)
    assert [p.name for p in series.iterdir()] == ["IM0001"]



@pytest.mark.parametrize("stem", ["c" * 245, "c" * 231, "\u00e9" * 117])
def test_an_input_whose_segmentation_name_is_too_long_is_refused_before_the_model_loads(tmp_path, stem):
    """A 245-byte input name is legal; with '_seg.nii.gz' its segmentation's is not (before: the OS's
    error named the staging folder's file). One of 231 bytes gives a 242-byte name, legal, but its
    temporary name is 15 bytes longer: that failed after the whole segmentation. The limit counts
    bytes: 117 two-byte characters are 234 bytes, 245 with '_seg.nii.gz', though only 128 characters."""
    from vaeuda.predict import segment_files
    path = tmp_path / (stem + ".nii.gz")
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(path))
    name_bytes = len(stem.encode("utf-8")) + 11
    with pytest.raises(VaeudaError, match=re.escape(f"{path}: its segmentation's name ({name_bytes} bytes with "
                                                    f"'_seg.nii.gz') is longer than an output's may be (240: file "
                                                    f"systems allow 255, and it is written under a longer temporary "
                                                    f"name first)")):
        segment_files(tmp_path / "no_model.safetensors", [path], tmp_path / "seg")
    assert not (tmp_path / "seg").exists()


_CENTRES = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 5, 1, 1)
_LEVELS_RECIPE = {"method": "fixed", "range": [0.0, 400.0]}        # intensity 100 k -> -1 + k / 2


def _class_k_at_intensity_100k(x, domain):
    """Stand-in for Seg(E(x)): class k where the middle slice's normalised value is -1 + k / 2 (the
    intensity 100 k under _LEVELS_RECIPE), so the classes a segmentation shows are known voxel by voxel."""
    return -50.0 * (x[:, 1:2] - _CENTRES) ** 2


def _level_volume(tmp_volume, seed, fov_mm, size, permuted, name=None):
    """A volume of intensities 0, 100, ..., 400 at random (0 most often), of fov_mm / size mm voxels in
    x and z, ``size`` of them along x and ``size - 4`` along z: the field of view, centred, samples the
    voxel centres (from two voxels before the first in z), so the round trip is exact; stretching the
    x-z extent onto the slice instead would not be. ``permuted``: its array axes run along y, -z and x
    (a direction matrix with a flip), not x, y, z."""
    rng = np.random.default_rng(seed)
    pixel = fov_mm / size
    if permuted:     # sitk size (y 5, z 28, x 32): numpy (x, z, y)
        shape, spacing, direction = (size, size - 4, 5), (2.0, pixel, pixel), (0, 0, 1, 1, 0, 0, 0, -1, 0)
    else:            # sitk size (x 32, y 5, z 28): numpy (z, y, x)
        shape, spacing, direction = (size - 4, 5, size), (pixel, 2.0, pixel), None
    levels = rng.choice(5, size=shape, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    image = tmp_volume((100.0 * levels).astype(np.float32), spacing=spacing, origin=(-20.0, 7.0, 3.0),
                       direction=direction, name=name)
    return image, levels


@pytest.mark.parametrize("permuted", [False, True])
def test_segment_image_puts_each_voxels_class_back_on_the_input_grid(net_and_slices, monkeypatch, tmp_volume,
                                                                      permuted):
    """With a stand-in network whose class follows the normalised intensity, every voxel of the result
    is the class of its own intensity, on the input's exact grid: the slices are cut with the model's
    normalisation (not the default z-score, which here gives other classes) and field of view, and
    the probabilities of slice j, row r, column c go back to that voxel (no slice order reversed, no
    rows and columns swapped), also for an input whose array axes are permuted and flipped."""
    net, meta, _ = net_and_slices
    monkeypatch.setattr(net, "segment_logits", _class_k_at_intensity_100k)
    image, levels = _level_volume(tmp_volume, 5, net.cfg.slice_fov_mm, net.cfg.input_size, permuted)
    model_meta = dict(meta, normalisation=_LEVELS_RECIPE)
    classes = predict.segment_image(net, model_meta, image, torch.device("cpu"))
    assert classes.GetSize() == image.GetSize() and classes.GetSpacing() == image.GetSpacing()
    assert classes.GetOrigin() == image.GetOrigin() and classes.GetDirection() == image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(classes), levels)
    default = predict.segment_image(net, meta, image, torch.device("cpu"))     # z-scored: another map
    assert not np.array_equal(sitk.GetArrayFromImage(default), levels)


def test_segment_files_passes_its_settings_and_writes_each_input_in_the_models_convention(
        net_and_slices, monkeypatch, tmp_volume, tiny_source_model, tmp_path):
    """Two inputs on different grids, one batch size, domain and bf16 setting: every batch of every input
    goes through the encoder asked for (source, though the model is adapted), in batches of 2, with
    cpu_bf16; each output lies on its own input's grid and holds that input's classes written in the
    model's convention (consecutive here: the class indices themselves, not MM-WHS values)."""
    from vaeuda.labels import CONSECUTIVE
    net, meta, _ = net_and_slices
    monkeypatch.setattr(net, "segment_logits", _class_k_at_intensity_100k)
    adapted = dict(meta, stage="adapted", has_target_encoder=True, normalisation=_LEVELS_RECIPE,
                   labels=dict(meta["labels"], convention=CONSECUTIVE.to_dict()))
    monkeypatch.setattr(predict, "load_model", lambda path, device: (net, adapted))
    calls, real = [], predict.slice_probabilities

    def spy(net, slices, domain, device, batch_size=16, cpu_bf16=False):
        calls.append((slices.shape[0], domain, batch_size, cpu_bf16))
        return real(net, slices, domain, device, batch_size, cpu_bf16)

    monkeypatch.setattr(predict, "slice_probabilities", spy)
    inputs = [_level_volume(tmp_volume, seed, net.cfg.slice_fov_mm, net.cfg.input_size, permuted, name)
              for seed, permuted, name in ((1, False, "a_image.nii.gz"), (2, True, "b_image.nii.gz"))]
    out = tmp_path / "seg"
    written = predict.segment_files(tiny_source_model, [path for path, _ in inputs], out, device="cpu",
                                    batch_size=2, domain="source", cpu_bf16=True)
    assert written == [out / "a_image_seg.nii.gz", out / "b_image_seg.nii.gz"]
    assert calls == [(5, "source", 2, True), (5, "source", 2, True)]
    for (path, levels), seg_path in zip(inputs, written):
        seg, image = sitk.ReadImage(str(seg_path)), sitk.ReadImage(str(path))
        assert seg.GetSize() == image.GetSize() and seg.GetSpacing() == image.GetSpacing()
        assert seg.GetOrigin() == image.GetOrigin() and seg.GetDirection() == image.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), levels)


def test_a_later_input_too_wide_for_nifti_is_refused_before_anything_is_written(tiny_source_model, tmp_volume,
                                                                               tmp_path):
    """Every input is checked, not only the first: the second one's segmentation could not be written."""
    first = tmp_volume(np.zeros((6, 7, 8), np.float32) + np.arange(8, dtype=np.float32), name="a_image.nii.gz")
    wide = tmp_path / "wide.nrrd"
    sitk.WriteImage(sitk.Image([40000, 2, 2], sitk.sitkFloat32) + 1.5, str(wide))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(wide))}: 40000 x 2 x 2 voxels; its output would be a "
                                          f"NIfTI file"):
        predict.segment_files(tiny_source_model, [first, wide], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_segmentation_name_of_exactly_240_bytes_is_allowed(tmp_path):
    """A 229-byte stem gives a 240-byte segmentation name: allowed (the refusal that follows is the missing
    model's)."""
    from vaeuda.predict import segment_files
    model = tmp_path / "no_model.safetensors"
    fits = tmp_path / ("c" * 229 + ".nii.gz")
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(fits))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(model))}: model file not found"):
        segment_files(model, [fits], tmp_path / "seg")
    assert not (tmp_path / "seg").exists()


@pytest.mark.parametrize("setting, message", [({"domain": "Source"}, "--domain must be one of source, target"),
                                              ({"batch_size": 0}, "--batch-size must be a whole number of at least 1")])
def test_bad_settings_of_segment_files_are_refused_before_the_model_is_read(tmp_volume, tmp_path, setting, message):
    """Before the model file is looked for and the first input read, not after (when the model has loaded)."""
    from vaeuda.predict import segment_files
    image = tmp_volume(name="ct_image.nii.gz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(message)}"):
        segment_files(tmp_path / "no_model.safetensors", [image], tmp_path / "seg", **setting)
    assert not (tmp_path / "seg").exists()
