"""Downstream models built from what a checkpoint says about itself, so prediction needs nothing but the file.

Finetuned checkpoints of this repository carry `meta` (util.task.meta.RunMeta: task, model name, class count,
label names, sizes, pooling) and `preprocess`; this module is where every RunMeta is made. Checkpoints without
`meta` are recognised from their weights: an MAE or ViT encoder (ours or TANGERINE's, with or without the decoder)
becomes a headless encoder for embeddings, and a ViT with a `head` (the original project's finetuned classifier,
e.g. best_model_loss.pth) becomes a classifier whose outputs are read from the head (1 output: binary sigmoid; K
outputs: softmax over K classes). Every function takes a checkpoint's CheckpointRecord (util.task.record), read
once by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import models_mae3d  # noqa: F401  (registers the MAE factories)
import models_vit3d
from util.errors import UserError
from util.nn.channel_carry import carry_channels
from util.nn.registry import ModelSpec, create_model, size_of
from util.task.meta import RunMeta
from util.task.record import CheckpointRecord
from util.task.tasks import EmbeddingTask, Task, head_task
from util.train.budget import Workload, workload_of
from util.train.settings import RunOptions, TrainSettings
from util.triple import to_3tuple
from util.volume.preprocess import PreprocessConfig


def training_meta(task: Task, spec: ModelSpec, label_names: list[str], label_columns: list[str], nb_classes: int,
                  pool: str, feature_size: int, linprobe: bool) -> RunMeta:
    """The RunMeta of a finetuning run: its task (classes resolved), model and the training set's labels."""
    return RunMeta(task=task, model=spec.name, input_size=spec.input_size, patch_size=spec.patch_size,
                   nb_classes=nb_classes, nb_outputs=task.nb_outputs(nb_classes, len(label_columns)),
                   label_names=label_names, label_columns=label_columns, global_pool=pool,
                   feature_size=feature_size, linprobe=bool(linprobe), in_chans=spec.in_chans)


def build_model_from_meta(meta: RunMeta, drop_path: float = 0.0, **kw) -> torch.nn.Module:
    """A VisionTransformer3D (classification/regression/embeddings) or UNETR3D (segmentation) for `meta`.

    meta.linprobe gives the linear-probe head Sequential(BatchNorm1d(affine=False), Linear).
    """
    if meta.task.dense:
        return models_vit3d.build_segmentation_model(meta.model, num_classes=meta.nb_classes, img_size=meta.input_size,
                                                     patch_size=meta.patch_size, drop_path_rate=drop_path,
                                                     feature_size=meta.feature_size, in_chans=meta.in_chans, **kw)
    model = create_model(meta.model, img_size=meta.input_size, patch_size=meta.patch_size, in_chans=meta.in_chans,
                         num_classes=meta.nb_outputs, global_pool=meta.global_pool, drop_path_rate=drop_path, **kw)
    if meta.linprobe and meta.nb_outputs > 0:
        # MAE linear probe: a parameter-free BatchNorm in front of the linear head (keys head.0.*, head.1.*). The
        # encoder is frozen, so its features are stationary and the running statistics are their plain average
        # (momentum=None): with the default momentum the initial running_var of 1 still weighs 0.9**steps, which
        # after a few hundred steps is far above the variance of pooled ViT features (~1e-6 here) and squashes
        # every evaluation logit towards zero.
        bn = torch.nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6, momentum=None)
        model.head = torch.nn.Sequential(bn, model.head)
    return model


@dataclass(frozen=True)
class EncoderShape:
    """What an encoder's weights say about it: width, depth, patch size (D, H, W) and input channels."""
    width: int
    depth: int
    patch: tuple[int, int, int]
    in_chans: int

    @property
    def vit(self) -> str | None:
        """The registry's encoder of this width and depth (None: no model here has that size)."""
        size = size_of(self.width, self.depth)
        return f"vit_{size.name}_patch16" if size else None


