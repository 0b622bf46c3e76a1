"""GPU fast paths against the CPU: the DP (value and gradient), best path and decoders give the
same results on CUDA as on the CPU. Skipped when no GPU is present (CI has none)."""

from __future__ import annotations

import pytest
import torch
from reference import random_dag

from codat.dag import dag_best_path, dag_log_likelihood
from codat.decode import joint_viterbi_decode, lookahead_decode

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _inputs():
    graph_lens = torch.tensor([40, 33, 12, 40])
    target_lens = torch.tensor([9, 12, 5, 2])
    token_logp, trans_logp = random_dag(4, 40, graph_lens, 12)
    return token_logp.float(), trans_logp.float(), graph_lens, target_lens


def test_dp_value_and_gradient_on_gpu_match_cpu():
    tok, tr, gl, tl = _inputs()
    results = []
    for device in ("cpu", "cuda"):
        t = tok.to(device).requires_grad_()
        e = tr.to(device).requires_grad_()
        ll = dag_log_likelihood(t, e, gl.to(device), tl.to(device))
        g_tok, g_tr = torch.autograd.grad(ll.sum(), [t, e])
        results.append([x.detach().cpu() for x in (ll, g_tok, g_tr)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_best_path_and_decoders_on_gpu_match_cpu():
    tok, tr, gl, tl = _inputs()
    vocab_logp = torch.randn(4, 40, 30).log_softmax(-1)
    outs = []
    for device in ("cpu", "cuda"):
        args = [x.to(device) for x in (tok, tr, gl, tl)]
        path, score = dag_best_path(*args)
        look = lookahead_decode(
            vocab_logp.to(device), args[1], args[2], beta=1.0, special_ids=(0,), pad_id=-1
        )
        vit = joint_viterbi_decode(
            vocab_logp.to(device), args[1], args[2], length_beta=1.0, special_ids=(0,), pad_id=-1
        )
        outs.append([x.cpu() for x in (path, score, look, vit)])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _steps() -> dict:
    """Each arch's training step (the public names the training loop's dict holds)."""
    from codat.cmlm import cmlm_step
    from codat.ctc import ctc_step
    from codat.dat_train import dat_step
    from codat.nat import glat_step, nat_step
    from codat.transformer import at_step

    return {
        "dat": dat_step,
        "at": at_step,
        "nat": nat_step,
        "glat": glat_step,
        "ctc": ctc_step,
        "cmlm": cmlm_step,
    }


@pytest.mark.parametrize("arch", ["dat", "at", "nat", "glat", "ctc", "cmlm"])
def test_every_arch_trains_and_decodes_the_same_on_gpu(arch):
    """The same tiny model and batch on CPU and GPU: training loss (glancing off, no dropout) and
    the default decoder's output agree."""
    import contextlib

    from conftest import make_model

    from codat.config import DecodeConfig, RunConfig, TrainConfig
    from codat.data import BOS_ID, EOS_ID, PAD_ID, Batch
    from codat.generate import decoder_for

    model = make_model(arch, seed=0, vocab_size=20, upsample_scale=3.0).eval()
    cfg = RunConfig(model=model.cfg, train=TrainConfig(glance_start=0.0, glance_end=0.0))
    src = torch.tensor([[5, 6, 7, 8, EOS_ID], [9, 10, EOS_ID, PAD_ID, PAD_ID]])
    tgt = torch.tensor([[BOS_ID, 11, 12, 13, EOS_ID], [BOS_ID, 14, EOS_ID, PAD_ID, PAD_ID]])
    batch = Batch(src, torch.tensor([5, 3]), tgt, torch.tensor([5, 3]), torch.arange(2))
    step, decoder = _steps()[arch], decoder_for(arch, "")
    results = []
    for device in ("cpu", "cuda"):
        m = model.to(device)
        b = batch.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        loss, _ = step(m, b, cfg=cfg, ratio=0.0, generator=g, autocast=contextlib.nullcontext())
        with torch.no_grad():
            out = decoder(m, b.src_ids, b.src_lens, DecodeConfig(), g)
        results.append((loss.detach().cpu(), out.cpu()))
    (cpu_loss, cpu_out), (gpu_loss, gpu_out) = results
    if arch != "cmlm":  # CMLM's loss masks positions drawn from the device's generator
        torch.testing.assert_close(cpu_loss, gpu_loss, rtol=1e-4, atol=1e-4)
    assert torch.equal(cpu_out, gpu_out)
