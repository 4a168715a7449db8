"""The caption decoder: a recurrent cell with soft attention over image regions.

Show, Attend and Tell (Xu et al., 2015): at every step an additive attention
over the regions gives `alpha`, the f_beta gate scales the attended context, and
the cell reads [word embedding; context]. Without attention it is Show and Tell
(Vinyals et al., 2015): the image is fed once, before <start>.

Two departures, each a config switch: regions carry their position
(`positional`), and the attention query sees the word just read as well as the
previous hidden state (`word_in_query`). What each is worth on the Shapes world:
docs/model.md ("The recipe") and docs/training.md ("Decoder variants").

`step()` is the one place a word is predicted: teacher forcing (`forward`) and
every decoding strategy in `captioner.decoding` call it.
"""

from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig


class DecoderState(NamedTuple):
    h: torch.Tensor  # (L, N, H), one row per caption, beam or sample
    c: torch.Tensor  # (L, N, H) LSTM cell state; zeros, unused, for GRU and RNN

    def index_select(self, index: torch.Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(1, index), self.c.index_select(1, index))


class Memory(NamedTuple):
    """What the decoder reads from the images, computed once per image.

    One image may serve several rows of decoder state (its captions in training,
    its beams or samples when decoding): rows i*k .. i*k+k-1 read image i, with
    k = rows_per_image, and attention broadcasts over them instead of copying.
    """

    regions: torch.Tensor  # (B, P, R)
    keys: torch.Tensor  # (B, P, A) attention's projection of the regions; (B, P, 0) without attention
    rows_per_image: int = 1  # k

    @property
    def rows(self) -> int:
        return self.regions.size(0) * self.rows_per_image  # N = B * k

    def repeat(self, k: int) -> "Memory":
        """Each row becomes k rows reading the same image."""
        return Memory(self.regions, self.keys, self.rows_per_image * k)

    def take_images(self, index: torch.Tensor) -> "Memory":
        """Only the images `index` (positions or a boolean mask) picks, with their rows."""
        return Memory(self.regions[index], self.keys[index], self.rows_per_image)


CELL_TYPES = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


