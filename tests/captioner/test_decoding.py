"""Decoding strategies against properties any correct decoder has, on real tiny models."""

import itertools

import pytest
import torch

from captioner.decoding import (
    DecodeOptions,
    Hypothesis,
    _next_word_log_probs,
    ban_repeats,
    beam_search,
    decode,
    distinct_captions,
    greedy,
    rank_score,
    sample,
)
from captioner.vocab import Vocabulary
from tests.captioner.conftest import region_features, vary_caption_lengths

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIAL_IDS = {Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id}

# Configurations the decoding strategies must all work with.
CONFIGS = {
    "attention-lstm": {},
    "show-and-tell": dict(attention=False),
    "gru-2-layers": dict(cell="gru", num_layers=2),
    "rnn-learned-init": dict(cell="rnn", init_state="learned", word_in_query=False),
}


def teacher_forced_log_prob(decoder, features: torch.Tensor, token_ids: list[int]) -> float:
    """log p(tokens, <end> | image) from decoder.forward: the model's own probability of a caption."""
    ids = torch.tensor([[Vocabulary.start_id, *token_ids, Vocabulary.end_id]])
    with torch.no_grad():
        logits, _ = decoder(features.unsqueeze(0), ids)  # (1, T-1, V)
    return float(logits.log_softmax(-1).gather(2, ids[:, 1:, None]).sum())


def decode_features(model, features, **options):
    return decode(model.decoder, model.decoder.prepare(features), DecodeOptions(**options))


def all_strategies():
    return {
        "greedy": dict(method="greedy"),
        "sample": dict(method="sample", num_captions=4, seed=3, temperature=1.5, top_k=6),
        "beam": dict(method="beam", beam_size=4, num_captions=3),
    }


def varied(model, features, max_length: int = 8):
    """The model, made to end its captions at different steps for these images."""
    vary_caption_lengths(model, features, max_length)
    return model


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(method="nucleus"),
        dict(beam_size=0),
        dict(beam_size=11),
        dict(num_captions=0),
        dict(num_captions=11),
        dict(beam_size=2, num_captions=3),
        dict(method="greedy", num_captions=2),
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(temperature=10.5),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_k=1001),
        dict(max_length=0),
        dict(max_length=51),
        dict(length_penalty=-0.1),
        dict(length_penalty=2.5),
    ],
)
def test_options_out_of_bounds_are_refused(options):
    with pytest.raises(ValueError):
        DecodeOptions(**options)


@pytest.mark.parametrize(
    "options",
    [
        dict(beam_size=2.5),
        dict(num_captions=1.5, method="sample"),
        dict(max_length=3.5),
        dict(top_k=2.5),
        dict(beam_size="3"),
        dict(max_length=True),
    ],
)
def test_options_of_the_wrong_type_are_refused(options):
    """A float beam size would otherwise pass the bounds and crash deep inside decoding."""
    with pytest.raises(ValueError):
        DecodeOptions(**options)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(method="greedy"),
        dict(method="sample", num_captions=10, temperature=10.0, top_k=1000),
        dict(beam_size=10, num_captions=10, max_length=50, length_penalty=2.0),
        dict(method="sample", seed=0),
        dict(temperature=0.01, length_penalty=0.0, max_length=1),
    ],
)
def test_options_within_bounds_are_accepted(options):
    DecodeOptions(**options)


