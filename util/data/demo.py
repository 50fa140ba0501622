"""Procedural chest-CT phantoms written as real NIfTI files, with CSVs, for demos and tests (no download).

Each phantom (int16 HU) has air (-1000), a body ellipse of fat (-100) and soft tissue (40), two lungs
(-850 +- 40), a heart (50), ribs, sternum and spine (bone ~700), lung vessels (50) and, for positives, a
pleural effusion (fluid at 15 HU filling the posterior base of one or both lungs, 20-45 mm deep) with its label
mask: a finding a small model sees at the demo's 64^3. Sizes vary (40-64 slices x
80-112 in-plane), spacings follow from a field of view that fits the body (320-400 mm); every third image is stored in RAS orientation (masks stay LPS), so
the loader's reorientation is exercised. Deterministic from `seed`; reused when the manifest matches.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import SimpleITK as sitk

from util.run_folder import DemoFolder
from util.atomic import atomic_write, write_text

DEMO_VERSION = 2
EFFUSION_DEPTH_MM = (20.0, 45.0)  # fluid depth at the lung base: 4-8 voxels at the demo's 64^3


def _grid(rng: np.random.Generator, body_width: float) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Random (nz, ny, nx) and spacing (sz, sy, sx) in mm; the field of view fits `body_width` with an 8-18%
    margin (within 320-400 mm), as a CT reconstruction field is chosen for the patient."""
    nz, nx = int(rng.integers(40, 65)), int(rng.integers(80, 113))
    ny = int(nx - rng.integers(0, 17))
    fov = float(np.clip(body_width * rng.uniform(1.08, 1.18), 320, 400))
    sxy = fov / nx
    sz = float(rng.uniform(220, 300)) / nz
    return (nz, ny, nx), (sz, sxy, sxy)


def _ellipsoid(z, y, x, c, r) -> np.ndarray:
    return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1


