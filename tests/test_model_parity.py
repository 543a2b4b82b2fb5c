"""vqfast.VQModel against diffusers.VQModel on every public configuration, with the same random weights.

Float32 throughout; the core comparisons run on the backend ``auto`` picks here and on the ``torch``
reference. Outputs must match within the contract's 1e-5 relative to the reference's largest value, or
the reference's own float32 noise where that is larger (see ``output_rtol``); quantization indices must
be equal, or differ only at near-ties (see ``assert_same_or_near_tie``).
"""

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import vqfast

BATCH, SIZE = 2, 32
CONTRACT_RTOL = 1e-5
# With random weights, the deep GroupNorm decoders (ldm, vq-diffusion) turn a single float32 rounding of
# their input into changes of 8e-6 of the output's largest value: any other summation order anywhere (a
# fused norm, another convolution algorithm) lands near 1e-5. So whole-model outputs may also differ by
# this many times the reference's response to one rounding of its input (measured per configuration).
NOISE_FACTOR = 4
# Near-tie: both codes' exact squared distances agree within this fraction of the distances' scale
# (|z|^2 + |c|^2), far above float32 rounding (~1e-7) and far below the gaps of a spread codebook.
NEAR_TIE = 1e-5
# Gradients sum float32 rounding over every pixel and batch element, so they get 1e-4 relative to each
# tensor's largest value (the worst seen is 2e-5). Some gradients are zero analytically and rounding
# noise in practice (to_k.bias: softmax ignores a score added to every key; a conv bias that a GroupNorm
# of one channel per group removes); so the scale is never below 1% of the model's largest gradient.
GRAD_RTOL = 1e-4
GRAD_SCALE_FLOOR = 1e-2
# float64 rounding (1e-16) amplified as the float32 bounds above allow: outputs and gradients alike.
FLOAT64_RTOL = 1e-10


def images(config: dict, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, config.get("in_channels", 3), size, size, generator=generator)


