"""Batch prediction from a CSV of volumes: class probabilities, regression values, embeddings, label maps.

    python main_predict.py --input_csv scans.csv --output_csv predictions.csv --finetune checkpoint-best.pth
    python main_predict.py --input_csv scans.csv --embeddings emb.npy --finetune mae_pretrained.pth
    torchrun --standalone --nproc_per_node=4 main_predict.py ...   # rows split across GPUs, one output file

The checkpoint decides the task, labels, model and preprocessing; --orientation/--spacing/--window/--interpolator
(and --roi_mm/--roi_coords/--roi_label, --norm) override the saved preprocessing only when typed (validated again);
--channels must name the checkpoint's channels in its order (to read them from other columns, or from 4D files).
Without arguments it runs the demo. With ROI settings (lesion-level rows: a box around each row's coordX/Y/Z point
or Mask label) rows are ordered by scan, so the rows of one scan are read once.

Embeddings (--embeddings): the encoder's output tokens [N, 1+L, E] (`forward_features`: the last block, then the
encoder's final LayerNorm; pretraining checkpoints keep the MAE's, so they equal the MAE latent) are pooled: `cls`
= token 0, `avg` = the mean of the L patch tokens, `cat` = [cls, avg] (width 2E). A row that cannot be read gets a
one-sentence `error` and never stops the others; exit status 2 when any row failed (--strict: stop, write nothing).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from util import args as cli_args
from util.errors import UserError
from util.run_folder import status_beside
from util.runtime import default_num_workers
from util.task.flags import HEAD_TASKS

DEMO_DIR = os.path.join("output_dir", "demo_finetune")
DEMO_PRESET = dict(input_csv=os.path.join("demo_data", "predict.csv"),
                   output_csv=os.path.join("output_dir", "demo_predict", "predictions.csv"),
                   batch_size=4, num_workers=min(2, default_num_workers()), overwrite=True)
PREPROCESS_FLAGS = cli_args.PREPROCESS_FLAGS  # orientation, spacing, window, interpolator and the ROI flags
EMBEDDING_POOLS = {"cls": "token", "avg": "avg", "cat": "cat"}  # --embedding_type -> models_vit3d.pool_tokens
EXAMPLES = """  python main_predict.py                        # demo: the demo classifier on demo_data/predict.csv
  python main_predict.py --input_csv scans.csv --output_csv predictions.csv --finetune checkpoint-best.pth
  python main_predict.py --input_csv scans.csv --embeddings emb.npy --embedding_type cat --finetune mae_pretrained.pth
  python main_predict.py --input_csv scans.csv --output_csv seg.csv --seg_output_dir masks/ --finetune seg-best.pth
