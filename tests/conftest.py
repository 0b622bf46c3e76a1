"""Shared pytest fixtures: one thread, a fixed seed, and the tiny models and batches the unit tests
build (`tiny_config`, `tiny_model`, `tiny_batch`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from codat.checkpoint import build_model
from codat.config import ModelConfig
from codat.data import BOS_ID, EOS_ID, PAD_ID, Batch

TINY = dict(
    vocab_size=40,
    dim=32,
    heads=4,
    ffn_dim=64,
    encoder_layers=1,
    decoder_layers=1,
    upsample_scale=2.0,
    dropout=0.0,
    max_length=32,
    max_graph_positions=256,
    max_target_positions=64,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and leaves the other cores alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


def make_config(arch: str = "dat", **overrides) -> ModelConfig:
    """A tiny ModelConfig of `arch` (vocabulary 40, width 32, one layer each, no dropout)."""
    return dataclasses.replace(ModelConfig(arch=arch, **TINY), **overrides)


def make_model(arch: str = "dat", *, seed: int = 1234, **overrides) -> torch.nn.Module:
    """A tiny model of `arch`, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return build_model(make_config(arch, **overrides))


def make_batch(
    src_lens: list[int],  # content lengths (without </s>)
    tgt_lens: list[int],  # content lengths (without <s> </s>)
    *,
    vocab_size: int = 40,
    seed: int = 0,
) -> Batch:
    """A random batch of the given content lengths, encoded as `ParallelData.collate` does."""
    g = torch.Generator().manual_seed(seed)
    B = len(src_lens)
    src = torch.full((B, max(src_lens) + 1), PAD_ID, dtype=torch.long)
    tgt = torch.full((B, max(tgt_lens) + 2), PAD_ID, dtype=torch.long)
    for b, (m, n) in enumerate(zip(src_lens, tgt_lens, strict=True)):
        src[b, :m] = torch.randint(4, vocab_size, (m,), generator=g)
        src[b, m] = EOS_ID
        tgt[b, 0] = BOS_ID
        tgt[b, 1 : n + 1] = torch.randint(4, vocab_size, (n,), generator=g)
        tgt[b, n + 1] = EOS_ID
    return Batch(
        src,
        torch.tensor(src_lens) + 1,
        tgt,
        torch.tensor(tgt_lens) + 2,
        torch.arange(B),
    )


@pytest.fixture
def tiny_config():
    """`make_config` as a fixture: tiny_config("glat", dropout=0.1)."""
    return make_config


@pytest.fixture
def tiny_model():
    """`make_model` as a fixture: tiny_model("ctc", seed=3)."""
    return make_model


@pytest.fixture
def tiny_batch():
    """`make_batch` as a fixture: tiny_batch([5, 3], [4, 2])."""
    return make_batch
