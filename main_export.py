"""Export a checkpoint as a model folder: config.json + model.safetensors + README.md (+ encoder.onnx with --onnx).

    python main_export.py out/pretrain/mae_pretrained.pth models/ct-mae-base
    python main_export.py out/finetune/checkpoint-best.pth models/effusion --onnx --evaluation eval/summary.md
    python main_export.py tangerine_vit_large.pth models/tangerine            # weights without metadata

Any checkpoint this repository reads: ours from pretraining or finetuning (every task), TANGERINE-shaped weights
with or without the decoder, the original project's files, or a model folder (to add --onnx or an evaluation). The
folder is the Hugging Face hub's layout (util/model_folder.py): `models_hub.from_pretrained(DIR)` loads it, every
flag that takes a checkpoint takes it, and `hf upload ORG/NAME DIR` publishes it. The folder is written into a
temporary sibling and renamed when complete; an output that exists and is not empty, or that is the input, is
refused. The same checkpoint always gives the same bytes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from util import args as cli_args
from util.task.flags import HEAD_TASKS

EXAMPLES = """  python main_export.py out/pretrain/mae_pretrained.pth models/ct-mae
  python main_export.py out/finetune/checkpoint-best.pth models/effusion --onnx --evaluation eval/summary.md
  python main_export.py tangerine.pth models/tangerine --input_size 256 256 256
"""
MAX_EVALUATION_BYTES = 1 << 20
ONNX_LIMIT = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB, less room for the graph itself


def get_args_parser():
    p = cli_args.make_parser("main_export.py", "Turn a checkpoint into a model folder (config.json, "
                             "model.safetensors, README.md; encoder.onnx with --onnx).", EXAMPLES)
    p.add_argument("checkpoint", help="a checkpoint (.pth) or a model folder")
    p.add_argument("folder", metavar="output_dir", help="the model folder to create (must not exist, or be empty); "
                                                          "it holds nothing but the model's files")
    p.add_argument("--onnx", action="store_true",
                   help="also write encoder.onnx (volume -> tokens) and, for a model with a head, head.onnx "
                        "(tokens -> logits, probabilities), with a dynamic batch size, checked with onnxruntime")
    p.add_argument("--opset", type=cli_args.bounded(int, min=14, max=20), default=17, help="ONNX opset")
    p.add_argument("--evaluation", default=None, metavar="SUMMARY_MD",
                   help="main_evaluate.py's summary.md, quoted in the model card")
    p.add_argument("--with_manifest", action="store_true",
                   help="copy the pretraining data manifest (beside the checkpoint; it lists the absolute paths of "
                        "the scans) into the folder, for main_evaluate.py --pretraining")
    p.add_argument("--title", default=None, help="the model card's title (default: the output folder's name)")
    p.add_argument("--license", default=None, help="a license id for the model card (e.g. cc-by-nc-4.0)")
    p.add_argument("--input_size", type=cli_args.bounded(int, min=1), nargs=3, default=None, metavar=("D", "H", "W"),
                   help="checkpoints without metadata only: the input the encoder was trained at (default: from "
                        "its cubic positional table)")
    p.add_argument("--head_mode", default=None, choices=HEAD_TASKS,
                   help="checkpoints with a head but no metadata: how to read the head (default: binary for 1 "
                        "output, multiclass for more)")
    return p


@dataclass(frozen=True)
class ExportSettings:
    """The flags of an export, as read once (`parse_args`): the input checkpoint or folder, the output folder, and
    what else goes in (ONNX graphs, an evaluation summary, the data manifest, the card's title and license)."""
    checkpoint: str
    folder: str
    onnx: bool
    opset: int
    evaluation: str | None
    with_manifest: bool
    title: str | None
    license: str | None
    input_size: tuple[int, int, int] | None
    head_mode: str | None


def parse_args(argv: list[str] | None = None) -> ExportSettings:
    def settings(args) -> ExportSettings:
        return cli_args.settings_of(ExportSettings, args)
    return cli_args.parse(get_args_parser(), argv, None, settings)


cli_args.parse_before_imports(__name__, get_args_parser)
import shutil  # noqa: E402

import torch  # noqa: E402

from models_hub import build, describe, load_strict  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.data.manifest import manifest_beside, read_manifest  # noqa: E402
from util.digest import file_sha256  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.model_card import model_card  # noqa: E402
from util.model_folder import (CARD, CONFIG, ENCODER_ONNX, HEAD_ONNX, WEIGHTS, check_destination,  # noqa: E402
                               check_weights, meta_of, save_weights, staged_folder, write_json)
from util.task.meta import RunMeta  # noqa: E402
from util.task.record import read_record  # noqa: E402


def read_evaluation(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"--evaluation {path} does not exist; expected the summary.md main_evaluate.py writes.")
    if os.path.getsize(path) > MAX_EVALUATION_BYTES:
        raise UserError(f"--evaluation {path} is larger than 1 MiB; expected the summary.md main_evaluate.py writes.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UserError(f"--evaluation {path} is not UTF-8 text; expected the summary.md main_evaluate.py "
                        f"writes.") from None


def find_manifest(args: ExportSettings, config: dict) -> str:
    """--with_manifest: the data manifest the checkpoint names, beside it (or in the input folder), checked against
    the SHA-256 the checkpoint recorded."""
    prov = config["provenance"]
    if not prov.get("data_manifest"):
        raise UserError(f"--with_manifest: {args.checkpoint} records no data manifest (it was not pretrained by "
                        f"main_pretrain.py, or before manifests were written).")
    path = manifest_beside(args.checkpoint, prov["data_manifest"])
    if path is None:
        raise UserError(f"--with_manifest: {prov['data_manifest']} is not beside {args.checkpoint}; copy it from "
                        f"the pretraining run folder.")
    read_manifest(path, prov.get("data_manifest_sha256"))  # one sentence when it is not the recorded file
    return path


class _Tokens(torch.nn.Module):
    """volume [N, C, D, H, W] -> tokens [N, 1+L, E] (the encoder's forward_features)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, volume):
        return self.encoder.forward_features(volume)


class _Head(torch.nn.Module):
    """tokens [N, 1+L, E] -> (logits [N, K], probabilities [N, columns]) of a classifier or regressor."""

    def __init__(self, model, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, tokens):
        logits = self.model.forward_head(tokens)
        return logits, self.task.probabilities(logits)


def export_onnx(folder: str, config: dict, sd: dict, opset: int) -> dict:
    """encoder.onnx (and head.onnx for a model with a head) in `folder`, traced at batch 2 with a dynamic batch
    axis and checked at batch 1 against PyTorch with onnxruntime; returns config.json's 'onnx' record."""
    arch, task = config["architecture"], config["task"]
    encoder, enc_sd = build(config, sd, encoder_only=True)
    load_strict(encoder, enc_sd, "the encoder")
    size = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    if size > ONNX_LIMIT:
        raise UserError(f"--onnx: the encoder's weights ({size / 2**30:.1f} GiB) exceed the 2 GiB an ONNX file can "
                        f"hold in one piece; export without --onnx (the folder itself has no such limit).")
    encoder.eval()
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(2, arch["in_chans"], *arch["input_size"], generator=generator)
    records = {"encoder": _export(_Tokens(encoder), volume, os.path.join(folder, ENCODER_ONNX), ["volume"],
                                  ["tokens"], opset)}
    records["encoder"]["input"] = ["batch", arch["in_chans"], *arch["input_size"]]
    records["encoder"]["output"] = ["batch", 1 + encoder.num_patches, arch["embed_dim"]]
    if arch["kind"] == "vit" and not task["headless"]:
        model, _ = build(config, sd)
        load_strict(model, sd, "the model")
        with torch.no_grad():
            tokens = model.eval().forward_features(volume)
        head = _Head(model, RunMeta.from_dict(meta_of(config)).task)
        records["head"] = _export(head, tokens, os.path.join(folder, HEAD_ONNX), ["tokens"],
                                  ["logits", "probabilities"], opset)
        records["head"]["output"] = ["batch", len(task["output_columns"])]
    return records


def _export(module: torch.nn.Module, example: torch.Tensor, path: str, inputs: list[str], outputs: list[str],
            opset: int) -> dict:
    import warnings

    import numpy as np
    import onnxruntime

    axes = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module.eval(), (example,), path, dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    one = example[:1]
    with torch.no_grad():
        expected = module(one)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {inputs[0]: one.numpy()})
    diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    if not diff <= 1e-4:
        raise RuntimeError(f"{os.path.basename(path)}: onnxruntime differs from PyTorch by {diff:.2e} (> 1e-4).")
    return {"file": os.path.basename(path), "opset": opset, "sha256": file_sha256(path), "max_abs_diff": diff}


