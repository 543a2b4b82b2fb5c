"""torch.compile(fullgraph=True) over encode and decode: vqfast's model and ops trace without a graph break."""

import torch

import vqfast


@torch.no_grad()
def test_compile_encode_decode_fullgraph(tiny_configs, make_pair, assert_matches):
    """Inductor, as users compile. The MoVQ configuration exercises every op: group_norm_act,
    spatial_norm_act and vector_quantize (decode's quantize path)."""
    _, model = make_pair(tiny_configs["spatial"])
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    encode = torch.compile(model.encode, fullgraph=True)
    decode = torch.compile(model.decode, fullgraph=True)

    h = encode(x).latents
    assert_matches(h, model.encode(x).latents)
    out = decode(h)
    expected = model.decode(h)
    assert_matches(out.sample, expected.sample)
    assert_matches(out.commit_loss, expected.commit_loss)


def test_compile_vector_quantize_stats_fullgraph():
    """``return_stats=True`` traces as one op, forward and backward: eager's outputs and gradients, and
    counts and sums without gradient."""
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2, 4, 6, 6, generator=g), torch.randn(16, 4, generator=g)

    def step(z, codebook):
        z_q, loss, indices, counts, sums = vqfast.ops.vector_quantize(z, codebook, return_stats=True)
        return z_q, loss, indices, counts, sums

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaves = [z.clone().requires_grad_(), codebook.clone().requires_grad_()]
        z_q, loss, indices, counts, sums = fn(*leaves)
        assert not counts.requires_grad and not sums.requires_grad
        (z_q.square().sum() + loss).backward()
        results.append([z_q, loss, indices, counts, sums, *(leaf.grad for leaf in leaves)])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
