"""Fixtures for the core's tests: real tiny models with random weights, and real image files.

Nothing here is a mock: the property tests run the same code a trained model runs,
only smaller, so they take milliseconds.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.decoder import Decoder
from captioner.model import CaptionModel, build_model
from captioner.vocab import Vocabulary
from tests.conftest import TINY_CAPTIONS, tiny_config

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture
def one_torch_thread():
    """These tensors are tiny: extra threads only add synchronisation, which on a busy
    2-core machine made a greedy decode 100x slower. Restored after each test; modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_model():
    """build(seed=0, vocab=None, **config_overrides) -> a tiny model in eval mode."""

    def build(seed: int = 0, vocab: Vocabulary | None = None, **overrides) -> CaptionModel:
        torch.manual_seed(seed)
        return build_model(tiny_config(**overrides), vocab or Vocabulary.build(TINY_CAPTIONS)).eval()

    return build


def random_images(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """(n, 3, size, size) normalised pixels; each image has its own colour and contrast, so the
    encoder tells them apart (noise of one distribution gives nearly the same mean region)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randn(n, 3, 1, 1, generator=generator)
    contrast = 2 * torch.rand(n, 1, 1, 1, generator=generator)
    return colour + contrast * torch.randn(n, 3, size, size, generator=generator)


@torch.no_grad()
def region_features(model: CaptionModel, n: int, seed: int = 0) -> torch.Tensor:
    """(n, P, D) from the model's own encoder."""
    return model.encoder(random_images(n, seed, model.encoder.image_size))


@torch.no_grad()
def vary_caption_lengths(model: CaptionModel, features: torch.Tensor, max_length: int = 8) -> int:
    """Make a random model stop at different steps for different images; returns how many lengths.

    A freshly initialised decoder is nearly uniform: its greedy captions are all empty or all
    `max_length` long. Its weights are scaled up (an opinionated random model), then the <end>
    bias that gives greedy captions of `features` the most distinct lengths is kept.
    """
    from captioner.decoding import greedy

    for name, parameter in model.decoder.named_parameters():
        if "norm" not in name:
            parameter.mul_(3.0)
    memory = model.decoder.prepare(features)
    end = model.vocab.end_id
    best_count, best_bias = 0, 0.0
    for bias in torch.arange(-4.0, 8.0, 0.25).tolist():
        model.decoder.out.bias[end] = bias
        count = len({len(h.token_ids) for h in greedy(model.decoder, memory, max_length)})
        if count > best_count:
            best_count, best_bias = count, bias
    model.decoder.out.bias[end] = best_bias
    return best_count


def image_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _palette_with_transparency() -> Image.Image:
    """Left half index 0 (transparent), right half index 1 (red)."""
    image = Image.new("P", (40, 30), 0)
    image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    image.paste(1, (20, 0, 40, 30))
    return image


def _animated_gif() -> bytes:
    """Two frames: red, then blue; the first one is what counts."""
    frames = [Image.new("RGB", (40, 30), c).convert("P", palette=Image.Palette.ADAPTIVE) for c in (RED, BLUE)]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 30 high with a red left half; EXIF orientation 6 says "rotate 90 degrees clockwise"."""
    image = Image.new("RGB", (40, 30), BLUE)
    image.paste(RED, (0, 0, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(image, "JPEG", exif=exif, quality=95)


def _sixteen_bit() -> Image.Image:
    values = np.full((30, 40), 65535, dtype=np.uint16)
    values[:, :20] = 0
    return Image.fromarray(values)


# name -> (file bytes, (x, y) to probe in the decoded RGB picture, expected colour there).
# Transparent pixels are composited onto white.
IMAGE_CASES = {
    "jpeg_L": (lambda: image_bytes(Image.new("L", (40, 30), 255), "JPEG"), (5, 5), WHITE),
    "jpeg_RGB": (lambda: image_bytes(Image.new("RGB", (40, 30), RED), "JPEG", quality=95), (5, 5), RED),
    "jpeg_CMYK": (
        lambda: image_bytes(Image.new("RGB", (40, 30), RED).convert("CMYK"), "JPEG", quality=95),
        (5, 5),
        RED,
    ),
    "png_RGBA": (lambda: image_bytes(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"), (5, 5), WHITE),
    "png_LA": (lambda: image_bytes(Image.new("LA", (40, 30), (0, 0)), "PNG"), (5, 5), WHITE),
    "png_P_transparent": (lambda: image_bytes(_palette_with_transparency(), "PNG", transparency=0), (5, 5), WHITE),
    "png_P_opaque_half": (lambda: image_bytes(_palette_with_transparency(), "PNG", transparency=0), (35, 5), RED),
    "png_I16": (lambda: image_bytes(_sixteen_bit(), "PNG"), (35, 5), WHITE),
    "png_I16_dark_half": (lambda: image_bytes(_sixteen_bit(), "PNG"), (5, 5), (0, 0, 0)),
    "gif_animated": (_animated_gif, (5, 5), RED),
    "webp": (lambda: image_bytes(Image.new("RGB", (40, 30), RED), "WEBP", lossless=True), (5, 5), RED),
    "bmp": (lambda: image_bytes(Image.new("RGB", (40, 30), RED), "BMP"), (5, 5), RED),
    "jpeg_exif_orientation_6": (_exif_rotated_jpeg, (15, 5), RED),  # the red half is now on top
}

# The Pillow mode each case really is on disk, so a case cannot silently test something easier.
IMAGE_MODES = {
    "jpeg_L": "L",
    "jpeg_RGB": "RGB",
    "jpeg_CMYK": "CMYK",
    "png_RGBA": "RGBA",
    "png_LA": "LA",
    "png_P_transparent": "P",
    "png_P_opaque_half": "P",
    "png_I16": "I;16",
    "png_I16_dark_half": "I;16",
    "gif_animated": "P",
    "webp": "RGB",
    "bmp": "RGB",
    "jpeg_exif_orientation_6": "RGB",
}


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Every case of IMAGE_CASES written to a real file: name -> path."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (make, _, _) in IMAGE_CASES.items():
        paths[name] = folder / f"{name}.img"
        paths[name].write_bytes(make())
    return paths


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def step_rows(monkeypatch):
    """The number of rows of every decoder step."""
    rows = []
    real_step = Decoder.step

    def spy(self, words, state, memory):
        rows.append(words.size(0))
        return real_step(self, words, state, memory)

    monkeypatch.setattr(Decoder, "step", spy)
    return rows
