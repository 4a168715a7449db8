"""Training batches: caption ids, padding, and epochs that depend only on (seed, epoch)."""

import itertools

import pytest
import torch

from captioner.vocab import Vocabulary
from training.data import CaptionBatches, encode_captions, pad

VOCAB = Vocabulary.build(["a red circle above a blue square", "two shapes on a dark background"])


def numbered_captions(images: int, per_image: int = 5) -> list[list[list[int]]]:
    """Image i's caption j is [<start>, 1000 * i + j, <end>]: every row says where it came from."""
    return [[[1, 1000 * i + j, 2] for j in range(per_image)] for i in range(images)]


def source(row: torch.Tensor) -> tuple[int, int]:
    """(image, caption) of a row of `numbered_captions`."""
    return divmod(int(row[1]), 1000)


def epoch_batches(batches: CaptionBatches, epoch: int, skip: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    return [(b.indices, b.captions.tolist()) for b in batches.epoch(epoch, skip)]


# ---------------------------------------------------------------- encode_captions and pad


def test_encode_captions_wraps_each_caption_in_start_and_end():
    [[ids]] = encode_captions([["A red circle."]], VOCAB, max_words=20)
    assert ids == [VOCAB.start_id, *(VOCAB.words.index(w) for w in ("a", "red", "circle")), VOCAB.end_id]


@pytest.mark.parametrize("max_words", [1, 3, 5])
def test_encode_captions_cuts_long_captions_and_keeps_start_and_end(max_words):
    text = "a red circle above a blue square"  # 7 words
    [[ids]] = encode_captions([[text]], VOCAB, max_words)
    full = VOCAB.encode(text)
    assert ids == full[: 1 + max_words] + [VOCAB.end_id]
    assert len(ids) == max_words + 2


@pytest.mark.parametrize("max_words", [7, 8, 30])
def test_encode_captions_keeps_captions_that_fit(max_words):
    text = "a red circle above a blue square"
    assert encode_captions([[text, "a circle"]], VOCAB, max_words) == [[VOCAB.encode(text), VOCAB.encode("a circle")]]


def test_encode_captions_keeps_images_and_their_caption_order():
    captions = [["a red circle", "a blue square"], ["two shapes"]]
    assert encode_captions(captions, VOCAB, 20) == [[VOCAB.encode(c) for c in cs] for cs in captions]


def test_pad_right_pads_with_zeros_to_the_longest():
    out = pad([[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]])
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 5, 2, 0, 0], [1, 2, 0, 0, 0], [1, 7, 8, 9, 2]]


# ---------------------------------------------------------------- CaptionBatches


@pytest.mark.parametrize("images,batch_size", [(10, 3), (12, 4), (5, 8)])
def test_an_epoch_shows_every_image_exactly_once(images, batch_size):
    batches = CaptionBatches(numbered_captions(images), batch_size, captions_per_image=2, seed=0)
    seen = [i for b in batches.epoch(0) for i in b.indices]
    assert sorted(seen) == list(range(images))
    assert len(list(batches.epoch(0))) == len(batches) == -(-images // batch_size)
    assert all(len(b.indices) <= batch_size for b in batches.epoch(0))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_rows_i_k_to_i_k_plus_k_are_captions_of_image_i(k):
    batches = CaptionBatches(numbered_captions(9), batch_size=4, captions_per_image=k, seed=3)
    for batch in batches.epoch(1):
        assert batch.captions.shape[0] == len(batch.indices) * k
        for n, image in enumerate(batch.indices):
            rows = [source(r) for r in batch.captions[n * k : (n + 1) * k]]
            assert [i for i, _ in rows] == [image] * k
            assert len({j for _, j in rows}) == k  # k different captions of the 5


def test_an_image_with_fewer_captions_than_k_repeats_them():
    captions = [[[1, 10, 2]], [[1, 20, 2], [1, 21, 2]]]
    batches = CaptionBatches(captions, batch_size=2, captions_per_image=3, seed=0)
    [batch] = list(batches.epoch(0))
    for n, image in enumerate(batch.indices):
        rows = batch.captions[n * 3 : (n + 1) * 3, 1].tolist()
        assert set(rows) <= {c[1] for c in captions[image]}
        assert len(rows) == 3


def test_captions_are_padded_to_the_longest_in_the_batch():
    captions = [[[1, 10, 2]], [[1, 20, 21, 22, 2]]]
    [batch] = list(CaptionBatches(captions, batch_size=2, captions_per_image=1).epoch(0))
    rows = {tuple(r) for r in batch.captions.tolist()}
    assert rows == {(1, 10, 2, 0, 0), (1, 20, 21, 22, 2)}


def test_same_seed_and_epoch_give_the_same_batches():
    a = CaptionBatches(numbered_captions(20), 6, 2, seed=7)
    b = CaptionBatches(numbered_captions(20), 6, 2, seed=7)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) == epoch_batches(a, 3)  # asking twice changes nothing


