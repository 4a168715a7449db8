"""The predictor: images in (bytes, paths, PIL), one encoder batch, batched decoding, results out."""

import pytest
import torch
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.encoder import Encoder
from captioner.images import ImageError, ImageLimits
from captioner.predictor import Predictor
from tests.captioner.conftest import IMAGE_CASES, RED, image_bytes, png_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTION_KEYS = {"text", "tokens", "log_prob"}
RESULT_KEYS = {"width", "height", "method", "attention_grid", "captions"}


@pytest.fixture
def predictor(tiny_model):
    return Predictor(tiny_model)


@pytest.fixture
def encoder_calls(monkeypatch):
    """The batch size of every encoder call."""
    calls = []
    real_forward = Encoder.forward

    def spy(self, images):
        calls.append(images.size(0))
        return real_forward(self, images)

    monkeypatch.setattr(Encoder, "forward", spy)
    return calls


def test_real_files_of_every_mode_are_captioned_in_one_batch(predictor, image_files, encoder_calls, step_rows):
    names = list(IMAGE_CASES)
    results = predictor.caption([image_files[n] for n in names], DecodeOptions(beam_size=2, max_length=5))
    assert sum(encoder_calls) == len(names) and max(encoder_calls) <= predictor.encoder_batch_size
    assert step_rows[0] == len(names)  # one row per image until the first word: the beams are still one
    assert set(step_rows[1:]) == {len(names) * 2}  # then every step decodes all beams of all images
    assert len(results) == len(names)
    for name, result in zip(names, results):
        assert set(result) == RESULT_KEYS
        expected_size = (30, 40) if name == "jpeg_exif_orientation_6" else (40, 30)
        assert (result["width"], result["height"]) == expected_size, name
        assert result["method"] == "beam" and result["attention_grid"] == [8, 8]
        assert len(result["captions"]) == 1


def test_bytes_paths_and_pil_images_give_the_same_result(predictor, tmp_path):
    picture = Image.new("RGB", (50, 40), RED)
    picture.paste((0, 0, 255), (0, 0, 25, 20))
    data = image_bytes(picture, "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    options = DecodeOptions(method="greedy", max_length=6, attention=True)
    results = predictor.caption([data, path, str(path), picture], options)
    assert all(r == results[0] for r in results[1:])


def test_results_come_back_in_order_and_batched_equals_alone(predictor, image_files):
    paths = [image_files[n] for n in ("jpeg_RGB", "png_RGBA", "gif_animated", "bmp", "png_I16")]
    options = DecodeOptions(beam_size=3, num_captions=2, max_length=6)
    together = predictor.caption(paths, options)
    alone = [predictor.caption([p], options)[0] for p in paths]
    for a, b in zip(together, alone):
        assert [c["tokens"] for c in a["captions"]] == [c["tokens"] for c in b["captions"]]
        assert [c["log_prob"] for c in a["captions"]] == pytest.approx([c["log_prob"] for c in b["captions"]], abs=2e-4)


def test_batches_are_cut_at_max_batch_size_without_changing_results(tiny_model, image_files, encoder_calls):
    paths = [image_files[n] for n in ("jpeg_RGB", "png_RGBA", "gif_animated", "bmp", "webp")]
    options = DecodeOptions(method="greedy", max_length=5)
    small = Predictor(tiny_model, max_batch_size=2).caption(paths, options)
    assert encoder_calls == [2, 2, 1]
    encoder_calls.clear()
    large = Predictor(tiny_model, encoder_batch_size=8).caption(paths, options)
    assert encoder_calls == [5]
    encoder_calls.clear()
    split = Predictor(tiny_model, encoder_batch_size=2).caption(paths, options)  # one decoding batch
    assert encoder_calls == [2, 2, 1]
    encoder_calls.clear()
    even = Predictor(tiny_model, encoder_batch_size=4).caption(paths, options)
    assert encoder_calls == [3, 2]  # as few calls as the limit allows, of equal sizes: not 4 and 1
    tokens = lambda results: [r["captions"][0]["tokens"] for r in results]
    assert tokens(small) == tokens(large) == tokens(split) == tokens(even)


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(method="greedy", max_length=7, attention=True),
        DecodeOptions(method="sample", num_captions=3, seed=0, max_length=7, attention=True),
        DecodeOptions(method="beam", beam_size=4, num_captions=4, max_length=7, attention=True),
    ],
)
def test_result_format_with_attention_grids(predictor, image_files, options):
    with torch.no_grad():
        predictor.model.decoder.out.bias[predictor.model.vocab.end_id] = -3.0  # words before <end>
    result = predictor.caption([image_files["jpeg_RGB"]], options)[0]
    assert result["method"] == options.method
    assert len(result["captions"]) == options.num_captions
    for caption in result["captions"]:
        assert set(caption) == CAPTION_KEYS | {"attention"}
        assert caption["text"] == " ".join(caption["tokens"])
        assert all((isinstance(t, str) and not t.startswith("<")) or t == "<unk>" for t in caption["tokens"])
        assert isinstance(caption["log_prob"], float) and caption["log_prob"] < 0
        grids = torch.tensor(caption["attention"])  # (T, h, w)
        assert len(caption["tokens"]) > 0 and grids.shape == (len(caption["tokens"]), 8, 8)
        torch.testing.assert_close(grids.sum((1, 2)), torch.ones(len(caption["tokens"])), atol=1e-3, rtol=0)


def test_attention_is_left_out_unless_asked_or_when_the_model_has_none(predictor, make_model, image_files):
    result = predictor.caption([image_files["bmp"]], DecodeOptions(max_length=5))[0]
    assert all(set(c) == CAPTION_KEYS for c in result["captions"])
    show_and_tell = Predictor(make_model(attention=False))
    result = show_and_tell.caption([image_files["bmp"]], DecodeOptions(max_length=5, attention=True))[0]
    assert all(set(c) == CAPTION_KEYS for c in result["captions"])


