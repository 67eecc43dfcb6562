"""volumes: I/O in each format, normalisation by hand, and the coronal slicing with its exact inverse."""
from __future__ import annotations

import re
import struct
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from vaeuda.errors import VaeudaError
from vaeuda.labels import CONSECUTIVE, MMWHS
from vaeuda.volumes import (DEFAULT_NORMALISATION, Geometry, SliceGrid, geometry_mismatch, normalise, obliquity_degrees,
                            read_image, read_label, to_canonical, write_image, write_label)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Image x -> physical -y, image y -> +z, image z -> -x: a permutation with flips.
PERMUTED = (0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues


OBLIQUE = tuple((_rotation((1, 2, 3), 7.0) @ np.asarray(PERMUTED).reshape(3, 3)).ravel())
# Below OBLIQUE_DEGREES: still sliced in the volume's own frame.
SLIGHTLY_OBLIQUE = tuple((_rotation((1, 2, 3), 0.5) @ np.asarray(PERMUTED).reshape(3, 3)).ravel())


def _phantom_labels(shape=(16, 24, 20), sheet: bool = True) -> np.ndarray:
    """(z, y, x) uint8 class indices: two ellipsoids and (optionally) a one-voxel-thick sheet."""
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[(x - 10) ** 2 / 40 + (y - 12) ** 2 / 50 + (z - 8) ** 2 / 20 < 1] = 1
    labels[(x - 5) ** 2 / 10 + (y - 6) ** 2 / 20 + (z - 4) ** 2 / 8 < 1] = 2
    if sheet:
        labels[:, 3:20, 15] = 4
    return labels


def _one_hot(classes: np.ndarray, n_classes: int = 5) -> np.ndarray:
    """(N, S, S) -> (N, C, S, S) float32."""
    return (np.arange(n_classes)[None, :, None, None] == classes[:, None]).astype(np.float32)


def _assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()


# --- coronal slicing and its inverse -----------------------------------------------------------

@pytest.mark.parametrize("direction", [IDENTITY, PERMUTED, SLIGHTLY_OBLIQUE],
                         ids=["identity", "permuted", "slightly oblique"])
def test_label_round_trip_is_exact_when_slices_are_at_least_input_size(tmp_volume, direction):
    labels = _phantom_labels()
    image = tmp_volume(labels, spacing=(0.7, 1.3, 2.5), origin=(-10.0, 5.0, 30.0), direction=direction)
    grid = SliceGrid.from_image(image, 32)  # every in-plane size here is <= 24
    slices = grid.label_slices(image)
    assert slices.shape == (grid.n_slices, 32, 32) and slices.dtype == np.uint8
    back = grid.scores_to_image(_one_hot(slices))
    _assert_same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


@pytest.mark.parametrize("direction", [IDENTITY, OBLIQUE], ids=["identity", "oblique"])
def test_label_round_trip_through_smaller_slices_keeps_geometry_and_almost_all_voxels(tmp_volume, direction):
    labels = _phantom_labels(sheet=False)  # a one-voxel sheet cannot survive in-plane downsampling
    image = tmp_volume(labels, spacing=(0.7, 1.3, 2.5), origin=(-10.0, 5.0, 30.0), direction=direction)
    grid = SliceGrid.from_image(image, 12)
    back = grid.scores_to_image(_one_hot(grid.label_slices(image)))
    _assert_same_geometry(back, image)
    agreement = (sitk.GetArrayFromImage(back) == labels).mean()
    assert 0.97 < agreement < 1.0  # downsampling in-plane must lose a few boundary voxels, not more


def test_an_oblique_volume_is_sliced_along_the_patients_axes(tmp_volume):
    """Voxel value = the voxel's physical z (superior): on coronal planes of the patient each slice
    row (one z) is constant and rows fall by the grid's z spacing, whatever the scan's tilt; on
    planes in the scan's own 30-degree-tilted frame they would not be."""
    direction = _rotation((1, 0, 0), 30.0)
    size, spacing, origin = np.array([20, 18, 16]), np.array([1.0, 1.2, 1.5]), np.array([-10.0, 4.0, 30.0])
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    physical_z = origin[2] + (direction[2] @ np.stack([i * spacing[0], j * spacing[1], k * spacing[2]]).reshape(3, -1))
    image = tmp_volume(physical_z.reshape(k.shape).astype(np.float32), spacing=tuple(spacing), origin=tuple(origin),
                       direction=tuple(direction.ravel()))
    grid = SliceGrid.from_image(image, 16)
    assert grid.grid.direction == IDENTITY
    slices = grid.resampled_slices(image)[:, 1]                        # (n_slices, rows z, columns x)
    middle = slices[grid.n_slices // 2, 4:12, 6:10]                    # inside the volume at every row
    np.testing.assert_allclose(middle, np.repeat(middle[:, :1], 4, axis=1), atol=1e-3)
    np.testing.assert_allclose(np.diff(middle[:, 0]), -grid.grid.spacing[2], atol=1e-3)


def test_slices_are_coronal_planes_rows_superior_to_inferior(tmp_volume):
    # Direction: image x -> physical S, image y -> L, image z -> P. So canonical (L, P, S) axes
    # are image (y, z, x), and coronal slice j is image plane z = j.
    array = np.random.default_rng(0).uniform(0, 100, size=(5, 8, 8)).astype(np.float32)  # (z, y, x)
    image = tmp_volume(array, spacing=(1.5, 0.8, 3.0), origin=(4.0, -2.0, 7.0),
                       direction=(0, 1, 0, 0, 0, 1, 1, 0, 0))
    grid = SliceGrid.from_image(image, 8)
    assert grid.n_slices == 5
    identity_map = {"method": "fixed", "range": [-100.0, 100.0]}  # v -> v / 100, no clipping here
    slices = grid.image_slices(image, identity_map)
    assert slices.shape == (5, 3, 8, 8) and slices.dtype == np.float32
    for j in range(5):
        # Slice column c is canonical x = image y = c; row r is superior first: image x = 7 - r.
        expected = array[j].T[::-1] / 100.0
        np.testing.assert_allclose(slices[j, 1], expected, atol=1e-6)
    np.testing.assert_array_equal(slices[1:, 0], slices[:-1, 1])  # channel 0 is slice j-1
    np.testing.assert_array_equal(slices[:-1, 2], slices[1:, 1])  # channel 2 is slice j+1
    np.testing.assert_array_equal(slices[0, 0], slices[0, 1])  # edges repeat
    np.testing.assert_array_equal(slices[-1, 2], slices[-1, 1])


def test_image_slices_do_not_depend_on_the_input_orientation(tmp_volume):
    array = np.random.default_rng(1).normal(size=(16, 24, 20)).astype(np.float32)
    image = tmp_volume(array, spacing=(0.7, 1.3, 2.5), origin=(-10.0, 5.0, 30.0), direction=OBLIQUE)
    canonical = to_canonical(image)
    assert canonical.GetSize() != image.GetSize()  # the test is only worth it if axes moved
    from_input = SliceGrid.from_image(image, 20).image_slices(image)
    from_canonical = SliceGrid.from_image(canonical, 20).image_slices(canonical)
    np.testing.assert_allclose(from_input, from_canonical, atol=1e-4)


def test_resampled_slices_cut_an_already_normalised_image_from_any_grid(tmp_volume):
    z, y, x = np.meshgrid(np.arange(12), np.arange(10), np.arange(14), indexing="ij")
    ramp = (0.5 * x - 0.3 * y + 0.2 * z).astype(np.float32)          # linear: trilinear interpolation is exact on it
    image = tmp_volume(ramp, spacing=(1.5, 1.5, 2.0), origin=(-10.0, 5.0, 30.0))
    grid = SliceGrid.from_image(image, 16)
    normalised = sitk.GetImageFromArray(normalise(ramp))
    normalised.CopyInformation(image)
    np.testing.assert_array_equal(grid.resampled_slices(normalised), grid.image_slices(image))
    # the same normalised values on another grid (finer, starting one coarse voxel earlier) cut the same
    other = sitk.Image([29, 21, 25], sitk.sitkFloat32)
    other.SetSpacing((0.75, 0.75, 1.0))
    other.SetOrigin((-11.5, 3.5, 28.0))
    finer = sitk.Resample(normalised, other, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    np.testing.assert_allclose(grid.resampled_slices(finer), grid.image_slices(image), atol=1e-4)


def test_scores_are_interpolated_before_the_argmax(tmp_volume):
    """Class 1 never wins on the slice grid but wins between grid points: only per-class linear
    interpolation of scores (not of hard labels) produces it there."""
    image = tmp_volume(np.zeros((8, 5, 16), np.float32), spacing=(0.5, 2.0, 1.0))  # x has 2 voxels per grid column
    grid = SliceGrid.from_image(image, 8)
    scores = np.zeros((5, 3, 8, 8), np.float32)
    scores[:, 0, :, 0::2] = 1.0
    scores[:, 2, :, 1::2] = 1.0
    scores[:, 1] = 0.8
    assert set(np.unique(scores.argmax(1))) == {0, 2}
    result = sitk.GetArrayFromImage(grid.scores_to_image(scores))
    # Voxel x sits at grid column x/2 - 0.25: between columns the scores are 0.75/0.25 vs 0.8.
    assert np.all(result[:, :, 1:15] == 1)
    assert np.all(result[:, :, 0] == 0)  # the outermost voxels take the edge column
    assert np.all(result[:, :, 15] == 2)
    # Ties go to the lower class, as numpy's argmax does.
    tied = sitk.GetArrayFromImage(grid.scores_to_image(np.full((5, 3, 8, 8), 0.5, np.float32)))
    assert np.all(tied == 0)


def test_scores_in_float16_chunks_give_the_same_result_as_one_array(tmp_volume):
    image = tmp_volume(_phantom_labels(), spacing=(0.7, 1.3, 2.5), direction=PERMUTED)
    grid = SliceGrid.from_image(image, 12)
    scores = _one_hot(grid.label_slices(image)) + np.random.default_rng(2).uniform(0, 0.3, (grid.n_slices, 5, 12, 12))
    scores = scores.astype(np.float16)
    whole = sitk.GetArrayFromImage(grid.scores_to_image(scores))
    backwards = [(start, scores[start:start + 3]) for start in range(0, grid.n_slices, 3)][::-1]
    chunked = sitk.GetArrayFromImage(grid.scores_to_image(iter(backwards)))
    np.testing.assert_array_equal(chunked, whole)
    with pytest.raises(ValueError, match="missing"):
        grid.scores_to_image(iter(backwards[1:]))
    with pytest.raises(ValueError, match=r"^scores must be \("):
        grid.scores_to_image(scores[:, :, :6])


def test_an_oblique_volume_is_sliced_a_voxel_along_y_apart_and_covered(tmp_volume):
    """Tilted 30 degrees about x: slices are a voxel's extent along y apart
    (sqrt((1.5 cos 30)^2 + (2.0 sin 30)^2) = 1.6275 mm), not the 2 mm z spacing the tilt brings into
    y, and every grid sample clearly inside the volume (labelled 1 everywhere) reads 1."""
    direction = _rotation((1, 0, 0), 30.0)
    spacing, origin = np.array([1.0, 1.5, 2.0]), np.array([-10.0, 4.0, 30.0])
    shape = (10, 12, 14)                                                   # (z, y, x)
    labels = tmp_volume(np.ones(shape, np.uint8), spacing=tuple(spacing), origin=tuple(origin),
                        direction=tuple(direction.ravel()))
    grid = SliceGrid.from_image(labels, 16)
    assert grid.grid.spacing[1] == pytest.approx(np.hypot(1.5 * np.cos(np.pi / 6), 2.0 * np.sin(np.pi / 6)))
    got = grid.label_slices(labels)                                        # (n_slices, rows z down, columns x)
    g = grid.grid
    j, r, c = np.meshgrid(np.arange(g.size[1]), np.arange(16), np.arange(16), indexing="ij")
    points = np.stack([g.origin[0] + c * g.spacing[0], g.origin[1] + j * g.spacing[1],
                       g.origin[2] + (15 - r) * g.spacing[2]], axis=-1)    # rows run superior -> inferior
    index = ((points - origin) @ direction) / spacing                      # continuous (i, j, k)
    inside = np.minimum(index + 0.5, np.array(shape[::-1]) - 0.5 - index).min(axis=-1) > 0.6
    assert inside.sum() > 100 and np.all(got[inside] == 1)
    # the box spans the volume: its first and last slices are within a slice of its y extent
    corners = [origin + direction @ ((np.array(k) * (np.array(shape[::-1]) - 1)) * spacing)
               for k in np.ndindex(2, 2, 2)]
    extent_y = np.ptp([p[1] for p in corners]) + np.abs(direction[1] * spacing).sum()
    assert abs(g.size[1] * g.spacing[1] - extent_y) < g.spacing[1]


def test_slice_grid_spans_the_volume_edge_to_edge_by_hand(tmp_volume):
    """8 x 7 x 6 voxels of 1.0 x 1.5 x 2.0 mm from (-10, 5, 30), cut into 4 x 4 slices without a field
    of view: x spans 8 mm edge to edge in 2 mm samples, the first at -10 - 0.5 + 1.0 = -9.5; z spans
    12 mm in 3 mm samples, the first at 30 - 1.0 + 1.5 = 30.5; one slice per y voxel (5, 6.5, ...)."""
    grid = SliceGrid.from_image(tmp_volume(spacing=(1.0, 1.5, 2.0), origin=(-10.0, 5.0, 30.0)), 4).grid
    assert grid.size == (4, 7, 4)
    assert grid.spacing == pytest.approx((2.0, 1.5, 3.0))
    assert grid.origin == pytest.approx((-9.5, 5.0, 30.5))


def test_slice_grid_with_a_field_of_view_is_centred_by_hand(tmp_volume):
    """The same 8 x 7 x 6 voxels of 1.0 x 1.5 x 2.0 mm from (-10, 5, 30), a 10 mm field in 4 x 4
    slices: 2.5 mm pixels centred on the volume's middle (-6.5, ., 35), the first 1.5 pixels before
    it: x -6.5 - 3.75 = -10.25, z 35 - 3.75 = 31.25 (catches z measured in x voxels)."""
    grid = SliceGrid.from_image(tmp_volume(spacing=(1.0, 1.5, 2.0), origin=(-10.0, 5.0, 30.0)), 4, fov_mm=10.0).grid
    assert grid.size == (4, 7, 4)
    assert grid.spacing == pytest.approx((2.5, 1.5, 2.5))
    assert grid.origin == pytest.approx((-10.25, 5.0, 31.25))


def test_a_slightly_oblique_field_of_view_is_centred_on_the_volume_in_physical_space(tmp_volume):
    """0.9 degrees oblique (sliced in its own frame) with a 300 mm field on a 20 mm volume: the grid's
    middle sample is the volume's middle voxel centre, in mm; the offset of 140 mm from the first
    sample goes along the rotated axes (a transposed or dropped direction puts it millimetres off)."""
    direction = tuple(_rotation((1, 2, 3), 0.9).ravel())
    image = tmp_volume(np.zeros((10, 6, 20), np.float32), spacing=(1.0, 1.5, 2.0), origin=(-10.0, 5.0, 30.0),
                       direction=direction)
    slicing = SliceGrid.from_image(image, 15, fov_mm=300.0)
    g = slicing.grid
    assert g.direction == pytest.approx(direction)
    middle_sample = np.asarray(g.origin) + np.asarray(g.direction).reshape(3, 3) @ (
        (np.asarray(g.size) - 1) / 2 * np.asarray(g.spacing))
    middle_voxel = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    np.testing.assert_allclose(middle_sample, middle_voxel, atol=1e-6)


def test_oblique_slice_grid_by_hand(tmp_volume):
    """12 x 4 x 6 voxels of 1 x 2 x 3 mm from 0, turned 30 degrees about z (c = cos 30, s = sin 30):
    the bounding box of the voxels, edge to edge, spans 12c + 8s along x, 12s + 8c along y, 18 along z;
    its middle is (5.5c - 3s, 5.5s + 3c, 7.5). Slices are a voxel's extent along y apart, |(s * 1, c * 2)|
    = 1.8028 mm: 12.928 / 1.8028 = 7.17, rounded up to 8 slices. 6 x 6 pixels span x and z."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    grid = SliceGrid.from_image(tmp_volume(np.zeros((6, 4, 12), np.float32), spacing=(1.0, 2.0, 3.0),
                                           direction=direction), 6).grid
    sy = np.hypot(s * 1.0, c * 2.0)
    gx = (12 * c + 8 * s) / 6
    assert grid.direction == IDENTITY
    assert grid.size == (6, 8, 6)
    assert grid.spacing == pytest.approx((gx, sy, 3.0))
    assert grid.origin == pytest.approx((5.5 * c - 3 * s - 2.5 * gx, 5.5 * s + 3 * c - 3.5 * sy, 7.5 - 2.5 * 3.0))


def test_a_field_of_view_wider_than_the_volume_repeats_the_edge_intensities(tmp_volume):
    """Value 10 + x on 4 x 3 x 4 voxels of 1 mm, an 8 mm field in 8 x 8 slices: columns at x = -2 .. 5,
    two voxels beyond each edge, read the edge values 10 and 13 (not 0)."""
    x = np.broadcast_to(np.arange(4, dtype=np.float32), (4, 3, 4))
    image = tmp_volume(10.0 + x)
    slices = SliceGrid.from_image(image, 8, fov_mm=8.0).resampled_slices(image)
    assert slices.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(slices, np.broadcast_to([10, 10, 10, 11, 12, 13, 13, 13], slices.shape), atol=1e-5)


def test_float32_score_chunks_keep_their_precision(tmp_volume):
    """Class 1 scores 1e-4 above class 0 at 1.0, where float16 steps by 1e-3: as float32 chunks, as in
    one array, class 1 wins everywhere (a float16 buffer would tie them, and the tie go to class 0)."""
    image = tmp_volume(np.zeros((6, 5, 6), np.float32))
    grid = SliceGrid.from_image(image, 6)
    scores = np.zeros((5, 3, 6, 6), np.float32)
    scores[:, 0], scores[:, 1] = 1.0, 1.0001
    assert np.float16(1.0) == np.float16(1.0001)
    assert (sitk.GetArrayFromImage(grid.scores_to_image(scores)) == 1).all()
    chunks = [(start, scores[start:start + 2]) for start in range(0, 5, 2)]
    assert (sitk.GetArrayFromImage(grid.scores_to_image(iter(chunks))) == 1).all()


def test_scores_of_another_number_of_slices_are_refused(tmp_volume):
    """One slice of scores for a grid of 5 would be broadcast to all of them."""
    grid = SliceGrid.from_image(tmp_volume(np.zeros((6, 5, 6), np.float32)), 6)
    with pytest.raises(ValueError, match=r"^scores must be \(5, C, 6, 6\), got \(1, 3, 6, 6\)"):
        grid.scores_to_image(np.zeros((1, 3, 6, 6), np.float32))


def test_slicing_refuses_a_volume_of_other_geometry(tmp_volume):
    grid = SliceGrid.from_image(tmp_volume(spacing=(1.0, 1.0, 2.0)), 8)
    from vaeuda.errors import VaeudaError
    with pytest.raises(VaeudaError, match="spacing"):
        grid.label_slices(tmp_volume(np.zeros((6, 7, 8), np.uint8)))


def test_memory_stays_a_few_volumes_not_one_per_class(tmp_volume):
    """numpy allocations only (tracemalloc does not see SimpleITK's buffers): the per-class loop
    holds the running max, the argmax and a mask, far below 5 classes x one volume."""
    image = tmp_volume(np.random.default_rng(3).random((96, 160, 160), dtype=np.float32), direction=PERMUTED)
    grid = SliceGrid.from_image(image, 64)
    volume_bytes = 96 * 160 * 160 * 4
    scores = np.random.default_rng(4).random((grid.n_slices, 5, 64, 64), dtype=np.float32)
    tracemalloc.start()
    try:
        slices = grid.image_slices(image)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 2.0 * volume_bytes + slices.nbytes
        del slices
        tracemalloc.reset_peak()
        grid.scores_to_image(scores)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 2.0 * volume_bytes
    finally:
        tracemalloc.stop()


# --- normalisation -----------------------------------------------------------------------------

def test_zscore_after_clipping_by_hand():
    values = np.array([1, 2, 3, 4, 100], np.int16)
    # 75th percentile of 5 sorted values is element 3 (= 4): clipped [1, 2, 3, 4, 4],
    # mean 2.8, variance (3.24 + 0.64 + 0.04 + 1.44 + 1.44) / 5 = 1.36.
    out = normalise(values, {"method": "zscore", "clip_upper_percentile": 75.0, "clip_lower_percentile": None})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (np.array([1, 2, 3, 4, 4]) - 2.8) / np.sqrt(1.36), rtol=1e-6)
    # Both ends: 25th percentile is 2 -> [2, 2, 3, 4, 4], mean 3, variance 0.8.
    out = normalise(values, {"method": "zscore", "clip_upper_percentile": 75.0, "clip_lower_percentile": 25.0})
    np.testing.assert_allclose(out, np.array([-1, -1, 0, 1, 1]) / np.sqrt(0.8), rtol=1e-6)
    # Default recipe clips at the 98th percentile: 4 + 0.92 * 96 = 92.32.
    clipped = np.array([1, 2, 3, 4, 92.32])
    np.testing.assert_allclose(normalise(values), (clipped - clipped.mean()) / clipped.std(), rtol=1e-5)
    assert values.tolist() == [1, 2, 3, 4, 100]  # input untouched


def test_minmax_fixed_and_constant_volumes():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(normalise(values, {"method": "minmax"}), (values - 1) * 2 / 99 - 1, rtol=1e-6)
    np.testing.assert_allclose(normalise(values, {"method": "fixed", "range": [0.0, 4.0]}),
                               [-0.5, 0.0, 0.5, 1.0, 1.0])
    mr = normalise(np.array([-1.8, 1.3, 4.4, 9.0]), {"method": "fixed", "range": [-1.8, 4.4]})
    np.testing.assert_allclose(mr, [-1.0, 0.0, 1.0, 1.0], atol=1e-6)
    for recipe in (DEFAULT_NORMALISATION, {"method": "minmax"}):
        out = normalise(np.full((3, 4, 5), 7.0), recipe)
        assert np.all(out == 0.0)


# --- reading and writing -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_image_write_read_round_trip(tmp_path, tmp_volume, suffix):
    image = tmp_volume(np.random.default_rng(5).normal(size=(6, 7, 8)).astype(np.float32),
                       spacing=(0.7, 1.3, 2.5), origin=(-10.0, 5.0, 30.0), direction=PERMUTED)
    path = write_image(image, tmp_path / f"out{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]  # no temporary left
    back = read_image(path)
    assert back.GetPixelID() == sitk.sitkFloat32
    assert geometry_mismatch(back, image, rtol=1e-6) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_read_image_casts_to_float32_and_keeps_metadata(tmp_volume):
    path = tmp_volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), name="ct.nrrd")
    raw = sitk.ReadImage(str(path))
    image = read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert sitk.GetArrayFromImage(image).tolist() == np.arange(24, dtype=np.float32).reshape(2, 3, 4).tolist()
    assert raw.GetMetaDataKeys() and set(image.GetMetaDataKeys()) == set(raw.GetMetaDataKeys())


def _write_dicom_series(folder, array, spacing, origin, series_uid, jitter=None, overrides=None):
    """One file per slice, tags as in SimpleITK's DICOM series writing example; ``jitter``: mm
    added to each slice's z position (a scanner's position noise); ``overrides(k)``: tags of slice k
    to write instead."""
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
              ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|1053", "1"), ("0028|1052", "0")]
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in common:
            plane.SetMetaData(tag, value)
        position = np.add(image.TransformIndexToPhysicalPoint((0, 0, k)), (0, 0, 0 if jitter is None else jitter[k]))
        plane.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in position))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0018|0050", f"{spacing[2]:.6f}")
        plane.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        for tag, value in (overrides(k) if overrides else {}).items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(plane)


def test_read_dicom_series_folder_takes_the_largest_series(tmp_path):
    big = np.random.default_rng(6).integers(-500, 1500, size=(6, 10, 12))
    small = np.zeros((3, 10, 12))
    _write_dicom_series(tmp_path / "dcm", big, (0.7, 0.8, 2.5), (-3.0, 4.0, 5.0), "1.2.826.0.1.3680043.2.1125.2.1001")
    _write_dicom_series(tmp_path / "dcm", small, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.2.1125.2.2002")
    image = read_image(tmp_path / "dcm")
    assert image.GetSize() == (12, 10, 6)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.8, 2.5), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), (-3.0, 4.0, 5.0), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), big)


def test_label_values_negative_or_beyond_uint16_are_written_exactly(tmp_path):
    from vaeuda.labels import load_convention
    mapping = tmp_path / "wide.json"
    mapping.write_text('{"LV-M": 70000, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": [-1]}')
    convention = load_convention(str(mapping))
    classes = sitk.GetImageFromArray(np.array([0, 1, 2, 3, 4], np.uint8).reshape(1, 1, 5))
    out = write_label(classes, tmp_path / "wide.nii.gz", convention)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).ravel().tolist() == [-1, 70000, 2, 3, 4]
    assert sitk.GetArrayFromImage(read_label(out, convention)).ravel().tolist() == [0, 1, 2, 3, 4]
    assert MMWHS.decode(np.arange(5)).dtype == np.uint16 and CONSECUTIVE.decode(np.arange(5)).dtype == np.uint8


def test_dicom_series_with_a_missing_slice_is_refused_and_position_noise_is_not(tmp_path, monkeypatch):
    """ITK would stack the slices around a gap at their mean spacing, and only warn."""
    array = np.random.default_rng(7).integers(-500, 1500, size=(6, 8, 9))
    uid = "1.2.826.0.1.3680043.2.1125.2.3003"
    _write_dicom_series(tmp_path / "noisy", array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), uid,
                        jitter=[0.0, 0.05, -0.05, 0.05, -0.05, 0.0])   # gaps 2 +- 0.1 mm: within a tenth
    noisy = read_image(tmp_path / "noisy")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(noisy), array)
    assert noisy.GetSpacing()[2] == pytest.approx(2.0, abs=1e-5)
    _write_dicom_series(tmp_path / "gap", array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), uid)
    (tmp_path / "gap" / f"{uid[-4:]}_003.dcm").unlink()               # slices at z = 0, 2, 4, 8, 10
    # mean gap 2.5 mm; the gap of 4 mm differs by 1.5
    headers, pixels = [], []
    real_information, real_execute = sitk.ImageFileReader.ReadImageInformation, sitk.ImageSeriesReader.Execute
    monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation",
                        lambda self: headers.append(self.GetFileName()) or real_information(self))
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda self: pixels.append(1) or real_execute(self))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'gap'))}: the slices of DICOM series {uid} "
                                          r"are not evenly spaced \(missing or repeated slices\? a gap differs by 1.5 mm from "
                                          r"the mean spacing of 2.5 mm\)"):
        read_image(tmp_path / "gap")
    assert len(headers) == len(set(headers)) == 5 and pixels == []     # each header read once, no pixel data


def test_labels_read_encoded_and_written_decoded(tmp_path, tmp_volume):
    raw = np.array([0, 205, 420, 500, 820, 550, 600, 850, 0], np.int16).reshape(1, 3, 3)
    path = tmp_volume(raw, spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0), name="lab.nii.gz")
    reference = tmp_volume(np.zeros((1, 3, 3), np.float32), spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0))
    classes = read_label(path, MMWHS, reference=reference)
    assert classes.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(classes).ravel().tolist() == [0, 1, 2, 3, 4, 0, 0, 0, 0]
    out = write_label(classes, tmp_path / "again.nrrd", MMWHS)
    written = sitk.ReadImage(str(out))
    assert sitk.GetArrayFromImage(written).ravel().tolist() == [0, 205, 420, 500, 820, 0, 0, 0, 0]
    _assert_same_geometry(written, classes)
    write_label(classes, tmp_path / "consecutive.mha", CONSECUTIVE)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "consecutive.mha"))).ravel().tolist() == \
        [0, 1, 2, 3, 4, 0, 0, 0, 0]


def test_custom_mapping_writes_its_first_background_value(tmp_path, tmp_volume):
    """A JSON mapping's background is written as the first value of its "background" list
    (catches background always written as 0)."""
    from vaeuda.labels import load_convention
    mapping = tmp_path / "map.json"
    mapping.write_text('{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": [7, 0]}')
    convention = load_convention(str(mapping))
    assert convention.from_index == (7, 1, 2, 3, 4)
    raw = np.array([0, 1, 2, 3, 4, 7], np.uint8).reshape(1, 2, 3)
    classes = read_label(tmp_volume(raw, name="lab.nrrd"), convention)
    assert sitk.GetArrayFromImage(classes).ravel().tolist() == [0, 1, 2, 3, 4, 0]   # 0 and 7 are both background
    write_label(classes, tmp_path / "out.nrrd", convention)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nrrd"))).ravel().tolist() == [7, 1, 2, 3, 4, 7]


def test_geometry_tolerance_is_relative():
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetSpacing((0.5, 0.5, 3.0))
    b = sitk.Image(a)
    b.SetSpacing((0.5 * (1 + 1e-6), 0.5, 3.0))
    b.SetOrigin((1e-5, 0.0, 0.0))
    assert geometry_mismatch(b, a) is None
    b.SetOrigin((1e-2, 0.0, 0.0))
    assert geometry_mismatch(b, a).startswith("origin")
    assert Geometry.of(a).size == (4, 5, 6)
    # relative, not absolute: 100 mm vs 100.005 mm (5e-5 of it, 5e-3 absolute) is the same spacing,
    # 0.5 mm vs 0.5001 mm (2e-4 of it, 1e-4 absolute) is not
    wide, narrow = sitk.Image(a), sitk.Image(a)
    wide.SetSpacing((100.0, 0.5, 3.0))
    b = sitk.Image(wide)
    b.SetSpacing((100.0 * (1 + 5e-5), 0.5, 3.0))
    assert geometry_mismatch(b, wide) is None
    b = sitk.Image(narrow)
    b.SetSpacing((0.5 * (1 + 2e-4), 0.5, 3.0))
    assert geometry_mismatch(b, narrow).startswith("spacing")


def test_geometry_origin_tolerance_scales_with_the_largest_spacing():
    """Origin tolerance is rtol * max(spacing) = 1e-4 * 3 = 3e-4 (catches min(spacing), whose
    1e-4 * 0.5 = 5e-5 would refuse the 1e-4 offset)."""
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetSpacing((0.5, 0.5, 3.0))
    b = sitk.Image(a)
    b.SetOrigin((1e-4, 0.0, 0.0))              # 1e-4 <= 3e-4
    assert geometry_mismatch(b, a) is None
    b.SetOrigin((4e-4, 0.0, 0.0))              # 4e-4 > 3e-4
    assert geometry_mismatch(b, a).startswith("origin")


def test_a_grid_far_from_the_scanner_origin_survives_a_nifti_round_trip(tmp_path):
    """NIfTI keeps float32 coordinates: z = -1987.654 comes back 5.3e-5 mm off, more than
    rtol * max(spacing) = 5e-5 allows alone; the float32 allowance (2.4e-4 here) takes it."""
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetSpacing((0.4, 0.4, 0.5))
    a.SetOrigin((-160.3, -180.7, -1987.654))
    sitk.WriteImage(a, str(tmp_path / "a.nii.gz"))
    back = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert back.GetOrigin() != a.GetOrigin()                               # it did round
    assert geometry_mismatch(back, a) is None
    moved = sitk.Image(a)
    moved.SetOrigin((-160.3, -180.7, -1987.655))                           # 1 um: more than both allowances
    assert geometry_mismatch(moved, a) == "origin (-160.3, -180.7, -1987.655) vs (-160.3, -180.7, -1987.654)"


def test_geometry_mismatch_shows_the_digits_that_differ():
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetSpacing((0.5, 0.5, 3.0))
    a.SetOrigin((1000.0, 0.0, 0.0))
    b = sitk.Image(a)
    b.SetOrigin((1000.001, 0.0, 0.0))                       # 6 significant digits read 1000 for both
    assert geometry_mismatch(b, a) == "origin (1000.001, 0, 0) vs (1000, 0, 0)"
    assert geometry_mismatch(b, a, names=("label", "image")) == "origin: label (1000.001, 0, 0), image (1000, 0, 0)"
    b.SetSpacing((0.5, 0.5, 2.5))
    assert geometry_mismatch(a, b, names=("a", "b")) == "spacing: a (0.5, 0.5, 3), b (0.5, 0.5, 2.5)"


def test_geometry_mismatch_compares_every_axis_of_size_and_direction_within_1e_4():
    """The docstring's own example: sizes differing along z only; direction cosines 5e-4 apart (a
    0.03 degree turn about z) are another grid, 5e-5 apart the same (catches a size compared in x and
    y only, a loose direction tolerance)."""
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    assert geometry_mismatch(sitk.Image(4, 5, 7, sitk.sitkUInt8), a) == "size (4, 5, 7) vs (4, 5, 6)"
    for sine, same in ((5e-4, False), (5e-5, True)):
        cosine = (1 - sine ** 2) ** 0.5
        turned = sitk.Image(a)
        turned.SetDirection((cosine, -sine, 0.0, sine, cosine, 0.0, 0.0, 0.0, 1.0))
        assert (geometry_mismatch(turned, a) is None) is same
        if not same:
            assert geometry_mismatch(turned, a).startswith("direction")


def test_the_float32_origin_allowance_is_one_unit_in_the_last_place():
    """At z = 1000 mm with 1 mm voxels the origin may be off by rtol * 1 + eps32 * 1000 = 1e-4 +
    1.19e-4 = 2.19e-4 mm: 2e-4 is the same grid, 3e-4 is not (catches an allowance of several units)."""
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetOrigin((0.0, 0.0, 1000.0))
    b = sitk.Image(a)
    b.SetOrigin((0.0, 0.0, 1000.0002))
    assert geometry_mismatch(b, a) is None
    b.SetOrigin((0.0, 0.0, 1000.0003))
    assert geometry_mismatch(b, a) == "origin (0, 0, 1000.0003) vs (0, 0, 1000)"


def test_geometry_mismatch_reports_a_different_direction():
    """Same size, spacing and origin but a permuted direction is a different grid (catches a
    comparison that skips the direction)."""
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    b = sitk.Image(a)
    b.SetDirection(PERMUTED)
    assert geometry_mismatch(b, a).startswith("direction")


# --- slices with a physical field of view ------------------------------------------------------

@pytest.mark.parametrize("direction", [IDENTITY, PERMUTED], ids=["identity", "permuted"])
def test_field_of_view_larger_than_volume_pads_and_round_trips_exactly(tmp_volume, direction):
    labels = _phantom_labels(sheet=False)  # nothing touches the border (edge values are repeated outside)
    # 2 mm in-plane in every orientation, so the 2 mm slice pixels fall on whole voxel offsets
    image = tmp_volume(labels, spacing=(2.0, 2.0, 2.0), origin=(-10.0, 5.0, 30.0), direction=direction)
    grid = SliceGrid.from_image(image, 30, fov_mm=60.0)
    assert grid.grid.spacing[0] == grid.grid.spacing[2] == 2.0
    slices = grid.label_slices(image)
    assert slices.shape == (grid.n_slices, 30, 30)
    assert int((slices > 0).sum()) == int((labels > 0).sum())   # every labelled voxel lands in the field
    back = grid.scores_to_image(_one_hot(slices))
    _assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


def test_field_of_view_is_centred_and_crops_the_border(tmp_volume):
    labels = np.zeros((20, 6, 20), np.uint8)           # x and z span 20 voxels of 1 mm
    labels[8:12, :, 8:12] = 3                          # a block in the middle
    labels[0, :, 0] = 1                                # a corner voxel outside a 10 mm field
    image = tmp_volume(labels)
    grid = SliceGrid.from_image(image, 10, fov_mm=10.0)
    slices = grid.label_slices(image)
    assert set(np.unique(slices)) == {0, 3}            # the corner is cropped away
    assert (slices[:, 3:7, 3:7] == 3).all() and (slices == 3).sum() == 6 * 16   # centred block
    back = sitk.GetArrayFromImage(grid.scores_to_image(_one_hot(slices)))
    np.testing.assert_array_equal(back[5:15, :, 5:15], labels[5:15, :, 5:15])   # inside the field: exact


def test_outside_the_field_of_view_is_background(tmp_volume):
    """The model sees nothing outside its field of view: the edge rows' classes are not repeated
    outwards. 20 voxels of 1 mm, a 10 mm field centred: voxels 5..14 along x and z."""
    image = tmp_volume(np.zeros((20, 6, 20), np.float32))
    scores = np.zeros((6, 5, 10, 10), np.float32)
    scores[:, 2] = 1                                   # class 2 everywhere in the field, its edges included
    back = sitk.GetArrayFromImage(SliceGrid.from_image(image, 10, fov_mm=10.0).scores_to_image(scores))
    expected = np.zeros((20, 6, 20), np.uint8)
    expected[5:15, :, 5:15] = 2
    np.testing.assert_array_equal(back, expected)
    # without a field of view the slices span the whole volume
    whole = SliceGrid.from_image(image, 10)
    assert (sitk.GetArrayFromImage(whole.scores_to_image(scores)) == 2).all()


def test_one_sided_clipping_by_hand():
    """Values 0..9, minmax, clip_lower_percentile 50 only: clipped below at 4.5 (the median) and not
    above, so [4.5, 9] maps to [-1, 1]: 5 -> -1 + 0.5 * 2 / 4.5 = -0.7778, 9 -> 1."""
    out = normalise(np.arange(10, dtype=np.float32), {"method": "minmax", "clip_lower_percentile": 50})
    np.testing.assert_allclose(out, [-1, -1, -1, -1, -1, -1 + 1 / 4.5, -1 + 3 / 4.5, -1 + 5 / 4.5, -1 + 7 / 4.5, 1],
                               atol=1e-6)


def test_chunked_mean_std_sums_every_chunk():
    """Values 0..9 in chunks of 4 (4 + 4 + 2): mean 4.5, population std sqrt(8.25) = 2.8723."""
    from vaeuda.volumes import _mean_std
    mean, std = _mean_std(np.arange(10, dtype=np.float32), chunk=4)
    assert mean == pytest.approx(4.5) and std == pytest.approx(8.25 ** 0.5)


@pytest.mark.parametrize("degrees, along_patient_axes", [(0.5, False), (0.9, False), (1.1, True), (1.5, True),
                                                        (7.0, True)])
def test_a_volume_more_than_one_degree_oblique_is_sliced_along_the_patients_axes(tmp_volume, degrees,
                                                                                  along_patient_axes):
    """OBLIQUE_DEGREES (1): below it the volume's own (canonical, rotated) frame is sliced; above it the
    slice grid's axes are the patient's (an identity direction), as the training slices were."""
    direction = tuple((_rotation((1, 2, 3), degrees) @ np.asarray(PERMUTED).reshape(3, 3)).ravel())
    image = tmp_volume(_phantom_labels(sheet=False), spacing=(0.7, 1.3, 2.5), direction=direction)
    grid = SliceGrid.from_image(image, 12)
    assert obliquity_degrees(grid.canonical.direction) == pytest.approx(degrees, abs=1e-6)
    own_frame = np.allclose(grid.grid.direction, grid.canonical.direction)
    assert np.allclose(grid.grid.direction, IDENTITY) is along_patient_axes and own_frame is not along_patient_axes


def _dicom_meta_only(sop_class: str) -> bytes:
    """A DICOM Part 10 file holding only its meta header: preamble, "DICM", (0002,0002) as UI."""
    uid = sop_class.encode() + (b"\0" if len(sop_class) % 2 else b"")
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sH", 2, 2, b"UI", len(uid)) + uid


def test_a_dicom_file_cut_short_is_named_not_dropped(tmp_path):
    """GDCM leaves a slice it cannot parse out of the series: the last one cut short gave a scan one
    slice thinner without a word, one in the middle "not evenly spaced" without naming the file.
    A file that is no DICOM (a note beside the series) is still ignored."""
    array = np.random.default_rng(8).integers(-500, 1500, size=(5, 8, 9))
    uid = "1.2.826.0.1.3680043.2.1125.2.4004"
    _write_dicom_series(tmp_path / "dcm", array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), uid)
    (tmp_path / "dcm" / "README.txt").write_text("series exported by hand")
    (tmp_path / "dcm" / "DICOMDIR").write_bytes(_dicom_meta_only("1.2.840.10008.1.3.10"))   # another SOP class
    assert read_image(tmp_path / "dcm").GetSize() == (9, 8, 5)
    last = tmp_path / "dcm" / f"{uid[-4:]}_004.dcm"
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'dcm'))}: 1 DICOM file\\(s\\) in it cannot be "
                                          f"read as part of a series \\(damaged or cut short\\?\\): {last.name}; "
                                          f"mend or remove them\\.$"):
        read_image(tmp_path / "dcm")


@pytest.mark.parametrize("odd", ["fifo", "dangling link"])
def test_a_dicom_folder_holding_a_pipe_or_broken_link_is_refused_naming_it(tmp_path, odd):
    """GDCM's scan stopped short at it, at random: valid slices after it were named as unreadable."""
    import os
    array = np.zeros((4, 6, 6))
    _write_dicom_series(tmp_path / "dcm", array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.2.1125.2.1001")
    if odd == "fifo":
        os.mkfifo(tmp_path / "dcm" / "zz")
    else:
        os.symlink(tmp_path / "gone", tmp_path / "dcm" / "zz")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'dcm'))}: holds zz, not a regular file \\(a pipe, "
                                          f"socket, device or broken link\\), which the DICOM reader cannot pass; move "
                                          f"it away\\.$"):
        read_image(tmp_path / "dcm")
    (tmp_path / "dcm" / "zz").unlink()
    assert read_image(tmp_path / "dcm").GetSize() == (6, 6, 4)