def _effusion(rng: np.random.Generator, lungs: np.ndarray, sp) -> np.ndarray:
    """Mask of a pleural effusion: fluid fills the dependent (posterior, +H) part of each affected lung to a
    depth of EFFUSION_DEPTH_MM; each side is affected with probability 0.8, at least one of them."""
    nz, ny, nx = lungs.shape
    sides = rng.random(2) < 0.8
    sides[int(rng.integers(2))] |= not sides.any()
    h = np.arange(ny)[None, :, None]
    deepest = np.where(lungs.any(1), ny - 1 - np.argmax(lungs[:, ::-1, :], axis=1), -1)[:, None, :]  # [D, 1, W]
    fluid = np.zeros(lungs.shape, bool)
    for affected, cols in zip(sides, (slice(0, nx // 2), slice(nx // 2, nx))):   # right lung, then left (LPS)
        if affected:
            depth = float(rng.uniform(*EFFUSION_DEPTH_MM)) / sp[1]
            fluid[:, :, cols] = (lungs & (h > deepest - depth))[:, :, cols]
    return fluid


def make_phantom(rng: np.random.Generator, effusion: bool, effusion_rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One chest phantom: HU int16 [D, H, W], effusion mask uint8 [D, H, W], spacing (sz, sy, sx) in mm.

    Array axes follow LPS: W runs to the patient's left, H to posterior, D to superior. The anatomy and the
    noise come from `rng`, the effusion from `effusion_rng` (default `rng`): the same `rng` seed with and
    without an effusion gives the same chest, voxel for voxel, outside the fluid.
    """
    effusion_rng = rng if effusion_rng is None else effusion_rng
    a, b = float(rng.uniform(140, 170)), float(rng.uniform(95, 120))   # body half-width (x) and half-depth (y)
    (nz, ny, nx), sp = _grid(rng, 2 * a)
    z = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sp[0])[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sp[1])[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sp[2])[None, None, :]
    zh = nz * sp[0] / 2
    r2 = (x / a) ** 2 + (y / b) ** 2                                      # [1, H, W] body ellipse
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    hu[np.broadcast_to(r2 <= 1, hu.shape)] = -100.0                      # subcutaneous fat
    inner = (x / (a - 15)) ** 2 + (y / (b - 15)) ** 2 <= 1
    hu[np.broadcast_to(inner, hu.shape)] = 40.0                          # soft tissue
    lungs = np.zeros(hu.shape, bool)
    for side in (-1, 1):
        lungs |= _ellipsoid(z, y, x, (0.1 * zh, -0.05 * b, side * 0.45 * a), (0.8 * zh, 0.62 * b, 0.33 * a))
    hu[lungs] = -850.0 + rng.normal(0, 40, int(lungs.sum())).astype(np.float32)
    heart = _ellipsoid(z, y, x, (-0.2 * zh, -0.25 * b, 0.12 * a), (0.35 * zh, 0.35 * b, 0.25 * a))
    hu[heart] = 50.0
    for _ in range(int(rng.integers(8, 14))):                            # vessels: tubes drifting along z
        side = rng.choice([-1, 1])
        cx = side * 0.45 * a + rng.uniform(-0.2, 0.2) * a + rng.uniform(-0.3, 0.3) * z
        cy = -0.05 * b + rng.uniform(-0.4, 0.4) * b + rng.uniform(-0.3, 0.3) * z
        tube = ((x - cx) ** 2 + (y - cy) ** 2 <= rng.uniform(2, 4) ** 2) & lungs
        hu[tube] = 50.0
    ring = (r2 <= 0.93) & (r2 >= 0.8) & (y < 0.7 * b)                    # ribs: ring, periodic along z
    ribs = ring & (np.mod(z + rng.uniform(0, 25), 25) < 9)
    spine = (x ** 2 + (y - 0.72 * b) ** 2 <= 16 ** 2) & (x ** 2 + (y - 0.72 * b) ** 2 > 6 ** 2)
    sternum = (np.abs(x) < 12) & (np.abs(y + 0.88 * b) < 5)
    hu[np.broadcast_to(ribs | spine | sternum, hu.shape)] = 700.0
    mask = np.zeros(hu.shape, np.uint8)
    if effusion:
        fluid = _effusion(effusion_rng, lungs & ~heart, sp)
        hu[fluid], mask[fluid] = 15.0, 1
    hu += rng.normal(0, 12, hu.shape).astype(np.float32) * (hu > -990)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), mask, sp


def _to_image(arr: np.ndarray, spacing: tuple[float, ...], ras: bool) -> sitk.Image:
    """[D, H, W] LPS array -> sitk image centred on the origin, stored in LPS or (flipped) RAS."""
    nz, ny, nx = arr.shape
    sz, sy, sx = spacing
    lps_origin = np.array([-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz])
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, ::-1, ::-1] if ras else arr))
    img.SetSpacing((sx, sy, sz))
    if ras:  # voxel (0, 0, 0) of the RAS copy is LPS voxel (nx-1, ny-1, 0)
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        img.SetOrigin(tuple(lps_origin * [-1, -1, 1]))
    else:
        img.SetOrigin(tuple(lps_origin))
    return img


def _write(img: sitk.Image, path: str) -> None:
    atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, True, 1))


def make_demo_data(root: str = "demo_data", n_pretrain: int = 24, n_labeled: int = 32,
                   seed: int = 0) -> dict[str, str]:
    """Write phantoms and pretrain.csv (Path), train.csv / val.csv (Path, Label, Mask), predict.csv (Path, Label).

    Labelled volumes are split 1/2 train, 1/4 val, 1/4 predict with an effusion in about half of each split.
    Idempotent: when root/manifest.json records the same parameters the existing files are reused.
    Returns {'root', 'pretrain', 'train', 'val', 'predict', 'manifest'} paths.
    """
    folder = DemoFolder(root)
    out = {k: folder.table(k) for k in ("pretrain", "train", "val", "predict")}
    out.update(root=root, manifest=os.path.join(root, "manifest.json"))
    params = dict(version=DEMO_VERSION, n_pretrain=n_pretrain, n_labeled=n_labeled, seed=seed)
    try:
        with open(out["manifest"]) as f:
            if json.load(f) == params and all(os.path.isfile(out[k]) for k in ("pretrain", "train", "val", "predict")):
                return out
    except (OSError, ValueError):
        pass
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    pre = []
    for i in range(n_pretrain):
        rng = np.random.default_rng([seed, 0, i])
        hu, _, sp = make_phantom(rng, effusion=bool(rng.random() < 0.5))
        pre.append(folder.pretrain_image(i))
        _write(_to_image(hu, sp, ras=i % 3 == 2), os.path.join(root, pre[-1]))
    n_train, n_val = n_labeled // 2, n_labeled // 4
    rng = np.random.default_rng([seed, 2])
    # Training chests come in pairs, one anatomy with and without an effusion in random order, so that the only
    # difference a classifier can use within a pair is the fluid; validation and prediction chests are all new.
    train_labels = [rng.permutation(2) for _ in range(n_train // 2)] + [rng.integers(0, 2, n_train % 2)]
    labels = np.concatenate(train_labels + [rng.permutation(np.arange(n) % 2)
                                            for n in (n_val, n_labeled - n_train - n_val)])
    rows = []
    for i, label in enumerate(labels):
        anatomy = i - i % 2 if i < n_train - n_train % 2 else i
        hu, mask, sp = make_phantom(np.random.default_rng([seed, 1, anatomy]), effusion=bool(label),
                                    effusion_rng=np.random.default_rng([seed, 3, i]))
        img, msk = folder.case_image(i), folder.case_mask(i)
        _write(_to_image(hu, sp, ras=i % 3 == 2), os.path.join(root, img))
        _write(_to_image(mask, sp, ras=False), os.path.join(root, msk))
        rows.append({"Path": img, "Label": int(label), "Mask": msk})
    splits = {"pretrain": pd.DataFrame({"Path": pre}), "train": pd.DataFrame(rows[:n_train]),
              "val": pd.DataFrame(rows[n_train:n_train + n_val]),
              "predict": pd.DataFrame(rows[n_train + n_val:], columns=["Path", "Label", "Mask"])[["Path", "Label"]]}
    for name, df in splits.items():
        atomic_write(out[name], lambda tmp: df.to_csv(tmp, index=False))
    write_text(out["manifest"], json.dumps(params))
    return out
