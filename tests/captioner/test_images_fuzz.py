"""A fuzz of the image-decoding path: whatever bytes arrive, open_image returns an RGB picture
within its limits or raises ImageError with a known code, and returns soon. The bytes are
arbitrary, or small real JPEG, PNG, GIF, BMP and WebP files broken the ways uploads break
(bytes flipped, cut short, spliced, a header claiming a huge picture). Derandomized and without
an example database, so every run tries the same inputs."""

import io
import signal
import struct
import zlib
from contextlib import contextmanager
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.images import PEAK_BYTES_PER_PIXEL, ImageError, ImageLimits, open_image
from tests.captioner.conftest import IMAGE_CASES, image_bytes
from tests.captioner.test_images import rle8_bmp

pytestmark = pytest.mark.slow  # about 6 s

CODES = {"too_large", "unsupported_format", "too_many_pixels", "corrupt_image", "too_much_memory"}
HANG_S = 10  # a few milliseconds each is the norm; this is a decoder that never returns

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
)


def _noise(mode: str, size=(24, 16)) -> Image.Image:
    """Pixels that do not compress to nothing, so a flipped byte lands in real coded data."""
    return Image.effect_noise(size, 80).convert(mode)


# Small real files of every accepted format, most modes and codings: the fuzz's starting points.
SEEDS = {name: make() for name, (make, _, _) in IMAGE_CASES.items() if not name.endswith("_dark_half")}
SEEDS |= {
    "jpeg_progressive": image_bytes(_noise("RGB"), "JPEG", progressive=True, quality=80),
    "png_RGB_noise": image_bytes(_noise("RGB"), "PNG"),
    "gif_noise": image_bytes(_noise("P"), "GIF"),
    "webp_lossy": image_bytes(_noise("RGB"), "WEBP", quality=50),
    "webp_alpha": image_bytes(Image.merge("RGBA", (*_noise("RGB").split(), _noise("L"))), "WEBP", quality=50),
    "bmp_1_bit": image_bytes(_noise("1"), "BMP"),
    "bmp_palette": image_bytes(_noise("P"), "BMP"),
    "bmp_rle8": rle8_bmp(30, 20),
}


def with_size(data: bytes, width: int, height: int) -> bytes:
    """The file with the picture size its header claims changed (each field's width in bits
    masks the numbers), where its format's header is recognised; a PNG's header checksum is
    mended so the new size is read, not refused as a broken chunk."""
    out = bytearray(data)
    if out.startswith(b"\x89PNG") and len(out) >= 33:
        out[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif out.startswith(b"GIF") and len(out) >= 13:  # the signature, then the screen's descriptor
        out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)  # the screen
        at = _gif_first_frame(bytes(out))
        if at is not None:  # the first frame: Pillow grows the picture to hold it
            out[at + 5 : at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif out.startswith(b"BM") and len(out) >= 26:
        out[18:26] = struct.pack("<II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)  # a negative height: top-down
    elif out.startswith(b"RIFF") and out[8:12] == b"WEBP":
        if out[12:16] == b"VP8X" and len(out) >= 30:  # the canvas of an extended file (alpha, animation)
            out[24:30] = b"".join(((n - 1) & 0xFFFFFF).to_bytes(3, "little") for n in (width, height))
        at = out.find(b"VP8L", 12)  # lossless: 14 bits each, less one, after the signature byte
        if at != -1 and len(out) >= at + 13:
            (bits,) = struct.unpack("<I", out[at + 9 : at + 13])
            bits = (bits & ~0x0FFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
            out[at + 9 : at + 13] = struct.pack("<I", bits)
        at = out.find(b"VP8 ", 12)  # lossy: 14 bits each and 2 of scale, after the frame tag and start code
        if at != -1 and len(out) >= at + 18:
            (w, h) = struct.unpack("<HH", out[at + 14 : at + 18])
            out[at + 14 : at + 18] = struct.pack(
                "<HH", (w & 0xC000) | (width & 0x3FFF), (h & 0xC000) | (height & 0x3FFF)
            )
    elif out.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):  # the start of frame: baseline, extended, progressive
            at = out.find(marker)
            if at != -1 and len(out) >= at + 9:
                out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                break
    return bytes(out)


def _gif_first_frame(data: bytes) -> int | None:
    """Where a GIF's first image descriptor (0x2C, then left, top, width, height) begins, if it is whole."""
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the screen and its colour table
    while at < len(data) and data[at] == 0x21:  # extensions: a label, then sub-blocks up to an empty one
        at += 2
        while at < len(data) and data[at]:
            at += data[at] + 1
        at += 1
    return at if at + 9 <= len(data) and data[at] == 0x2C else None


SIZES = st.sampled_from([0, 1, 2, 255, 256, 65535, 65536, 2**24, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 5000)


@st.composite
def broken_files(draw) -> bytes:
    """A seed file after one to four of the things that happen to uploads."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "insert", "size"]))
        at = draw(st.integers(0, len(data)) | st.integers(min(16, len(data)), len(data)))  # often past the signature
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:at]
        elif kind == "splice":  # the rest of another file, from anywhere in it
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            data = data[:at] + other[draw(st.integers(0, len(other))) :]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "size":
            data = bytearray(with_size(bytes(data), draw(SIZES), draw(SIZES)))
    return mended_png(bytes(data)) if draw(st.booleans()) else bytes(data)


def mended_png(data: bytes) -> bytes:
    """A PNG with every whole chunk's checksum made right again, so that a flipped byte in a chunk
    is read by the decoder rather than refused as a broken chunk (other files come back as they are)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        (length,) = struct.unpack(">I", out[at : at + 4])
        end = at + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[at + 4 : end])))
        at = end + 4
    return bytes(out)


