"""Any timm model as a backbone ("timm:NAME"): blocks from its own structure, the same freezing, training and caches.

Every model here is built with pretrained=False (random init, no network); the offline error is forced.
"""

import urllib.error

import pytest
import timm
import torch
from conftest import toy_tensors

import tlkit
from tlkit.features import cached_features
from tlkit.models import TIMM_PREFIX, WeightsUnavailableError, has_batchnorm
from tlkit.transforms import Normalization

CNN, VIT = "resnet18", "vit_tiny_patch16_224"


def timm_model(name: str, num_classes: int = 4) -> tlkit.TransferModel:
    tlkit.set_seed(0)
    return tlkit.create_model(TIMM_PREFIX + name, num_classes, weights=None)


@pytest.fixture(scope="module")
def cnn() -> tlkit.TransferModel:
    return timm_model(CNN)


@pytest.fixture(scope="module")
def vit() -> tlkit.TransferModel:
    return timm_model(VIT)


@pytest.mark.parametrize(
    "name, blocks",
    [
        (CNN, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
        # MobileNetV3's 1x1 conv after pooling and ConvNeXt's head norm run in forward_head: the trainable pool.
        ("mobilenetv3_small_050", ["stem", "stage1", "stage2", "stage3", "stage4", "pool", "head"]),
        ("convnext_atto", ["stem", "stage1", "stage2", "stage3", "stage4", "pool", "head"]),
        (VIT, ["embed", *[f"block{i}" for i in range(1, 13)], "norm", "head"]),
    ],
)
def test_timm_models_are_cut_into_named_blocks_that_compute_what_timm_computes(name, blocks):
    model = timm_model(name, num_classes=3)
    tlkit.set_seed(0)  # the same random init as model's
    reference = timm.create_model(name, pretrained=False, **({"dynamic_img_size": True} if name == VIT else {}))
    assert tlkit.block_names(model) == blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval().forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.allclose(model.eval().forward_features(x), expected, atol=1e-5)
        assert model(x).shape == (2, 3)
    # Every parameter of the timm model is in exactly one block; only the classifier was replaced.
    classifier = sum(p.numel() for p in reference.get_classifier().parameters())
    total = sum(p.numel() for p in reference.parameters()) - classifier + model.num_features * 3 + 3
    assert tlkit.parameter_counts(model)["total"]["frozen"] + tlkit.parameter_counts(model)["total"]["trainable"] == total
    assert model.head.in_features == model.num_features == expected.shape[1]


def test_normalization_resize_and_input_size_come_from_timms_pretrained_config(cnn, vit):
    for model, name in ((cnn, CNN), (vit, VIT)):
        config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        norm = model.normalization
        assert (norm.mean, norm.std, norm.interpolation, norm.crop_pct) == (
            config["mean"], config["std"], config["interpolation"], config["crop_pct"]
        )
        assert model.input_size == config["input_size"][-1] == 224
    assert vit.normalization.mean == (0.5, 0.5, 0.5) and cnn.normalization.mean == (0.485, 0.456, 0.406)
    assert cnn.normalization.resize_size(224) == int(224 / cnn.normalization.crop_pct)
    assert str(cnn.normalization.interpolation_mode.value) == "bicubic"
    # The built-in backbones keep their resize: straight to the crop, bilinear.
    assert Normalization((0.5,) * 3, (0.5,) * 3).resize_size(64) == 64


def test_freeze_up_to_a_stage_and_frozen_batchnorm_keeps_its_statistics(cnn):
    tlkit.freeze(cnn, up_to="stage2")
    assert tlkit.trainable_blocks(cnn) == ["stage3", "stage4", "head"]
    cnn.train()
    blocks = cnn.blocks()
    assert not blocks["stage2"].training and blocks["stage3"].training
    before = blocks["stage1"].layer1[0].bn1.running_mean.clone()
    trained_before = blocks["stage3"].layer3[0].bn1.running_mean.clone()
    cnn(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(blocks["stage1"].layer1[0].bn1.running_mean, before)
    assert not torch.equal(blocks["stage3"].layer3[0].bn1.running_mean, trained_before)
    assert all(p.grad is None for p in blocks["stage2"].parameters())
    assert all(p.grad is not None for p in blocks["stage3"].parameters())
    cnn.zero_grad(set_to_none=True)
    assert has_batchnorm(cnn)


def test_vit_blocks_freeze_and_train_like_the_built_in_ones(vit):
    tlkit.freeze(vit, up_to="block10")
    assert tlkit.trainable_blocks(vit) == ["block11", "block12", "norm", "head"]
    embed = vit.blocks()["embed"]
    assert not any(p.requires_grad for p in embed.parameters())  # patch embedding, class token, position embedding
    vit.train()
    assert not vit.blocks()["block3"].training and vit.blocks()["block12"].training
    assert not has_batchnorm(vit)  # LayerNorm: no running statistics to keep
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert vit.blocks()["block3"].attn.qkv.weight.grad is None
    assert vit.blocks()["block11"].attn.qkv.weight.grad is not None
    vit.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name, frozen, trained", [(CNN, "stage1", "stage4"), (VIT, "block2", "block12")])
def test_fit_with_layer_decay_and_gradual_unfreezing(name, frozen, trained):
    model = tlkit.freeze(timm_model(name), up_to=frozen)
    train, val = toy_tensors()
    train_loader = tlkit.make_loader(train, None, 32, shuffle=True)
    val_loader = tlkit.make_loader(val, None, 32, shuffle=False)
    optimizer = tlkit.make_optimizer(model, 1e-3, layer_decay=0.5)
    groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
    below = tlkit.block_names(model)
    assert groups["head"] == 1e-3 and groups[trained] == pytest.approx(1e-3 * 0.5 ** (len(below) - 1 - below.index(trained)))
    frozen_before = [p.clone() for p in model.blocks()[frozen].parameters()]
    trained_before = [p.clone() for p in model.blocks()[trained].parameters()]
    gradual = tlkit.finetune.GradualUnfreezing(model, optimizer, lr=1e-3, layer_decay=0.5, order=[frozen])
    history = tlkit.fit(model, train_loader, val_loader, epochs=1, optimizer=optimizer, progress=False, callbacks=[gradual])
    assert len(history.val_acc) == 1 and gradual.unfrozen == [(1, frozen)]
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, model.blocks()[frozen].parameters()))  # trained 0 steps
    assert not all(torch.equal(a, b) for a, b in zip(trained_before, model.blocks()[trained].parameters()))
    assert frozen in {g["name"] for g in optimizer.param_groups}


