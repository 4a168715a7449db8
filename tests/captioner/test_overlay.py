"""Attention heatmaps: stretched over the whole picture, hot where the model looked."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.overlay import caption_sheet, drop_attention, heatmap_overlay, prepare_with_picture
from captioner.predictor import Predictor


def warmth(image: Image.Image, xy) -> int:
    """Red minus blue: the colormap runs from dark blue (cold) to red and yellow (hot)."""
    r, _, b = image.getpixel(xy)
    return r - b


def one_hot_grid(h, w, row, col):
    grid = np.zeros((h, w), dtype=np.float32)
    grid[row, col] = 1.0
    return grid


@pytest.mark.parametrize("size", [(300, 100), (90, 200)])
def test_overlay_keeps_the_picture_size_and_covers_it_whole(size):
    picture = Image.new("RGB", size, (128, 128, 128))
    corner = heatmap_overlay(picture, one_hot_grid(7, 7, 6, 6))  # the bottom-right cell
    assert corner.size == size and corner.mode == "RGB"
    w, h = size
    assert warmth(corner, (w - 2, h - 2)) > warmth(corner, (1, 1)) + 100
    assert warmth(corner, (w - 2, h - 2)) > warmth(corner, (w // 2, h // 2)) + 100


def test_the_hottest_region_lands_where_its_cell_is():
    picture = Image.new("RGB", (160, 80), (0, 0, 0))
    grid = one_hot_grid(4, 8, 1, 2)  # row 1 of 4, column 2 of 8: x in [40, 60), y in [20, 40)
    overlay = np.asarray(heatmap_overlay(picture, grid, opacity=1.0)).astype(int)
    heat = overlay[..., 0] - overlay[..., 2]
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 40 <= x < 60 and 20 <= y < 40


def test_opacity_blends_between_picture_and_heat():
    picture = Image.new("RGB", (20, 20), (10, 200, 30))
    grid = np.full((2, 2), 0.25)
    assert heatmap_overlay(picture, grid, opacity=0.0).getpixel((5, 5)) == (10, 200, 30)
    assert heatmap_overlay(picture, grid, opacity=1.0).getpixel((5, 5)) != (10, 200, 30)


@pytest.mark.parametrize("grid", [np.zeros((3, 3)), torch.full((7, 7), 1 / 49), [[0.5, 0.5]]])
def test_flat_grids_tensors_and_lists_are_drawn(grid):
    overlay = heatmap_overlay(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), grid)
    assert overlay.size == (30, 20)
    values = np.asarray(overlay)
    assert (values == values[0, 0]).all()  # uniform attention: one colour everywhere


@pytest.mark.parametrize("num_words", [0, 1, 4, 9])
def test_caption_sheet_has_the_picture_and_one_tile_per_word(num_words):
    tokens = [f"w{i}" for i in range(num_words)]
    grids = [one_hot_grid(7, 7, i % 7, i % 7) for i in range(num_words)]
    sheet = caption_sheet(Image.new("RGB", (640, 480), (90, 90, 90)), tokens, grids, tile=100)
    tiles = num_words + 1
    cols = min(tiles, 5)
    rows = -(-tiles // cols)
    assert sheet.size == (cols * 100, rows * (100 + 18))
    assert sheet.mode == "RGB"


def test_caption_sheet_tiles_are_the_heatmaps():
    sheet = caption_sheet(
        Image.new("RGB", (100, 100), (0, 0, 0)),
        ["left", "right"],
        [one_hot_grid(2, 2, 0, 0), one_hot_grid(2, 2, 0, 1)],
        tile=100,
    )
    assert warmth(sheet, (100 + 10, 10)) > warmth(sheet, (100 + 90, 10))  # "left" looks top-left
    assert warmth(sheet, (200 + 90, 10)) > warmth(sheet, (200 + 10, 10))  # "right" looks top-right


def turned_jpeg(size=(1600, 1200)) -> bytes:
    """A large photo stored `size`, turned a quarter by EXIF."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_a_picture_for_overlays_comes_from_the_same_decode_and_is_no_larger_than_asked(tiny_model):
    predictor = Predictor(tiny_model)
    photo = turned_jpeg()
    prepared, picture = prepare_with_picture(predictor, photo, 64)
    assert (prepared.width, prepared.height) == (1200, 1600)  # the user's picture, upright
    assert picture.size == (48, 64)  # its shape, longest side 64
    alone, none = prepare_with_picture(predictor, photo, None)
    assert none is None and (alone.width, alone.height) == (1200, 1600)
    assert alone.pixels.shape == prepared.pixels.shape


def test_dropping_attention_leaves_the_rest_of_the_result(tiny_model):
    predictor = Predictor(tiny_model)
    [result] = predictor.caption(
        [Image.new("RGB", (40, 30), (200, 30, 30))],
        DecodeOptions(method="beam", beam_size=2, num_captions=2, attention=True),
    )
    assert all("attention" in c for c in result["captions"])
    [expected] = predictor.caption(
        [Image.new("RGB", (40, 30), (200, 30, 30))], DecodeOptions(method="beam", beam_size=2, num_captions=2)
    )
    drop_attention(result)
    assert result == expected
