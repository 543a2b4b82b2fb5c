"""Turn a folder tree of images into VQ codes: safetensors shards and a JSON manifest beside them.

Every file under the input folder is listed (POSIX paths relative to it: the image ids) in sorted order;
those Pillow opens by their extension are the images, cut in that order into shards of --shard-size. An
image is decoded (EXIF orientation applied; alpha composited over white; L, P, CMYK and other modes
converted to RGB), its shorter side resized to --resize (bicubic) and center-cropped to --crop x --crop,
encoded, and its latents' nearest codebook rows are its codes (what the model's quantizer gives).

Output folder:
  shard-KKKKK-of-NNNNN.safetensors  "codes": (images, h, w) int16 (int32 past 32768 codes); the metadata
                                    key "vqfast" holds JSON: the image ids (in the codes' order), the
                                    shard's skipped and converted images, and the run (below)
  manifest.json                     the run (model config, weights hash, options, input listing), the
                                    shards' image counts and latent shapes, skipped and converted images

The output is deterministic (the same bytes for the same inputs, model, options and software, whatever
the number of processes or workers). A shard is written to a temporary name and renamed when complete, so
a killed run loses at most the shards in progress; running the same command again skips the finished
shards. A folder holding another run (other weights, options or inputs) is refused.

Several processes (torchrun, multi-node included, with an output folder all of them see) share the shards
not yet finished, in order, round-robin: the i-th goes to rank i % world size. Each rank writes its own;
rank 0 writes the manifest once all are done. On the CPU each process uses cores / processes-per-node
threads; on CUDA, the GPU of its local rank.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import vqfast
from vqfast.ops import nearest_code

SUMMARY = "encode a folder of images to VQ codes (safetensors shards + manifest.json)"
EPILOG = """examples:
  vqfast tokenize images/ codes/ --model CompVis/ldm-celebahq-256 --subfolder vqvae
  vqfast tokenize images/ codes/ --model ./movq --resize 256 --dtype bfloat16 --device cuda
  torchrun --nproc_per_node=8 --no-python vqfast tokenize images/ codes/ --model ./vqvae
  torchrun --nproc_per_node=8 -m vqfast.tokenize images/ codes/ --model ./vqvae
  (add --nnodes, --node-rank and --rdzv-* for several nodes; the output folder must be shared)
