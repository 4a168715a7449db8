"""Decoding strategies, batched across images: greedy, sampling and beam search.

All of them drive `Decoder.step()`; none knows how a step is computed. A caption
has at most `max_length` words: at step `max_length` only <end> may follow, so
every returned log-probability includes the end of the caption.
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .decoder import Decoder, Memory
from .vocab import Vocabulary

Method = Literal["beam", "greedy", "sample"]
METHODS = get_args(Method)
MAX_BEAM_SIZE = 10
MAX_CAPTIONS = 10
MAX_LENGTH = 50
MAX_TOP_K = 1000
# float32's smallest normal number is about 1e-38: a smaller divisor rounds to 0. Below this, sampling
# is greedy (ties aside) all the same.
MIN_TEMPERATURE = 1e-30


class DecodeOptions(BaseModel):
    """How to decode, with the limits every caller (`Predictor.caption`, the HTTP API, `captioner
    caption`, `captioner evaluate`) shares. Frozen, and strict: 2.5 or "3" for an integer is
    refused here (pydantic's ValidationError, a ValueError); the applications parse text (flags,
    form fields) into these types first.

        DecodeOptions()                             # beam search of 3 beams: the best caption
        DecodeOptions(beam_size=5, num_captions=3)  # the 3 best of 5 beams
        DecodeOptions(method="greedy")              # one caption, the likeliest word at each step
        DecodeOptions(method="sample", num_captions=3, temperature=0.8, top_k=5, seed=7)
        DecodeOptions(attention=True)               # and each word's attention grid (h x w)

    Each field's meaning and limits are in its description below."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    method: Method = Field("beam", description="beam search, greedy, or sampling", examples=["beam"])
    beam_size: int = Field(3, ge=1, le=MAX_BEAM_SIZE, description="beams per image (beam)", examples=[3])
    num_captions: int = Field(
        1,
        ge=1,
        le=MAX_CAPTIONS,
        examples=[3],
        description="n-best for beam (at most beam_size), samples for sample, 1 for greedy",
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        allow_inf_nan=False,
        examples=[0.8],
        description="sampling only: softmax(logits / temperature)",
    )
    top_k: int = Field(
        0,
        ge=0,
        le=MAX_TOP_K,
        examples=[5],
        description="sampling only: from the k likeliest words; 0: the whole vocabulary",
    )
    max_length: int = Field(20, ge=1, le=MAX_LENGTH, examples=[20], description="words per caption, <end> not counted")
    length_penalty: float = Field(
        0.7,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        examples=[0.7],
        description="captions rank by log_prob / (words + 1) ** length_penalty",
    )
    no_repeat_ngram_size: int = Field(
        3,
        ge=0,
        le=MAX_LENGTH,
        examples=[3],
        description="no run of this many words appears twice in a caption (0: no such rule)",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, examples=[7], description="sampling only: repeatable samples")
    attention: bool = Field(False, description="return each word's attention grid (h x w, sums to 1)")

    @field_validator("num_captions")
    @classmethod
    def _captions_the_method_gives(cls, num_captions: int, info: ValidationInfo) -> int:
        """Checked on num_captions itself (method and beam_size come first), so an error names it."""
        method, beam_size = info.data.get("method"), info.data.get("beam_size")
        if method == "beam" and beam_size is not None and num_captions > beam_size:
            raise ValueError("num_captions cannot exceed beam_size")
        if method == "greedy" and num_captions != 1:
            raise ValueError("greedy decoding gives one caption")
        return num_captions


def distinct_captions(num_words: int, max_length: int, at_most: int = MAX_CAPTIONS) -> int:
    """How many different captions of at most `max_length` words a vocabulary of `num_words`
    sayable words has (the empty caption included), counted up to `at_most`: what beam search can
    return at most, so num_captions beyond it cannot be filled."""
    total, of_length = 0, 1
    for _ in range(max_length + 1):
        total += of_length
        if total >= at_most or num_words == 0:
            break
        of_length *= num_words
    return min(total, at_most)


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
    no_repeat = options.no_repeat_ngram_size
    if options.method == "beam":
        return beam_search(
            decoder,
            memory,
            options.beam_size,
            options.num_captions,
            options.max_length,
            options.length_penalty,
            no_repeat,
        )
    if options.method == "greedy":
        return [[h] for h in greedy(decoder, memory, options.max_length, options.length_penalty, no_repeat)]
    return sample(
        decoder,
        memory,
        options.num_captions,
        options.max_length,
        options.temperature,
        options.top_k,
        options.seed,
        options.length_penalty,
        no_repeat,
    )


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


def ban_repeats(log_probs: torch.Tensor, said: list[list[int]], n: int) -> torch.Tensor:
    """`log_probs` (N, V) with -inf for each word that would make row i's last n words a run of
    words `said[i]` already holds (no_repeat_ngram_size); n = 0: unchanged. A row still saying its
    caption has no <end> in `said`, so <end> is never banned and every row keeps a word to say."""
    if n == 0:
        return log_probs
    rows, words = [], []
    for row, history in enumerate(said):
        if len(history) < n - 1:
            continue
        prefix = history[len(history) - n + 1 :]
        for start in range(len(history) - n + 1):
            if history[start : start + n - 1] == prefix:
                rows.append(row)
                words.append(history[start + n - 1])
    if rows:
        log_probs = log_probs.index_put((torch.tensor(rows), torch.tensor(words)), torch.tensor(float("-inf")))
    return log_probs