"""


def get_args_parser():
    p = cli_args.make_parser("main_predict.py", "Batch prediction, embeddings and label maps from a CSV of volumes. "
                             "The checkpoint decides the task, labels, model and preprocessing.", EXAMPLES)
    p.add_argument("--input_csv", default=None, help="CSV with a Path column (omit it to run the demo)")
    p.add_argument("--output_csv", default=None, help="input columns + prob_<class>, pred, error (+ dice for "
                                                       "segmentation with a Mask column)")
    p.add_argument("--finetune", "--checkpoint", dest="finetune", default=None,
                   help="finetuned checkpoint (predictions, masks, embeddings) or pretraining one (embeddings); "
                        "required with --input_csv")
    p.add_argument("--embeddings", default=None, help="write embeddings to this .npy, .csv or .parquet file")
    p.add_argument("--embedding_type", default="avg", choices=sorted(EMBEDDING_POOLS),
                   help="cls: class token; avg: mean of patch tokens; cat: both concatenated")
    p.add_argument("--head_mode", default=None, choices=HEAD_TASKS,
                   help="checkpoints with a head but no metadata (the original project's classifiers): how to read "
                        "the head (default: binary for 1 output, multiclass for more)")
    p.add_argument("--seg_output_dir", default=None,
                   help="segmentation: folder for <stem>_seg.nii.gz (default: next to --output_csv)")
    p.add_argument("--input_size", type=cli_args.bounded(int, min=1), nargs="+", default=None,
                   help="checkpoints without metadata only: D H W the encoder runs at (default: from the checkpoint)")
    p.add_argument("--batch_size", type=cli_args.bounded(int, min=1), default=4,
                   help="volumes per forward pass (per process)")
    p.add_argument("--sw_batch_size", type=cli_args.bounded(int, min=1), default=None,
                   help="segmentation windows per pass (default: --batch_size)")
    p.add_argument("--sw_overlap", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.25,
                   help="segmentation sliding-window overlap")
    p.add_argument("--num_workers", type=cli_args.bounded(int, min=0), default=default_num_workers(4),
                   help="DataLoader processes reading and preprocessing")
    p.add_argument("--precision", default="auto", choices=cli_args.PRECISIONS,
                   help="auto: bf16 on GPUs that support it, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--label_column", default="Label", help="classifiers: score the predictions against this "
                                                            "input column when it holds class indices")
    p.add_argument("--save_inputs", default=None, metavar="DIR",
                   help="also write what the model is fed, per row: rowNNNN_<scan>.nii.gz (the preprocessed input on "
                        "its own geometry: it overlays the scan) and rowNNNN_<scan>.png (its three mid-slices)")
    p.add_argument("--strict", action="store_true", help="stop at the first row that fails, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    cli_args.add_preprocess_args(p, "default: what the checkpoint stored; a flag you type overrides it")
    cli_args.add_roi_args(p, "default: what the checkpoint stored; a flag you type overrides it")
    return p


@dataclass(frozen=True)
class PredictSettings:
    """Every setting of a prediction run, resolved once from the flags (`parse_args`), then only read.

    overrides: the preprocessing flags the user typed (PreprocessConfig fields), which replace what the checkpoint
    stored; input_size: checkpoints without metadata only (None: what they were trained at); typed: the flags the
    user typed."""
    input_csv: str
    output_csv: str | None
    finetune: str
    embeddings: str | None
    embedding_type: str
    head_mode: str | None
    seg_output_dir: str | None
    input_size: tuple[int, int, int] | None
    batch_size: int
    sw_batch_size: int | None
    sw_overlap: float
    num_workers: int
    precision: str
    device: str | None
    label_column: str
    save_inputs: str | None
    strict: bool
    overwrite: bool
    cache_dir: str | None
    overrides: dict
    demo: bool
    typed: frozenset

    @property
    def status_path(self) -> str | None:
        """`<first output>.exit_status.json` beside it: never a file of the folder's own run."""
        first = self.output_csv or self.embeddings
        return status_beside(first) if first else None


def parse_args(argv: list[str] | None = None) -> PredictSettings:
    """Parse the command line; remember which flags were typed; apply the demo preset without --input_csv; check
    the flags' ranges, the preprocessing flags and the outputs (before anything is loaded); the settings."""
    def presets(args) -> None:
        args.demo = args.input_csv is None
        if args.demo:
            from util.run_folder import RunFolder

            found = RunFolder(DEMO_DIR).best_or_last() or RunFolder(DEMO_DIR).best
            cli_args.apply_preset(args, dict(DEMO_PRESET, finetune=found), "demo")

    def settings(args) -> PredictSettings:
        from util.triple import to_3tuple

        if args.finetune is None:
            raise UserError("--finetune (the checkpoint to predict with) is required with --input_csv.")
        if args.output_csv is None and args.embeddings is None:
            raise UserError("Pass --output_csv (predictions) and/or --embeddings (embedding file).")
        return cli_args.settings_of(
            PredictSettings, args, input_size=to_3tuple(args.input_size, "--input_size") if args.input_size else None,
            overrides=cli_args.typed_preprocess(args, PREPROCESS_FLAGS), typed=cli_args.typed_flags(args))
    return cli_args.parse(get_args_parser(), argv, presets, settings)


