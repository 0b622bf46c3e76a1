"""Transformer building blocks shared by every model: attention (SDPA), feed-forward, post-norm
encoder and decoder layers, and the BERT-style initialisation (method.md §2.1).

Layers take plain scalars, not config objects. Masks are bool with True = take part. The
autoregressive baseline (`codat.transformer`) reuses the same decoder layer with `causal=True` for
training and `DecoderLayer.step` with a `LayerCache` for incremental decoding; the
non-autoregressive models never pass either, so their path is unchanged.

Two speed settings: `MultiHeadAttention.cpu_half` (how attention runs on CPU under bf16 autocast
or on half inputs, `CPU_HALF_ATTENTION`; the CPU's bfloat16 SDPA kernels are slow, its backward
above all) and `DropoutTape` (record the dropout masks of one forward, replay them in the next:
glancing's two passes draw the same masks; exact). `tied_logits` is every model's token head
(x @ E^T with the embeddings E), in float32 inside `float32_logits()` (bf16 decoding).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.data import PAD_ID

if TYPE_CHECKING:
    from codat.config import ModelConfig


class LayerCache(NamedTuple):
    """What one decoder layer keeps between incremental decoding steps (fairseq's
    `incremental_state`): the self-attention keys/values of the t positions decoded so far, which
    grow by one per step, and the cross-attention keys/values of the source, computed once."""

    self_keys: torch.Tensor  # (B, H, t, D/H)
    self_values: torch.Tensor  # (B, H, t, D/H)
    memory_keys: torch.Tensor  # (B, H, S, D/H)
    memory_values: torch.Tensor  # (B, H, S, D/H)


HALF = (torch.bfloat16, torch.float16)


# How attention runs on CPU under autocast or on half-precision inputs (elsewhere: SDPA as given).
#   sdpa    torch's SDPA in the half dtype (the first version; its bf16 kernels are slow on CPU);
#   fp32    SDPA in float32, outside autocast, a float32 result: exact up to float32 rounding;
#   matmul  scores (scale and key mask inside one baddbmm) and weighted sum as two half-precision
#           batched matmuls (float32 accumulation), the softmax in float32, as fairseq's attention
#           does under fp16/bf16 training: within bf16 noise of fp32, and the fastest on CPU
#           (measured at the small DAT config's shapes: 1.4-2.2x fp32 SDPA forward+backward).
CPU_HALF_ATTENTION = ("sdpa", "fp32", "matmul")


def _check_cpu_half(mode: str) -> str:
    if mode not in CPU_HALF_ATTENTION:
        raise ValueError(f"cpu_half must be one of {CPU_HALF_ATTENTION}, got {mode!r}")
    return mode


def attention(
    q: torch.Tensor,  # (B, H, T, D/H)
    k: torch.Tensor,  # (B, H, S, D/H)
    v: torch.Tensor,  # (B, H, S, D/H)
    attn_mask: torch.Tensor | None,  # bool, broadcast to (B, H, T, S); every row keeps a key
    *,
    cpu_half: str,
) -> torch.Tensor:  # (B, H, T, D/H)
    """Scaled dot-product attention; on CPU under autocast or with half inputs as `cpu_half`
    says (`CPU_HALF_ATTENTION`)."""
    _check_cpu_half(cpu_half)
    half = q.dtype in HALF or torch.is_autocast_enabled("cpu")
    if cpu_half == "sdpa" or q.device.type != "cpu" or not half:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.autocast("cpu", enabled=False):
        if cpu_half == "fp32":
            return F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask
            )
        dtype = q.dtype if q.dtype in HALF else torch.get_autocast_dtype("cpu")
        B, H, T, d = q.shape
        S = k.shape[2]
        if attn_mask is None:
            bias = q.new_zeros((1, 1, 1), dtype=dtype)
        else:  # the mask as an additive bias (B * H, T or 1, S), added inside the matmul
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=q.device)
            bias = bias.masked_fill_(~attn_mask, float("-inf")).expand(B, H, -1, S)
            bias = bias.reshape(B * H, -1, S)
        scores = torch.baddbmm(  # (B * H, T, S) = q k^T / sqrt(d) + bias, rounded once
            bias,
            q.to(dtype).reshape(B * H, T, d),
            k.to(dtype).reshape(B * H, S, d).transpose(1, 2),
            alpha=d**-0.5,
        )
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        return torch.bmm(weights, v.to(dtype).reshape(B * H, S, d)).view(B, H, T, d)


class _TiedLogits(torch.autograd.Function):
    """x @ w^T with w's gradient as (x^T g)^T from a contiguous x^T: on CPU in bf16 that matmul
    layout is ~1.5x faster than autograd's g^T x for the (R x V) logits' gradient."""

    @staticmethod
    def forward(ctx, x, w):  # (..., D), (V, D) -> (..., V)  # noqa: D102
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ w
        if ctx.needs_input_grad[1]:
            g = grad.reshape(-1, grad.shape[-1])
            # contiguous: a transposed gradient makes autograd's accumulation into the
            # embedding's (V, D) gradient a strided add, slower than the matmul saved
            grad_w = (x.reshape(-1, x.shape[-1]).t().contiguous() @ g).t().contiguous()
        return grad_x, grad_w


_FLOAT32_LOGITS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "float32_logits", default=False
)


@contextlib.contextmanager
def float32_logits(enabled: bool = True) -> Iterator[None]:
    """Inside, `tied_logits` computes the token logits in float32 even under autocast: bf16
    decoding (decode.precision bf16) keeps every other matmul in bf16. Logits rounded to bf16's
    8-bit mantissa cost 0.1-0.2 BLEU on Multi30k val; float32 logits none."""
    token = _FLOAT32_LOGITS.set(enabled)
    try:
        yield
    finally:
        _FLOAT32_LOGITS.reset(token)


def tied_logits(x: torch.Tensor, weight: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
    """Token logits x @ weight^T of a head tied to the (V, D) embeddings, in float32 inside
    `float32_logits()`. `fast` (a speed setting, same values): under CPU autocast,
    `_TiedLogits`' weight-gradient layout."""
    if _FLOAT32_LOGITS.get():
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ weight.float().t()
    if fast and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return _TiedLogits.apply(x.to(dtype), weight.to(dtype))
    return x @ weight.t()


