"""Decoding strategies, batched across images: greedy, sampling and beam search.

All of them drive `Decoder.step()`; none knows how a step is computed. A caption
has at most `max_length` words: at step `max_length` only <end> may follow, so
every returned log-probability includes the end of the caption.
"""

import numbers
import argparse
from dataclasses import dataclass, fields

import torch

from .decoder import Decoder, Memory
from .vocab import Vocabulary

METHODS = ("beam", "greedy", "sample")
MAX_BEAM_SIZE = 10
MAX_CAPTIONS = 10
MAX_LENGTH = 50
MAX_TOP_K = 1000


@dataclass(frozen=True)
class DecodeOptions:
    method: str = "beam"
    beam_size: int = 3
    num_captions: int = 1  # n-best for beam, samples for sample, 1 for greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    max_length: int = 20  # words, <end> not counted
    length_penalty: float = 0.7  # captions rank by log_prob / (words + 1) ** length_penalty
    seed: int | None = None  # sampling
    attention: bool = False  # return one attention grid per word

    def __post_init__(self):
        for name in ("beam_size", "num_captions", "top_k", "max_length"):  # 2.5 or "3" would pass the bounds
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be in [1, {MAX_BEAM_SIZE}]")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            raise ValueError(f"num_captions must be in [1, {MAX_CAPTIONS}]")
        if self.method == "beam" and self.num_captions > self.beam_size:
            raise ValueError("num_captions cannot exceed beam_size")
        if self.method == "greedy" and self.num_captions != 1:
            raise ValueError("greedy decoding gives one caption")
        if not 0.0 < self.temperature <= 10.0:
            raise ValueError("temperature must be in (0, 10]")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}]")
        if not 1 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be in [1, {MAX_LENGTH}]")
        if not 0.0 <= self.length_penalty <= 2.0:
            raise ValueError("length_penalty must be in [0, 2]")


def add_decode_arguments(parser: argparse.ArgumentParser, seed: int | None = None, num_captions: bool = True) -> None:
    """The decoding flags of every command, named and defaulted as DecodeOptions' fields."""
    d = DecodeOptions()
    group = parser.add_argument_group("decoding")
    group.add_argument("--method", choices=METHODS, default=d.method, help=f"default {d.method}")
    group.add_argument("--beam-size", type=int, default=d.beam_size)
    if num_captions:
        group.add_argument("--num-captions", type=int, default=d.num_captions, help="n-best (beam) or samples (sample)")
    group.add_argument("--temperature", type=float, default=d.temperature, help="sampling")
    group.add_argument("--top-k", type=int, default=d.top_k, help="sampling; 0: the whole vocabulary")
    group.add_argument("--max-length", type=int, default=d.max_length, help="words per caption")
    group.add_argument("--length-penalty", type=float, default=d.length_penalty,
                       help="captions rank by log_prob / (words + 1) ** this")
    group.add_argument("--seed", type=int, default=seed, help=f"sampling (default {seed})")


def decode_options_from_args(args: argparse.Namespace, **overrides) -> DecodeOptions:
    """DecodeOptions from the flags present in `args`; ValueError for values out of bounds."""
    given = {f.name: getattr(args, f.name) for f in fields(DecodeOptions) if hasattr(args, f.name)}
    return DecodeOptions(**{**given, **overrides})


@dataclass
class Hypothesis:
    token_ids: list[int]  # words only: no <start>, no <end>
    log_prob: float  # summed log-probability, <end> included
    score: float  # log_prob normalised for length: what captions are ranked by
    attention: torch.Tensor | None  # (T, P), the alpha used to predict each word


def rank_score(log_prob: float, num_words: int, length_penalty: float) -> float:
    return log_prob / (num_words + 1) ** length_penalty


def decode(decoder: Decoder, memory: Memory, options: DecodeOptions) -> list[list[Hypothesis]]:
    """The captions of every image in `memory`, best first."""
    if options.method == "beam":
        return beam_search(decoder, memory, options.beam_size, options.num_captions,
                           options.max_length, options.length_penalty)
    if options.method == "greedy":
        return [[h] for h in greedy(decoder, memory, options.max_length, options.length_penalty)]
    return sample(decoder, memory, options.num_captions, options.max_length, options.temperature,
                  options.top_k, options.seed, options.length_penalty)


