"""The model's configuration: one typed dataclass, stored in every checkpoint."""

from dataclasses import asdict, dataclass, fields

CELLS = ("lstm", "gru", "rnn")
INIT_STATES = ("mean", "learned")


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "efficientnet_lite0"
    attention: bool = True  # soft attention (Show, Attend and Tell) or the image fed once (Show and Tell)
    cell: str = "lstm"  # lstm | gru | rnn (vanilla tanh)
    num_layers: int = 1
    embed_dim: int = 256  # E
    region_dim: int = 512  # R: encoder channels D are projected to R
    hidden_dim: int = 512  # H
    attention_dim: int = 256  # A
    dropout: float = 0.3
    positional: bool = True  # learned per-region position embeddings, so the decoder knows where it looks
    init_state: str = "mean"  # "mean": h0, c0 from the mean region (the paper); "learned": the decoder has to look
    word_in_query: bool = True  # the attention query also sees the word just read, not only h_{t-1}

    def __post_init__(self):
        for f in fields(self):  # a JSON header or a CLI can hand over "false" or 1.5
            value, kind = getattr(self, f.name), f.type
            kinds = (int, float) if kind is float else (kind,)
            if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.init_state not in INIT_STATES:
            raise ValueError(f"init_state must be one of {INIT_STATES}, got {self.init_state!r}")
        for name in ("num_layers", "embed_dim", "region_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
