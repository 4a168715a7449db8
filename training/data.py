"""Training batches: every image with `captions_per_image` of its captions.

Each image's regions go through the decoder's projection once and are shared
by all its captions, which makes an epoch over all captions about as cheap as
one over the images. The order of an epoch depends only on (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from captioner.vocab import Vocabulary


def encode_captions(captions: Sequence[Sequence[str]], vocab: Vocabulary, max_words: int) -> list[list[list[int]]]:
    """Per image, per caption: <start> w1 .. wn <end> ids, at most `max_words` words."""
    encoded = []
    for image_captions in captions:
        ids = [vocab.encode(c) for c in image_captions]
        encoded.append([c[: max_words + 1] + [vocab.end_id] if len(c) > max_words + 2 else c for c in ids])
    return encoded


def pad(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, T) long tensor, right-padded with <pad> = 0 to the longest."""
    out = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


@dataclass
class Batch:
    indices: list[int]  # images, into the split
    captions: torch.Tensor  # (B * k, T), the k captions of image i in rows i*k .. i*k+k-1


class CaptionBatches:
    """Deterministic, shardable batches of image indices with their captions."""

    def __init__(
        self,
        captions: list[list[list[int]]],
        batch_size: int,
        captions_per_image: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.captions = captions
        self.batch_size = batch_size
        self.k = captions_per_image
        self.seed = seed
        # DistributedSampler also serves one process: it shuffles by (seed, epoch) and shards by rank.
        # It only takes len() of its dataset (annotated Dataset): a range of the image indices does.
        images = cast("Dataset[int]", range(len(captions)))
        self.sampler: DistributedSampler[int] = DistributedSampler(
            images, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, after skipping the first `skip` (a resumed run)."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        rng = np.random.default_rng([self.seed, epoch])
        picks = [rng.choice(len(self.captions[i]), self.k, replace=len(self.captions[i]) < self.k) for i in order]
        for b in range(skip, len(self)):
            span = slice(b * self.batch_size, (b + 1) * self.batch_size)
            indices = order[span]
            rows = [self.captions[i][j] for i, chosen in zip(indices, picks[span]) for j in chosen]
            yield Batch(indices, pad(rows))
