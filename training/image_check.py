"""Every image of a split checked before the long work starts, cheaply: that the file is there, its
size, and its header as Pillow reads it (format and pixel count), without decoding the pixels.

    bad = find_bad_images(split.image_paths)          # path -> why, for the files that fail
    split = usable_split(split, bad, skip=True)       # the split without them (recorded in split.skipped)
    usable_split(split, bad, skip=False)              # BadImagesError naming each bad file, if any

A missing or truncated file on a data set of 100,000 images is then a message naming it, at once,
rather than a traceback an hour into the feature cache. A file whose header is sound but whose
pixels are cut short still passes: its decoding fails later, naming the file (training.features).
"""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from captioner.images import ImageLimits
from training.coco import CaptionSplit
from training.features import DATASET_IMAGE_LIMITS

CHECK_THREADS = 16  # reading headers waits on the disk far more than on the GIL


class BadImagesError(Exception):
    """A split holds images that cannot be used, and skipping them was not asked for."""

    def __init__(self, split: CaptionSplit, bad: dict[Path, str], flag: str = "--skip-bad-images"):
        self.bad = bad
        lines = [f"{len(bad)} of {len(split)} images of split {split.name!r} cannot be used:"]
        lines += [f"  {path}: {why}" for path, why in bad.items()]
        lines.append(f"fix or remove them, or leave them out with {flag}")
        super().__init__("\n".join(lines))


def image_problem(path: Path, limits: ImageLimits = DATASET_IMAGE_LIMITS) -> str | None:
    """Why the image at `path` cannot be used, from its size and header; None if it can."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if size == 0:
        return "empty file"
    if size > limits.max_bytes:
        return f"{size} bytes, over the limit of {limits.max_bytes}"
    try:
        with Image.open(path) as image:  # reads the header only
            fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        return "not an image Pillow can identify"
    except Image.DecompressionBombError as e:
        return str(e)
    except Exception as e:  # truncated headers raise anything from OSError to struct.error
        return f"cannot read the image header: {e}"
    fmt = "JPEG" if fmt == "MPO" else fmt
    if fmt not in limits.formats:
        return f"{fmt} images are not accepted; use one of {', '.join(limits.formats)}"
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        return f"{width}x{height} is over the limit of {limits.max_pixels} pixels"
    return None


def find_bad_images(
    paths: Sequence[Path], limits: ImageLimits = DATASET_IMAGE_LIMITS, threads: int = CHECK_THREADS
) -> dict[Path, str]:
    """path -> why, for each of `paths` that cannot be used, in the order of `paths`."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = pool.map(lambda p: image_problem(p, limits), paths)
        return {Path(path): why for path, why in zip(paths, problems, strict=True) if why is not None}


def usable_split(
    split: CaptionSplit, bad: dict[Path, str], skip: bool, flag: str = "--skip-bad-images"
) -> CaptionSplit:
    """`split` without its `bad` images when `skip`; BadImagesError naming them otherwise."""
    if not bad:
        return split
    if not skip:
        raise BadImagesError(split, bad, flag)
    return split.without(bad)


def skipped_note(split: CaptionSplit) -> str:
    """What a run says of the images it left out of `split`."""
    lines = [f"left out {len(split.skipped)} bad images of split {split.name!r}:"]
    return "\n".join(lines + [f"  {path}: {why}" for path, why in split.skipped.items()])