def encoder_shape(sd: dict) -> EncoderShape | None:
    """The EncoderShape of a ViT state dict, from its patch embedding and block keys; None if it holds none."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 5:
        return None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return EncoderShape(int(w.shape[0]), depth, tuple(map(int, w.shape[2:])), int(w.shape[1]))


def _cubic_input(sd: dict, patch) -> tuple[int, int, int] | None:
    """The input size of a positional table with a cubic grid of patches (TANGERINE: 4096 = 16^3), else None."""
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    n = int(pos.shape[1]) - 1
    g = round(n ** (1 / 3))
    return tuple(g * p for p in patch) if g ** 3 == n and n > 0 else None


def encoder_spec(rec: CheckpointRecord, input_size=None) -> ModelSpec:
    """The ViT (model, input size, patch size, channels) of an MAE/ViT checkpoint without metadata (e.g. TANGERINE),
    or of the encoder of a segmentation checkpoint; the input size is `input_size`, else the one it was trained at
    (its preprocessing or flags), else that of a cubic positional table."""
    sd = rec.encoder_weights()
    shape = encoder_shape(sd)
    if shape is None or "pos_embed" not in sd:
        raise UserError(f"{rec.source} holds no ViT encoder (patch_embed.proj.weight / pos_embed are missing).")
    if shape.vit is None:
        raise UserError(f"{rec.source}: unknown encoder of width {shape.width} and depth {shape.depth}; no model of "
                        f"this repository has that size.")
    size = input_size or rec.trained_input_size or _cubic_input(sd, shape.patch)
    if size is None:
        n = sd["pos_embed"].shape[1] - 1
        raise UserError(f"{rec.source}: its grid of {n} patches is not cubic; pass --input_size D H W.")
    return ModelSpec(shape.vit, to_3tuple(size, "--input_size"), shape.patch, shape.in_chans)


def meta_from_weights(rec: CheckpointRecord, input_size=None, global_pool: str = "token",
                      head_mode: str | None = None) -> RunMeta:
    """The RunMeta of a checkpoint that has none: an embedding encoder, or a classifier when its weights hold a head.

    input_size: what to run at (default: what it was trained at, else inferred from pos_embed).
    global_pool: pooling of a headless encoder; a classifier's pooling is read from its fc_norm / head width.
    head_mode: 'binary' / 'multiclass' / 'multilabel' / 'regression' for a head without metadata (default:
    binary for 1 output, multiclass for more).
    """
    sd, spec = rec.weights, encoder_spec(rec, input_size)
    arch = dict(model=spec.name, input_size=spec.input_size, patch_size=spec.patch_size, in_chans=spec.in_chans)
    head = sd.get("head.weight", sd.get("head.1.weight"))
    if head is None or head.ndim != 2:
        return RunMeta(task=EmbeddingTask(), nb_outputs=0, nb_classes=0, global_pool=global_pool, **arch)
    k, width = int(head.shape[0]), int(head.shape[1])
    dim = sd["patch_embed.proj.weight"].shape[0]
    pool = "cat" if width == 2 * dim else ("avg" if "fc_norm.weight" in sd else "token")
    task = head_task(k, head_mode)
    nb_classes = task.classes_of_head(k)
    return RunMeta(task=task, nb_outputs=k, nb_classes=nb_classes, label_names=[str(c) for c in range(nb_classes)],
                   global_pool=pool, linprobe="head.1.weight" in sd, **arch)


def model_from_record(rec: CheckpointRecord, meta: RunMeta) -> torch.nn.Module:
    """The finetuned model `meta` describes, with the checkpoint's weights (strict)."""
    model = build_model_from_meta(meta)
    model.load_state_dict(rec.weights)
    return model


def load_for_inference(rec: CheckpointRecord, device="cpu", input_size=None, global_pool=None, head_mode=None):
    """Any checkpoint, ready for prediction: (model in eval mode, RunMeta, its PreprocessConfig or None).

    Finetuned checkpoints rebuild their exact model; checkpoints without metadata are recognised from their
    weights (see `meta_from_weights`); a headless encoder's task is headless (embeddings only).
    """
    if rec.meta is not None:
        return model_from_record(rec, rec.meta).to(device).eval(), rec.meta, rec.preprocess
    meta = meta_from_weights(rec, input_size, global_pool or "avg", head_mode)
    model = build_model_from_meta(meta)
    if meta.task.headless:
        models_vit3d.load_pretrained_encoder(model, rec, verbose=False)
    else:
        sd, own = rec.weights, model.state_dict()
        missing = [k for k in own if k not in sd and k != "pos_embed"]
        if missing:
            raise UserError(f"Checkpoint {rec.source} lacks {missing[0]!r} of the {meta.model} classifier it "
                            f"looks like ({len(missing)} tensors missing).")
        keep_pos = "pos_embed" in sd and sd["pos_embed"].shape == own["pos_embed"].shape  # finetuned table
        model.load_state_dict({k: v for k, v in sd.items() if k in own and (k != "pos_embed" or keep_pos)},
                              strict=False)
        if not keep_pos:
            model.reset_pos_embed()
    return model.to(device).eval(), meta, rec.preprocess