# --- what every strategy returns -----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("strategy", all_strategies().keys())
def test_every_strategy_returns_well_formed_captions(make_model, config, strategy):
    model = make_model(**config)
    options = DecodeOptions(**all_strategies()[strategy], max_length=6)
    features = region_features(model, 3)
    varied(model, features, 6)
    results = decode_features(model, features, **all_strategies()[strategy], max_length=6)
    P = model.grid[0] * model.grid[1]
    assert len(results) == 3
    for hypotheses in results:
        assert len(hypotheses) == options.num_captions
        assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
        for h in hypotheses:
            assert isinstance(h, Hypothesis)
            assert len(h.token_ids) <= 6
            assert not SPECIAL_IDS & set(h.token_ids)  # words only
            assert all(0 <= i < len(model.vocab) for i in h.token_ids)
            assert h.log_prob < 0 and h.score == pytest.approx(rank_score(h.log_prob, len(h.token_ids), 0.7))
            if model.decoder.has_attention:
                assert h.attention.shape == (len(h.token_ids), P)  # one grid per emitted word
                torch.testing.assert_close(h.attention.sum(1), torch.ones(len(h.token_ids)))
            else:
                assert h.attention is None


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("strategy", all_strategies().keys())
def test_log_prob_is_the_models_own_probability_of_the_caption(make_model, config, strategy):
    """Summed log-probability equals teacher forcing the returned words and <end> through forward()."""
    model = make_model(**config)
    features = region_features(model, 3)
    varied(model, features, 5)
    results = decode_features(model, features, **all_strategies()[strategy], max_length=5)
    for image, hypotheses in enumerate(results):
        for h in hypotheses:
            expected = teacher_forced_log_prob(model.decoder, features[image], h.token_ids)
            assert h.log_prob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("strategy", all_strategies().keys())
def test_max_length_is_respected_and_end_is_forced_and_scored(make_model, strategy):
    model = make_model()
    with torch.no_grad():
        model.decoder.out.bias[Vocabulary.end_id] = -30.0  # the model would rather never stop
    features = region_features(model, 2)
    results = decode_features(model, features, **all_strategies()[strategy], max_length=4)
    for image, hypotheses in enumerate(results):
        for h in hypotheses:
            assert len(h.token_ids) == 4
            # the forced <end> costs what the model says it costs, about -30
            assert h.log_prob == pytest.approx(
                teacher_forced_log_prob(model.decoder, features[image], h.token_ids), abs=1e-3
            )
            assert h.log_prob < -25


def test_pad_start_and_unk_are_never_emitted_even_when_the_model_prefers_them(make_model):
    model = make_model()
    never = [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]
    with torch.no_grad():
        model.decoder.out.bias[never] = 50.0
    features = region_features(model, 2)
    for strategy in all_strategies().values():
        for hypotheses in decode_features(model, features, **strategy, max_length=5):
            for h in hypotheses:
                assert not set(never) & set(h.token_ids)


# --- greedy and beam search ----------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_beam_size_one_is_exactly_greedy(make_model, config):
    model = make_model(**config)
    features = region_features(model, 6)
    memory = varied(model, features).decoder.prepare(features)
    greedy_captions = greedy(model.decoder, memory, max_length=8)
    beam_captions = [hyps[0] for hyps in beam_search(model.decoder, memory, beam_size=1, max_length=8)]
    assert len({len(h.token_ids) for h in greedy_captions}) > 1  # captions that end at different steps
    for g, b in zip(greedy_captions, beam_captions):
        assert b.token_ids == g.token_ids
        assert b.log_prob == pytest.approx(g.log_prob, abs=1e-5)
        if g.attention is not None:
            torch.testing.assert_close(b.attention, g.attention)


def test_greedy_picks_the_most_likely_word_at_every_step(make_model):
    model = make_model()
    features = region_features(model, 6)
    varied(model, features, 6)
    for image, h in enumerate(greedy(model.decoder, model.decoder.prepare(features), max_length=6)):
        ids = torch.tensor([[Vocabulary.start_id, *h.token_ids, Vocabulary.end_id]])
        with torch.no_grad():
            logits, _ = model.decoder(features[image : image + 1], ids)  # (1, T-1, V)
        logits[..., [Vocabulary.pad_id, Vocabulary.start_id]] = float("-inf")
        chosen = logits.argmax(-1)[0].tolist()
        assert chosen[:-1] == ids[0, 1:-1].tolist()
        if len(h.token_ids) < 6:  # <end> chosen, not forced
            assert chosen[-1] == Vocabulary.end_id


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_decoding_equals_decoding_each_image_alone(make_model, strategy):
    """Beams of one image and of different images finish at different steps; none disturbs another."""
    model = make_model()
    features = region_features(model, 6)
    varied(model, features)
    options = dict(method="beam", beam_size=5, num_captions=5) if strategy == "beam" else dict(method="greedy")
    together = decode_features(model, features, **options, max_length=8)
    lengths = {len(h.token_ids) for hyps in together for h in hyps}
    assert len(lengths) > 2  # the property needs captions that end at different steps
    for image in range(6):
        alone = decode_features(model, features[image : image + 1], **options, max_length=8)[0]
        assert [h.token_ids for h in alone] == [h.token_ids for h in together[image]]
        assert [h.log_prob for h in alone] == pytest.approx([h.log_prob for h in together[image]], abs=1e-5)