def _cell_centres(h: int, w: int) -> torch.Tensor:
    """(P, 2) centres (x, y) of the grid's cells in row-major order, in [-1, 1]."""
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, encoder_dim: int, grid: tuple[int, int]):
        super().__init__()
        c = config
        self.config = c
        num_regions = grid[0] * grid[1]
        self.feature_norm = nn.LayerNorm(encoder_dim)
        self.region_proj = nn.Linear(encoder_dim, c.region_dim)
        # Where each region is: a learned embedding per cell, plus a linear map of the cell's
        # (x, y) centre, which makes "left of" and "above" simple sums from the first step.
        # Positions matter only to attention: without it the regions are averaged away.
        self.region_pos = None
        if c.positional and c.attention:
            self.region_pos = nn.Parameter(torch.zeros(num_regions, c.region_dim))
            self.coord_proj = nn.Linear(2, c.region_dim)
            self.register_buffer("coords", _cell_centres(*grid), persistent=False)  # (P, 2)
        self.embed = nn.Embedding(vocab_size, c.embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(c.dropout)
        if c.attention:
            query_dim = c.hidden_dim + (c.embed_dim if c.word_in_query else 0)
            self.key_proj = nn.Linear(c.region_dim, c.attention_dim)
            self.query_proj = nn.Linear(query_dim, c.attention_dim)
            self.score = nn.Linear(c.attention_dim, 1)
            self.f_beta = nn.Linear(c.hidden_dim, c.region_dim)  # gate: how much of the context to let in
            self.context_out = nn.Linear(c.region_dim, c.hidden_dim)  # deep output: the context also feeds the word
            input_dim = c.embed_dim + c.region_dim
        else:
            self.image_embed = nn.Linear(c.region_dim, c.embed_dim)  # the image as the first "word"
            input_dim = c.embed_dim
        cell_type = CELL_TYPES[c.cell]
        self.cells = nn.ModuleList(
            cell_type(input_dim if i == 0 else c.hidden_dim, c.hidden_dim) for i in range(c.num_layers)
        )
        has_cell_state = c.cell == "lstm"  # GRU and RNN carry h only
        if c.init_state == "mean":
            self.init_h = nn.Linear(c.region_dim, c.num_layers * c.hidden_dim)
            self.init_c = nn.Linear(c.region_dim, c.num_layers * c.hidden_dim) if has_cell_state else None
        else:
            self.h0 = nn.Parameter(torch.zeros(c.num_layers, 1, c.hidden_dim))
            self.c0 = nn.Parameter(torch.zeros(c.num_layers, 1, c.hidden_dim)) if has_cell_state else None
        self.out = nn.Linear(c.hidden_dim, vocab_size)
        if self.region_pos is not None:
            nn.init.normal_(self.region_pos, std=0.02)

    @property
    def has_attention(self) -> bool:
        return self.config.attention

    def prepare(self, features: torch.Tensor) -> Memory:
        """Region features (B, P, D) from the encoder -> what every step reads."""
        regions = self.region_proj(self.feature_norm(features))  # (B, P, R)
        if self.region_pos is not None:
            regions = regions + self.region_pos + self.coord_proj(self.coords)  # (B, P, R)
        regions = self.dropout(regions)
        # (B, P, A); (B, P, 0) without attention
        keys = self.key_proj(regions) if self.config.attention else regions.new_zeros(regions.shape[:2] + (0,))
        return Memory(regions, keys)

    def init_state(self, memory: Memory) -> DecoderState:
        c = self.config
        B, k = memory.regions.size(0), memory.rows_per_image
        mean = memory.regions.mean(dim=1).repeat_interleave(k, dim=0)  # (N, R)
        layers = lambda x: x.view(-1, c.num_layers, c.hidden_dim).transpose(0, 1)  # (N, L*H) -> (L, N, H)
        if c.init_state == "mean":
            h = layers(torch.tanh(self.init_h(mean)))  # (L, N, H)
            cell = layers(torch.tanh(self.init_c(mean))) if self.init_c is not None else torch.zeros_like(h)
        else:
            h = self.h0.expand(-1, B * k, -1)  # (L, N, H)
            cell = self.c0.expand(-1, B * k, -1) if self.c0 is not None else torch.zeros_like(h)
        state = DecoderState(h.contiguous(), cell.contiguous())
        if not c.attention:  # Show and Tell: the image goes in once, before <start>
            state, _ = self._run_cells(self.dropout(self.image_embed(mean)), state)
        return state

    def _run_cells(self, x: torch.Tensor, state: DecoderState) -> tuple[DecoderState, torch.Tensor]:
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if isinstance(cell, nn.LSTMCell):
                h, c = cell(x, (state.h[i], state.c[i]))  # (N, H) each
            else:
                h, c = cell(x, state.h[i]), state.c[i]
            hs.append(h)
            cs.append(c)
            x = self.dropout(h)
        return DecoderState(torch.stack(hs), torch.stack(cs)), h

    def attend(self, memory: Memory, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention for queries (N, Q): alpha (N, P), summing to 1 over the
        regions, and the attended context (N, R)."""
        B, P, A = memory.keys.shape
        k = memory.rows_per_image
        q = self.query_proj(query).view(B, k, 1, A)  # (B, k, 1, A)
        # score(tanh(x)) as 2w . sigmoid(2x) + b - sum(w): the same energies, since tanh(x) = 2 sigmoid(2x) - 1,
        # and on a CPU torch's sigmoid is several times faster than its tanh (docs/performance.md)
        hidden = torch.sigmoid_((memory.keys.unsqueeze(1) + q).mul_(2))  # (B, k, P, A), in place: the step's largest
        w = self.score.weight[0]  # (A,)
        energy = hidden @ (2 * w) + (self.score.bias - w.sum())  # (B, k, P)
        alpha = energy.softmax(dim=2)  # (B, k, P)
        context = torch.bmm(alpha, memory.regions)  # (B, k, R)
        return alpha.view(B * k, P), context.view(B * k, -1)

    def step(
        self, words: torch.Tensor, state: DecoderState, memory: Memory
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """Read `words` (N,), predict the next: logits (N, V), the new state, and the
        attention alpha (N, P) used for that prediction (None without attention)."""
        emb = self.dropout(self.embed(words))  # (N, E)
        if not self.config.attention:
            state, top = self._run_cells(emb, state)
            return self.out(self.dropout(top)), state, None
        previous = state.h[-1]  # (N, H)
        query = torch.cat([previous, emb], dim=1) if self.config.word_in_query else previous
        alpha, context = self.attend(memory, query)  # (N, P), (N, R)
        context = torch.sigmoid(self.f_beta(previous)) * context  # (N, R)
        state, top = self._run_cells(torch.cat([emb, context], dim=1), state)  # top: (N, H)
        logits = self.out(self.dropout(top + self.context_out(context)))  # (N, V)
        return logits, state, alpha

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, captions_per_image: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing. features (B, P, D); captions (N, T), N = B * captions_per_image,
        image i's captions in rows i*k .. i*k+k-1, each starting with <start>. Returns
        logits (N, T-1, V) predicting captions[:, 1:] and alphas (N, T-1, P) (None without
        attention). Each image is projected once, however many captions it has."""
        memory = self.prepare(features).repeat(captions_per_image)
        state = self.init_state(memory)
        logits: list[torch.Tensor] = []
        alphas: list[torch.Tensor] = []  # one per step with attention, none without
        for t in range(captions.size(1) - 1):
            step_logits, state, alpha = self.step(captions[:, t], state, memory)
            logits.append(step_logits)
            if alpha is not None:
                alphas.append(alpha)
        return torch.stack(logits, 1), (torch.stack(alphas, 1) if self.config.attention else None)
