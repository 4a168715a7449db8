"""The caption decoder: a recurrent cell with soft attention over image regions.

Show, Attend and Tell (Xu et al., 2015): at every step an additive attention
over the regions gives `alpha`, the f_beta gate scales the attended context, and
the cell reads [word embedding; context]. Without attention it is Show and Tell
(Vinyals et al., 2015): the image is fed once, before <start>.

`step()` is the one place a word is predicted: teacher forcing (`forward`) and
every decoding strategy in `captioner.decoding` call it.
"""

from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig


class DecoderState(NamedTuple):
    h: torch.Tensor  # (L, B, H)
    c: torch.Tensor  # (L, B, H) LSTM cell state; zeros, unused, for GRU and RNN

    def index_select(self, index: torch.Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(1, index), self.c.index_select(1, index))


class Memory(NamedTuple):
    """What the decoder reads from the image, computed once per image."""

    regions: torch.Tensor  # (B, P, R)
    keys: torch.Tensor  # (B, P, A) attention's projection of the regions; (B, P, 0) without attention

    def index_select(self, index: torch.Tensor) -> "Memory":
        return Memory(self.regions.index_select(0, index), self.keys.index_select(0, index))


CELL_TYPES = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, encoder_dim: int, grid: tuple[int, int]):
        super().__init__()
        c = config
        self.config = c
        num_regions = grid[0] * grid[1]
        self.feature_norm = nn.LayerNorm(encoder_dim)
        self.region_proj = nn.Linear(encoder_dim, c.region_dim)
        self.region_pos = nn.Parameter(torch.zeros(num_regions, c.region_dim)) if c.positional else None
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
        if c.init_state == "mean":
            self.init_h = nn.Linear(c.region_dim, c.num_layers * c.hidden_dim)
            self.init_c = nn.Linear(c.region_dim, c.num_layers * c.hidden_dim)
        else:
            self.h0 = nn.Parameter(torch.zeros(c.num_layers, 1, c.hidden_dim))
            self.c0 = nn.Parameter(torch.zeros(c.num_layers, 1, c.hidden_dim))
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
            regions = regions + self.region_pos  # (B, P, R)
        regions = self.dropout(regions)
        if self.config.attention:
            keys = self.key_proj(regions)  # (B, P, A)
        else:
            keys = regions.new_zeros(regions.shape[:2] + (0,))
        return Memory(regions, keys)

    def init_state(self, memory: Memory) -> DecoderState:
        c = self.config
        B = memory.regions.size(0)
        if c.init_state == "mean":
            mean = memory.regions.mean(dim=1)  # (B, R)
            h = torch.tanh(self.init_h(mean)).view(B, c.num_layers, c.hidden_dim).transpose(0, 1)  # (L, B, H)
            cell = torch.tanh(self.init_c(mean)).view(B, c.num_layers, c.hidden_dim).transpose(0, 1)
        else:
            h = self.h0.expand(-1, B, -1)  # (L, B, H)
            cell = self.c0.expand(-1, B, -1)
        state = DecoderState(h.contiguous(), cell.contiguous())
        if not c.attention:  # Show and Tell: the image goes in once, before <start>
            image = self.image_embed(memory.regions.mean(dim=1))  # (B, E)
            state, _ = self._run_cells(self.dropout(image), state)
        return state

    def _run_cells(self, x: torch.Tensor, state: DecoderState) -> tuple[DecoderState, torch.Tensor]:
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if isinstance(cell, nn.LSTMCell):
                h, c = cell(x, (state.h[i], state.c[i]))  # (B, H) each
            else:
                h, c = cell(x, state.h[i]), state.c[i]
            hs.append(h)
            cs.append(c)
            x = self.dropout(h)
        return DecoderState(torch.stack(hs), torch.stack(cs)), h

    def attend(self, memory: Memory, query: torch.Tensor) -> torch.Tensor:
        """Additive attention: alpha (B, P), summing to 1 over the regions."""
        energy = self.score(torch.tanh(memory.keys + self.query_proj(query).unsqueeze(1)))  # (B, P, 1)
        return energy.squeeze(2).softmax(dim=1)  # (B, P)

    def step(self, words: torch.Tensor, state: DecoderState, memory: Memory
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """Read `words` (B,), predict the next: logits (B, V), the new state, and the
        attention alpha (B, P) used for that prediction (None without attention)."""
        emb = self.dropout(self.embed(words))  # (B, E)
        if not self.config.attention:
            state, top = self._run_cells(emb, state)
            return self.out(self.dropout(top)), state, None
        previous = state.h[-1]  # (B, H)
        query = torch.cat([previous, emb], dim=1) if self.config.word_in_query else previous
        alpha = self.attend(memory, query)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), memory.regions).squeeze(1)  # (B, R)
        context = torch.sigmoid(self.f_beta(previous)) * context  # (B, R)
        state, top = self._run_cells(torch.cat([emb, context], dim=1), state)  # top: (B, H)
        logits = self.out(self.dropout(top + self.context_out(context)))  # (B, V)
        return logits, state, alpha

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing. captions (B, T) start with <start>; returns logits (B, T-1, V)
        predicting captions[:, 1:], and alphas (B, T-1, P) (None without attention)."""
        memory = self.prepare(features)
        state = self.init_state(memory)
        logits, alphas = [], []
        for t in range(captions.size(1) - 1):
            step_logits, state, alpha = self.step(captions[:, t], state, memory)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), (torch.stack(alphas, 1) if self.config.attention else None)