@torch.no_grad()
def textbook_beam_search(
    decoder, features: torch.Tensor, beam_size: int, max_length: int, length_penalty: float, no_repeat: int = 0
) -> list[Hypothesis]:
    """One image, one beam at a time, no shortcuts: every step ranks all continuations of the
    live beams (none repeating a run of `no_repeat` words); ends among the first K finish, the
    first K others live on; until K have finished."""
    memory = decoder.prepare(features.unsqueeze(0))
    beams = [(0.0, [Vocabulary.start_id], decoder.init_state(memory))]
    finished = []
    for t in range(max_length + 1):
        candidates = []
        for log_prob, tokens, state in beams:
            logits, next_state, _ = decoder.step(torch.tensor(tokens[-1:]), state, memory)
            step_log_probs = _next_word_log_probs(logits, last_step=t == max_length)
            step_log_probs = ban_repeats(step_log_probs, [tokens[1:]], no_repeat)[0]
            candidates += [
                (log_prob + float(lp), tokens + [w], next_state) for w, lp in enumerate(step_log_probs) if lp.isfinite()
            ]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for rank, (log_prob, tokens, state) in enumerate(candidates[: 2 * beam_size]):
            if tokens[-1] == Vocabulary.end_id:
                if rank < beam_size:
                    words = tokens[1:-1]
                    finished.append(Hypothesis(words, log_prob, rank_score(log_prob, len(words), length_penalty), None))
            elif len(beams) < beam_size:
                beams.append((log_prob, tokens, state))
        if len(finished) >= beam_size:
            break
    return sorted(finished, key=lambda h: -h.score)


@pytest.mark.parametrize(("length_penalty", "no_repeat"), [(0.0, 0), (0.7, 0), (2.0, 0), (0.7, 2), (0.0, 3)])
def test_beam_search_returns_what_the_textbook_search_returns(make_model, length_penalty, no_repeat):
    """Batched, stopping an image once no live beam can overtake its best, one row per image at the
    first step: none of these shortcuts changes a returned caption or its log-probability."""
    model = make_model()
    features = region_features(model, 6)
    varied(model, features, 8)
    for beam_size, num_captions in [(2, 1), (3, 1), (4, 2), (5, 5)]:
        batched = decode_features(
            model,
            features,
            beam_size=beam_size,
            num_captions=num_captions,
            max_length=8,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat,
        )
        for image in range(6):
            search = textbook_beam_search(model.decoder, features[image], beam_size, 8, length_penalty, no_repeat)
            textbook = search[:num_captions]
            assert [h.token_ids for h in batched[image]] == [h.token_ids for h in textbook]
            assert [h.log_prob for h in batched[image]] == pytest.approx([h.log_prob for h in textbook], abs=1e-5)


def test_ban_repeats_bans_the_word_that_would_say_a_run_twice():
    log_probs = torch.zeros(3, 10)  # (N, V)
    said = [[4, 5, 6, 4, 5], [4, 5, 4], [7]]
    banned = ban_repeats(log_probs, said, 3)
    assert banned[0].isinf().nonzero().flatten().tolist() == [6]  # "4 5 6" again
    assert not banned[1].isinf().any() and not banned[2].isinf().any()  # "5 4 ..." and "7 ..." are new
    assert ban_repeats(log_probs, said, 2)[1].isinf().nonzero().flatten().tolist() == [5]  # "4 5" again
    assert ban_repeats(log_probs, said, 1)[2].isinf().nonzero().flatten().tolist() == [7]  # no word twice
    assert ban_repeats(log_probs, said, 0) is log_probs


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_no_caption_says_a_run_of_words_twice(make_model, strategy):
    model = make_model()
    features = region_features(model, 6)
    varied(model, features, 12)

    def repeats(n: int, no_repeat: int) -> int:
        """Captions with a run of n words twice."""
        options = {**all_strategies()[strategy], "max_length": 12, "no_repeat_ngram_size": no_repeat}
        hyps = [h for hs in decode_features(model, features, **options) for h in hs]
        return sum(len(set(zip(*(h.token_ids[i:] for i in range(n))))) < len(h.token_ids) - n + 1 for h in hyps)

    assert repeats(2, 0) > 0  # this model repeats itself when let
    assert repeats(2, 2) == repeats(3, 3) == 0


