"""One DistributedDataParallel training step (gloo, two CPU processes, half the batch each) gives the
gradients of one process over the whole batch: both losses are means over the local batch, so the
average of the ranks' gradients is the full batch's."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vqfast

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.mse_loss(out.sample, x) + out.commit_loss


def worker(rank: int, port: int, config: dict, state: dict, x: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = vqfast.VQModel(**config)
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_of(ddp, x.chunk(WORLD_SIZE)[rank]).backward()
        torch.save({name: p.grad for name, p in model.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_full_batch(tiny_configs, make_pair, assert_matches, tmp_path):
    config = tiny_configs["spatial"]
    _, model = make_pair(config)
    x = torch.randn(2 * WORLD_SIZE, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss_of(model, x).backward()

    mp.spawn(worker, args=(free_port(), config, model.state_dict(), x, str(tmp_path)), nprocs=WORLD_SIZE)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    # Only the summation order differs (two halves, then the all-reduce): 1e-5 of the largest gradient.
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    for name, param in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # all-reduced: the same on every rank
        assert_matches(ranks[0][name], param.grad, scale=largest, msg=name)
