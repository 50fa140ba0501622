"""Downstream models built from what a checkpoint says about itself, so prediction needs nothing but the file.

Finetuned checkpoints of this repository carry `meta` (util.task.meta.RunMeta as a dict: task, model name, class
count, label names, sizes, pooling) and `preprocess`; this module is where every RunMeta is made. Checkpoints without `meta` are recognised from their weights: an MAE or ViT encoder
(ours or TANGERINE's, with or without the decoder) becomes a headless encoder for embeddings, and a ViT with a
`head` (the original project's finetuned classifier, e.g. best_model_loss.pth) becomes a classifier whose
outputs are read from the head (1 output: binary sigmoid; K outputs: softmax over K classes).
"""
from __future__ import annotations

import math

import torch

import models_mae3d
import models_vit3d
from models_mae3d import ENCODER_SIZES
from util.checkpoint import encoder_weights, load_checkpoint, state_dict_of
from util.errors import UserError
from util.task.meta import RunMeta
from util.task.tasks import EmbeddingTask, Task, head_task
from util.train.budget import Workload, workload_of
from util.triple import to_3tuple

_SIZES = {(e, d): name for name, (e, d, _) in ENCODER_SIZES.items()}  # (width, depth) -> size name


def training_meta(task: Task, args, label_names: list[str], nb_classes: int) -> RunMeta:
    """The RunMeta of a finetuning run: its task (classes resolved), flags and the training set's labels."""
    cols = list(args.label_columns or ["Label"])
    return RunMeta(task=task, model=args.model, input_size=args.input_size, patch_size=args.patch_size,
                   nb_classes=nb_classes, nb_outputs=task.nb_outputs(nb_classes, len(cols)),
                   label_names=label_names, label_columns=cols, global_pool=args.pool,
                   feature_size=args.feature_size, linprobe=bool(args.linprobe), in_chans=1)


def build_model_from_meta(meta: RunMeta | dict, drop_path: float = 0.0, **kw) -> torch.nn.Module:
    """A VisionTransformer3D (classification/regression/embeddings) or UNETR3D (segmentation) for `meta`.

    meta.linprobe gives the linear-probe head Sequential(BatchNorm1d(affine=False), Linear).
    """
    meta = RunMeta.from_dict(meta)
    name = meta.model.replace("mae_", "")
    if meta.task.dense:
        return models_vit3d.build_segmentation_model(name, num_classes=meta.nb_classes, img_size=meta.input_size,
                                                     patch_size=meta.patch_size, drop_path_rate=drop_path,
                                                     feature_size=meta.feature_size, **kw)
    model = models_vit3d.VIT_FACTORIES[name](img_size=meta.input_size, patch_size=meta.patch_size,
                                             num_classes=meta.nb_outputs, global_pool=meta.global_pool,
                                             drop_path_rate=drop_path, **kw)
    if meta.linprobe and meta.nb_outputs > 0:
        # MAE linear probe: a parameter-free BatchNorm in front of the linear head (keys head.0.*, head.1.*). The
        # encoder is frozen, so its features are stationary and the running statistics are their plain average
        # (momentum=None): with the default momentum the initial running_var of 1 still weighs 0.9**steps, which
        # after a few hundred steps is far above the variance of pooled ViT features (~1e-6 here) and squashes
        # every evaluation logit towards zero.
        bn = torch.nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6, momentum=None)
        model.head = torch.nn.Sequential(bn, model.head)
    return model


