"""Image preprocessing, as torchvision's classification ``presets.py``: the weights' normalisation, the eval
transform and the training presets side by side, plus the steps every image passes (upright, RGB)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms import v2

PRESETS = ("none", "basic", "strong", "trivialaugment", "randaugment")


# --- what the weights expect ------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std the pretrained weights expect (inputs scaled to [0, 1] first).

    ``interpolation`` and ``crop_pct`` describe the eval resize the weights were evaluated with
    (timm's pretrained config): resize the short side to ``resize_size(image_size)``, then
    center-crop ``image_size``. The built-in backbones keep 1.0 (resize straight to the crop).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def resize_size(self, image_size: int) -> int:
        """Short side to resize to before the ``image_size`` center crop (timm's rule: floor(size / crop_pct))."""
        return math.floor(image_size / self.crop_pct)

    @property
    def interpolation_mode(self):
        """``interpolation`` as torchvision's ``InterpolationMode`` (for ``v2.Resize(..., interpolation=...)``)."""
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)


IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# EfficientNet-Lite was trained in TensorFlow on inputs scaled to [-1, 1] (timm's config says the same).
TF_LITE_NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# --- every image: upright RGB ---------------------------------------------------------------------


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF Orientation tag says (as image viewers show it: phone photos are often stored sideways)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF data: the pixels are still fine, as stored
        return image
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


class Upright:
    """A transform step: a PIL image turned as its EXIF orientation says (``upright``); anything else passes unchanged.

    Images from tlkit's datasets are upright already; this step makes the eval transform right for a photo
    opened directly with ``Image.open`` too.
    """

    def __call__(self, image):
        return upright(image) if isinstance(image, Image.Image) else image

    def __repr__(self) -> str:
        return "Upright()"


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright RGB copy of any Pillow image: EXIF orientation applied (``upright``), transparency composited on
    white, 16-bit grayscale scaled to 8 bits. Every image tlkit loads, trains on or predicts passes through it."""
    image = upright(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255, which turns most pixels white.
        pixels = np.asarray(image, dtype=np.float32) / 257
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # On white, as viewers show it: dropping the alpha channel would bring back whatever colour
        # transparent pixels happen to hold (often black), which the user never saw.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# Decoding an image costs memory in proportion to the pixel count its header claims, not to the file's size (a
# 30 KB PNG can claim 20,000 x 20,000 pixels). Every image tlkit reads is refused above this bound, before decoding:
# 64 megapixels (a 9,248 x 6,936 photo, larger than phone cameras save by default) is 256 MB at 4 bytes per pixel.
MAX_DECODE_PIXELS = 64_000_000


class ImageTooLargeError(ValueError):
    """An image file claims more pixels than tlkit decodes (``MAX_DECODE_PIXELS``)."""


def check_decode_size(image: Image.Image, name: object = "image", max_pixels: int = MAX_DECODE_PIXELS) -> None:
    """Refuse ``image`` (opened, not yet decoded) when its header claims more than ``max_pixels`` pixels."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} claims {width:,} x {height:,} pixels, more than tlkit decodes ({max_pixels:,}, "
            f"tlkit.transforms.MAX_DECODE_PIXELS, about {4 * max_pixels // 2**20} MB decoded): downscale it first."
        )