def _next_word_log_probs(logits: torch.Tensor, last_step: bool) -> torch.Tensor:
    """The model's own log-probabilities (N, V), with the words it may not say set to -inf:
    never <pad>, <start> or <unk> (a caption of unknown words tells nobody anything); on the last step, only <end>.

    Normalised before masking, so a caption's summed log-probability is the one teacher
    forcing gives, and a forced <end> costs what the model says it costs.
    """
    log_probs = logits.float().log_softmax(1)  # (N, V)
    if last_step:
        end = log_probs[:, Vocabulary.end_id].clone()
        log_probs.fill_(float("-inf"))
        log_probs[:, Vocabulary.end_id] = end
    else:
        log_probs[:, [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]] = float("-inf")
    return log_probs


def _decode_paths(decoder: Decoder, memory: Memory, max_length: int, length_penalty: float,
                  choose) -> list[Hypothesis]:
    """One caption per row of `memory`, each next word picked by `choose(log_probs) -> (N,)`."""
    N = memory.rows
    device = memory.regions.device
    state = decoder.init_state(memory)
    words = torch.full((N,), Vocabulary.start_id, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    log_probs = torch.zeros(N, device=device)
    steps, alphas = [], []
    for t in range(max_length + 1):
        logits, state, alpha = decoder.step(words, state, memory)
        step_log_probs = _next_word_log_probs(logits, last_step=t == max_length)  # (N, V)
        words = choose(step_log_probs)  # (N,)
        word_log_prob = step_log_probs.gather(1, words.unsqueeze(1)).squeeze(1)  # (N,)
        log_probs += torch.where(finished, 0.0, word_log_prob)
        words = torch.where(finished, Vocabulary.pad_id, words)
        steps.append(words)
        alphas.append(alpha)
        finished |= words == Vocabulary.end_id
        if bool(finished.all()):
            break
    tokens = torch.stack(steps, 1).tolist()  # (N, T)
    attention = torch.stack(alphas, 1) if decoder.has_attention else None  # (N, T, P)
    hypotheses = []
    for i in range(N):
        n = tokens[i].index(Vocabulary.end_id)
        lp = float(log_probs[i])
        hypotheses.append(Hypothesis(tokens[i][:n], lp, rank_score(lp, n, length_penalty),
                                     None if attention is None else attention[i, :n]))
    return hypotheses


@torch.no_grad()
def greedy(decoder: Decoder, memory: Memory, max_length: int, length_penalty: float = 0.7) -> list[Hypothesis]:
    return _decode_paths(decoder, memory, max_length, length_penalty, lambda log_probs: log_probs.argmax(1))


@torch.no_grad()
def sample(decoder: Decoder, memory: Memory, num_samples: int, max_length: int, temperature: float = 1.0,
           top_k: int = 0, seed: int | None = None, length_penalty: float = 0.7) -> list[list[Hypothesis]]:
    """`num_samples` captions per image drawn from softmax(logits / temperature) over the top_k words.

    Log-probabilities are the model's own (temperature 1, whole vocabulary), so
    samples and beams rank on one scale."""
    B = memory.rows
    device = memory.regions.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def choose(log_probs):
        scaled = log_probs / temperature  # (N, V): the same softmax as logits / temperature
        if top_k:
            kth = scaled.topk(min(top_k, scaled.size(1)), dim=1).values[:, -1:]  # (N, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(scaled.softmax(1), 1, generator=generator).squeeze(1)

    paths = _decode_paths(decoder, memory.repeat(num_samples), max_length, length_penalty, choose)
    return [sorted(paths[b * num_samples:(b + 1) * num_samples], key=lambda h: -h.score) for b in range(B)]


@dataclass
class _Finished:
    """A caption that ended, remembered by where it ended; its words are read back only if it is returned."""

    score: float
    log_prob: float
    step: int  # its <end> was chosen at this step, so it has `step` words
    row: int  # the row of that step that chose <end>


@torch.no_grad()
def beam_search(decoder: Decoder, memory: Memory, beam_size: int, num_captions: int = 1, max_length: int = 20,
                length_penalty: float = 0.7) -> list[list[Hypothesis]]:
    """Beam search over all images at once, K beams each.

    Each step ranks the 2K best continuations of an image's beams: those ending
    in <end> among the first K are finished; the first K others stay alive, so
    beams of one image and of different images may finish at different steps.
    An image is done once it has K finished captions (beam size 1 is greedy), or
    as soon as no live beam can overtake its `num_captions` best (a live beam's
    words only lower its log-probability, so its best possible score is that
    log-probability over the longest length allowed): what it returns is the same
    either way. Done images leave the batch, so a batch costs what its images
    need, not K x its longest caption for all. At the first step the K beams of
    an image are one and the same, so one row stands for them.

    Each step keeps only back-pointers (which row each row came from and the word
    it read); a returned caption's words and attention are read back at the end.
    """
    B, K = memory.rows, beam_size
    device = memory.regions.device
    active = torch.arange(B, device=device)  # the images still searching; done ones leave the batch
    state = decoder.init_state(memory)  # (L, B, H): one row per image for the first step
    words = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: keep one, or the first step picks K copies
    best_possible_divisor = (max_length + 1) ** length_penalty
    came_from: list[list[int]] = []  # came_from[t][r]: the row of step t that row r of step t+1 extends
    read: list[list[int]] = []  # read[t][r]: the word row r of step t+1 reads
    alphas: list[torch.Tensor] = []  # alphas[t]: (rows of step t, P)
    finished: list[list[_Finished]] = [[] for _ in range(B)]
    for t in range(max_length + 1):
        n = active.numel()
        rows_per_image = 1 if t == 0 else K
        logits, state, alpha = decoder.step(words, state, memory.repeat(rows_per_image))
        log_probs = _next_word_log_probs(logits, last_step=t == max_length)  # (n*rows_per_image, V)
        V = log_probs.size(1)
        candidates = (scores.view(n, -1, 1) + log_probs.view(n, rows_per_image, V))  # (n, K, V) at t=0 too
        top_scores, top_index = candidates.view(n, K * V).topk(min(2 * K, K * V), dim=1)  # (n, 2K)
        word = top_index % V  # (n, 2K)
        parent = top_index // V if t else torch.zeros_like(top_index)  # (n, 2K) beam each candidate extends
        parent_row = parent + torch.arange(n, device=device).unsqueeze(1) * rows_per_image  # (n, 2K) rows of this step
        is_end = word == Vocabulary.end_id
        if alpha is not None:
            alphas.append(alpha)

        for i, j in (is_end[:, :K] & top_scores[:, :K].isfinite()).nonzero().tolist():
            lp = float(top_scores[i, j])
            finished[int(active[i])].append(_Finished(rank_score(lp, t, length_penalty), lp, t, int(parent_row[i, j])))
        rank = torch.arange(top_scores.size(1), device=device).expand(n, -1)  # (n, 2K)
        keep = (is_end.long() * top_scores.size(1) + rank).argsort(dim=1)[:, :K]  # first K that go on
        live_scores = top_scores.gather(1, keep)  # (n, K)
        best_possible = (live_scores.max(dim=1).values / best_possible_divisor).tolist()  # (n,)
        going = torch.tensor([not _settled(finished[b], K, num_captions, bound)
                              for b, bound in zip(active.tolist(), best_possible)], device=device)  # (n,)
        if not bool(going.any()):
            break

        scores = live_scores[going]  # (n', K)
        rows = parent_row.gather(1, keep)[going].view(-1)  # (n'*K,)
        words = word.gather(1, keep)[going].view(-1)  # (n'*K,)
        if not bool(going.all()):
            active, memory = active[going], memory.take_images(going)
        state = state.index_select(rows)
        came_from.append(rows.tolist())
        read.append(words.tolist())
    return [[_read_back(f, came_from, read, alphas) for f in sorted(done, key=lambda f: -f.score)[:num_captions]]
            for done in finished]


def _settled(finished: list[_Finished], beam_size: int, num_captions: int, best_possible: float) -> bool:
    if len(finished) >= beam_size:
        return True
    if len(finished) < num_captions:
        return False
    return sorted(f.score for f in finished)[-num_captions] > best_possible


def _read_back(f: _Finished, came_from: list[list[int]], read: list[list[int]],
               alphas: list[torch.Tensor]) -> Hypothesis:
    """A finished caption's words, and the attention that chose each, from the back-pointers."""
    token_ids, steps, row = [], [], f.row
    for t in range(f.step - 1, -1, -1):
        token_ids.append(read[t][row])
        row = came_from[t][row]
        steps.append((t, row))  # that word was chosen at step t by this row
    attention = None
    if alphas:
        P = alphas[0].size(1)
        attention = torch.stack([alphas[t][r] for t, r in reversed(steps)]) if steps else alphas[0].new_zeros(0, P)
    return Hypothesis(token_ids[::-1], f.log_prob, f.score, attention)
