"""Masked IP-Adapter (core/ip_adapter.py) with a tiny random image encoder and IP-Adapter written
here in the real files' layouts: the processor at attention level, generation on the demo model
and the tiny SDXL, weight 0, the U-Net restored, and the errors."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from core.attention import MaskedCrossAttention
from core.collage import Collage, CollageError, Layer, appearance_mode
from core.generate import StepContext, generate
from core.ip_adapter import (
    IPAdapterWeights,
    MaskedIPAdapter,
    MaskedIPAdapterProcessor,
    encoder_input,
    load_ip_adapter,
    release_ip_adapters,
)
from core.ip_adapter_files import IPAdapterError, IPAdapterFiles, describe_image_encoder, describe_ip_adapter
from core.options import EngineOptions, build_hooks
from core.random_ip_adapter import (
    build_random_image_encoder,
    random_ip_adapter_state,
    random_plus_ip_adapter_state,
    save_image_encoder,
    save_ip_adapter,
)
from core.weight_files import WeightNames, read_weight_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    """The same tiny encoder as a ComfyUI-style single file and as a transformers folder."""
    folder = tmp_path_factory.mktemp("clip_vision")
    encoder = build_random_image_encoder(seed=0)
    return save_image_encoder(encoder, folder / "tiny-vit.safetensors"), save_image_encoder(
        encoder, folder / "tiny-vit"
    )


def adapter_file(model, path, scale=3.0, seed=0):
    return save_ip_adapter(random_ip_adapter_state(model.pipeline.unet, 24, seed=seed, scale=scale), path)


@pytest.fixture
def demo_files(demo_pipeline, encoder_files, tmp_path):
    return IPAdapterFiles(
        adapter_file(demo_pipeline, tmp_path / "ip-adapter_demo.safetensors"), encoder_files[0]
    )


def two_layer_collage(appearance="ip-adapter", weight=1.0, size=64, **overrides):
    box = np.zeros((size // 2, size // 2, 4), np.uint8)
    box[...] = (200, 30, 30, 255)
    box[::3] = (30, 30, 200, 255)
    leaf = np.zeros((size // 4, size // 4, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="a striped box and a green leaf",
        layers=[
            Layer("striped box", box, appearance=appearance, appearance_weight=weight),
            Layer("green leaf", leaf, offset=(3 * size // 4 - 4, 3 * size // 4 - 4)),
        ],
        width=size,
        height=size,
        steps=6,
        strength=0.9,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def run(model, collage, files):
    hooks, _ = build_hooks(model, collage, EngineOptions(ip_adapter=files))
    return generate(model, collage, hooks=hooks)


# --- attention level ------------------------------------------------------------------------------


def _ip_hook(name, k_ip, v_ip, masks, scales, cfg=False, tokens=None, uncond=None):
    weights = IPAdapterWeights(None, None, {name: k_ip}, {name: v_ip}, False)
    n = masks.shape[0]
    tokens = torch.randn(n, 4, 16) if tokens is None else tokens
    uncond = torch.randn(n, 4, 16) if uncond is None else uncond
    return MaskedIPAdapter(
        weights, tokens, uncond, {masks.shape[1]: masks.numpy()}, scales, layers=list(range(n)), cfg=cfg
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processor_adds_the_image_only_inside_each_mask(dtype):
    """Outside every IP layer's mask the output is the wrapped processor's byte for byte; inside
    each mask it moves, and two IP layers each move their own region only."""
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval().to(dtype)
    k_ip, v_ip = (torch.nn.Linear(16, 32, bias=False).to(dtype) for _ in range(2))
    pixels = 48
    x, text = torch.randn(2, pixels, 32, dtype=dtype), torch.randn(2, 7, 16, dtype=dtype)
    masks = torch.zeros(2, pixels)
    masks[0, 5:15] = 1.0
    masks[0, 15:18] = 0.5  # a soft edge
    masks[1, 30:40] = 1.0
    tokens, uncond = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    hook = _ip_hook("a", k_ip, v_ip, masks, [1.0, 2.0], True, tokens, uncond)
    outside = masks.sum(0) == 0
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x, text)
        out = MaskedIPAdapterProcessor(hook, AttnProcessor2_0(), "a")(attn, x, text)
        assert torch.equal(out[:, outside], stock[:, outside])
        for region in (slice(5, 18), slice(30, 40)):
            assert (out[:, region] != stock[:, region]).any(-1).all()
        # Layer 1 alone: layer 0's region is then the stock output too.
        only_1 = _ip_hook(
            "a", k_ip, v_ip, masks * torch.tensor([[0.0], [1.0]]), [1.0, 2.0], True, tokens, uncond
        )
        out_1 = MaskedIPAdapterProcessor(only_1, AttnProcessor2_0(), "a")(attn, x, text)
        assert torch.equal(out_1[:, 5:18], stock[:, 5:18])
        assert torch.allclose(out_1[:, 30:40].float(), out[:, 30:40].float(), atol=1e-2)
        # Self-attention calls and resolutions without masks are the wrapped processor's.
        self_attn = Attention(32, heads=4, dim_head=8).eval().to(dtype)
        assert torch.equal(
            MaskedIPAdapterProcessor(hook, AttnProcessor2_0(), "a")(self_attn, x),
            AttnProcessor2_0()(self_attn, x),
        )
        other = torch.randn(2, 12, 32, dtype=dtype)
        assert torch.equal(
            MaskedIPAdapterProcessor(hook, AttnProcessor2_0(), "a")(attn, other, text),
            AttnProcessor2_0()(attn, other, text),
        )


def test_processor_is_diffusers_ip_adapter_inside_a_full_mask():
    """With a mask of ones and scale s, the output is diffusers' `IPAdapterAttnProcessor2_0`'s
    (decoupled cross-attention, out = to_out(text_attn + s * ip_attn)); the unconditional rows
    of a guidance batch get the unconditional tokens."""
    torch.manual_seed(1)
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    reference = IPAdapterAttnProcessor2_0(
        hidden_size=32, cross_attention_dim=16, num_tokens=(4,), scale=0.7
    ).eval()
    x, text = torch.randn(2, 10, 32), torch.randn(2, 7, 16)
    tokens, uncond = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    hook = _ip_hook(
        "a", reference.to_k_ip[0], reference.to_v_ip[0], torch.ones(1, 10), [0.7], True, tokens, uncond
    )
    with torch.no_grad():
        out = MaskedIPAdapterProcessor(hook, AttnProcessor2_0(), "a")(attn, x, text)
        expected = reference(attn, x, (text, [torch.cat([uncond, tokens])]))
    assert torch.allclose(out, expected, atol=1e-5)


def test_processor_keeps_the_masked_attention_bias_for_the_text():
    """Wrapping masked cross-attention's processor: outside the IP mask the output is the masked
    (biased) text attention's exactly, and that differs from stock attention there."""
    torch.manual_seed(2)
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    pixels = 16
    x, text = torch.randn(1, pixels, 32), torch.randn(1, 7, 16)
    text_mask = np.zeros((1, pixels), np.float32)
    text_mask[0, :8] = 1.0
    masked = MaskedCrossAttention({pixels: text_mask}, [[2, 3]], [3.0], layers=[0], cfg=False)
    masked.on_step(StepContext(0, torch.tensor(900), 10.0))
    ip_masks = torch.zeros(1, pixels)
    ip_masks[0, 8:12] = 1.0
    k_ip, v_ip = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
    hook = _ip_hook("a", k_ip, v_ip, ip_masks, [1.0])
    with torch.no_grad():
        text_only = masked.processor(attn, x, text)
        out = MaskedIPAdapterProcessor(hook, masked.processor, "a")(attn, x, text)
        stock = AttnProcessor2_0()(attn, x, text)
    outside = ip_masks[0] == 0
    assert torch.equal(out[:, outside], text_only[:, outside])
    assert not torch.allclose(text_only[:, :8], stock[:, :8])  # the bias is there
    assert (out[:, 8:12] != text_only[:, 8:12]).any(-1).all()