def read_image_file(path, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """The image at ``path`` as an upright RGB Pillow image (``to_rgb``), refused before decoding when it is too large."""
    with Image.open(path) as image:
        check_decode_size(image, path, max_pixels)
        return to_rgb(image)


# --- eval transform and training presets -------------------------------------------------------------


# Activations, memory and time grow with the square of image_size. No built-in backbone was trained above 600 px
# (torchvision's EfficientNet-B7; the others at 224 to 528), and timm's largest pretrained weights at 1024 px.
MAX_IMAGE_SIZE = 1024


def _check_image_size(image_size: int) -> None:
    """Every entry point that takes an image_size (the transforms, ``models.check_image_size``, ``RunConfig``) checks here.

    The backbone's own minimum (tlkit.models.check_image_size) is checked when the model sees the images.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a whole number of pixels >= 1 (e.g. 224), got {image_size!r}.")
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is over the largest tlkit accepts, {MAX_IMAGE_SIZE} pixels "
            f"(tlkit.transforms.MAX_IMAGE_SIZE): memory and time grow with its square ({image_size} px costs "
            f"{(image_size / 224) ** 2:.0f}x what 224 px does), and no built-in backbone was trained above 600 px "
            f"(timm's largest pretrained weights: 1024 px). Use the size the weights were trained at (224 for most)."
        )


def eval_transform(image_size: int, norm: Normalization) -> v2.Compose:
    """Deterministic preset: EXIF orientation (``Upright``), resize the short side, center-crop a square, scale to [0, 1], normalize.

    The resize follows the weights' own preprocessing (``norm.crop_pct`` and ``norm.interpolation``, from timm's
    config for ``timm:`` backbones; the built-in backbones resize straight to ``image_size``, bilinear).
    """
    _check_image_size(image_size)
    return v2.Compose(
        [
            Upright(),
            v2.ToImage(),
            v2.Resize(norm.resize_size(image_size), interpolation=norm.interpolation_mode, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(norm.mean), list(norm.std)),
        ]
    )



TTA_VIEWS = ("flip", "flip_crops")  # test-time augmentation: 2 views, or 10 (the ten-crop of the ResNet papers)
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


class CornerCrop(torch.nn.Module):
    """Crop ``size`` x ``size`` from one corner (a deterministic view; the repr names it, so caches keyed by it stay valid)."""

    def __init__(self, size: int, corner: str) -> None:
        super().__init__()
        if corner not in _CORNERS:
            raise ValueError(f"Unknown corner {corner!r}; choose one of {', '.join(_CORNERS)}.")
        self.size, self.corner = size, corner

    def forward(self, image):
        from torchvision.transforms.v2 import functional as F

        height, width = F.get_size(image)
        top = 0 if self.corner.startswith("top") else height - self.size
        left = 0 if self.corner.endswith("left") else width - self.size
        return F.crop(image, top, left, self.size, self.size)

    def __repr__(self) -> str:
        return f"CornerCrop(size={self.size}, corner={self.corner!r})"


class Mirror(torch.nn.Module):
    """Flip left-right, always (a deterministic view, unlike ``v2.RandomHorizontalFlip``)."""

    def forward(self, image):
        from torchvision.transforms.v2 import functional as F

        return F.horizontal_flip(image)

    def __repr__(self) -> str:
        return "Mirror()"


def tta_transforms(image_size: int, norm: Normalization, views: str = "flip") -> list[v2.Compose]:
    """The deterministic views of test-time augmentation, each a full eval transform: ``"flip"`` is the eval view and
    its mirror; ``"flip_crops"`` adds the four corner crops of the image resized 1/0.875 times larger (as the centre
    crop of ImageNet evaluation), each also mirrored: 10 views. A prediction averages the probabilities of all views."""
    if views not in TTA_VIEWS:
        raise ValueError(f"Unknown test-time views {views!r}; choose one of {', '.join(TTA_VIEWS)}.")
    base = eval_transform(image_size, norm)
    steps = list(base.transforms)
    crop_at = next(i for i, t in enumerate(steps) if isinstance(t, v2.CenterCrop))
    crops = [steps[crop_at]]
    if views == "flip_crops":
        steps[crop_at - 1] = v2.Resize(round(image_size / 0.875), interpolation=norm.interpolation_mode, antialias=True)
        crops = [v2.CenterCrop(image_size), *(CornerCrop(image_size, corner) for corner in _CORNERS)]
    made = []
    for crop in crops:
        for mirror in (False, True):
            view = [*steps[:crop_at], crop, *([Mirror()] if mirror else []), *steps[crop_at + 1:]]
            made.append(v2.Compose(view))
    if views == "flip":
        made[0] = base  # the plain eval view itself
    return made

def check_preset(preset: str) -> str:
    """``preset`` if it is a known preset name, else a ValueError listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown augmentation preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    return preset


def random_steps(preset: str, image_size: int, *, hflip: bool = True) -> tuple[list[v2.Transform], list[v2.Transform]]:
    """The random steps of ``preset``: (steps on uint8 images, steps after normalization)."""
    check_preset(preset)
    if preset == "none":
        return [], []
    crop = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True)]
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    policy = {
        "basic": [],
        "strong": [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05)],
        "trivialaugment": [v2.TrivialAugmentWide()],
        "randaugment": [v2.RandAugment(num_ops=2, magnitude=9)],
    }[preset]
    after = [v2.RandomErasing(p=0.25, scale=(0.02, 0.15))] if preset == "strong" else []
    return crop + flip + policy, after


def resize_steps(image_size: int) -> list[v2.Transform]:
    # Upright first, as in eval_transform: a phone photo opened directly is turned as its EXIF tag says.
    return [Upright(), v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def normalize_steps(norm: Normalization) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(norm.mean), list(norm.std))]


def train_transform(image_size: int, norm: Normalization, preset: str = "basic", *, hflip: bool = True) -> v2.Compose:
    """The training preset: PIL image -> normalized float tensor with ``preset``'s augmentation (one of ``PRESETS``).

    'none' is exactly the eval transform; 'basic' adds a random resized crop and (``hflip``) a horizontal flip.
    """
    _check_image_size(image_size)
    if check_preset(preset) == "none":
        return eval_transform(image_size, norm)
    before, after = random_steps(preset, image_size, hflip=hflip)
    return v2.Compose(resize_steps(image_size) + before + normalize_steps(norm) + after)


