"""The vocabulary: special tokens, building from captions, encode/decode, JSON."""

import pytest

from captioner.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize


def test_special_tokens_have_fixed_ids():
    vocab = Vocabulary.build(["a dog"])
    assert vocab.words[:4] == (PAD, START, END, UNK) == SPECIALS
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.words[i] for i in (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id)] == list(SPECIALS)


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running... on the BEACH!") == ["a", "dog", "running", "on", "the", "beach"]
    assert tokenize("the dog's ball, 2 cats") == ["the", "dog's", "ball", "2", "cats"]
    assert tokenize("  \n") == []


def test_tokenize_keeps_words_with_accents_and_typographic_apostrophes_whole():
    """Captions are typed by people: "café" is one word, and "dog’s" is "dog's"."""
    assert tokenize("A café with crème brûlée, jalapeño") == ["a", "café", "with", "crème", "brûlée", "jalapeño"]
    assert tokenize("the dog’s ball") == tokenize("the dog's ball") == ["the", "dog's", "ball"]
    assert tokenize("snake_case under_score") == ["snake", "case", "under", "score"]


def test_build_keeps_words_seen_min_count_times_most_frequent_first():
    captions = ["a dog and a cat", "a dog", "the bird", "A DOG!"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == SPECIALS + ("a", "dog")  # a: 4, dog: 3; and/cat/the/bird once
    everything = Vocabulary.build(captions, min_count=1)
    assert everything.words[4:6] == ("a", "dog")
    assert everything.words[6:] == ("and", "bird", "cat", "the")  # ties alphabetical


def test_build_does_not_duplicate_special_tokens():
    # "<end>" in a caption tokenizes to "end", a plain word, never a second special
    vocab = Vocabulary.build(["<end> <pad> unk", "end"])
    assert vocab.words[:4] == SPECIALS
    assert len(set(vocab.words)) == len(vocab.words)
    assert "end" in vocab.words


def test_encode_wraps_in_start_end_and_maps_unknown_words_to_unk():
    vocab = Vocabulary.build(["a red circle"])
    ids = vocab.encode("A red square.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert [vocab.words[i] for i in ids[1:-1]] == ["a", "red", UNK]


def test_decode_stops_at_end_and_drops_pad_and_start_but_not_unk():
    vocab = Vocabulary.build(["a red circle"])
    a, red = vocab.words.index("a"), vocab.words.index("red")
    ids = [vocab.start_id, a, vocab.pad_id, vocab.unk_id, red, vocab.end_id, a, red]
    assert vocab.decode(ids) == ["a", UNK, "red"]
    assert vocab.decode([]) == []


def test_decode_inverts_encode_for_known_words():
    captions = ["two shapes a purple circle and a white square", "there is a small yellow diamond"]
    vocab = Vocabulary.build(captions)
    for caption in captions:
        assert vocab.decode(vocab.encode(caption)) == tokenize(caption)


def test_json_round_trip():
    vocab = Vocabulary.build(["a dog and a cat", "the bird"])
    again = Vocabulary.from_json(vocab.to_json())
    assert again == vocab
    assert again.encode("the cat") == vocab.encode("the cat")


@pytest.mark.parametrize(
    "words",
    [
        ("a", "b"),  # no specials
        (START, PAD, END, UNK, "a"),  # specials in the wrong order
        SPECIALS + ("a", "a"),  # a word twice
    ],
)
def test_invalid_word_lists_are_refused(words):
    with pytest.raises(ValueError):
        Vocabulary(words)