# --- files ---------------------------------------------------------------------------------------


def test_files_are_described_and_the_encoder_loads_from_a_single_file(demo_pipeline, encoder_files, tmp_path):
    single, folder = encoder_files
    assert describe_image_encoder(single) == describe_image_encoder(folder)
    assert describe_image_encoder(single).projection_dim == 24
    for suffix in (".safetensors", ".bin"):
        path = adapter_file(demo_pipeline, tmp_path / f"a{suffix}")
        info = describe_ip_adapter(read_weight_names(path))
        assert (info.context_dim, info.image_embed_dim, info.layers, info.kind) == (32, 24, 6, "base")
        assert info.family is None  # 32 wide: no family's width
    unet = demo_pipeline.pipeline.unet
    images = torch.stack([encoder_input(np.full((5, 9, 4), 200, np.uint8), 32)])
    a = load_ip_adapter(IPAdapterFiles(tmp_path / "a.safetensors", single), unet, "cpu", torch.float32)
    b = load_ip_adapter(IPAdapterFiles(tmp_path / "a.bin", folder), unet, "cpu", torch.float32)
    for x, y in zip(a.image_tokens(images), b.image_tokens(images), strict=True):
        assert x.shape == (1, 4, 32)
        assert torch.allclose(x, y, atol=1e-6)


