"""Codebook training (vqfast.models.codebook_training and VectorQuantizer's enable_* / kmeans_init_), each rule
against a plain PyTorch reference written here from the published formulas, on one process.

The references restate vector-quantize-pytorch's EuclideanCodebook (vector_quantize_pytorch.py, 1.x):
``ema_inplace`` (``old.lerp_(new, 1 - decay)``) of ``cluster_size`` and ``embed_avg``, ``laplace_smoothing``
(``(x + eps) / (x.sum() + K eps)``, times ``x.sum()`` at its call), ``embed = embed_avg / smoothed``, and
``replace`` (``cluster_size = reset_cluster_size``, ``embed_avg = sampled * reset_cluster_size``); they
are also VQ-VAE's (appendix A.1) and Sonnet's VectorQuantizerEMA. The one-hot matrices and cdist live in
the references only. The deliberate differences (initial EMA state, rank 0's restart draws) are in the
docstrings of VectorQuantizer.enable_ema and enable_dead_code_restart; the DDP side is test_codebook_ddp.py.
"""

import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast.models import codebook_training as rules
from vqfast.models.quantizer import VectorQuantizer

K, D = 16, 4


def latents(seed: int, batch: int = 2, size: int = 6) -> torch.Tensor:
    """NCHW latents (batch, D, size, size) in channels_last, as VQModel hands them to its quantizer."""
    z = torch.randn(batch, D, size, size, generator=torch.Generator().manual_seed(seed))
    return z.contiguous(memory_format=torch.channels_last)


def rows_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def quantizer(seed: int = 0) -> VectorQuantizer:
    """A quantizer whose codes have the latents' spread (diffusers' uniform(-1/K, 1/K) init puts every
    code near the origin, where nearest-code choices are near-ties)."""
    vq = VectorQuantizer(K, D, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(K, D, generator=torch.Generator().manual_seed(100 + seed)))
    return vq


# --- plain PyTorch references -----------------------------------------------------------------------------


