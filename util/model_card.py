"""The model card (README.md) of a model folder, written from its config.json alone: what the model is, the input it
expects, the two lines that load it, the recipe, the data it saw, intended use and limits, and the evaluation
summary when one was given (main_export.py --evaluation). The hub reads the YAML block at its top."""
from __future__ import annotations

import json

from util.model_folder import CONFIG, ENCODER_ONNX, HEAD_ONNX, WEIGHTS
from util.run_folder import nifti_name

PIPELINE_TAGS = {"headless": "image-feature-extraction", "dense": "image-segmentation",
                 "classes": "image-classification"}  # the hub's task names; regression has none
RECIPE_KEYS = ("model", "input_size", "patch_size", "epochs", "epochs_completed", "batch_size", "accum_iter",
               "effective_batch", "world_size", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay",
               "layer_decay", "drop_path", "smoothing", "mask_ratio", "norm_pix_loss", "linprobe", "pool", "seed",
               "precision", "init", "finetune", "table", "data_path", "train_csv")


def model_card(config: dict, title: str, evaluation: str | None = None, license_id: str | None = None) -> str:
    """The README.md text of a model folder (deterministic: the same config gives the same bytes)."""
    arch, task = config["architecture"], config["task"]
    parts = [_front_matter(task, license_id), f"# {title}\n", _what(arch, task, config), _input(config),
             _loading(config), _recipe(config), _data(config), _limits(arch, task, config), _evaluation(evaluation),
             _provenance(config)]
    return "\n".join(p for p in parts if p)


def _front_matter(task: dict, license_id: str | None) -> str:
    kind = next((v for k, v in PIPELINE_TAGS.items() if task.get(k)), None)
    if kind is None and not task.get("continuous"):
        kind = PIPELINE_TAGS["classes"]
    lines = ["---", "library_name: mae3d", "tags:", "- medical-imaging", "- computed-tomography", "- 3d",
             "- vision-transformer", "- masked-autoencoder"]
    lines += [f"pipeline_tag: {kind}"] if kind else []
    lines += [f"license: {license_id}"] if license_id else []
    return "\n".join(lines + ["---", ""])


def _what(arch: dict, task: dict, config: dict) -> str:
    patch = arch["patch_size"]
    size = f"ViT-{arch['size'].capitalize()}/{patch[0] if len(set(patch)) == 1 else 'x'.join(map(str, patch))}"
    params = config["weights"]["parameters"] / 1e6
    if arch["kind"] == "mae":
        body = (f"a 3D masked autoencoder ({size} encoder, {arch['embed_dim']} wide, {arch['depth']} blocks, "
                f"{arch['num_heads']} heads; decoder {arch['decoder_embed_dim']} x {arch['decoder_depth']}) "
                f"pretrained by masked reconstruction of CT volumes")
    elif arch["kind"] == "unetr":
        body = (f"a UNETR segmenter on a {size} encoder ({task['classes']} label values, decoder width "
                f"{arch['feature_size']})")
    else:
        body = f"a {size} encoder ({arch['embed_dim']} wide, {arch['depth']} blocks, {arch['num_heads']} heads)"
        if not task["headless"]:
            body += (f" with a {task['type']} head of {task['head_width']} output(s) ({arch['global_pool']} pooling"
                     f"{', linear probe' if task['linprobe'] else ''})")
    labels = f"\nOutputs (in this order): {', '.join(task['output_columns'])}.\n" if task["output_columns"] else ""
    derived = ("\nThe checkpoint carried no description of its task, so it was read from its weights "
               "(main_predict.py --head_mode chooses another reading of a head).\n"
               if task["origin"] == "weights" and not task["headless"] else "")
    return (f"This folder holds {body}: `{arch['model']}`, {params:.1f} M parameters, input "
            f"{'x'.join(map(str, arch['input_size']))} voxels with {arch['in_chans']} channel(s).\n{labels}{derived}")


NORM_WORDS = {"zscore": "z-score over its non-zero voxels", "percentile": "clipped to its 0.5-99.5 percentiles of the "
              "non-zero voxels, scaled to [0, 1]"}


def _input(config: dict) -> str:
    pre = config["preprocessing"]
    s = pre["settings"]
    grid = (f"resampled to spacing {s['spacing']} mm (then padded to at least {s['size']})" if s.get("spacing") else
            f"the whole volume resampled to {s['size']} voxels keeping its physical extent" if s.get("size") else
            "kept on its native grid")
    rows = [("orientation", s["orientation"]), ("grid", grid), ("HU window", f"{s['window']} scaled to [0, 1]"),
            ("image interpolator", s["interpolator"]), ("label-map interpolator", s.get("mask_interpolator"))]
    if s.get("channels") or s.get("norm"):  # several channels, or another normalisation than the HU window
        rows[2] = ("channels (in this order)", "; ".join(
            f"{c['name']} from column {c['column']}: " + (f"HU window {c['window']} scaled to [0, 1]" if c["norm"] ==
                                                          "ct" else NORM_WORDS[c["norm"]])
            for c in pre.get("channels", [])))
    if s.get("roi_mm"):
        rows.append(("lesion boxes", f"{s['roi_mm']} mm around each row's point ({s.get('roi_coords')}) or "
                                     f"label {s.get('roi_label')}, resampled to {s['size']}"))
    origin = pre.get("note") or "as stored by the training run"
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return (f"## Input it expects\nThe preprocessing travels with the weights ({CONFIG}: `preprocessing`, version "
            f"{pre['version']}); {origin}. `main_predict.py` and `load_input` apply it, so a scan is fed exactly as "
            f"in training.\n\n| step | setting |\n|---|---|\n{table}\n")


