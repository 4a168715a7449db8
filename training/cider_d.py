"""CIDEr-D with document frequencies fixed once, from the training references: the SCST reward.

    cider = CiderD(train_split.captions)                    # once: every image's reference captions
    cider.scores(["a red circle"], [["a red circle", "a circle that is red"]])   # array([...])

The metric is pycocoevalcap's `Cider` (which is CIDEr-D: clipped n-gram counts, a
Gaussian length penalty with sigma 6, the mean over 1..4-grams, times 10), the one
validation reports. pycocoevalcap recomputes document frequencies from the references
it is handed, so a batch would be scored by its own few images' statistics: Rennie et
al. (2017) take them from the training corpus, once, and so does this class. Scoring
the whole corpus at once gives pycocoevalcap's numbers exactly (tests check to 1e-6).
Text is split with `captioner.vocab.tokenize`, as `training.caption_metrics.cider` does.
"""

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from captioner.vocab import tokenize

NGram = tuple[str, ...]


def ngram_counts(text: str, n: int = 4) -> Counter[NGram]:
    """Counts of the 1..n-grams of `text`'s words."""
    words = tokenize(text)
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class _Vector:
    """A caption as CIDEr sees it: tf-idf weights per n-gram order, their norms, and its length."""

    def __init__(self, counts: Counter[NGram], idf, n: int):
        self.weights: list[dict[NGram, float]] = [{} for _ in range(n)]
        for gram, count in counts.items():
            self.weights[len(gram) - 1][gram] = count * idf(gram)
        self.norms = np.array([math.sqrt(sum(w * w for w in order.values())) for order in self.weights])  # (n,)
        # pycocoevalcap's length counts bigrams (words - 1); kept, so the penalty is the one evaluation applies.
        self.length = sum(counts[g] for g in self.weights[1]) if n > 1 else 0


class CiderD:
    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        """`references`: per training image, its reference captions; an n-gram's document
        frequency is the number of images whose references contain it."""
        self.n, self.sigma = n, sigma
        document_frequency: Counter[NGram] = Counter()
        for captions in references:
            document_frequency.update({g for c in captions for g in ngram_counts(c, n)})
        self._log_df = {g: math.log(f) for g, f in document_frequency.items()}
        self._log_images = math.log(len(references))

    def _idf(self, gram: NGram) -> float:
        return self._log_images - self._log_df.get(gram, 0.0)  # unseen n-grams count as seen once

    def _vector(self, text: str) -> _Vector:
        return _Vector(ngram_counts(text, self.n), self._idf, self.n)

    def _similarity(self, hyp: _Vector, ref: _Vector) -> np.ndarray:
        """Per n-gram order (n,): the cosine with the candidate's weights clipped to the
        reference's (repeating a word earns nothing), times the length penalty."""
        dots = np.array(
            [
                sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)
                for h, r in zip(hyp.weights, ref.weights, strict=True)
            ],
            dtype=float,
        )  # (n,)
        norms = hyp.norms * ref.norms  # (n,)
        cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms != 0)
        return cosines * math.exp(-((hyp.length - ref.length) ** 2) / (2 * self.sigma**2))

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """(len(candidates),) CIDEr-D of candidates[i] against references[i], in [0, 10].

        Each distinct list of references is vectorised once per call: SCST scores K
        samples and a greedy caption against the same references."""
        ref_vectors: dict[tuple[str, ...], list[_Vector]] = {}
        out = np.empty(len(candidates))
        for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            key = tuple(refs)
            if key not in ref_vectors:
                ref_vectors[key] = [self._vector(r) for r in refs]
            hyp = self._vector(candidate)
            out[i] = 10.0 * np.mean([self._similarity(hyp, r) for r in ref_vectors[key]], axis=0).mean()
        return out
