"""codat.distributed and DDP training on CPU (gloo), against a single process.

Compared, with 2 ranks spawned by torch.multiprocessing (gloo, MASTER_ADDR 127.0.0.1, a free port,
RANK/WORLD_SIZE/LOCAL_RANK in each child's environment, `distributed.setup(DistInfo.from_env())`)
and the same tiny model (same seed) inside `train.TrainingStep` wrapped in DistributedDataParallel,
as `codat train` runs it:

* one step of every model and objective (DAT dp / codat / reward with and without glancing, GLAT
  codat on NPD samples, vanilla NAT, CTC and CTC+GLAT dp and codat, AT, CMLM): each rank's gradient
  on its own half of a fixed 4-sentence batch (a per-half generator seed for glancing and
  sampling), after DDP's all-reduce, with the single-process gradient of the mean of the two half
  losses; the per-rank loss and statistics with the single-process ones of that half. Every
  forward a step makes (glancing pass, trained pass, CoDAT's un-glanced pass) runs inside the one
  DDP forward, so a gradient that escaped the all-reduce would differ from the expected one.
* gradient accumulation as `train.Loop.update` does it: two micro-batches per rank,
  `model.no_sync()` on the first, backward of loss / 2 on each; the result (averaged over ranks by
  DDP) with the single-process gradient of the mean loss over the 4 micro-batches.
* `distributed.all_reduce_mean` with the mean of the ranks' values (input left unchanged) and
  `DistInfo.from_env` inside the children with the rank each was given.

`DistInfo.from_env` is also checked without RANK/WORLD_SIZE (single process: rank 0, world 1,
is_main) and with them set. An end-to-end test runs `torchrun --nproc_per_node=2 -m codat train`
on a tiny prepared synthetic corpus and checks the run directory (best/ checkpoint, 4 loss rows).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_config, make_model
from torch.nn.parallel import DistributedDataParallel

from codat import distributed
from codat.config import CodatConfig, RunConfig, TrainConfig
from codat.data import ParallelData
from codat.distributed import DistInfo
from codat.train import TrainingStep

WORLD = 2
MODEL_SEED = 1234
# Sentence indices: one step (a half per rank), and two micro-batches per rank.
STEP_HALVES = [[0, 1], [2, 3]]  # rank 0, rank 1
ACCUM_MICRO = [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]  # rank r: [micro-batch a, micro-batch b]
SPAWN_TIMEOUT_S = 240


def _data() -> ParallelData:
    """8 ragged pairs, ids in [4, 40) (no specials), trainable with lambda = 2."""
    g = torch.Generator().manual_seed(7)
    src_lens = [5, 7, 4, 6, 3, 8, 5, 6]
    tgt_lens = [4, 6, 6, 3, 4, 9, 2, 7]  # + <s> </s> <= floor(2 * (m + 1))
    src = [torch.randint(4, 40, (n,), generator=g) for n in src_lens]
    tgt = [torch.randint(4, 40, (n,), generator=g) for n in tgt_lens]
    data = ParallelData(src, tgt)
    assert data.trainable_mask(
        max_target_lens=_model().max_target_lens(data.src_lens), max_ratio=0
    ).all()
    return data


def _model(arch: str = "dat") -> torch.nn.Module:
    return make_model(arch, seed=MODEL_SEED)


def _step(arch: str = "dat", objective: str = "dp") -> TrainingStep:
    """The tiny model of `arch` inside the training step `codat train` runs. CoDAT: a random
    model shows <unk> at most vertices, so 3 tokens per vertex, untempered, for variety."""
    glances = arch != "nat"
    cfg = RunConfig(
        model=make_config(arch),
        train=TrainConfig(objective=objective, glance_start=0.5 * glances, glance_end=0.0),
        codat=CodatConfig(samples=8, keep=0.5, temperature=1.0, top_p=1.0, top_tokens=3),
    )
    return TrainingStep(_model(arch), cfg, contextlib.nullcontext())


def _loss(step: torch.nn.Module, batch, *, ratio: float = 0.0, seed: int = 0) -> torch.Tensor:
    loss, stats = step(batch, ratio, torch.Generator().manual_seed(seed))
    assert stats.get("invalid", 0) == 0
    return loss


def _grads(core: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in core.named_parameters()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> DistInfo:
    """Set the torchrun environment of one spawned rank and join the process group."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    info = DistInfo.from_env()
    distributed.setup(info)
    return info


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One DDP rank (spawned): writes its gradients and losses to out_dir/rank{rank}.pt."""
    info = _join(rank, world, port)
    try:
        result = {"info": (info.rank, info.local_rank, info.world_size, info.is_main)}
        value = torch.tensor([float(rank + 1), 10.0 * rank])
        mean = distributed.all_reduce_mean(value, info)
        result["all_reduce_mean"] = (mean, value)

        data = _data()
        step = _step()
        model = DistributedDataParallel(step)

        # One step on this rank's half of the batch.
        loss = _loss(model, data.collate(STEP_HALVES[rank]))
        loss.backward()
        result["step_loss"] = float(loss.detach())
        result["step_grads"] = _grads(step)

        # Two micro-batches, no_sync on the first (as train.Loop.update accumulates).
        step.zero_grad(set_to_none=True)
        micro = ACCUM_MICRO[rank]
        for k, idx in enumerate(micro):
            ctx = model.no_sync() if k < len(micro) - 1 else contextlib.nullcontext()
            with ctx:
                (_loss(model, data.collate(idx)) / len(micro)).backward()
            if k == 0:
                result["local_grads_after_no_sync"] = _grads(step)
        result["accum_grads"] = _grads(step)
        distributed.barrier(info)
    finally:
        distributed.teardown(info)
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")


def _spawn(worker, out: pathlib.Path) -> list[dict]:
    """Run `worker(rank, WORLD, port, out)` on WORLD spawned ranks; return each rank's results."""
    ctx = mp.start_processes(
        worker,
        args=(WORLD, _free_port(), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """Spawn the 2 ranks once; return each rank's saved results."""
    return _spawn(_worker, tmp_path_factory.mktemp("ddp"))


def _single_process_grads(micro_batches: list[list[int]]) -> tuple[dict, list[float]]:
    """Gradient of the mean of the micro-batch losses, one process, no DDP."""
    data = _data()
    step = _step()
    losses = [_loss(step, data.collate(idx)) for idx in micro_batches]
    (sum(losses) / len(losses)).backward()
    return _grads(step), [float(x.detach()) for x in losses]


def _assert_grads_close(actual: dict, expected: dict, *, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


def test_ddp_gradients_equal_single_process_on_concatenated_batch(ddp_results):
    expected, half_losses = _single_process_grads(STEP_HALVES)
    assert any(g.abs().max() > 1e-3 for g in expected.values())  # not trivially zero
    for rank, res in enumerate(ddp_results):
        assert res["step_loss"] == pytest.approx(half_losses[rank], abs=1e-6)
        _assert_grads_close(res["step_grads"], expected, atol=1e-6)
    _assert_grads_close(ddp_results[0]["step_grads"], ddp_results[1]["step_grads"], atol=1e-7)

    # The half-mean is the loss of the concatenated batch (re-padded to its longest pair).
    data, step = _data(), _step()
    _loss(step, data.collate(STEP_HALVES[0] + STEP_HALVES[1])).backward()
    _assert_grads_close(_grads(step), expected, atol=1e-6)


def test_ddp_no_sync_accumulation_matches_single_process(ddp_results):
    micro = [idx for rank in range(WORLD) for idx in ACCUM_MICRO[rank]]
    expected, _ = _single_process_grads(micro)
    for res in ddp_results:
        _assert_grads_close(res["accum_grads"], expected, atol=1e-6)
    _assert_grads_close(ddp_results[0]["accum_grads"], ddp_results[1]["accum_grads"], atol=1e-7)

    # no_sync really skipped the all-reduce: after micro-batch a each rank held its own gradient.
    for rank, res in enumerate(ddp_results):
        local, _ = _single_process_grads([ACCUM_MICRO[rank][0]])
        _assert_grads_close(
            res["local_grads_after_no_sync"], {n: g / 2 for n, g in local.items()}, atol=1e-6
        )


def test_ddp_children_read_env_and_all_reduce_mean(ddp_results):
    for rank, res in enumerate(ddp_results):
        assert res["info"] == (rank, rank, WORLD, rank == 0)
        mean, value = res["all_reduce_mean"]
        torch.testing.assert_close(mean, torch.tensor([1.5, 5.0]))
        torch.testing.assert_close(value, torch.tensor([float(rank + 1), 10.0 * rank]))


def test_dist_info_from_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    assert info == DistInfo()
    if not torch.cuda.is_available():
        assert info.device() == torch.device("cpu")
    # Single process: setup/teardown/barrier do nothing, all_reduce_mean is the identity.
    distributed.setup(info)
    assert not torch.distributed.is_initialized()
    value = torch.tensor([2.0, 3.0])
    assert distributed.all_reduce_mean(value, info) is value
    distributed.barrier(info)
    distributed.teardown(info)

    monkeypatch.setenv("RANK", "3")  # RANK alone is not a distributed launch
    assert DistInfo.from_env() == DistInfo()

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK")
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 4, True)


def test_torchrun_two_ranks_trains_and_writes_run_dir(tmp_path):
    from codat.prepare import prepare

    rng = random.Random(0)
    words = "ein mann eine frau hund spielt im park mit dem ball auf der straße".split()
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 60), ("val", 8)):
        src = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for lang in ("de", "en"):  # copy task
            (raw / f"{split}.{lang}").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    data = tmp_path / "data"
    prepare(
        src="de",
        tgt="en",
        train=str(raw / "train"),
        valid=str(raw / "val"),
        tests=[],
        out=str(data),
        vocab_size=60,
        upsample_scale=3.0,
        max_ratio=2.0,
    )
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"run_dir: {run}\ndata: {{dir: {data}}}\n"
        "model: {dim: 32, heads: 4, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1,"
        " upsample_scale: 3.0, dropout: 0.0}\n"
        "train: {lr: 1.0e-3, warmup_steps: 2, max_tokens: 200, max_steps: 4, log_every: 1,"
        " eval_every: 4, glance_start: 0.5, glance_end: 0.5, threads: 1}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "codat",
            "train",
            str(cfg),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "last" / "trainer_state.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # rank 0 alone writes, once per step
    assert all(r["loss"] > 0 and r["glance"] == 0.5 for r in losses)
    assert [r["step"] for r in rows if "valid_bleu" in r] == [4]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------------------------
