"""Reading user images: every mode to 8-bit RGB, limits checked before decoding, stable error codes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from captioner.images import (
    PEAK_BYTES_PER_PIXEL,
    ImageError,
    ImageLimits,
    ImagePreset,
    decode_bytes,
    open_image,
    stack_pixels,
)
from tests.captioner.conftest import IMAGE_CASES, IMAGE_MODES, RED, WHITE, image_bytes, png_header


def assert_colour(image: Image.Image, xy, expected, tolerance: int = 8):
    got = image.getpixel(xy)
    assert all(abs(g - e) <= tolerance for g, e in zip(got, expected)), (got, expected)


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every pixel decode; a refusal before decoding leaves the list empty."""
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return decoded


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_every_mode_is_read_from_a_file_as_8_bit_rgb(image_files, name):
    _, xy, colour = IMAGE_CASES[name]
    with Image.open(image_files[name]) as raw:
        assert raw.mode == IMAGE_MODES[name]  # the case tests the mode it claims
    image = open_image(image_files[name])
    assert image.mode == "RGB"
    assert_colour(image, xy, colour)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_bytes_paths_and_str_paths_give_the_same_picture(image_files, name):
    path = image_files[name]
    from_path = np.asarray(open_image(path))
    assert np.array_equal(np.asarray(open_image(str(path))), from_path)
    assert np.array_equal(np.asarray(open_image(path.read_bytes())), from_path)


def test_exif_orientation_is_applied():
    image = open_image(IMAGE_CASES["jpeg_exif_orientation_6"][0]())
    assert image.size == (30, 40)  # stored 40 x 30, shown rotated
    assert_colour(image, (15, 5), RED)  # the stored left half is now on top
    assert_colour(image, (15, 35), (0, 0, 255))


def test_the_first_frame_of_an_animation_is_used():
    data = IMAGE_CASES["gif_animated"][0]()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert_colour(open_image(data), (5, 5), RED)  # frame 2 is blue


def test_pil_images_are_converted_too():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert_colour(open_image(rgba), (0, 0), WHITE)
    assert open_image(Image.new("I;16", (10, 10), 65535)).getpixel((0, 0)) == WHITE
    assert open_image(Image.new("1", (10, 10), 1)).mode == "RGB"


def test_half_transparent_pixels_are_blended_onto_white():
    image = open_image(image_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert_colour(image, (0, 0), (127, 127, 127), tolerance=2)


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_transparency_in_grayscale_and_rgb_pngs_also_becomes_white(mode, colour):
    """PNG can mark one colour transparent without an alpha channel (tRNS); it is still transparent."""
    picture = Image.new(mode, (20, 10), colour)
    picture.paste(200 if mode == "L" else (200, 0, 0), (10, 0, 20, 10))
    data = image_bytes(picture, "PNG", transparency=colour)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    image = open_image(data)
    assert_colour(image, (2, 2), WHITE)
    assert_colour(image, (15, 2), (200, 200, 200) if mode == "L" else (200, 0, 0))


def test_jpegs_that_pillow_calls_mpo_are_accepted():
    """Phone cameras append a second picture (depth, preview) to a JPEG: Pillow names those MPO."""
    red, blue = Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), (0, 0, 255))
    data = image_bytes(red, "MPO", save_all=True, append_images=[blue], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert_colour(open_image(data), (5, 5), RED)


# --- limits, refused before decoding ------------------------------------------------------


def test_a_header_claiming_a_huge_picture_is_refused_before_decoding(no_decoding):
    data = png_header(30000, 30000)  # 900 megapixels claimed in 60 bytes
    with pytest.raises(ImageError) as caught:
        open_image(data, ImageLimits(max_pixels=1_000_000))
    assert caught.value.code == "too_many_pixels"
    assert no_decoding == []


def test_the_configured_pixel_limit_is_checked_from_the_header(no_decoding):
    """Under Pillow's own bomb limit, over ours: refused from the header, the pixels never decoded."""
    with pytest.raises(ImageError) as caught:
        open_image(png_header(2000, 1000), ImageLimits(max_pixels=1_999_999))
    assert caught.value.code == "too_many_pixels" and "2000x1000" in caught.value.message
    assert no_decoding == []


def test_a_picture_at_the_pixel_limit_is_accepted():
    data = image_bytes(Image.new("RGB", (40, 30), RED), "PNG")
    assert open_image(data, ImageLimits(max_pixels=40 * 30)).size == (40, 30)


def test_too_many_bytes_are_refused_from_bytes_and_from_paths(tmp_path):
    data = image_bytes(Image.new("RGB", (40, 30), RED), "BMP")
    path = tmp_path / "big.bmp"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageError) as caught:
            open_image(source, ImageLimits(max_bytes=len(data) - 1))
        assert caught.value.code == "too_large"
    assert open_image(path, ImageLimits(max_bytes=len(data))).size == (40, 30)


