"""Train a tiny VQ-VAE (vqfast.VQModel) on generated images and compare how it uses its codebook:
trained by its gradient (diffusers' way), by EMA, by EMA with dead-code restarts, and with k-means
initialisation too. A couple of minutes on a 2-core CPU:

    python examples/train_tiny_vqvae.py            # 300 steps per variant
    python examples/train_tiny_vqvae.py --steps 100 --variants gradient ema+restarts

The images are a few soft coloured blobs on a coloured background (32 x 32), made by a seeded generator; the
model has two 16/32-channel levels (16 x 16 latents of 4 channels) and 128 codes. Every 100 steps it prints
the training batch's perplexity; at the end, per variant, the reconstruction error on held-out images, the
perplexity of their codes and how many codes they never use (dead).
"""

import argparse
import time

import torch
import torch.nn.functional as F

import vqfast

CONFIG = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "num_vq_embeddings": 128,
    "mid_block_add_attention": False,
}
VARIANTS = ("gradient", "ema", "ema+restarts", "ema+restarts+kmeans")


def blobs(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` images (3, size, size) in [-1, 1]: a background colour and three Gaussian blobs of random
    centre, width and colour."""
    coords = torch.linspace(0, 1, size)
    y, x = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    images = torch.rand(count, 3, 1, 1, generator=generator).expand(count, 3, size, size).clone()
    for _ in range(3):
        cy, cx = (torch.rand(count, 1, 1, 1, generator=generator) for _ in range(2))
        width = 0.05 + 0.15 * torch.rand(count, 1, 1, 1, generator=generator)
        colour = torch.rand(count, 3, 1, 1, generator=generator)
        weight = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width**2))
        images = images * (1 - weight) + colour * weight
    return images * 2 - 1


def make_model(variant: str, first_batches: list[torch.Tensor], seed: int) -> vqfast.VQModel:
    torch.manual_seed(seed)
    model = vqfast.VQModel(**CONFIG)
    vq = model.quantize
    if variant.startswith("ema"):
        vq.enable_ema(decay=0.99)
    if "kmeans" in variant:
        with torch.no_grad():
            vq.kmeans_init_([model.encode(x).latents for x in first_batches], iters=10)
    if "restarts" in variant:
        vq.enable_dead_code_restart(threshold=1.0)
    vq.enable_usage_tracking()
    return model


def evaluate(model: vqfast.VQModel, images: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        sample = model(images).sample
    histogram = model.quantize.usage.histogram
    model.train()
    return {
        "mse": F.mse_loss(sample, images).item(),
        "perplexity": model.quantize.usage.perplexity.item(),
        "dead": int((histogram == 0).sum()),
    }


def train(variant: str, data: torch.Tensor, held_out: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    g = torch.Generator().manual_seed(args.seed)
    batch_of = lambda: data[torch.randint(len(data), (args.batch,), generator=g)]  # noqa: E731
    first_batches = [batch_of() for _ in range(4)]
    model = make_model(variant, first_batches, args.seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    restarts = torch.zeros((), dtype=torch.long)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = batch_of()
        out = model(x)
        loss = F.mse_loss(out.sample, x) + out.commit_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if model.quantize.restarted is not None:
            restarts += model.quantize.restarted.sum()
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"  {variant:20s} step {step:4d}  loss {loss.item():.4f}  batch perplexity "
                f"{model.quantize.usage.perplexity.item():6.1f}  restarts so far {int(restarts)}",
                flush=True,
            )
    seconds = time.perf_counter() - started
    return {**evaluate(model, held_out), "restarts": int(restarts), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    g = torch.Generator().manual_seed(1234)
    data, held_out = blobs(2048, 32, g), blobs(256, 32, g)
    results = {}
    for variant in args.variants:
        results[variant] = train(variant, data, held_out, args)

    codes = CONFIG["num_vq_embeddings"]
    print(f"\nheld-out images: {len(held_out)}, codebook: {codes} codes; after {args.steps} steps of batch {args.batch}")
    print(f"{'variant':20s} {'recon mse':>10s} {'perplexity':>11s} {'dead codes':>11s} {'restarts':>9s} {'seconds':>8s}")
    for variant, r in results.items():
        print(
            f"{variant:20s} {r['mse']:10.4f} {r['perplexity']:11.1f} {r['dead']:>6d}/{codes:<4d} "
            f"{r['restarts']:9d} {r['seconds']:8.1f}"
        )


if __name__ == "__main__":
    main()
