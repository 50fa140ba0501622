"""Lesion-level inputs: a box of fixed physical size centred on a point (or on a label's centroid), resampled to
the model's input grid.

A point is given in world coordinates (mm) as ITK, SimpleITK, LUNA16 and FMCIB use them: LPS (x grows to the
patient's left, y to the back, z to the head); RAS points (3D Slicer, nibabel) have x and y negated. The box's
axes follow the canonical orientation of the preprocessing (e.g. LPS), so the same point on two copies of a scan
stored in different orientations, or at different resolutions, gives the same picture. Parts of the box outside
the scan are filled with `fill` (air: the window's low end), never zeros.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from util.errors import UserError
from util.volume.resample import REAL_PIXELS, SEPARABLE_KINDS, geometry_of, resample_separable, resample_sitk

COORD_SYSTEMS = ("LPS", "RAS")
_LETTER_AXIS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
_MARGIN = 4  # input voxels kept around the box, so interpolation near its faces sees real neighbours
_ALIGNED = 1e-9  # a box axis and a scan axis whose direction cosines differ this little are one axis
_EDGE = 1e-6  # box voxels this close (in scan voxels) to the scan's outer face: SimpleITK's rounding decides


def to_lps(point, system: str = "LPS") -> np.ndarray:
    """A world point (x, y, z) in mm as LPS; `system` 'RAS' negates x and y."""
    p = np.asarray(point, dtype=np.float64).reshape(3)
    if system not in COORD_SYSTEMS:
        raise UserError(f"--roi_coords must be one of {COORD_SYSTEMS}, got {system!r}.")
    return p * np.array([-1.0, -1.0, 1.0]) if system == "RAS" else p


def orientation_direction(orientation: str) -> np.ndarray:
    """3x3 direction matrix (columns: the world direction of image axes x, y, z) of a DICOM orientation code."""
    d = np.zeros((3, 3))
    for col, letter in enumerate(orientation.upper()):
        row, sign = _LETTER_AXIS[letter]
        d[row, col] = sign
    return d


def inside(img: sitk.Image, point_lps) -> bool:
    """True when the point lies within the scan's voxels (their outer faces included)."""
    idx = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))
    n = np.array(img.GetSize())
    return bool(np.all(idx >= -0.5) and np.all(idx <= n - 0.5))


def roi_grid(center_lps, roi_mm, size, orientation: str = "LPS") -> sitk.Image:
    """An empty image whose voxel grid is the box: `size` (D, H, W) voxels spanning `roi_mm` (D, H, W) mm, centred
    on the point, axes along `orientation`."""
    n = np.array(size[::-1], dtype=np.int64)  # sitk order (x, y, z) = (W, H, D)
    spacing = np.array(roi_mm[::-1], dtype=np.float64) / n
    direction = orientation_direction(orientation)
    origin = np.asarray(center_lps, dtype=np.float64) - direction @ (spacing * (n - 1) / 2.0)
    ref = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection([float(v) for v in direction.reshape(-1)])
    ref.SetOrigin([float(v) for v in origin])
    return ref


def _covering_region(img: sitk.Image, ref: sitk.Image) -> tuple[list[int], list[int]] | None:
    """Index start and size of the part of `img` that the box `ref` touches (plus a margin); None if none."""
    n = np.array(ref.GetSize())
    corners = [ref.TransformContinuousIndexToPhysicalPoint([(c >> k & 1) * n[k] - 0.5 for k in range(3)])
               for c in range(8)]
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    lo = np.maximum(np.floor(idx.min(0)).astype(np.int64) - _MARGIN, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(np.int64) + _MARGIN + 1, np.array(img.GetSize()))
    if np.any(hi <= lo):
        return None
    return [int(v) for v in lo], [int(v) for v in hi - lo]


