"""A model folder: how a trained model leaves this repository, in the layout of the Hugging Face hub.

    config.json          what to build and how to feed it (typed, versioned: FORMAT_VERSION; see `read_config`)
    model.safetensors    the weights only: tensors, no pickle, no optimizer (its SHA-256 is in config.json)
    README.md            the model card (util.model_card)
    encoder.onnx         optional (main_export.py --onnx): volume [N, C, D, H, W] -> tokens [N, 1+L, E]
    head.onnx            optional, models with a head: tokens -> logits and probabilities

`as_checkpoint(folder)` hands a folder back as the same dict `util.checkpoint.load_checkpoint` returns for a .pth
('model', 'args', 'preprocess' and 'meta' when the source checkpoint had them, 'recipe'), which is how every flag
that takes a checkpoint also takes a folder. Reading is strict: a folder holding only a pickle is refused without
unpickling it, weights whose SHA-256 differs from config.json's record are refused, and a config.json that
contradicts the weights (width, depth, patch size, channels, input size, head width) is refused naming the field.
Writing goes through `staged_folder`: a temporary sibling folder renamed into place, never half-written.
This module builds no model (layer 0): torch tensors and safetensors only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile

from util.digest import file_sha256
from util.errors import UserError
from util.finite import first_non_finite

FORMAT, FORMAT_VERSION, LIBRARY = "mae3d-model-folder", 1, "mae3d"
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
ENCODER_ONNX, HEAD_ONNX = "encoder.onnx", "head.onnx"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
KINDS = ("mae", "vit", "unetr")  # MAE (encoder + decoder), ViT encoder (head optional), UNETR segmenter
SECTIONS = ("architecture", "preprocessing", "task", "provenance", "weights")
TMP_PREFIX = ".tmp-"
# a list without nested lists or objects, as json.dumps(indent=2) lays it out (JSON strings hold no newline)
_FLAT_LIST = re.compile(r"\[\n\s+([^\[\]{}]*?)\n\s*\]")


class ModelFolderError(UserError):
    """A model folder that cannot be used as it is: one sentence naming the folder, the file and the field."""


def is_model_folder(path) -> bool:
    return os.path.isdir(os.fspath(path))


def content_sha256(path) -> str:
    """The SHA-256 that identifies a checkpoint file or a model folder (that of its weights file)."""
    path = os.fspath(path)
    return file_sha256(os.path.join(path, WEIGHTS) if os.path.isdir(path) else path)


# --- reading ---------------------------------------------------------------------------------------------------
def read_config(folder) -> dict:
    """config.json of `folder`, checked: format, version, sections and the architecture's types. A folder that is
    not a model folder is named with what it holds instead (a pickle, a run folder's checkpoints, nothing)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(os.path.join(folder, WEIGHTS)):
        pickles = sorted(n for n in os.listdir(folder) if n.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelFolderError(f"{folder} holds {pickles[0]} (a pickle, which is never unpickled from a model "
                                   f"folder) and no {WEIGHTS}; pass a checkpoint file itself, or make a model folder "
                                   f"with main_export.py.")
        raise ModelFolderError(f"{folder} is a folder without {WEIGHTS}: not a model folder (main_export.py writes "
                               f"{CONFIG}, {WEIGHTS} and {CARD}).")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder} holds {WEIGHTS} but no {CONFIG}, so nothing says how to build and feed "
                               f"the model; export it again with main_export.py.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e}); the folder is damaged.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f"{path} is not a {FORMAT} config (its 'format' is "
                               f"{config.get('format') if isinstance(config, dict) else None!r}).")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFolderError(f"{path} has format_version {version!r}; this code reads versions 1 to "
                               f"{FORMAT_VERSION} (update the repository to read a newer folder).")
    for section in SECTIONS:
        if not isinstance(config.get(section), dict):
            raise ModelFolderError(f"{path} lacks its '{section}' section (or it is not an object).")
    _check_architecture(config["architecture"], path)
    _check_fields(config, path)
    return config


# what the readers need of the other sections: (section, key) -> the types it may have
_FIELDS = {("preprocessing", "origin"): str, ("preprocessing", "settings"): dict, ("weights", "sha256"): str,
           ("task", "origin"): str, ("task", "type"): str, ("task", "family"): str, ("task", "head_width"): int,
           ("task", "classes"): int, ("task", "label_names"): list, ("task", "label_columns"): list,
           ("task", "output_columns"): list, ("task", "pooling"): str, ("task", "linprobe"): bool,
           ("task", "headless"): bool, ("task", "extra"): dict, ("architecture", "mlp_ratio"): (int, float)}


_WORDS = {str: "text", dict: "an object", list: "a list", int: "an integer", bool: "true or false",
          (int, float): "a number"}


def _check_fields(config: dict, path: str) -> None:
    for (section, key), kind in _FIELDS.items():
        value = config[section].get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelFolderError(f"{path}: {section}.{key} must be {_WORDS[kind]}, got {value!r}.")
    arch = config["architecture"]
    if arch["kind"] == "vit" and arch.get("global_pool") not in ("avg", "token", "cat"):
        raise ModelFolderError(f"{path}: architecture.global_pool must be 'avg', 'token' or 'cat', got "
                               f"{arch.get('global_pool')!r}.")
    if arch["kind"] == "mae" and not isinstance(arch.get("norm_pix_loss"), bool):
        raise ModelFolderError(f"{path}: architecture.norm_pix_loss must be true or false, got "
                               f"{arch.get('norm_pix_loss')!r}.")


def _check_architecture(arch: dict, path: str) -> None:
    ints = ["embed_dim", "depth", "num_heads", "in_chans"]
    ints += {"mae": ["decoder_embed_dim", "decoder_depth", "decoder_num_heads"], "unetr": ["num_classes",
                                                                                          "feature_size"]
             }.get(arch.get("kind"), ["num_outputs"])
    if arch.get("kind") not in KINDS:
        raise ModelFolderError(f"{path}: architecture.kind is {arch.get('kind')!r}; expected one of {KINDS}.")
    if not isinstance(arch.get("model"), str):
        raise ModelFolderError(f"{path}: architecture.model must be a model name such as 'vit_large_patch16'.")
    for key in ints:
        value = arch.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "num_outputs" else 1):
            raise ModelFolderError(f"{path}: architecture.{key} must be a positive integer, got {value!r}.")
    for key in ("patch_size", "input_size"):
        value = arch.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
            raise ModelFolderError(f"{path}: architecture.{key} must be three positive integers (D, H, W), got "
                                   f"{value!r}.")
    if any(i % p for i, p in zip(arch["input_size"], arch["patch_size"])):
        raise ModelFolderError(f"{path}: architecture.input_size {arch['input_size']} is not a multiple of "
                               f"architecture.patch_size {arch['patch_size']}.")


