"""diffusers' VectorQuantizer on vqfast's fused ops: same constructor, attributes, outputs and init; with
opt-in codebook training (EMA updates, dead-code restarts, k-means initialisation, usage statistics)."""

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from vqfast.models import codebook_training as rules
from vqfast.models.codebook_training import CodebookUsage
from vqfast.ops import _checks, codebook_gather, vector_quantize


class _Ema(NamedTuple):
    decay: float
    eps: float


class _Restart(NamedTuple):
    threshold: float
    seed: int


class VectorQuantizer(nn.Module):
    """Straight-through vector quantization of NCHW latents against ``embedding.weight`` (n_e, vq_embed_dim).

    ``legacy=True`` keeps diffusers' (historically misplaced) beta on the codebook term of the loss.
    Index remapping (``remap``, with its ``unknown_index``), which VQModel never uses, is not supported.

    Codebook training beyond diffusers, each off until enabled (the defaults, outputs and state_dict are
    diffusers'): :meth:`enable_ema`, :meth:`enable_dead_code_restart`, :meth:`kmeans_init_` and
    :meth:`enable_usage_tracking`. Updates happen in ``forward`` in training mode only, without gradient.
    Under ``torch.distributed`` every rank must run the same calls in the same order: each training step
    makes one all-reduce (of one flat buffer), :meth:`kmeans_init_` one broadcast and one all-reduce per
    iteration, and every rank ends with the same codebook.
    """

    def __init__(
        self,
        n_e: int,
        vq_embed_dim: int,
        beta: float,
        remap: str | None = None,
        unknown_index: str = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        if remap is not None:
            raise NotImplementedError(
                "vqfast's VectorQuantizer does not support remap (index remapping); use diffusers' VectorQuantizer"
            )
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, vq_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self._ema: _Ema | None = None
        self._restart: _Restart | None = None
        self._generator: torch.Generator | None = None  # the restarts' draws, made on the batches' device
        self._track_usage = False
        self.usage: CodebookUsage | None = None  # of the last batch, with enable_usage_tracking
        self.restarted: torch.Tensor | None = None  # bool (n_e,): the codes the last training step restarted

    def enable_ema(self, decay: float = 0.99, eps: float = 1e-5) -> None:
        """Train the codebook by exponential moving averages of its codes' vectors instead of its gradient
        (VQ-VAE-2; vector-quantize-pytorch's default rule): every training step moves the EMA count ``ema_count``
        (n_e,) and sum ``ema_sum`` (n_e, vq_embed_dim) of each code's vectors by ``1 - decay`` toward the
        batch's (over all ranks), and sets each code to their mean under Laplace smoothing ``eps``
        (:mod:`~vqfast.models.codebook_training`).

        The two EMA buffers are registered here (float32, float64 for a float64 codebook), so they join the
        state_dict only now; they start at one vector per code lying on the code itself (``ema_sum /
        ema_count`` is the codebook, a state consistent from the first step; vector-quantize-pytorch starts
        its counts at zero and its sums at the codebook, which divides an unused code by about eps).
        ``embedding.weight`` stops requiring gradient, so enable EMA before building the optimizer and
        wrapping the model in DistributedDataParallel: the loss keeps its value (diffusers' commit loss, both
        terms) but only its term for z has a gradient.
        """
        decay, eps = _checks.real("decay", decay), _checks.real("eps", eps)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if self._ema is None:
            weight = self.embedding.weight.detach()
            dtype = torch.promote_types(weight.dtype, torch.float32)  # the op's statistics dtype
            self.register_buffer("ema_count", weight.new_ones(self.n_e, dtype=dtype))
            self.register_buffer("ema_sum", weight.to(dtype, copy=True))
            self.embedding.weight.requires_grad_(False)
        self._ema = _Ema(decay, eps)

    def enable_dead_code_restart(self, threshold: float = 2.0, seed: int = 0) -> None:
        """With EMA: after each training step's update, restart every code whose EMA count is below
        ``threshold`` (vectors per step) at a random vector of the batch, and reset its EMA state to match
        (count ``threshold``, sum ``threshold`` times the vector), as vector-quantize-pytorch's
        ``threshold_ema_dead_code``.

        The vectors are drawn with a generator seeded with ``seed`` (made on the batches' device at the
        first step; its state is not saved), distinct while the batch has at least n_e vectors. Under
        ``torch.distributed`` rank 0 draws from its own batch and its draws travel in the step's one
        all-reduce (the other ranks add zeros), so every rank restarts the same codes at the same vectors
        without a broadcast or a host synchronisation.
        """
        if self._ema is None:
            raise ValueError("dead-code restarts read the EMA counts: call enable_ema() first")
        threshold, seed = _checks.real("threshold", threshold), _checks.integer("seed", seed)
        if threshold <= 0.0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self._restart = _Restart(threshold, seed)
        self._generator = None

    def enable_usage_tracking(self) -> None:
        """Fill the perplexity of forward's ``(perplexity, min_encodings, indices)`` (a float32 scalar
        tensor, where diffusers gives None) and set :attr:`usage` to the batch's :class:`CodebookUsage`
        (code histogram by bincount, and perplexity), in training and in eval mode alike. Both are of this
        process's batch; under DDP, all-reduce the histogram for the global one."""
        self._track_usage = True

    @torch.no_grad()
    def kmeans_init_(self, latents: Iterable[torch.Tensor], iters: int = 10, seed: int = 0) -> None:
        """Set the codebook to k-means centroids of ``latents`` (NCHW latents, as forward takes; every rank
        its own): n_e vectors drawn at random from rank 0's (distinct where there are enough, with a
        generator seeded with ``seed``; then broadcast), then ``iters`` Lloyd iterations on ``vector_quantize``'s
        per-code counts and sums over every rank's latents (:func:`~vqfast.models.codebook_training.lloyd`).
        With EMA enabled, the EMA state is set to the last assignment's counts per step (divided by rank
        0's number of batches: give every rank as many) and the matching sums, so that it stands for the
        new codebook.

        Call it once, before training, with the encoder's latents of the first batches (e.g.
        ``model.encode(x).latents`` for a few ``x``), on every rank. An explicit call rather than a flag
        acting inside the first forwards: nothing is hidden in forward or in the state_dict, resuming
        from a checkpoint does not run it again unless asked, and every rank runs its collectives at the
        same visible point (vector-quantize-pytorch's ranks hang when they disagree on whether it ran).
        """
        iters, seed = _checks.integer("iters", iters), _checks.integer("seed", seed)
        if iters < 1:
            raise ValueError(f"iters must be at least 1, got {iters}")
        weight = self.embedding.weight
        batches = [self._rows(_checks.tensor("latents", z).to(weight.device, torch.float32)) for z in latents]
        if not batches:
            raise ValueError("kmeans_init_ needs at least one batch of latents")
        # Rank 0's draw and its number of batches (the steps the counts span), in one broadcast.
        start = weight.new_empty(self.n_e * self.vq_embed_dim + 1, dtype=torch.float32)
        if rules.rank() == 0:
            rows = torch.cat(batches)
            if rows.shape[0] == 0:
                raise ValueError("kmeans_init_ needs latents holding at least one vector (on rank 0)")
            draw = rules.draw_rows(rows, self.n_e, torch.Generator(rows.device).manual_seed(seed))
            start = torch.cat([draw.reshape(-1), start.new_full((1,), len(batches))])
        start = rules.from_rank0(start)
        centroids, counts = rules.lloyd(batches, start[:-1].view(self.n_e, self.vq_embed_dim), iters)
        weight.copy_(centroids.to(weight.dtype))
        if self._ema is not None:
            self.ema_count.copy_(counts / start[-1])
            self.ema_sum.copy_(centroids * self.ema_count.unsqueeze(1))

    def _rows(self, z: torch.Tensor) -> torch.Tensor:
        """The vectors of NCHW latents ``z`` as (N, vq_embed_dim) rows in the indices' order."""
        if z.dim() != 4 or z.shape[1] != self.vq_embed_dim:
            raise ValueError(f"latents must be (batch, {self.vq_embed_dim}, height, width), got {tuple(z.shape)}")
        return z.detach().movedim(1, -1).reshape(-1, self.vq_embed_dim)

    def forward(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, None, torch.Tensor]]:
        """``(z_q, loss, (perplexity, min_encodings, indices))``: z_q in z's layout, min_encodings None and
        perplexity None as in diffusers (with usage tracking: this batch's), indices int64, flat in (batch,
        height, width) order or, with ``sane_index_shape``, shaped (batch, height, width)."""
        # Under autocast the latents arrive in half precision while the codebook stays float32;
        # diffusers' cdist and arithmetic promote them to float32, and so does this.
        z = z.to(self.embedding.weight.dtype)
        if self.training and self._ema is not None:
            # The quantization reads a copy: the update below writes the codebook in place, which the op's
            # backward (saving its codebook argument) must not see.
            codebook = self.embedding.weight.detach().clone()
            z_q, loss, indices, counts, sums = vector_quantize(
                z, codebook, self.beta, self.legacy, dim=1, return_stats=True
            )
            self._ema_step(z, counts, sums)
        else:
            z_q, loss, indices = vector_quantize(z, self.embedding.weight, self.beta, self.legacy, dim=1)
        perplexity = None
        if self._track_usage:
            self.usage = rules.usage(indices, self.n_e)
            perplexity = self.usage.perplexity
        if self.sane_index_shape:
            indices = indices.view(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (perplexity, None, indices)

    @torch.no_grad()
    def _ema_step(self, z: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA update from this batch's ``counts`` and ``sums`` (all ranks', in one all-reduce), then the
        restarts; the new codebook is written into ``embedding.weight``."""
        parts = [counts, sums]
        if self._restart is not None:
            parts += self._restart_candidates(z)
        parts = rules.all_reduce_sum([part.to(self.ema_sum.dtype) for part in parts])
        rules.ema_update_(self.ema_count, self.ema_sum, parts[0], parts[1], self._ema.decay)
        codebook = rules.ema_codebook(self.ema_count, self.ema_sum, self._ema.eps)
        if self._restart is not None:
            candidates, drawn = parts[2], parts[3]
            self.restarted = rules.restart_dead_codes_(
                codebook, self.ema_count, self.ema_sum, candidates, self._restart.threshold, allowed=drawn > 0
            )
        self.embedding.weight.copy_(codebook)

    def _restart_candidates(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``[candidates (n_e, D), drawn (1,)]``: on rank 0 a vector of its batch per code and 1 (0 and zeros
        for an empty batch), zeros on the other ranks, so that their sum over ranks is rank 0's draw."""
        rows = self._rows(z)
        if rules.rank() != 0 or rows.shape[0] == 0:
            return [rows.new_zeros(self.n_e, self.vq_embed_dim), rows.new_zeros(1)]
        if self._generator is None or self._generator.device != rows.device:
            self._generator = torch.Generator(rows.device).manual_seed(self._restart.seed)
        return [rules.draw_rows(rows, self.n_e, self._generator), rows.new_ones(1)]

    def get_codebook_entry(self, indices: torch.LongTensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Codebook rows for ``indices``: (*indices.shape, vq_embed_dim) when ``shape`` is None, otherwise an
        NCHW latent for ``shape`` = (batch, height, width, vq_embed_dim)."""
        if shape is None:
            return codebook_gather(indices, self.embedding.weight)
        # Checked here, as diffusers' view(shape) does, because reshaping first would hide what is wrong.
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must hold integer codebook indices, got {indices.dtype}")
        shape = tuple(shape)
        if len(shape) != 4 or shape[-1] != self.vq_embed_dim or math.prod(shape[:-1]) != indices.numel():
            raise ValueError(
                f"shape must be (batch, height, width, {self.vq_embed_dim}) with batch * height * width equal to "
                f"the {indices.numel()} indices, got {shape}"
            )
        return codebook_gather(indices.reshape(shape[:-1]), self.embedding.weight, dim=1)