def main(args: ExportSettings) -> int:
    check_destination(args.folder, args.checkpoint)
    evaluation = read_evaluation(args.evaluation)
    rec = read_record(args.checkpoint)
    config = describe(rec, args.checkpoint, args.input_size, args.head_mode)
    sd = rec.weights
    check_weights(config, sd, args.checkpoint)
    model, model_sd = build(config, sd, where=args.checkpoint)
    load_strict(model, model_sd, args.checkpoint)  # the folder will load: refused before anything is written
    manifest = find_manifest(args, config) if args.with_manifest else None
    title = args.title or os.path.basename(os.path.abspath(args.folder))
    with staged_folder(args.folder) as tmp:
        config["weights"] = save_weights(os.path.join(tmp, WEIGHTS), sd)
        if args.onnx:
            config["onnx"] = export_onnx(tmp, config, sd, args.opset)
        if manifest:
            shutil.copyfile(manifest, os.path.join(tmp, os.path.basename(manifest)))
            config["provenance"]["data_manifest_included"] = True
        if evaluation is not None:
            config["provenance"]["evaluation"] = os.path.basename(args.evaluation)
        write_json(os.path.join(tmp, CONFIG), config)
        with open(os.path.join(tmp, CARD), "w", encoding="utf-8") as f:
            f.write(model_card(config, title, evaluation, args.license))
        load_checkpoint(tmp)  # read back as every script will read it: checksum, config against weights
    arch = config["architecture"]
    print(f"Wrote {args.folder}: {CONFIG}, {WEIGHTS} ({config['weights']['parameters'] / 1e6:.1f} M "
          f"parameters, {arch['kind']} {arch['model']}, {config['task']['type']}), {CARD}"
          + (f", {', '.join(r['file'] for r in config['onnx'].values())}" if args.onnx else "")
          + (f", {os.path.basename(manifest)}" if manifest else "") + ".")
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), export, return the exit status."""
    args = parse_args(argv)
    return run_main(main, args, None)  # a refused or failed export leaves nothing, so there is no status to say


if __name__ == "__main__":
    sys.exit(cli_main())
