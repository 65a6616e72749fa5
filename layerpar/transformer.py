"""Transformer blocks as residual steps: ``model.kind = "transformer"``.

A pre-norm encoder block is a residual layer u <- u + F(u) with

    F(u) = a + M(LN_2(u + a)),   a = A(LN_1(u)),

for multi-head self-attention A and a two-layer MLP M (Jiang, Salvado, Cyr,
Kopanicakova, Krause, Schroder, *Layer-Parallel Training for Transformers*,
2026): the usual block u + a + M(LN_2(u + a)) is u + F(u), forward Euler
with step 1, and layerpar takes it with h = T/N.  The whole block is ONE
layer (one step F_n).  Attention and MLP must not alternate as separate
layers: on a coarse MGRIT grid a step spans several fine layers and uses
the weights of the layer at its start (the C-point's), so with alternating
layers a coarse step would be all-attention or all-MLP.

States are (batch, length, width).  The pass's context (see
``layerpar.engine.policy``) may hold ``"mask"``, a (batch, length) boolean
padding mask (True: a token, False: padding): padded keys get no attention,
and the closing pools over tokens only.  ``TokenOpening`` derives it from
the pad token (id 0) and returns ``(state, {"mask": mask})``, so the mask
travels to every rank with the batch.  Dropout (attention weights and the
MLP's output) follows the random-draw policy: the same masks in every call
of a layer in one pass, on any number of ranks.

``causal=True`` lets a position attend only to itself and earlier ones (a
decoder block; with ``pool="last"`` a closing that classifies the next
token from the last one).
"""
import math

import torch
from torch import nn

__all__ = ["SelfAttention", "TransformerBlock", "TokenOpening", "PoolClosing", "POOLS"]

POOLS = ("mean", "first", "last")


def check_heads(width, heads):
    """Refuse ``heads`` that do not divide ``width``, naming the keys."""
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"model.heads = {heads!r} does not divide model.width = {width}: "
                         "each head takes width / heads features")


def padding_mask(context, batch, length):
    """The context's boolean (batch, length) padding mask, or None; a mask
    of another shape raises naming the array."""
    mask = None if context is None else context.get("mask")
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"context['mask'] has shape {tuple(mask.shape)}: the padding mask "
                         f"must be (batch, length) = ({batch}, {length})")
    return mask if mask.dtype == torch.bool else mask != 0


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention on (batch, length,
    width) states, written out (no fused kernels: every call, with or
    without autograd, computes the same values)."""

    def __init__(self, width, heads, dropout=0.0, causal=False):
        super().__init__()
        check_heads(width, heads)
        self.heads, self.causal = heads, bool(causal)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        B, L, W = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, L, 3, H, W // H).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(W // H)
        low = torch.finfo(scores.dtype).min  # finite: a row with every key masked stays finite
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], low)
        if self.causal:
            later = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(later, low)
        weights = self.drop(torch.softmax(scores, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(B, L, W))


class TransformerBlock(nn.Module):
    """The step F(u) = a + M(LN_2(u + a)), a = A(LN_1(u)) of a pre-norm
    encoder block (see the module's docstring): ``heads`` attention heads
    (dividing ``width``), an MLP of ``mlp_ratio * width`` hidden features
    (GELU), ``dropout`` on the attention weights and the MLP's output,
    ``causal`` attention.  Takes the pass's context: its ``"mask"``."""

    def __init__(self, width, heads=4, mlp_ratio=4, dropout=0.0, causal=False):
        super().__init__()
        hidden = int(round(mlp_ratio * width))
        if hidden < 1:
            raise ValueError(f"model.mlp_ratio = {mlp_ratio!r}: the MLP needs >= 1 hidden feature")
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width),
                                 nn.Dropout(dropout))

    def forward(self, u, *, context=None):
        mask = padding_mask(context, u.shape[0], u.shape[1])
        a = self.attn(self.ln1(u), mask)
        return a + self.mlp(self.ln2(u + a))


class TokenOpening(nn.Module):
    """Token embedding plus learned positions: inputs (batch, length) of
    token ids (integers, or floats holding them) in 0..num_tokens-1, id
    ``pad`` (0) being padding, to states (batch, length, width).  Returns
    ``(state, {"mask": tokens != pad})``; a context given with the batch
    may hold ``"positions"`` (batch, length) to use instead of 0..length-1.
    A sequence longer than ``max_length`` positions, or a token out of
    range, is refused naming the key."""

    def __init__(self, num_tokens, width, max_length, pad=0, dropout=0.0):
        super().__init__()
        self.num_tokens, self.max_length, self.pad = num_tokens, max_length, pad
        self.embed = nn.Embedding(num_tokens, width)
        self.positions = nn.Embedding(max_length, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, context=None):
        if x.dim() != 2:
            raise ValueError(f"the token inputs have shape {tuple(x.shape)}: expected "
                             "(batch, length)")
        tokens = x if not x.is_floating_point() else x.round()
        tokens = tokens.long()
        B, L = tokens.shape
        if L > self.max_length:
            raise ValueError(f"inputs of length {L} are longer than the positions: "
                             f"model.max_length = {self.max_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_tokens):
            bad = int(tokens.max()) if int(tokens.max()) >= self.num_tokens else int(tokens.min())
            raise ValueError(f"token id {bad} is out of range for model.vocab "
                             f"(ids 0..{self.num_tokens - 1}, 0 the padding)")
        pos = None if context is None else context.get("positions")
        if pos is None:
            pos = torch.arange(L, device=tokens.device).expand(B, L)
        elif tuple(pos.shape) != (B, L) or int(pos.max()) >= self.max_length:
            raise ValueError(f"context['positions'] of shape {tuple(pos.shape)} (largest "
                             f"{int(pos.max())}): must be (batch, length) = ({B}, {L}) below "
                             f"model.max_length = {self.max_length}")
        u = self.drop(self.embed(tokens) + self.positions(pos.long()))
        return u, {"mask": tokens != self.pad}


class PoolClosing(nn.Module):
    """Classifier of (batch, length, width) states: layer norm, pooling over
    the tokens (``pool``: "mean" over the tokens the context's mask keeps,
    "first", or "last" token (the last one the mask keeps)), a linear map
    to class scores."""

    def __init__(self, width, num_classes, pool="mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"model.pool = {pool!r}: choose one of {', '.join(POOLS)}")
        self.pool = pool
        self.ln = nn.LayerNorm(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, u, *, context=None):
        u = self.ln(u)
        mask = padding_mask(context, u.shape[0], u.shape[1])
        if self.pool == "first":
            z = u[:, 0]
        elif self.pool == "last":
            if mask is None:
                z = u[:, -1]
            else:
                last = (mask.long().cumsum(1).argmax(1))  # the last kept position
                z = u[torch.arange(len(u), device=u.device), last]
        elif mask is None:
            z = u.mean(1)
        else:
            keep = mask.to(u.dtype).unsqueeze(-1)
            z = (u * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.linear(z)
