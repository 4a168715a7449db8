"""Flags made from typed models: names, help and defaults from the fields, values checked by pydantic."""

import argparse

import pytest

from api.settings import Settings
from captioner.config import ModelConfig
from captioner.decoding import DecodeOptions
from runtime.flags import add_model_flags, model_from_flags


def decode_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_flags(parser, DecodeOptions, title="decoding", **kwargs)
    return parser


def test_decoding_flags_give_decode_options_with_its_defaults_and_bounds():
    parser = decode_parser(skip=("attention",))
    assert model_from_flags(DecodeOptions, parser.parse_args([])) == DecodeOptions()
    args = parser.parse_args(
        ["--method", "sample", "--num-captions", "4", "--top-k", "5", "--seed", "7", "--length-penalty", "0"]
    )
    assert model_from_flags(DecodeOptions, args, attention=True) == DecodeOptions(
        method="sample", num_captions=4, top_k=5, seed=7, length_penalty=0.0, attention=True
    )
    with pytest.raises(ValueError, match="--beam-size"):
        model_from_flags(DecodeOptions, parser.parse_args(["--beam-size", "99"]))
    with pytest.raises(ValueError, match="--beam-size"):
        model_from_flags(DecodeOptions, parser.parse_args(["--beam-size", "2.5"]))
    with pytest.raises(ValueError, match="--num-captions: num_captions cannot exceed beam_size"):
        model_from_flags(DecodeOptions, parser.parse_args(["--beam-size", "2", "--num-captions", "3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "nucleus"])  # a Literal's values are the flag's choices


def test_a_command_can_drop_flags_and_change_defaults():
    best_only = decode_parser(skip=("attention", "num_captions"), defaults={"seed": 0})
    assert model_from_flags(DecodeOptions, best_only.parse_args([])) == DecodeOptions(seed=0)
    assert model_from_flags(DecodeOptions, best_only.parse_args(["--seed", "3"])).seed == 3
    with pytest.raises(SystemExit):
        best_only.parse_args(["--num-captions", "2"])


def test_help_is_the_field_description_with_its_default(capsys):
    parser = argparse.ArgumentParser()
    add_model_flags(parser, ModelConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, field in ModelConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(field.description.split()) in text
    assert "(default: 512)" in text and "{lstm,gru,rnn}" in text


def test_booleans_are_on_and_off_switches():
    parser = argparse.ArgumentParser()
    add_model_flags(parser, ModelConfig)
    assert model_from_flags(ModelConfig, parser.parse_args(["--no-attention"])).attention is False
    assert model_from_flags(ModelConfig, parser.parse_args(["--no-positional", "--positional"])).positional is True
    assert model_from_flags(ModelConfig, parser.parse_args([])) == ModelConfig()


def test_settings_flags_override_the_environment_and_name_their_variable(monkeypatch, capsys):
    from api.serve import add_arguments, settings_from_args

    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CAPTIONER_PORT", "9001")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--max-batch-size", "3"]))
    assert (settings.max_batch_size, settings.port) == (3, 9001)
    assert isinstance(settings, Settings)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "env CAPTIONER_MAX_BATCH_SIZE" in text
    flags = {option for action in parser._actions for option in action.option_strings}
    assert "--api-key" not in flags  # a secret on argv is one `ps` shows: the environment or a file only
    assert "--api-key-file" in flags  # a path is no secret