def test_encoder_input_crops_to_the_alpha_over_grey():
    image = np.zeros((40, 40, 4), np.uint8)
    image[10:20, 5:35] = (255, 0, 0, 255)  # a 30×10 red bar
    x = encoder_input(image, 30)
    grey = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(x[:, 0, 15], grey, atol=1e-3)  # padded above: grey
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(x[:, 15, 1], red, atol=1e-2)  # the bar fills the width


# --- generation ----------------------------------------------------------------------------------


def test_weight_zero_or_no_ip_layer_is_the_plain_path_exactly(demo_pipeline, demo_files):
    off = run(demo_pipeline, two_layer_collage("off"), None).images[0].image
    for collage in (two_layer_collage("ip-adapter", 0.0), two_layer_collage("off")):
        assert np.array_equal(run(demo_pipeline, collage, demo_files).images[0].image, off)
    # Weight 0 needs no IP-Adapter at all.
    assert np.array_equal(run(demo_pipeline, two_layer_collage("ip-adapter", 0.0), None).images[0].image, off)


def test_image_reaches_only_the_layer_region(demo_pipeline, demo_files, monkeypatch):
    """Through the real hook in a generation: at every cross-attention call, the IP part is 0
    outside the layer's mask and not inside; the first step's noise prediction moves mostly
    inside the layer (convolutions spread some of it); the image changes."""
    calls = []
    original = MaskedIPAdapterProcessor.__call__

    def recording(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        out = original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is not None:
            plain = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            calls.append((hidden_states.shape[1], (out - plain).abs().amax((0, 2))))
        return out

    monkeypatch.setattr(MaskedIPAdapterProcessor, "__call__", recording)
    eps = []
    unet = demo_pipeline.pipeline.unet
    handle = unet.register_forward_hook(lambda module, args, output: eps.append(output.sample.clone()))
    try:
        plain = run(demo_pipeline, two_layer_collage("off", size=128), demo_files).images[0].image
        result = (
            run(demo_pipeline, two_layer_collage("ip-adapter", 0.3, size=128), demo_files).images[0].image
        )
    finally:
        handle.remove()
    assert calls and {p for p, _ in calls} == {16 * 16, 8 * 8}
    for pixels, delta in calls:
        side = int(pixels**0.5)
        inside = torch.zeros(side, side, dtype=torch.bool)
        inside[: side // 2, : side // 2] = True  # the box covers the top-left quarter exactly
        delta = delta.view(side, side)
        assert torch.all(delta[~inside] == 0)
        assert torch.all(delta[inside] > 0)
    first_plain, first_ip = eps[0], eps[len(eps) // 2]  # the same number of steps each
    diff = (first_ip - first_plain).abs().mean((0, 1))
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[:8, :8] = True
    print("first-step |d eps| inside, outside:", diff[inside].mean().item(), diff[~inside].mean().item())
    assert diff[inside].mean() > 2 * diff[~inside].mean()
    assert not np.array_equal(result, plain)


def test_two_ip_layers_and_the_unet_back_as_it_was(demo_pipeline, demo_files):
    """Two IP layers in one job; afterwards the U-Net has the same processors, modules and
    weights, and the next plain job is byte-identical to one before it."""
    unet = demo_pipeline.pipeline.unet
    before_processors = dict(unet.attn_processors)
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_modules = [name for name, _ in unet.named_modules()]
    plain = generate(demo_pipeline, two_layer_collage("off")).images[0].image
    collage = two_layer_collage()
    collage.layers[1].appearance = "ip-adapter"
    one = run(demo_pipeline, two_layer_collage(), demo_files).images[0].image
    both = run(demo_pipeline, collage, demo_files).images[0].image
    assert not np.array_equal(both, one)
    after = dict(unet.attn_processors)
    assert after.keys() == before_processors.keys()
    assert all(after[k] is before_processors[k] for k in after)
    assert [name for name, _ in unet.named_modules()] == before_modules
    state = unet.state_dict()
    assert state.keys() == before_state.keys() and all(
        torch.equal(state[k], v) for k, v in before_state.items()
    )
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert np.array_equal(generate(demo_pipeline, two_layer_collage("off")).images[0].image, plain)
    release_ip_adapters()


def test_runs_on_tiny_sdxl(tiny_sdxl, encoder_files, tmp_path):
    files = IPAdapterFiles(adapter_file(tiny_sdxl, tmp_path / "ip-adapter_sdxl.bin"), encoder_files[1])
    plain = generate(tiny_sdxl, two_layer_collage("off", steps=3)).images[0].image
    result = run(tiny_sdxl, two_layer_collage(steps=3), files).images[0].image
    assert result.shape == (64, 64, 3)
    assert not np.array_equal(result, plain)
    release_ip_adapters()


def test_a_plus_adapter_reads_the_hidden_states(demo_pipeline, encoder_files, tmp_path):
    """A plus adapter (Resampler, `image_proj.latents`) loads through diffusers' conversion, makes
    16 tokens from the encoder's penultimate hidden states and conditions the layer."""
    unet = demo_pipeline.pipeline.unet
    path = save_ip_adapter(random_plus_ip_adapter_state(unet, 64, scale=3.0), tmp_path / "plus.safetensors")
    assert describe_ip_adapter(read_weight_names(path)).kind == "plus"
    files = IPAdapterFiles(path, encoder_files[0])
    weights = load_ip_adapter(files, unet, "cpu", torch.float32)
    assert weights.hidden_states
    tokens, uncond = weights.image_tokens(encoder_input(np.full((6, 6, 4), 255, np.uint8), 32)[None])
    assert tokens.shape == uncond.shape == (1, 16, 32) and not torch.allclose(tokens, uncond)
    plain = run(demo_pipeline, two_layer_collage("off"), files).images[0].image
    assert not np.array_equal(run(demo_pipeline, two_layer_collage(), files).images[0].image, plain)
    release_ip_adapters()


def test_faceid_adapters_are_refused_saying_why():
    names = WeightNames(
        {
            "image_proj.proj.0.weight": (1024, 512),
            "image_proj.perceiver_resampler.proj_in.weight": (768, 1280),
            "ip_adapter.1.to_k_ip.weight": (320, 768),
        }
    )
    with pytest.raises(IPAdapterError, match="FaceID"):
        describe_ip_adapter(names)


def test_errors_name_the_layer_field(demo_pipeline, tiny_sdxl, demo_files, encoder_files, tmp_path):
    collage = two_layer_collage()
    collage.layers.insert(0, Layer("hidden", np.zeros((4, 4, 4), np.uint8), visible=False))
    with pytest.raises(
        CollageError,
        match=r'layers\[1\]\.appearance: "ip-adapter" needs an IP-Adapter for Stable Diffusion 1.x',
    ):
        run(demo_pipeline, collage, None)
    # An adapter made for another U-Net (the tiny SDXL's, 80 wide) on the demo model.
    sdxl_adapter = adapter_file(tiny_sdxl, tmp_path / "ip-adapter_sdxl.safetensors")
    with pytest.raises(CollageError, match=r"layers\[1\]\.appearance: .*80-wide text features.* 32"):
        run(demo_pipeline, collage, IPAdapterFiles(sdxl_adapter, encoder_files[0]))
    # An encoder whose features are not what the adapter reads.
    wrong = save_ip_adapter(
        random_ip_adapter_state(demo_pipeline.pipeline.unet, 40), tmp_path / "w.safetensors"
    )
    with pytest.raises(CollageError, match=r"layers\[1\]\.appearance: .*reads 40-wide image embeddings"):
        run(demo_pipeline, collage, IPAdapterFiles(wrong, encoder_files[0]))
    not_adapter = tmp_path / "not.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(not_adapter))
    with pytest.raises(IPAdapterError, match="not an IP-Adapter"):
        describe_ip_adapter(read_weight_names(not_adapter))


def test_appearance_value():
    assert appearance_mode("ip-adapter") == "ip-adapter"
    bad = two_layer_collage("ipadapter")
    with pytest.raises(CollageError, match=r'layers\[0\] .*appearance: must be .*"ip-adapter"'):
        bad.validate()