def reference_assign(rows: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices, counts and sums through the N x K distance and one-hot matrices."""
    onehot = F.one_hot(torch.cdist(rows, codebook).argmin(1), codebook.shape[0]).float()
    return onehot.argmax(1), onehot.sum(0), onehot.T @ rows


def reference_ema_step(codebook, ema_count, ema_sum, rows, decay, eps):
    """One EMA step: ``decay * old + (1 - decay) * new`` (VQ-VAE's form), Laplace smoothing, means."""
    _, counts, sums = reference_assign(rows, codebook)
    ema_count = decay * ema_count + (1 - decay) * counts
    ema_sum = decay * ema_sum + (1 - decay) * sums
    total = ema_count.sum()
    smoothed = (ema_count + eps) / (total + codebook.shape[0] * eps) * total
    return ema_sum / smoothed[:, None], ema_count, ema_sum


def reference_perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """VQ-VAE's / taming's: the one-hot's mean, ``exp(-sum(p * log(p + 1e-10)))``."""
    p = F.one_hot(indices, num_codes).float().mean(0)
    return torch.exp(-torch.sum(p * torch.log(p + 1e-10)))


def reference_kmeans(rows: torch.Tensor, means: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vector-quantize-pytorch's ``kmeans`` after its sampling: argmin of cdist, bincount, mean of each
    bucket, empty buckets keep their mean."""
    for _ in range(iters):
        _, bins, sums = reference_assign(rows, means)
        means = torch.where(bins[:, None] == 0, means, sums / bins.clamp(min=1)[:, None])
    return means, bins


# --- the rules alone --------------------------------------------------------------------------------------


def test_ema_update_and_codebook_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    ema_count, ema_sum = torch.rand(K, generator=g) * 5, torch.randn(K, D, generator=g)
    counts, sums = torch.randint(0, 9, (K,), generator=g).float(), torch.randn(K, D, generator=g)
    counts[3] = 0  # an unused code: its mean must not divide by zero
    decay, eps = 0.9, 1e-5
    expected_count, expected_sum = decay * ema_count + (1 - decay) * counts, decay * ema_sum + (1 - decay) * sums
    rules.ema_update_(ema_count, ema_sum, counts, sums, decay)
    torch.testing.assert_close(ema_count, expected_count)
    torch.testing.assert_close(ema_sum, expected_sum)
    total = expected_count.sum()
    smoothed = (expected_count + eps) / (total + K * eps) * total
    torch.testing.assert_close(rules.laplace_smoothed(ema_count, eps), smoothed)
    torch.testing.assert_close(rules.ema_codebook(ema_count, ema_sum, eps), expected_sum / smoothed[:, None])
    assert torch.isclose(rules.laplace_smoothed(ema_count, eps).sum(), total)  # smoothing keeps the total


def test_usage_is_bincount_and_perplexity():
    indices = torch.tensor([0, 0, 1, 3, 3, 3, 7, 0])
    histogram, ppl = rules.usage(indices, 8)
    assert histogram.tolist() == F.one_hot(indices, 8).sum(0).tolist()
    torch.testing.assert_close(ppl, reference_perplexity(indices, 8), rtol=1e-6, atol=0)
    assert rules.perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)  # uniform: K
    assert rules.perplexity(torch.tensor([0, 9, 0])).item() == 1.0  # one code
    assert rules.perplexity(torch.zeros(3, dtype=torch.long)).isnan()  # empty batch, like its loss


def test_draw_rows_distinct_and_seeded():
    rows = torch.arange(40.0).view(20, 2)
    draw = rules.draw_rows(rows, 20, torch.Generator().manual_seed(3))
    assert sorted(draw[:, 0].tolist()) == rows[:, 0].tolist()  # a permutation: every row once
    again = rules.draw_rows(rows, 20, torch.Generator().manual_seed(3))
    assert torch.equal(draw, again)
    few = rules.draw_rows(rows[:3], 8, torch.Generator().manual_seed(3))  # fewer rows than draws: repeats
    assert few.shape == (8, 2) and set(few[:, 0].tolist()) <= {0.0, 2.0, 4.0}


def test_restart_resets_the_ema_state_with_the_code():
    """vector-quantize-pytorch's ``replace``: a dead code takes the sampled vector, its count the reset size
    (the threshold) and its sum the vector times it (their issue #222: forgetting the sum)."""
    g = torch.Generator().manual_seed(1)
    codebook, ema_sum = torch.randn(K, D, generator=g), torch.randn(K, D, generator=g)
    ema_count = torch.rand(K, generator=g) * 4
    candidates = torch.randn(K, D, generator=g)
    threshold = 2.0
    dead = ema_count < threshold
    expected = codebook.clone(), ema_count.clone(), ema_sum.clone()
    expected[0][dead], expected[1][dead], expected[2][dead] = candidates[dead], threshold, candidates[dead] * threshold
    restarted = rules.restart_dead_codes_(codebook, ema_count, ema_sum, candidates, threshold)
    assert torch.equal(restarted, dead) and 0 < dead.sum() < K
    for got, want in zip((codebook, ema_count, ema_sum), expected):
        assert torch.equal(got, want)
    torch.testing.assert_close(ema_sum[dead] / ema_count[dead, None], codebook[dead])
    assert not rules.restart_dead_codes_(codebook, ema_count, ema_sum, candidates, 10.0, allowed=False).any()


def test_lloyd_matches_kmeans_on_the_distance_matrix():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(K, D, generator=g) * 4
    batches = [centres[torch.randint(0, K, (50,), generator=g)] + 0.3 * torch.randn(50, D, generator=g) for _ in "ab"]
    start = torch.cat(batches)[:K].clone()
    centroids, counts = rules.lloyd(batches, start, iters=5)
    expected, expected_counts = reference_kmeans(torch.cat(batches), start, iters=5)
    torch.testing.assert_close(centroids, expected)
    assert torch.equal(counts, expected_counts)


# --- the quantizer ----------------------------------------------------------------------------------------


def test_defaults_unchanged():
    vq = quantizer()
    assert set(vq.state_dict()) == {"embedding.weight"} and vq.embedding.weight.requires_grad
    before = vq.embedding.weight.clone()
    z_q, loss, (perplexity, min_encodings, indices) = vq(latents(0))
    assert perplexity is None and min_encodings is None and indices.shape == (72,)
    assert torch.equal(vq.embedding.weight, before) and vq.usage is None


def test_ema_step_matches_reference_and_trains_z_only():
    vq = quantizer()
    vq.enable_ema(decay=0.9, eps=1e-5)
    assert set(vq.state_dict()) == {"embedding.weight", "ema_count", "ema_sum"}
    assert not vq.embedding.weight.requires_grad
    codebook, ema_count, ema_sum = vq.embedding.weight.clone(), vq.ema_count.clone(), vq.ema_sum.clone()
    torch.testing.assert_close(ema_sum / ema_count[:, None], codebook)  # consistent from the start
    plain = quantizer()
    for step in range(3):
        z = latents(step).requires_grad_()
        z_q, loss, (_, _, indices) = vq(z)
        # The quantization used the codebook before the update: the same outputs as without EMA.
        expected_z_q, expected_loss, (_, _, expected_indices) = plain(z)
        assert torch.equal(indices, expected_indices) and torch.equal(z_q, expected_z_q)
        torch.testing.assert_close(loss, expected_loss)
        (z_q.square().sum() + loss).backward()  # the in-place update did not touch what backward reads
        grad = z.grad.clone()
        z.grad = None
        (expected_z_q.square().sum() + expected_loss).backward()
        torch.testing.assert_close(grad, z.grad)
        assert vq.embedding.weight.grad is None

        codebook, ema_count, ema_sum = reference_ema_step(codebook, ema_count, ema_sum, rows_of(z.detach()), 0.9, 1e-5)
        torch.testing.assert_close(vq.embedding.weight, codebook)
        torch.testing.assert_close(vq.ema_count, ema_count)
        torch.testing.assert_close(vq.ema_sum, ema_sum)
        with torch.no_grad():
            plain.embedding.weight.copy_(vq.embedding.weight)


def test_no_update_in_eval_mode():
    vq = quantizer()
    vq.enable_ema()
    vq.enable_dead_code_restart(threshold=100.0)
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(latents(0))
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())


def test_restarts_draw_batch_vectors_seeded():
    """Every code is below a threshold of 100 vectors per step: each restarts at a distinct vector of the
    batch, its EMA state consistent with it; the same seed gives the same draws."""
    runs = []
    for _ in range(2):
        vq = quantizer()
        vq.enable_ema(decay=0.9)
        vq.enable_dead_code_restart(threshold=100.0, seed=7)
        z = latents(3)
        vq(z)
        runs.append(vq.embedding.weight.clone())
        assert vq.restarted.all()
        batch_rows = {tuple(r) for r in rows_of(z).tolist()}
        assert {tuple(r) for r in vq.embedding.weight.tolist()} <= batch_rows
        assert len({tuple(r) for r in vq.embedding.weight.tolist()}) == K  # distinct: 72 rows >= 16 codes
        assert torch.equal(vq.ema_count, torch.full((K,), 100.0))
        torch.testing.assert_close(vq.ema_sum / vq.ema_count[:, None], vq.embedding.weight)
    assert torch.equal(runs[0], runs[1])


def test_restart_only_below_threshold():
    vq = quantizer()
    vq.enable_ema(decay=0.5)
    vq.enable_dead_code_restart(threshold=0.6)
    z = latents(4)
    _, counts, _ = reference_assign(rows_of(z), vq.embedding.weight.detach())
    vq(z)
    # ema_count = 0.5 * 1 + 0.5 * n_k: below 0.6 exactly for the codes the batch did not use.
    assert torch.equal(vq.restarted, counts == 0) and vq.restarted.any()


def test_kmeans_init_matches_reference_and_sets_ema_state():
    vq = quantizer()
    vq.enable_ema()
    batches = [latents(10 + i, batch=1, size=8) for i in range(2)]
    vq.kmeans_init_(batches, iters=4, seed=5)
    rows = torch.cat([rows_of(z) for z in batches])
    start = rules.draw_rows(rows, K, torch.Generator().manual_seed(5))
    expected, bins = reference_kmeans(rows, start, iters=4)
    torch.testing.assert_close(vq.embedding.weight, expected)
    torch.testing.assert_close(vq.ema_count, bins / 2)  # vectors per step: two batches
    used = bins > 0
    torch.testing.assert_close(vq.ema_sum[used] / vq.ema_count[used, None], vq.embedding.weight[used])


def test_usage_tracking_fills_perplexity():
    vq = quantizer()
    vq.sane_index_shape = True
    vq.enable_usage_tracking()
    vq.eval()  # usage is reported in eval mode too
    z = latents(5)
    _, _, (perplexity, min_encodings, indices) = vq(z)
    assert indices.shape == (2, 6, 6) and min_encodings is None
    assert torch.equal(vq.usage.histogram, torch.bincount(indices.flatten(), minlength=K))
    torch.testing.assert_close(perplexity, reference_perplexity(indices.flatten(), K), rtol=1e-6, atol=0)


def test_deterministic_mode_repeats_bit_for_bit():
    results = []
    with torch.random.fork_rng():
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                vq = quantizer()
                vq.enable_ema()
                vq.kmeans_init_([latents(20)], iters=2)
                vq.enable_dead_code_restart(threshold=1.0, seed=1)
                for step in range(3):
                    vq(latents(step))
                results.append(torch.cat([vq.embedding.weight, vq.ema_sum, vq.ema_count[:, None]], 1))
        finally:
            torch.use_deterministic_algorithms(False)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda vq: vq.enable_ema(decay=1.0), ValueError),
        (lambda vq: vq.enable_ema(eps=0.0), ValueError),
        (lambda vq: vq.enable_ema(decay="0.9"), TypeError),
        (lambda vq: vq.enable_dead_code_restart(), ValueError),  # before enable_ema
        (lambda vq: vq.kmeans_init_([latents(0)], iters=0), ValueError),
        (lambda vq: vq.kmeans_init_([]), ValueError),
        (lambda vq: vq.kmeans_init_([torch.randn(2, D + 1, 3, 3)]), ValueError),
    ],
)
def test_bad_arguments(call, error):
    with pytest.raises(error):
        call(quantizer())