# --help and bad values are answered here, before the heavy imports below (a fraction of a second, not 10 s, 1 GB)
cli_args.parse_before_imports(__name__, get_args_parser)
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

import engine_predict as io  # noqa: E402
from engine_predict import PredictDataset, collate_rows, predict_batch, segment_volume  # noqa: E402
from models_build import load_for_inference  # noqa: E402
from util.atomic import ensure_writable_dir  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.distributed import all_gather_objects, barrier, cleanup, init_distributed, is_main_process  # noqa: E402
from util.runtime import Runtime, resolve_precision, torch_threads  # noqa: E402
from util.task.record import read_record  # noqa: E402
from util.train.trainer import worker_init  # noqa: E402
from util.volume.preprocess import PreprocessConfig  # noqa: E402


@dataclass(frozen=True)
class Device:
    """Where the model runs: the device and the precision resolved for it."""
    device: str
    precision: str


def prepare_demo(s: PredictSettings) -> None:
    from util.data.demo import make_demo_data

    if not os.path.isfile(s.finetune):
        raise FileNotFoundError(f"The demo needs a finetuned checkpoint at {s.finetune}; make it with "
                                f"`python main_pretrain.py && python main_finetune.py` (their demo presets).")
    if is_main_process():
        make_demo_data("demo_data")
    barrier()


def load_model(s: PredictSettings, dev: Device):
    """The model in eval mode, its meta, and the PreprocessConfig prediction uses."""
    rec = read_record(s.finetune)
    try:  # pretraining checkpoints: 'token' pooling keeps the MAE's final norm (embeddings = MAE latent)
        model, meta, saved = load_for_inference(rec, dev.device, s.input_size, global_pool="token",
                                                head_mode=s.head_mode)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"Checkpoint {s.finetune} does not match the model its metadata describes "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    if s.input_size and meta.input_size != s.input_size:
        print(f"Note: --input_size is ignored for finetuned checkpoints (this one runs at {list(meta.input_size)}).")
    return model, meta, preprocess_config(saved, meta, s)


def preprocess_config(saved: PreprocessConfig | None, meta, s: PredictSettings) -> PreprocessConfig:
    """The checkpoint's preprocessing (TANGERINE defaults when it has none); typed flags override it through
    PreprocessConfig.with_overrides, which validates the result (a reversed --window is refused)."""
    cfg = saved or PreprocessConfig(size=meta.input_size)
    changes = dict(s.overrides)
    check_channels(cfg, changes, meta, s.finetune)
    if "input_size" in s.typed and meta.task.headless:
        changes["size"] = meta.input_size
    new = cfg.with_overrides(**changes)
    typed = [k for k in PREPROCESS_FLAGS if k in changes]
    differs = [k for k in typed if getattr(new, k) != getattr(cfg, k)]  # typing the stored value changes nothing
    if differs and saved:
        print(f"Preprocessing overridden by {', '.join('--' + k for k in differs)}: prediction no longer sees "
              f"exactly what training saw.")
    elif typed and not saved:  # nothing stored to deviate from (TANGERINE, the original project's files)
        print(f"{s.finetune} stores no preprocessing: the TANGERINE default at input {list(meta.input_size)} "
              f"with {', '.join('--' + k for k in typed)} as typed.")
    return new


def check_channels(cfg: PreprocessConfig, changes: dict, meta, ckpt: str) -> None:
    """--channels typed at prediction must name the model's channels in the model's order (they may read them from
    other columns, NAME=COLUMN); another order, a missing or an extra channel is refused in one sentence."""
    if cfg.in_chans != meta.in_chans:
        raise UserError(f"{ckpt}: its preprocessing names {cfg.in_chans} channel(s) but its model takes "
                        f"{meta.in_chans}; the checkpoint is inconsistent.")
    if "channels" not in changes:
        return
    typed = PreprocessConfig(channels=changes["channels"]).channel_names
    if typed != cfg.channel_names:
        raise UserError(f"--channels {','.join(typed)} is not what {ckpt} was trained on: its channels are "
                        f"{','.join(cfg.channel_names)} in this order, and a model fed other images or another order "
                        f"would predict from the wrong sequences (type them in its order, NAME=COLUMN to map columns).")