# --- unusable inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_truncated_files_are_corrupt_images(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(noise), fmt)
    with pytest.raises(ImageError) as caught:
        open_image(data[: len(data) // 2])
    assert caught.value.code == "corrupt_image"
    assert isinstance(caught.value, ValueError)


def test_a_corrupt_body_behind_a_good_header_is_a_corrupt_image():
    data = bytearray(image_bytes(Image.new("RGB", (64, 64), RED), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 20] = b"\xff" * 20  # the compressed pixels become garbage
    with pytest.raises(ImageError) as caught:
        open_image(bytes(data))
    assert caught.value.code == "corrupt_image"


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n"])
def test_things_that_are_not_images_are_unsupported(data):
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert caught.value.code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM"])
def test_formats_outside_the_list_are_refused_without_their_plugin_reading_them(fmt, monkeypatch):
    """Image.open tries the accepted formats' plugins only: a TIFF header is never parsed."""
    from PIL import IcoImagePlugin, PpmImagePlugin, TiffImagePlugin

    parsed = []
    for plugin in (TiffImagePlugin.TiffImageFile, IcoImagePlugin.IcoImageFile, PpmImagePlugin.PpmImageFile):
        real = plugin._open
        monkeypatch.setattr(plugin, "_open", lambda self, real=real: parsed.append(self) or real(self))
    with pytest.raises(ImageError) as caught:
        open_image(image_bytes(Image.new("RGB", (16, 16), RED), fmt))
    assert caught.value.code == "unsupported_format"
    assert "JPEG, PNG, WEBP, GIF, BMP" in caught.value.message
    assert parsed == []
    assert open_image(image_bytes(Image.new("RGB", (16, 16), RED), fmt), ImageLimits(formats=(fmt,))).size == (16, 16)


def test_a_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageError) as caught:
        open_image(tmp_path / "nothing.jpg")
    assert caught.value.code == "unreadable"
    with pytest.raises(ImageError) as caught:
        open_image(tmp_path)  # a folder
    assert caught.value.code == "unreadable"


# --- the preset ----------------------------------------------------------------------------


def test_preset_resizes_the_whole_picture_without_cropping():
    """A wide picture with coloured edges keeps both edges: every region maps onto the picture."""
    picture = Image.new("RGB", (300, 100), (0, 255, 0))
    picture.paste(RED, (0, 0, 10, 100))
    picture.paste((0, 0, 255), (290, 0, 300, 100))
    preset = ImagePreset(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = preset(picture)  # (3, 64, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    pixels = (x * 0.5 + 0.5) * 255
    assert pixels[0, 32, 0] > 200 and pixels[1, 32, 0] < 60  # red on the left edge
    assert pixels[2, 32, -1] > 200 and pixels[1, 32, -1] < 60  # blue on the right edge
    assert pixels[1, 32, 32] > 200  # green in the middle


@pytest.mark.parametrize(
    "mean, std",
    [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)],
    ids=["per-channel", "uniform"],
)
def test_preset_normalises_with_its_mean_and_std(mean, std):
    preset = ImagePreset(8, mean, std)
    x = preset(Image.new("RGB", (20, 10), (255, 0, 128)))
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(preset.mean)) / torch.tensor(preset.std)
    torch.testing.assert_close(x[:, 4, 4], expected)


def test_a_stack_of_preset_pixels_is_the_same_batch_laid_out_channels_last():
    preset = ImagePreset(16, (0.5,) * 3, (0.5,) * 3)
    pictures = [Image.effect_noise((30, 20), 60 + 10 * i).convert("RGB") for i in range(3)]
    pixels = [preset(p) for p in pictures]
    batch = stack_pixels(pixels)  # (3, 3, 16, 16)
    assert batch.shape == (3, 3, 16, 16) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([p.contiguous() for p in pixels]))


def test_a_jpeg_read_for_a_small_model_is_decoded_small_but_keeps_its_full_upright_size(tmp_path):
    """libjpeg's scaled decoding: a 1600x1200 photo read for a 224-px model comes out at 400x300
    (1/4), the whole picture, and reports the size the user's picture really has."""
    import numpy as np
    from PIL import Image

    from captioner.images import open_image

    pixels = np.zeros((1200, 1600, 3), dtype=np.uint8)
    pixels[:, :800] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 800:] = (0, 0, 255)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: upright it is 1200 wide, 1600 high
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    image = open_image(path, min_size=224)
    assert max(image.size) == 400 and min(image.size) == 300
    assert image.info["full_size"] == (1200, 1600)
    full = open_image(path)
    assert full.size == (1200, 1600)
    small = np.asarray(image.resize(full.size)).astype(int)
    assert np.abs(small - np.asarray(full).astype(int)).mean() < 8  # the same picture


