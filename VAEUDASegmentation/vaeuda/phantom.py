"""The synthetic cardiac MR/CT cohort: unpaired 3D phantoms with MM-WHS label maps.

Each subject is a thorax drawn with implicit shapes (ellipsoids, elliptic cylinders, capsule
chains) on the voxel grid of its modality, in physical millimetres, so anatomy keeps its size
whatever the spacing. World axes are LPS: x towards the patient's left, y posterior, z superior;
the phantom's origin is the thorax centre at the level of the LV centre. Images have identity
direction; array index order is ``(z, y, x)`` as SimpleITK's ``GetArrayFromImage``.

Anatomy (random per subject): body outline with subcutaneous fat and chest-wall muscle, ribs,
sternum, spine, lungs with vessels, diaphragm with liver and abdomen below, and the heart,
rotated by up to 15 degrees about each axis, scaled by up to 15 % and shifted by a few mm:
LV blood cavity (500) in an LV myocardium shell (205), LA (420) with pulmonary-vein ostia,
ascending aorta (820) as a tube from the LV outflow, and distractor blood pools labelled RV (600),
RA (550) and pulmonary artery (850), plus unlabelled caval veins and descending aorta.

Appearance is what differs between the modalities (the domain shift the method must bridge):

* ``mr`` (bright-blood bSSFP, arbitrary units): blood and fat bright, muscle and myocardium dark,
  cortical bone and lung dark; multiplicative bias field, Rician noise, 1.7-2.1 mm voxels,
  field of view cropped around the heart.
* ``ct`` (contrast-enhanced, Hounsfield units): bone brightest, left-heart blood +250..+400,
  right heart less enhanced, fat -100, lung -850; Gaussian noise, 1.3-1.5 mm in-plane and
  1.8-2.5 mm slices, larger field of view.

Epicardial fat (5-10 mm around and between the chambers) is bright in MR and dark in CT, so the
outer border of the LV myocardium changes polarity between the modalities; that is what makes
an MR model fail on CT (Docs/phantom.md).

Determinism: the anatomy depends only on ``subject_seed``; the grid and appearance on
``(subject_seed, modality)``. :func:`make_cohort` derives a different seed for every
``(seed, modality, index)``, so its MR and CT subjects are different people, as in MM-WHS.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import VaeudaError
from .fileio import PathLike, atomic_dir, atomic_path, check_output_dir
from .labels import MMWHS_OTHER_VALUES, STRUCTURES
from .progress import Reporter, listed, null_reporter

GENERATOR_VERSION = "2"
GENERATOR = f"vaeuda.phantom {GENERATOR_VERSION}"   # as recorded in a cohort's splits.json
MODALITIES = ("mr", "ct")
_MODALITY_CODE = {"mr": 1, "ct": 2}
FIRST_ID = 1001
MAX_SUBJECTS = 9999 - FIRST_ID + 1   # per modality: ids stay four digits, as MM-WHS's (1e8 had run for minutes)

# Default grid (x, y, z voxels) and spacing ranges (mm) per modality. ``size`` replaces every
# voxel count and scales the spacing so that the field of view stays the same.
DEFAULT_GRID = {"mr": (96, 96, 96), "ct": (160, 160, 96)}
# CT's in-plane field of view (208-240 mm) is always wider than MR's (163-202 mm).
_SPACING_RANGE = {"mr": ((1.7, 2.1), (1.7, 2.1)), "ct": ((1.3, 1.5), (1.8, 2.5))}  # (in-plane, slice)
# Scanner coordinates differ per modality (table position); the anatomy does not care. The body's
# own frame is the scanner's minus this offset (see body_frame).
SCANNER_OFFSET_MM = {"mr": (0.0, 0.0, 0.0), "ct": (0.0, 160.0, -420.0)}
MIN_SIZE, MAX_SIZE = 16, 512

# Tissue classes of the tissue map; appearance is a per-modality, per-subject value for each.
TISSUES = ("air", "fat", "muscle", "lung", "lung vessel", "liver", "abdomen", "cortical bone",
           "marrow", "csf", "disc", "myocardium", "left-heart blood", "right-heart blood")
(AIR, FAT, MUSCLE, LUNG, LUNG_VESSEL, LIVER, ABDOMEN, BONE, MARROW, CSF, DISC, MYOCARDIUM,
 BLOOD_LEFT, BLOOD_RIGHT) = range(len(TISSUES))

# MM-WHS values drawn by the phantom (targets and distractors), from the one table in labels.py.
_MMWHS_VALUE = {s.key: s.mmwhs_value for s in STRUCTURES}
LV_MYO, LA_BLOOD, LV_BLOOD, ASC_AORTA = (_MMWHS_VALUE[k] for k in ("LV-M", "LA-B", "LV-B", "A-A"))
RA_BLOOD, RV_BLOOD, PULM_ARTERY = MMWHS_OTHER_VALUES

Vec = np.ndarray


# --------------------------------------------------------------------------- geometry helpers

def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """3x3 rotation (radians about x, then y, then z), world-from-local."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _unit(v: Sequence[float]) -> Vec:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _frame(axis: Vec, hint: Vec) -> np.ndarray:
    """Rotation whose first column is ``axis`` and second the part of ``hint`` orthogonal to it."""
    a = _unit(axis)
    b = _unit(np.asarray(hint, float) - np.dot(hint, a) * a)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def _catmull_rom(points: Sequence[Vec], per_segment: int = 4) -> np.ndarray:
    """Smooth curve through ``points`` (K, 3) -> samples (M, 3), ends included."""
    p = np.asarray(points, dtype=float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i:i + 4]
        for t in np.linspace(0.0, 1.0, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (3 * p1 - p0 - 3 * p2 + p3) * t3))
    out.append(p[-1])
    return np.asarray(out)


