"""Peak memory of vqfast's encode and decode against diffusers' with the same weights: never above it
beyond a small slack. Measured with torch.profiler's allocation records (every allocation and free of
torch's CPU allocator, in order), which are deterministic, unlike the resident-set high-water mark that
benchmarks/ reads for its peak_extra_mib (glibc keeps and reuses freed memory)."""

from collections.abc import Callable, Iterator

import pytest
import torch

import vqfast

# Group norm, no attention: the resnet blocks are what is measured. Their largest activation, at the
# first level, is 32 channels x 128 x 128 float32 = 2 MiB (conv1's output kept alive through conv2,
# issue 11, made vqfast's encode peak one such map above diffusers': 1.4 MiB here, 128 MiB at 512x512
# on ldm-celebahq-256).
CONFIG = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "num_vq_embeddings": 64,
    "mid_block_add_attention": False,
}
SIZE = 128
LARGEST_ACTIVATION = 32 * SIZE * SIZE * 4
# Room for allocations that differ in size but not in kind (norm statistics, another convolution
# algorithm's workspace); an activation kept alive too long is four times this.
SLACK = LARGEST_ACTIVATION // 4


def peak_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """The most memory torch's CPU allocator held at once during ``fn()`` beyond what it held before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The allocator's records as torch.autograd.profiler reads them: "[memory]" events of signed sizes.
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak


@pytest.fixture(params=["native", "torch"])
def ops_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """The model on the kernels users get on the CPU, and on the reference (auto's fallback)."""
    status = vqfast.backends()[request.param]
    if not status.available:
        pytest.skip(f"the {request.param} backend is unavailable: {status.reason}")
    with vqfast.use_backend(request.param):
        yield


@pytest.mark.parametrize("stage", ["encode", "decode"])
@torch.no_grad()
def test_peak_memory_not_above_diffusers(stage, make_pair, ops_backend):
    ref, ours = make_pair(CONFIG)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    h = ref.encode(x).latents
    run = {"encode": lambda model: model.encode(x).latents, "decode": lambda model: model.decode(h).sample}[stage]
    peaks = {}
    for name, model in (("diffusers", ref), ("vqfast", ours)):
        run(model)  # warm up: one-time allocations (weight layouts, kernel tables) stay out of the peak
        peaks[name] = peak_bytes(lambda: run(model))
    assert peaks["diffusers"] > LARGEST_ACTIVATION  # the records were read
    mib = {name: f"{peak / 2**20:.2f} MiB" for name, peak in peaks.items()}
    assert peaks["vqfast"] <= peaks["diffusers"] + SLACK, mib
