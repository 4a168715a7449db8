"""The captioning model: an encoder, a decoder and the vocabulary they share."""

import torch
from torch import nn

from .config import ModelConfig
from .decoder import Decoder
from .decoding import DecodeOptions, Hypothesis, decode
from .encoder import Encoder, build_encoder
from .images import ImagePreset
from .vocab import Vocabulary


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab: Vocabulary, encoder: Encoder):
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.encoder = encoder
        self.decoder = Decoder(config, len(vocab), encoder.dim, encoder.grid)

    @property
    def preset(self) -> ImagePreset:
        """How images must be prepared for this model's encoder."""
        return ImagePreset(self.encoder.image_size, self.encoder.mean, self.encoder.std)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def forward(self, images: torch.Tensor, captions: torch.Tensor, captions_per_image: int = 1):
        """Teacher forcing from pixels: images (B, 3, S, S), captions (B * k, T); see Decoder.forward."""
        return self.decoder(self.encoder(images), captions, captions_per_image)

    @torch.no_grad()
    def caption_features(self, features: torch.Tensor, options: DecodeOptions) -> list[list[Hypothesis]]:
        """Decode region features (B, P, D): per image, its captions best first."""
        return decode(self.decoder, self.decoder.prepare(features), options)


def build_model(
    config: ModelConfig, vocab: Vocabulary, pretrained: bool = True, encoder_weights: str | None = None
) -> CaptionModel:
    """A new model; `pretrained=False` when a checkpoint will supply every weight."""
    return CaptionModel(config, vocab, build_encoder(config.encoder, pretrained, encoder_weights))