def test_feature_cache_reads_back_and_follows_the_backbone_weights(tmp_path, vit):
    tlkit.freeze(vit)
    loader = tlkit.make_loader(toy_tensors()[1], None, 16, shuffle=False)
    first = cached_features(vit, loader, cache_dir=tmp_path, progress=False)
    assert first.tensors[0].shape == (32, vit.num_features) and len(list(tmp_path.glob("features-*.pt"))) == 1
    again = cached_features(vit, loader, cache_dir=tmp_path, progress=False)
    assert torch.equal(first.tensors[0], again.tensors[0])
    with torch.no_grad():
        vit.blocks()["block1"].mlp.fc1.bias.add_(1.0)  # the backbone changed: its features are computed again
    cached_features(vit, loader, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("features-*.pt"))) == 2


def test_freeze_panel_toggles_timm_blocks(cnn):
    pytest.importorskip("ipywidgets")
    tlkit.freeze(cnn)
    panel = tlkit.FreezePanel(cnn, lr=0.01, layer_decay=0.5)
    assert list(panel.toggles) == tlkit.block_names(cnn)
    before = panel.summary()["trainable"]
    panel.toggles["stage4"].value = True
    stage4 = tlkit.parameter_counts(cnn)["stage4"]["trainable"]
    assert stage4 > 0 and panel.summary()["trainable"] == before + stage4
    assert [g["name"] for g in panel.param_groups()] == ["head", "stage4"]
    assert panel.param_groups()[1]["lr"] == pytest.approx(0.01 * 0.5)
    assert cnn.train().blocks()["stage3"].training is False


