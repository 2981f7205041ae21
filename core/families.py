"""What differs between model families, in one place: SD 1.x, SD 2.x and SDXL.

The engine's pieces (prompt encoding, the denoising loop, masked attention, textual inversion,
ControlNet, sizes, loading) ask the family of the loaded model instead of testing for SDXL
themselves. A family is an instance of a small class: `StableDiffusionFamily` (one CLIP text
encoder, the U-Net sees its last hidden states) or `StableDiffusionXLFamily` (two encoders whose
penultimate hidden states are concatenated, plus the pooled text embedding and six `time_ids` as
extra conditioning). A later family (Flux, say) is one more class and one more entry in `FAMILIES`.

Families are told apart from a model's own files, never from its name: a diffusers folder by its
`model_index.json` and component configs, a single checkpoint by its weight names
(`checkpoint_family`); `core/assets/configs/<config_name>/` ships each family's configuration so
that a single file loads with no network at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from krita_plugin.collage_diffusion import wire_sizes

from .prompt_encoding import EncoderReading, PromptChunks, chunk_prompt, encode_chunks, paired
from .prompt_syntax import weighted_text

CONFIGS_DIR = Path(__file__).parent / "assets" / "configs"


class UnsupportedModelError(ValueError):
    """A model of a family (or a variant) the engine does not run; the message names what it is."""


@dataclass
class PromptConditioning:
    """A prompt encoded for the U-Net: the context for cross-attention and, for families that
    have it, extra per-sample conditioning (SDXL: pooled text embedding and `time_ids`)."""

    cond: torch.Tensor  # (1, tokens, context_dim)
    uncond: torch.Tensor | None  # the negative prompt's, None without classifier-free guidance
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # each (1, ...)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Context and extra conditioning for n latents, as the CFG batch [uncond × n, cond × n]."""
        embeds = self.cond.expand(n, -1, -1)
        added = {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()}
        if self.uncond is not None:
            embeds = torch.cat([self.uncond.expand(n, -1, -1), embeds])
            added = {
                k: torch.cat([self.added_uncond[k].expand(n, *v.shape[1:]), v]) for k, v in added.items()
            }
        return embeds, (added or None)


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: the pipeline attributes that hold it and its tokenizer, and
    the key of its vector in a textual-inversion file."""

    encoder: str  # "text_encoder" | "text_encoder_2"
    tokenizer: str  # "tokenizer" | "tokenizer_2"
    embedding_key: str  # key in a textual-inversion .safetensors file


@dataclass(frozen=True)
class ModelFamily:
    """A family of models the engine runs. Subclasses say how prompts become U-Net conditioning."""

    id: str  # stable short name used on the wire and in caches: "sd1", "sd2", "sdxl"
    label: str  # for people: "Stable Diffusion XL"
    pipeline_class_name: str  # the diffusers pipeline that loads it
    img2img_class_name: str  # stock diffusers img2img of the family (benchmarks compare with it)
    config_name: str  # folder under core/assets/configs with its configuration
    text_encoders: tuple[TextEncoderSlot, ...]
    native_size: int  # side of the square the family was trained at (pixels)
    size_multiple: int  # generation sizes are multiples of this
    # Latent → RGB for previews without the VAE: 4×3 factors and a bias (approximate).
    preview_factors: tuple[tuple[float, float, float], ...]
    preview_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    context_dim: int = 768  # width of the text features the U-Net attends to (cross_attention_dim)
    # The U-Net's extra embedding of added conditioning (diffusers' `addition_embed_type`).
    addition_embed_type: str | None = None
    canny_controlnet: str | None = None  # a hub id to suggest when a ControlNet does not fit
    # Folder under core/assets/configs with the family's ControlNet config.json (single files).
    controlnet_config_name: str | None = None
    # Rough GPU memory of one image in a U-Net batch (plus its decode), per latent pixel, in
    # half precision: sizes variant batches (an out-of-memory error halves them). Estimates, not
    # measured on a GPU here: SDXL's deep stacks and float32 VAE decode cost more than SD 1.5's.
    bytes_per_latent_pixel: int = 150_000
    # Clip skip (A1111's count: 1 = the last layer's output, 2 = the penultimate hidden state, ...)
    # when a request gives none, and whether a skipped-to hidden state goes through the encoder's
    # final layer norm (SD 1/2: yes, as A1111 and diffusers do; SDXL was trained on the raw one).
    default_clip_skip: int = 1
    clip_skip_layer_norm: bool = True
    # IP-Adapter (core/ip_adapter.py): its image tokens are `context_dim` wide (that is how a
    # file's family is told); the adapter files and image encoders people use with it, for messages.
    ip_adapter_files: str = ""

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def config_dir(self) -> Path:
        return CONFIGS_DIR / self.config_name

    @property
    def controlnet_config_dir(self) -> Path | None:
        """The shipped diffusers config of this family's full-size ControlNets, if any."""
        return CONFIGS_DIR / self.controlnet_config_name if self.controlnet_config_name else None

    # --- prompts ---------------------------------------------------------------------------
    def encode_prompt(
        self,
        pipe,
        prompt: str | PromptChunks,
        negative_prompt: str | None,
        device,
        guidance: bool,
        size: tuple[int, int],
        clip_skip: int | None = None,
    ) -> PromptConditioning:
        """Encode the prompt (and negative prompt), emphasis syntax and long prompts included
        (`core.prompt_encoding`); a short plain prompt gives what the stock pipeline gives.
        `prompt` may come chunked already (`core.tokens.token_spans`, whose token positions then
        hold); `size` is the generation size (height, width) in pixels; `clip_skip` None means
        the family's `default_clip_skip`."""
        raise NotImplementedError

    def chunked(
        self, pipe, prompt: str | PromptChunks, negative_prompt: str | None
    ) -> tuple[PromptChunks, PromptChunks | None]:
        """Prompt and negative prompt (None: none) chunked and padded to the same length."""
        if isinstance(prompt, str):
            prompt = chunk_prompt(pipe.tokenizer, weighted_text(prompt))
        negative = (
            None if negative_prompt is None else chunk_prompt(pipe.tokenizer, weighted_text(negative_prompt))
        )
        return paired(prompt, negative)

    def reading(self, clip_skip: int | None) -> EncoderReading:
        skip = self.default_clip_skip if clip_skip is None else clip_skip
        return EncoderReading(skip, self.clip_skip_layer_norm)

    def max_clip_skip(self, pipe) -> int:
        """The largest clip skip this model's text encoders allow (their hidden layers)."""
        return min(getattr(pipe, slot.encoder).config.num_hidden_layers for slot in self.text_encoders)

    def encode_ids(
        self, pipe, ids: list[torch.Tensor], size: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The U-Net's context (and added conditioning) for token ids already tokenized by each
        of `text_encoders`' tokenizers (one (B, 77) tensor each); differentiable, no guidance:
        what textual inversion trains through."""
        raise NotImplementedError

    def vae_needs_upcast(self, vae, dtype: torch.dtype) -> bool:
        """Whether the VAE must run in float32 (SDXL's overflows in float16)."""
        return False

    def load_kwargs(self) -> dict[str, object]:
        """Extra arguments for the pipeline class's `from_pretrained`/`from_single_file`."""
        return {}

    # --- sizes ---------------------------------------------------------------------------
    def nearest_size(self, width: int, height: int) -> tuple[int, int]:
        """The generation size this family likes best for a canvas of this shape: about its
        native area, the same aspect ratio, each side a multiple of `size_multiple`."""
        return wire_sizes.nearest_size(self.native_size, self.size_multiple, width, height)

    def preview_rgb(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.preview_factors), torch.tensor(self.preview_bias)


@dataclass(frozen=True)
class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x: one CLIP encoder; the U-Net's context is its last hidden states."""

    def encode_prompt(self, pipe, prompt, negative_prompt, device, guidance, size, clip_skip=None):
        cond, uncond = self.chunked(pipe, prompt, (negative_prompt or "") if guidance else None)
        reading = self.reading(clip_skip)
        dtype = pipe.text_encoder.dtype

        def encode(chunks: PromptChunks) -> torch.Tensor:
            hidden, _ = encode_chunks(pipe.text_encoder, pipe.tokenizer, chunks, reading)
            return hidden.to(dtype=dtype, device=device)

        return PromptConditioning(encode(cond), encode(uncond) if uncond is not None else None)

    def encode_ids(self, pipe, ids, size):
        (token_ids,) = ids
        encoder = pipe.text_encoder
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (token_ids != pipe.tokenizer.pad_token_id).long()
        return encoder(token_ids, attention_mask=mask)[0], None

    def load_kwargs(self):
        # The engine never runs SD's NSFW checker: skipping it saves ~1.2 GB and a download.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass(frozen=True)
class StableDiffusionXLFamily(ModelFamily):
    """SDXL base and its fine-tunes: two encoders (CLIP-L, OpenCLIP-bigG), penultimate hidden
    states concatenated; the pooled bigG embedding and six `time_ids` go in as added conditioning."""

    def encode_prompt(self, pipe, prompt, negative_prompt, device, guidance, size, clip_skip=None):
        # As diffusers: no negative prompt on a model with `force_zeros_for_empty_prompt` (SDXL
        # base) means zeros, not the encoded empty prompt.
        zeros = negative_prompt is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
        negative = None if not guidance or zeros else (negative_prompt or "")
        cond, uncond = self.chunked(pipe, prompt, negative)
        reading = self.reading(clip_skip)
        dtype = pipe.text_encoder_2.dtype

        def encode(chunks: PromptChunks) -> tuple[torch.Tensor, torch.Tensor]:
            # Both encoders see the same chunks; their features sit side by side. The pooled
            # embedding is the second encoder's for the first chunk, as ComfyUI takes it.
            hidden_l, _ = encode_chunks(pipe.text_encoder, pipe.tokenizer, chunks, reading)
            hidden_g, out_g = encode_chunks(pipe.text_encoder_2, pipe.tokenizer_2, chunks, reading)
            context = torch.cat([hidden_l, hidden_g.to(hidden_l.device)], dim=-1)
            return context.to(dtype=dtype, device=device), out_g.text_embeds[:1].to(device)

        context, pooled = encode(cond)
        time_ids = _time_ids(size, 1, device, context.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        if not guidance:
            return PromptConditioning(context, None, added)
        if uncond is None:  # zeros
            return PromptConditioning(
                context,
                torch.zeros_like(context),
                added,
                {"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids},
            )
        context_u, pooled_u = encode(uncond)
        return PromptConditioning(context, context_u, added, {"text_embeds": pooled_u, "time_ids": time_ids})

    def encode_ids(self, pipe, ids, size):
        ids_l, ids_g = ids
        hidden_l = pipe.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = pipe.text_encoder_2(ids_g, output_hidden_states=True)
        context = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1)
        pooled = out_g[0]
        return context, {
            "text_embeds": pooled,
            "time_ids": _time_ids(size, len(ids_g), pooled.device, pooled.dtype),
        }

    def vae_needs_upcast(self, vae, dtype):
        return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def _time_ids(size: tuple[int, int], n: int, device, dtype) -> torch.Tensor:
    """SDXL's (original size, crop top-left, target size): the whole image at the size it is made."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]] * n, device=device, dtype=dtype)


_CLIP_L = TextEncoderSlot("text_encoder", "tokenizer", "emb_params")
# SD 1.x/2.x previews: the factors used since the first release of this project.
_SD_PREVIEW = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))

SD1 = StableDiffusionFamily(
    id="sd1",
    label="Stable Diffusion 1.x",
    pipeline_class_name="StableDiffusionPipeline",
    img2img_class_name="StableDiffusionImg2ImgPipeline",
    config_name="sd15",
    text_encoders=(_CLIP_L,),
    native_size=512,
    size_multiple=8,
    preview_factors=_SD_PREVIEW,
    context_dim=768,
    canny_controlnet="lllyasviel/control_v11p_sd15_canny",
    controlnet_config_name="sd15-controlnet",
    ip_adapter_files="ip-adapter_sd15.safetensors (or -plus_sd15) with CLIP-ViT-H-14-laion2B-s32B-b79K",
)
SD2 = StableDiffusionFamily(
    id="sd2",
    label="Stable Diffusion 2.x",
    pipeline_class_name="StableDiffusionPipeline",
    img2img_class_name="StableDiffusionImg2ImgPipeline",
    config_name="sd21-v",
    text_encoders=(_CLIP_L,),
    native_size=768,
    size_multiple=8,
    preview_factors=_SD_PREVIEW,
    context_dim=1024,
    canny_controlnet="thibaud/controlnet-sd21-canny-diffusers",
    controlnet_config_name="sd21-controlnet",
)
SDXL = StableDiffusionXLFamily(
    id="sdxl",
    label="Stable Diffusion XL",
    pipeline_class_name="StableDiffusionXLPipeline",
    img2img_class_name="StableDiffusionXLImg2ImgPipeline",
    config_name="sdxl",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "clip_l"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "clip_g"),
    ),
    native_size=1024,
    size_multiple=64,
    preview_factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    preview_bias=(0.1084, -0.0175, -0.0011),
    context_dim=2048,
    addition_embed_type="text_time",
    canny_controlnet="diffusers/controlnet-canny-sdxl-1.0",
    bytes_per_latent_pixel=250_000,
    controlnet_config_name="sdxl-controlnet",
    default_clip_skip=2,  # the penultimate layer, as SDXL was trained and diffusers encodes it
    clip_skip_layer_norm=False,
    ip_adapter_files=(
        "ip-adapter_sdxl.safetensors with CLIP-ViT-bigG-14-laion2B-39B-b160k, or "
        "ip-adapter(-plus)_sdxl_vit-h.safetensors with CLIP-ViT-H-14-laion2B-s32B-b79K"
    ),
)

FAMILIES: dict[str, ModelFamily] = {f.id: f for f in (SD1, SD2, SDXL)}


def family_by_id(family_id: str) -> ModelFamily:
    try:
        return FAMILIES[family_id]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise UnsupportedModelError(f"unknown model family '{family_id}' (known: {known})") from None


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline, from its components' configurations."""
    unet_config = pipe.unet.config
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        if getattr(pipe, "text_encoder", None) is None:
            raise UnsupportedModelError(
                "this is an SDXL refiner (it has only the second text encoder); the refiner only "
                "polishes finished images: use an SDXL base model or a fine-tune of it"
            )
        return SDXL
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UnsupportedModelError(f"a {type(pipe).__name__} model with two text encoders is not supported")
    return sd_family_of_text_encoder(pipe.text_encoder.config.to_dict())


def families_of_unet_config(config) -> list[ModelFamily]:
    """The families a U-Net or ControlNet configuration can belong to (a ControlNet's config
    repeats its U-Net's): SDXL's have the `text_time` added embedding; SD 1.x's and 2.x's are told
    apart by their text-feature width (768, 1024). A width no family has (small test models)
    leaves every family with the same added embedding; an unknown added embedding, none."""
    addition = config.get("addition_embed_type")
    same_kind = [f for f in FAMILIES.values() if f.addition_embed_type == addition]
    if addition is not None:  # the added embedding alone says the family (SDXL at any width)
        return same_kind
    by_width = [f for f in same_kind if f.context_dim == config.get("cross_attention_dim")]
    return by_width or same_kind


def sd_family_of_text_encoder(config: dict) -> ModelFamily:
    """SD 1.x (OpenAI CLIP-L: quick_gelu, 768 wide) or SD 2.x (OpenCLIP-H: gelu, 1024 wide), from
    the single text encoder's configuration; the activation also tells small test models apart."""
    return SD2 if config.get("hidden_size") == 1024 or config.get("hidden_act") == "gelu" else SD1


# --- single checkpoint files (original LDM key layout) ---------------------------------------
_UNET_PREFIX = "model.diffusion_model."
_FIRST_CONV = _UNET_PREFIX + "input_blocks.0.0.weight"


def checkpoint_family(keys, shape_of=None) -> ModelFamily:
    """The family of a full single-file checkpoint from its weight names (and, for inpainting
    models, the first convolution's shape via `shape_of(key)`). Raises `UnsupportedModelError`
    naming what the file is when it is not a model the engine runs."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("double_blocks.") or has(_UNET_PREFIX + "double_blocks."):
        raise UnsupportedModelError(
            "it is a Flux model; Flux is not supported yet (SD 1.x, 2.x and SDXL are)"
        )
    if has("joint_blocks.") or has(_UNET_PREFIX + "joint_blocks."):
        raise UnsupportedModelError(
            "it is a Stable Diffusion 3 model; SD3 is not supported (SD 1.x, 2.x and SDXL are)"
        )
    if has("conditioner.embedders.1.model."):
        family = SDXL
    elif has("conditioner.embedders.0.model."):
        raise UnsupportedModelError(
            "it is an SDXL refiner (it has only the OpenCLIP-bigG text encoder); the refiner only "
            "polishes finished images: use an SDXL base model or a fine-tune of it"
        )
    elif has("cond_stage_model.model."):
        family = SD2
    elif has("cond_stage_model.transformer."):
        family = SD1
    elif has(_UNET_PREFIX):
        raise UnsupportedModelError(
            "it holds a U-Net without its text encoder (a partial checkpoint); use a full model file"
        )
    else:
        raise UnsupportedModelError(
            "it has no Stable Diffusion U-Net weights (no 'model.diffusion_model.*' keys)"
        )
    if shape_of is not None and _FIRST_CONV in keys:
        channels = shape_of(_FIRST_CONV)[1]
        if channels == 9:
            raise UnsupportedModelError(
                f"it is an inpainting model ({family.label}, a U-Net with 9 input channels); use the "
                "ordinary (non-inpainting) version of the model: this tool does its own masking"
            )
        if channels != 4:
            raise UnsupportedModelError(
                f"its U-Net takes {channels} input channels ({family.label} variant such as "
                "instruct-pix2pix); only ordinary 4-channel models are supported"
            )
    return family
