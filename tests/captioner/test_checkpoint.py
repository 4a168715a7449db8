"""Checkpoints: safetensors with the config and vocabulary in the header, rebuilt from the file alone."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from captioner.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, read_header, save_checkpoint
from captioner.decoding import DecodeOptions
from tests.captioner.conftest import random_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CARD = {"training_data": "tests", "scores": {"CIDEr": 0.5}}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def rewrite_header(path, out, **changes):
    """A copy of a checkpoint with header fields replaced (the weights untouched)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(out), metadata={**metadata, **changes})
    return out


@pytest.mark.parametrize(
    "config", [{}, dict(attention=False, cell="gru", num_layers=2), dict(init_state="learned", positional=False)]
)
def test_round_trip_gives_identical_outputs(make_model, tmp_path, no_unpickling, config):
    model = make_model(**config)
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, CARD)
    loaded, card = load_checkpoint(path)
    assert card == CARD
    assert loaded.config == model.config and loaded.vocab == model.vocab
    assert not loaded.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    images = random_images(3)
    captions = torch.tensor([[1, 5, 6, 7, 2]] * 3)
    with torch.no_grad():
        expected_logits, _ = model(images, captions)
        logits, _ = loaded(images, captions)
        options = DecodeOptions(beam_size=3, num_captions=2, max_length=6)
        expected = model.caption_features(model.encoder(images), options)
        got = loaded.caption_features(loaded.encoder(images), options)
    assert torch.equal(logits, expected_logits)
    assert [[(h.token_ids, h.log_prob) for h in hyps] for hyps in got] == [
        [(h.token_ids, h.log_prob) for h in hyps] for hyps in expected
    ]


def test_file_is_safetensors_with_a_versioned_json_header(tiny_checkpoint, tiny_model):
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format"] == "captioner"
    assert metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["config"])["encoder"] == "tiny"
    assert json.loads(metadata["vocab"])[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert keys == set(tiny_model.state_dict())


def test_read_header_gives_config_vocab_and_card_without_building_a_model(tiny_checkpoint, tiny_model):
    config, vocab, card = read_header(tiny_checkpoint)
    assert config == tiny_model.config
    assert vocab == tiny_model.vocab
    assert card == {"training_data": "tests", "scores": {"CIDEr": 0.0}}


def test_a_pretrained_encoder_is_rebuilt_from_the_checkpoint_alone(tmp_path, no_unpickling):
    """Loading an EfficientNet checkpoint never reads the pretrained weight package (a torch.load)."""
    from captioner.model import build_model
    from captioner.vocab import Vocabulary
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(encoder="efficientnet_lite0"), Vocabulary.build(["a cat"]), pretrained=False)
    path = tmp_path / "lite0.safetensors"
    save_checkpoint(model, path)
    loaded, card = load_checkpoint(path)
    assert card == {}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_that_does_not_match_its_config_is_a_clear_error(tiny_checkpoint, tmp_path):
    config, _, _ = read_header(tiny_checkpoint)
    wider = json.dumps(config.to_dict() | {"hidden_dim": config.hidden_dim * 2})
    path = rewrite_header(tiny_checkpoint, tmp_path / "wider.safetensors", config=wider)
    with pytest.raises(CheckpointError, match="does not match its config") as caught:
        load_checkpoint(path)
    assert "wrong shape" in str(caught.value) and "decoder." in str(caught.value)

    no_attention = json.dumps(config.to_dict() | {"attention": False})
    path = rewrite_header(tiny_checkpoint, tmp_path / "no_attention.safetensors", config=no_attention)
    with pytest.raises(CheckpointError, match=r"unexpected: .*decoder\.f_beta"):
        load_checkpoint(path)


def test_a_vocabulary_that_does_not_match_the_weights_is_refused(tiny_checkpoint, tmp_path):
    _, vocab, _ = read_header(tiny_checkpoint)
    longer = json.dumps(vocab.to_json() + ["zebra"])
    path = rewrite_header(tiny_checkpoint, tmp_path / "longer.safetensors", vocab=longer)
    with pytest.raises(CheckpointError, match=r"decoder\.embed\.weight"):
        load_checkpoint(path)


def test_missing_weights_are_named(make_model, tmp_path):
    model = make_model()
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    tensors = load_file(str(path))
    del tensors["decoder.out.bias"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing: decoder\.out\.bias"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": str(FORMAT_VERSION + 1)}, "format version"),
        ({"format": "someone-else"}, "not a captioner checkpoint"),
        ({"config": "{not json"}, "broken header"),
        ({"config": json.dumps({"hidden_size": 3})}, "broken header"),
        ({"vocab": json.dumps(["a", "b"])}, "broken header"),
    ],
)
def test_foreign_or_broken_headers_are_refused(tiny_checkpoint, tmp_path, changes, message):
    path = rewrite_header(tiny_checkpoint, tmp_path / "other.safetensors", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_safetensors_without_captioner_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        read_header(path)


def test_a_pickle_or_garbage_file_is_refused_without_unpickling(tmp_path, no_unpickling):
    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing.safetensors")