def test_another_epoch_or_seed_gives_another_order():
    batches = CaptionBatches(numbered_captions(20), 6, 2, seed=7)
    orders = {tuple(i for b in batches.epoch(e) for i in b.indices) for e in range(4)}
    assert len(orders) == 4
    other_seed = CaptionBatches(numbered_captions(20), 6, 2, seed=8)
    assert epoch_batches(other_seed, 0) != epoch_batches(batches, 0)


def test_another_epoch_picks_other_captions():
    batches = CaptionBatches(numbered_captions(20), 20, 1, seed=0)
    picks = [{source(r) for r in next(batches.epoch(e)).captions} for e in range(3)]
    assert picks[0] != picks[1] and picks[1] != picks[2]


@pytest.mark.parametrize("skip", [0, 1, 3, 4])
def test_skip_resumes_mid_epoch_with_the_same_remaining_batches(skip):
    batches = CaptionBatches(numbered_captions(22), 6, 3, seed=1)
    full = epoch_batches(batches, 2)
    resumed = CaptionBatches(numbered_captions(22), 6, 3, seed=1)  # a new process, the same data
    assert epoch_batches(resumed, 2, skip) == full[skip:]


def test_two_ranks_see_disjoint_shards_that_cover_the_epoch():
    captions = numbered_captions(20)
    ranks = [CaptionBatches(captions, 4, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        shards = [[i for b in r.epoch(epoch) for i in b.indices] for r in ranks]
        assert set(shards[0]).isdisjoint(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(20))
        assert len(shards[0]) == len(shards[1]) == 10
    assert len(ranks[0]) == len(ranks[1])


def test_two_ranks_of_an_odd_set_take_equal_steps_and_cover_it():
    """DDP needs the same number of steps on every rank: one image is lent to make the shards even."""
    captions = numbered_captions(9)
    ranks = [CaptionBatches(captions, 2, 1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    shards = [[i for b in r.epoch(0) for i in b.indices] for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[0].epoch(0))) == len(list(ranks[1].epoch(0))) == 3
    assert set(shards[0]) | set(shards[1]) == set(range(9))
    assert len(shards[0]) == len(shards[1]) == 5


def test_rank_shards_follow_the_epoch_and_resume_like_one_process():
    captions = numbered_captions(16)
    rank1 = CaptionBatches(captions, 3, 1, seed=2, rank=1, world_size=2)
    assert epoch_batches(rank1, 0) != epoch_batches(rank1, 1)
    assert epoch_batches(rank1, 1, skip=1) == epoch_batches(rank1, 1)[1:]


def test_batches_do_not_depend_on_the_caption_lengths_of_other_images():
    """Which images and captions a batch holds depends only on (seed, epoch), not on the data's contents."""
    short = numbered_captions(12)
    long = [[c[:2] + [7] * (n % 4) + c[2:] for n, c in enumerate(cs)] for cs in short]
    a = CaptionBatches(short, 5, 2, seed=4)
    b = CaptionBatches(long, 5, 2, seed=4)
    for x, y in itertools.zip_longest(a.epoch(1), b.epoch(1)):
        assert x.indices == y.indices
        assert [source(r) for r in x.captions] == [source(r) for r in y.captions]
