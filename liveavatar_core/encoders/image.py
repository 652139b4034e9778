"""Reference image -> `[3, H, W]` float32 in [-1, 1] at the output size (spec/pipeline.md 2.1-2.2).

This is the one home of the size rule. The size argument ("704*384") only selects a pixel *area*;
the orientation and aspect ratio come from the image, and the output (H, W) is the official
64-multiple search (`output_size`), which never scales the image up to fill the area. Everything
that needs the output size (the run planner, the CLI, the nodes) asks `choose_output_size` for it.
The pixels then follow torchvision's `Resize(min(H, W))` + `CenterCrop((H, W))` + `ToTensor()*2-1`,
reproduced with PIL and numpy.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

logger = logging.getLogger("liveavatar")

# Official `--size` choices for s2v-14B (wan_2_2/configs MAX_AREA_CONFIGS) plus the transposed
# spellings users type; only W*H matters. Other "W*H" strings are accepted as custom areas.
SIZE_PRESETS: tuple[str, ...] = (
    "1280*720", "720*1280", "1280*704", "704*1280", "480*832", "832*480", "1024*704", "704*1024",
    "704*384", "384*704", "720*400", "400*720", "688*368", "368*688", "384*256", "256*384",
)
DEFAULT_SIZE = "704*384"
DIVISOR = 64
# The DiT patchifies 16-px squares (8x VAE, 2x patch); a smaller image has no content to place.
MIN_IMAGE_SIDE = 16
_SEARCH_STEPS = 100
# Below this fraction of the requested area the output is much smaller than asked: say so.
SMALL_OUTPUT_FRACTION = 0.5
SIZE_RULE = ("the size is a pixel area, not an exact width x height: the orientation and aspect ratio "
             "follow the image, and a small image is never upscaled to fill the area (a 128x72 image at "
             "704*384 gives a 128x128 video)")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX×]\s*(\d+)\s*$")


def parse_size(size: str | tuple[int, int], input_name: str = "size") -> tuple[int, int]:
    """'704*384', '704x384', '704×384', '704 X 384' (spaces allowed) -> (W, H); W*H is the target area."""
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        w, h = size
    else:
        match = _SIZE_RE.match(size) if isinstance(size, str) else None
        if match is None:
            raise InputError(input_name, f"cannot read {size!r} as a size.",
                             "write it as W*H, WxH, W×H or 'W X H', e.g. one of " + ", ".join(SIZE_PRESETS) + ".")
        w, h = int(match.group(1)), int(match.group(2))
    if w * h < DIVISOR * DIVISOR:
        raise InputError(input_name, f"{w}*{h} is below the smallest output area {DIVISOR}*{DIVISOR}.",
                         f"use a larger area, e.g. {DEFAULT_SIZE}.")
    return w, h


def target_area(size: str | tuple[int, int] | int, input_name: str = "size") -> int:
    """Pixel area selected by a size string, a (W, H) pair or a plain area."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < DIVISOR * DIVISOR:
            raise InputError(input_name, f"area {size} is below the smallest output area {DIVISOR}*{DIVISOR}.",
                             f"use a larger area, e.g. {DEFAULT_SIZE}.")
        return size
    w, h = parse_size(size, input_name)
    return w * h


def format_size(size: tuple[int, int]) -> str:
    """(W, H) -> the normalised 'W*H' spelling."""
    return f"{size[0]}*{size[1]}"