def extract_roi(img: sitk.Image, center_lps, roi_mm, size, orientation: str = "LPS", interpolator: str = "bspline",
                fill: float = -1200.0, name: str = "<image>", backend: str = "auto") -> np.ndarray:
    """The box around `center_lps` as float32 [D, H, W] in the image's units (HU), outside parts at `fill`.

    Only the part of the scan under the box (plus a small margin) is interpolated, as SimpleITK would interpolate
    that part alone. When the scan's axes are the box's up to order and sign (every axis-aligned scan), the
    separable resampler of util.volume.resample does it (`_box_separable`, milliseconds a box); otherwise (an oblique
    scan, interpolator nearest/lanczos/label_gaussian, a box voxel on the scan's outer face) SimpleITK, which is
    also backend="sitk" (the reference). A centre outside the scan is a UserError naming the file and the point."""
    center = np.asarray(center_lps, dtype=np.float64)
    if not np.all(np.isfinite(center)):
        raise UserError(f"{name}: the ROI centre {tuple(center)} is not a finite point.")
    if not inside(img, center):
        lo, hi = _extent(img)
        raise UserError(f"{name}: the ROI centre (x, y, z) = {tuple(round(float(v), 2) for v in center)} mm (LPS) is "
                        f"outside the scan, which spans x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, "
                        f"z {lo[2]:.1f}..{hi[2]:.1f} mm.")
    ref = roi_grid(center, roi_mm, size, orientation)
    start, extent = _covering_region(img, ref)
    if backend not in ("auto", "sitk"):
        raise ValueError(f"extract_roi: backend must be 'auto' or 'sitk', got {backend!r}.")
    out = _box_separable(img, ref, start, extent, interpolator, fill) if backend == "auto" else None
    if out is not None:
        return out
    part = sitk.RegionOfInterest(img, extent, start)
    if part.GetPixelID() != sitk.sitkFloat32:
        part = sitk.Cast(part, sitk.sitkFloat32)
    out = resample_sitk(part, ref.GetSize(), geometry_of(ref), interpolator, float(fill), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _box_separable(img: sitk.Image, ref: sitk.Image, start: list[int], extent: list[int], interpolator: str,
                   fill: float) -> np.ndarray | None:
    """The box `ref` from the region (start, extent) of `img` through `resample_separable`: float32 [D, H, W], or None
    where it does not apply (interpolator, pixel type, box axes not along the scan's, a box voxel on the scan's face).

    Box axis j runs along scan axis perm[j]; the region (a view of the scan) is transposed and, where that axis runs
    the other way, flipped, so box voxel i sits at index g + i * step of it, step > 0: one 1-D operator per axis,
    the region's edges bounding the B-spline prefilter exactly as SimpleITK's resampling of the region alone. g is
    rounded to 2^-20 voxel, so copies of a scan stored in other orientations (whose origins differ in the last
    bits) give the same operators and the same bytes. Outside the scan (not the region) is `fill`.
    """
    if interpolator not in SEPARABLE_KINDS or img.GetPixelID() not in REAL_PIXELS or img.GetDimension() != 3:
        return None
    cosines = np.array(ref.GetDirection()).reshape(3, 3).T @ np.array(img.GetDirection()).reshape(3, 3)
    perm = np.abs(cosines).argmax(1)  # cosines[j, k]: box axis j against scan axis k
    if sorted(perm) != [0, 1, 2] or np.abs(np.abs(cosines) - np.eye(3)[perm]).max() > _ALIGNED:
        return None
    flip = [cosines[j, k] < 0 for j, k in enumerate(perm)]
    n0, s0, n1 = np.array(img.GetSize()), np.array(img.GetSpacing()), np.array(ref.GetSize())
    first = np.array(img.TransformPhysicalPointToContinuousIndex(ref.GetOrigin()))  # box voxel 0 in the scan
    x, lo = [], []  # per box axis: indices along the (flipped) scan axis, and where the region starts on it
    for j, k in enumerate(perm):
        g = np.round(((n0[k] - 1) - first[k] if flip[j] else first[k]) * 2.0 ** 20) / 2.0 ** 20
        x.append(g + np.arange(n1[j]) * (ref.GetSpacing()[j] / s0[k]))
        lo.append(n0[k] - start[k] - extent[k] if flip[j] else start[k])
        if np.any((np.abs(x[j] + 0.5) < _EDGE) | (np.abs(x[j] - n0[k] + 0.5) < _EDGE)):
            return None
    inside = [(xj >= -0.5) & (xj < n0[k] - 0.5) for xj, k in zip(x, perm)]
    region = sitk.GetArrayViewFromImage(img)[tuple(slice(start[k], start[k] + extent[k]) for k in (2, 1, 0))]
    region = region.transpose([2 - perm[2 - a] for a in range(3)])  # numpy axis a <- box axis 2 - a
    if any(flip):
        region = np.ascontiguousarray(region[tuple(slice(None, None, -1 if flip[2 - a] else 1) for a in range(3))])
    offsets = [x[j][0] - lo[j] for j in (2, 1, 0)]
    steps = [x[j][1] - x[j][0] if n1[j] > 1 else 1.0 for j in (2, 1, 0)]
    return resample_separable(region, (1.0, 1.0, 1.0), n1[::-1], steps, offsets, interpolator, fill, inside[::-1])


def extract_roi_labels(mask: sitk.Image, center_lps, roi_mm, size, orientation: str = "LPS") -> np.ndarray:
    """The same box of a label map (nearest neighbour, 0 outside) as uint8/int [D, H, W]."""
    ref = roi_grid(np.asarray(center_lps, dtype=np.float64), roi_mm, size, orientation)
    out = resample_sitk(mask, ref.GetSize(), geometry_of(ref), "nearest", 0.0)
    return sitk.GetArrayFromImage(out)


def label_centroid(mask: sitk.Image, label: int, name: str = "<mask>") -> np.ndarray:
    """World (LPS) centre of mass of the voxels equal to `label`; a UserError if the map has none."""
    arr = sitk.GetArrayViewFromImage(mask)
    zyx = np.nonzero(arr == label)
    if len(zyx[0]) == 0:
        present = np.unique(arr)
        raise UserError(f"{name}: has no voxel with label {label} (--roi_label); labels present: "
                        f"{present[:20].tolist()}{' ...' if len(present) > 20 else ''}.")
    mean_xyz = [float(np.mean(zyx[2])), float(np.mean(zyx[1])), float(np.mean(zyx[0]))]
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(mean_xyz))


def _extent(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    n = np.array(img.GetSize())
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([(c >> k & 1) * n[k] - 0.5 for k in range(3)])
                        for c in range(8)])
    return corners.min(0), corners.max(0)