# Every model and objective under DDP. A CoDAT term is computed on the un-glanced output: at
# glancing ratio 0 DAT reuses the trained pass, at ratio > 0 it runs a second forward; GLAT and
# CTC score their samples in further forwards. All of them run inside the one DDP forward of
# `TrainingStep`, so DDP must all-reduce the gradient of each. Compared per case: each rank's
# gradient (one half of the batch each, a per-half generator seed for glancing and sampling) with
# the single-process gradient of the mean of the two half losses (same seeds), and the per-rank
# loss and statistics with the single-process ones of that half.

CASES = (  # (arch, objective, glancing ratio)
    ("dat", "dp", 0.5),
    ("dat", "codat", 0.0),
    ("dat", "codat", 0.5),
    ("dat", "reward", 0.5),
    ("glat", "codat", 0.5),
    ("nat", "dp", 0.0),
    ("ctc", "dp", 0.5),
    ("ctc", "codat", 0.0),
    ("at", "dp", 0.0),
    ("cmlm", "dp", 0.0),
)
HALF_SEEDS = (101, 202)  # generator seed of half 0 and of half 1 (glancing, then sampling)


def _case_batch(half: int):
    """The sources of STEP_HALVES[half], with each reference the longest of 8 samples of a tiny
    DAT (cut to fit the graph), so that the samples' sentence BLEU (the reward) varies."""
    from codat.data import PAD_ID, SPECIAL_IDS
    from codat.decode import sample_dag

    data = _data()
    src = [data.src[i] for i in STEP_HALVES[half]]
    b = ParallelData(src, [data.tgt[i] for i in STEP_HALVES[half]]).collate([0, 1])
    with torch.no_grad():
        out = _model()(b.src_ids, b.src_lens)
        s = sample_dag(
            torch.log_softmax(out.token_logits.float(), -1),
            out.trans_logp,
            out.graph_lens,
            num_samples=8,
            temperature=1.0,
            top_p=1.0,
            top_tokens=3,
            generator=torch.Generator().manual_seed(7),
            special_ids=SPECIAL_IDS,
            pad_id=PAD_ID,
        )
    tgt = []
    for row in range(len(src)):
        k = int(s.lengths[row].argmax())
        n = min(int(s.lengths[row, k]), int(out.graph_lens[row]) - 2)
        tgt.append(s.tokens[row, k, :n])
    return ParallelData(src, tgt).collate([0, 1])