def _encoder_shape(sd: dict) -> tuple[int, int, tuple[int, ...]] | None:
    """(width, depth, patch size) of a ViT state dict, from its patch embedding and block keys; None if none."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 5:
        return None
    return int(w.shape[0]), len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), tuple(map(int, w.shape[2:]))


def encoder_meta_from_state_dict(sd: dict, input_size=None) -> dict:
    """The ViT size, patch size and input size of an MAE/ViT state dict without metadata (e.g. TANGERINE), or of
    the encoder of a segmentation checkpoint."""
    sd = encoder_weights(sd)
    if _encoder_shape(sd) is None or "pos_embed" not in sd:
        raise UserError("The checkpoint holds no ViT encoder (patch_embed.proj.weight / pos_embed are missing).")
    dim, depth, patch = _encoder_shape(sd)
    if (dim, depth) not in _SIZES:
        raise UserError(f"Unknown encoder: width {dim}, depth {depth}; expected one of {sorted(_SIZES)}.")
    if input_size is None:
        n = sd["pos_embed"].shape[1] - 1
        g = round(n ** (1 / 3))
        if g ** 3 != n:
            raise UserError(f"The checkpoint's grid of {n} patches is not cubic; pass --input_size D H W.")
        input_size = tuple(g * p for p in patch)
    return {"model": f"vit_{_SIZES[(dim, depth)]}_patch16", "input_size": list(to_3tuple(input_size, "input_size")),
            "patch_size": list(patch)}


def meta_from_weights(ckpt: dict, input_size=None, global_pool: str = "token", head_mode: str | None = None) -> RunMeta:
    """The RunMeta of a checkpoint that has none: an embedding encoder, or a classifier when its weights hold a head.

    input_size: what to run at (default: the checkpoint's args['input_size'], else inferred from pos_embed).
    global_pool: pooling of a headless encoder; a classifier's pooling is read from its fc_norm / head width.
    head_mode: 'binary' / 'multiclass' / 'multilabel' / 'regression' for a head without metadata (default:
    binary for 1 output, multiclass for more).
    """
    sd = state_dict_of(ckpt)
    size = input_size or (ckpt.get("args") or {}).get("input_size")
    meta = encoder_meta_from_state_dict(sd, size)
    head = sd.get("head.weight", sd.get("head.1.weight"))
    if head is None or head.ndim != 2:
        return RunMeta(task=EmbeddingTask(), nb_outputs=0, nb_classes=0, global_pool=global_pool, **meta)
    k, width = int(head.shape[0]), int(head.shape[1])
    dim = sd["patch_embed.proj.weight"].shape[0]
    pool = "cat" if width == 2 * dim else ("avg" if "fc_norm.weight" in sd else "token")
    task = head_task(k, head_mode)
    nb_classes = task.classes_of_head(k)
    return RunMeta(task=task, nb_outputs=k, nb_classes=nb_classes, label_names=[str(c) for c in range(nb_classes)],
                   global_pool=pool, linprobe="head.1.weight" in sd, **meta)


def model_from_checkpoint(ckpt: dict, meta: RunMeta) -> torch.nn.Module:
    """The finetuned model `meta` describes, with the checkpoint's weights (strict)."""
    model = build_model_from_meta(meta)
    model.load_state_dict(state_dict_of(ckpt))
    return model


def load_for_inference(path: str, device="cpu", input_size=None, global_pool=None, head_mode=None):
    """Load any checkpoint for prediction. Returns (model in eval mode, RunMeta, preprocess dict or None).

    Finetuned checkpoints rebuild their exact model; checkpoints without metadata are recognised from their
    weights (see `meta_from_weights`); a headless encoder's task is headless (embeddings only).
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("meta") is not None:
        meta = RunMeta.from_dict(ckpt["meta"], path)
        return model_from_checkpoint(ckpt, meta).to(device).eval(), meta, ckpt.get("preprocess")
    meta = meta_from_weights(ckpt, input_size, global_pool or "avg", head_mode)
    model = build_model_from_meta(meta)
    if meta.task.headless:
        models_vit3d.load_pretrained_encoder(model, ckpt, verbose=False)
    else:
        sd, own = state_dict_of(ckpt), model.state_dict()
        missing = [k for k in own if k not in sd and k != "pos_embed"]
        if missing:
            raise UserError(f"Checkpoint {path} lacks {missing[0]!r} of the {meta.model} classifier it "
                             f"looks like ({len(missing)} tensors missing).")
        keep_pos = "pos_embed" in sd and sd["pos_embed"].shape == own["pos_embed"].shape  # finetuned table
        model.load_state_dict({k: v for k, v in sd.items() if k in own and (k != "pos_embed" or keep_pos)},
                              strict=False)
        if not keep_pos:
            model.reset_pos_embed()
    return model.to(device).eval(), meta, ckpt.get("preprocess")


PREPROCESS_ADOPTED = ("orientation", "spacing", "window", "interpolator")  # ROI settings belong to the table


def adopt_encoder_sizes(args) -> None:
    """--finetune: take from the checkpoint what the encoder was pretrained with, unless the user typed it
    (args.explicit): its size (--model) and --patch_size from its weights; --input_size from its stored
    preprocessing or args (else from a cubic positional table); --orientation, --spacing, --window and
    --interpolator from its stored preprocessing. One line says what it took. A file without a known encoder is
    left to the loader, whose sentence says what it lacks."""
    ckpt = load_checkpoint(args.finetune)
    sd = encoder_weights(ckpt)
    shape = _encoder_shape(sd)
    if shape is None:
        return
    size, patch = _SIZES.get(shape[:2]), shape[2]
    taken = []
    if "model" not in args.explicit and size and args.model != f"vit_{size}_patch16":
        args.model = f"vit_{size}_patch16"
        taken.append(f"--model {args.model}")
    if "patch_size" not in args.explicit and patch != tuple(to_3tuple(args.patch_size)):
        args.patch_size = patch
        taken.append(f"--patch_size {' '.join(map(str, patch))}")
    pre = ckpt.get("preprocess") if isinstance(ckpt.get("preprocess"), dict) else {}
    trained_at = pre.get("size") or (ckpt.get("args") or {}).get("input_size") or _cubic_input(sd, patch)
    if trained_at and "input_size" not in args.explicit:
        trained_at = list(to_3tuple(trained_at, "input_size"))
        if trained_at != list(to_3tuple(args.input_size)):
            args.input_size = trained_at
            taken.append(f"--input_size {' '.join(map(str, trained_at))}")
    for key in PREPROCESS_ADOPTED:
        if key in pre and key not in args.explicit and _same(pre[key]) != _same(getattr(args, key, None)):
            setattr(args, key, pre[key])
            taken.append(f"--{key} {' '.join(map(str, pre[key])) if isinstance(pre[key], list) else pre[key]}")
    if taken:
        print(f"--finetune {args.finetune}: its encoder sets {', '.join(taken)} (type the flag to choose another).")


def _same(value):
    """A flag's value comparable with the stored one (tuples and lists alike, numbers as floats)."""
    if isinstance(value, (list, tuple)):
        return tuple(float(v) if isinstance(v, (int, float)) else v for v in value)
    return value


def _cubic_input(sd: dict, patch) -> list[int] | None:
    """The input size of a positional table with a cubic grid of patches (TANGERINE: 4096 = 16^3), else None."""
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    n = int(pos.shape[1]) - 1
    g = round(n ** (1 / 3))
    return [g * p for p in patch] if g ** 3 == n and n > 0 else None


def _decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def load_mae_init(model, ckpt: dict, name: str) -> dict[str, list[str]]:
    """Continued pretraining (main_pretrain.py --init): the weights of any MAE or ViT checkpoint into the
    MaskedAutoencoderViT3D `model`, whatever its input size. The encoder must be the model's (width, depth, patch;
    another size is refused naming the right --model); the decoder is loaded when the file has one that fits,
    else it keeps its fresh initialisation (said in one line). The fixed sin-cos tables are never copied: the
    model's own are those of its grid. Prints what was loaded, dropped and initialised; returns those key lists."""
    sd = encoder_weights(ckpt)
    shape = _encoder_shape(sd)
    if shape is None or not any(k.startswith("blocks.") for k in sd):
        raise UserError(f"--init {name} holds no MAE or ViT encoder (patch_embed.proj.weight or blocks.* are "
                        f"missing); expected a pretraining checkpoint such as mae_pretrained.pth.")
    own = model.state_dict()
    width, depth = int(own["cls_token"].shape[-1]), len(model.blocks)
    if shape[:2] != (width, depth):
        size = _SIZES.get(shape[:2])
        hint = f"pass --model mae_vit_{size}_patch16" if size else "no model of this repository has that size"
        raise UserError(f"--init {name} holds a {shape[0]} x {shape[1]} encoder (width x depth), --model a {width} "
                        f"x {depth} one; {hint}.")
    if shape[2] != tuple(model.patch_size):
        raise UserError(f"--init {name} has patches of {shape[2]} voxels, the model {tuple(model.patch_size)}; pass "
                        f"--patch_size {' '.join(map(str, shape[2]))}.")
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


def _what(args, extra: str = "") -> str:
    return (f"{args.model}{extra}, {'x'.join(map(str, args.input_size))} in {'x'.join(map(str, args.patch_size))} "
            f"patches, batch {args.batch_size}, {args.precision}"
            f"{', grad checkpointing' if args.grad_checkpointing else ''}")


def pretrain_workload(args) -> tuple[Workload, str]:
    """What a pretraining step of args.model runs (util.train.budget), from the model built on the meta device
    (shapes only, no memory): the encoder on the kept tokens, the decoder on all of them."""
    with torch.device("meta"):
        mae = models_mae3d.MODEL_FACTORIES[args.model](img_size=tuple(args.input_size),
                                                        patch_size=tuple(args.patch_size))
    n = mae.patch_embed.num_patches
    kept = max(int(n * (1 - args.mask_ratio)), 1) + 1
    width, dec, voxels = mae.cls_token.shape[-1], mae.mask_token.shape[-1], math.prod(args.patch_size)
    blocks = [(kept, width, True)] * len(mae.blocks) + [(n + 1, dec, True)] * len(mae.decoder_blocks)
    heads = 2 * (kept * voxels * width + kept * width * dec + (n + 1) * dec * voxels)  # embed, decoder in and out
    return workload_of(mae, blocks, math.prod(args.input_size), head_flops=heads), _what(args)


def finetune_workload(args, dense: bool) -> tuple[Workload, str]:
    """What a finetuning step runs: the ViT on every token (frozen for --linprobe: no activations kept, LARS),
    and for segmentation UNETR's full-resolution feature maps."""
    with torch.device("meta"):
        if dense:
            model = models_vit3d.build_segmentation_model(args.model, num_classes=2, img_size=args.input_size,
                                                          patch_size=args.patch_size, feature_size=args.feature_size)
        else:
            model = models_vit3d.VIT_FACTORIES[args.model](img_size=args.input_size, patch_size=args.patch_size,
                                                           num_classes=2)
    vit = models_vit3d.backbone(model)
    if args.linprobe:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    tokens, width = vit.patch_embed.num_patches + 1, vit.cls_token.shape[-1]
    blocks = [(tokens, width, not args.linprobe)] * len(vit.blocks)
    work = workload_of(model, blocks, math.prod(args.input_size), dense_maps=4 * args.feature_size if dense else 0,
                       optimizer="lars" if args.linprobe else "adamw",
                       head_flops=2 * tokens * math.prod(args.patch_size) * width)
    return work, _what(args, ", linear probe" if args.linprobe else "")