def _decode_paths(
    decoder: Decoder, memory: Memory, max_length: int, length_penalty: float, choose, no_repeat: int = 0
) -> list[Hypothesis]:
    """One caption per row of `memory`, each next word picked by `choose(log_probs) -> (N,)`."""
    N = memory.rows
    device = memory.regions.device
    state = decoder.init_state(memory)
    words = torch.full((N,), Vocabulary.start_id, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    log_probs = torch.zeros(N, device=device)
    steps, alphas = [], []
    said: list[list[int]] = [[] for _ in range(N)]  # each row's words so far
    for t in range(max_length + 1):
        logits, state, alpha = decoder.step(words, state, memory)
        step_log_probs = ban_repeats(_next_word_log_probs(logits, last_step=t == max_length), said, no_repeat)
        words = choose(step_log_probs)  # (N,)
        word_log_prob = step_log_probs.gather(1, words.unsqueeze(1)).squeeze(1)  # (N,)
        log_probs += torch.where(finished, 0.0, word_log_prob)
        words = torch.where(finished, Vocabulary.pad_id, words)
        steps.append(words)
        for history, word in zip(said, words.tolist()):
            history.append(word)
        if alpha is not None:  # None every step, or never: decoder.has_attention
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
        hypotheses.append(
            Hypothesis(
                tokens[i][:n], lp, rank_score(lp, n, length_penalty), None if attention is None else attention[i, :n]
            )
        )
    return hypotheses


@torch.no_grad()
def greedy(
    decoder: Decoder, memory: Memory, max_length: int, length_penalty: float = 0.7, no_repeat: int = 0
) -> list[Hypothesis]:
    return _decode_paths(decoder, memory, max_length, length_penalty, lambda log_probs: log_probs.argmax(1), no_repeat)


@torch.no_grad()
def sample(
    decoder: Decoder,
    memory: Memory,
    num_samples: int,
    max_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    length_penalty: float = 0.7,
    no_repeat: int = 0,
) -> list[list[Hypothesis]]:
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
        # (N, V): the same softmax as logits / temperature. Shifted so each row's likeliest word is 0
        # before dividing: however small the temperature, one word per row stays finite (not 0/0,
        # not all -inf), so a temperature near 0 is greedy instead of NaN.
        shifted = log_probs - log_probs.amax(1, keepdim=True)  # (N, V), <= 0
        scaled = shifted / max(temperature, MIN_TEMPERATURE)
        if top_k:
            kth = scaled.topk(min(top_k, scaled.size(1)), dim=1).values[:, -1:]  # (N, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(scaled.softmax(1), 1, generator=generator).squeeze(1)

    paths = _decode_paths(decoder, memory.repeat(num_samples), max_length, length_penalty, choose, no_repeat)
    return [sorted(paths[b * num_samples : (b + 1) * num_samples], key=lambda h: -h.score) for b in range(B)]


@dataclass
class _Finished:
    """A caption that ended, remembered by where it ended; its words are read back only if it is returned."""

    score: float
    log_prob: float
    step: int  # its <end> was chosen at this step, so it has `step` words
    row: int  # the row of that step that chose <end>


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    memory: Memory,
    beam_size: int,
    num_captions: int = 1,
    max_length: int = 20,
    length_penalty: float = 0.7,
    no_repeat: int = 0,
) -> list[list[Hypothesis]]:
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
    said: list[list[int]] = [[] for _ in range(B)]  # each row's words so far
    for t in range(max_length + 1):
        n = active.numel()
        rows_per_image = 1 if t == 0 else K
        logits, state, alpha = decoder.step(words, state, memory.repeat(rows_per_image))
        log_probs = _next_word_log_probs(logits, last_step=t == max_length)  # (n*rows_per_image, V)
        log_probs = ban_repeats(log_probs, said, no_repeat)
        V = log_probs.size(1)
        candidates = scores.view(n, -1, 1) + log_probs.view(n, rows_per_image, V)  # (n, K, V) at t=0 too
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
        going = torch.tensor(
            [not _settled(finished[b], K, num_captions, bound) for b, bound in zip(active.tolist(), best_possible)],
            device=device,
        )  # (n,)
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
        if no_repeat:
            said = [said[r] + [w] for r, w in zip(came_from[-1], read[-1])]
    return [
        [_read_back(f, came_from, read, alphas) for f in sorted(done, key=lambda f: -f.score)[:num_captions]]
        for done in finished
    ]


def _settled(finished: list[_Finished], beam_size: int, num_captions: int, best_possible: float) -> bool:
    if len(finished) >= beam_size:
        return True
    if len(finished) < num_captions:
        return False
    return sorted(f.score for f in finished)[-num_captions] > best_possible


def _read_back(
    f: _Finished, came_from: list[list[int]], read: list[list[int]], alphas: list[torch.Tensor]
) -> Hypothesis:
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
