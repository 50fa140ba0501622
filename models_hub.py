"""Model folders as models: load one in two lines, from a local folder or a Hugging Face hub repo id, offline.

    from models_hub import from_pretrained, load_input
    model, config = from_pretrained("path/to/folder")   # or "org/name" on a hub; HF_HUB_OFFLINE=1: its cache only
    x = load_input("scan.nii.gz", config)               # [1, C, D, H, W], preprocessed exactly as in training

The folder format is util/model_folder.py (config.json + model.safetensors + README.md, the hub's layout), read
through util.checkpoint.load_checkpoint like any checkpoint (checksummed, checked against its config). The model is
built from config.json alone and loaded strictly: a missing or unexpected key is named, never skipped.
`describe` writes the config.json of any checkpoint this repository reads (main_export.py).
"""
from __future__ import annotations

import os
import re

import torch

import models_mae3d  # noqa: F401 - registers the MAE factories
import models_vit3d  # noqa: F401 - registers the ViT factories
from models_build import build_model_from_meta, meta_from_weights
from util.errors import UserError
from util.model_folder import (CONFIG, FORMAT, FORMAT_VERSION, LIBRARY, WEIGHTS, ModelFolderError, content_sha256,
                               meta_of)
from util.nn.registry import create_model, entry, sibling
from util.task.meta import RunMeta
from util.task.record import CheckpointRecord, read_record
from util.version import version_record
from util.volume.preprocess import PREPROCESS_VERSION, PreprocessConfig

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # 'org/name', as the hub spells repo ids
META_FIELDS = ("model", "input_size", "patch_size", "in_chans", "nb_classes", "nb_outputs", "label_names",
               "label_columns", "global_pool", "linprobe", "mode", "task")  # held by config.json's own fields


