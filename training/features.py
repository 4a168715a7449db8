"""The frozen-encoder feature cache: region features computed once per (encoder, image set).

Stored as one fp16 memory-mapped array (N, P, D) per image set, named by a
fingerprint of the encoder's weights, of the preprocessing's version and of
the image files (path, size, mtime), so every epoch and every later run
reuses it, and a change to any makes a new one. The array is written under a
temporary name and renamed when complete: an interrupted build never leaves a
cache that looks finished. It is written with plain writes, batch after batch,
and only read through a memory map: a page written through a map that the file
system has no room for is SIGBUS, which kills the process without a word,
where a write fails with ENOSPC, which the command reports (`runtime.files`).
"""

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.encoder import Encoder
from captioner.images import PIXELS_VERSION, ImageError, ImageLimits, ImagePreset, open_image
from runtime.files import replacing


def encoder_fingerprint(encoder: Encoder) -> str:
    h = hashlib.sha256(type(encoder).__name__.encode())
    for name, tensor in encoder.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def images_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


DATASET_IMAGE_LIMITS = ImageLimits(formats=("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))  # data sets may hold TIFFs


class ImageFiles(Dataset):
    """Images decoded and preprocessed, one tensor (3, S, S) per path: the cache's input, and
    training's when the encoder is fine-tuned."""

    def __init__(self, paths: Sequence[Path], preset: ImagePreset):
        self.paths, self.preset = list(paths), preset

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        # decoded as serving decodes them (a JPEG at libjpeg's reduced scale when that still
        # covers the preset), so a model trains on the pixels it will be shown
        try:
            image = open_image(self.paths[i], DATASET_IMAGE_LIMITS, min_size=self.preset.size)
        except ImageError as e:  # a data set's error names its file (a DataLoader worker's reaches the loop)
            raise ImageError(e.code, f"{self.paths[i]}: {e.message}") from None
        return self.preset(image)


def _encode_into(
    write: Callable[[np.ndarray], object],
    encoder: Encoder,
    paths: Sequence[Path],
    batch_size: int,
    workers: int,
    device,
    desc: str | None,
) -> None:
    """Hand `write` the encoder's features of `paths`, (B, P, D) fp16 a batch at a time and in order,
    images decoded by `workers` processes."""
    preset = ImagePreset(encoder.image_size, encoder.mean, encoder.std)
    # its own generator: drawing the workers' seed from the global one would shift a training run's
    # dropout masks depending on whether its feature cache was built or found
    loader = DataLoader(
        ImageFiles(paths, preset), batch_size=batch_size, num_workers=workers, generator=torch.Generator()
    )
    was_training = encoder.training
    encoder.eval()
    with torch.inference_mode(), tqdm(total=len(paths), desc=desc, unit="img", disable=desc is None) as bar:
        for images in loader:
            feats = encoder(images.to(device))  # (B, P, D)
            write(feats.to(torch.float16).cpu().numpy())
            bar.update(len(feats))
    encoder.train(was_training)


class _Rows:
    """Fills an array's rows in order, a batch at a time: `_encode_into`'s `write` for memory."""

    def __init__(self, array: np.ndarray):
        self.array, self.filled = array, 0

    def __call__(self, batch: np.ndarray) -> None:
        self.array[self.filled : self.filled + len(batch)] = batch
        self.filled += len(batch)


def encode_images(
    encoder: Encoder, paths: Sequence[Path], batch_size: int = 32, workers: int = 2, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Features (N, P, D) fp16 in memory, for an encoder whose weights are still changing."""
    h, w = encoder.grid
    out = np.empty((len(paths), h * w, encoder.dim), dtype=np.float16)
    _encode_into(_Rows(out), encoder, paths, batch_size, workers, device, None)
    return out


def cached_features(
    encoder: Encoder,
    paths: Sequence[Path],
    cache_dir: Path,
    name: str,
    batch_size: int = 32,
    workers: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Region features (N, P, D) fp16 for `paths`, from the cache or computed now."""
    key = f"{name}-{encoder_fingerprint(encoder)}-p{PIXELS_VERSION}-{images_fingerprint(paths)}"
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    h, w = encoder.grid
    shape = (len(paths), h * w, encoder.dim)
    # a failed or interrupted build (a full disk too) leaves neither a cache that looks finished nor a
    # (possibly huge) temporary
    with replacing(path) as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        _encode_into(
            lambda batch: f.write(np.ascontiguousarray(batch).data),  # row-major (N, P, D), as the header says
            encoder,
            paths,
            batch_size,
            workers,
            device,
            f"features {name}" if progress else None,
        )
    return np.load(path, mmap_mode="r")
