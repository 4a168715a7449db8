"""Attention drawn over the picture: heatmaps for the web page, the API and the folder CLI."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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