# --- loading ---------------------------------------------------------------------------------------------------
def resolve(source, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None) -> str:
    """The local folder of `source`: itself when it is a folder, else the hub snapshot of repo id `source`
    (config.json and model.safetensors only) via huggingface_hub, which honours HF_HUB_OFFLINE=1 and
    `local_files_only` by reading its cache and never the network."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return source
    if not REPO_ID.match(source) or os.path.exists(source):
        raise UserError(f"{source} is neither a model folder nor a hub repo id ('org/name'); a model folder is "
                        f"what main_export.py writes.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    kw = dict(revision=revision, cache_dir=cache_dir, library_name=LIBRARY)
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    try:
        config = hf_hub_download(source, CONFIG, **kw)
        snapshot = os.path.dirname(config)  # .../snapshots/<commit>: the weights of that very commit
        hf_hub_download(source, WEIGHTS, **{**kw, "revision": os.path.basename(snapshot)})
    except LocalEntryNotFoundError:
        raise UserError(f"{source} is not a local folder and the hub repo {source} is not in the local cache "
                        f"({cache_dir or 'the default hub cache'}), and the network may not be used (offline: "
                        f"HF_HUB_OFFLINE=1 or local_files_only); download it where there is a network with "
                        f"`hf download {source} --local-dir DIR` and pass DIR.") from None
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise UserError(f"The hub repo {source} has no model folder ({type(e).__name__}: it needs {CONFIG} and "
                        f"{WEIGHTS}, as main_export.py writes them).") from None
    return snapshot


def from_pretrained(source, *, encoder_only: bool = False, revision: str | None = None, cache_dir=None,
                    local_files_only: bool | None = None, device="cpu"):
    """(model in eval mode, config dict) of a model folder or hub repo id.

    The model is what the folder holds: a MaskedAutoencoderViT3D (pretraining with its decoder), a
    VisionTransformer3D (an encoder, or a classifier / regressor with its head) or a UNETR3D (segmentation).
    encoder_only=True gives the headless VisionTransformer3D of any of them (`forward_features`: tokens
    [N, 1+L, E]; `forward`: pooled features), the decoder or head left out by name, not by a lenient load.
    """
    folder = resolve(source, revision, cache_dir, local_files_only)
    rec = read_record(folder)
    config = rec.folder_config
    model, sd = build(config, rec.weights, encoder_only, folder)
    load_strict(model, sd, folder)
    return model.to(device).eval(), config


def build(config: dict, sd: dict, encoder_only: bool = False, where: str = CONFIG) -> tuple[torch.nn.Module, dict]:
    """The (freshly initialised) model config.json describes, and the part of `sd` it must hold. Widths the weights
    cannot show (heads) must be the registry's for the named model, as every factory builds them."""
    arch = config["architecture"]
    size = entry(arch["model"]).size
    for field in ("embed_dim", "depth", "num_heads") + (("decoder_num_heads",) if arch["kind"] == "mae" else ()):
        if arch[field] != getattr(size, field):
            raise ModelFolderError(f"{where}: {CONFIG} says architecture.{field} = {arch[field]}, but "
                                   f"{arch['model']} has {getattr(size, field)}; the config contradicts its model.")
    if arch["kind"] == "mae" and not encoder_only:
        model = create_model(arch["model"], img_size=tuple(arch["input_size"]), patch_size=tuple(arch["patch_size"]),
                             in_chans=arch["in_chans"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                             num_heads=arch["num_heads"], decoder_embed_dim=arch["decoder_embed_dim"],
                             decoder_depth=arch["decoder_depth"], decoder_num_heads=arch["decoder_num_heads"],
                             mlp_ratio=arch["mlp_ratio"], norm_pix_loss=arch["norm_pix_loss"])
        return model, sd
    meta = RunMeta.from_dict(meta_of(config), where)
    widths = dict(embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
                  mlp_ratio=arch["mlp_ratio"], in_chans=arch["in_chans"])
    if not encoder_only:
        return build_model_from_meta(meta, **{k: v for k, v in widths.items() if k != "in_chans"}), sd
    if arch["kind"] == "unetr":  # its ViT: under encoder., class-token pooling with its final norm
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    elif arch["kind"] == "mae":
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    pool = "token" if arch["kind"] != "vit" else meta.global_pool
    encoder = create_model(meta.model if arch["kind"] != "mae" else sibling(arch["model"], "vit"),
                           img_size=tuple(arch["input_size"]), patch_size=tuple(arch["patch_size"]), num_classes=0,
                           global_pool=pool, **widths)
    return encoder, sd


def load_strict(model: torch.nn.Module, sd: dict, where: str) -> None:
    """load_state_dict(strict=True), refusing first with one sentence that names missing, unexpected and
    reshaped keys (at most three of each, and how many)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [f"{k} {tuple(sd[k].shape)} (the model: {tuple(own[k].shape)})" for k in own
                if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
             if keys]
    if parts:
        raise ModelFolderError(f"{where}: {WEIGHTS} does not fit the {type(model).__name__} its {CONFIG} describes: "
                               f"{'; '.join(parts)} keys.")
    model.load_state_dict(sd, strict=True)


def load_input(path, config: dict) -> torch.Tensor:
    """One volume read and preprocessed with the folder's preprocessing: float32 [1, C, D, H, W]. A model of several
    channels takes one path per channel in its order (config.json: preprocessing.channels), or one 4D file."""
    from util.volume.channels import ChannelSource, preprocess_channels
    from util.volume.preprocess import load_volume

    cfg = PreprocessConfig.from_dict(config["preprocessing"]["settings"])
    if cfg.roi:
        raise UserError(f"This model's rows are boxes around a point or a label (roi_mm {list(cfg.roi_mm)}): use "
                        f"main_predict.py with a table of points (coordX, coordY, coordZ) or masks.")
    if cfg.plain:
        return torch.from_numpy(load_volume(str(path), cfg))[None, None]
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    n = cfg.in_chans
    if len(paths) not in (1, n):
        raise UserError(f"This model reads {n} channels ({','.join(cfg.channel_names)}, in this order): give one "
                        f"path per channel, or one 4D file holding them in this order; got {len(paths)} paths.")
    sources = [ChannelSource(paths[0], k, n) for k in range(n)] if len(paths) == 1 and n > 1 else \
        [ChannelSource(p) for p in paths]
    return torch.from_numpy(preprocess_channels(sources, cfg)[0])[None]


# --- describing a checkpoint (main_export.py) --------------------------------------------------------------------
def describe(rec: CheckpointRecord, source: str, input_size=None, head_mode: str | None = None) -> dict:
    """config.json (without its 'weights' record) of a checkpoint's record: ours (pretraining, finetuning of every
    task), TANGERINE-shaped weights with or without the decoder, the original project's files, or a model folder
    (its sections kept, the repository version renewed)."""
    if rec.folder_config is not None:
        old = rec.folder_config
        prov = {**old["provenance"], "repository": version_record()}
        return {k: v for k, v in old.items() if k not in ("weights", "onnx")} | {"provenance": prov}
    sd = rec.weights
    if rec.meta is None and any(k.startswith("encoder.blocks.") for k in sd):
        raise UserError(f"{source} holds a segmentation model but no 'meta' saying its classes and sizes; only "
                        f"segmentation checkpoints written by main_finetune.py can be exported.")
    meta = rec.meta or meta_from_weights(rec, input_size, "token", head_mode)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "library_name": LIBRARY,
            "architecture": _architecture(meta, sd, rec.args),
            "preprocessing": _preprocessing(rec.preprocess, meta),
            "task": _task(meta, "checkpoint" if rec.meta is not None else "weights"),
            "provenance": _provenance(rec, source)}


def _architecture(meta: RunMeta, sd: dict, args: dict) -> dict:
    dense, encoder = meta.task.dense, "encoder." if meta.task.dense else ""
    patch, size = sd[encoder + "patch_embed.proj.weight"], entry(meta.model).size
    mae = "decoder_embed.weight" in sd and not dense
    arch = {"kind": "unetr" if dense else "mae" if mae else "vit",
            "model": sibling(meta.model, "mae") if mae else meta.model, "size": size.name,
            "embed_dim": size.embed_dim, "depth": size.depth, "num_heads": size.num_heads, "mlp_ratio": 4.0,
            "patch_size": list(meta.patch_size), "input_size": list(meta.input_size), "in_chans": int(patch.shape[1])}
    if mae:
        arch.update(decoder_embed_dim=int(sd["decoder_embed.weight"].shape[0]),
                    decoder_depth=len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}),
                    decoder_num_heads=size.decoder_num_heads, norm_pix_loss=bool(args.get("norm_pix_loss", False)))
    elif dense:
        arch.update(num_classes=meta.nb_classes, feature_size=meta.feature_size)
    else:
        arch.update(num_outputs=meta.nb_outputs, global_pool=meta.global_pool, linprobe_head=meta.linprobe)
    return arch


def _preprocessing(stored: PreprocessConfig | None, meta: RunMeta) -> dict:
    """The checkpoint's preprocessing, or for a file that stores none (TANGERINE, the original project's) the
    TANGERINE default at the model's input size, marked as such."""
    if stored is not None:
        out = {"origin": "checkpoint", "version": PREPROCESS_VERSION, "settings": stored.to_dict()}
        if not stored.plain:  # the channels in order, each with its column and normalisation, for a reader's eyes
            out["channels"] = [{"name": n, "column": col, "norm": k,
                                **({"window": list(stored.channel_window(c))} if k == "ct" else {})}
                               for c, (n, col, k) in enumerate(zip(stored.channel_names, stored.channel_columns,
                                                                   stored.norm))]
        return out
    return {"origin": "tangerine-default", "version": PREPROCESS_VERSION,
            "settings": PreprocessConfig(size=tuple(meta.input_size)).to_dict(),
            "note": "the checkpoint stored no preprocessing: TANGERINE's (the whole volume resampled to the input "
                    "size keeping its physical extent, B-spline, HU window [-1200, 800] scaled to [0, 1])"}


