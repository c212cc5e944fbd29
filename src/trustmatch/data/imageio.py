"""One conversion of any decoded image to the 8-bit RGB (or grayscale) the networks read.

Classification (``folders.decode_image``), segmentation (``seg_sets.read_image``) and both
``predict`` paths call it, so an image is converted the same way in training and inference:

- 16-bit and 32-bit grayscale (PIL modes ``I;16*``, ``I``, ``F``) are *scaled* to 8 bits from the
  file's full range (``I;16``: x / 65535 * 255, as an image viewer shows it), never clipped: PIL's own
  ``convert("RGB")`` saturates every value above 255 to white. ``I`` holding values above 16 bits and
  ``F`` outside [0, 1] are scaled by the image's own maximum. (16-bit RGB and RGBA PNGs are already
  reduced to 8 bits by PIL's decoder.)
- Transparency (RGBA, LA, PA, a palette or grayscale image with a transparent colour) is composited
  over white, as a viewer on a white page shows it: the colours stored under fully transparent pixels
  are arbitrary (often black, often left over from editing) and must not reach the network.
- Grayscale, palette, bilevel and CMYK images go through PIL's ``convert``.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255, 255)  # what transparent pixels become
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# PIL reports some damaged files (a truncated TIFF strip) with a UserWarning before it raises: the
# error that follows names the file in one line, so the warning would only add lines to stderr.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` as 8-bit ``mode`` ("RGB" or "L"): high bit depths scaled, transparency composited over white."""
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_scaled_gray(image)).convert(mode)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image.convert(mode)


def _scaled_gray(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a 16/32-bit integer or float image, scaled from its range (not clipped at 255)."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(pixels.max(initial=0.0))
    if image.mode == "F":
        peak = 1.0 if top <= 1.0 else top
    elif image.mode.startswith("I;16"):
        peak = 65535.0
    else:  # "I": 32-bit integers, usually 16-bit data
        peak = 65535.0 if top <= 65535.0 else top
    return np.clip(np.rint(pixels * (255.0 / peak)), 0, 255).astype(np.uint8)


def decode_reason(error: Exception) -> str:
    """PIL's reason for a file it cannot read, short (the caller names the file)."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
