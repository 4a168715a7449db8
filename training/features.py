"""The frozen-encoder feature cache: region features computed once per (encoder, image set).

Stored as one fp16 memory-mapped array (N, P, D) per image set, named by a
fingerprint of the encoder's weights, of the preprocessing's version and of
the image files (path, size, mtime), so every epoch and every later run
reuses it, and a change to any makes a new one. The array is written under a
temporary name and renamed when complete: an interrupted build never leaves a
cache that looks finished.
"""

import hashlib
import os
from collections.abc import Sequence
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
    out: np.ndarray, encoder: Encoder, paths: Sequence[Path], batch_size: int, workers: int, device, desc: str | None
) -> None:
    """Fill `out` (N, P, D) with the encoder's features of `paths`, images decoded by `workers` processes."""
    preset = ImagePreset(encoder.image_size, encoder.mean, encoder.std)
    # its own generator: drawing the workers' seed from the global one would shift a training run's
    # dropout masks depending on whether its feature cache was built or found
    loader = DataLoader(
        ImageFiles(paths, preset), batch_size=batch_size, num_workers=workers, generator=torch.Generator()
    )
    was_training = encoder.training
    encoder.eval()
    start = 0
    with torch.inference_mode(), tqdm(total=len(paths), desc=desc, unit="img", disable=desc is None) as bar:
        for images in loader:
            feats = encoder(images.to(device))  # (B, P, D)
            out[start : start + len(feats)] = feats.to(torch.float16).cpu().numpy()
            start += len(feats)
            bar.update(len(feats))
    encoder.train(was_training)


def encode_images(
    encoder: Encoder, paths: Sequence[Path], batch_size: int = 32, workers: int = 2, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Features (N, P, D) fp16 in memory, for an encoder whose weights are still changing."""
    h, w = encoder.grid
    out = np.empty((len(paths), h * w, encoder.dim), dtype=np.float16)
    _encode_into(out, encoder, paths, batch_size, workers, device, None)
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
    # a failed or interrupted build leaves neither a cache that looks finished nor a (possibly huge) temporary
    with replacing(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(paths), h * w, encoder.dim))
        _encode_into(out, encoder, paths, batch_size, workers, device, f"features {name}" if progress else None)
        out.flush()
        del out
    return np.load(path, mmap_mode="r")