class _Canvas:
    """Label and tissue arrays ``(z, y, x)`` on an axis-aligned grid, painted shape by shape.

    Each shape is evaluated only inside its bounding box, on broadcast coordinate vectors,
    so painting costs the box volume, not the grid volume.
    """

    def __init__(self, origin: Sequence[float], spacing: Sequence[float], size_xyz: Sequence[int]):
        self.origin = np.asarray(origin, dtype=float)       # world (x, y, z) of voxel 0, mm
        self.spacing = np.asarray(spacing, dtype=float)     # (x, y, z) mm
        self.size = tuple(int(n) for n in size_xyz)          # (nx, ny, nz)
        shape_zyx = self.size[::-1]
        self.label = np.zeros(shape_zyx, dtype=np.uint16)
        self.tissue = np.full(shape_zyx, AIR, dtype=np.uint8)

    def _box(self, lo: Vec, hi: Vec):
        """Index box covering world box [lo, hi] -> (slices zyx, X (1,1,nx), Y (1,ny,1), Z (nz,1,1)) or None."""
        i0 = np.maximum(np.floor((np.asarray(lo) - self.origin) / self.spacing).astype(int), 0)
        i1 = np.minimum(np.ceil((np.asarray(hi) - self.origin) / self.spacing).astype(int) + 1, self.size)
        if np.any(i1 <= i0):
            return None
        coords = [(self.origin[a] + self.spacing[a] * np.arange(i0[a], i1[a])).astype(np.float32) for a in range(3)]
        sl = (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
        return sl, coords[0][None, None, :], coords[1][None, :, None], coords[2][:, None, None]

    def paint(self, shape: "_Shape", tissue: int, label: int = 0, where: Optional[Sequence[int]] = None) -> None:
        """Set tissue and label inside ``shape``; with ``where``, only over voxels of those tissues."""
        box = self._box(*shape.bounds())
        if box is None:
            return
        sl, x, y, z = box
        mask = shape.inside(x, y, z)
        if where is not None:
            mask &= np.isin(self.tissue[sl], where)
        self.tissue[sl][mask] = tissue
        self.label[sl][mask] = label


class _Shape:
    def bounds(self) -> Tuple[Vec, Vec]:
        raise NotImplementedError

    def inside(self, x, y, z) -> np.ndarray:
        raise NotImplementedError


class _Ellipsoid(_Shape):
    """Rotated ellipsoid; optionally cut to ``local[0] >= cut`` (a plane across its first axis)."""

    def __init__(self, center: Vec, semi_axes: Sequence[float], rotation: Optional[np.ndarray] = None,
                 cut: Optional[float] = None):
        self.center = np.asarray(center, float)
        self.semi = np.asarray(semi_axes, float)
        self.rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
        self.cut = cut

    def bounds(self):
        half = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def _local(self, x, y, z, k):
        r = self.rot[:, k].astype(np.float32)
        c = self.center.astype(np.float32)
        return (x - c[0]) * r[0] + (y - c[1]) * r[1] + (z - c[2]) * r[2]

    def inside(self, x, y, z):
        q = 0
        for k in range(3):
            q = q + (self._local(x, y, z, k) / np.float32(self.semi[k])) ** 2
        mask = q <= 1
        if self.cut is not None:
            mask &= self._local(x, y, z, 0) >= self.cut
        return mask


class _Capsule(_Shape):
    """Points within ``radius`` of the segment p0-p1."""

    def __init__(self, p0: Vec, p1: Vec, radius: float):
        self.p0, self.p1, self.r = np.asarray(p0, float), np.asarray(p1, float), float(radius)

    def bounds(self):
        return np.minimum(self.p0, self.p1) - self.r, np.maximum(self.p0, self.p1) + self.r

    def inside(self, x, y, z):
        d = (self.p1 - self.p0).astype(np.float32)
        p0 = self.p0.astype(np.float32)
        dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / np.float32(max(float(d @ d), 1e-6)), 0, 1)
        return (dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2 <= np.float32(self.r ** 2)


class _Tube(_Shape):
    """A smooth tube along a curve through ``points``, radius varying linearly from r0 to r1."""

    def __init__(self, points: Sequence[Vec], r0: float, r1: Optional[float] = None, per_segment: int = 4):
        samples = _catmull_rom(points, per_segment)
        radii = np.linspace(r0, r0 if r1 is None else r1, len(samples) - 1)
        self.capsules = [_Capsule(samples[i], samples[i + 1], radii[i]) for i in range(len(samples) - 1)]

    def bounds(self):
        los, his = zip(*(c.bounds() for c in self.capsules))
        return np.min(los, axis=0), np.max(his, axis=0)

    def inside(self, x, y, z):
        mask = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
        for c in self.capsules:
            mask |= c.inside(x, y, z)
        return mask


class _Slab(_Shape):
    """An infinite-bounds shape given by a function of world coordinates (for body-size structures)."""

    def __init__(self, fn, lo=(-1e4, -1e4, -1e4), hi=(1e4, 1e4, 1e4)):
        self.fn, self.lo, self.hi = fn, np.asarray(lo, float), np.asarray(hi, float)

    def bounds(self):
        return self.lo, self.hi

    def inside(self, x, y, z):
        return np.broadcast_to(self.fn(x, y, z), np.broadcast_shapes(x.shape, y.shape, z.shape)).copy()


# --------------------------------------------------------------------------- anatomy

@dataclass
class _HeartPose:
    """Maps heart-frame points (mm, body-aligned, origin at the LV centre) to world."""
    center: Vec
    rotation: np.ndarray
    scale: float

    def point(self, p: Sequence[float]) -> Vec:
        return self.center + self.scale * self.rotation @ np.asarray(p, float)

    def ellipsoid(self, center, semi, rot=None, cut=None, grow: float = 0.0) -> _Ellipsoid:
        rot = np.eye(3) if rot is None else rot
        return _Ellipsoid(self.point(center), self.scale * np.asarray(semi, float) + grow,
                          self.rotation @ rot, None if cut is None else self.scale * cut)

    def tube(self, points, r0, r1=None, grow: float = 0.0) -> _Tube:
        r1 = r0 if r1 is None else r1
        return _Tube([self.point(p) for p in points], self.scale * r0 + grow, self.scale * r1 + grow)


def _draw_anatomy(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Paint one random subject's thorax and heart into ``canvas`` (all draws come from ``rng``)."""
    u = rng.uniform
    # ---- body: elliptic cylinder, subcutaneous fat, chest-wall muscle, mediastinal fat inside
    ax, ay = u(125, 150), u(85, 105)
    fat_t, muscle_t = u(6, 18), u(8, 14)
    wall_in = fat_t + muscle_t
    spine_y, body_r = ay - u(42, 52), u(16, 20)

    # ---- heart first (LV centre left of midline, anterior; random rotation, scale, shift), so
    #      that the diaphragm can be fitted under it
    heart = _HeartPose(
        center=np.array([u(22, 34), -ay * u(0.26, 0.34), 0.0]) + rng.uniform(-4, 4, size=3),
        rotation=_rotation(*np.radians(rng.uniform(-15, 15, size=3))),
        scale=u(0.85, 1.15))
    heart_plan, heart_bottom = _plan_heart(heart, rng, spine_y, body_r)

    def depth(x, y):
        """Approximate depth (mm) below the body outline, along the ray from the thorax axis."""
        q = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
        r = np.sqrt(x * x + y * y)
        return (1 - q) * r / np.maximum(q, 1e-3)

    canvas.paint(_Slab(lambda x, y, z: depth(x, y) >= 0), FAT)
    canvas.paint(_Slab(lambda x, y, z: (depth(x, y) >= fat_t) & (depth(x, y) < wall_in)), MUSCLE)

    # ---- diaphragm: a right and a left dome, falling off laterally and towards the recesses;
    #      the heart rests on it (its lowest point a few mm into the dome, the heart paints over)
    rise_r, rise_l = u(8, 18), u(0, 8)

    def dome(x, y):
        return (rise_r * np.exp(-((x + 55) / 55) ** 2) + rise_l * np.exp(-((x - 55) / 55) ** 2)
                - 40 * (x / ax) ** 4 - 30 * (y / ay) ** 2)

    dome_0 = heart_bottom[2] + u(0, 6) - float(dome(heart_bottom[0], heart_bottom[1]))

    def below_dome(x, y, z):
        return z < dome_0 + dome(x, y)

    # ---- lungs: the thoracic cavity above the diaphragm, except the superior mediastinum
    #      (fat and great vessels above the heart; the heart is painted over the lungs later)
    lung_w, lung_h = u(0.46, 0.52) * ax, u(130, 150)
    med_x, med_w, med_z = u(-8, 4), u(14, 22), heart.center[2] + u(20, 35)
    for side in (-1, 1):
        lung = _Ellipsoid((side * 0.5 * ax, 0.05 * ay, 20), (lung_w, 0.9 * ay, lung_h))
        lung_fn = lung.inside
        canvas.paint(_Slab(lambda x, y, z, f=lung_fn: f(x, y, z) & (depth(x, y) >= wall_in + 2)
                           & ~below_dome(x, y, z) & ((np.abs(x - med_x) > med_w) | (z < med_z)),
                           *lung.bounds()), LUNG, where=[FAT])
    canvas.paint(_Slab(lambda x, y, z: (depth(x, y) >= wall_in) & below_dome(x, y, z)), ABDOMEN, where=[FAT])
    liver = _Ellipsoid((-u(30, 45), u(-5, 10), dome_0 - u(40, 55)), (u(90, 110), u(70, 85), u(60, 75)),
                       _rotation(0, u(-0.2, 0.1), 0))
    canvas.paint(liver, LIVER, where=[ABDOMEN])

    # ---- bones: ribs in the chest wall, sternum, spine with canal; paraspinal muscles
    rib_period, rib_t, rib_slope, rib_phase = u(26, 32), u(7, 10), u(0.25, 0.45), u(0, 30)
    canvas.paint(_Slab(lambda x, y, z: (depth(x, y) >= fat_t + 1) & (depth(x, y) < wall_in - 1)
                       & (y > -0.55 * ay)
                       & (np.mod(z - rib_slope * y - rib_phase, rib_period) < rib_t)), BONE)
    canvas.paint(_Ellipsoid((0, -ay + fat_t + 0.6 * muscle_t, 0), (14, 0.35 * muscle_t + 2, 300)), BONE)
    for side in (-1, 1):
        canvas.paint(_Ellipsoid((side * 35, spine_y + 30, 0), (22, 25, 400)), MUSCLE)
    canvas.paint(_Ellipsoid((0, spine_y, 0), (body_r, 0.85 * body_r, 400)), BONE)
    canvas.paint(_Ellipsoid((0, spine_y, 0), (body_r - 3, 0.85 * body_r - 3, 400)), MARROW)
    disc_period, disc_phase = u(26, 30), u(0, 30)
    canvas.paint(_Slab(lambda x, y, z: np.mod(z - disc_phase, disc_period) < 6), DISC, where=[BONE, MARROW])
    canal_y = spine_y + body_r + 8
    canvas.paint(_Ellipsoid((0, canal_y + 4, 0), (14, 14, 400)), BONE)
    canvas.paint(_Ellipsoid((0, canal_y + 22, 0), (5, 10, 400)), BONE)
    canvas.paint(_Ellipsoid((0, canal_y, 0), (8, 7, 400)), CSF)

    for shape, tissue, label, where in heart_plan:
        canvas.paint(shape, tissue, label, where)
    _keep_largest_components(canvas.label)


_Stroke = Tuple[_Shape, int, int, Optional[Sequence[int]]]  # shape, tissue, label, where


def _plan_heart(heart: _HeartPose, rng: np.random.Generator, spine_y: float,
                body_r: float) -> Tuple[List[_Stroke], Vec]:
    """The heart and great vessels as an ordered list of strokes (later ones paint over earlier).

    Heart frame: body-aligned mm with its origin at the LV centre. Also returns the world point
    at the bottom of the ventricles (x, y of the heart centre, z of the lowest ventricle point).
    """
    u = rng.uniform
    # LV: long axis from base (right, posterior, superior) to apex (left, anterior, inferior)
    az, el = np.radians(u(35, 55)), np.radians(u(20, 35))
    apex_dir = np.array([math.sin(az) * math.cos(el), -math.cos(az) * math.cos(el), -math.sin(el)])
    right_ant = np.array([-1.0, -1.0, 0.0])  # towards the RV
    lv_rot = _frame(apex_dir, right_ant)
    lv_long, lv_short = u(36, 46), u(19, 25)
    myo_t = u(8, 12)
    base_cut = -u(0.62, 0.72) * lv_long            # the LV is open at its base plane
    base = base_cut * apex_dir                      # centre of the base plane
    ant_base = lv_rot[:, 1]                         # in-plane direction towards the RV side
    sup_base = lv_rot[:, 2] * np.sign(lv_rot[2, 2] or 1.0)

    # RV: a larger ellipsoid right-anterior of the LV; the LV myocardium carves it into a crescent
    rv_c = (lv_short + myo_t) * 0.75 * _unit(right_ant) - 0.12 * lv_long * apex_dir
    rv_semi = (0.85 * lv_long + 4, lv_short + u(6, 12), lv_short + u(14, 22))
    rv_top = rv_c - 0.55 * rv_semi[0] * apex_dir
    # aortic root in the base plane, towards the RV side; pulmonary trunk anterior-left of it
    aorta_r = u(11, 14)
    root = base + 0.45 * lv_short * ant_base + 0.25 * lv_short * sup_base - 3 * apex_dir
    pa_start = root + np.array([u(6, 12), -u(16, 22), u(10, 16)])
    pa_r = u(10, 13)
    bif = pa_start + np.array([u(8, 14), u(16, 22), u(22, 30)])
    # LA: posterior and superior to the LV base
    la_c = base + np.array([-u(4, 10), u(18, 24), u(8, 14)])
    la_semi = np.array([u(28, 36), u(16, 21), u(18, 24)])
    # RA: right of the RV base, posterior
    ra_c = rv_top + np.array([-u(14, 20), u(18, 26), u(2, 8)])
    ra_semi = np.array([u(19, 24), u(18, 22), u(22, 27)])

    # ascending aorta: up and slightly right from the root, then the arch towards left-posterior
    asc = [root, root + np.array([-u(6, 12), -u(2, 6), 22]), root + np.array([-u(8, 14), -u(0, 4), 50]),
           root + np.array([-u(2, 6), u(6, 12), 72])]
    arch = [asc[-1], asc[-1] + np.array([u(14, 20), u(14, 20), u(8, 12)]),
            asc[-1] + np.array([u(30, 38), u(32, 40), u(0, 6)])]
    pa = [pa_start - 6 * _unit(pa_start - rv_top), pa_start, bif]
    lpa = [bif, bif + np.array([u(18, 24), u(8, 12), -u(2, 6)]), bif + np.array([u(38, 46), u(14, 20), -u(6, 12)])]
    rpa = [bif, bif + np.array([-u(24, 30), u(10, 14), -u(0, 4)]), bif + np.array([-u(56, 66), u(14, 20), -u(4, 8)])]
    rvot = [rv_c, rv_top, pa_start]
    svc = [ra_c + np.array([2, 2, 0.6 * ra_semi[2]]), ra_c + np.array([3, 3, 60]), ra_c + np.array([3, 4, 140])]
    ivc = [ra_c + np.array([4, 4, -0.6 * ra_semi[2]]), ra_c + np.array([8, 8, -50]), ra_c + np.array([10, 10, -160])]
    pv_dirs = [np.array([sx, u(0.4, 0.8), sz]) for sx in (-1, 1) for sz in (-0.5, 0.5)]

    fat = u(5.0, 10.0)  # epicardial fat left between the chambers (real: a few mm to over 10)
    lv_outer = heart.ellipsoid(np.zeros(3), (lv_long + 0.8 * myo_t, lv_short + myo_t, lv_short + myo_t),
                               lv_rot, cut=base_cut)
    lv_cavity = heart.ellipsoid(np.zeros(3), (lv_long, lv_short, lv_short), lv_rot, cut=base_cut)
    rv_outer = heart.ellipsoid(rv_c, rv_semi, lv_rot, grow=3.5)
    # the aorta beyond the labelled part: rest of the arch, then down beside the spine (body frame)
    arch_end = heart.point(arch[-1])
    desc_x = body_r + 10 + rng.uniform(-3, 3)  # left-anterior of the vertebral bodies
    descending = [arch_end, np.array([desc_x, spine_y - 10, arch_end[2] - 30]),
                  np.array([desc_x, spine_y - 8, -400.0])]

    # 1) epicardial fat: chambers and vessels first painted slightly larger, as fat
    fat_where = [FAT, LUNG, MUSCLE, ABDOMEN, LIVER]
    plan: List[_Stroke] = [
        (heart.ellipsoid(rv_c, rv_semi, lv_rot, grow=3.5 + fat), FAT, 0, fat_where),
        (heart.ellipsoid(ra_c, ra_semi, grow=fat), FAT, 0, fat_where),
        (heart.ellipsoid(la_c, la_semi, grow=fat), FAT, 0, fat_where),
        (heart.ellipsoid(np.zeros(3), (lv_long + 0.8 * myo_t, lv_short + myo_t, lv_short + myo_t), lv_rot,
                         cut=base_cut, grow=fat), FAT, 0, fat_where),
        (heart.tube(asc, aorta_r, grow=fat), FAT, 0, fat_where),
        (heart.tube(pa, pa_r, grow=fat), FAT, 0, fat_where),
        (heart.tube(rvot, 14, pa_r, grow=fat), FAT, 0, fat_where),
        # 2) right heart, caval veins and pulmonary arteries: blood-like distractors
        (rv_outer, MYOCARDIUM, 0, None),
        (heart.ellipsoid(rv_c, rv_semi, lv_rot), BLOOD_RIGHT, RV_BLOOD, None),
        (heart.tube(rvot, 13, pa_r - 1), BLOOD_RIGHT, RV_BLOOD, None),
        (heart.tube(svc, 9), BLOOD_RIGHT, 0, None),
        (heart.tube(ivc, 11), BLOOD_RIGHT, 0, None),
        (heart.ellipsoid(ra_c, ra_semi), BLOOD_RIGHT, RA_BLOOD, None),
        (heart.tube(pa, pa_r), BLOOD_RIGHT, PULM_ARTERY, None),
        (heart.tube(lpa, pa_r * 0.8, pa_r * 0.6), BLOOD_RIGHT, PULM_ARTERY, None),
        (heart.tube(rpa, pa_r * 0.8, pa_r * 0.6), BLOOD_RIGHT, PULM_ARTERY, None),
        # 3) left atrium with the four pulmonary-vein ostia
        (heart.ellipsoid(la_c, la_semi), BLOOD_LEFT, LA_BLOOD, None),
    ]
    for d in pv_dirs:
        start = la_c + 0.7 * la_semi * d / np.abs(d).max()
        plan.append((heart.tube([start, start + 16 * _unit(d)], 6.0), BLOOD_LEFT, LA_BLOOD, None))
    plan += [
        # 4) aorta: unlabelled arch and descending part, then the labelled ascending aorta
        (heart.tube(arch, aorta_r * 0.95, aorta_r * 0.85), BLOOD_LEFT, 0, None),
        (_Tube(descending, heart.scale * aorta_r * 0.85, heart.scale * aorta_r * 0.8), BLOOD_LEFT, 0, None),
        (heart.tube(asc, aorta_r), BLOOD_LEFT, ASC_AORTA, None),
        # 5) LV myocardium shell and cavity, both open at the base plane
        (lv_outer, MYOCARDIUM, LV_MYO, None),
        (lv_cavity, BLOOD_LEFT, LV_BLOOD, None),
    ]
    lowest = min(float(lv_outer.bounds()[0][2]), float(rv_outer.bounds()[0][2]))
    return plan, np.array([heart.center[0], heart.center[1], lowest])


def _keep_largest_components(label: np.ndarray) -> None:
    """Unlabel the slivers that overlapping shapes leave behind: one connected piece per structure.

    The slivers keep their tissue (they still look like blood), as an annotator would leave them.
    """
    from scipy import ndimage
    box = ndimage.find_objects((label > 0).astype(np.uint8))
    if not box or box[0] is None:
        return
    sub = label[box[0]]
    for value in np.unique(sub):
        if value == 0:
            continue
        pieces, count = ndimage.label(sub == value)
        if count > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            sub[(pieces > 0) & (pieces != np.argmax(sizes))] = 0


# --------------------------------------------------------------------------- appearance

def _tissue_values(modality: str, rng: np.random.Generator) -> np.ndarray:
    """Mean intensity of each tissue for one subject: MR arbitrary units, CT Hounsfield units."""
    u = rng.uniform
    v = np.zeros(len(TISSUES), dtype=np.float32)
    if modality == "mr":
        blood = u(650, 820)
        table = {AIR: 0, FAT: u(880, 1000), MUSCLE: u(190, 260), LUNG: u(15, 40), LUNG_VESSEL: u(120, 220),
                 LIVER: u(300, 380), ABDOMEN: u(380, 520), BONE: u(25, 60), MARROW: u(420, 540),
                 CSF: u(700, 850), DISC: u(300, 400), MYOCARDIUM: u(150, 210),
                 BLOOD_LEFT: blood, BLOOD_RIGHT: blood * u(0.92, 1.04)}
    else:
        left = u(250, 400)
        table = {AIR: -1000, FAT: u(-115, -85), MUSCLE: u(40, 65), LUNG: u(-870, -830),
                 LUNG_VESSEL: u(-50, 120), LIVER: u(60, 120), ABDOMEN: u(25, 55), BONE: u(850, 1250),
                 MARROW: u(180, 320), CSF: u(0, 15), DISC: u(70, 100), MYOCARDIUM: u(60, 110),
                 BLOOD_LEFT: left, BLOOD_RIGHT: u(150, min(300.0, left - 30))}
    for k, val in table.items():
        v[k] = val
    return v


def _smooth(array: np.ndarray, spacing: Sequence[float], sigma_mm: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing of a ``(z, y, x)`` array with per-axis sigma in mm given as (x, y, z)."""
    from scipy import ndimage
    sigma_voxels = [float(s) / float(d) for s, d in zip(sigma_mm, spacing)][::-1]
    return ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma_voxels, truncate=3.0)


def _smooth_noise(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length ``sigma_mm``."""
    field = _smooth(rng.standard_normal(shape, dtype=np.float32), spacing, [sigma_mm] * 3)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _bias_field(rng: np.random.Generator, canvas: _Canvas, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(random quadratic polynomial), within 1 -/+ ``strength``."""
    nz, ny, nx = canvas.label.shape
    grids = [np.linspace(-1, 1, n, dtype=np.float32) for n in (nx, ny, nz)]
    x, y, z = grids[0][None, None, :], grids[1][None, :, None], grids[2][:, None, None]
    terms = [x, y, z, x * x, y * y, z * z, x * y, y * z, x * z]
    coef = rng.normal(size=len(terms))
    log_field = sum(np.float32(c) * t for c, t in zip(coef, terms))
    log_field = log_field - log_field.mean()
    log_field *= np.float32(math.log(1 + strength) / max(float(np.abs(log_field).max()), 1e-6))
    return np.exp(log_field)


def _render(modality: str, canvas: _Canvas, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue map -> (float32 image, tissue map with lung vessels), both ``(z, y, x)``.

    Adds the modality's texture, partial-volume blur, bias field and noise.
    """
    values = _tissue_values(modality, rng)
    tissue, spacing = canvas.tissue, canvas.spacing
    # lung vessels: the top few percent of a fine random field inside the lungs
    vessels = _smooth_noise(rng, tissue.shape, spacing, 2.0)
    tissue = np.where((tissue == LUNG) & (vessels > 1.6), np.uint8(LUNG_VESSEL), tissue)
    image = values[tissue]
    # low-frequency texture: parenchymal inhomogeneity, and contrast mixing in the CT right heart
    texture = _smooth_noise(rng, tissue.shape, spacing, 8.0)
    amplitude = np.zeros(len(TISSUES), dtype=np.float32)
    if modality == "mr":
        amplitude[[LIVER, ABDOMEN, MUSCLE, FAT, MARROW]] = (12, 40, 12, 25, 30)
    else:
        amplitude[[LIVER, ABDOMEN, MARROW, BLOOD_RIGHT, BLOOD_LEFT]] = (8, 15, 40, rng.uniform(20, 45), 8)
    image += amplitude[tissue] * texture
    voxel_sigma = 0.75 if modality == "mr" else 0.55  # partial volume, in voxels
    image = _smooth(image, spacing, voxel_sigma * spacing)
    if modality == "mr":
        image *= _bias_field(rng, canvas, rng.uniform(0.15, 0.30))
        sigma = np.float32(rng.uniform(0.015, 0.035) * values[BLOOD_LEFT])
        real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag) * np.float32(rng.uniform(0.7, 1.4))
    else:
        image += np.float32(rng.uniform(10, 25)) * rng.standard_normal(image.shape, dtype=np.float32)
        np.maximum(image, -1024, out=image)
    return np.round(image).astype(np.float32), tissue  # scanners store integers; compresses better


# --------------------------------------------------------------------------- subjects

@dataclass
class Subject:
    """One phantom: ``image`` float32, ``label`` uint16 (MM-WHS values), ``tissue`` uint8 (:data:`TISSUES`)."""
    image: sitk.Image
    label: sitk.Image
    tissue: sitk.Image


def _check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in MODALITIES:
        raise VaeudaError(f"Modality '{modality}' is not one of {', '.join(MODALITIES)}.")
    return m


def _is_whole(value) -> bool:
    """True for an int (or integral numpy/float value), not for bool or text."""
    return isinstance(value, (int, np.integer, float)) and not isinstance(value, bool) and float(value).is_integer()


def _check_size(size: Optional[int]) -> Optional[int]:
    if size is None:
        return None
    if not _is_whole(size) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise VaeudaError(f"--size {size} must be a whole number of voxels from {MIN_SIZE} to {MAX_SIZE}.")
    return int(size)


def _grid(modality: str, size: Optional[int], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int, int]]:
    """Field-of-view centre (phantom mm), spacing (x, y, z) and voxel counts of one acquisition."""
    default = DEFAULT_GRID[modality]
    n = default if size is None else (size, size, size)
    in_plane, slices = _SPACING_RANGE[modality]
    s_xy, s_z = rng.uniform(*in_plane), rng.uniform(*slices)
    spacing = np.array([s_xy, s_xy, s_z]) * np.array(default) / np.array(n)
    if modality == "mr":  # cropped around the heart
        center = np.array([28.0, -25.0, 5.0]) + rng.uniform(-10, 10, size=3)
    else:                 # wider, nearer the thorax centre
        center = np.array([12.0, -5.0, 5.0]) + rng.uniform(-10, 10, size=3)
    return center, spacing, n


def simulate_subject(modality: str, subject_seed: int, size: Optional[int] = None) -> Subject:
    """Draw one phantom subject imaged in ``modality`` ("mr" or "ct").

    The anatomy depends on ``subject_seed`` only (the same seed in both modalities is the same
    body); grid, field of view and appearance also on the modality. ``size`` replaces the default
    voxel count per axis (MR 96^3, CT 160x160x96) keeping the field of view, for tiny cohorts.
    """
    modality = _check_modality(modality)
    size = _check_size(size)
    if not _is_whole(subject_seed) or subject_seed < 0:
        raise VaeudaError(f"Subject seed {subject_seed!r} must be a non-negative whole number.")
    anatomy_rng = np.random.default_rng([int(subject_seed), 0])
    imaging_rng = np.random.default_rng([int(subject_seed), _MODALITY_CODE[modality]])
    center, spacing, n = _grid(modality, size, imaging_rng)
    canvas = _Canvas(center - spacing * (np.array(n) - 1) / 2, spacing, n)
    _draw_anatomy(canvas, anatomy_rng)
    pixels, tissue = _render(modality, canvas, imaging_rng)
    origin = tuple(float(v) for v in canvas.origin + np.array(SCANNER_OFFSET_MM[modality]))

    def to_image(array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(origin)
        img.SetSpacing(tuple(float(s) for s in spacing))
        return img

    return Subject(to_image(pixels), to_image(canvas.label), to_image(tissue))


def body_frame(image: sitk.Image, modality: str) -> sitk.Image:
    """A copy of a phantom image of ``modality`` moved from its scanner's coordinates into the
    body's own, where the MR and the CT rendering of one ``subject_seed`` overlay (same voxels,
    origin shifted by :data:`SCANNER_OFFSET_MM`). Real MR and CT scans have no such common frame."""
    moved = sitk.Image(image)
    moved.SetOrigin(tuple(float(o - d) for o, d in zip(image.GetOrigin(), SCANNER_OFFSET_MM[_check_modality(modality)])))
    return moved


def make_subject(modality: str, subject_seed: int, size: Optional[int] = None) -> Tuple[sitk.Image, sitk.Image]:
    """One phantom subject: (image float32, label uint16 with MM-WHS values) on the same grid."""
    subject = simulate_subject(modality, subject_seed, size)
    return subject.image, subject.label


def cohort_subject_seed(seed: int, modality: str, index: int) -> int:
    """The subject seed :func:`make_cohort` uses for the ``index``-th (0-based) subject of a modality."""
    state = np.random.SeedSequence([int(seed), _MODALITY_CODE[_check_modality(modality)], int(index)])
    return int(state.generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------- cohort

def _write_nifti(image: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError:  # SimpleITK reports I/O failures (disk full, ...) as RuntimeError
            raise VaeudaError(f"{path}: could not write the NIfTI file.") from None


def phantom_splits(folder: PathLike) -> Optional[dict]:
    """The ``splits.json`` in ``folder`` if a phantom cohort (of any generator version) wrote it;
    None for none, or anything else there (unreadable, not JSON, another kind of cohort)."""
    path = Path(folder) / "splits.json"
    if not path.is_file():      # (a pipe of that name would hang the read: not ours either)
        return None
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(splits, dict) or not str(splits.get("generator", "")).startswith("vaeuda.phantom"):
        return None
    return splits


def _previous_cohort_files(out: Path) -> set:
    """File names of the scans a phantom cohort's ``splits.json`` in ``out`` lists, and that
    ``splits.json`` itself (empty if none is ours)."""
    splits = phantom_splits(out)
    if splits is None:
        return set()
    names = {"splits.json"}
    for modality in MODALITIES:
        lists = splits.get(modality)
        for prefixes in (lists.values() if isinstance(lists, dict) else ()):
            for prefix in (prefixes if isinstance(prefixes, list) else ()):
                # only names this generator writes: a hand-edited list cannot reach other files
                if isinstance(prefix, str) and re.fullmatch(rf"{modality}_\d+", prefix):
                    names.update(f"{prefix}_{kind}.nii.gz" for kind in ("image", "label"))
    return names


# The default cohort (the demo's and `vaeuda synth`'s): 16 training and 4 test subjects per modality.
N_SOURCE, N_TARGET, N_TRAIN = 20, 20, 16


def split_prefixes(modality: str, n_subjects: int, n_train: int) -> Dict[str, List[str]]:
    """``{"train": [...], "test": [...]}``, the scan prefixes a cohort of ``n_subjects`` of one
    modality lists in its ``splits.json``: ``mr_1001``, ``mr_1002``, ..., the first ``n_train`` training."""
    prefixes = [f"{modality}_{FIRST_ID + index}" for index in range(n_subjects)]
    return {"train": prefixes[:n_train], "test": prefixes[n_train:]}


def make_cohort(out_dir: PathLike, n_source: int = N_SOURCE, n_target: int = N_TARGET, n_train: int = N_TRAIN,
                seed: int = 0, size: Optional[int] = None, reporter: Optional[Reporter] = None) -> dict:
    """Write an unpaired MR (source) / CT (target) cohort into ``out_dir`` and return its splits.

    Files: ``mr_<id>_image.nii.gz``, ``mr_<id>_label.nii.gz``, ``ct_...`` with ids 1001, 1002, ...
    per modality, and ``splits.json``: the first ``n_train`` subjects of each modality train, the
    rest test. Everything is written in a temporary folder first, so a failed run leaves nothing.
    Only files an earlier phantom cohort in ``out_dir`` wrote (its ``splits.json`` lists them) are
    replaced: a file of one of the new names that it did not write (a user's own scan) is refused
    before any work. On success the scans that earlier cohort listed and this one does not have
    are removed (so a smaller cohort over a larger one leaves no unlisted scans behind); other
    files there are kept.
    """
    reporter = reporter or null_reporter()
    out = Path(out_dir)
    for name, value in (("n_source", n_source), ("n_target", n_target), ("n_train", n_train), ("seed", seed)):
        if not _is_whole(value) or value < 0:
            raise VaeudaError(f"{out}: --{name.replace('_', '-')} must be a non-negative whole number, not {value!r}.")
    if n_source < 1 or n_target < 1:
        raise VaeudaError(f"{out}: a cohort needs at least one MR and one CT subject.")
    if max(n_source, n_target) > MAX_SUBJECTS:
        raise VaeudaError(f"{out}: --n-source and --n-target take at most {MAX_SUBJECTS} subjects (ids {FIRST_ID}-9999), "
                          f"not {max(n_source, n_target)}.")
    if n_train > min(n_source, n_target):
        raise VaeudaError(f"{out}: --n-train {n_train} is larger than the number of MR ({n_source}) or CT ({n_target}) "
                          f"subjects.")
    n_source, n_target, n_train, seed = int(n_source), int(n_target), int(n_train), int(seed)
    counts = {"mr": n_source, "ct": n_target}
    size = _check_size(size)
    if out.exists() and not out.is_dir():
        raise VaeudaError(f"{out}: the cohort folder path is an existing file.")
    check_output_dir(out, "OUT_DIR")    # a name that is not UTF-8, a dangling link, a place that cannot be written

    previous = _previous_cohort_files(out)
    planned = ["splits.json"] + [f"{prefix}_{kind}.nii.gz" for modality in MODALITIES
                                 for prefixes in split_prefixes(modality, counts[modality], n_train).values()
                                 for prefix in prefixes for kind in ("image", "label")]
    foreign = [name for name in planned if name not in previous and os.path.lexists(out / name)]
    if foreign:    # e.g. real scans named as the phantom's: never replaced unasked
        what = ("a name", "it") if len(foreign) == 1 else ("names", "them")
        raise VaeudaError(f"{out}: holds {listed(foreign)}, {what[0]} this cohort writes, which no earlier phantom "
                          f"cohort there wrote; choose an empty folder, or move {what[1]} away.")
    replaced = [name for name in planned if name in previous and os.path.lexists(out / name)]
    splits: Dict[str, object] = {"labels": "mmwhs", "seed": seed, "generator": GENERATOR, "size": size}
    total = n_source + n_target
    reporter.stage("synth", total)
    done = 0
    try:
        with atomic_dir(out) as tmp:
            for modality in MODALITIES:
                split = split_prefixes(modality, counts[modality], n_train)
                for index, prefix in enumerate(split["train"] + split["test"]):
                    image, label = make_subject(modality, cohort_subject_seed(seed, modality, index), size)
                    _write_nifti(image, tmp / f"{prefix}_image.nii.gz")
                    _write_nifti(label, tmp / f"{prefix}_label.nii.gz")
                    done += 1
                    reporter.step(done)
                    if index == 0:     # the first of a modality sizes the rest (CT compresses less than MR)
                        _require_room(out, tmp, prefix, total - done)
                splits[modality] = split
            with atomic_path(tmp / "splits.json") as tmp_json:
                tmp_json.write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
            written = {item.name for item in tmp.iterdir()}
    except BrokenPipeError:    # the progress reader went away: not a write of the cohort that failed
        raise
    except OSError as exc:
        raise VaeudaError(f"{out}: could not write the cohort ({exc.strerror or exc}).") from None
    finally:
        reporter.close()
    # The new cohort is in place: what stops an earlier scan's removal is said, and fails nothing.
    removed, left = [], []
    for name in sorted(previous - written):
        if not (out / name).is_file():
            continue           # gone already, or a folder of that name: not a scan the earlier cohort wrote
        try:
            (out / name).unlink()
            removed.append(name)
        except OSError as exc:
            left.append(f"{out / name} ({exc.strerror or exc})")
    reporter.log(f"Wrote {n_source} MR and {n_target} CT phantom subjects to {out}.")
    if replaced:  # models trained on the earlier scans name these paths and would now read the new ones
        reporter.log(f"Replaced {len(replaced)} file(s) of the cohort that was there before: {listed(replaced)}.")
    if removed:   # said, since a user's own files of those names would be gone too
        reporter.log(f"Removed {len(removed)} file(s) of the cohort that was there before and has scans this one "
                     f"lacks: {listed(removed)}.")
    if left:      # not listed in the new splits.json, so nothing reads them as the cohort's
        reporter.log(f"Could not remove {len(left)} file(s) of the cohort that was there before, which the new "
                     f"cohort does not list: {listed(left)}.")
    return splits


def _require_room(out: Path, tmp: Path, prefix: str, subjects_left: int) -> None:
    """Refuse, after a modality's first subject, a cohort whose remaining subjects, each as large
    as that one, would not fit in the free space: a run of hours that would end in a full disk."""
    if subjects_left == 0:
        return
    written = sum((tmp / f"{prefix}_{kind}.nii.gz").stat().st_size for kind in ("image", "label"))
    needed, free = written * subjects_left, shutil.disk_usage(tmp).free
    if needed > free:
        raise VaeudaError(f"{out}: the cohort needs about {_bytes_text(needed)} more ({subjects_left} more subjects "
                          f"of about {_bytes_text(written)} each), and {_bytes_text(free)} are free; make fewer or "
                          f"smaller subjects (--n-source, --n-target, --size), or free space.")


def _bytes_text(size: int) -> str:
    """A size as a sentence says it: "12.3 MiB", "4.56 GiB", "3,230 GiB"."""
    if size < 2 ** 30:
        return f"{size / 2 ** 20:.1f} MiB"
    return f"{size / 2 ** 30:,.0f} GiB" if size >= 1000 * 2 ** 30 else f"{size / 2 ** 30:.3g} GiB"


# --------------------------------------------------------------------------- preview

def _coronal_index(label: np.ndarray) -> int:
    """The coronal index (y) showing the most target structures, each as large as possible.

    ``label`` is ``(z, y, x)``; ranks slices by the number of structures present, then by the
    area of the smallest one present.
    """
    areas = np.stack([(label == s.mmwhs_value).sum(axis=(0, 2)) for s in STRUCTURES])  # (4, y)
    present = (areas > 0).sum(axis=0)
    smallest = np.where(areas > 0, areas, np.iinfo(np.int64).max).min(axis=0)
    smallest[present == 0] = 0
    return int(np.lexsort((smallest, present))[-1])


def save_preview(cohort_dir: PathLike, png_path: PathLike, n: int = 3) -> None:
    """PNG of coronal slices of the first ``n`` subjects of each modality, with label outlines.

    One row per modality; each panel is the coronal slice showing the most target structures,
    superior up and the patient's right on the left, in millimetres, with the four structures
    outlined in their :data:`labels.STRUCTURES` colours and the distractors dashed in white.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cohort = Path(cohort_dir)
    rows = []
    for modality in MODALITIES:
        images = sorted(cohort.glob(f"{modality}_*_image.nii.gz"))[:max(int(n), 1)]
        if not images:
            raise VaeudaError(f"{cohort}: no {modality}_<id>_image.nii.gz files to preview.")
        rows.append((modality, images))
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 3.6 * len(rows)), squeeze=False,
                             facecolor="black")
    for r, (modality, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_facecolor("black")
            ax.axis("off")
            if c >= len(images):
                continue
            label_path = images[c].with_name(images[c].name.replace("_image.nii.gz", "_label.nii.gz"))
            try:
                img = sitk.ReadImage(str(images[c]))
                lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
            except RuntimeError:
                raise VaeudaError(f"{images[c]}: could not read the image or its label file.") from None
            arr = sitk.GetArrayFromImage(img)
            j = _coronal_index(lab)
            sl, ls = arr[::-1, j, :], lab[::-1, j, :]        # superior up
            sx, sy, sz = img.GetSpacing()
            ox, oy, oz = img.GetOrigin()
            extent = (ox - sx / 2, ox + sx * (arr.shape[2] - 0.5), oz - sz / 2, oz + sz * (arr.shape[0] - 0.5))
            lo, hi = np.percentile(arr, [0.5, 99.5]) if modality == "mr" else (-300.0, 600.0)
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="bilinear")
            xs = np.linspace(extent[0] + sx / 2, extent[1] - sx / 2, sl.shape[1])
            zs = np.linspace(extent[3] - sz / 2, extent[2] + sz / 2, sl.shape[0])
            for s in STRUCTURES:
                if (ls == s.mmwhs_value).any():
                    ax.contour(xs, zs, (ls == s.mmwhs_value).astype(float), [0.5], colors=[s.color], linewidths=1.2)
            distractors = np.isin(ls, [RV_BLOOD, RA_BLOOD, PULM_ARTERY]).astype(float)
            if distractors.any():
                ax.contour(xs, zs, distractors, [0.5], colors=["white"], linewidths=0.7, linestyles="dashed")
            ax.set_title(f"{images[c].name.split('_image')[0]}  y={oy + sy * j:.0f} mm", color="white", fontsize=9)
    handles = [Line2D([], [], color=s.color, label=s.name) for s in STRUCTURES]
    handles.append(Line2D([], [], color="white", linestyle="dashed", label="RV / RA / PA (background)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    png = Path(png_path)
    try:
        with atomic_path(png) as tmp:
            fig.savefig(str(tmp), format="png", dpi=110, facecolor="black")
    except OSError as exc:
        raise VaeudaError(f"{png}: could not write the preview ({exc.strerror or exc}).") from None
    finally:
        plt.close(fig)
