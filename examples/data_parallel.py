"""Data-parallel EM: a full-covariance Gaussian mixture fitted by several processes at once.

Each process holds one shard of the data and streams it in batches (``fit_batches``); EM sums
the sufficient statistics and the loss over the batches and, through ``torch.distributed``,
over the processes, so every process makes the same M-step and ends with the same params:
those of EM on all of the data in one process.

Run on 2 CPU processes (gloo):

    torchrun --standalone --nproc_per_node=2 examples/data_parallel.py [-n 200000] [--batch-size 20000]

on the GPUs of one machine (NCCL, one GPU per process) add ``--cuda``; without torchrun it runs
in one process.
"""

import argparse
import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

from pyro_em import EM
from pyro_em.init import kmeans_plusplus

K, D = 4, 3


@pyro.infer.config_enumerate
def model(x: torch.Tensor) -> None:
    weights = pyro.param("weights", lambda: torch.ones(K, device=x.device) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: kmeans_plusplus(x, K))
    scale_tril = pyro.param("scale_tril", lambda: torch.eye(D, device=x.device).expand(K, D, D).clone(),
                            constraint=constraints.lower_cholesky)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=x)


def make_data(n: int) -> torch.Tensor:
    """The same data in every process (a fixed seed): each takes its own shard of it."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    z = torch.randint(K, (n,), generator=g)
    return centers[z] + torch.randn(n, D, generator=g)


def main(n: int = 200_000, batch_size: int = 20_000, cuda: bool = False, max_iter: int = 100) -> None:
    parallel = "WORLD_SIZE" in os.environ  # launched by torchrun
    device = torch.device("cpu")
    if parallel:
        if cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    elif cuda:
        device = torch.device("cuda")
    rank, world = (torch_dist.get_rank(), torch_dist.get_world_size()) if parallel else (0, 1)

    data = make_data(n)
    shard = data[rank * n // world : (rank + 1) * n // world].to(device)
    pyro.set_rng_seed(rank)  # rank 0's initial params are broadcast to the others
    em = EM(model)
    result = em.fit_batches(DataLoader(TensorDataset(shard), batch_size=batch_size), max_iter=max_iter, tol=1e-8)

    if rank == 0:
        print(f"{world} process(es), {n} points in batches of {batch_size}: "
              f"{'converged' if result.converged else 'stopped'} after {result.n_iter} iterations, "
              f"loss {result.loss:.2f}")
        weights, locs = pyro.param("weights").detach().cpu(), pyro.param("locs").detach().cpu()
        for k in (locs @ torch.tensor([1.0, 10.0, 100.0])).argsort().tolist():
            print(f"weight {float(weights[k]):.3f}  mean " + " ".join(f"{v:6.2f}" for v in locs[k].tolist()))
    if parallel:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="number of data points over all processes")
    parser.add_argument("--batch-size", type=int, default=20_000, help="data points per batch")
    parser.add_argument("--max-iter", type=int, default=100, help="the most EM iterations")
    parser.add_argument("--cuda", action="store_true", help="one GPU per process (NCCL)")
    args = parser.parse_args()
    main(args.n, args.batch_size, args.cuda, args.max_iter)
