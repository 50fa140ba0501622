"""Build downstream models from the metadata stored in checkpoints, so prediction needs nothing but the file.

Every finetuned checkpoint carries `meta` (task, mode, model name, class count, label names, sizes, pooling) and
`preprocess` (the PreprocessConfig dict). Pretraining checkpoints (ours or TANGERINE's) are recognised from their
keys and turned into a headless encoder for embeddings.
"""
from __future__ import annotations

import torch

import models_vit3d
from models_mae3d import ENCODER_SIZES
from util.checkpoint import clean_state_dict, load_checkpoint

MODES = ("binary", "multiclass", "multilabel", "regression", "segmentation")
_SIZES = {(e, d): name for name, (e, d, _) in ENCODER_SIZES.items()}  # (width, depth) -> size name


def build_model_from_meta(meta: dict, drop_path: float = 0.0, **kw) -> torch.nn.Module:
    """A VisionTransformer3D (classification/regression/embeddings) or UNETR3D (segmentation) for `meta`.

    meta['linprobe'] = True gives the linear-probe head Sequential(BatchNorm1d(affine=False), Linear).
    """
    name = meta["model"].replace("mae_", "")
    img_size, patch_size = tuple(meta["input_size"]), tuple(meta["patch_size"])
    if meta["mode"] == "segmentation":
        return models_vit3d.build_segmentation_model(name, num_classes=meta["nb_classes"], img_size=img_size,
                                                     patch_size=patch_size, drop_path_rate=drop_path,
                                                     feature_size=meta.get("feature_size", 16), **kw)
    model = models_vit3d.VIT_FACTORIES[name](img_size=img_size, patch_size=patch_size, num_classes=meta["nb_outputs"],
                                             global_pool=meta.get("global_pool", "avg"), drop_path_rate=drop_path, **kw)
    if meta.get("linprobe") and meta["nb_outputs"] > 0:
        # MAE linear probe: a parameter-free BatchNorm in front of the linear head (keys head.0.*, head.1.*)
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), model.head)
    return model


def encoder_meta_from_state_dict(sd: dict, input_size=None) -> dict:
    """Infer the ViT size, patch size and input size of an MAE/ViT state dict without args (e.g. TANGERINE)."""
    sd = clean_state_dict(sd)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("The checkpoint holds no ViT encoder (patch_embed.proj.weight / pos_embed are missing).")
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], tuple(w.shape[2:])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if (dim, depth) not in _SIZES:
        raise ValueError(f"Unknown encoder: width {dim}, depth {depth}; expected one of {sorted(_SIZES)}.")
    if input_size is None:
        n = sd["pos_embed"].shape[1] - 1
        g = round(n ** (1 / 3))
        if g ** 3 != n:
            raise ValueError(f"The checkpoint's grid of {n} patches is not cubic; pass --input_size D H W.")
        input_size = tuple(g * p for p in patch)
    return {"model": f"vit_{_SIZES[(dim, depth)]}_patch16", "input_size": list(input_size),
            "patch_size": list(patch)}


def load_for_inference(path: str, device="cpu", input_size=None, global_pool=None):
    """Load any checkpoint for prediction. Returns (model in eval mode, meta, preprocess dict or None).

    Finetuned checkpoints rebuild their exact model; pretraining ones give a headless encoder (meta['mode'] is
    'embedding') that `main_predict.py` uses for embeddings only.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta")
    if meta is None:  # pretraining checkpoint: encoder only
        saved = ckpt.get("args") or {}
        size = input_size or saved.get("input_size")
        meta = encoder_meta_from_state_dict(ckpt, size)
        meta.update(mode="embedding", task="embedding", nb_outputs=0, nb_classes=0, label_names=[],
                    global_pool=global_pool or "avg")
        model = build_model_from_meta(meta)
        models_vit3d.load_pretrained_encoder(model, ckpt, verbose=False)
    else:
        model = build_model_from_meta(meta)
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model.to(device).eval(), meta, ckpt.get("preprocess")


def logits_to_probs(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-class probabilities [N, K] from logits: softmax (multiclass), sigmoid (binary/multilabel).

    Binary heads have one logit; the result has two columns (P(0), P(1)). Regression returns the values.
    """
    logits = logits.float()
    if mode == "multiclass":
        return logits.softmax(-1)
    if mode == "binary":
        p = torch.sigmoid(logits.reshape(-1, 1))
        return torch.cat([1 - p, p], dim=1)
    if mode == "multilabel":
        return torch.sigmoid(logits)
    return logits


def nb_outputs(mode: str, nb_classes: int, n_label_columns: int) -> int:
    if mode == "binary":
        return 1
    if mode in ("multilabel", "regression"):
        return n_label_columns
    return nb_classes
