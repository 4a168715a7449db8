"""Test pictures and multipart helpers for the API tests."""

import io
import socket

from PIL import Image, ImageDraw


def picture(size=(96, 80), background=(170, 170, 170)) -> Image.Image:
    """A Shapes-like picture: a red circle and a blue square."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.1, h * 0.1, w * 0.45, h * 0.45), fill=(220, 50, 50))
    draw.rectangle((w * 0.55, h * 0.55, w * 0.9, h * 0.9), fill=(50, 90, 220))
    return image


def encode(image: Image.Image, format: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def png(size=(96, 80), **kwargs) -> bytes:
    return encode(picture(size, **kwargs))


def upload(*files: tuple[str, bytes], content_type: str = "application/octet-stream") -> list:
    """httpx's multipart list for the form field `images`."""
    return [("images", (name, data, content_type)) for name, data in files]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