class MultiHeadAttention(nn.Module):
    """Multi-head attention. `cpu_half` (a speed setting, `CPU_HALF_ATTENTION`; switch it on a
    built model with `set_cpu_half_attention`): with "fp32", half-precision projections are cast to
    float32 once, contiguous, before the heads are split, and the heads' output back before
    `out`."""

    def __init__(
        self, dim: int, heads: int, *, self_attention: bool, cpu_half: str = "matmul"
    ) -> None:
        super().__init__()
        self.heads = heads
        self.self_attention = self_attention
        self.cpu_half = _check_cpu_half(cpu_half)
        if self_attention:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads_input(self, y: torch.Tensor) -> torch.Tensor:  # a projection (B, T, n * D)
        if self.cpu_half == "fp32" and y.device.type == "cpu" and y.dtype in HALF:
            return y.float()
        return y

    def _output(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # (B, H, T, D/H)
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1).to(dtype))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D) queries
        memory: torch.Tensor | None,  # (B, S, D) keys/values for cross-attention, else None
        key_mask: torch.Tensor,  # (B, S) bool, True = valid key
        *,
        causal: bool = False,  # self-attention only: query t also sees only keys <= t
    ) -> torch.Tensor:  # (B, T, D)
        B, T, D = x.shape
        H = self.heads
        if self.self_attention:
            qkv = self.qkv(x)
            dtype = qkv.dtype
            q, k, v = self._heads_input(qkv).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x)
            dtype = q.dtype
            q = self._heads_input(q).view(B, T, H, D // H).transpose(1, 2)
            k, v = self.memory_keys_values(memory)
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            if not self.self_attention:
                raise ValueError("causal=True is for self-attention only")
            # An explicit (T, T) lower triangle, not SDPA's is_causal, which cannot be combined
            # with a key mask.
            attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = attention(q, k, v, attn_mask, cpu_half=self.cpu_half)
        return self._output(y, dtype)

    def memory_keys_values(
        self,
        memory: torch.Tensor,  # (B, S, D)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (B, H, S, D/H)
        """Cross-attention keys and values of the source states."""
        B, S, D = memory.shape
        H = self.heads
        kv = self._heads_input(self.kv(memory))
        k, v = kv.view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        return k, v

    def step(
        self,
        x: torch.Tensor,  # (B, 1, D) the newest position only
        keys: torch.Tensor,  # (B, H, t, D/H) cached keys (self) or memory keys (cross)
        values: torch.Tensor,  # (B, H, t, D/H)
        key_mask: torch.Tensor | None,  # (B, t') bool over the keys attended to; None = all
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, 1, D), keys, values
        """Incremental attention for one new query position.

        Self-attention appends x's own key/value to the cache first (so the query sees positions
        <= t, i.e. causal attention) and returns the grown cache; cross-attention attends to the
        given memory keys/values and returns them unchanged.
        """
        B, T, D = x.shape
        H = self.heads
        assert T == 1, "step() takes one position at a time"
        if self.self_attention:
            qkv = self.qkv(x)
            dtype = qkv.dtype
            q, k, v = self._heads_input(qkv).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        else:
            q = self.q(x)
            dtype = q.dtype
            q = self._heads_input(q).view(B, T, H, D // H).transpose(1, 2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = attention(q, keys, values, attn_mask, cpu_half=self.cpu_half)
        return self._output(y, dtype), keys, values


def set_cpu_half_attention(model: nn.Module, mode: str) -> None:
    """Set `MultiHeadAttention.cpu_half` (`CPU_HALF_ATTENTION`) in every attention module of
    `model`."""
    _check_cpu_half(mode)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.cpu_half = mode


class DropoutTape:
    """The dropout masks of one forward pass, replayed in the same order by the next.

    Inside `record()`, every `Dropout` in training mode draws its mask exactly as `F.dropout` does
    on CPU (`bernoulli_(1 - p)` then `/ (1 - p)`, same random numbers) and keeps it; inside
    `replay()` the same modules, called in the same order on tensors of the same shapes, reuse
    them instead of drawing again. Glancing's pass 2 so sees pass 1's masks without regenerating
    them (`glancing.replay_rng` is the other way: restore the RNG and draw again).
    """

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.position: int | None = None  # None: recording; else the next mask to replay

    @contextlib.contextmanager
    def record(self) -> Iterator[DropoutTape]:
        self.masks, self.position = [], None
        token = _TAPE.set(self)
        try:
            yield self
        finally:
            _TAPE.reset(token)

    @contextlib.contextmanager
    def replay(self) -> Iterator[DropoutTape]:
        self.position = 0
        token = _TAPE.set(self)
        try:
            yield self
        finally:
            _TAPE.reset(token)
        if self.position != len(self.masks):
            raise RuntimeError(f"replayed {self.position} of {len(self.masks)} dropout masks")

    def apply(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if self.position is None:
            mask = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
            self.masks.append(mask)
        else:
            if self.position >= len(self.masks):
                raise RuntimeError(f"replay asks for more than {len(self.masks)} dropout masks")
            mask = self.masks[self.position]
            self.position += 1
            if mask.shape != x.shape or mask.dtype != x.dtype:
                raise RuntimeError(
                    f"replayed dropout mask {tuple(mask.shape)} {mask.dtype} does not match "
                    f"{tuple(x.shape)} {x.dtype}"
                )
        return x * mask


_TAPE: contextvars.ContextVar[DropoutTape | None] = contextvars.ContextVar(
    "dropout_tape", default=None
)


class Dropout(nn.Dropout):
    """nn.Dropout that records / replays its masks inside a `DropoutTape` context (else, and in
    eval mode, exactly nn.Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tape = _TAPE.get()
        if tape is None or not self.training or self.p == 0 or self.inplace:
            return super().forward(x)
        return tape.apply(x, self.p)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-norm: x = LN(x + Drop(SelfAttn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, self_attention=True)
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        x = self.norm1(x + self.drop(self.attn(x, None, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm self-attention (unmasked over valid positions, or causal for an AR decoder),
    cross-attention, FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads, self_attention=True)
        self.cross_attn = MultiHeadAttention(dim, heads, self_attention=False)
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        mask: torch.Tensor,  # (B, L) bool
        memory: torch.Tensor,  # (B, S, D)
        memory_mask: torch.Tensor,  # (B, S) bool
        *,
        causal: bool = False,  # AR decoder: position t attends to positions <= t only
    ) -> torch.Tensor:  # (B, L, D)
        x = self.norm1(x + self.drop(self.self_attn(x, None, mask, causal=causal)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory, memory_mask)))
        return self.norm3(x + self.drop(self.ffn(x)))

    def init_cache(self, memory: torch.Tensor) -> LayerCache:  # memory (B, S, D)
        """An empty self-attention cache and the source keys/values for `step`."""
        memory_keys, memory_values = self.cross_attn.memory_keys_values(memory)
        empty = memory_keys[:, :, :0]  # (B, H, 0, D/H)
        return LayerCache(empty, empty, memory_keys, memory_values)

    def step(
        self,
        x: torch.Tensor,  # (B, 1, D) the newest decoder position
        memory_mask: torch.Tensor,  # (B, S) bool
        cache: LayerCache,
    ) -> tuple[torch.Tensor, LayerCache]:  # (B, 1, D), the cache grown by one position
        """`forward(..., causal=True)` at the last position, from the cached keys/values."""
        a, keys, values = self.self_attn.step(x, cache.self_keys, cache.self_values, None)
        x = self.norm1(x + self.drop(a))
        a, _, _ = self.cross_attn.step(x, cache.memory_keys, cache.memory_values, memory_mask)
        x = self.norm2(x + self.drop(a))
        x = self.norm3(x + self.drop(self.ffn(x)))
        return x, cache._replace(self_keys=keys, self_values=values)


class Encoder(nn.Module):
    """Token embeddings (scaled by sqrt(D)) + learned positions, then post-norm layers."""

    def __init__(
        self,
        embed: nn.Embedding,
        *,
        layers: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        max_positions: int,
    ) -> None:
        super().__init__()
        dim = embed.embedding_dim
        self.embed = embed
        self.scale = dim**0.5
        self.positions = nn.Embedding(max_positions, dim)
        self.drop = Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers)
        )

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        S = src_ids.shape[1]
        if S > self.positions.num_embeddings:
            raise ValueError(
                f"source length {S} exceeds max_source_positions={self.positions.num_embeddings}"
            )
        pos = torch.arange(S, device=src_ids.device)
        x = self.drop(self.embed(src_ids) * self.scale + self.positions(pos))
        for layer in self.layers:
            x = layer(x, src_mask)
        return x


def bert_init(module: nn.Module) -> None:
    """Linear and Embedding weights ~ N(0, 0.02), biases 0, the padding row 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def shared_embedding_and_encoder(cfg: ModelConfig) -> tuple[nn.Embedding, Encoder]:
    """What every model starts with: one vocabulary embedding (shared by the encoder input, the
    decoder input and the output projection) and the encoder over it. Checks the vocabulary."""
    if cfg.vocab_size <= 4:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} must be set (> 4)")
    embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD_ID)
    encoder = Encoder(
        embed,
        layers=cfg.encoder_layers,
        heads=cfg.heads,
        ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
        max_positions=cfg.max_source_positions,
    )
    return embed, encoder


def decoder_stack(cfg: ModelConfig) -> nn.ModuleList:
    """cfg.decoder_layers post-norm decoder layers."""
    return nn.ModuleList(
        DecoderLayer(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout)
        for _ in range(cfg.decoder_layers)
    )
