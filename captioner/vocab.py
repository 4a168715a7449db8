"""The vocabulary: words <-> ids, with the special tokens it owns."""

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # letters and digits of any script: "café" is one word


def tokenize(text: str) -> list[str]:
    """Lowercase words, punctuation dropped: "A dog, running." -> ["a", "dog", "running"]."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))  # the typographic apostrophe of "dog’s"


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # index = id; the first four are SPECIALS
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)  # word -> id, from `words`

    def __post_init__(self):
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {self.words[:4]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("a vocabulary lists each word once")
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(self.words)})

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(w for w in kept if w not in SPECIALS))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """<start> w1 ... wn <end>, unknown words as <unk>."""
        ids = [self._ids.get(w, self.unk_id) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, specials other than <unk> dropped."""
        words = []
        for i in ids:
            if i == self.end_id:
                break
            if i not in (self.pad_id, self.start_id):
                words.append(self.words[i])
        return words

    def to_json(self) -> list[str]:
        return list(self.words)

    @classmethod
    def from_json(cls, words: list[str]) -> "Vocabulary":
        return cls(tuple(words))
