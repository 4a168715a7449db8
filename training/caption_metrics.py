"""The official COCO caption metrics (pycocoevalcap), and a fast Java-free CIDEr for validation.

    from training.caption_metrics import CocoScorer, cider, coco_scores
    coco_scores({1: ["a red circle", "a small red circle"]}, {1: "a red circle"})
    # {"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...}

`coco_scores` runs the reference pipeline: Stanford's PTBTokenizer, then BLEU-1..4,
METEOR, ROUGE-L and CIDEr (pycocoevalcap's CIDEr is CIDEr-D, the variant the
COCO leaderboard reports as CIDEr). The tokenizer and METEOR are Java programs shipped in the
pip package; METEOR loads a paraphrase table for several seconds, so a
`CocoScorer` keeps one METEOR process for many scorings. SPICE needs Stanford
CoreNLP models that pycocoevalcap would download on first use: it runs only
when asked for and already on disk.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.vocab import tokenize

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_available() -> bool:
    """Whether SPICE's CoreNLP models are on disk, so running it downloads nothing."""
    spec = importlib.util.find_spec("pycocoevalcap.spice")
    assert spec is not None and spec.origin is not None  # a regular package of pycocoevalcap's
    lib = Path(spec.origin).parent / "lib"
    return all((lib / name).is_file() for name in SPICE_MODELS)


class CocoScorer:
    """The COCO caption metrics, with one METEOR process kept for all `score` calls.

    Use as a context manager (or call `close`) so the Java process ends; a
    `score` after `close` starts another.
    """

    def __init__(self, spice: bool = False):
        if spice and not spice_available():
            warnings.warn(
                "SPICE skipped: its Stanford CoreNLP models are not on disk "
                f"({', '.join(SPICE_MODELS)} in pycocoevalcap/spice/lib)",
                stacklevel=2,
            )
            spice = False
        self.spice = spice
        self._meteor: Meteor | None = None  # started by the first `score`

    def score(self, references: dict[int, list[str]], predictions: dict[int, str]) -> dict[str, float]:
        """Corpus scores of one caption per image against that image's references (raw strings)."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        _check_pairs(references, predictions)
        if self._meteor is None:
            self._meteor = Meteor()  # loads its paraphrase table while the tokenizer runs
        # One tokenizer run (one Java start) for both: each image's references, then its prediction.
        tokenized = PTBTokenizer().tokenize(
            {i: [{"caption": c} for c in [*references[i], predictions[i]]] for i in predictions}
        )
        gts = {i: tokenized[i][:-1] for i in predictions}
        res = {i: tokenized[i][-1:] for i in predictions}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = dict(zip(BLEU_NAMES, bleu))
        scores["METEOR"], _ = self._meteor.compute_score(gts, res)
        scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
        scores["CIDEr"], _ = Cider().compute_score(gts, res)
        if self.spice:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"], _ = Spice().compute_score(gts, res)
        return {name: float(value) for name, value in scores.items()}

    def close(self) -> None:
        self._meteor = None  # the last reference: Meteor.__del__ ends its Java process

    def __enter__(self) -> CocoScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def coco_scores(references: dict[int, list[str]], predictions: dict[int, str], spice: bool = False) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when asked and installed) of one caption per image."""
    with CocoScorer(spice) as scorer:
        return scorer.score(references, predictions)


def cider(references: dict[int, list[str]], predictions: dict[int, str]) -> float:
    """CIDEr on captions split by `captioner.vocab.tokenize`: no Java, for validation every epoch.

    Equals the CIDEr of `coco_scores` whenever both tokenizers split the words
    alike (they differ on contractions and hyphens: "don't", "t-shirt").
    """
    from pycocoevalcap.cider.cider import Cider

    _check_pairs(references, predictions)
    gts = {i: [" ".join(tokenize(c)) for c in references[i]] for i in predictions}
    res = {i: [" ".join(tokenize(predictions[i]))] for i in predictions}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def _check_pairs(references: dict[int, list[str]], predictions: dict[int, str]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    unreferenced = [i for i in predictions if not references.get(i)]
    if unreferenced:
        raise ValueError(f"images without reference captions: {unreferenced[:10]}")