def _case_loss(step, case, half: int):
    return step(_case_batch(half), case[2], torch.Generator().manual_seed(HALF_SEEDS[half]))


def _cases_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One DDP rank (spawned): for each case, the loss, stats and gradient of its half."""
    info = _join(rank, world, port)
    try:
        result = {}
        for case in CASES:
            step = _step(case[0], case[1])
            model = DistributedDataParallel(step)  # held: its hooks all-reduce in backward()
            loss, stats = _case_loss(model, case, rank)
            loss.backward()
            result[case] = (float(loss.detach()), stats, _grads(step))
        distributed.barrier(info)
    finally:
        distributed.teardown(info)
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def cases_ddp_results(tmp_path_factory) -> list[dict]:
    return _spawn(_cases_worker, tmp_path_factory.mktemp("ddp_cases"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - g).abs().max()) for n, g in b.items())


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ddp_step_gradients_equal_single_process(cases_ddp_results, case):
    step = _step(case[0], case[1])
    halves = [_case_loss(step, case, h) for h in range(WORLD)]
    (sum(loss for loss, _ in halves) / WORLD).backward()
    expected = _grads(step)
    # Each half alone has another gradient: a rank whose gradient (of any forward) was not
    # all-reduced would not match `expected`.
    alone = _step(case[0], case[1])
    _case_loss(alone, case, 0)[0].backward()
    assert _max_diff(expected, _grads(alone)) > 1e-4
    if case[1] != "dp":
        # The sample term is live: it moves the gradient away from the base loss's.
        assert all(stats["gate_pass"] == 1.0 for _, stats in halves)
        base = _step(case[0], "dp")
        (sum(_case_loss(base, case, h)[0] for h in range(WORLD)) / WORLD).backward()
        assert _max_diff(expected, _grads(base)) > 1e-5
    for rank, res in enumerate(cases_ddp_results):
        loss, stats, grads = res[case]
        assert loss == pytest.approx(halves[rank][0].item(), abs=1e-6)
        assert stats.keys() == halves[rank][1].keys()
        for key, value in halves[rank][1].items():
            assert stats[key] == pytest.approx(value, abs=1e-6), key
        _assert_grads_close(grads, expected, atol=1e-6)
    _assert_grads_close(cases_ddp_results[0][case][2], cases_ddp_results[1][case][2], atol=1e-7)
