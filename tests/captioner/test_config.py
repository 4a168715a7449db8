"""ModelConfig: defaults the product promises, validation, and the dict form checkpoints store."""

import json

import pytest
from pydantic import ValidationError

from captioner.config import ModelConfig


def test_defaults_are_the_pretrained_attention_lstm():
    c = ModelConfig()
    assert (c.encoder, c.attention, c.cell, c.num_layers) == ("efficientnet_lite0", True, "lstm", 1)
    assert c.init_state == "mean"  # h0, c0 from the mean region, as in the paper


@pytest.mark.parametrize(
    "overrides",
    [
        {"cell": "transformer"},
        {"init_state": "zeros"},
        {"num_layers": 0},
        {"embed_dim": 0},
        {"region_dim": -1},
        {"hidden_dim": 0},
        {"attention_dim": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_invalid_values_are_refused(overrides):
    with pytest.raises(ValueError):
        ModelConfig(**overrides)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_cell_type_is_accepted(cell):
    assert ModelConfig(cell=cell, num_layers=2).cell == cell


def test_dict_round_trip_through_json():
    c = ModelConfig(encoder="tiny", attention=False, cell="gru", num_layers=2, dropout=0.1, positional=False)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert set(c.to_dict()) == set(ModelConfig.model_fields)


def test_unknown_keys_are_refused_by_name():
    d = ModelConfig().to_dict() | {"hiden_dim": 3}
    with pytest.raises(ValueError, match="hiden_dim"):
        ModelConfig.from_dict(d)


def test_config_is_immutable():
    with pytest.raises(ValidationError, match="frozen"):
        ModelConfig().cell = "gru"