# Tight, and half the time exactly these, so that most files get as far as being decoded (the seeds
# have 384 to 1200 pixels); the other half draws any limit, down to none at all.
LIMITS = st.builds(
    ImageLimits,
    max_bytes=st.just(16384) | st.integers(0, 16384),
    max_pixels=st.just(4000) | st.integers(1, 4000),
    max_decode_bytes=st.just(4000 * 17) | st.none() | st.integers(0, 4000 * 17),
    rle_bmp=st.booleans(),
)
MIN_SIZE = st.none() | st.integers(1, 64)


class Hang(BaseException):
    """Not an Exception, so open_image's handlers cannot turn it into an ImageError."""


@contextmanager
def hang_guard(seconds: float = HANG_S):
    """A decoder stuck in a loop fails the test instead of stalling the suite."""

    def expire(signum, frame):
        raise Hang(f"open_image did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_open(data: bytes, limits: ImageLimits, min_size: int | None) -> Image.Image | ImageError:
    """open_image's promise: an RGB picture within every limit, or an ImageError with a known code."""
    try:
        with hang_guard():
            image = open_image(data, limits, min_size)
    except ImageError as e:
        assert e.code in CODES, (e.code, e.message)
        return e
    assert image.mode == "RGB"
    width, height = image.info["full_size"]  # upright, before a JPEG's reduced decoding
    assert 1 <= width * height <= limits.max_pixels
    assert image.width * image.height <= width * height
    assert len(data) <= limits.max_bytes
    if limits.max_decode_bytes is not None:
        assert image.width * image.height * PEAK_BYTES_PER_PIXEL <= limits.max_decode_bytes
    return image


def fuzz_open(data: bytes, limits: ImageLimits, min_size: int | None) -> None:
    """check_open, with what became of the input for --hypothesis-show-statistics (how far inputs get)."""
    outcome = check_open(data, limits, min_size)
    event(outcome.code if isinstance(outcome, ImageError) else "read")


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=2048), limits=LIMITS, min_size=MIN_SIZE)
def test_arbitrary_bytes_are_a_picture_within_the_limits_or_an_image_error(data, limits, min_size):
    fuzz_open(data, limits, min_size)


@settings(FUZZ, max_examples=1500)
@given(data=broken_files(), limits=LIMITS, min_size=MIN_SIZE)
def test_broken_image_files_are_a_picture_within_the_limits_or_an_image_error(data, limits, min_size):
    fuzz_open(data, limits, min_size)


@settings(FUZZ, max_examples=600)
@given(name=st.sampled_from(sorted(SEEDS)), width=SIZES, height=SIZES, min_size=MIN_SIZE)
def test_a_header_claiming_another_size_is_read_within_the_limits(name, width, height, min_size):
    """Only the size changes: a claim over the limit is refused, however the file goes on."""
    limits = ImageLimits(max_pixels=2000, max_decode_bytes=2000 * PEAK_BYTES_PER_PIXEL, rle_bmp=False)
    fuzz_open(with_size(SEEDS[name], width, height), limits, min_size)


def test_every_seed_opens_so_the_fuzz_starts_from_real_pictures():
    """The mutations start from files that open_image reads whole; the size rewrite reaches their headers."""
    for name, data in SEEDS.items():
        assert isinstance(check_open(data, ImageLimits(), None), Image.Image), name
        assert Image.open(io.BytesIO(with_size(data, 7, 5))).size == (7, 5), name
