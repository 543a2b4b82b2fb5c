"""diffusers' VectorQuantizer on vqfast's fused ops: same constructor, attributes, outputs and init."""

import math

import torch
from torch import nn

from vqfast.ops import codebook_gather, vector_quantize


class VectorQuantizer(nn.Module):
    """Straight-through vector quantization of NCHW latents against ``embedding.weight`` (n_e, vq_embed_dim).

    ``legacy=True`` keeps diffusers' (historically misplaced) beta on the codebook term of the loss.
    Index remapping (``remap``, with its ``unknown_index``), which VQModel never uses, is not supported.
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

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """``(z_q, loss, (perplexity, min_encodings, indices))``: z_q in z's layout, the first two of the
        triple None as in diffusers, indices int64, flat in (batch, height, width) order or, with
        ``sane_index_shape``, shaped (batch, height, width)."""
        # Under autocast the latents arrive in half precision while the codebook stays float32;
        # diffusers' cdist and arithmetic promote them to float32, and so does this.
        z = z.to(self.embedding.weight.dtype)
        z_q, loss, indices = vector_quantize(z, self.embedding.weight, self.beta, self.legacy, dim=1)
        if self.sane_index_shape:
            indices = indices.view(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (None, None, indices)

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
