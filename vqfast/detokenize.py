"""Decode VQ codes back to images: one PNG per image id, to check a tokenize run or to look at a prior's samples.

CODES is a folder of safetensors files (a ``vqfast tokenize`` output) or one file. Each file holds a tensor
"codes" of integer codebook indices (images, h, w); the image ids come from the file's metadata as tokenize
writes it, else they are ``<file name>-<index>``. Image ``id`` goes to ``OUTPUT/<id>.png`` (a source image
``cats/001.jpg`` decodes to ``cats/001.jpg.png``). Codes a tokenize run wrote are decoded only with the model
whose weights wrote them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import safetensors
import torch
from PIL import Image
from tqdm import tqdm

import vqfast
from vqfast.tokenize import DTYPES, load_model, pick_device, shard_metadata, weights_sha256

SUMMARY = "decode VQ codes (a tokenize output or a prior's samples) back to PNG images"
EPILOG = """examples:
  vqfast detokenize codes/ decoded/ --model CompVis/ldm-celebahq-256 --subfolder vqvae
  vqfast detokenize samples.safetensors samples/ --model ./vqvae --device cuda --dtype bfloat16"""


def decode_codes(model: vqfast.VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Images (n, H, W, out_channels) uint8 of codebook indices ``codes`` (n, h, w): the codebook rows,
    decoded as the quantized latent (a ``lookup_from_codebook`` model looks them up itself)."""
    n, h, w = codes.shape
    shape = (n, h, w, model.quantize.embedding.weight.shape[1])
    codes = codes.long()
    if model.config.lookup_from_codebook:
        sample = model.decode(codes, force_not_quantize=True, shape=shape).sample
    else:
        sample = model.decode(model.quantize.get_codebook_entry(codes, shape), force_not_quantize=True).sample
    return sample.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _files(codes: Path) -> list[Path]:
    if codes.is_file():
        return [codes]
    files = sorted(codes.glob("*.safetensors")) if codes.is_dir() else []
    if not files:
        raise ValueError(f"codes {codes} is neither a .safetensors file nor a folder holding some")
    return files


def detokenize(
    codes: str | Path,
    output_dir: str | Path,
    model: str,
    *,
    subfolder: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> list[Path]:
    """Decodes every image of ``codes`` (a file or folder, see the module's doc) to a PNG under
    ``output_dir``; returns their paths. ``dtype``: the decoder's autocast precision."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    files, output_dir = _files(Path(codes)), Path(output_dir).resolve()
    vq = load_model(model, subfolder)
    weights = weights_sha256(vq)
    device_, autocast_dtype = pick_device(device), DTYPES[dtype]
    vq.to(device_)
    num_codes = vq.quantize.embedding.weight.shape[0]
    written = []
    for file in files:
        with safetensors.safe_open(str(file), "pt") as shard:
            if "codes" not in shard.keys():
                raise ValueError(f"{file} holds no tensor named 'codes'")
            indices = shard.get_tensor("codes")
        metadata = shard_metadata(file)
        if indices.dim() != 3 or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"{file}: codes must be integer codebook indices (images, h, w), got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        if indices.numel() and not 0 <= indices.min() <= indices.max() < num_codes:
            raise ValueError(f"{file}: codes must lie in [0, {num_codes}), the model's codebook, got "
                             f"[{indices.min()}, {indices.max()}]")
        tokenized_by = metadata.get("run", {}).get("model", {}).get("weights_sha256", weights)
        if tokenized_by != weights:
            raise ValueError(f"{file} was tokenized by another model (weights sha256 {tokenized_by}, this model's: "
                             f"{weights})")
        ids = metadata.get("ids") or [f"{file.name}-{i:06d}" for i in range(len(indices))]
        paths = [(output_dir / f"{image_id}.png").resolve() for image_id in ids]
        if any(not path.is_relative_to(output_dir) for path in paths):
            raise ValueError(f"{file}: an image id leads outside the output folder {output_dir}")
        for start in tqdm(range(0, len(ids), batch_size), desc=file.name, unit="batch", disable=not progress):
            with torch.inference_mode(), torch.autocast(device_.type, autocast_dtype,
                                                        enabled=autocast_dtype != torch.float32):
                images = decode_codes(vq, indices[start : start + batch_size].to(device_)).numpy()
            for path, image in zip(paths[start : start + batch_size], images):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
                written.append(path)
    return written


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (a parent parser shared by ``vqfast detokenize`` and ``python -m vqfast.detokenize``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("codes", metavar="CODES", help="a tokenize output folder, or a .safetensors file of codes")
    parser.add_argument("output_dir", metavar="OUTPUT", help="folder for the PNG images")
    parser.add_argument("--model", required=True, help="local diffusers VQModel folder or hub id")
    parser.add_argument("--subfolder", help="the VQModel's folder inside --model, e.g. vqvae or movq in a pipeline")
    parser.add_argument("--batch-size", type=int, default=16, help="images per decode (default: 16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the decoder's autocast precision "
                        "(default: float32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m vqfast.detokenize") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG, parents=[arguments()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        detokenize(**vars(args))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