def finetune_model(meta: RunMeta, init: CheckpointRecord | None, source: str | None, drop_path: float = 0.0,
                   linprobe: bool = False, grad_checkpointing: bool = False, compile: bool = False,
                   device: str = "cpu", channel_init: str = "replicate") -> torch.nn.Module:
    """The model a finetuning run trains: built for `meta`, its encoder loaded from `init` (the --finetune record,
    `source` naming it; None: random weights), the head initialised (MAE: trunc-normal, std 2e-5; linear probe:
    0.01), the encoder frozen for a linear probe; on `device`, per-block compiled when asked. A 1-channel encoder
    into a model of C channels: util.nn.channel_carry (`channel_init`)."""
    model = build_model_from_meta(meta, drop_path=drop_path)
    vit = models_vit3d.backbone(model)
    if init is not None:
        try:
            info = models_vit3d.load_pretrained_encoder(vit, init, verbose=True, channel_init=channel_init,
                                                        flag=f"--finetune {source}")
        except ValueError as e:
            msg = str(e)
            raise UserError(msg if source in msg else f"--finetune {source}: {msg}") from None
        if not info["loaded"]:
            raise UserError(f"--finetune {source} holds no weights of the {meta.model} encoder.")
        print(f"Loaded {len(info['loaded'])} tensors from {source}.")
    if not meta.task.dense:  # UNETR's output convolution keeps its own initialisation
        head = model.head[-1] if linprobe else model.head
        torch.nn.init.trunc_normal_(head.weight, std=0.01 if linprobe else 2e-5)
        torch.nn.init.zeros_(head.bias)
    if linprobe:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    if grad_checkpointing:
        vit.set_grad_checkpointing(True)
    model.to(device)
    if compile:  # blocks differ in drop-path rate (and train/eval), so each compiles its own graphs
        dyn = torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, name, max(getattr(dyn, name), 4 * len(vit.blocks)))
        for blk in vit.blocks:
            blk.compile(dynamic=False)  # static shapes: one graph per (block, sequence length)
    return model


PREPROCESS_ADOPTED = ("orientation", "spacing", "window", "interpolator")  # ROI settings belong to the table


def adopt_encoder(rec: CheckpointRecord, spec: ModelSpec, preprocess: PreprocessConfig, typed: frozenset,
                  name: str) -> tuple[ModelSpec, PreprocessConfig]:
    """--finetune: what the encoder was pretrained with, unless the user typed it: its size (--model) and
    --patch_size from its weights; --input_size from its stored preprocessing or flags (else from a cubic
    positional table); --orientation, --spacing, --window and --interpolator from its stored preprocessing. One
    line says what it took. A file without a known encoder is left to the loader, whose sentence says what it
    lacks. Returns the run's model spec and preprocessing."""
    sd = rec.encoder_weights()
    shape = encoder_shape(sd)
    if shape is None:
        return spec, preprocess
    taken, model, patch, size = [], spec.name, spec.patch_size, spec.input_size
    if "model" not in typed and shape.vit and model != shape.vit:
        model = shape.vit
        taken.append(f"--model {model}")
    if "patch_size" not in typed and shape.patch != patch:
        patch = shape.patch
        taken.append(f"--patch_size {' '.join(map(str, patch))}")
    trained_at = rec.trained_input_size or _cubic_input(sd, shape.patch)
    if trained_at and "input_size" not in typed and to_3tuple(trained_at) != size:
        size = to_3tuple(trained_at)
        taken.append(f"--input_size {' '.join(map(str, size))}")
    changes = {}
    if rec.preprocess is not None:
        for key in PREPROCESS_ADOPTED:
            value = getattr(rec.preprocess, key)
            if key not in typed and value != getattr(preprocess, key):
                changes[key] = value
                taken.append(f"--{key} {' '.join(map(str, value)) if isinstance(value, tuple) else value}")
        changes.update(_adopted_channels(rec.preprocess, preprocess, typed, taken))
    if taken:
        print(f"--finetune {name}: its encoder sets {', '.join(taken)} (type the flag to choose another).")
    cfg = preprocess.with_overrides(size=size, **changes)
    return ModelSpec(model, size, patch, cfg.in_chans), cfg


