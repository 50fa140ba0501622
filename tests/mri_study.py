"""A small four-sequence brain MRI study made from real MRI: the MNI ICBM152 2009 T1 template and its grey- and
white-matter maps, which ship inside the nilearn wheel (read from the installed package; nilearn itself is not
imported).

Channels: t1 (the template), t1ce (t1 with an enhancing lesion), t2 (CSF bright, grey over white matter: made from the
tissue maps) and flair (t2 with the CSF dark, the lesion bright). Subjects differ by a small random affine deformation
(rotation up to 4 degrees, scale 0.95-1.05, shift up to 4 mm), an intensity scale per sequence (0.7-1.4, as scanners
differ) and noise. Half have a lesion (a sphere of 9-15 mm in the white matter): label 1 and its Mask; the others
have an empty Mask. Written as float32 NIfTI at 3.5 mm (about 56 x 67 x 54 voxels), deterministic from the seed.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd
import SimpleITK as sitk

CHANNELS = ("t1", "t1ce", "t2", "flair")
SPACING = 3.5


def template_dir() -> str:
    spec = importlib.util.find_spec("nilearn")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def template_file(kind: str) -> str:
    """kind 't1', 'gm' or 'wm': the path of that MNI ICBM152 2009 map inside the installed nilearn package."""
    return os.path.join(template_dir(), f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")


def _coarse(img: sitk.Image, spacing: float) -> sitk.Image:
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         [spacing] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


def _deform(img: sitk.Image, transform: sitk.Transform, nearest: bool = False) -> sitk.Image:
    return sitk.Resample(img, img, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)


def _write(arr: np.ndarray, like: sitk.Image, path: str) -> None:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    sitk.WriteImage(img, path)


def make_study(folder, subjects: int = 12, seed: int = 0, spacing: float = SPACING) -> dict:
    """Write the study under `folder`: images/sNN_<channel>.nii.gz, masks/sNN_lesion.nii.gz, study.csv (columns
    t1, t1ce, t2, flair, Label, Mask) and the first `subjects // 2` rows as train.csv, the rest as val.csv. Returns
    {'csv', 'train', 'val', 'folder'}."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    t1, gm, wm = (_coarse(sitk.ReadImage(template_file(k)), spacing) for k in ("t1", "gm", "wm"))
    a_t1, a_gm, a_wm = (sitk.GetArrayFromImage(x) for x in (t1, gm / 255.0, wm / 255.0))
    brain = a_t1 > 5
    csf = np.clip(brain - a_gm - a_wm, 0, 1) * brain
    rng = np.random.default_rng(seed)
    rows = []
    centre = np.array(t1.TransformContinuousIndexToPhysicalPoint([n / 2 for n in t1.GetSize()]))
    for s in range(subjects):
        lesion = np.zeros(a_t1.shape, np.float32)
        label = s % 2
        if label:
            idx = np.argwhere(a_wm > 0.8)
            c = idx[rng.integers(len(idx))]
            r = rng.uniform(9, 15) / 2 / spacing
            zz, yy, xx = np.ogrid[:a_t1.shape[0], :a_t1.shape[1], :a_t1.shape[2]]
            lesion = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r).astype(np.float32)
        seq = {"t1": a_t1 * (1 - 0.3 * lesion),
               "t1ce": a_t1 * (1 - 0.3 * lesion) + 180 * lesion,
               "t2": 200 * csf + 90 * a_gm + 55 * a_wm + 150 * lesion,
               "flair": 25 * csf + 110 * a_gm + 80 * a_wm + 170 * lesion}
        tf = sitk.AffineTransform(3)
        tf.SetCenter(centre.tolist())
        angle = np.deg2rad(rng.uniform(-4, 4, 3))
        rot = sitk.Euler3DTransform(centre.tolist(), *angle.tolist())
        tf.SetMatrix((np.array(rot.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(0.95, 1.05, 3))).ravel().tolist())
        tf.SetTranslation(rng.uniform(-4, 4, 3).tolist())
        row = {}
        for name in CHANNELS:
            img = sitk.GetImageFromArray(seq[name].astype(np.float32))
            img.CopyInformation(t1)
            arr = sitk.GetArrayFromImage(_deform(img, tf)) * rng.uniform(0.7, 1.4)
            arr = np.where(arr > 0, arr + rng.normal(0, 2.0, arr.shape), 0).astype(np.float32)
            path = os.path.join("images", f"s{s:02d}_{name}.nii.gz")
            _write(arr, t1, os.path.join(folder, path))
            row[name] = path
        mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
        mask.CopyInformation(t1)
        mask_path = os.path.join("masks", f"s{s:02d}_lesion.nii.gz")
        sitk.WriteImage(_deform(mask, tf, nearest=True), os.path.join(folder, mask_path))
        rows.append({**row, "Label": label, "Mask": mask_path})
    df = pd.DataFrame(rows)
    out = {"folder": folder}
    for name, part in (("csv", df), ("train", df.iloc[:subjects // 2]), ("val", df.iloc[subjects // 2:])):
        path = os.path.join(folder, {"csv": "study.csv"}.get(name, f"{name}.csv"))
        part.to_csv(path, index=False)
        out[name] = path
    return out


def write_4d(folder, row: dict, path: str) -> str:
    """The four channels of a study row (paths relative to `folder`) as one 4D NIfTI (volumes in CHANNELS order)."""
    imgs = [sitk.ReadImage(os.path.join(str(folder), row[c])) for c in CHANNELS]
    four = sitk.JoinSeries(imgs)
    sitk.WriteImage(four, path)
    return path
