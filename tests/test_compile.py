"""torch.compile(fullgraph=True) over encode and decode: vqfast's model and ops trace without a graph break."""

import torch


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
