"""PyTorch hub entry points: every factory of the model registry, and a loader for model folders.

    model = torch.hub.load(REPO_DIR, "mae_vit_large_patch16", source="local")        # TANGERINE's architecture
    model = torch.hub.load(REPO_DIR, "vit_base_patch16", source="local", img_size=128, num_classes=0)
    model = torch.hub.load(REPO_DIR, "model_folder", "models/ct-mae", source="local")  # or a hub repo id

The factories build freshly initialised models (kwargs: img_size, patch_size, in_chans, ...); `model_folder`
loads a folder written by main_export.py (models_hub.from_pretrained) and keeps its config.json as `model.config`.
"""
import models_mae3d  # noqa: F401 - registers mae_vit_*_patch16
import models_vit3d  # noqa: F401 - registers vit_*_patch16
from util.nn.registry import create_model as _create_model, registered as _registered

dependencies = ["torch", "timm", "monai", "numpy", "SimpleITK", "safetensors", "huggingface_hub"]


def _factory(name: str):
    def factory(**kwargs):
        return _create_model(name, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"{name} from the model registry (util/nn/registry.py), freshly initialised; kwargs: img_size, " \
                      f"patch_size, in_chans and the model's own (see models_mae3d.py / models_vit3d.py)."
    return factory


# one entry per registered factory: torch.hub finds them as attributes of this module (names never spelt twice)
globals().update({_name: _factory(_name) for _name in _registered()})


def model_folder(source, encoder_only: bool = False, **kwargs):
    """The model of a model folder or hub repo id (models_hub.from_pretrained; offline with HF_HUB_OFFLINE=1), in
    eval mode, its config.json dict as `model.config`. encoder_only=True: the headless ViT encoder."""
    from models_hub import from_pretrained

    model, config = from_pretrained(source, encoder_only=encoder_only, **kwargs)
    model.config = config
    return model