Run the same command again to resume an interrupted run."""

FORMAT = "vqfast-codes/1"
MANIFEST = "manifest.json"
METADATA_KEY = "vqfast"  # one metadata key: safetensors writes several in a random order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTENSIONS = frozenset(ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)
WEIGHTS_HASH = (
    "sha256 over the model's state_dict in sorted key order: for each tensor its key, dtype and shape as UTF-8 "
    "text (NUL-terminated), then its bytes (contiguous, native byte order)"
)
WHITE = (255, 255, 255, 255)


def code_dtype(num_codes: int) -> torch.dtype:
    """The narrowest signed integer type holding indices below ``num_codes``: int16 up to 32768 codes."""
    return torch.int16 if num_codes <= 2**15 else torch.int32


def list_inputs(root: Path) -> tuple[list[str], dict[str, str]]:
    """Every file under ``root`` (sorted POSIX paths relative to it): the images, and the other files with
    why they are not read."""
    if not root.is_dir():
        raise ValueError(f"input folder {root} does not exist or is not a folder")
    files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    if not files:
        raise ValueError(f"input folder {root} is empty")
    images = [f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    others = {f: f"not an image: Pillow opens no {Path(f).suffix or 'extensionless'} files" for f in files
              if Path(f).suffix.lower() not in IMAGE_EXTENSIONS}
    if not images:
        raise ValueError(f"input folder {root} holds no images ({len(others)} other files, e.g. {next(iter(others))})")
    return images, others


def load_image(path: Path, resize: int, crop: int) -> tuple[np.ndarray, str | None]:
    """The (crop, crop, 3) uint8 RGB pixels of the image at ``path`` (shorter side resized to ``resize``, then
    center-cropped), and its original mode when it was not RGB. Raises what Pillow raises for unreadable
    or truncated files."""
    with Image.open(path) as image:
        image.draft(None, (resize, resize))  # JPEG: decode at a reduced scale, still at least resize
        image.load()
        image = ImageOps.exif_transpose(image)
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    converted = None if image.mode == "RGB" and not transparent else image.mode + " with alpha" * transparent
    if transparent:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    image = image.convert("RGB")
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(resize, round(width * scale)), max(resize, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return np.array(image.crop((left, top, left + crop, top + crop))), converted


class Batch(NamedTuple):
    """Consecutive images of one shard, as a DataLoader worker prepared them."""

    first: int  # the global index of the batch's first image (read or not)
    indices: list[int]  # those read, in order
    pixels: torch.Tensor | None  # (len(indices), crop, crop, 3) uint8, None when none was read
    skipped: dict[int, str]  # index -> why
    converted: dict[int, str]  # index -> original mode


class Images(Dataset):
    """Image ``i`` of the sorted listing -> ``(i, pixels or None, why it was skipped or its original mode)``."""

    def __init__(self, root: Path, ids: list[str], resize: int, crop: int) -> None:
        self.root, self.ids, self.resize, self.crop = root, ids, resize, crop

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            pixels, mode = load_image(self.root / self.ids[index], self.resize, self.crop)
        except Exception as error:  # any file Pillow cannot decode is skipped and listed, with the reason
            return index, None, f"{type(error).__name__}: {error}"
        return index, torch.from_numpy(pixels), mode


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    read = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return Batch(
        first=items[0][0],
        indices=[index for index, _ in read],
        pixels=torch.stack([pixels for _, pixels in read]) if read else None,
        skipped={index: note for index, pixels, note in items if pixels is None},
        converted={index: note for index, pixels, note in items if pixels is not None and note is not None},
    )


def load_model(model: str, subfolder: str | None = None) -> vqfast.VQModel:
    """The VQModel of a local diffusers folder or a hub id, in eval mode, float32 on the CPU; anything else
    (an AutoencoderKL: no quantizer, no codes) gets a ValueError."""
    where = f"{model!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        config = vqfast.VQModel.load_config(model, subfolder=subfolder)
    except OSError as error:
        raise ValueError(
            f"cannot read the model config of {where}: {error}. A pipeline's VQ-VAE is in a subfolder: "
            "--subfolder vqvae (LDM, VQ-Diffusion, aMUSEd) or movq (Kandinsky)"
        ) from error
    kind = config.get("_class_name", "VQModel")
    if kind != "VQModel":
        raise ValueError(f"model {where} is a {kind}, not a VQModel: it has no quantizer, so it gives no codes")
    # low_cpu_mem_usage=False: what diffusers falls back to without accelerate, minus its warning.
    loaded = vqfast.VQModel.from_pretrained(model, subfolder=subfolder, low_cpu_mem_usage=False)
    return loaded.eval().requires_grad_(False)


def weights_sha256(model: torch.nn.Module) -> str:
    """The model's weights hash (see WEIGHTS_HASH)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_config(model: vqfast.VQModel) -> dict[str, Any]:
    """The model's config as JSON gives it back (lists, not tuples), without diffusers' private keys."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def read_shard(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """A shard's codes (images, h, w) and its image ids, in the same order."""
    with safetensors.safe_open(str(path), "pt") as shard:
        return shard.get_tensor("codes"), shard_metadata(path)["ids"]


def shard_metadata(path: str | Path) -> dict[str, Any]:
    """A shard's ``vqfast`` metadata (run, ids, skipped, converted); {} for a safetensors file that has none."""
    with safetensors.safe_open(str(path), "pt") as shard:
        return json.loads((shard.metadata() or {}).get(METADATA_KEY, "{}"))