def preset_table(image_size: int, *, hflip: bool = True) -> dict[str, str]:
    """For each preset, its random steps by name (what it adds to the eval transform)."""
    table = {}
    for preset in PRESETS:
        before, after = random_steps(preset, image_size, hflip=hflip)
        table[preset] = " -> ".join(type(step).__name__ for step in before + after) or "(eval transform only)"
    return table


# Transforms that give the same output for the same input: a pipeline of only these allows caching.
_DETERMINISTIC_TRANSFORMS = (
    Upright,
    CornerCrop,
    Mirror,
    v2.ToImage,
    v2.PILToTensor,
    v2.ToPureTensor,
    v2.Resize,
    v2.CenterCrop,
    v2.ToDtype,
    v2.Normalize,
    v2.Grayscale,
    v2.RGB,
)


def is_deterministic(transform: Callable | None) -> bool:
    """True if ``transform`` is None or a v2.Compose made only of deterministic steps."""
    if transform is None:
        return True
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return all(isinstance(step, _DETERMINISTIC_TRANSFORMS) for step in steps)


# --- a test set framed differently: one fixed, seeded re-framing per image ----------------------------

# The ranges a re-framed test photo is drawn from (``reframing``): zoom in and out, shifted, turned a little,
# mirrored half the time, its colours changed. Crops stay moderate for the same reason as in the presets: a
# crop that cuts the sleeves off a long-sleeve shows a t-shirt.
REFRAMING = {"zoom": (0.8, 1.4), "shift": 0.1, "angle": 12.0, "brightness": (0.75, 1.25), "contrast": (0.75, 1.25),
             "saturation": (0.6, 1.4), "hue": 0.04}


def reframing(seed: int, index: int) -> dict[str, float | bool]:
    """The re-framing of test image ``index`` under ``seed``: zoom, shift (fractions of the side), angle (degrees),
    mirror, colour factors. The same (seed, index) always gives the same values, whatever the order of the images."""
    rng = np.random.default_rng([seed, index])
    zoom_low, zoom_high = REFRAMING["zoom"]
    shift, hue = REFRAMING["shift"], REFRAMING["hue"]
    return {
        "zoom": float(np.exp(rng.uniform(np.log(zoom_low), np.log(zoom_high)))),  # >1 zooms in (a crop), <1 out
        "shift_x": float(rng.uniform(-shift, shift)), "shift_y": float(rng.uniform(-shift, shift)),
        "angle": float(rng.uniform(-REFRAMING["angle"], REFRAMING["angle"])),
        "mirror": bool(rng.random() < 0.5),
        "brightness": float(rng.uniform(*REFRAMING["brightness"])), "contrast": float(rng.uniform(*REFRAMING["contrast"])),
        "saturation": float(rng.uniform(*REFRAMING["saturation"])), "hue": float(rng.uniform(-hue, hue)),
    }


def _border_colour(square: Image.Image) -> list[int]:
    """The median colour of the image's outermost pixels: what a zoomed-out or turned photo is filled with
    (product photos stand on a plain background, so the fill continues it)."""
    pixels = np.asarray(square)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return [int(v) for v in np.median(border, axis=0)]


def reframe(image: Image.Image, params: dict[str, float | bool], size: int) -> Image.Image:
    """``image`` framed as ``params`` says (from ``reframing``), as a ``size`` x ``size`` RGB image.

    The square centre of the photo (what the eval transform sees) is worked on at twice ``size``, so that zooming
    in does not blur it, then scaled down: zoom, shift and turn in one affine step (the uncovered corners take the
    border colour), then the mirror and the colour changes.
    """
    from torchvision.transforms.v2 import functional as F

    _check_image_size(size)
    image = to_rgb(image)
    side, work = min(image.size), 2 * size
    square = F.resize(F.center_crop(image, [side, side]), [work, work], antialias=True)
    square = F.affine(square, angle=params["angle"], translate=[round(params["shift_x"] * work), round(params["shift_y"] * work)],
                      scale=params["zoom"], shear=[0.0, 0.0], interpolation=v2.InterpolationMode.BILINEAR, fill=_border_colour(square))
    if params["mirror"]:
        square = F.horizontal_flip(square)
    square = F.adjust_brightness(square, params["brightness"])
    square = F.adjust_contrast(square, params["contrast"])
    square = F.adjust_saturation(square, params["saturation"])
    square = F.adjust_hue(square, params["hue"])
    return F.resize(square, [size, size], antialias=True)