def test_an_empty_caption_has_no_attention_grids(tiny_model, image_files):
    with torch.no_grad():
        tiny_model.decoder.out.bias[tiny_model.vocab.end_id] = 50.0  # the model ends at once
    result = Predictor(tiny_model).caption([image_files["bmp"]], DecodeOptions(method="greedy", attention=True))[0]
    assert result["captions"] == [{"text": "", "tokens": [], "log_prob": 0.0, "attention": []}]


def test_log_prob_is_the_decoders_rounded(predictor, tiny_model, image_files):
    prepared = predictor.prepare(image_files["webp"])
    options = DecodeOptions(beam_size=3, num_captions=3, max_length=6)
    with torch.no_grad():
        hypotheses = tiny_model.caption_features(tiny_model.encoder(prepared.pixels[None]), options)[0]
    result = predictor.caption_batch([prepared], options)[0]
    assert [c["log_prob"] for c in result["captions"]] == [round(h.log_prob, 4) for h in hypotheses]
    assert [c["tokens"] for c in result["captions"]] == [
        [tiny_model.vocab.words[i] for i in h.token_ids] for h in hypotheses
    ]


def test_prepare_resizes_to_the_encoder_preset(predictor, image_files):
    prepared = predictor.prepare(image_files["jpeg_exif_orientation_6"])
    assert prepared.pixels.shape == (3, 64, 64)
    assert (prepared.width, prepared.height) == (30, 40)


def test_unusable_images_raise_image_error_with_a_code(predictor, image_files, encoder_calls):
    with pytest.raises(ImageError) as caught:
        predictor.caption([image_files["bmp"], b"not an image"])
    assert caught.value.code == "unsupported_format"
    data = image_files["jpeg_RGB"].read_bytes()
    with pytest.raises(ImageError) as caught:
        predictor.caption([data[: len(data) // 2]])
    assert caught.value.code == "corrupt_image"
    assert encoder_calls == []  # refused before any work on the batch


def test_the_predictors_pixel_limit_is_applied(tiny_model, image_files):
    strict = Predictor(tiny_model, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError) as caught:
        strict.prepare(image_files["bmp"])  # 40 x 30 = 1200 pixels
    assert caught.value.code == "too_many_pixels"
    with pytest.raises(ImageError) as caught:
        strict.prepare(png_header(30000, 30000))
    assert caught.value.code == "too_many_pixels"


def test_from_checkpoint_and_info(tiny_checkpoint, image_files):
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    info = predictor.info()
    assert info["encoder"] == "tiny" and info["attention"] is True and info["cell"] == "lstm"
    assert info["attention_grid"] == [8, 8] and info["image_size"] == 64
    assert info["vocab_size"] == len(predictor.model.vocab)
    assert info["training_data"] == "tests" and info["scores"] == {"CIDEr": 0.0}
    assert not predictor.model.training
    assert predictor.caption([image_files["png_LA"]], DecodeOptions(max_length=4))[0]["captions"]


def test_an_empty_batch_gives_no_results(predictor):
    assert predictor.caption_batch([], DecodeOptions()) == []


def test_a_served_model_has_its_batch_norms_folded_and_says_the_same(tmp_path):
    """from_checkpoint folds the encoder's BatchNorms into its convolutions: same captions, same scores."""
    from captioner.checkpoint import load_checkpoint, save_checkpoint
    from captioner.config import ModelConfig
    from captioner.model import build_model
    from captioner.vocab import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle left of a blue square"])
    model = build_model(ModelConfig(encoder="efficientnet_lite0_s16"), vocab, pretrained=False)
    path = tmp_path / "s16.safetensors"
    save_checkpoint(model, path, {})
    served = Predictor.from_checkpoint(path)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.model.encoder.modules())
    unfolded = Predictor(load_checkpoint(path)[0])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.model.encoder.modules())
    pictures = [Image.effect_noise((300, 200), 40 + 20 * i).convert("RGB") for i in range(2)]
    options = DecodeOptions(beam_size=2, num_captions=2, max_length=6)
    for ours, reference in zip(served.caption(pictures, options), unfolded.caption(pictures, options)):
        assert [c["tokens"] for c in ours["captions"]] == [c["tokens"] for c in reference["captions"]]
        assert [c["log_prob"] for c in ours["captions"]] == pytest.approx(
            [c["log_prob"] for c in reference["captions"]], abs=1e-3
        )


def test_amp_runs_the_encoder_in_bfloat16_and_decodes_in_float32(tiny_model, image_files):
    outputs = []
    hook = tiny_model.encoder.register_forward_hook(lambda module, args, output: outputs.append(output))
    paths = [image_files[name] for name in list(IMAGE_CASES)[:6]]
    options = DecodeOptions(method="greedy", max_length=5, attention=True)
    try:
        exact = Predictor(tiny_model).caption(paths, options)
        mixed = Predictor(tiny_model, amp=True).caption(paths, options)
    finally:
        hook.remove()
    assert [(len(x), x.dtype) for x in outputs] == [(6, torch.float32), (6, torch.bfloat16)]
    float32, bfloat16 = outputs  # (6, P, D) each
    assert ((bfloat16.float() - float32).norm() / float32.norm()).item() < 0.05  # the same features, rounded
    for a, b in zip(exact, mixed):
        assert (a["width"], a["height"], a["attention_grid"]) == (b["width"], b["height"], b["attention_grid"])
        [caption] = b["captions"]
        assert len(caption["attention"]) == len(caption["tokens"])
        assert all(abs(sum(map(sum, grid)) - 1) < 1e-4 for grid in caption["attention"])  # float32 softmax