@pytest.mark.parametrize("overrides, what", [
    (lambda k: {"0020|0037": "0\\1\\0\\1\\0\\0"} if k >= 2 else {}, "have more than one orientation"),
    (lambda k: {"0020|0032": "0\\0\\0"}, "all lie at one position (4 slices)"),
    (lambda k: {"0020|0032": f"0\\{0.8 * k}\\{2.0 * k}"}, "are not stacked along their normal (a gantry tilt?)"),
    # two slices tilted 0.6 degrees from the others (beyond the 1e-4 of rounded cosines)
    (lambda k: {"0020|0037": "1\\0\\0\\0\\0.99995\\0.01"} if k >= 2 else {}, "have more than one orientation"),
])
def test_a_dicom_series_itk_would_stack_wrongly_is_refused(tmp_path, overrides, what):
    """Mixed or skewed orientations were read as the first slice's or identity, slices at one position got
    1 mm, and a gantry tilt was stacked straight (the last slice moved aside by the tilt)."""
    _write_dicom_series(tmp_path / "dcm", np.zeros((4, 6, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                        "1.2.826.0.1.3680043.2.1125.2.1001", overrides=overrides)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path / 'dcm'))}: the slices of DICOM series .* "
                                          f"{re.escape(what)}.*; ITK would stack them into a wrong volume\\.$"):
        read_image(tmp_path / "dcm")


