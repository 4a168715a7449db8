"""Attention drawn over the picture: heatmaps for the web page, the API and the folder CLI, and
the picture and the grids that drawing them needs."""

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .decoding import DecodeOptions
from .images import ImageError, ImageSource, open_image
from .predictor import Predictor, PreparedImage


def prepare_with_picture(
    predictor: Predictor, source: ImageSource, picture_size: int | None
) -> tuple[PreparedImage, Image.Image | None]:
    """The model's input and, when `picture_size` is given, the picture no larger than that for
    overlays, both from one decode. A JPEG is decoded only as large as the model and the overlays
    need (libjpeg's reduced scales): about half the time of a full decode for a 12-megapixel photo.
    Raises ImageError for anything unusable."""
    if picture_size is None:
        return predictor.prepare(source), None
    picture = open_image(source, predictor.limits, min_size=max(predictor.preset.size, picture_size))
    prepared = predictor.prepare(picture)
    picture.thumbnail((picture_size, picture_size))
    return prepared, picture


Captioned = tuple[dict, Image.Image | None]  # an image's result, and its picture when overlays are drawn


def caption_with_pictures(
    predictor: Predictor, sources: Sequence[ImageSource], options: DecodeOptions, picture_size: int | None
) -> list[Captioned | ImageError]:
    """Each source's result and picture (`prepare_with_picture`), or the ImageError that made it
    unusable, in order; the usable ones captioned in one call, so a bad image costs the others nothing."""
    readied: list[tuple[PreparedImage, Image.Image | None] | ImageError] = []
    for source in sources:
        try:
            readied.append(prepare_with_picture(predictor, source, picture_size))
        except ImageError as e:
            readied.append(e)
    usable = [r for r in readied if not isinstance(r, ImageError)]
    results = iter(predictor.caption_batch([image for image, _ in usable], options))
    return [r if isinstance(r, ImageError) else (next(results), r[1]) for r in readied]


def drop_attention(result: dict) -> None:
    """Remove the attention grids from a result that did not ask for them: decoding keeps them
    whenever overlays are drawn, and they are most of a result's size."""
    for caption in result["captions"]:
        caption.pop("attention", None)


def _colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB (H, W, 3) uint8, dark blue -> red -> yellow."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    anchors = np.array([[20, 20, 120], [40, 120, 220], [230, 60, 40], [255, 230, 60]], dtype=np.float64)
    x = v * (len(anchors) - 1)
    low = np.floor(x).astype(int).clip(0, len(anchors) - 2)
    frac = x - low
    rgb = anchors[low[..., 0]] * (1 - frac) + anchors[low[..., 0] + 1] * frac
    return rgb.astype(np.uint8)


def heatmap_overlay(image: Image.Image, grid, opacity: float = 0.55) -> Image.Image:
    """The attention grid (h, w), stretched over the whole image (no crop), blended onto it."""
    grid = np.asarray(grid, dtype=np.float32)  # (h, w)
    peak = float(grid.max()) or 1.0
    small = Image.fromarray((grid / peak * 255).astype(np.uint8), mode="L")
    smooth = np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    heat = Image.fromarray(_colormap(smooth))
    return Image.blend(image.convert("RGB"), heat, opacity)


def png_data_uri(image: Image.Image) -> str:
    """The image as a PNG data URI, the form a web page shows directly."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def caption_sheet(image: Image.Image, tokens: list[str], attention, tile: int = 224) -> Image.Image:
    """One PNG-able sheet: the picture with its caption, then one heatmap per word."""
    font = ImageFont.load_default()
    label = 18
    base = image.convert("RGB")
    base.thumbnail((tile, tile))
    tiles = [(base, " ".join(tokens) or "(empty caption)")]
    tiles += [(heatmap_overlay(base, grid), word) for word, grid in zip(tokens, attention)]
    cols = min(len(tiles), 5)
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (picture, text) in enumerate(tiles):
        x, y = (i % cols) * tile, (i // cols) * (tile + label)
        sheet.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
        draw.text((x + 4, y + tile + 3), text[: tile // 6], fill=(0, 0, 0), font=font)
    return sheet