def assert_same_or_near_tie(z: torch.Tensor, codebook: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """True when the indices are equal; otherwise asserts that each differing pair is a float64 near-tie."""
    assert ours.dtype == ref.dtype == torch.int64 and ours.shape == ref.shape == (z.numel() // z.shape[1],)
    differ = (ours != ref).nonzero().flatten()
    if not len(differ):
        return True
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[differ].double()
    cb = codebook.double()

    def distance(idx: torch.Tensor) -> torch.Tensor:
        return (rows - cb[idx[differ]]).square().sum(1)

    scale = rows.square().sum(1) + cb.square().sum(1).max()
    gap = (distance(ours) - distance(ref)).abs() / scale
    assert (gap <= NEAR_TIE).all(), f"indices differ beyond near-ties at {differ.tolist()}: gaps {gap.tolist()}"
    return False


@contextlib.contextmanager
def lookup_from_codebook(enabled: bool, *models: torch.nn.Module) -> Iterator[None]:
    """Set the decode mode ``lookup_from_codebook`` (a config flag that changes no weight) for a while."""
    before = [model.config.lookup_from_codebook for model in models]
    for model in models:
        model.register_to_config(lookup_from_codebook=enabled)
    try:
        yield
    finally:
        for model, value in zip(models, before):
            model.register_to_config(lookup_from_codebook=value)


@pytest.fixture(scope="module")
def output_rtol(pair) -> float:
    """max(contract, NOISE_FACTOR x the reference decoder's change when its input is rounded once more)."""
    ref, _ = pair
    with torch.no_grad(), lookup_from_codebook(False, ref):
        z_q = ref.quantize(ref.encode(images(ref.config)).latents)[0]
        rounding = 1 + 2**-24 * torch.randn(z_q.shape, generator=torch.Generator().manual_seed(0))
        sample = ref.decode(z_q, force_not_quantize=True).sample
        rounded = ref.decode(z_q * rounding, force_not_quantize=True).sample
    noise = ((rounded - sample).abs().max() / sample.abs().max()).item()
    return max(CONTRACT_RTOL, NOISE_FACTOR * noise)


@pytest.fixture(params=["auto", "torch"])
def model_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The model as a user gets it (auto: the fastest measured backend here) and on the reference ops."""
    with vqfast.use_backend(request.param):
        yield request.param


def test_state_dict_keys_and_shapes(pair):
    ref, ours = pair
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")
    }


@torch.no_grad()
def test_encode_decode_forward(config, pair, output_rtol, assert_matches, model_backend):
    ref, ours = pair
    x = images(config)

    h = ref.encode(x).latents
    assert_matches(ours.encode(x).latents, h, msg="encode")
    assert ours.encode(x, return_dict=False)[0].shape == h.shape

    # Quantize path: indices, z_q, loss, then the decoded image.
    z_q, _, (perplexity, min_encodings, indices) = ours.quantize(h)
    ref_z_q, _, (_, _, ref_indices) = ref.quantize(h)
    assert perplexity is None and min_encodings is None
    if assert_same_or_near_tie(h, ref.quantize.embedding.weight, indices, ref_indices):
        expected = ref.decode(h)
        assert torch.equal(z_q, ref_z_q)  # z + (q - z) in float32, bit for bit
    else:  # judge the decode at our (equally near) choice of codes
        expected = ref.decode(z_q, force_not_quantize=True)
        expected.commit_loss = (1 + ref.quantize.beta) * F.mse_loss(z_q, h)
    out = ours.decode(h)
    assert_matches(out.sample, expected.sample, rtol=output_rtol, msg="decode")
    assert out.commit_loss.shape == ()
    assert_matches(out.commit_loss, expected.commit_loss, msg="commit_loss")

    # force_not_quantize: the latents go to the decoder as they are; commit_loss is zeros of shape (B,).
    # (With lookup_from_codebook, force_not_quantize takes indices instead: test_lookup_from_codebook.)
    with lookup_from_codebook(False, ours, ref):
        out = ours.decode(h, force_not_quantize=True)
        expected = ref.decode(h, force_not_quantize=True)
    assert_matches(out.sample, expected.sample, rtol=output_rtol, msg="decode(force_not_quantize)")
    assert torch.equal(out.commit_loss, expected.commit_loss) and out.commit_loss.shape == (BATCH,)

    sample, commit_loss = ours(x, return_dict=False)
    expected = ref(x)
    assert_matches(sample, expected.sample, rtol=output_rtol, msg="forward")
    assert_matches(commit_loss, expected.commit_loss, msg="forward commit_loss")


@torch.no_grad()
def test_lookup_from_codebook(config, pair, output_rtol, assert_matches):
    """decode(indices, force_not_quantize=True, shape=(B, h, w, C)) as aMUSEd calls it, whether or not the
    configuration sets lookup_from_codebook."""
    ref, ours = pair
    h = ref.encode(images(config)).latents
    batch, channels, height, width = h.shape
    shape = (batch, height, width, channels)
    indices = torch.randint(0, config["num_vq_embeddings"], (batch, height, width), generator=torch.Generator())

    entry = ours.quantize.get_codebook_entry(indices.flatten(), shape)
    assert torch.equal(entry, ref.quantize.get_codebook_entry(indices.flatten(), shape))
    assert torch.equal(ours.quantize.get_codebook_entry(indices, None), ref.quantize.get_codebook_entry(indices, None))

    with lookup_from_codebook(True, ours, ref):
        out = ours.decode(indices, force_not_quantize=True, shape=shape)
        expected = ref.decode(indices, force_not_quantize=True, shape=shape)
    assert_matches(out.sample, expected.sample, rtol=output_rtol, msg="decode(indices)")
    assert torch.equal(out.commit_loss, expected.commit_loss)  # int64 zeros: diffusers uses h's dtype


def test_lookup_errors_name_the_argument(tiny_configs):
    """Float latents where decode (lookup_from_codebook) or get_codebook_entry take indices, and shapes that
    do not fit the indices or the codebook, get errors naming the argument (diffusers names the dtype)."""
    model = vqfast.VQModel(**tiny_configs["group"], lookup_from_codebook=True)
    channels = model.config.latent_channels
    indices = torch.randint(0, model.config.num_vq_embeddings, (2, 4, 4))
    shape = (2, 4, 4, channels)
    with pytest.raises(TypeError, match=r"h must hold integer codebook indices, got torch.float32"):
        model.decode(torch.randn(2, channels, 4, 4), force_not_quantize=True, shape=shape)
    with pytest.raises(ValueError, match=r"decode needs shape="):
        model.decode(indices, force_not_quantize=True)
    get_codebook_entry = model.quantize.get_codebook_entry
    with pytest.raises(TypeError, match=r"indices must hold integer codebook indices, got torch.float16"):
        get_codebook_entry(indices.half(), shape)
    for wrong in ((2, 4, 4, channels + 1), (2, 4, 5, channels), (2, 16, channels)):
        with pytest.raises(ValueError, match=r"shape must be \(batch, height, width, 4\)"):
            get_codebook_entry(indices.flatten(), wrong)
    assert get_codebook_entry(indices.flatten(), list(shape)).shape == (2, channels, 4, 4)


def training_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One step's loss (reconstruction + commitment), its indices and every parameter's gradient."""
    model.zero_grad()
    h = model.encode(x).latents
    _, _, (_, _, indices) = model.quantize(h.detach())
    out = model.decode(h)
    loss = F.mse_loss(out.sample, x) + out.commit_loss
    loss.backward()
    return loss.detach(), indices, {name: p.grad for name, p in model.named_parameters()}


def assert_gradients_match(grads: dict, ref_grads: dict, assert_matches, rtol: float = GRAD_RTOL) -> None:
    assert grads.keys() == ref_grads.keys()
    floor = GRAD_SCALE_FLOOR * max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in grads.items():
        scale = max(ref_grads[name].abs().max().item(), floor)
        assert_matches(grad, ref_grads[name], rtol=rtol, scale=scale, msg=name)


def test_training_step_gradients(config, pair, assert_matches, model_backend):
    ref, ours = pair
    x = images(config)
    ref_loss, ref_indices, ref_grads = training_step(ref, x)
    loss, indices, grads = training_step(ours, x)
    assert torch.equal(indices, ref_indices), "a near-tie in this seed's quantization: pick another seed"
    assert_matches(loss, ref_loss, msg="loss")
    assert_gradients_match(grads, ref_grads, assert_matches)


@pytest.mark.parametrize("act_fn", ["gelu", "swish"])
def test_other_activations(act_fn, tiny_config, make_pair, assert_matches):
    """act_fn other than silu: norm, then diffusers' activation module; "swish" is SiLU, fused."""
    ref, ours = make_pair({**tiny_config, "act_fn": act_fn})
    x = images(tiny_config)
    ref_loss, _, ref_grads = training_step(ref, x)
    loss, _, grads = training_step(ours, x)
    assert_matches(loss, ref_loss)
    assert_gradients_match(grads, ref_grads, assert_matches)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [False, True])
def test_vector_quantizer(legacy, sane_index_shape, assert_matches):
    """The quantizer alone: outputs, index shape, and gradients to z and to the codebook (where beta goes
    depends on ``legacy``)."""
    from diffusers.models.autoencoders.vae import VectorQuantizer as RefQuantizer

    from vqfast.models.quantizer import VectorQuantizer

    torch.manual_seed(0)
    ref = RefQuantizer(32, 4, beta=0.25, legacy=legacy, sane_index_shape=sane_index_shape)
    ours = VectorQuantizer(32, 4, beta=0.25, legacy=legacy, sane_index_shape=sane_index_shape)
    bound = 1 / 32
    assert ours.embedding.weight.min() >= -bound and ours.embedding.weight.max() <= bound
    with torch.no_grad():
        ref.embedding.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    z = torch.randn(2, 4, 3, 5)

    def run(quantizer: torch.nn.Module) -> dict[str, torch.Tensor]:
        z_in = z.clone().requires_grad_()
        z_q, loss, (_, _, indices) = quantizer(z_in)
        (z_q.square().sum() + loss).backward()
        return {
            "z_q": z_q,
            "loss": loss,
            "indices": indices,
            "grad_z": z_in.grad,
            "grad_codebook": quantizer.embedding.weight.grad,
        }

    got, expected = run(ours), run(ref)
    assert got["indices"].shape == ((2, 3, 5) if sane_index_shape else (30,))
    assert torch.equal(got["indices"], expected["indices"]) and torch.equal(got["z_q"], expected["z_q"])
    for name in ("loss", "grad_z", "grad_codebook"):
        assert_matches(got[name], expected[name], msg=name)


def test_float64(tiny_config, make_pair, assert_matches):
    """A float64 model, converted from a float64 diffusers model or made with .double(), runs where
    diffusers does and matches it to float64 rounding, gradients included (auto passes float64 on to
    a backend that has it)."""
    ref, ours = make_pair(tiny_config)
    ref, ours = ref.double(), ours.double()
    converted = vqfast.VQModel.from_diffusers(ref)
    assert ours.dtype == converted.dtype == torch.float64
    x = images(tiny_config, size=16)[:1].double()  # float64 convolutions are slow on the CPU
    ref_loss, ref_indices, ref_grads = training_step(ref, x)
    loss, indices, grads = training_step(converted, x)
    assert torch.equal(indices, ref_indices)
    assert_matches(loss, ref_loss, rtol=FLOAT64_RTOL)
    assert_gradients_match(grads, ref_grads, assert_matches, rtol=FLOAT64_RTOL)
    with torch.no_grad():
        out, expected = ours(x), ref(x)
    assert out.sample.dtype == out.commit_loss.dtype == torch.float64
    assert_matches(out.sample, expected.sample, rtol=FLOAT64_RTOL)
    assert_matches(out.commit_loss, expected.commit_loss, rtol=FLOAT64_RTOL)


@torch.no_grad()
def test_empty_batch(public_config, make_pair):
    """Batch 0 gives empty outputs of the right shapes: MoVQ (every op, the spatial norm included) as
    diffusers gives them, and with attention too, where diffusers' attention cannot reshape 0 elements."""
    movq = public_config("tiny-random-kandinsky-v22-decoder-movq")
    without_attention = {
        **movq,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "mid_block_add_attention": False,
    }
    for config, diffusers_runs in ((without_attention, True), (movq, False)):
        ref, ours = make_pair(config)
        x = images(config, size=16)
        h = ours.encode(x).latents
        assert ours.encode(x[:0]).latents.shape == (0, *h.shape[1:])
        for force_not_quantize in (False, True):
            out = ours.decode(h[:0], force_not_quantize=force_not_quantize)
            assert out.sample.shape == (0, *ours.decode(h).sample.shape[1:])
            # the mean of no elements is NaN (the quantizer's loss), as in diffusers; otherwise zeros of shape (0,)
            assert out.commit_loss.isnan().item() if not force_not_quantize else out.commit_loss.shape == (0,)
            if diffusers_runs:
                expected = ref.decode(h[:0], force_not_quantize=force_not_quantize)
                assert out.sample.shape == expected.sample.shape and out.sample.dtype == expected.sample.dtype
                assert out.commit_loss.shape == expected.commit_loss.shape
        assert ours(x[:0]).sample.shape == x[:0].shape


@torch.no_grad()
def test_autocast_bfloat16(tiny_config, make_pair):
    """Under autocast vqfast's norms keep bfloat16 where diffusers' upcast to float32, so the two agree
    to bfloat16 precision (not bit for bit; a near-tie code may flip, so decode is compared unquantized),
    and the float32 codebook promotes the latents in the quantizer as diffusers' arithmetic does."""
    ref, ours = make_pair(tiny_config)
    x = images(tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, ref_h = ours.encode(x).latents, ref.encode(x).latents
        got, expected = ours.decode(ref_h, force_not_quantize=True).sample, ref.decode(ref_h, force_not_quantize=True).sample
        z_q, ref_z_q = ours.quantize(ref_h)[0], ref.quantize(ref_h)[0]
    assert (got.dtype, z_q.dtype) == (expected.dtype, ref_z_q.dtype)
    for ours_t, ref_t in ((h, ref_h), (got, expected)):
        torch.testing.assert_close(ours_t.float(), ref_t.float(), rtol=0, atol=0.05 * ref_t.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("input_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_channels_last(input_format, tiny_config, make_pair, assert_matches):
    """Whatever the input's memory format, every convolution runs channels_last, and the outputs come in
    the input's format with diffusers' values."""
    ref, ours = make_pair(tiny_config)
    x = images(tiny_config)
    x_cl = x.to(memory_format=input_format)

    def assert_channels_last(module, inputs):
        assert inputs[0].is_contiguous(memory_format=torch.channels_last), module

    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [conv.register_forward_pre_hook(assert_channels_last) for conv in convs]
    try:
        h = ours.encode(x_cl).latents
        out = ours.decode(h)
        forward = ours(x_cl)
    finally:
        for handle in handles:
            handle.remove()
    for output in (h, out.sample, forward.sample):
        assert output.is_contiguous(memory_format=input_format)
    ref_h = ref.encode(x).latents
    assert_matches(h, ref_h, msg="encode")
    assert_matches(out.sample, ref.decode(h).sample, msg="decode")
    assert_matches(ours.decode(h, force_not_quantize=True).sample, ref.decode(h, force_not_quantize=True).sample)
    assert_matches(forward.sample, ref(x).sample, msg="forward")


def test_channels_last_training_step(tiny_config, make_pair, assert_matches):
    ref, ours = make_pair(tiny_config)
    x = images(tiny_config)
    _, _, ref_grads = training_step(ref, x)
    _, _, grads = training_step(ours, x.to(memory_format=torch.channels_last))
    assert_gradients_match(grads, ref_grads, assert_matches)


def test_gradient_checkpointing(tiny_config, make_pair):
    """enable_gradient_checkpointing() checkpoints the encoder's and decoder's blocks and the mid blocks'
    last resnets, as diffusers does, and recomputation gives the very same gradients."""
    _, ours = make_pair(tiny_config)
    x = images(tiny_config)
    _, _, expected = training_step(ours, x)

    calls = []

    def checkpoint(module, *args):
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    ours.enable_gradient_checkpointing(checkpoint)
    _, _, grads = training_step(ours, x)
    enc, dec = ours.encoder, ours.decoder
    checkpointed = [*enc.down_blocks, enc.mid_block, dec.mid_block, *dec.up_blocks]
    checkpointed += [enc.mid_block.resnets[1], dec.mid_block.resnets[1]]  # nested, as in diffusers
    assert {id(m) for m in calls} == {id(m) for m in checkpointed}
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name

    calls.clear()
    ours.disable_gradient_checkpointing()
    training_step(ours, x)
    assert not calls