def _load_line(config: dict) -> str:
    chans = config["preprocessing"].get("channels")
    if not chans:
        return 'x = load_input("scan.nii.gz", config)  # [1, 1, D, H, W], preprocessed as in training'
    files = ", ".join(f'"{nifti_name(c["name"])}"' for c in chans)
    return (f"x = load_input([{files}], config)  # [1, {len(chans)}, D, H, W], one file per channel in this order "
            f"(or one 4D file)")


def _loading(config: dict) -> str:
    onnx = config.get("onnx") or {}
    lines = ["## Loading it", "```python", "from models_hub import from_pretrained, load_input  # this repository",
             'model, config = from_pretrained("path/to/this/folder")  # or the hub repo id; offline: HF_HUB_OFFLINE=1',
             _load_line(config), "```",
             "The scripts take this folder where they take a checkpoint: `main_predict.py --finetune DIR`, "
             "`main_finetune.py --finetune DIR`. Without this repository: "
             f"`{WEIGHTS}` opens with `safetensors.torch.load_file` and `{CONFIG}` says how to build the model."]
    if onnx:
        enc = onnx["encoder"]
        lines += ["", f"`{ENCODER_ONNX}` (ONNX opset {enc['opset']}, any batch size): input `volume` "
                      f"{enc['input']}, output `tokens` {enc['output']} (class token first); onnxruntime matched "
                      f"PyTorch within {enc['max_abs_diff']:.1e} on export."]
        if "head" in onnx:
            lines += [f"`{HEAD_ONNX}`: input `tokens`, outputs `logits` and `probabilities` {onnx['head']['output']}."]
    return "\n".join(lines) + "\n"


def _recipe(config: dict) -> str:
    prov = config["provenance"]
    source = {**(prov.get("args") or {}), **(prov.get("recipe") or {}),
              "epochs_completed": prov.get("epochs_completed")}
    rows = [(k, source[k]) for k in RECIPE_KEYS if source.get(k) not in (None, "", [])]
    if not rows:
        return ("## Training recipe\nThe source checkpoint records no recipe (it was made elsewhere, e.g. "
                "TANGERINE's published weights).\n")
    table = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in rows)
    return (f"## Training recipe\nFrom the source checkpoint (`provenance.recipe` and `provenance.args` of {CONFIG} "
            f"hold all of it).\n\n| setting | value |\n|---|---|\n{table}\n")


def _data(config: dict) -> str:
    prov = config["provenance"]
    lines = ["## Data it saw"]
    if prov.get("data_manifest"):
        where = "included in this folder" if prov.get("data_manifest_included") else "kept with the training run"
        lines.append(f"Pretraining scans: `{prov['data_manifest']}` (SHA-256 `{prov['data_manifest_sha256']}`, "
                     f"{where}); `main_evaluate.py --pretraining` uses it to tell whether a test scan was among them.")
    table = (prov.get("recipe") or {}).get("table")
    if table:
        lines.append(f"Training table: {table} (rows and SHA-256 of the table as read).")
    if len(lines) == 1:
        lines.append("Not recorded by the source checkpoint: say here what it was trained on before sharing it.")
    return "\n".join(lines) + "\n"


def _limits(arch: dict, task: dict, config: dict) -> str:
    use = ("extracting features (embeddings) of CT volumes for research, and initialising models to finetune"
           if task["headless"] or arch["kind"] == "mae" else
           f"research on the {task['type']} task it was trained for, on scans like its training data")
    return ("## Intended use and limits\n"
            f"Intended for {use}. It is not a medical device and was not validated for clinical decisions. Its "
            "outputs are only as good as the match between a new scan and its training data: another scanner, "
            "protocol, population, body region or a preprocessing other than the one above (axis order, window, "
            "spacing) can change them without any error being raised. Input must be CT in Hounsfield units with "
            f"{arch['in_chans']} channel(s).\n")


def _evaluation(text: str | None) -> str:
    if not text:
        return "## Evaluation\nNo evaluation was attached (`main_export.py --evaluation summary.md` adds one).\n"
    return "## Evaluation\nThe `main_evaluate.py` summary given at export, as written:\n\n" + text.strip() + "\n"


def _provenance(config: dict) -> str:
    prov, repo = config["provenance"], config["provenance"]["repository"]
    return (f"## Provenance\nExported from `{prov['source_file']}` (SHA-256 `{prov['source_sha256']}`) by this "
            f"repository, version {repo['version']} (commit {repo['git_commit'] or 'unknown'}). The weights' "
            f"SHA-256 is `{config['weights']['sha256']}` ({CONFIG}: `weights`); absolute paths of the training run "
            f"are reduced to their file names.\n")
