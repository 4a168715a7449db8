"""The model's configuration: one typed model, stored in every checkpoint's header and set by
`captioner train`'s flags (which take their help from these descriptions)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    encoder: str = Field(
        "efficientnet_lite0",
        description="the pretrained CNN: efficientnet_lite0, "
        "efficientnet_lite0_s16 (a 14 x 14 grid), resnet50, resnet101, or tiny (tests)",
    )
    attention: bool = Field(
        True, description="soft attention (Show, Attend and Tell), or the image fed once (Show and Tell)"
    )
    cell: Literal["lstm", "gru", "rnn"] = Field("lstm", description="the recurrent cell; rnn is a vanilla tanh RNN")
    num_layers: int = Field(1, ge=1, description="stacked recurrent layers")
    embed_dim: int = Field(256, ge=1, description="E: word embedding size")
    region_dim: int = Field(512, ge=1, description="R: the encoder's D channels are projected to R")
    hidden_dim: int = Field(512, ge=1, description="H: the recurrent state's size")
    attention_dim: int = Field(256, ge=1, description="A: the attention's hidden size")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the output layer")
    positional: bool = Field(
        True, description="learned per-region position embeddings, so the decoder knows where it looks"
    )
    init_state: Literal["mean", "learned"] = Field(
        "mean", description="mean: h0, c0 from the mean region (the paper); learned: the decoder has to look"
    )
    word_in_query: bool = Field(
        True, description="the attention query also sees the word just read, not only the previous hidden state"
    )

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """ValueError (pydantic's ValidationError) naming any unknown or ill-typed key."""
        return cls.model_validate(d)