def test_beam_n_best_are_distinct_and_sorted_by_normalised_score(make_model):
    model = make_model()
    features = region_features(model, 4)
    varied(model, features, 7)
    for penalty in (0.0, 0.7, 2.0):
        results = decode_features(model, features, beam_size=6, num_captions=6, max_length=7, length_penalty=penalty)
        for hypotheses in results:
            assert len(hypotheses) == 6
            assert len({tuple(h.token_ids) for h in hypotheses}) == 6
            scores = [h.score for h in hypotheses]
            assert scores == sorted(scores, reverse=True)
            for h in hypotheses:
                assert h.score == pytest.approx(h.log_prob / (len(h.token_ids) + 1) ** penalty)


def test_length_penalty_zero_ranks_by_log_prob(make_model):
    model = make_model()
    features = region_features(model, 3)
    varied(model, features, 6)
    for hypotheses in decode_features(model, features, beam_size=5, num_captions=5, max_length=6, length_penalty=0.0):
        assert [h.score for h in hypotheses] == [h.log_prob for h in hypotheses]


@pytest.mark.parametrize("config", [{}, dict(attention=False, cell="gru")], ids=["attention", "show-and-tell"])
def test_wide_beam_finds_every_caption_exhaustive_search_finds(make_model, config):
    """Vocabulary {"cat", "dog"} (<unk> is never said) and at most 2 words: 7 captions in all, so a
    beam of 7 must return every one of them, with the log-probabilities exhaustive teacher forcing
    gives, best first."""
    model = make_model(vocab=Vocabulary.build(["cat dog"]), **config)
    features = region_features(model, 3)
    memory = model.decoder.prepare(features)
    words = [4, 5]
    everything = [list(c) for n in range(3) for c in itertools.product(words, repeat=n)]
    assert len(everything) == 7
    beams = beam_search(model.decoder, memory, beam_size=7, num_captions=7, max_length=2, length_penalty=0.0)
    greedy_captions = greedy(model.decoder, memory, max_length=2)
    for image in range(3):
        truth = sorted(
            ((teacher_forced_log_prob(model.decoder, features[image], c), c) for c in everything), reverse=True
        )
        found = beams[image]
        assert [h.token_ids for h in found] == [c for _, c in truth]
        assert [h.log_prob for h in found] == pytest.approx([lp for lp, _ in truth], abs=1e-4)
        assert found[0].log_prob >= greedy_captions[image].log_prob - 1e-6


# --- sampling ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ(make_model):
    model = make_model()
    features = region_features(model, 3)

    def tokens(seed):
        results = decode_features(
            model, features, method="sample", num_captions=5, temperature=2.0, max_length=8, seed=seed
        )
        return [[h.token_ids for h in hyps] for hyps in results]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_sampling_returns_n_samples_per_image_from_that_image(make_model):
    model = make_model()
    features = region_features(model, 3)
    varied(model, features, 5)
    results = decode_features(model, features, method="sample", num_captions=6, temperature=2.0, max_length=5, seed=0)
    assert [len(hyps) for hyps in results] == [6, 6, 6]
    assert len({tuple(h.token_ids) for h in results[0]}) > 1  # hot sampling differs between samples


def test_sampling_with_top_k_one_is_greedy(make_model):
    model = make_model()
    features = region_features(model, 6)
    memory = varied(model, features, 6).decoder.prepare(features)
    sampled = sample(model.decoder, memory, num_samples=3, max_length=6, temperature=3.0, top_k=1, seed=0)
    for g, hypotheses in zip(greedy(model.decoder, memory, max_length=6), sampled):
        for h in hypotheses:
            assert h.token_ids == g.token_ids
            assert h.log_prob == pytest.approx(g.log_prob, abs=1e-5)


