"""The SCST reward (CIDEr-D with training document frequencies) and loss, on real tiny models.

The loss is checked against an independent computation: the library's sampler and greedy
decoder with the same seed, and a caption's log-probability summed step by step through
`Decoder.step()`; under DistributedDataParallel, two real processes average their gradients.
"""

import math
import random

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioner.decoding import greedy, sample
from captioner.model import build_model
from captioner.vocab import Vocabulary
from tests.captioner.conftest import region_features
from tests.conftest import TINY_CAPTIONS, talkative_tiny_model, tiny_config
from training.cider_d import CiderD
from training.scst import caption_log_probs, scst_loss

CORPUS = [
    ["a red circle above a blue square", "a red circle over a blue square"],
    ["a big green triangle on a dark background", "a large green triangle"],
    ["there is a small yellow diamond", "a little yellow diamond"],
    ["two shapes a purple circle and a white square"],
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra threads only add synchronisation on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- CIDEr-D


def random_corpus(images: int, seed: int) -> tuple[list[list[str]], list[str]]:
    """References (1-5 per image) and one candidate per image, from a small vocabulary so n-grams repeat."""
    rng = random.Random(seed)
    words = ["a", "the", "red", "blue", "circle", "square", "big", "small", "above", "below", "on", "left"]
    caption = lambda: " ".join(rng.choices(words, k=rng.randint(1, 9)))
    references = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    candidates = [rng.choice(refs) if rng.random() < 0.2 else caption() for refs in references]
    return references, [*candidates[:-1], ""]  # an empty candidate too


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_d_equals_pycocoevalcap_when_the_corpus_is_the_batch(seed):
    references, candidates = random_corpus(30, seed)
    _, expected = Cider().compute_score(dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    np.testing.assert_allclose(CiderD(references).scores(candidates, references), expected, rtol=0, atol=1e-6)


def test_document_frequencies_come_from_the_training_corpus_not_the_batch():
    cider = CiderD(CORPUS)
    both = cider.scores(["a red circle", "a yellow diamond"], CORPUS[:3:2])
    alone = cider.scores(["a red circle"], CORPUS[:1])
    assert both[0] == alone[0]
    _, batch_df = Cider().compute_score({0: CORPUS[0]}, {0: ["a red circle"]})  # one image: every idf is 0
    assert batch_df[0] == 0.0 < alone[0]


def test_a_copy_of_the_references_scores_ten():
    references = [CORPUS[1][:1]] * 3
    assert CiderD(CORPUS).scores([CORPUS[1][0]] * 3, references) == pytest.approx([10.0] * 3)


def test_empty_and_unrelated_candidates_score_zero():
    scores = CiderD(CORPUS).scores(["", "zebra crossing", "circle"], [CORPUS[0]] * 3)
    assert scores[:2].tolist() == [0.0, 0.0]
    assert scores[2] > 0


def test_the_length_penalty_lowers_a_longer_copy_by_a_gaussian_of_sigma_6():
    reference, longer = "a red circle above a blue square", "a red circle above a blue square above a blue square"
    penalised, unpenalised = (
        CiderD(CORPUS, sigma=s).scores([reference, longer], [[reference]] * 2) for s in (6.0, 1e9)
    )
    assert penalised[1] < penalised[0] == pytest.approx(10.0)
    assert penalised[1] / unpenalised[1] == pytest.approx(math.exp(-(4**2) / (2 * 6**2)))  # 4 words longer


# ---------------------------------------------------------------- the loss


def step_log_prob(decoder, features: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """log p(words, <end> | image) of one image's caption, one `step()` at a time."""
    memory = decoder.prepare(features[None])
    state = decoder.init_state(memory)
    total = torch.zeros(())
    for read, said in zip([Vocabulary.start_id, *token_ids], [*token_ids, Vocabulary.end_id], strict=True):
        logits, state, _ = decoder.step(torch.tensor([read]), state, memory)
        total = total + logits.log_softmax(1)[0, said]
    return total


def grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(module.parameters()), allow_unused=True, materialize_grads=True))


def test_rescored_log_probs_are_the_samplers_and_ignore_what_follows_end():
    model = talkative_tiny_model()
    features = region_features(model, 2)
    with torch.no_grad():
        samples = [h for hyps in sample(model.decoder, model.decoder.prepare(features), 3, 8, seed=0) for h in hyps]
    rescored = caption_log_probs(model.decoder, features, [h.token_ids for h in samples], 3)  # (6,)
    assert rescored.detach().tolist() == pytest.approx([h.log_prob for h in samples], abs=1e-5)

    short = [[4], [4, 5, 6, 7, 8, 9, 10, 11]]  # the first is padded over 7 steps after its <end>
    alone = caption_log_probs(model.decoder, features[:1], short[:1])[0]
    batched = caption_log_probs(model.decoder, features[:1], short, 2)[0]
    assert batched.item() == pytest.approx(alone.item(), abs=1e-6)
    for a, b in zip(grads(alone, model.decoder), grads(batched, model.decoder), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_gradient_is_minus_advantage_times_the_sampled_log_probs_only():
    model = talkative_tiny_model()
    decoder, features, K = model.decoder, region_features(model, 3), 4
    references = [[c] for c in TINY_CAPTIONS[:3]]
    cider = CiderD([[c] for c in TINY_CAPTIONS])
    loss, stats = scst_loss(decoder, features, references, cider, model.vocab, K, max_length=8, seed=7)

    with torch.no_grad():  # the same decodings, by hand
        memory = decoder.prepare(features)
        samples = sample(decoder, memory, K, 8, seed=7)
        baseline = cider.scores(
            [" ".join(model.vocab.decode(h.token_ids)) for h in greedy(decoder, memory, 8)], references
        )
    expected = torch.zeros(())
    for i, hyps in enumerate(samples):
        rewards = cider.scores([" ".join(model.vocab.decode(h.token_ids)) for h in hyps], [references[i]] * K)
        for h, advantage in zip(hyps, rewards - baseline[i], strict=True):
            expected = expected - float(advantage) * step_log_prob(decoder, features[i], h.token_ids)
    expected = expected / (3 * K)

    assert stats["sample_reward"] != stats["greedy_reward"]  # advantages are not all zero
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for a, b in zip(grads(loss, decoder), grads(expected, decoder), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_mixed_objective_adds_the_references_cross_entropy_per_word():
    model = talkative_tiny_model()
    decoder, features, K = model.decoder, region_features(model, 2), 3
    references = [[c] for c in TINY_CAPTIONS[:2]]
    reference_ids = [[4, 5, 6], [7, 8], [5], [6, 7, 8, 4]]  # two per image: image 0's, then image 1's
    cider = CiderD([[c] for c in TINY_CAPTIONS])
    args = (decoder, features, references, cider, model.vocab, K, 8, 7)
    scst_only, _ = scst_loss(*args)
    mixed, stats = scst_loss(*args, reference_ids=reference_ids, reference_weight=0.5)

    words = sum(len(r) + 1 for r in reference_ids)  # with each caption's <end>
    by_hand = -sum(step_log_prob(decoder, features[i // 2], r) for i, r in enumerate(reference_ids)) / words
    assert stats["reference_cross_entropy"] == pytest.approx(by_hand.item(), abs=1e-5)
    assert mixed.item() == pytest.approx(scst_only.item() + 0.5 * by_hand.item(), abs=1e-5)
    for a, b in zip(grads(mixed, decoder), grads(scst_only + 0.5 * by_hand, decoder), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    unweighted, plain_stats = scst_loss(*args, reference_ids=reference_ids, reference_weight=0.0)
    assert unweighted.item() == pytest.approx(scst_only.item()) and "reference_cross_entropy" not in plain_stats


def test_zero_advantage_gives_zero_gradient():
    model = talkative_tiny_model()
    nothing_in_common = [["zebra crossing"]] * 2  # every caption, sampled or greedy, scores 0
    loss, stats = scst_loss(
        model.decoder,
        region_features(model, 2),
        nothing_in_common,
        CiderD(CORPUS),
        model.vocab,
        3,
        max_length=8,
        seed=0,
    )
    assert stats["sample_reward"] == stats["greedy_reward"] == 0.0
    assert all(bool((g == 0).all()) for g in grads(loss, model.decoder))


def test_a_few_scst_steps_raise_the_reward():
    torch.manual_seed(0)
    model = build_model(tiny_config(), Vocabulary.build(TINY_CAPTIONS)).eval()
    features = region_features(model, 4)
    references = [[c] for c in TINY_CAPTIONS]  # one caption per image
    cider = CiderD(references)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=3e-2)
    rewards = []
    for step in range(60):
        loss, stats = scst_loss(model.decoder, features, references, cider, model.vocab, 5, max_length=10, seed=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(stats["greedy_reward"])
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.5  # about 0.2 -> 1.0 (of 10)


# ---------------------------------------------------------------- under DistributedDataParallel


def scst_gradients_on_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One rank of a gloo group: its own images, re-scored through the DDP-wrapped decoder; saves
    the decoder's gradients after backward."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, features, references, cider = ddp_case()
        mine = slice(2 * rank, 2 * rank + 2)
        wrapped = torch.nn.parallel.DistributedDataParallel(model.decoder)
        loss, _ = scst_loss(
            model.decoder, features[mine], references[mine], cider, model.vocab, 3, 8, seed=rank, learner=wrapped
        )
        loss.backward()
        torch.save([p.grad for p in model.decoder.parameters()], f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def ddp_case():
    model = talkative_tiny_model()
    with torch.no_grad():
        features = region_features(model, 4)
    references = [[c] for c in TINY_CAPTIONS]
    return model, features, references, CiderD(references)


@pytest.mark.slow
def test_through_ddp_the_ranks_gradients_are_averaged(tmp_path):
    """Two processes, two images each: every rank ends with the mean of the two ranks' own gradients,
    which only happens when the pass with gradient goes through the wrapper."""
    torch.multiprocessing.spawn(scst_gradients_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    model, features, references, cider = ddp_case()
    alone = []
    for rank in (0, 1):
        mine = slice(2 * rank, 2 * rank + 2)
        loss, _ = scst_loss(model.decoder, features[mine], references[mine], cider, model.vocab, 3, 8, seed=rank)
        alone.append(grads(loss, model.decoder))
    assert any(not torch.allclose(a, b) for a, b in zip(*alone, strict=True))  # the ranks differ on their own
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for got, a, b in zip(synced, *alone, strict=True):
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-6)