def _shard_names(count: int) -> list[str]:
    return [f"shard-{k:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _differences(stored: Any, current: Any, key: str = "") -> list[str]:
    """``key: stored there, current here`` for every leaf where two runs differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for k in sorted(stored.keys() | current.keys()) for d in
                _differences(stored.get(k), current.get(k), f"{key}.{k}" if key else k)]
    return [] if stored == current else [f"{key}: {json.dumps(stored)} there, {json.dumps(current)} here"]


def _finished(output: Path, run: dict[str, Any], names: list[str]) -> set[int]:
    """The shards of this run that ``output`` already holds; a ValueError when it holds anything else."""
    if not output.exists():
        return set()
    if not output.is_dir():
        raise ValueError(f"output {output} is not a folder")
    ours = {*names, MANIFEST, *(name + ".tmp" for name in (*names, MANIFEST))}
    finished = set()
    for path in sorted(output.iterdir()):
        if path.name.endswith(".tmp") and path.name in ours:
            continue  # a killed run's unfinished file: overwritten when its shard is written
        if path.name == MANIFEST:
            stored = json.loads(path.read_text()).get("run")
        elif path.suffix == ".safetensors" and path.is_file():
            stored = shard_metadata(path).get("run")
        else:
            stored = None
        if stored is None:
            raise ValueError(f"output folder {output} holds {path.name}, which is no file of a tokenize run: use a new "
                             "folder, or delete it")
        if stored != run:
            raise ValueError(
                f"output folder {output} holds a different run ({path.name}): {'; '.join(_differences(stored, run))}."
                " Use another output folder, or delete this one to start over"
            )
        if path.name in names:
            finished.add(names.index(path.name))
    return finished


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` in ``path``, complete or not at all: written to ``<path>.tmp``, synced, renamed."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash of the machine
    finally:
        os.close(directory)


def _write_shard(path: Path, codes: torch.Tensor, metadata: dict[str, Any]) -> None:
    data = safetensors.torch.save({"codes": codes}, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    _write_atomically(path, data)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(device: str | None) -> torch.device:
    """``device``, by default CUDA when there is one; a CUDA device without an index is the local rank's GPU."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolved


def _join_process_group(device: torch.device) -> bool:
    """Joins torchrun's process group (environment RANK, WORLD_SIZE, MASTER_ADDR...; gloo on the CPU, nccl on
    CUDA) when launched by it with several processes and no group exists; True when it created one."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    # A rank done with its shards waits at the barrier for the others' last ones: hours on a CPU, not 30 minutes.
    timeout = datetime.timedelta(days=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def tokenize(
    input_dir: str | Path,
    output_dir: str | Path,
    model: str,
    *,
    subfolder: str | None = None,
    resize: int | None = None,
    crop: int | None = None,
    batch_size: int = 16,
    shard_size: int = 1024,
    num_workers: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Codes of every image under ``input_dir`` in shards under ``output_dir`` (see the module's doc); returns
    the manifest. ``model``: a local diffusers folder or a hub id (``subfolder`` in it); ``resize``: the
    shorter side (default: the model's sample_size); ``crop``: the square's side (default: ``resize``);
    ``num_workers``: DataLoader processes decoding images (default: min(8, cores per process)); ``dtype``:
    the encoder's autocast precision (the codebook search accumulates in float32 whatever it is).
    Under torchrun, every process calls it and each returns the manifest."""
    for name, value in (("resize", resize), ("crop", crop), ("batch_size", batch_size), ("shard_size", shard_size)):
        _positive(name, value)
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if output_dir.is_relative_to(input_dir):
        raise ValueError(f"output folder {output_dir} must not be inside the input folder {input_dir}")
    device_ = pick_device(device)
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device_.type == "cpu" and "LOCAL_WORLD_SIZE" in os.environ:
        torch.set_num_threads(max(1, _cores() // processes_per_node))  # torchrun's default is 1 thread
    created = _join_process_group(device_)
    try:
        images, others = list_inputs(input_dir)
        vq = load_model(model, subfolder)
        if vq.config.in_channels != 3:
            raise ValueError(f"model {model!r} takes {vq.config.in_channels} channels; images give 3 (RGB)")
        resize = resize or vq.config.sample_size
        crop = crop or resize
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        run = {
            "format": FORMAT,
            "model": {"config": model_config(vq), "weights_sha256": weights_sha256(vq)},
            "options": {"resize": resize, "crop": crop, "batch_size": batch_size, "shard_size": shard_size,
                        "dtype": dtype, "device": device_.type},
            "inputs": {"files": len(images) + len(others),
                       "listing_sha256": hashlib.sha256("\n".join(sorted([*images, *others])).encode()).hexdigest()},
        }
        names = _shard_names(-(-len(images) // shard_size))
        finished = _finished(output_dir, run, names)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if world > 1:  # every rank must see the same run and the same finished shards (a shared folder)
            views: list[Any] = [None] * world
            dist.all_gather_object(views, (run, sorted(finished)))
            if any(view != views[0] for view in views):
                raise ValueError("the processes disagree on the run or on the finished shards: each must load the "
                                 "same model and inputs, and all must write to one shared output folder")
        if rank == 0 and len(names) < world:
            warnings.warn(f"{len(names)} shards for {world} processes: a smaller --shard-size gives each some work")
        output_dir.mkdir(parents=True, exist_ok=True)
        pending = [k for k in range(len(names)) if k not in finished]
        mine = pending[rank::world]
        vq.to(device_)
        workers = min(8, max(1, _cores() // processes_per_node)) if num_workers is None else num_workers
        with torch.inference_mode():
            latent_hw = list(vq.encode(torch.zeros(0, 3, crop, crop, device=device_)).latents.shape[2:])
        _encode_shards(vq, Images(input_dir, images, resize, crop), mine, names, output_dir, run, latent_hw,
                       batch_size, shard_size, workers, device_, DTYPES[dtype],
                       (progress and rank == 0) and ("tokenize" if world == 1 else f"tokenize, rank 0 of {world}"))
        if world > 1:
            dist.barrier()
        manifest = _manifest(output_dir, run, names, others, model, subfolder, input_dir, latent_hw)
        if rank == 0:
            _write_atomically(output_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest
    finally:
        if created:
            dist.destroy_process_group()


def _encode_shards(
    model: vqfast.VQModel,
    dataset: Images,
    shards: list[int],
    names: list[str],
    output_dir: Path,
    run: dict[str, Any],
    latent_hw: list[int],
    batch_size: int,
    shard_size: int,
    workers: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: str | bool,
) -> None:
    """Encodes ``shards`` in order, in batches that never straddle two, and writes each once its last batch is done;
    ``progress``: the bar's title, or False."""
    spans = {k: range(k * shard_size, min((k + 1) * shard_size, len(dataset))) for k in shards}
    batches = [list(span[i : i + batch_size]) for span in spans.values() for i in range(0, len(span), batch_size)]
    if not batches:
        return
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    codebook = model.quantize.embedding.weight
    index_dtype = code_dtype(codebook.shape[0])
    parts: dict[int, list[tuple[Batch, torch.Tensor]]] = {k: [] for k in shards}
    left = {k: -(-len(span) // batch_size) for k, span in spans.items()}
    bar = tqdm(total=sum(map(len, spans.values())), unit="img", disable=not progress, desc=progress or None)
    for batch in loader:
        shard = batch.first // shard_size
        codes = torch.empty((0, *latent_hw), dtype=index_dtype)
        if batch.pixels is not None:
            x = batch.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
            with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                latents = model.encode(x).latents
            codes = nearest_code(latents.float(), codebook).to(index_dtype).cpu()
        parts[shard].append((batch, codes))
        left[shard] -= 1
        if left[shard] == 0:
            done, ids = parts.pop(shard), dataset.ids
            _write_shard(
                output_dir / names[shard],
                torch.cat([codes for _, codes in done]),
                {
                    "run": run,
                    "ids": [ids[i] for b, _ in done for i in b.indices],
                    "skipped": {ids[i]: why for b, _ in done for i, why in b.skipped.items()},
                    "converted": {ids[i]: mode for b, _ in done for i, mode in b.converted.items()},
                },
            )
        bar.update(len(batch.indices) + len(batch.skipped))
    bar.close()


def _manifest(
    output_dir: Path,
    run: dict[str, Any],
    names: list[str],
    others: dict[str, str],
    model: str,
    subfolder: str | None,
    input_dir: Path,
    latent_hw: list[int],
) -> dict[str, Any]:
    shards, skipped, converted = [], dict(others), {}
    num_codes = run["model"]["config"]["num_vq_embeddings"]
    for name in names:
        metadata = shard_metadata(output_dir / name)
        count = len(metadata["ids"])
        shards.append({"file": name, "images": count, "latent_shape": [count, *latent_hw]})
        skipped.update(metadata["skipped"])
        converted.update(metadata["converted"])
    return {
        "format": FORMAT,
        "run": run,
        "weights_hash": WEIGHTS_HASH,
        "source": {"input": str(input_dir), "model": model, "subfolder": subfolder},
        "codes": {"tensor": "codes", "dtype": str(code_dtype(num_codes)).removeprefix("torch."),
                  "num_codes": num_codes, "latent_shape": latent_hw},
        "images": sum(shard["images"] for shard in shards),
        "shards": shards,
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
    }


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (a parent parser, shared by ``vqfast tokenize`` and ``python -m vqfast.tokenize``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("input_dir", metavar="INPUT", help="folder of images, searched recursively (jpg, png, webp "
                        "and whatever else Pillow opens); ids are paths relative to it")
    parser.add_argument("output_dir", metavar="OUTPUT", help="folder for the shards and manifest.json: new, or "
                        "one this command started (it resumes)")
    parser.add_argument("--model", required=True, help="local diffusers VQModel folder or hub id")
    parser.add_argument("--subfolder", help="the VQModel's folder inside --model, e.g. vqvae or movq in a pipeline")
    parser.add_argument("--resize", type=int, help="shorter side after resizing, bicubic (default: the model's "
                        "sample_size)")
    parser.add_argument("--crop", type=int, help="side of the center square cropped after resizing (default: --resize)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default: 1024)")
    parser.add_argument("--num-workers", type=int, help="DataLoader processes decoding images beside the model "
                        "(default: min(8, cores per process); 0: in the main process)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun, "
                        "cuda is the local rank's GPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the encoder's autocast precision "
                        "(default: float32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m vqfast.tokenize") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG, parents=[arguments()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        tokenize(**vars(args))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
