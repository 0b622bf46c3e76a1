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