def test_vq_model_trains_and_round_trips_with_ema(tiny_configs, tmp_path):
    """The opt-in on a whole model: a few training steps (the decoder and encoder by their gradients, the
    codebook by EMA and restarts), then the EMA state through state_dict and save_pretrained."""
    torch.manual_seed(0)
    model = vqfast.VQModel(**tiny_configs["group"])
    x = torch.randn(2, 3, 32, 32)
    vq = model.quantize
    vq.enable_ema()
    with torch.no_grad():
        vq.kmeans_init_([model.encode(x).latents], iters=3)
    vq.enable_dead_code_restart(threshold=1.0)
    vq.enable_usage_tracking()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        out = model(x)
        (F.mse_loss(out.sample, x) + out.commit_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert vq.usage.perplexity > 1 and vq.restarted is not None
    assert {"quantize.ema_count", "quantize.ema_sum"} <= set(model.state_dict())

    model.save_pretrained(tmp_path)
    loaded = vqfast.VQModel.from_pretrained(tmp_path)
    assert "quantize.ema_count" not in loaded.state_dict()  # off unless enabled, as everywhere
    loaded.quantize.enable_ema()
    loaded.load_state_dict(model.state_dict())
    saved, restored = model.state_dict(), loaded.state_dict()
    for key in ("quantize.embedding.weight", "quantize.ema_count", "quantize.ema_sum"):
        assert torch.equal(restored[key], saved[key]), key
