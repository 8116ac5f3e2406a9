"""Data-parallel EM on torch.distributed: 2 CPU processes (gloo, on loopback), each with its
shard of the data, make the same iterates as one process on all of it."""

import os
import tempfile
import time

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_em import EM
from pyro_models import hmm_1, polyphonic
from test_batches import regression_data, regression_mixture

STEPS = 3


def _data():
    torch.manual_seed(0)
    t, x = regression_data(400)
    sequences, lengths, args = polyphonic(num_sequences=8, max_length=9)
    return (t, x), (sequences, lengths, args)


def _run(mixture_parts, hmm_batches, seed):
    """The iterates of both fits: the mixture by ``step`` on its arguments, the HMM by
    ``step_batches`` over its batches."""
    out = {}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)  # the processes draw different initial values: rank 0's must win
    em = EM(regression_mixture)
    out["mixture"] = []
    for _ in range(STEPS):
        loss = em.step(*mixture_parts)
        out["mixture"].append((loss, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}))
    pyro.clear_param_store()
    em = EM(hmm_1, map_space="unconstrained")
    out["hmm"] = []
    for _ in range(STEPS):
        loss = em.step_batches(hmm_batches)
        out["hmm"].append((loss, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}))
    return out


def _worker(rank, world, init_file, out_dir):
    import pyro_em.program

    pyro_em.program.CAPTURE_AT_ONCE = True  # (each process's share of a step runs captured)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        (t, x), (sequences, lengths, args) = _data()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        seqs = range(rank, len(sequences), world)  # every other sequence, in batches of 2
        batches = [(sequences[list(seqs)[i : i + 2]], lengths[list(seqs)[i : i + 2]], args) for i in range(0, len(seqs), 2)]
        out = _run((t[shard], x[shard]), batches, seed=rank)
        # Bad data in one process: every process raises, none waits forever, params unchanged.
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        bad = batches[0][0].clone()
        if rank == 1:
            bad[0, 0, 0] = float("nan")
        try:
            EM(hmm_1, map_space="unconstrained").step_batches([(bad, *batches[0][1:])])
        except (ValueError, RuntimeError) as e:
            out["failure"] = (type(e).__name__, str(e))
        out["unchanged"] = all(torch.equal(v, pyro.get_param_store()[k].detach()) for k, v in before.items())
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_make_the_iterates_of_one_on_all_the_data():
    (t, x), (sequences, lengths, args) = _data()
    expected = _run((t, x), [(sequences, lengths, args)], seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=False)
        deadline = time.monotonic() + 240
        while not context.join(timeout=1):
            if time.monotonic() > deadline:  # a process waits forever for the other
                for process in context.processes:
                    process.kill()
                pytest.fail("the processes did not finish: a collective is waiting for a process")
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert ranks[0]["failure"][0] == "RuntimeError" and "Another process" in ranks[0]["failure"][1]
    assert ranks[1]["failure"][0] == "ValueError" and "NaN" in ranks[1]["failure"][1]
    assert ranks[0]["unchanged"] and ranks[1]["unchanged"]
    for case in ("mixture", "hmm"):
        for step, (loss, params) in enumerate(expected[case]):
            for got in ranks:
                got_loss, got_params = got[case][step]
                assert got_loss == pytest.approx(loss, rel=1e-10), (case, step)
                for name, value in params.items():
                    assert torch.allclose(got_params[name], value, rtol=1e-8, atol=1e-8), (case, step, name)
            for name in params:  # every process holds the same params after every step
                assert torch.equal(ranks[0][case][step][1][name], ranks[1][case][step][1][name])
