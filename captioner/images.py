"""Reading user images safely, and the one preprocessing preset every path shares.

Any mode Pillow opens comes out as 8-bit RGB: EXIF orientation applied, alpha
composited onto white, 16-bit and float scaled, CMYK converted, the first frame
of an animation. The pixel count is checked from the header, before decoding,
so a decompression bomb costs nothing.
"""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")  # the file names of FORMATS
# Raised whenever the pixels an image gives change, so that features computed from the old
# pixels (training's feature caches) are not reused. 2: torch's resize instead of Pillow's.
PIXELS_VERSION = 2
ORIENTATION = 0x0112  # the EXIF tag; 5 to 8 turn the picture a quarter
ImageSource = bytes | str | Path | Image.Image


class ImageError(ValueError):
    """An input that is not a usable image; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # pickled with both arguments: folder captioning sends them to its lanes
        return ImageError, (self.code, self.message)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # width * height, checked before decoding
    formats: tuple[str, ...] = FORMATS  # the only formats whose headers Pillow even tries to read
    max_decode_bytes: int | None = None  # memory decoding one image may take (decode_bytes), checked before
    rle_bmp: bool = True  # RLE-compressed BMP: Pillow decodes it in Python, slowly and holding the GIL


# Memory open_image and ImagePreset take at their peak, per pixel of the decoded picture, measured
# (ru_maxrss) on PNG, BMP and JPEG pictures of 25 to 40 megapixels: the RGB picture Pillow keeps
# in 4 bytes a pixel, the array the preset makes of it and that array's copy (3 + 3); blending
# alpha onto white holds an RGBA picture, a white one and their blend (4 each) with the RGB one.
PEAK_BYTES_PER_PIXEL = 10
PEAK_BYTES_PER_PIXEL_WITH_ALPHA = 17
ROWS_BYTES = 4 * 1024 * 1024  # 16-bit and float pictures are scaled to 8 bits this many source bytes at a time


def decode_bytes(image: Image.Image) -> int:
    """About the most memory decoding and preprocessing `image` takes, from its header alone (and
    a JPEG's reduced scale, once draft() has chosen it)."""
    width, height = image.size
    alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    return width * height * (PEAK_BYTES_PER_PIXEL_WITH_ALPHA if alpha else PEAK_BYTES_PER_PIXEL)


def open_image(source: ImageSource, limits: ImageLimits = ImageLimits(), min_size: int | None = None) -> Image.Image:
    """An 8-bit RGB image from bytes, a path or a PIL image; ImageError on anything else.

    With `min_size`, a JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8
    scales that keeps both sides >= min_size: much faster for a model
    that only wants min_size pixels, and still the whole picture. The picture's
    full size (upright) is then in `info["full_size"]`.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                data = f.read(limits.max_bytes + 1)
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {source}: {e.strerror or e}") from e
    else:
        data = source
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"the file is over {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # reads the header only, and only with the plugins of the accepted formats (MPO: JPEG's)
            image = Image.open(io.BytesIO(data), formats=limits.formats)
    except UnidentifiedImageError as e:
        raise ImageError(
            "unsupported_format",
            f"not an image Pillow can identify among the accepted formats ({', '.join(limits.formats)})",
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except Exception as e:  # truncated headers raise anything from OSError to struct.error
        raise ImageError("corrupt_image", f"cannot read the image header: {e}") from e
    fmt = "JPEG" if image.format == "MPO" else image.format  # MPO: a JPEG with more pictures appended (phones)
    if fmt not in limits.formats:
        raise ImageError("unsupported_format", f"{fmt} images are not accepted; use one of {', '.join(limits.formats)}")
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} is over the limit of {limits.max_pixels} pixels")
    if fmt == "BMP" and image.info.get("compression") in (1, 2) and not limits.rle_bmp:
        raise ImageError(
            "unsupported_format",
            "RLE-compressed BMP is not accepted (Pillow decodes it slowly, in Python); send it uncompressed, or as PNG",
        )
    try:
        image.seek(0)  # the first frame of an animation
        if min_size and fmt == "JPEG":
            image.draft(image.mode, (min_size, min_size))
    except Exception as e:
        raise ImageError("corrupt_image", f"cannot decode the image: {e}") from e
    needed = decode_bytes(image)
    if limits.max_decode_bytes is not None and needed > limits.max_decode_bytes:
        raise ImageError(
            "too_much_memory",
            f"{width}x{height} in mode {image.mode} takes about {needed >> 20} MiB "
            f"to decode, over the limit of {limits.max_decode_bytes >> 20} MiB",
        )
    try:
        image.load()
        upright = (height, width) if image.getexif().get(ORIENTATION) in (5, 6, 7, 8) else (width, height)
        rgb = to_rgb(image)
    except Exception as e:
        raise ImageError("corrupt_image", f"cannot decode the image: {e}") from e
    rgb.info["full_size"] = upright
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, upright, alpha over white."""
    if image.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even an upright picture
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8_bit(image)
    # "transparency" marks one palette index, gray level or colour as transparent (GIF, PNG tRNS)
    if (image.mode in ("P", "L", "RGB") and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float picture as 8-bit "L": 16-bit scaled from 0..65535, the others
    from 0..255 unless they go beyond it. Scaled a band of rows at a time, so the float64 copies
    the arithmetic needs are a few megabytes, not 8 bytes for every pixel of the picture."""
    width, height = image.size
    peak = cast(float, image.getextrema()[1]) if width and height else 0  # one band: (low, high)
    scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or peak > 255 else 1.0
    out = np.empty((height, width), dtype=np.uint8)  # (H, W)
    rows = max(1, ROWS_BYTES // (8 * max(width, 1)))
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float64)  # (rows, W)
        out[top : top + rows] = np.clip(band * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


@dataclass(frozen=True)
class ImagePreset:
    """Resize to S x S (no crop: a grid cell maps onto the user's picture) and normalise.

    Training, evaluation and serving all use this, so they see the same pixels.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) normalised pixels, laid out channels-last in memory as the encoder wants them."""
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) uint8, channels-last
        # Antialiased bilinear, as Pillow's resize (to within one level), in less time on uint8
        resized = F.interpolate(rgb, (self.size, self.size), mode="bilinear", antialias=True)  # (1, 3, S, S)
        x = resized[0].permute(1, 2, 0).contiguous().float()  # (S, S, 3), 0..255
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:  # scalar ops: much faster than per-channel ones
            x.sub_(255 * self.mean[0]).div_(255 * self.std[0])
        else:
            x.sub_(255 * torch.tensor(self.mean)).div_(255 * torch.tensor(self.std))
        return x.permute(2, 0, 1)  # (3, S, S)


def stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """A batch (B, 3, S, S) of ImagePreset outputs, channels-last: one copy, no transposition."""
    return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)
