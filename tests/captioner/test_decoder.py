"""The decoder: shapes, attention, gradients for every configuration, and the one step() everything uses."""

import itertools

import pytest
import torch
from torch import nn

from captioner.decoder import Memory
from captioner.decoding import beam_search, greedy, sample
from tests.captioner.conftest import random_images, region_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CELLS = ["lstm", "gru", "rnn"]


def captions_for(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(B, T): <start>, random words, <end>."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(4, len(model.vocab), (batch, length - 2), generator=generator)
    start = torch.full((batch, 1), model.vocab.start_id)
    end = torch.full((batch, 1), model.vocab.end_id)
    return torch.cat([start, words, end], dim=1)


@pytest.mark.parametrize("attention", [True, False])
def test_teacher_forcing_shapes_and_attention_sums_to_one(make_model, attention):
    model = make_model(attention=attention)
    B, T = 3, 7
    P = model.grid[0] * model.grid[1]
    logits, alphas = model(random_images(B), captions_for(model, B, T))
    assert logits.shape == (B, T - 1, len(model.vocab))
    assert torch.isfinite(logits).all()
    if attention:
        assert alphas.shape == (B, T - 1, P)
        assert (alphas >= 0).all()
        torch.testing.assert_close(alphas.sum(-1), torch.ones(B, T - 1))
    else:
        assert alphas is None


@pytest.mark.parametrize("cell, cell_type", [("lstm", nn.LSTMCell), ("gru", nn.GRUCell), ("rnn", nn.RNNCell)])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_cell_type_and_depth_come_from_the_config(make_model, cell, cell_type, num_layers):
    model = make_model(cell=cell, num_layers=num_layers)
    decoder = model.decoder
    assert len(decoder.cells) == num_layers
    assert all(type(c) is cell_type for c in decoder.cells)
    if cell == "rnn":
        assert all(c.nonlinearity == "tanh" for c in decoder.cells)
    memory = decoder.prepare(region_features(model, 2))
    state = decoder.init_state(memory)
    assert state.h.shape == (num_layers, 2, model.config.hidden_dim)


def test_show_and_tell_has_no_attention_layers(make_model):
    decoder = make_model(attention=False).decoder
    names = {n for n, _ in decoder.named_parameters()}
    assert not any(n.startswith(("key_proj", "query_proj", "score", "f_beta", "context_out")) for n in names)
    memory = decoder.prepare(region_features(make_model(attention=False), 2))
    logits, _, alpha = decoder.step(torch.ones(2, dtype=torch.long), decoder.init_state(memory), memory)
    assert alpha is None and logits.shape == (2, len(make_model().vocab))


def gradient_configs():
    for cell, attention, init_state in itertools.product(CELLS, [True, False], ["mean", "learned"]):
        for num_layers in (1, 2):
            yield pytest.param(
                dict(cell=cell, attention=attention, init_state=init_state, num_layers=num_layers),
                id=f"{cell}-{'att' if attention else 'noatt'}-{init_state}-L{num_layers}",
            )


@pytest.mark.parametrize("config", gradient_configs())
def test_every_parameter_gets_a_gradient(make_model, config):
    """Training loss with the doubly stochastic regulariser reaches every parameter, encoder included.

    A parameter a configuration does not use must not exist, so it cannot sit untrained in checkpoints.
    """
    model = make_model(**config).train()
    captions = captions_for(model, 3, 6)
    logits, alphas = model(random_images(3), captions)
    loss = nn.functional.cross_entropy(logits.transpose(1, 2), captions[:, 1:])
    if alphas is not None:
        loss = loss + ((1.0 - alphas.sum(1)) ** 2).mean()  # (B, P): each region attended about once overall
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_positional_embeddings_tell_the_decoder_where_regions_are(make_model):
    """Shuffling the regions changes the prediction with positions, and only permutes attention without."""
    for positional in (False, True):
        model = make_model(positional=positional)
        decoder = model.decoder
        if positional:
            with torch.no_grad():
                decoder.region_pos.normal_(std=1.0)
        features = region_features(model, 2)
        perm = torch.randperm(features.size(1), generator=torch.Generator().manual_seed(0))
        captions = captions_for(model, 2, 5)
        with torch.no_grad():
            logits, alphas = decoder(features, captions)
            shuffled_logits, shuffled_alphas = decoder(features[:, perm], captions)
        if positional:
            assert not torch.allclose(logits, shuffled_logits, atol=1e-4)
        else:
            torch.testing.assert_close(logits, shuffled_logits)
            torch.testing.assert_close(alphas[..., perm], shuffled_alphas)


def test_initial_state_depends_on_the_mean_region(make_model):
    model = make_model(positional=False)
    decoder = model.decoder
    features = region_features(model, 2)
    with torch.no_grad():
        state = decoder.init_state(decoder.prepare(features))
        flipped = decoder.init_state(decoder.prepare(features.flip(1)))
        other = decoder.init_state(decoder.prepare(region_features(model, 2, seed=1)))
    torch.testing.assert_close(state.h, flipped.h)
    torch.testing.assert_close(state.c, flipped.c)
    assert not torch.allclose(state.h, other.h)


def test_the_f_beta_gate_scales_the_context(make_model):
    """A closed gate lets no context in: the step then cannot tell the regions from zeros."""
    model = make_model()
    decoder = model.decoder
    memory = decoder.prepare(region_features(model, 2))
    blank = Memory(torch.zeros_like(memory.regions), memory.keys)
    state = decoder.init_state(memory)
    words = torch.tensor([5, 6])
    with torch.no_grad():
        open_gate, _, _ = decoder.step(words, state, memory)
        assert not torch.allclose(open_gate, decoder.step(words, state, blank)[0])
        decoder.f_beta.weight.zero_()
        decoder.f_beta.bias.fill_(-1e4)  # sigmoid -> 0
        closed_gate, _, _ = decoder.step(words, state, memory)
        torch.testing.assert_close(closed_gate, decoder.step(words, state, blank)[0])


def test_attention_is_the_additive_form_with_tanh(make_model):
    """attend() computes score(tanh(keys + query)) through a sigmoid: the same alpha and context as
    the formula written out, for images with several rows each (beams)."""
    model = make_model()
    decoder = model.decoder
    k = 3
    memory = decoder.prepare(region_features(model, 2)).repeat(k)
    query = torch.randn(2 * k, decoder.query_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alpha, context = decoder.attend(memory, query)
        q = decoder.query_proj(query).view(2, k, 1, -1)  # (B, k, 1, A)
        energy = decoder.score(torch.tanh(memory.keys.unsqueeze(1) + q)).squeeze(-1)  # (B, k, P)
        expected = energy.softmax(dim=2)
    torch.testing.assert_close(alpha, expected.view(2 * k, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context, (expected @ memory.regions).view(2 * k, -1), rtol=1e-5, atol=1e-6)


def test_step_treats_every_row_independently(make_model):
    """What batched decoding relies on: a row's prediction does not depend on its neighbours."""
    model = make_model(num_layers=2)
    decoder = model.decoder
    features = region_features(model, 4)
    words = torch.tensor([1, 5, 7, 9])
    with torch.no_grad():
        memory = decoder.prepare(features)
        logits, state, alpha = decoder.step(words, decoder.init_state(memory), memory)
        for i in range(4):
            one_memory = decoder.prepare(features[i : i + 1])
            one_logits, one_state, one_alpha = decoder.step(
                words[i : i + 1], decoder.init_state(one_memory), one_memory
            )
            torch.testing.assert_close(one_logits, logits[i : i + 1])
            torch.testing.assert_close(one_state.h, state.h[:, i : i + 1])
            torch.testing.assert_close(one_alpha, alpha[i : i + 1])


@pytest.mark.parametrize("attention", [True, False])
def test_teacher_forcing_and_every_decoding_strategy_go_through_step(make_model, step_rows, attention):
    model = make_model(attention=attention)
    calls = step_rows
    decoder = model.decoder
    features = region_features(model, 2)
    with torch.no_grad():
        decoder(features, captions_for(model, 2, 6))
    assert calls == [2] * 5  # T - 1 steps over the batch

    memory = decoder.prepare(features)
    for name, run in [
        ("greedy", lambda: greedy(decoder, memory, max_length=4)),
        ("sample", lambda: sample(decoder, memory, num_samples=3, max_length=4, seed=0)),
        ("beam", lambda: beam_search(decoder, memory, beam_size=3, max_length=4)),
    ]:
        calls.clear()
        run()
        assert 1 <= len(calls) <= 5, name  # at most max_length + 1 steps, each for the whole batch
        if name == "beam":  # the K beams of an image are one row until the first word is chosen
            assert calls == [2] + [2 * 3] * (len(calls) - 1), name
        else:
            assert set(calls) == {2 * (3 if name == "sample" else 1)}, name