def _adopted_channels(enc: PreprocessConfig, run: PreprocessConfig, typed: frozenset, taken: list) -> dict:
    """An encoder of several channels (or of another normalisation) sets --channels, --norm and its windows where
    the user typed none of them (a 1-channel CT encoder leaves the run's channels alone: it is carried into them)."""
    same = "channels" in typed and run.channel_names == enc.channel_names  # typed, as the encoder's: its norm too
    if enc.plain or ("channels" in typed and not same):
        return {}
    out = {} if same else {"channels": enc.channels}
    if "norm" not in typed:
        out["norm"] = enc.norm
    if "window" not in typed:
        out.update(window=enc.window, windows=enc.windows)
    said = ([] if same else [f"--channels {','.join(enc.channels)}"]) + \
        ([f"--norm {','.join(enc.norm)}"] if "norm" in out else [])
    taken.extend([" ".join(said)] if said else [])
    return out


def _decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def load_mae_init(model, rec: CheckpointRecord, name: str, channel_init: str = "replicate") -> dict[str, list[str]]:
    """Continued pretraining (main_pretrain.py --init): the weights of any MAE or ViT checkpoint into the
    MaskedAutoencoderViT3D `model`, whatever its input size. The encoder must be the model's (width, depth, patch;
    another size is refused naming the right --model); the decoder is loaded when the file has one that fits,
    else it keeps its fresh initialisation (said in one line). The fixed sin-cos tables are never copied: the
    model's own are those of its grid. A 1-channel file into a model of C channels: util.nn.channel_carry
    (`channel_init`). Prints what was loaded, dropped and initialised; returns those key lists."""
    sd = rec.encoder_weights()
    shape = encoder_shape(sd)
    if shape is None or not any(k.startswith("blocks.") for k in sd):
        raise UserError(f"--init {name} holds no MAE or ViT encoder (patch_embed.proj.weight or blocks.* are "
                        f"missing); expected a pretraining checkpoint such as mae_pretrained.pth.")
    own = model.state_dict()
    width, depth = int(own["cls_token"].shape[-1]), len(model.blocks)
    if (shape.width, shape.depth) != (width, depth):
        size = size_of(shape.width, shape.depth)
        hint = f"pass --model mae_vit_{size.name}_patch16" if size else "no model of this repository has that size"
        raise UserError(f"--init {name} holds a {shape.width} x {shape.depth} encoder (width x depth), --model a "
                        f"{width} x {depth} one; {hint}.")
    if shape.patch != tuple(model.patch_size):
        raise UserError(f"--init {name} has patches of {shape.patch} voxels, the model {tuple(model.patch_size)}; "
                        f"pass --patch_size {' '.join(map(str, shape.patch))}.")
    sd, carried = carry_channels(sd, model, channel_init, f"--init {name}")
    if carried:
        print(carried)
    tables = ("pos_embed", "decoder_pos_embed")
    to_load, initialised = {}, []
    for key in (k for k in own if not _decoder_key(k) and k not in tables):
        if key not in sd and key.startswith("norm."):  # a ViT finetuned with 'avg' pooling has no final norm
            initialised.append(key)
        elif key not in sd:
            raise UserError(f"--init {name} lacks the encoder tensor {key!r} of the model (another architecture).")
        elif tuple(sd[key].shape) != tuple(own[key].shape):
            raise UserError(f"--init {name}: {key!r} has shape {tuple(sd[key].shape)}, the model "
                            f"{tuple(own[key].shape)} (check --model, --patch_size and the channels).")
        else:
            to_load[key] = sd[key]
    decoder = [k for k in own if _decoder_key(k) and k not in tables]
    unfit = [k for k in decoder if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    if not unfit:
        to_load.update({k: sd[k] for k in decoder})
    elif not any(_decoder_key(k) and k not in tables for k in sd):
        print(f"--init {name} holds an encoder only: the decoder ({len(decoder)} tensors) is freshly initialised.")
    else:
        k = unfit[0]
        why = f"{k!r} has shape {tuple(sd[k].shape)}, the model {tuple(own[k].shape)}" if k in sd else f"no {k!r}"
        print(f"--init {name}: its decoder does not fit the model's ({why}): the decoder ({len(decoder)} tensors) "
              f"is freshly initialised.")
    model.load_state_dict(to_load, strict=False)
    dropped = [k for k in sd if k not in to_load]
    print(f"--init {name}: loaded {len(to_load)} tensors; pos_embed and decoder_pos_embed regenerated for grid "
          f"{tuple(model.grid_size)}")
    decoder_dropped = [k for k in dropped if _decoder_key(k) and k not in tables]
    print(f"  dropped ({len(dropped)}): {[k for k in dropped if k not in decoder_dropped]}"
          + (f" + {len(decoder_dropped)} decoder keys" if decoder_dropped else ""))
    print(f"  missing, freshly initialised ({len(initialised) + (len(decoder) if unfit else 0)}): {initialised}"
          + (f" + the decoder's {len(decoder)} tensors" if unfit else ""))
    return {"loaded": list(to_load), "dropped": dropped, "missing": initialised + (decoder if unfit else [])}


def describe_step(spec: ModelSpec, train: TrainSettings, run: RunOptions, extra: str = "") -> str:
    """'model, DxHxW in patches, batch, precision[, grad checkpointing]' for the cost line of util.train.budget."""
    return (f"{spec.name}{extra}, {'x'.join(map(str, spec.input_size))} in {'x'.join(map(str, spec.patch_size))} "
            f"patches, batch {train.batch_size}, {train.precision}"
            f"{', grad checkpointing' if run.grad_checkpointing else ''}")


def pretrain_workload(spec: ModelSpec, mask_ratio: float) -> Workload:
    """What a pretraining step of `spec` runs (util.train.budget), from the model built on the meta device (shapes
    only, no memory): the encoder on the kept tokens, the decoder on all of them."""
    with torch.device("meta"):
        mae = create_model(spec.name, **spec.kwargs())
    n = mae.patch_embed.num_patches
    kept = max(int(n * (1 - mask_ratio)), 1) + 1
    width, dec = mae.cls_token.shape[-1], mae.mask_token.shape[-1]
    voxels = math.prod(spec.patch_size) * spec.in_chans
    blocks = [(kept, width, True)] * len(mae.blocks) + [(n + 1, dec, True)] * len(mae.decoder_blocks)
    heads = 2 * (kept * voxels * width + kept * width * dec + (n + 1) * dec * voxels)  # embed, decoder in and out
    return workload_of(mae, blocks, math.prod(spec.input_size) * spec.in_chans, head_flops=heads)


def finetune_workload(spec: ModelSpec, dense: bool, linprobe: bool, feature_size: int) -> Workload:
    """What a finetuning step runs: the ViT on every token (frozen for --linprobe: no activations kept, LARS),
    and for segmentation UNETR's full-resolution feature maps."""
    with torch.device("meta"):
        if dense:
            model = models_vit3d.build_segmentation_model(spec.name, num_classes=2, img_size=spec.input_size,
                                                          patch_size=spec.patch_size, feature_size=feature_size,
                                                          in_chans=spec.in_chans)
        else:
            model = create_model(spec.name, **spec.kwargs(), num_classes=2)
    vit = models_vit3d.backbone(model)
    if linprobe:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    tokens, width = vit.patch_embed.num_patches + 1, vit.cls_token.shape[-1]
    blocks = [(tokens, width, not linprobe)] * len(vit.blocks)
    return workload_of(model, blocks, math.prod(spec.input_size) * spec.in_chans,
                       dense_maps=4 * feature_size if dense else 0, optimizer="lars" if linprobe else "adamw",
                       head_flops=2 * tokens * math.prod(spec.patch_size) * spec.in_chans * width)
