"""One model registry: the torch-free table of sizes names every factory, each factory registers itself and
builds the widths of its row, and siblings are found through the size, never by editing names."""
import pytest

import models_mae3d  # noqa: F401  (registers the MAE factories)
import models_vit3d  # noqa: F401  (registers the ViT factories)
from util.errors import UserError
from util.nn import registry


def test_every_name_of_the_table_is_registered_and_nothing_else():
    assert registry.registered("mae") == list(registry.model_names("mae"))
    assert registry.registered("vit") == list(registry.model_names("vit"))
    assert registry.model_names("vit") == ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
                                           "vit_large_patch16", "vit_huge_patch16")


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "vit_small_patch16"])
def test_create_model_builds_the_widths_of_its_row(name):
    size = registry.entry(name).size
    model = registry.create_model(name, img_size=32, patch_size=8)
    assert model.cls_token.shape[-1] == size.embed_dim and len(model.blocks) == size.depth
    assert model.blocks[0].attn.num_heads == size.num_heads
    if registry.entry(name).family == "mae":
        assert len(model.decoder_blocks) == size.decoder_depth
        assert model.decoder_embed.out_features == size.decoder_embed_dim


def test_siblings_and_recognition_go_through_the_size():
    assert registry.sibling("mae_vit_large_patch16", "vit") == "vit_large_patch16"
    assert registry.sibling("vit_tiny_patch16", "mae") == "mae_vit_tiny_patch16"
    assert registry.size_of(1024, 24).name == "large"
    assert registry.size_of(1024, 12) is None


def test_unknown_names_are_one_sentence():
    with pytest.raises(UserError, match="Unknown model 'vit_giant_patch16'; expected one of mae_vit_tiny_patch16"):
        registry.create_model("vit_giant_patch16")

    def my_model(**kw):
        return None

    with pytest.raises(UserError, match="Unknown model 'my_model'"):  # a factory needs a row of the table
        registry.register_model(my_model)
