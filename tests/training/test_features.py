"""The frozen-encoder feature cache: built once per (encoder, image set), reused, rebuilt on change."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoder import build_encoder
from captioner.images import ImageError, ImagePreset, open_image
from training.features import cached_features, encode_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(shapes_root, tmp_path):
    """Six Shapes PNGs of our own, free to be touched and rewritten."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for source in sorted((shapes_root / "images" / "train").glob("*.png"))[:6]:
        paths.append(folder / source.name)
        shutil.copy2(source, paths[-1])
    return paths


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_encoder("tiny")


class CountingForward:
    """How many images went through an encoder's forward."""

    def __init__(self, encoder):
        self.images = 0
        encoder.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.images += len(args[0])


def direct_features(encoder, paths) -> torch.Tensor:
    """(N, P, D) float32 straight from the encoder, no cache, no DataLoader."""
    preset = ImagePreset(encoder.image_size, encoder.mean, encoder.std)
    with torch.no_grad():
        return encoder.eval()(torch.stack([preset(open_image(p)) for p in paths]))


def npy_files(folder):
    return sorted(p.name for p in folder.glob("*.npy")) if folder.exists() else []


def test_the_cache_is_built_once_then_reused(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    spy = CountingForward(encoder)
    first = cached_features(encoder, images, cache, "tiny-train", batch_size=4, workers=0, progress=False)
    assert spy.images == len(images)
    [name] = npy_files(cache)
    stamp = (cache / name).stat().st_mtime_ns

    again = cached_features(encoder, images, cache, "tiny-train", batch_size=4, workers=0, progress=False)
    assert spy.images == len(images)  # no second pass through the encoder
    assert npy_files(cache) == [name] and (cache / name).stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))


def test_the_cache_is_fp16_memory_mapped_n_p_d(encoder, images, tmp_path):
    features = cached_features(encoder, images, tmp_path / "cache", "x", batch_size=4, workers=0, progress=False)
    assert isinstance(features, np.memmap)
    assert features.dtype == np.float16
    assert features.shape == (len(images), 8 * 8, 32)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == npy_files(tmp_path / "cache")  # nothing else left


