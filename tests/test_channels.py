"""Channels (issue 32): per-channel normalisation checked by hand on real MRI (the MNI ICBM152 2009 T1 template
shipped in the nilearn wheel), channels on the first channel's grid, the cache's per-channel levels and their decoding
on the device, a 1-channel model carried into C channels, per-channel norm_pix_loss, and a single-channel CT
configuration that is exactly what it was before channels existed."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import models_mae3d
import models_vit3d
from tests.mri_study import template_file
from util.data.transport import decode_on_device
from util.errors import UserError
from util.nn.channel_carry import carry_channels
from util.volume import preprocess
from util.volume.cache import VolumeCache, decode
from util.volume.channels import (ChannelSource, ZSCORE_LEVELS, channel_keys, level_maps, load_cached_channels,
                                  preprocess_channels)
from util.volume.io import VolumeError
from util.volume.preprocess import PreprocessConfig, cache_keys

NATIVE = dict(size=None, spacing=None)  # no resampling: the output voxels are the file's own


@pytest.fixture(scope="module")
def t1():
    """The template's T1 and its array in LPS order, as preprocessing reads it."""
    img = sitk.ReadImage(template_file("t1"))
    return img, sitk.GetArrayFromImage(preprocess.reorient(img, "LPS")).astype(np.float64)


def test_zscore_is_the_mean_and_std_of_the_non_zero_voxels_computed_by_hand(t1):
    _, a = t1
    cfg = PreprocessConfig(**NATIVE, channels="t1", norm="zscore")
    out, _ = preprocess_channels([ChannelSource(template_file("t1"))], cfg)
    fg = a[a != 0]
    assert 0.1 < fg.size / a.size < 0.5  # the template's background is zero: the rule matters here
    expected = (a - fg.mean()) / fg.std()
    assert out.shape == (1, *a.shape) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, atol=2e-5)
    brain = out[0][a != 0]
    assert abs(brain.mean()) < 1e-4 and abs(brain.std() - 1) < 1e-4


