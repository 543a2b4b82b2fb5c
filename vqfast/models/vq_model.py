"""``vqfast.VQModel``: diffusers' VQModel (same constructor, config, checkpoint keys and outputs) on vqfast's ops."""

from collections.abc import Callable
from typing import Any, TypeVar

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from vqfast.layout import memory_format
from vqfast.models import tiling
from vqfast.models.quantizer import VectorQuantizer
from vqfast.models.vae import Decoder, Encoder

Model = TypeVar("Model", bound=ModelMixin)


class VQModel(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""A VQ-VAE: encoder, vector quantizer, decoder. A drop-in for ``diffusers.VQModel``: the same arguments
    (see diffusers' documentation), config, ``state_dict`` keys, checkpoints and outputs.

    ``norm_type="spatial"`` is MoVQ (Kandinsky): the decoder's norms are conditioned on the quantized latent.
    ``lookup_from_codebook``: ``decode(indices, force_not_quantize=True, shape=(B, h, w, C))`` decodes
    codebook indices (aMUSEd). ``force_upcast`` is only read by pipelines.

    Tiling and slicing, off by default, as diffusers' AutoencoderKL has them: ``enable_tiling()`` encodes and
    decodes images larger than ``tile_sample_min_size`` (latents larger than ``tile_latent_min_size``) in
    tiles overlapping by ``tile_overlap_factor``, blended with ``blend_v``/``blend_h``; ``enable_slicing()``
    runs the encoder and the decoder one sample at a time. Quantization (and the codebook lookup) always
    runs once on the whole latent, so ``commit_loss`` is the untiled one. The tile size defaults to
    ``sample_size``, as in AutoencoderKL; configs whose ``sample_size`` is a placeholder (32 in aMUSEd's
    and Kandinsky's) want both sizes set, e.g. ``tile_sample_min_size = 512`` and
    ``tile_latent_min_size = 512 // 2 ** (len(block_out_channels) - 1)``.
    """

    _skip_layerwise_casting_patterns = ["quantize"]
    _supports_group_offloading = False
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",  # group, spatial
        mid_block_add_attention=True,
        lookup_from_codebook=False,
        force_upcast=False,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        vq_embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None, sane_index_shape=False)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
        )
        # Convolution weights live in channels_last, as the activations do (else every call converts
        # them); state_dict() gives them in the checkpoints' contiguous layout, and a load converts back.
        _weights_channels_last(self)
        self.register_state_dict_post_hook(_contiguous_state)
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: _weights_channels_last(module))

        self.use_slicing = False
        self.use_tiling = False
        # Only read with tiling on; AutoencoderKL's names and defaults.
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = sample_size
        self.tile_latent_min_size = int(sample_size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | None, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained`` (same arguments and result), with the convolution weights it
        loaded in place (not through load_state_dict) put back into channels_last."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        _weights_channels_last(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Image ``x`` (B, in_channels, H, W) -> latents (B, vq_embed_dim, h, w), before quantization, in
        x's memory format (channels_last inside); sliced and tiled when enabled."""
        return _encoder_output(self._sliced(self._encode, x), x, return_dict)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """``encode`` in tiles, whatever ``use_tiling`` and the image size (slicing aside)."""
        return _encoder_output(self._tiled_encode(x), x, return_dict)

    @apply_forward_hook
    def decode(
        self,
        h: torch.Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        shape: tuple[int, ...] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Latents -> image. ``h`` is quantized first unless ``force_not_quantize``; then, with
        ``lookup_from_codebook``, ``h`` holds codebook indices for a latent of ``shape`` (B, h, w, C).
        ``commit_loss`` is the quantizer's loss, or zeros of shape (B,) and h's dtype when not quantizing. The image
        comes in h's memory format (channels_last inside). Quantization runs on the whole latent; the
        decoder is sliced and tiled when enabled."""
        quant, commit_loss = self._quantize(h, force_not_quantize, shape)
        return _decoder_output(self._sliced(self._decode, quant), commit_loss, h, return_dict)

    def tiled_decode(
        self,
        h: torch.Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        shape: tuple[int, ...] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """``decode`` with the decoder in tiles, whatever ``use_tiling`` and the latent size (slicing aside)."""
        quant, commit_loss = self._quantize(h, force_not_quantize, shape)
        return _decoder_output(self._tiled_decode(quant), commit_loss, h, return_dict)

    def blend_v(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """AutoencoderKL's vertical seam blend: see :func:`vqfast.models.tiling.blend_v`."""
        return tiling.blend_v(a, b, blend_extent)

    def blend_h(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """AutoencoderKL's horizontal seam blend: see :func:`vqfast.models.tiling.blend_h`."""
        return tiling.blend_h(a, b, blend_extent)

    def tile_grid(self) -> tiling.TileGrid:
        """The tiles the current knobs give, in latent positions (ValueError naming a knob that is off)."""
        scale = 2 ** (len(self.config.block_out_channels) - 1)
        return tiling.tile_grid(self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor, scale)

    def _sliced(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return tiling.sliced(fn, x) if self.use_slicing and x.shape[0] > 1 else fn(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents in channels_last; images no larger than a tile go untiled, as in AutoencoderKL."""
        if self.use_tiling and x.dim() == 4 and max(x.shape[2:]) > self.tile_sample_min_size:
            return self._tiled_encode(x)
        return self._encoder(x)

    def _encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(_channels_last(x)))

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.tile_grid()
        return tiling.tiled_map(
            self._encoder, x, grid.tile * grid.scale, grid.stride * grid.scale, keep=grid.stride, blend=grid.overlap
        )

    def _quantize(
        self, h: torch.Tensor, force_not_quantize: bool, shape: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(channels_last quantized latent, commit_loss) for the whole of ``h``."""
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(_channels_last(h))
            return quant, commit_loss
        quant = _channels_last(self._look_up(h, shape) if self.config.lookup_from_codebook else h)
        return quant, h.new_zeros(h.shape[0])

    def _decode(self, quant: torch.Tensor) -> torch.Tensor:
        """The image of a quantized latent; latents no larger than a tile go untiled, as in AutoencoderKL."""
        if self.use_tiling and quant.dim() == 4 and max(quant.shape[2:]) > self.tile_latent_min_size:
            return self._tiled_decode(quant)
        return self._decoder(quant)

    def _decoder(self, quant: torch.Tensor) -> torch.Tensor:
        """MoVQ's decoder is conditioned on ``quant`` itself: a tile gets its own crop of it."""
        return self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)

    def _tiled_decode(self, quant: torch.Tensor) -> torch.Tensor:
        grid = self.tile_grid()
        keep, blend = grid.stride * grid.scale, grid.overlap * grid.scale
        return tiling.tiled_map(self._decoder, quant, grid.tile, grid.stride, keep=keep, blend=blend)

    def _look_up(self, h: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """The NCHW latent of codebook indices ``h``, checked first so that float latents (decode called as
        without lookup_from_codebook) get an error naming ``h`` rather than a reshape error."""
        if h.is_floating_point() or h.is_complex():
            raise TypeError(f"with lookup_from_codebook, h must hold integer codebook indices, got {h.dtype}")
        if shape is None:
            raise ValueError("with lookup_from_codebook, decode needs shape=(batch, height, width, vq_embed_dim)")
        return self.quantize.get_codebook_entry(h, shape)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Encode, quantize and decode ``sample``: ``DecoderOutput(sample, commit_loss)``."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)

    @classmethod
    def from_diffusers(cls, model: diffusers.VQModel) -> "VQModel":
        """A vqfast VQModel with ``model``'s config and a copy of its weights (same devices and dtypes)."""
        return _convert(model, cls)

    def to_diffusers(self) -> diffusers.VQModel:
        """A ``diffusers.VQModel`` with this model's config and a copy of its weights."""
        return _convert(self, diffusers.VQModel)


def _encoder_output(h: torch.Tensor, x: torch.Tensor, return_dict: bool) -> VQEncoderOutput | tuple[torch.Tensor]:
    h = h.contiguous(memory_format=memory_format(x))
    return VQEncoderOutput(latents=h) if return_dict else (h,)


def _decoder_output(
    dec: torch.Tensor, commit_loss: torch.Tensor, h: torch.Tensor, return_dict: bool
) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
    """The image in the memory format of the latents ``h`` it was decoded from."""
    dec = dec.contiguous(memory_format=memory_format(h))
    return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)


def _weights_channels_last(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: tensors in the checkpoints' (contiguous) layout, as diffusers' model gives
    them and as safetensors' save_file requires."""
    for key, value in state_dict.items():
        if not value.is_contiguous():
            state_dict[key] = value.contiguous()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last, the layout every convolution and norm inside the model runs in (the fastest for
    oneDNN and cuDNN convolutions alike), as the convolution weights are. Other ranks (a bad input, left
    to the first convolution's error) pass as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _convert(model: ModelMixin, cls: type[Model]) -> Model:
    """``cls`` built from ``model``'s config, with a copy of each of its tensors (device, dtype and layout
    kept), its train/eval mode and its parameters' requires_grad."""
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        converted = cls.from_config(model.config)
    converted.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    converted.train(model.training)
    source = dict(model.named_parameters())
    for name, param in converted.named_parameters():
        param.requires_grad_(source[name].requires_grad)
    return converted
