import urllib.error

import pytest
import skimage.data
import torch
from PIL import Image
from torch import nn

import tlkit
from tlkit.transforms import TF_LITE_NORM


@pytest.fixture(scope="module")
def lite0() -> tlkit.TransferModel:
    tlkit.set_seed(0)
    return tlkit.create_model("efficientnet_lite0", num_classes=4, weights="imagenet")


def test_offline_backbone_keeps_imagenet_knowledge():
    model = tlkit.create_model("efficientnet_lite0", num_classes=None, weights="imagenet")
    cat = Image.fromarray(skimage.data.chelsea())
    top = tlkit.predict_images(model, [cat], tlkit.eval_transform(224, model.normalization), tlkit.imagenet_categories())
    assert top[0][0][0] in {"tabby", "tiger cat", "Egyptian cat"}
    assert model.normalization == TF_LITE_NORM


def test_new_head_has_one_output_per_class(lite0):
    assert isinstance(lite0.head, nn.Linear)
    assert lite0.head.out_features == 4 and lite0.head.in_features == lite0.num_features == 1280
    assert lite0(torch.randn(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize(
    "name, first, last_below_head, width",
    [("resnet18", "stem", "layer4", 512), ("mobilenet_v3_small", "stem", "pool", 1024), ("efficientnet_b0", "stem", "top", 1280)],
)
def test_torchvision_backbones_are_cut_into_named_blocks(name, first, last_below_head, width):
    model = tlkit.create_model(name, num_classes=3, weights=None)
    names = tlkit.block_names(model)
    assert names[0] == first and names[-2] == last_below_head and names[-1] == "head"
    assert model.head.in_features == width and model.head.out_features == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_random_init_differs_from_pretrained():
    a = tlkit.create_model("efficientnet_lite0", 2, weights="imagenet")
    b = tlkit.create_model("efficientnet_lite0", 2, weights=None)
    assert not torch.equal(a.features.stem[0].weight, b.features.stem[0].weight)


def test_freeze_stops_gradients_below_the_head(lite0):
    tlkit.freeze(lite0)
    lite0.train()
    lite0(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, block in lite0.blocks().items():
        for p in block.parameters():
            assert (p.grad is not None) == (name == "head"), name
    lite0.zero_grad(set_to_none=True)
    counts = tlkit.parameter_counts(lite0)
    assert counts["total"]["trainable"] == counts["head"]["trainable"] == 1280 * 4 + 4


def _bn_running_mean(model: tlkit.TransferModel) -> torch.Tensor:
    return model.features.stem[1].running_mean.clone()


def test_frozen_blocks_keep_batchnorm_statistics_unless_switched_off():
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 2, weights="imagenet"))
    before = _bn_running_mean(model)
    model.train()
    assert not model.features.stem.training and model.head.training
    model(torch.randn(4, 3, 64, 64) * 3)
    assert torch.equal(before, _bn_running_mean(model))

    model.eval_frozen_blocks = False
    model.train()
    model(torch.randn(4, 3, 64, 64) * 3)
    assert not torch.equal(before, _bn_running_mean(model))


def test_freeze_up_to_a_block_and_unfreeze_by_name(lite0):
    tlkit.freeze(lite0, up_to="stage5")
    assert tlkit.trainable_blocks(lite0) == ["stage6", "stage7", "top", "head"]
    tlkit.freeze(lite0)
    tlkit.unfreeze(lite0, ["top"])
    assert tlkit.trainable_blocks(lite0) == ["top", "head"]
    assert lite0.features.top.training == lite0.training


def test_unknown_block_name_lists_the_valid_ones(lite0):
    with pytest.raises(ValueError, match=r"Unknown block name\(s\) \['layer4'\].*'stem', 'stage1'"):
        tlkit.freeze(lite0, up_to="layer4")


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet1800'.*efficientnet_lite0.*resnet18"):
        tlkit.create_model("resnet1800", 2)


def test_missing_weights_download_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(tlkit.models.WeightsUnavailableError) as info:
        tlkit.create_model("resnet18", 2, weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "backbone='efficientnet_lite0'" in message


def test_keeping_the_pretrained_head_needs_weights():
    with pytest.raises(ValueError, match="needs weights"):
        tlkit.create_model("efficientnet_lite0", None, weights=None)