def read_weights(folder, config: dict) -> dict:
    """The tensors of model.safetensors, after checking its SHA-256 against config.json and every tensor for
    NaN/Inf; never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    path = os.path.join(os.fspath(folder), WEIGHTS)
    recorded = config["weights"].get("sha256")
    if not isinstance(recorded, str) or file_sha256(path) != recorded:
        raise ModelFolderError(f"{path}: its SHA-256 differs from the one {CONFIG} records (weights.sha256); the "
                               f"file is damaged or was replaced, so it is refused.")
    try:
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path} is not a readable safetensors file ({e}).") from None
    bad = first_non_finite(sd)
    if bad is not None:
        raise ModelFolderError(f"{path} holds NaN or infinite values in {bad!r}; every output computed from it "
                               f"would be wrong, so it is refused.")
    return sd


def check_weights(config: dict, sd: dict, where: str) -> None:
    """Refuse, naming the field, a config whose architecture contradicts the weights' shapes."""
    arch = config["architecture"]
    enc = "encoder." if arch["kind"] == "unetr" else ""  # a UNETR's ViT is under encoder.

    def shape(key: str) -> tuple:
        if key not in sd:
            raise ModelFolderError(f"{where}: {WEIGHTS} lacks {key!r}, which the {arch['kind']} '{arch['model']}' "
                                   f"of {CONFIG} has; the weights are not the model {CONFIG} describes.")
        return tuple(int(n) for n in sd[key].shape)

    def agree(field: str, says, holds, key: str) -> None:
        if says != holds:
            raise ModelFolderError(f"{where}: {CONFIG} says architecture.{field} = {says}, but {WEIGHTS} has "
                                   f"{holds} ({key}); the config does not describe these weights.")

    patch = shape(enc + "patch_embed.proj.weight")
    agree("embed_dim", arch["embed_dim"], patch[0], enc + "patch_embed.proj.weight")
    agree("in_chans", arch["in_chans"], patch[1], enc + "patch_embed.proj.weight")
    channels = config["preprocessing"]["settings"].get("channels", ["Path"])
    if not isinstance(channels, list) or len(channels) != arch["in_chans"]:
        raise ModelFolderError(f"{where}: {CONFIG} says architecture.in_chans = {arch['in_chans']} but "
                               f"preprocessing.settings.channels names {channels!r}; the config contradicts itself.")
    agree("patch_size", list(arch["patch_size"]), list(patch[2:]), enc + "patch_embed.proj.weight")
    agree("depth", arch["depth"], _count(sd, enc + "blocks."), enc + "blocks.*")
    hidden = shape(enc + "blocks.0.mlp.fc1.weight")[0]
    agree("mlp_ratio", float(arch.get("mlp_ratio", 4.0)), hidden / arch["embed_dim"], enc + "blocks.0.mlp.fc1.weight")
    if arch["embed_dim"] % arch["num_heads"]:
        raise ModelFolderError(f"{where}: {CONFIG} says architecture.num_heads = {arch['num_heads']}, which does not "
                               f"divide architecture.embed_dim = {arch['embed_dim']}.")
    grid = [i // p for i, p in zip(arch["input_size"], arch["patch_size"])]
    tokens = shape(enc + "pos_embed")[1]
    if tokens != 1 + math.prod(grid):
        agree("input_size", f"{arch['input_size']} (1 + {math.prod(grid)} tokens)", f"{tokens} tokens",
              enc + "pos_embed")
    if arch["kind"] == "mae":
        agree("decoder_embed_dim", arch["decoder_embed_dim"], shape("decoder_embed.weight")[0], "decoder_embed.weight")
        agree("decoder_depth", arch["decoder_depth"], _count(sd, "decoder_blocks."), "decoder_blocks.*")
        voxels = math.prod(arch["patch_size"]) * arch["in_chans"]
        if shape("decoder_pred.0.weight")[0] != voxels:
            agree("patch_size", f"{arch['patch_size']} x {arch['in_chans']} channel(s) ({voxels} voxels a patch)",
                  f"{shape('decoder_pred.0.weight')[0]} voxels a patch", "decoder_pred.0.weight")
    elif arch["kind"] == "unetr":
        agree("num_classes", arch["num_classes"], shape("out.conv.conv.weight")[0], "out.conv.conv.weight")
        agree("feature_size", arch["feature_size"], shape("encoder1.layer.conv1.conv.weight")[0],
              "encoder1.layer.conv1.conv.weight")
    else:
        key = next((k for k in ("head.weight", "head.1.weight") if k in sd), None)
        agree("num_outputs", arch["num_outputs"], shape(key)[0] if key else 0, key or "no head.weight")
        width = 2 * arch["embed_dim"] if arch.get("global_pool") == "cat" else arch["embed_dim"]
        if key and shape(key)[1] != width:
            agree("global_pool", f"{arch.get('global_pool')!r} ({width} features)", f"{shape(key)[1]} features",
                  key)
    task = config["task"]
    for field, same in (("head_width", "num_outputs"), ("pooling", "global_pool")):
        if arch["kind"] == "vit" and task[field] != arch[same]:
            raise ModelFolderError(f"{where}: {CONFIG} says task.{field} = {task[field]!r} but architecture.{same} "
                                   f"= {arch[same]!r}; the config contradicts itself.")


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def as_checkpoint(folder) -> dict:
    """The folder as the dict util.checkpoint.load_checkpoint returns for a .pth: 'model' (the weights), 'args'
    (the source's flags, input_size filled in), 'recipe', and 'preprocess' / 'meta' only when the source
    checkpoint stored them (a TANGERINE file's folder describes its default preprocessing in config.json but, like
    the file, leaves the scripts to apply it), plus 'model_folder' (the config)."""
    folder = os.fspath(folder)
    config = read_config(folder)
    sd = read_weights(folder, config)
    check_weights(config, sd, folder)
    arch, task, prov = config["architecture"], config["task"], config["provenance"]
    args = dict(prov.get("args") or {})
    args.setdefault("input_size", list(arch["input_size"]))
    ckpt = {"model": sd, "args": args, "model_folder": config}
    if prov.get("recipe") is not None:
        ckpt["recipe"] = prov["recipe"]
    pre = config["preprocessing"]
    if pre.get("origin") == "checkpoint":
        ckpt["preprocess"] = dict(pre["settings"])
    if task.get("origin") == "checkpoint":
        ckpt["meta"] = meta_of(config)
    return ckpt


def meta_of(config: dict) -> dict:
    """The finetuned checkpoint's 'meta' dict (util.task.meta.RunMeta.to_dict) that config.json's sections hold."""
    arch, task = config["architecture"], config["task"]
    return {**task.get("extra", {}), "model": arch["model"], "input_size": list(arch["input_size"]),
            "patch_size": list(arch["patch_size"]), "in_chans": arch["in_chans"], "nb_classes": task["classes"],
            "nb_outputs": task["head_width"], "label_names": list(task["label_names"]),
            "label_columns": list(task["label_columns"]), "global_pool": task["pooling"],
            "linprobe": task["linprobe"], "mode": task["type"], "task": task["family"]}


# --- writing ---------------------------------------------------------------------------------------------------
def check_destination(out_dir, source) -> None:
    """Refuse an export into a non-empty folder (one around the input is never empty), onto its own input, or into
    an input folder."""
    out, src = os.path.realpath(os.fspath(out_dir)), os.path.realpath(os.fspath(source))
    if out == src:
        raise ModelFolderError(f"The output folder {out_dir} is the input {source} itself; choose a new folder.")
    if os.path.isdir(src) and (out + os.sep).startswith(src + os.sep):
        raise ModelFolderError(f"The output folder {out_dir} is inside the input folder {source}; choose a folder "
                               f"outside it, so the input stays as it is.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ModelFolderError(f"The output {out_dir} is a file, not a folder; choose a new folder.")
    if os.path.isdir(out) and os.listdir(out):
        raise ModelFolderError(f"The output folder {out_dir} is not empty; choose a new or empty folder (an export "
                               f"never mixes its files with others or replaces them).")


@contextlib.contextmanager
def staged_folder(out_dir):
    """Yield a temporary sibling folder of `out_dir` to fill; on success it is synced and renamed to `out_dir`
    (which must not exist or be empty), on any failure (Ctrl-C included) it is removed: `out_dir` is then as it
    was, never half-written."""
    out = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(out)}-")
    try:
        yield tmp
        for name in sorted(os.listdir(tmp)):
            _fsync(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared model is read by others
        _fsync(tmp)
        try:
            os.rename(tmp, out)  # replaces an empty folder atomically; a non-empty one raises
        except OSError as e:
            raise ModelFolderError(f"The output folder {out_dir} could not be created ({e.strerror or e}); it was "
                                   f"filled by someone else meanwhile, or is not writable.") from None
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj: dict) -> None:
    """JSON with a fixed layout (indent 2, keys in the order given, lists of numbers and strings on one line, UTF-8),
    so the same config gives the same bytes."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    text = _FLAT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def save_weights(path, sd: dict) -> dict:
    """Write `sd` (float tensors as they are) to a safetensors file; returns config.json's 'weights' record."""
    from safetensors.torch import save_file

    tensors = {k: _own(v) for k, v in sd.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it 0600; a shared model is read by others
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    return {"file": WEIGHTS, "sha256": file_sha256(path), "tensors": len(tensors),
            "parameters": int(sum(t.numel() for t in tensors.values())), "dtypes": dtypes}


def _own(t):
    """A tensor that owns its memory (safetensors refuses views and tensors that share storage)."""
    t = t.detach().cpu()
    shared = t.untyped_storage().nbytes() != t.numel() * t.element_size()
    return t.clone() if shared or not t.is_contiguous() else t