def test_a_dicom_series_whose_orientation_is_not_orthonormal_is_refused(tmp_path):
    """ITK read it as the identity (written by hand: the DICOM writer refuses such an orientation)."""
    folder = tmp_path / "dcm"
    _write_dicom_series(folder, np.zeros((4, 6, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.2.1125.2.1001")
    for file in folder.iterdir():
        data = file.read_bytes()
        assert data.count(b"1\\0\\0\\0\\1\\0") == 1
        file.write_bytes(data.replace(b"1\\0\\0\\0\\1\\0", b"1\\0\\0\\1\\1\\0"))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: the slices of DICOM series .* have an orientation "
                                          f"that is not orthonormal \\(1, 0, 0, 1, 1, 0\\); ITK would stack them"):
        read_image(folder)
    for file in folder.iterdir():          # unit rows and columns, but not perpendicular: the column is the row
        file.write_bytes(file.read_bytes().replace(b"1\\0\\0\\1\\1\\0", b"1\\0\\0\\1\\0\\0"))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: the slices of DICOM series .* have an orientation "
                                          f"that is not orthonormal \\(1, 0, 0, 1, 0, 0\\); ITK would stack them"):
        read_image(folder)


def test_a_dicom_series_whose_slices_differ_in_pixel_spacing_is_refused(tmp_path):
    """One slice of four with 2 x 1 mm pixels, the others 1 x 1 mm: ITK would stack it at the first's
    spacing (edited in the file: the writer writes the image's own spacing)."""
    folder = tmp_path / "dcm"
    _write_dicom_series(folder, np.zeros((4, 6, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.2.1125.2.1001")
    third = sorted(folder.iterdir())[2]
    spacing = b"\x28\x00\x30\x00\x04\x00\x00\x00" + b"1\\1 "        # (0028,0030), implicit VR, 4 bytes
    data = third.read_bytes()
    assert data.count(spacing) == 1
    third.write_bytes(data.replace(spacing, spacing[:8] + b"2\\1 "))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(folder))}: the slices of DICOM series .* have no single "
                                          f"positive pixel spacing; ITK would stack them into a wrong volume\\.$"):
        read_image(folder)


def test_dicom_slices_half_a_gap_apart_are_refused_as_unevenly_spaced(tmp_path):
    """Slices at z = 0, 2, 4, 7, 9, 11 (the last three moved by half a gap): gaps 2, 2, 3, 2, 2 of
    mean 2.2 mm, one 0.8 mm off it, beyond a tenth of it (catches a tolerance loose enough to take
    a shift a missing slice does not make)."""
    uid = "1.2.826.0.1.3680043.2.1125.2.4004"
    _write_dicom_series(tmp_path / "shifted", np.zeros((6, 6, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), uid,
                        jitter=[0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(VaeudaError, match=r"are not evenly spaced \(missing or repeated slices\? a gap differs by 0.8 mm "
                                          r"from the mean spacing of 2.2 mm\)"):
        read_image(tmp_path / "shifted")