def test_sampled_words_come_from_the_top_k(make_model):
    model = make_model()
    features = region_features(model, 3)
    varied(model, features, 6)
    results = decode_features(
        model, features, method="sample", num_captions=8, temperature=5.0, top_k=3, max_length=6, seed=1
    )
    ranks = []  # of every drawn word among the top 3
    for image, hypotheses in enumerate(results):
        for h in hypotheses:
            ids = torch.tensor([[Vocabulary.start_id, *h.token_ids, Vocabulary.end_id]])
            with torch.no_grad():
                logits, _ = model.decoder(features[image : image + 1], ids)  # (1, T-1, V)
            logits[..., [Vocabulary.pad_id, Vocabulary.start_id]] = float("-inf")
            top3 = logits[0].topk(3, dim=-1).indices.tolist()  # (T-1, 3)
            steps = len(h.token_ids) if len(h.token_ids) == 6 else len(h.token_ids) + 1  # a forced <end> is no draw
            for t in range(steps):
                assert int(ids[0, t + 1]) in top3[t]
                ranks.append(top3[t].index(int(ids[0, t + 1])))
    assert set(ranks) == {0, 1, 2}  # hot sampling uses all three, not only the best


def test_temperature_changes_what_is_sampled(make_model):
    """Near-zero temperature concentrates on the greedy caption; a hot one wanders off it."""
    model = make_model()
    features = region_features(model, 3)
    memory = varied(model, features, 6).decoder.prepare(features)
    best = [g.token_ids for g in greedy(model.decoder, memory, max_length=6)]
    cold = sample(model.decoder, memory, num_samples=5, max_length=6, temperature=1e-3, seed=0)
    hot = sample(model.decoder, memory, num_samples=5, max_length=6, temperature=10.0, seed=0)
    assert all(h.token_ids == best[i] for i, hyps in enumerate(cold) for h in hyps)
    assert any(h.token_ids != best[i] for i, hyps in enumerate(hot) for h in hyps)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30, 1e-12])
def test_a_temperature_near_zero_samples_the_greedy_caption_instead_of_failing(make_model, temperature):
    """Every temperature the options accept (> 0) is usable: dividing by one that float32 rounds to 0
    gave 0/0 and -inf rows, and multinomial refused their NaN probabilities."""
    model = make_model()
    features = region_features(model, 3)
    memory = varied(model, features, 6).decoder.prepare(features)
    best = [g.token_ids for g in greedy(model.decoder, memory, max_length=6)]
    options = DecodeOptions(method="sample", num_captions=3, temperature=temperature, max_length=6, seed=0)
    results = decode(model.decoder, memory, options)
    assert [[h.token_ids for h in hyps] for hyps in results] == [[b] * 3 for b in best]


def test_distinct_captions_counts_what_a_vocabulary_can_say():
    assert distinct_captions(2, 2) == 7  # "", cat, dog, and the four pairs
    assert distinct_captions(2, 1) == 3
    assert distinct_captions(0, 20) == 1  # only the empty caption
    assert distinct_captions(30, 50) == 10  # counted up to MAX_CAPTIONS, never 30**50
    assert distinct_captions(2, 2, at_most=5) == 5


@pytest.mark.parametrize("max_length", [1, 2, 3])
def test_beam_search_returns_every_caption_it_can_up_to_num_captions(make_model, max_length):
    """Beam search fills num_captions whenever that many different captions exist, and returns all
    there are when fewer exist: the count the API checks num_captions against."""
    model = make_model(vocab=Vocabulary.build(["cat dog"]))
    memory = model.decoder.prepare(region_features(model, 2))
    for beam_size in (3, 7, 10):
        beams = beam_search(model.decoder, memory, beam_size=beam_size, num_captions=beam_size, max_length=max_length)
        expected = min(beam_size, distinct_captions(2, max_length))
        assert [len(b) for b in beams] == [expected, expected]
        assert all(len({tuple(h.token_ids) for h in b}) == expected for b in beams)