def test_percentile_clips_to_the_half_percent_tails_of_the_non_zero_voxels_then_scales(t1):
    _, a = t1
    cfg = PreprocessConfig(**NATIVE, channels="t1", norm="percentile")
    out, _ = preprocess_channels([ChannelSource(template_file("t1"))], cfg)
    fg = a[a != 0]
    lo, hi = np.percentile(fg, 0.5), np.percentile(fg, 99.5)
    assert lo > 0 and hi < a.max()  # both clip points bite on this brain
    np.testing.assert_allclose(out[0], np.clip((a - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert out.min() == 0 and out.max() == 1


def test_a_ct_window_on_mri_is_warned_about_once():
    cfg = PreprocessConfig(**NATIVE, channels="t1", norm="ct")
    preprocess._WARNED_NOT_HU.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            preprocess_channels([ChannelSource(template_file("t1"))], cfg)
    said = [str(w.message) for w in caught if "does not look like a CT" in str(w.message)]
    assert len(said) == 1 and "--norm zscore" in said[0]


def small(path, arr, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return str(path)


def test_channels_on_other_grids_are_resampled_in_physical_space_or_refused(tmp_path):
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:20, :24, :22]
    ramp = (x * 3.0 + y + 50).astype(np.float32)  # a linear ramp along x (mm = 2 * index)
    a = small(tmp_path / "a.nii.gz", ramp)
    # the same ramp in physical space sampled at 1 mm, shifted by half a voxel: resampled back it is the ramp
    fine_x = np.mgrid[:40, :48, :44][2] * 0.5 + 0.25
    b = small(tmp_path / "b.nii.gz", (fine_x * 3.0 + np.mgrid[:40, :48, :44][1] * 0.5 + 0.25 + 50), (1.0,) * 3,
              (-0.5 + 0.25,) * 3)
    cfg = PreprocessConfig(**NATIVE, channels="a,b", norm="percentile", interpolator="linear")
    out, ref = preprocess_channels([ChannelSource(a), ChannelSource(b)], cfg)
    inner = (slice(2, -2),) * 3  # away from the borders where linear interpolation runs out of samples
    assert np.abs(out[0][inner] - out[1][inner]).max() < 0.02
    noise = small(tmp_path / "n.nii.gz", rng.normal(100, 10, (20, 24, 22)), origin=(0.0005, 0, 0))  # within 1e-3 mm
    same, _ = preprocess_channels([ChannelSource(a), ChannelSource(noise)], cfg.with_overrides(channels="a,n"))
    direct = preprocess_channels([ChannelSource(noise)], cfg.with_overrides(channels="n"))[0]
    assert np.array_equal(same[1], direct[0])  # taken voxel for voxel
    half = small(tmp_path / "h.nii.gz", ramp, origin=(0.0, 0.0, 20.0))  # covers half the first channel's box
    with pytest.raises(VolumeError, match=r"h.nii.gz: covers 50% of the field of view .* less than the 90%"):
        preprocess_channels([ChannelSource(a), ChannelSource(half)], cfg.with_overrides(channels="a,h"))
    far = small(tmp_path / "f.nii.gz", ramp, origin=(500.0, 0.0, 0.0))
    with pytest.raises(VolumeError, match=r"f.nii.gz: does not overlap the row's first channel .*a.nii.gz"):
        preprocess_channels([ChannelSource(a), ChannelSource(far)], cfg.with_overrides(channels="a,f"))


def test_a_4d_file_gives_the_channels_of_its_volumes_and_a_wrong_count_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    vols = [rng.normal(100 * (k + 1), 10, (12, 14, 16)).astype(np.float32) for k in range(3)]
    files = [small(tmp_path / f"c{k}.nii.gz", v) for k, v in enumerate(vols)]
    four = sitk.JoinSeries([sitk.ReadImage(f) for f in files])
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    cfg = PreprocessConfig(size=(8, 8, 8), channels="x,y,z", norm="zscore")
    apart = preprocess_channels([ChannelSource(f) for f in files], cfg)[0]
    joined = preprocess_channels([ChannelSource(str(tmp_path / "four.nii.gz"), k, 3) for k in range(3)], cfg)[0]
    assert np.array_equal(apart, joined)
    with pytest.raises(VolumeError, match=r"four.nii.gz: is 3 volumes along its 4th axis; --channels names 4"):
        preprocess_channels([ChannelSource(str(tmp_path / "four.nii.gz"), k, 4) for k in range(4)],
                            cfg.with_overrides(channels="w,x,y,z"))


def test_cached_channels_hold_each_normalisation_within_its_step_and_decode_alike_on_the_device(tmp_path):
    rng = np.random.default_rng(2)
    ct = small(tmp_path / "ct.nii.gz", rng.normal(-200, 400, (16, 18, 20)).round())
    mr = small(tmp_path / "mr.nii.gz", np.abs(rng.normal(300, 80, (16, 18, 20))))
    cfg = PreprocessConfig(size=(12, 12, 12), channels="lung=ct,soft=ct,t1=mr,t2=mr", norm="ct,ct,zscore,percentile",
                           windows=(-1000, 0, -160, 240))
    src = [ChannelSource(ct), ChannelSource(ct), ChannelSource(mr), ChannelSource(mr)]
    exact = preprocess_channels(src, cfg)[0]
    cache = VolumeCache(tmp_path / "cache")
    stored, _ = load_cached_channels(src, cfg, cache, decoded=False)
    assert stored.dtype == np.uint16 and stored.shape == (4, 12, 12, 12)
    maps = level_maps(cfg, cache)
    values = decode(stored, maps)
    step = [0.5 / 1000, 0.5 / 400, 0.5 / ZSCORE_LEVELS, 0.5 / 65535]  # 1 HU of each window; z; [0, 1] levels
    for c in range(4):
        assert np.abs(values[c] - exact[c]).max() <= step[c] + 1e-5, c
    hit, _ = load_cached_channels(src, cfg, cache, decoded=False)
    assert np.array_equal(hit, stored) and cache.hits == 3  # the two ct channels share one entry (one key)
    # the ct channels' entry is the single-channel CT entry of the file: a CT run fills it, a channel run reads it
    keys = channel_keys(src, cfg)
    assert keys[0] == keys[1] == cache_keys(ct, PreprocessConfig(size=(12, 12, 12)))[0]
    device = decode_on_device(torch.from_numpy(np.stack([stored, stored]).view(np.int16)),
                              torch.from_numpy(np.stack([maps, maps])))
    assert torch.equal(device[1], torch.from_numpy(values))


def test_a_single_channel_ct_configuration_is_what_every_existing_checkpoint_means():
    cfg = PreprocessConfig()
    assert cfg.plain and cfg.in_chans == 1 and cfg.channel_names == ("Path",)
    assert cfg.to_dict() == {"orientation": "LPS", "size": [256, 256, 256], "spacing": None,
                             "window": [-1200.0, 800.0], "interpolator": "bspline", "mask_interpolator": "nearest"}
    assert cfg.key() == "e05266db01226043"  # the key before channels existed (cache entries, resume checks)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    multi = PreprocessConfig(channels="t1,t1ce,t2,flair", norm="zscore")
    back = PreprocessConfig.from_dict(multi.to_dict())
    assert back == multi and back.norm == ("zscore",) * 4 and back.key() != cfg.key()
    windows = PreprocessConfig(channels="lung=Path,bone=Path", norm="ct", windows=(-1000, 0, 300, 1500))
    assert PreprocessConfig.from_dict(windows.to_dict()).channel_window(1) == (300.0, 1500.0)


@pytest.mark.parametrize("kw, message", [
    (dict(channels="t1,t1"), "names channel 't1' twice"),
    (dict(channels="t1,t2", norm="zscore,ct,ct"), "it has 3 entries for 2 channels"),
    (dict(channels="t1", norm="minmax"), "'minmax' is not one of ct, zscore, percentile"),
    (dict(channels="a,b", norm="ct", windows=(-1000, 0, 0, 100, 1, 2)), "3 windows (LO HI pairs) for 2 ct channels"),
])
def test_bad_channel_settings_are_one_sentence(kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PreprocessConfig(**kw)


def test_one_channel_weights_carried_into_four_embed_four_copies_of_a_volume_as_the_original_did():
    torch.manual_seed(0)
    one = models_mae3d.mae_vit_tiny_patch16(img_size=32, patch_size=8, decoder_depth=1)
    four = models_mae3d.mae_vit_tiny_patch16(img_size=32, patch_size=8, in_chans=4, decoder_depth=1)
    sd, line = carry_channels(one.state_dict(), four, "replicate", "--init one.pth")
    assert line.startswith("--init one.pth is a 1-channel model: its patch embedding kernel is replicated into each "
                           "of the 4 channels with weight 1/4")
    four.load_state_dict(sd)
    x = torch.rand(2, 1, 32, 32, 32)
    noise = torch.rand(2, 64)
    lat1, _, ids = one.forward_encoder(x, 0.75, noise)
    lat4, _, _ = four.forward_encoder(x.repeat(1, 4, 1, 1, 1), 0.75, noise)
    torch.testing.assert_close(lat4, lat1, atol=1e-5, rtol=1e-5)
    pred1, pred4 = one.forward_decoder(lat1, ids), four.forward_decoder(lat4, ids)
    torch.testing.assert_close(four.unpatchify(pred4)[:, 2:3], one.unpatchify(pred1), atol=1e-5, rtol=1e-5)
    fresh = four.patch_embed.proj.weight.detach().clone()
    sd, line = carry_channels(one.state_dict(), four, "random", "--finetune one.pth")
    assert torch.equal(sd["patch_embed.proj.weight"], fresh) and "initialised at random" in line
    vit = models_vit3d.vit_tiny_patch16(img_size=32, patch_size=8, in_chans=3)
    with pytest.raises(UserError, match=r"--finetune four.pth holds a 4-channel model and this run has 3 channel\(s\)"):
        carry_channels(four.state_dict(), vit, "replicate", "--finetune four.pth")


def test_norm_pix_loss_normalises_each_channel_of_a_patch_on_its_own():
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=16, patch_size=8, in_chans=2, norm_pix_loss=True)
    x = torch.stack([torch.rand(16, 16, 16), 1000 + 50 * torch.rand(16, 16, 16)])[None]
    target = mae.loss_target(x).view(1, 8, 512, 2)
    torch.testing.assert_close(target.mean(2), torch.zeros(1, 8, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.std(2), torch.ones(1, 8, 2), atol=1e-3, rtol=0)
    one = models_mae3d.mae_vit_tiny_patch16(img_size=16, patch_size=8, norm_pix_loss=True)
    y = torch.rand(1, 1, 16, 16, 16)
    patches = one.patchify(y)
    expected = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.equal(one.loss_target(y), expected)  # one channel: the original computation, bit for bit


def test_the_channels_benchmark_runs(capsys):
    from bench import bench_channels

    out = bench_channels.main(["--size", "16", "--rounds", "1", "--volumes", "2"])
    assert set(out["worker"]) == {"ct", "ct x3", "mri x4"} and all(v[0] > 0 for v in out["device"].values())
    assert "time per item x1.00 of ct" in capsys.readouterr().out
