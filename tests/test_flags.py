"""The command line of the four scripts: --help without torch, every numeric flag range-checked before any work,
the rules between flags, validated preprocessing overrides, outputs checked before prediction, truthful preset
lines."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_in_process
from util.task.meta import RunMeta
from util import args as cli_args
from util.errors import UserError
from util.volume.preprocess import PreprocessConfig

SCRIPTS = ("main_pretrain.py", "main_finetune.py", "main_predict.py", "main_cache.py")
HEAVY = ("torch", "timm", "SimpleITK", "monai", "pandas")
PROBE = """import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("EXIT", code)
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_torch_and_shows_no_useless_defaults(script):
    probe = PROBE.format(script=str(ROOT / script), heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "EXIT 0" in r.stdout and "HEAVY []" in r.stdout, r.stdout[-500:]
    assert "usage:" in r.stdout and "(default: None)" not in r.stdout
    text = " ".join(r.stdout.split())
    if script == "main_finetune.py":
        assert "(default: output_dir/finetune;" in text and "random weights" in text
        assert "--epochs EPOCHS training epochs (default: 50; >= 1)" in text
    if script == "main_cache.py":
        assert "--cache_dir CACHE_DIR required:" in text and "--csv CSV [CSV ...] required:" in text


def test_model_names_in_the_parser_are_the_factories():
    import models_mae3d  # noqa: F401
    import models_vit3d  # noqa: F401
    from util.nn.registry import registered

    assert list(cli_args.MAE_MODELS) == registered("mae")
    assert list(cli_args.VIT_MODELS) == registered("vit")


@pytest.mark.parametrize("script, argv, needle", [
    ("main_pretrain.py", ["--epochs", "-3"], "--epochs: must be >= 1, got -3"),
    ("main_pretrain.py", ["--mask_ratio", "0"], "--mask_ratio: must be > 0 and < 1, got 0"),
    ("main_pretrain.py", ["--mask_ratio", "1"], "--mask_ratio: must be > 0 and < 1, got 1"),
    ("main_pretrain.py", ["--accum_iter", "0"], "--accum_iter: must be >= 1, got 0"),
    ("main_pretrain.py", ["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    ("main_pretrain.py", ["--num_workers", "-1"], "--num_workers: must be >= 0, got -1"),
    ("main_pretrain.py", ["--blr", "0"], "--blr: must be > 0, got 0"),
    ("main_pretrain.py", ["--lr", "nan"], "--lr: must be > 0, got nan"),
    ("main_pretrain.py", ["--warmup_epochs", "-1"], "--warmup_epochs: must be >= 0, got -1"),
    ("main_pretrain.py", ["--epochs", "ten"], "--epochs: must be an integer >= 1, got 'ten'"),
    ("main_pretrain.py", ["--spacing", "1", "0", "1"], "--spacing: must be > 0, got 0"),
    ("main_pretrain.py", ["--input_size", "24"], "--input_size (24, 24, 24) must be a multiple of --patch_size"),
    ("main_pretrain.py", ["--input_size", "32", "32"], "--input_size must be one positive int or three"),
    ("main_pretrain.py", ["--window", "800", "-1200"], "--window LO HI) must have LO < HI, got 800.0 -1200.0"),
    ("main_pretrain.py", ["--orientation", "LPX"], "--orientation) must be three letters"),
    ("main_finetune.py", ["--smoothing", "1"], "--smoothing: must be >= 0 and < 1, got 1"),
    ("main_finetune.py", ["--fg_prob", "1.5"], "--fg_prob: must be >= 0 and <= 1, got 1.5"),
    ("main_finetune.py", ["--pos_weight", "2", "-1"], "--pos_weight: must be > 0, got -1"),
    ("main_finetune.py", ["--nb_classes", "1"], "--nb_classes: must be >= 2, got 1"),
    ("main_finetune.py", ["--layer_decay", "0"], "--layer_decay: must be > 0 and <= 1, got 0"),
    ("main_predict.py", ["--window", "800", "-1200"], "must have LO < HI, got 800.0 -1200.0"),
    ("main_predict.py", ["--sw_overlap", "1"], "--sw_overlap: must be >= 0 and < 1, got 1"),
    ("main_predict.py", ["--spacing", "0", "1", "1"], "--spacing: must be > 0, got 0"),
    ("main_cache.py", ["--csv", "a.csv", "--cache_dir", "c", "--workers", "0"], "--workers: must be >= 1, got 0"),
    ("main_cache.py", ["--csv", "a.csv", "--cache_dir", "c", "--orientation", "RR"], "--orientation) must be"),
])
def test_a_value_out_of_range_is_one_line_before_anything_is_built(script, argv, needle, tmp_path):
    out = tmp_path / "out"
    extra = {"main_pretrain.py": ["--data_path", "x.csv", "--output_dir", out],
             "main_finetune.py": ["--train_csv", "x.csv", "--output_dir", out]}.get(script, [])
    r = run_in_process(script, *extra, *argv)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-1000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_the_rank_0_process_alone_says_which_recipe_defaults_apply(monkeypatch, capsys):
    import main_pretrain

    args = main_pretrain.parse_args(["--data_path", "x.csv", "--model", "mae_vit_tiny_patch16", "--input_size", "64"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("Using the TANGERINE recipe for the flags you did not type: patch_size=[16], "
                           "mask_ratio=0.75, epochs=400, warmup_epochs=40, blr=0.00015"), line
    assert "model=" not in line and "input_size" not in line and args.model.input_size == (64, 64, 64)
    everything = ["--model", "mae_vit_tiny_patch16", "--input_size", "64", "--patch_size", "8", "--mask_ratio",
                  "0.6", "--epochs", "3", "--warmup_epochs", "1", "--blr", "1e-3"]
    main_pretrain.parse_args(["--data_path", "x.csv", *everything])
    assert capsys.readouterr().out == ""  # nothing of the recipe applies: nothing said
    monkeypatch.setenv("RANK", "1")
    main_pretrain.parse_args(["--data_path", "x.csv"])
    main_pretrain.parse_args([])  # the demo preset
    assert capsys.readouterr().out == ""  # torchrun's other processes say nothing


def test_finetuning_from_random_weights_is_said_in_one_line(capsys):
    import main_finetune

    main_finetune.parse_args(["--train_csv", "t.csv"])
    assert capsys.readouterr().out == "no --finetune: the encoder starts from random weights.\n"
    main_finetune.parse_args(["--train_csv", "t.csv", "--finetune", "none", "--linprobe", "--blr", "0.5"])
    out = capsys.readouterr().out
    assert "--finetune none: the encoder starts from random weights." in out
    assert "Using the linear-probe recipe preset for the flags you did not type: weight_decay=0.0, drop_path=0.0, " \
           "smoothing=0.0" in out and "blr" not in out
    main_finetune.parse_args(["--train_csv", "t.csv", "--finetune", "mae.pth"])
    assert capsys.readouterr().out == ""


def test_a_typed_preprocessing_override_is_validated_like_a_new_config():
    saved = PreprocessConfig(size=(32, 32, 32), window=(-1000.0, 400.0), orientation="RAS")
    assert saved.with_overrides(window=[-500, 500]).window == (-500.0, 500.0)
    assert saved.with_overrides(window=[-500, 500]).orientation == "RAS"
    for bad, needle in [(dict(window=(800, -1200)), "LO < HI"), (dict(orientation="LPQ"), "--orientation"),
                        (dict(spacing=(1.0, 0.0, 1.0)), "--spacing"), (dict(size=(32, -1, 32)), "--input_size")]:
        with pytest.raises(UserError, match=needle):
            saved.with_overrides(**bad)


def test_main_predict_applies_typed_flags_only_through_the_validated_override():
    import main_predict

    from dataclasses import replace

    saved = PreprocessConfig(size=(32, 32, 32), window=(-1000.0, 400.0))
    meta = RunMeta.from_dict({"mode": "multiclass", "model": "vit_tiny_patch16", "input_size": [32, 32, 32],
                              "nb_classes": 3, "nb_outputs": 3})
    s = main_predict.parse_args(["--input_csv", "x.csv", "--output_csv", "p.csv", "--finetune", "c.pth",
                                 "--orientation", "ras"])
    assert main_predict.preprocess_config(saved, meta, s).orientation == "RAS"
    s = replace(s, overrides={**s.overrides, "window": [800.0, -1200.0]})  # as if parsing had let it through
    with pytest.raises(UserError, match="LO < HI"):
        main_predict.preprocess_config(saved, meta, s)


def test_two_outputs_or_an_output_and_an_input_may_not_be_the_same_file(tmp_path):
    table = tmp_path / "in.csv"
    table.write_text("Path\nv.nii.gz\n")
    base = ["--input_csv", table, "--finetune", tmp_path / "ckpt.pth", "--device", "cpu", "--num_workers", 0]
    r = run_in_process("main_predict.py", *base, "--output_csv", tmp_path / "p.csv", "--embeddings", tmp_path / "p.csv")
    assert r.returncode == 2 and "--embeddings" in r.stderr and "same file as --output_csv" in r.stderr, r.stderr
    r = run_in_process("main_predict.py", *base, "--output_csv", table, "--overwrite")
    assert r.returncode == 2 and "same file as --input_csv (an input of this run)" in r.stderr, r.stderr
    assert table.read_text() == "Path\nv.nii.gz\n"
    (tmp_path / "a_file").write_text("x")
    r = run_in_process("main_predict.py", *base, "--output_csv", tmp_path / "a_file" / "p.csv")
    assert r.returncode == 2 and "not a writable folder" in r.stderr and "--output_csv" in r.stderr, r.stderr
    assert "ckpt.pth" not in r.stderr  # refused before the checkpoint was even looked at