def test_image_errors_survive_pickling_with_code_and_message():
    """Folder captioning sends files already judged unusable to its worker processes."""
    import pickle

    error = pickle.loads(pickle.dumps(ImageError("not_an_image", "a text file")))
    assert isinstance(error, ImageError) and (error.code, error.message, str(error)) == (
        "not_an_image",
        "a text file",
        "a text file",
    )


def reference_8_bit(image: Image.Image) -> np.ndarray:
    """The 16-bit, 32-bit and float scaling as it was, on one float64 copy of the whole picture."""
    a = np.asarray(image, dtype=np.float64)
    scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
    return np.clip(a * scale, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "mode, values",
    [
        ("I;16", (0, 65536)),
        ("I", (-70000, 70000)),
        ("I", (-5, 250)),
        ("F", (-10.0, 300.0)),
        ("F", (0.0, 255.0)),
    ],
)
def test_deep_pictures_are_scaled_band_by_band_to_the_same_8_bit_pixels(mode, values):
    """The same pixels as before (PIXELS_VERSION stays), over several bands of rows."""
    generator = np.random.default_rng(0)
    low, high = values
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    a = generator.integers(low, high, (3000, 700)) if mode != "F" else generator.uniform(low, high, (3000, 700))
    image = Image.fromarray(a.astype(dtype))
    assert image.mode == mode
    rgb = np.asarray(open_image(image_bytes(image, "PNG") if mode == "I;16" else image))
    assert (rgb == reference_8_bit(image)[..., None]).all()


PEAK_RSS = """
import resource, sys
from captioner.images import ImagePreset, open_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
picture = open_image(data)
ImagePreset(224, (0.5,) * 3, (0.5,) * 3)(picture)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (picture.width * picture.height))
"""


@pytest.mark.slow
def test_a_16_bit_picture_is_decoded_in_the_memory_budgeted_for_it(tmp_path):
    """A 6300x6300 16-bit grayscale PNG of about 80 KB: float64 copies of it took 26 bytes a pixel
    (a gigabyte); now what decode_bytes budgets, in a fresh process's peak resident size."""
    import subprocess
    import sys

    a = np.zeros((6300, 6300), np.uint16)
    a[1000:2000, 1000:3000] = 40000
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert path.stat().st_size < 200_000
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    per_pixel = float(r.stdout)
    assert per_pixel <= PEAK_BYTES_PER_PIXEL * 1.1, f"{per_pixel:.1f} bytes a pixel"
    assert decode_bytes(Image.open(path)) == 6300 * 6300 * PEAK_BYTES_PER_PIXEL


def test_a_picture_over_the_decode_budget_is_refused_before_decoding(no_decoding):
    data = image_bytes(Image.new("RGBA", (100, 100), RED), "PNG")
    with pytest.raises(ImageError) as caught:
        open_image(data, ImageLimits(max_decode_bytes=100 * 100 * 16))  # RGBA takes 17 bytes a pixel
    assert caught.value.code == "too_much_memory" and "RGBA" in caught.value.message
    assert no_decoding == []
    assert open_image(data, ImageLimits(max_decode_bytes=100 * 100 * 17)).size == (100, 100)
    assert open_image(
        image_bytes(Image.new("RGB", (100, 100), RED), "PNG"), ImageLimits(max_decode_bytes=100 * 100 * 10)
    ).size == (100, 100)


def rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit BMP compressed with RLE8 (Pillow writes none): each row one run per 255 pixels."""
    import struct

    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    rows = b""
    for y in range(height):
        left = width
        while left:
            n = min(255, left)
            rows += bytes((n, y % 256))
            left -= n
        rows += b"\x00\x00"  # end of the row
    rows += b"\x00\x01"  # end of the picture
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return struct.pack("<2sIHHI", b"BM", offset + len(rows), 0, 0, offset) + info + palette + rows


def test_rle_bmp_is_refused_before_decoding_where_the_limits_say_so(no_decoding):
    data = rle8_bmp(300, 20)
    assert open_image(data).size == (300, 20)  # by default it is decoded (the folder command)
    no_decoding.clear()
    with pytest.raises(ImageError) as caught:
        open_image(data, ImageLimits(rle_bmp=False))
    assert caught.value.code == "unsupported_format" and "RLE" in caught.value.message
    assert no_decoding == []
    assert open_image(image_bytes(Image.new("P", (30, 20)), "BMP"), ImageLimits(rle_bmp=False)).size == (30, 20)