def test_checkpoint_of_a_timm_model_reloads_without_network(tmp_path, cnn):
    path = tlkit.checkpoints.save_checkpoint(tmp_path / "timm.pt", cnn, classes=list("abcd"), epoch=1)
    reloaded, ckpt = tlkit.model_from_checkpoint(path)
    assert ckpt.backbone == TIMM_PREFIX + CNN and tlkit.block_names(reloaded) == tlkit.block_names(cnn)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), cnn.eval()(x), atol=1e-6)


def test_offline_weights_error_names_the_model_the_cache_and_the_alternative(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        tlkit.create_model(TIMM_PREFIX + CNN, 4, weights="imagenet")
    message = str(err.value)
    assert f"'{CNN}'" in message and "timm/resnet18.a1_in1k" in message and "models--timm--resnet18.a1_in1k" in message
    assert str(tmp_path / "hub") in message and "HF_HOME" in message
    assert "backbone='efficientnet_lite0'" in message


def test_offline_error_for_weights_timm_downloads_by_url(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._builder, "has_hf_hub", lambda necessary=False: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match="resnet18_a1_0-d63eafa0.pth") as err:
        tlkit.create_model(TIMM_PREFIX + CNN, 4, weights="imagenet")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value)


def test_unknown_timm_names_and_weights_say_what_to_use():
    with pytest.raises(ValueError, match="Did you mean timm:resnet18"):
        tlkit.create_model("timm:resnet_18", 2, weights=None)
    with pytest.raises(ValueError, match=r"resnet50\.a1_in1k"):
        tlkit.create_model(TIMM_PREFIX + CNN, 2, weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="timm:NAME"):
        tlkit.create_model("convnext_tiny", 2)
    with pytest.raises(tlkit.models.TimmBackboneError, match="two heads"):
        tlkit.create_model("timm:deit_tiny_distilled_patch16_224", 2, weights=None)
    listed = tlkit.models.available_backbones("resnet1*")
    assert "timm:resnet18.a1_in1k" in listed and all(n.startswith(TIMM_PREFIX) for n in listed)


@pytest.mark.parametrize("name, up_to, boundary", [(CNN, "stage3", "stage4"), (VIT, "block10", "block11")])
def test_prefix_cache_cuts_timm_models_at_the_first_trainable_block(name, up_to, boundary):
    pc = pytest.importorskip("tlkit.prefix_cache")
    model = tlkit.freeze(timm_model(name), up_to=up_to)
    assert pc.prefix_boundary(model.train()) == boundary
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model.eval()(x)
        assert torch.allclose(pc.forward_from(model, boundary, pc.forward_prefix(model, boundary, x)), full, atol=1e-5)
    tlkit.freeze(model)  # the head alone trains: the cache holds the pooled features (ViT's pool has nothing that trains)
    assert pc.prefix_boundary(model.train()) == "head"


def test_num_classes_none_keeps_timms_pretrained_classifier(monkeypatch):
    loaded = []
    # No network in tests: the weights "load" as the random init, and the call is recorded.
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda model, *args, **kwargs: loaded.append(model))
    tlkit.set_seed(0)
    model = tlkit.create_model(TIMM_PREFIX + CNN, num_classes=None, weights="imagenet")
    tlkit.set_seed(0)
    reference = timm.create_model(CNN, pretrained=False)
    assert len(loaded) == 1 and model.head.out_features == 1000 and model.weights == "imagenet"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="needs weights"):
        tlkit.create_model(TIMM_PREFIX + CNN, num_classes=None, weights=None)


def test_conv_block_on_a_vit_says_to_use_a_cnn():
    model = tlkit.create_model("timm:vit_tiny_patch16_224", 3, weights=None)
    with pytest.raises(ValueError, match="tokens.*CNN backbone"):
        tlkit.finetune.add_conv_block(model)
