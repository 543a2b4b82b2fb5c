"""Codebook training rules as functions of per-code counts and sums: EMA updates with Laplace smoothing,
dead-code restarts, k-means (Lloyd) initialisation, usage statistics, and their reductions across
``torch.distributed`` ranks.

The counts and sums come from :func:`vqfast.ops.vector_quantize` with ``return_stats=True``, computed in
the same pass as its nearest-code search (deterministically when
``torch.are_deterministic_algorithms_enabled()``); no function here forms the N x K one-hot or distance
matrix. Everything is elementwise or per code, with no host synchronisation.

The rules are those of VQ-VAE (van den Oord et al. 2017, appendix A.1), VQ-VAE-2 and
vector-quantize-pytorch's ``EuclideanCodebook``:

- ``N_k <- decay N_k + (1 - decay) n_k`` and ``m_k <- decay m_k + (1 - decay) s_k`` (n_k vectors of the
  batch nearest to code k, s_k their sum), written as ``lerp`` like both;
- ``e_k = m_k / N'_k`` with Laplace smoothing ``N'_k = (N_k + eps) / (sum N + K eps) * sum N``;
- a code with ``N_k < threshold`` is restarted at a vector of the batch, with ``N_k = threshold`` and
  ``m_k = threshold * e_k`` so that ``m_k / N_k`` is the new vector (vector-quantize-pytorch's
  ``reset_cluster_size``, whose default is the threshold);
- perplexity ``exp(-sum p_k log p_k)`` of the batch's code histogram p.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from vqfast.ops import vector_quantize


class CodebookUsage(NamedTuple):
    """How a batch used the codebook."""

    histogram: torch.Tensor  # int64 (K,): vectors per code
    perplexity: torch.Tensor  # float32 scalar: exp(entropy of the histogram); K when uniform, 1 on one code


def usage(indices: torch.Tensor, num_codes: int) -> CodebookUsage:
    """The histogram of ``indices`` over ``num_codes`` codes (a bincount, no one-hot) and its perplexity."""
    histogram = torch.bincount(indices.reshape(-1), minlength=num_codes)
    return CodebookUsage(histogram, perplexity(histogram))


def perplexity(histogram: torch.Tensor) -> torch.Tensor:
    """``exp(-sum p log p)`` with ``p = histogram / histogram.sum()`` and ``0 log 0 = 0`` (xlogy, where
    VQ-VAE and taming write ``log(p + 1e-10)``); NaN for an empty histogram, like the loss of an empty batch."""
    p = histogram.float() / histogram.sum()
    return torch.exp(-torch.xlogy(p, p).sum())


def ema_update_(
    ema_count: torch.Tensor, ema_sum: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, decay: float
) -> None:
    """Move the EMA counts (K,) and sums (K, D) toward this step's ``counts`` and ``sums`` by ``1 - decay``."""
    ema_count.lerp_(counts, 1.0 - decay)
    ema_sum.lerp_(sums, 1.0 - decay)


def laplace_smoothed(ema_count: torch.Tensor, eps: float) -> torch.Tensor:
    """``(N_k + eps) / (sum N + K eps) * sum N``: the counts with ``eps`` added to each, rescaled to the same
    total, so that a code no vector chose does not divide by zero."""
    total = ema_count.sum()
    return (ema_count + eps) / (total + ema_count.numel() * eps) * total


def ema_codebook(ema_count: torch.Tensor, ema_sum: torch.Tensor, eps: float) -> torch.Tensor:
    """The codebook the EMA state stands for: each code's mean vector, ``m_k / N'_k``."""
    return ema_sum / laplace_smoothed(ema_count, eps).unsqueeze(1)


def draw_rows(rows: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` rows of ``rows`` (N, D) drawn at random with ``generator``: distinct rows when N >= num
    (a random permutation's first ``num``), with repeats otherwise. ``rows`` must not be empty."""
    n = rows.shape[0]
    if n >= num:
        picked = torch.randperm(n, generator=generator, device=rows.device)[:num]
    else:
        picked = torch.randint(n, (num,), generator=generator, device=rows.device)
    return rows.index_select(0, picked)


def restart_dead_codes_(
    codebook: torch.Tensor,
    ema_count: torch.Tensor,
    ema_sum: torch.Tensor,
    candidates: torch.Tensor,
    threshold: float,
    allowed: torch.Tensor | bool = True,
) -> torch.Tensor:
    """Replace each code whose EMA count is below ``threshold`` (where ``allowed``) by its row of
    ``candidates`` (K, D), and reset its EMA state to match: count ``threshold``, sum ``threshold`` times the
    new vector. In place on ``codebook`` (K, D) and the EMA state; returns the restarted codes' mask (K,)."""
    dead = (ema_count < threshold) & allowed
    rows = dead.unsqueeze(1)
    codebook.copy_(torch.where(rows, candidates.to(codebook.dtype), codebook))
    ema_count.masked_fill_(dead, threshold)
    ema_sum.copy_(torch.where(rows, candidates.to(ema_sum.dtype) * threshold, ema_sum))
    return dead


def is_distributed() -> bool:
    """Whether the codebook state must be reduced over ranks: a default process group of two or more."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ``tensors`` (one dtype and device) summed over ranks, in one all-reduce of one flat buffer; the
    same tensors when not distributed. Every rank receives the same bits."""
    if not is_distributed():
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as rank 0 holds it, on every rank (a broadcast); itself when not distributed."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def lloyd(
    batches: Sequence[torch.Tensor], centroids: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations of k-means over the rows of ``batches`` (each (N_i, D), float32) of every
    rank, from ``centroids`` (K, D), which must be the same on every rank. Each iteration assigns rows and
    sums them per code with :func:`vector_quantize` (never the N x K matrix), adds the counts and sums over
    batches and then over ranks (one all-reduce), and moves every centroid that got rows to their mean; a
    centroid that got none stays. Returns the centroids and the counts (K,) of the last assignment."""
    counts = centroids.new_zeros(centroids.shape[0])
    for _ in range(iters):
        counts, sums = torch.zeros_like(counts), torch.zeros_like(centroids)
        for rows in batches:
            *_, batch_counts, batch_sums = vector_quantize(rows, centroids, dim=1, return_stats=True)
            counts += batch_counts
            sums += batch_sums
        counts, sums = all_reduce_sum([counts, sums])
        centroids = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), centroids)
    return centroids, counts
