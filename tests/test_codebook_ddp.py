"""Codebook training under torch.distributed (gloo, two CPU processes, half the batch each), all cases in
one spawn: every rank ends with the same codebook and EMA state, bit for bit, after k-means init, EMA
steps and restarts, alone and inside a DistributedDataParallel VQModel; each training step makes exactly one
all-reduce (and no broadcast); and where the rule is a sum over the batch (EMA, Lloyd) the two ranks give
what one process gives on the whole batch. Restarts and k-means' first draw take rank 0's vectors, so
those runs are compared between ranks, not with one process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vqfast
from vqfast.models import codebook_training as rules
from vqfast.models.quantizer import VectorQuantizer

WORLD_SIZE = 2
K, D, STEPS = 16, 4, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(seed: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * WORLD_SIZE, D, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
            for _ in range(count)]


def quantizer() -> VectorQuantizer:
    vq = VectorQuantizer(K, D, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(K, D, generator=torch.Generator().manual_seed(100)))
    return vq


def local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD_SIZE)[rank]


def rows_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def ema_run(rank: int | None) -> dict[str, torch.Tensor]:
    """EMA steps on this rank's half of each batch (the whole batch when ``rank`` is None)."""
    vq = quantizer()
    vq.enable_ema(decay=0.8)
    for x in batches(1, STEPS):
        vq(x if rank is None else local(x, rank))
    return {k: v.clone() for k, v in vq.state_dict().items()}


def lloyd_run(rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randn(K, D, generator=torch.Generator().manual_seed(5))
    data = [rows_of(x if rank is None else local(x, rank)) for x in batches(2, 2)]
    return rules.lloyd(data, start, iters=3)


class CollectiveCounter:
    """Counts the all-reduces and broadcasts made through torch.distributed's Python functions."""

    def __init__(self):
        self.calls = {"all_reduce": 0, "broadcast": 0}
        for name in self.calls:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def full_run(rank: int, counter: CollectiveCounter) -> dict:
    """k-means init, then EMA steps with restarts (a threshold that restarts codes on every step) and usage."""
    vq = quantizer()
    vq.enable_ema(decay=0.8)
    vq.kmeans_init_([local(x, rank) for x in batches(3, 2)], iters=3, seed=4)
    after_kmeans = vq.embedding.weight.clone()
    vq.enable_dead_code_restart(threshold=6.0, seed=9)
    vq.enable_usage_tracking()
    calls, restarted, rank0_rows = [], [], []
    for x in batches(4, STEPS):
        before = dict(counter.calls)
        vq(local(x, rank))
        calls.append({k: counter.calls[k] - before[k] for k in before})
        restarted.append(vq.restarted.clone())
        rank0_rows.append(rows_of(local(x, 0)))
    return {
        "after_kmeans": after_kmeans,
        "state": {k: v.clone() for k, v in vq.state_dict().items()},
        "calls": calls,
        "restarted": restarted,
        "rank0_rows": rank0_rows,
        "histogram": vq.usage.histogram,
    }


def model_run(rank: int, config: dict, state: dict) -> dict[str, torch.Tensor]:
    """A tiny VQModel in DistributedDataParallel: k-means init from its latents, EMA and restarts, two
    optimizer steps."""
    model = vqfast.VQModel(**config)
    model.load_state_dict(state)
    vq = model.quantize
    vq.enable_ema()
    x = torch.randn(2 * WORLD_SIZE, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        vq.kmeans_init_([model.encode(local(x, rank)).latents], iters=2)
    vq.enable_dead_code_restart(threshold=1.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = ddp(local(x, rank))
        (F.mse_loss(out.sample, local(x, rank)) + out.commit_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def worker(rank: int, port: int, config: dict, state: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        counter = CollectiveCounter()
        results = {"ema": ema_run(rank), "lloyd": lloyd_run(rank), "full": full_run(rank, counter)}
        results["model"] = model_run(rank, config, state)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from conftest import TINY_GROUP  # pytest puts tests/ on sys.path for its conftest

    out = tmp_path_factory.mktemp("codebook_ddp")
    torch.manual_seed(0)
    state = vqfast.VQModel(**TINY_GROUP).state_dict()
    mp.spawn(worker, args=(free_port(), dict(TINY_GROUP), state, str(out)), nprocs=WORLD_SIZE)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def assert_same(a, b, path: str = "") -> None:
    """Equal bit for bit, through dicts, lists and tuples."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_ranks_agree_bit_for_bit(ranks):
    for case in ("ema", "lloyd", "model"):
        assert_same(ranks[0][case], ranks[1][case], case)
    full = [{k: v for k, v in r["full"].items() if k not in ("histogram", "rank0_rows")} for r in ranks]
    assert_same(full[0], full[1], "full")
    # The usage histogram is of each rank's own batch.
    assert not torch.equal(ranks[0]["full"]["histogram"], ranks[1]["full"]["histogram"])


def test_one_all_reduce_per_step(ranks):
    for rank in ranks:
        assert rank["full"]["calls"] == [{"all_reduce": 1, "broadcast": 0}] * STEPS


def test_restarts_take_rank0_vectors_and_reset_their_state(ranks):
    full = ranks[0]["full"]
    assert any(r.any() for r in full["restarted"])
    # The last step's restarted codes sit on vectors of rank 0's batch, their EMA state consistent with them.
    dead, codebook = full["restarted"][-1], full["state"]["embedding.weight"]
    rows = {tuple(r) for r in full["rank0_rows"][-1].tolist()}
    assert dead.any() and {tuple(r) for r in codebook[dead].tolist()} <= rows
    ema = full["state"]["ema_sum"][dead] / full["state"]["ema_count"][dead, None]
    torch.testing.assert_close(ema, codebook[dead])


def test_sums_over_ranks_equal_one_process_on_the_whole_batch(ranks):
    # Counts are integers; sums only differ in the order of float32 additions (two halves, then the sum).
    one = ema_run(None)
    for key, value in one.items():
        torch.testing.assert_close(ranks[0]["ema"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    centroids, counts = lloyd_run(None)
    assert torch.equal(ranks[0]["lloyd"][1], counts)
    torch.testing.assert_close(ranks[0]["lloyd"][0], centroids, rtol=1e-5, atol=1e-6)
