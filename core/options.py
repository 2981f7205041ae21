"""Which Collage Diffusion pieces run, and how: one place for the CLI and the bridge.

Masked attention (§1) runs for every layer with an `attention_weight` > 0, and for the same
layers self-attention modulation (on by default) and regional conditioning (off by default) when
their weights are > 0 (docs/attention.md, "Spatial modes"); appearance tokens (§2)
for every layer with `appearance` on (inside `generate`); per-layer strength (§4) always;
ControlNet (§3) when a ControlNet was configured (the demo model brings its own) and a layer has a
`control_weight` > 0. For every layer with ``appearance: "reference"`` and an
`appearance_weight` > 0: the low-frequency anchor (core/anchor.py), and reference attention
(core/reference.py) when `reference_attention` is on; the masked IP-Adapter (core/ip_adapter.py)
for every layer with ``appearance: "ip-adapter"`` and a weight > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from .anchor import low_frequency_anchor_hook
from .attention import masked_attention_hook
from .collage import Collage, appearance_mode
from .control import CannyDetector, controlnet_hook, load_controlnet, missing_controlnet_warning
from .demo_model import DEMO_MODEL_ID, DEMO_VERSION
from .ip_adapter import ip_adapter_hook
from .ip_adapter_files import IPAdapterFiles
from .models import ModelLoadError
from .reference import reference_attention_hook
from .regional import regional_hook
from .self_attention import self_attention_hook


@dataclass
class EngineOptions:
    """Settings of the pieces that are not part of a collage document."""

    attention_schedule: str = "ediffi"  # g(sigma): "ediffi" (log(1+sigma)) or "collage"
    attention_negative_weight: float = 0.0  # pushes a layer's words out of the rest of the image
    # Spatial modes next to the masked bias, for layers with an attention_weight > 0; 0 turns one
    # off. Defaults chosen by measurement (docs/attention.md, "Spatial modes").
    regional_weight: float = 0.0  # each layer's pixels also read the layer's own text (core/regional.py)
    self_attention_weight: float = 2.0  # pixels keep to their own layer (core/self_attention.py)
    controlnet: str | None = None  # hub id, folder or file of a Canny ControlNet for the model
    controlnet_config: str | None = None  # for a single-file ControlNet: its config
    control_scale: float = 1.0
    control_start: float = 0.0  # fraction of the steps run before ControlNet starts
    control_end: float = 1.0  # fraction after which it stops
    canny_low: int = 100
    canny_high: int = 200
    # The IP-Adapter and image encoder for "ip-adapter" layers: the files, or a function of the
    # loaded model that finds them (the model folders'; None: there is none for that model).
    ip_adapter: IPAdapterFiles | Callable[[object], IPAdapterFiles | None] | None = None
    # ``appearance: "reference"`` layers (docs/appearance.md): reference attention (an extra U-Net
    # pass per step) and the low-frequency anchor (core/anchor.py).
    reference_attention: bool = False  # off by default: no gain on the demo model at 2-3x the time
    reference_end: float = 1.0  # fraction of the schedule (from pure noise) reference attention acts in
    reference_conditional_only: bool = False  # only the guidance batch's conditional half reads it
    reference_anchor: float = 1.0  # anchor weight per unit of appearance_weight (capped at 1); 0 = off
    reference_lowpass: int = 0  # anchor low-pass: a box of this many latent pixels (odd), 0 = mask mean
    reference_anchor_start: float = 0.85  # the anchor acts in this window of the schedule (fractions
    reference_anchor_end: float = 1.0  # by timestep, from pure noise): its last steps, by measurement


def build_hooks(
    model, collage: Collage, options: EngineOptions, *, controlnet_errors: str = "raise"
) -> tuple[list, list[str]]:
    """The sampler hook builders for `generate(hooks=…)`, and warnings for the user.

    With ``controlnet_errors="warn"`` a ControlNet that cannot be loaded for this model (wrong
    base, missing file) becomes a warning and the image is generated without it, as a server
    that serves many requests should; the CLI raises, since the user asked for it by name.
    """
    warnings: list[str] = []
    hooks = [
        partial(
            masked_attention_hook,
            schedule=options.attention_schedule,
            negative_weight=options.attention_negative_weight,
        )
    ]
    # After the masked hook: the regional processor wraps the masked one on attn2.
    if options.regional_weight:
        hooks.append(
            partial(regional_hook, weight=options.regional_weight, schedule=options.attention_schedule)
        )
    # Reference attention and self-attention modulation both need the attn1 processors: with a
    # reference layer (weight > 0) the reference processor applies the modulation's bias itself.
    uses_reference = any(
        appearance_mode(layer.appearance) == "reference" and layer.appearance_weight > 0
        for layer in collage.layers
    )
    uses_attention = uses_reference and options.reference_attention
    if options.self_attention_weight and not uses_attention:
        hooks.append(
            partial(
                self_attention_hook, weight=options.self_attention_weight, schedule=options.attention_schedule
            )
        )
    if uses_attention:
        hooks.append(
            partial(
                reference_attention_hook,
                end=options.reference_end,
                conditional_only=options.reference_conditional_only,
                self_attention_weight=options.self_attention_weight,
                schedule=options.attention_schedule,
            )
        )
    # After masked attention and regional conditioning: it wraps their attn2 processor.
    if any(appearance_mode(layer.appearance) == "ip-adapter" for layer in collage.layers):
        found = options.ip_adapter(model) if callable(options.ip_adapter) else options.ip_adapter
        hooks.append(partial(ip_adapter_hook, files=found))
    if uses_reference and options.reference_anchor:
        hooks.append(
            partial(
                low_frequency_anchor_hook,
                weight=options.reference_anchor,
                kernel=options.reference_lowpass,
                start=options.reference_anchor_start,
                end=options.reference_anchor_end,
            )
        )
    controlnet = None
    ref = options.controlnet
    family = getattr(model, "family", None)
    if not ref and getattr(model, "identity", None) == DEMO_VERSION and missing_controlnet_warning(collage):
        ref = DEMO_MODEL_ID  # the demo model comes with its own edge ControlNet
    if ref:
        try:
            controlnet = load_controlnet(ref, model=model, config=options.controlnet_config)
        except ModelLoadError as error:
            if controlnet_errors == "raise":
                raise
            warnings.append(f"generated without ControlNet: {error}")
    if controlnet is not None:
        hooks.append(
            controlnet_hook(
                controlnet,
                conditioning_scale=options.control_scale,
                guidance_start=options.control_start,
                guidance_end=options.control_end,
                detector=CannyDetector(options.canny_low, options.canny_high),
            )
        )
    elif not ref and (warning := missing_controlnet_warning(collage, family)):
        warnings.append(warning)
    return hooks, warnings