def check_flags(s: PredictSettings) -> None:
    """Fail early, before any model is loaded, on two outputs (or an output and an input) that are the same file, on
    existing outputs and on output folders that cannot be written."""
    if s.embeddings:
        io.check_embedding_path(s.embeddings)
    io.check_outputs(io.output_files(s.output_csv, s.embeddings), s.overwrite,
                     inputs={"--input_csv": s.input_csv, "--finetune": s.finetune})
    if s.save_inputs and is_main_process():
        ensure_writable_dir(s.save_inputs, "--save_inputs folder")


def check_task(s: PredictSettings, meta, paths: list[str]) -> list[str]:
    """Check the request fits the checkpoint's task; returns the label-map path of every row (segmentation)."""
    task, ckpt = meta.task, s.finetune
    if task.headless and not s.embeddings:
        raise UserError(f"{ckpt} is a pretraining checkpoint (no task head): pass --embeddings PATH to extract "
                        f"embeddings, or a finetuned checkpoint to predict.")
    if task.dense and s.embeddings:
        raise UserError(f"{ckpt} is a segmentation checkpoint: --embeddings needs a pretraining or a "
                        f"classification/regression checkpoint.")
    if s.seg_output_dir and not task.dense:
        raise UserError(f"--seg_output_dir needs a segmentation checkpoint; {ckpt} is a {task.name} one.")
    if not task.dense:
        return []
    if s.output_csv is None:
        raise UserError("Segmentation needs --output_csv (it lists the label map of every row).")
    seg_dir = s.seg_output_dir or os.path.splitext(s.output_csv)[0] + "_seg"
    seg_paths = io.seg_output_paths(paths, seg_dir)
    io.check_outputs(io.output_files(s.output_csv, s.embeddings, seg_paths), s.overwrite,
                     inputs={**{f"--input_csv row {i + 1}": p for i, p in enumerate(paths)},
                             "--input_csv": s.input_csv, "--finetune": s.finetune})
    return seg_paths


def build_loader(paths: list[str], rows: list[int], cfg, meta, s: PredictSettings, dev: Device,
                 rois: list | None = None, sources: list | None = None) -> DataLoader:
    seg = meta.task.dense
    ds = PredictDataset(paths, rows, cfg, meta.input_size, keep_grid=seg, cache_dir=s.cache_dir,
                        rois=rois, save_inputs=s.save_inputs, sources=sources)
    return DataLoader(ds, batch_size=1 if seg else s.batch_size, shuffle=False, num_workers=s.num_workers,
                      collate_fn=collate_rows, pin_memory=dev.device.startswith("cuda"),
                      prefetch_factor=2 if s.num_workers else None, worker_init_fn=worker_init)