def _task(meta: RunMeta, origin: str) -> dict:
    task, record = meta.task, meta.to_dict()
    return {"origin": origin, "type": task.name, "family": task.family, "head_width": meta.nb_outputs,
            "classes": meta.nb_classes, "label_names": list(meta.label_names),
            "label_columns": list(meta.label_columns), "output_columns": meta.output_columns,
            "pooling": meta.global_pool, "linprobe": meta.linprobe, "headless": task.headless, "dense": task.dense,
            "multi_label": task.multi_label, "continuous": task.continuous,
            "extra": {k: v for k, v in record.items() if k not in META_FIELDS}}


def _provenance(rec: CheckpointRecord, source: str) -> dict:
    args = _public(rec.stored_args())
    manifest = rec.data_manifest
    return {"source_file": os.path.basename(os.path.normpath(source)), "source_sha256": content_sha256(source),
            "epochs_completed": _epochs_completed(rec), "recipe": _public(rec.recipe) if rec.recipe else None,
            "args": args, "data_manifest": manifest.name if manifest else None,
            "data_manifest_sha256": manifest.sha256 if manifest else None,
            "data_manifest_included": False, "repository": version_record(),
            "paths": "absolute paths of the training run are reduced to their file names"}


def _epochs_completed(rec: CheckpointRecord) -> int | None:
    """Whole epochs behind the weights: a checkpoint's 'epoch' is the last one finished, counted from 0 (one written
    inside an epoch, with 'progress', has finished the epochs before it)."""
    return None if rec.epoch is None else rec.epoch + (0 if rec.progress else 1)


def _public(value):
    """Plain data with every absolute path reduced to its file name: a shared folder does not tell where the
    training data was stored (names, digests and relative paths stay)."""
    if isinstance(value, dict):
        return {str(k): _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(os.path.normpath(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