def output_size(img_h: int, img_w: int, max_area: int) -> tuple[int, int]:
    """(H, W), multiples of 64, the official `get_size_less_than_area` search (spec 2.1).

    Scales from the no-padding scale down towards the maximum-padding scale in 100 steps and takes
    the first whose 64-padded size fits `max_area`; images are never upscaled.
    """
    if img_h * img_w <= max_area:
        s_hi, s_lo = 1.0, 0.1
    else:
        d = DIVISOR - 1
        a = img_h * img_w
        b = d * (img_h + img_w)
        c = d * d - max_area
        # The official solution uses 2ac where the quadratic formula has 4ac; kept, since it moves the
        # search range and therefore the chosen size.
        s_lo = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        s_hi = math.sqrt(max_area / (img_h * img_w))
    for i in range(_SEARCH_STEPS):
        scale = s_hi - (s_hi - s_lo) * i / _SEARCH_STEPS
        h = _ceil_to(int(img_h * scale), DIVISOR)
        w = _ceil_to(int(img_w * scale), DIVISOR)
        if h * w <= max_area:
            return h, w
    ratio = img_w / img_h
    w = int((max_area * ratio) ** 0.5 // DIVISOR * DIVISOR)
    h = int((max_area / ratio) ** 0.5 // DIVISOR * DIVISOR)
    if w >= img_w or h >= img_h:
        w = int(img_w // DIVISOR * DIVISOR)
        h = int(img_h // DIVISOR * DIVISOR)
    return h, w


def _ceil_to(x: int, m: int) -> int:
    return x + (m - x % m) % m


def load_image(source, input_name: str = "image") -> Image.Image:
    """RGB PIL image from a path, PIL image, uint8 array [H,W,C] or ComfyUI IMAGE [B,H,W,C] in [0,1]."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(input_name, f"file not found: {path}.", "check the path of the reference image.")
        try:
            with Image.open(path) as img:
                img.load()
                image = _to_8bit(img)
        except Image.DecompressionBombError as exc:
            raise InputError(input_name, f"{path.name} has {_megapixels(exc)}, above the "
                             f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit Pillow allows for one image "
                             "(a guard against decompression bombs).",
                             "downscale it (the output is at most 1280x720; a few megapixels are plenty).") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(input_name, f"cannot read {path.name} as an image ({exc}).",
                             "use a PNG, JPEG or WebP file.") from None
    elif isinstance(source, Image.Image):
        image = _to_8bit(source)
    elif isinstance(source, torch.Tensor):
        image = Image.fromarray(_comfy_to_uint8(source, input_name))
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(_array_to_uint8(source, input_name))
    else:
        raise InputError(input_name, f"expected a file path, PIL image, uint8 array or IMAGE tensor, got "
                         f"{type(source).__name__}.", "connect a Load Image node.")
    if image.mode != "RGB":
        # RGBA/LA/P drop alpha the way PIL's convert('RGB') does in the official pipeline.
        image = image.convert("RGB")
    if image.width < MIN_IMAGE_SIDE or image.height < MIN_IMAGE_SIDE:
        raise InputError(input_name, f"the image is {image.width}x{image.height} px, smaller than one "
                         f"{MIN_IMAGE_SIDE}-px patch in at least one side.", "use a larger reference image.")
    return image


# Pillow keeps single-channel images of more than 8 bits in these modes; its convert('RGB')
# clips them to 255 instead of scaling (a 16-bit grayscale PNG becomes all white).
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    """A copy of `image` whose high-bit-depth gray levels are scaled to 8 bits as a viewer shows them.

    16-bit (and 32-bit integer) levels keep their high byte, as Pillow already does for 16-bit RGB
    PNGs; float levels are read as [0, 1], or as 0..255 / 0..65535 when they exceed that range.
    """
    if image.mode not in _HIGH_BIT_MODES:
        return image.copy()
    levels = np.asarray(image).astype(np.float64 if image.mode == "F" else np.int64)
    if image.mode == "F":
        levels = np.nan_to_num(levels, nan=0.0)
        top = levels.max(initial=0.0)
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / 65535.0
        gray = np.clip(np.round(levels * scale), 0, 255)
    else:
        gray = np.clip(levels, 0, 65535) >> 8
    return Image.fromarray(gray.astype(np.uint8), "L")


def _megapixels(error: Exception) -> str:
    """'N megapixels' from Pillow's decompression-bomb message (it refuses before reading pixels)."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(match.group(1)) / 1e6:.0f} megapixels" if match else "too many pixels"


def _comfy_to_uint8(image: torch.Tensor, input_name: str) -> np.ndarray:
    """ComfyUI IMAGE (batch 0) -> uint8 with round(x*255), how spec 2.2 undoes LoadImage's /255."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] not in (1, 3, 4):
        raise InputError(input_name, f"an IMAGE tensor must be [batch, height, width, channels], got shape "
                         f"{tuple(image.shape)}.", "connect a Load Image node.")
    x = image[0].detach().to("cpu", torch.float32).clamp(0, 1)
    return _squeeze_gray(torch.round(x * 255).to(torch.uint8).numpy())


def _array_to_uint8(array: np.ndarray, input_name: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise InputError(input_name, f"a numpy image must be uint8 [H, W] or [H, W, 1|3|4], got {array.dtype} "
                         f"{array.shape}.", "convert it with np.asarray(pil_image).")
    return _squeeze_gray(array)


def _squeeze_gray(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def resize_and_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """torchvision `Resize(min(H, W))` then `CenterCrop((H, W))` on a PIL image, as uint8 [H, W, 3].

    Resize: the shorter side becomes min(H, W), the longer floor(min * long / short), PIL bilinear
    (PIL's own antialiasing). Crop: zero padding where the image is smaller, left/top = deficit//2,
    otherwise offset round((size - crop) / 2) (spec 2.2).
    """
    target = min(height, width)
    w0, h0 = image.size
    short, long = (w0, h0) if w0 <= h0 else (h0, w0)
    new_short, new_long = target, int(target * long / short)
    new_w, new_h = (new_short, new_long) if w0 <= h0 else (new_long, new_short)
    if (new_w, new_h) != (w0, h0):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)

    pad_h, pad_w = max(height - new_h, 0), max(width - new_w, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top = int(round((pixels.shape[0] - height) / 2.0))
    left = int(round((pixels.shape[1] - width) / 2.0))
    return pixels[top:top + height, left:left + width]


def choose_output_size(image_size: tuple[int, int], size: str | tuple[int, int] | int = DEFAULT_SIZE,
                       input_name: str = "size") -> tuple[int, int]:
    """Output (H, W) of a video made from an image of `image_size` (W, H) at the area `size`."""
    area = target_area(size, input_name)
    img_w, img_h = image_size
    height, width = output_size(img_h, img_w, area)
    if height < DIVISOR or width < DIVISOR:
        raise InputError("image", f"a {img_w}x{img_h} image is too elongated for the area {area}: no "
                         f"{DIVISOR}-multiple size keeps its aspect ratio.",
                         "crop the image closer to the subject or choose a larger size.")
    return height, width


def assumed_output_size(size: str | tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """Output (H, W) for an image shaped like the area itself ("704*384": a 704x384 image), the
    size to plan for before the reference image is known."""
    w, h = parse_size(size)
    return choose_output_size((w, h), (w, h))


def describe_output_size(image_size: tuple[int, int], size: str | tuple[int, int] | int,
                         output: tuple[int, int]) -> tuple[str, str | None]:
    """(log line, warning or None) explaining how `output` (H, W) follows from the image and area."""
    area = target_area(size)
    img_w, img_h = image_size
    height, width = output
    spelled = format_size(size) if isinstance(size, tuple) else str(size)
    line = (f"reference image {img_w}x{img_h} at size {spelled} -> output {width}x{height} (W x H); "
            f"{SIZE_RULE}")
    warning = None
    if height * width < SMALL_OUTPUT_FRACTION * area:
        warning = (f"the reference image is {img_w}x{img_h} px, much smaller than the requested area {spelled} "
                   f"({area} px): images are never upscaled, so the video is only {width}x{height}; use a "
                   "larger image for the full size.")
    return line, warning


def preprocess_reference(source, size: str | tuple[int, int] | int = DEFAULT_SIZE,
                         input_name: str = "image") -> tuple[torch.Tensor, tuple[int, int]]:
    """Reference image -> (`[3, H, W]` float32 in [-1, 1], (H, W)).

    `size` selects the area (a `parse_size` string, (W, H) or an int area); (H, W) comes from
    `choose_output_size` on the image's own aspect ratio. Cast to the VAE dtype is left to the caller.
    """
    target_area(size)
    image = load_image(source, input_name)
    height, width = choose_output_size(image.size, size)
    pixels = resize_and_crop(image, height, width)
    # ToTensor divides by 255 (not a multiply by 1/255); then *2-1, as the official pipeline does.
    tensor = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).to(torch.float32).div(255)
    line, warning = describe_output_size(image.size, size, (height, width))
    logger.info(line)
    if warning:
        logger.warning(warning)
    return tensor * 2 - 1, (height, width)


def reference_uint8(tensor: torch.Tensor) -> np.ndarray:
    """`preprocess_reference`'s `[3, H, W]` tensor in [-1, 1] back to the uint8 `[H, W, 3]` picture."""
    return ((tensor.detach().float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