def run_shard(model, loader: DataLoader, meta, s: PredictSettings, dev: Device, seg_paths: list[str],
              masks: list[str] | None = None) -> dict[int, dict]:
    """Predict this process's rows; returns {row: result}. With --strict it stops at the first failure.
    Segmentation rows with a Mask file also get their Dice (score_mask)."""
    results: dict[int, dict] = {}
    failed, pool = 0, EMBEDDING_POOLS[s.embedding_type] if s.embeddings else None
    bar = tqdm(total=len(loader.dataset), unit="vol", desc="predict", disable=not is_main_process(),
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for batch in loader:
        for row, err in batch["failed"]:
            results[row] = {"error": err}
        failed += len(batch["failed"])
        if failed and s.strict:
            break
        if batch["rows"] and meta.task.dense:
            for row, image, grids in zip(batch["rows"], batch["images"], batch["grids"]):
                label = segment_volume(model, image, grids, meta, dev.device, dev.precision,
                                       s.sw_batch_size or s.batch_size, s.sw_overlap)
                io.write_label_map(seg_paths[row], label)
                results[row] = {"seg_path": seg_paths[row], **io.score_mask(label, row, masks, meta)}
        elif batch["rows"]:
            results.update(zip(batch["rows"], predict_batch(model, batch["images"], meta.task, dev.device,
                                                                dev.precision, pool)))
        bar.update(len(batch["rows"]) + len(batch["failed"]))
        if failed:
            bar.set_postfix(failed=failed)
    bar.close()
    return results


def gather_results(results: dict[int, dict]) -> dict[int, dict]:
    """Every rank's {row: result} merged (a no-op in a single process)."""
    merged: dict[int, dict] = {}
    for part in all_gather_objects(results):
        merged.update(part)
    return merged


def finish(s: PredictSettings, df, paths: list[str], results: dict[int, dict], meta, embed_dim: int) -> int:
    """Write the outputs (rank 0) and return the exit status: 0, or 2 when any row failed."""
    failed = sorted(i for i, r in results.items() if r.get("error"))
    if failed and s.strict:
        i = failed[0]
        print(f"Row {i + 1} ({paths[i] or 'empty path'}) failed: {results[i]['error']} Stopped because of "
              f"--strict; no output file was written.", file=sys.stderr)
        return 2
    if is_main_process():
        if s.output_csv:
            io.write_predictions(s.output_csv, io.prediction_table(df, results, meta))
            print(f"Predictions for {len(df)} rows written to {s.output_csv}")
        score = io.score_against_labels(df, results, meta, s.label_column)
        if score:
            print(score)
        if meta.task.dense:
            for line in io.score_against_masks(df, results):
                print(line)
        if s.embeddings:
            dim = embed_dim * (2 if s.embedding_type == "cat" else 1)
            io.write_embeddings(s.embeddings, df, results, dim)
            print(f"Embeddings [{len(df)}, {dim}] ({s.embedding_type}) written to {s.embeddings}")
    if failed:
        i = failed[0]
        print(f"{len(failed)} of {len(df)} rows failed (see the error column); first: row {i + 1}: "
              f"{results[i]['error']}", file=sys.stderr)
        return 2
    return 0


def main(s: PredictSettings) -> int:
    rt: Runtime = init_distributed(s.device)
    torch_threads()
    if s.demo:
        prepare_demo(s)
    check_flags(s)
    dev = Device(rt.device, resolve_precision(s.precision, rt.device))
    df = io.read_table(s.input_csv)
    model, meta, cfg = load_model(s, dev)
    paths, sources = io.row_inputs(df, s.input_csv, cfg, four_d="channels" in s.typed)
    seg_paths = check_task(s, meta, paths)
    if cfg.roi and meta.task.dense:
        raise UserError(f"{s.finetune} is a segmentation checkpoint: --roi_mm boxes are for classification, "
                        f"regression and embeddings.")
    rois = io.row_rois(df, s.input_csv, cfg)  # lesion-level rows: each row's point or Mask (else None)
    rows = io.shard_rows(paths, rt.rank, rt.world_size, by_scan=rois is not None)  # no padding
    loader = build_loader(paths, rows, cfg, meta, s, dev, rois, sources)
    what = f"embeddings ({s.embedding_type})" if meta.task.headless else meta.task.name
    print(f"{s.finetune}: {meta.model} {what}, input {meta.input_size}, {len(paths)} rows on "
          f"{rt.world_size} process(es), precision {dev.precision}, preprocessing {cfg.to_dict()}")
    masks = io.mask_paths(df, s.input_csv) if meta.task.dense else None
    results = gather_results(run_shard(model, loader, meta, s, dev, seg_paths, masks))
    code = finish(s, df, paths, results, meta, getattr(model, "embed_dim", 0))
    if s.save_inputs:
        print(f"Inputs as fed to the model: {s.save_inputs}/rowNNNN_<scan>.nii.gz and .png (rows from 1)")
    cleanup()
    return code


def cli_main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line) into settings, run, return the exit status (0, or 2 when rows
    failed)."""
    s = parse_args(argv)
    return run_main(main, s, s.status_path)


if __name__ == "__main__":
    sys.exit(cli_main())