def test_cached_values_equal_a_direct_encoder_pass(encoder, images, tmp_path):
    features = cached_features(encoder, images, tmp_path / "cache", "x", batch_size=4, workers=0, progress=False)
    expected = direct_features(encoder, images)
    assert expected.abs().max() > 0.01  # the comparison below is not between zeros
    np.testing.assert_allclose(np.asarray(features, dtype=np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)


def test_encode_images_equals_the_cached_values(encoder, images, tmp_path):
    cached = cached_features(encoder, images, tmp_path / "cache", "x", batch_size=4, workers=0, progress=False)
    fresh = encode_images(encoder, images, batch_size=3, workers=0)
    assert fresh.dtype == np.float16 and not isinstance(fresh, np.memmap)
    np.testing.assert_array_equal(fresh, np.asarray(cached))


def test_image_decoding_workers_give_the_same_features(encoder, images, tmp_path):
    one = encode_images(encoder, images, batch_size=4, workers=0)
    two = encode_images(encoder, images, batch_size=4, workers=2)
    np.testing.assert_array_equal(one, two)


def test_encoding_leaves_the_encoder_in_its_training_mode(encoder, images):
    encoder.train()
    encode_images(encoder, images, workers=0)
    assert encoder.training
    encoder.eval()
    encode_images(encoder, images, workers=0)
    assert not encoder.training


def test_new_encoder_weights_make_a_new_cache(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    before = np.asarray(cached_features(encoder, images, cache, "x", workers=0, progress=False)).copy()
    with torch.no_grad():
        encoder.body[0].weight.mul_(-1.0)
    spy = CountingForward(encoder)
    after = cached_features(encoder, images, cache, "x", workers=0, progress=False)
    assert spy.images == len(images)
    assert len(npy_files(cache)) == 2
    assert not np.array_equal(np.asarray(after), before)
    np.testing.assert_allclose(
        np.asarray(after, dtype=np.float32), direct_features(encoder, images).numpy(), rtol=2e-3, atol=2e-3
    )


def test_another_encoder_of_the_same_kind_makes_a_new_cache(images, tmp_path):
    torch.manual_seed(0)
    a = build_encoder("tiny")
    torch.manual_seed(1)
    b = build_encoder("tiny")
    cached_features(a, images, tmp_path / "cache", "x", workers=0, progress=False)
    cached_features(b, images, tmp_path / "cache", "x", workers=0, progress=False)
    assert len(npy_files(tmp_path / "cache")) == 2


def test_a_change_to_the_preprocessing_makes_a_new_cache(encoder, images, tmp_path, monkeypatch):
    import training.features

    cache = tmp_path / "cache"
    cached_features(encoder, images, cache, "x", workers=0, progress=False)
    monkeypatch.setattr(training.features, "PIXELS_VERSION", training.features.PIXELS_VERSION + 1)
    spy = CountingForward(encoder)
    cached_features(encoder, images, cache, "x", workers=0, progress=False)
    assert spy.images == len(images)
    assert len(npy_files(cache)) == 2


def test_a_touched_image_makes_a_new_cache(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    cached_features(encoder, images, cache, "x", workers=0, progress=False)
    stat = images[2].stat()
    os.utime(images[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    spy = CountingForward(encoder)
    cached_features(encoder, images, cache, "x", workers=0, progress=False)
    assert spy.images == len(images)
    assert len(npy_files(cache)) == 2


def test_a_rewritten_image_gets_its_new_features(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    before = np.asarray(cached_features(encoder, images, cache, "x", workers=0, progress=False)).copy()
    stat = images[3].stat()
    Image.new("RGB", (224, 224), (250, 10, 10)).save(images[3])
    os.utime(images[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a coarse clock cannot hide it
    after = np.asarray(cached_features(encoder, images, cache, "x", workers=0, progress=False))
    assert not np.array_equal(after[3], before[3])
    np.testing.assert_array_equal(np.delete(after, 3, axis=0), np.delete(before, 3, axis=0))
    np.testing.assert_allclose(
        after[3].astype(np.float32), direct_features(encoder, images[3:4])[0].numpy(), rtol=2e-3, atol=2e-3
    )


def test_another_image_set_or_name_makes_a_new_cache(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    cached_features(encoder, images, cache, "x", workers=0, progress=False)
    fewer = cached_features(encoder, images[:4], cache, "x", workers=0, progress=False)
    cached_features(encoder, images, cache, "y", workers=0, progress=False)
    assert fewer.shape[0] == 4
    assert len(npy_files(cache)) == 3


def test_an_interrupted_build_leaves_no_cache_behind(encoder, images, tmp_path):
    cache = tmp_path / "cache"
    images[4].write_bytes(b"not a PNG at all")  # the third batch of two fails to decode
    spy = CountingForward(encoder)
    with pytest.raises(ImageError):
        cached_features(encoder, images, cache, "x", batch_size=2, workers=0, progress=False)
    assert spy.images == 4  # it did fail midway, after two batches
    assert npy_files(cache) == []
    assert list(cache.iterdir()) == []  # nor a half-written temporary file

    Image.new("RGB", (224, 224), (10, 200, 10)).save(images[4])  # mended: the next call builds it whole
    features = cached_features(encoder, images, cache, "x", batch_size=2, workers=0, progress=False)
    np.testing.assert_allclose(
        np.asarray(features, dtype=np.float32), direct_features(encoder, images).numpy(), rtol=2e-3, atol=2e-3
    )


def test_the_build_shows_a_progress_bar_named_after_the_set(encoder, images, tmp_path, capsys):
    cached_features(encoder, images, tmp_path / "cache", "tiny-val", workers=0, progress=True)
    assert "features tiny-val" in capsys.readouterr().err
    cached_features(encoder, images, tmp_path / "cache2", "tiny-val", workers=0, progress=False)
    assert "features" not in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_building_the_cache_leaves_the_global_random_state_alone(encoder, images, tmp_path, workers):
    """A run that builds its cache must draw the same dropout masks as one that finds it."""
    before = torch.get_rng_state()
    cached_features(encoder, images, tmp_path / "cache", "x", workers=workers, progress=False)
    encode_images(encoder, images, workers=workers)
    assert torch.equal(torch.get_rng_state(), before)


def test_training_reads_a_photo_with_the_very_pixels_serving_feeds_the_model(tiny_model, tmp_path):
    """No skew between training and serving: a large JPEG (decoded at a reduced scale by both)."""
    from captioner.predictor import Predictor
    from training.features import ImageFiles

    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(path, quality=90)
    predictor = Predictor(tiny_model)
    served = predictor.prepare(path).pixels  # (3, S, S)
    trained = ImageFiles([path], predictor.preset)[0]
    assert torch.equal(trained, served)
    full = predictor.preset(Image.open(path).convert("RGB"))  # the whole picture decoded: other pixels
    assert not torch.equal(trained, full)
