"""The request (client -> bridge): `LayerSpec`, `JobRequest` (lenient `from_json`, strict
`validate` naming every bad field) and `layer_from_rgba`. Standard library only (see `wire`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .wire_fields import (
    _check_int,
    _check_number,
    _check_png,
    _check_text,
    _encode,
    _is_int,
    _json_type,
    _read_fields,
)
from .wire_png import crop_to_content, encode_png
from .wire_protocol import API_VERSION, OUTPUTS, SCHEDULERS, Limits, WireError

#: A layer's `appearance` choices (besides the older true = "learned" and false = "off").
APPEARANCE_MODES = ("off", "learned", "reference", "ip-adapter")

MAX_LORAS = 8
MAX_LORA_WEIGHT = 4.0  # as core.loras.MAX_WEIGHT
MAX_CLIP_SKIP = 12  # as core.collage.MAX_CLIP_SKIP


@dataclass
class LayerSpec:
    """One layer: its PNG (RGBA, cropped to content) placed with its top-left pixel at (x, y).

    The per-layer settings are those of `core.collage.Layer`; `strength` None means the job's.
    """

    text: str
    png: bytes
    x: int = 0
    y: int = 0
    name: str = ""
    visible: bool = True
    opacity: float = 1.0
    strength: float | None = None  # SDEdit strength of this layer; None = the job's `strength`
    attention_weight: float = 1.0  # masked cross-attention weight, 0..10 (0 = off)
    control_weight: float = 0.0  # ControlNet weight inside this layer, 0..2 (0 = off)
    # False/"off"; True/"learned" (a textual-inversion token learned from the layer's pixels);
    # "reference" (masked reference attention to the layer's own pixels, no training);
    # "ip-adapter" (the layer's image through the bridge's IP-Adapter, inside the layer only)
    appearance: bool | str = False
    appearance_weight: float = 1.0  # weight of the reference or IP-Adapter, 0..10 (0 = off)

    def to_dict(self) -> dict:
        return _encode(self)


@dataclass
class JobRequest:
    """Everything a job needs: the collage (prompt, settings, layers bottom to top) and variants.

    Defaults are those of `core.collage.Collage`. Variant k uses seed ``seed + k`` unless
    `seeds` lists them (then ``len(seeds) == variants``).

    "Regenerate": `base_image` (a PNG of the whole canvas, usually an earlier result) with
    `regenerate_layer` (an index into `layers`) asks to redo only that layer's region of the
    base, `regenerate_dilation` pixels around it included. Both or neither must be given.
    Or `base_image` with `regenerate_mask` (a canvas-size grey PNG, a selection: pixels > 0 are
    redone with the layers' settings, grown by `regenerate_dilation`) instead of the layer.
    """

    prompt: str
    layers: list[LayerSpec]
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    seed: int = 0
    seeds: list[int] | None = None
    variants: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 0.75
    scheduler: str = "default"
    feather_px: int = 4  # blend width inside the border of regenerated regions
    clip_skip: int | None = None  # text encoder layer, 1 = last, 2 = penultimate; None = the model's
    model: str | None = None  # one of the bridge's allowed models (InfoResponse.models); None = default
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under the layers
    background_png: bytes | None = None  # or a canvas-size RGB/RGBA PNG under the layers
    base_image: bytes | None = None  # canvas-size PNG to regenerate from
    regenerate_layer: int | None = None  # index into `layers`
    regenerate_dilation: int = 8  # how far around the layer's visible pixels may change
    regenerate_mask: bytes | None = None  # canvas-size grey PNG: redo the pixels > 0 (a selection)
    # LoRAs for this job: [{"name": a LoRA listed in InfoResponse.loras, "weight": -4..4 (default 1)}]
    loras: list[dict] = field(default_factory=list)
    output: str = "image"  # "image", or "layers": each result also as a layer stack (wire.OUTPUTS)
    # The ControlNet for this job: a name listed in InfoResponse.controlnets; None = the bridge's own
    # (its --controlnet, or the demo model's).
    controlnet: str | None = None
    api_version: int = API_VERSION

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRequest:
        """Read a request; raises `WireError` for what cannot be read (not for bad values)."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise WireError([f"body: not valid JSON ({error})"]) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> JobRequest:
        problems: list[str] = []
        if not isinstance(data, dict):
            raise WireError([f"body: must be a JSON object, got {_json_type(data)}"])
        kwargs = _read_fields(
            cls,
            data,
            "",
            problems,
            binary=("background_png", "base_image", "regenerate_mask"),
            skip=("layers",),
        )
        for name in ("prompt", "layers"):
            if name not in data:
                problems.append(f"{name}: missing (required)")
        layers = data.get("layers", [])
        specs: list[LayerSpec] = []
        if not isinstance(layers, list):
            problems.append(f"layers: must be a list of layers, got {_json_type(layers)}")
        else:
            for i, item in enumerate(layers):
                where = f"layers[{i}]"
                if not isinstance(item, dict):
                    problems.append(f"{where}: must be an object, got {_json_type(item)}")
                    continue
                layer_kwargs = _read_fields(LayerSpec, item, where + ".", problems, binary=("png",))
                for name in ("text", "png"):
                    if name not in item:
                        problems.append(f"{where}.{name}: missing (required)")
                if not problems:
                    specs.append(LayerSpec(**layer_kwargs))
        if problems:
            raise WireError(problems)
        kwargs["layers"] = specs
        return cls(**kwargs)

    # -- validation --------------------------------------------------------------------------

    def validate(self, limits: Limits | None = None) -> list[str]:
        """Every problem of this request, each naming its field; empty when it is fine.

        Checks types, ranges and limits, and reads each PNG's header (not its pixels: the
        bridge decodes them and checks what only pixels tell, e.g. a layer with no visible pixel).
        """
        lim = limits or Limits()
        p: list[str] = []
        if not _is_int(self.api_version) or self.api_version != API_VERSION:
            p.append(f"api_version: this bridge speaks API version {API_VERSION}, got {self.api_version!r}")
        _check_text(p, "prompt", self.prompt, lim.max_text_chars, allow_empty=True)
        _check_text(p, "negative_prompt", self.negative_prompt, lim.max_text_chars, allow_empty=True)
        canvas_ok = True
        for name in ("width", "height"):
            value = getattr(self, name)
            # Any size: the engine generates at the nearest multiple of 8 and scales back.
            if not _is_int(value) or not 64 <= value <= lim.max_side:
                p.append(f"{name}: must be a whole number of pixels in 64..{lim.max_side}, got {value!r}")
                canvas_ok = False
        if canvas_ok and self.width * self.height > lim.max_canvas_pixels:
            p.append(
                f"width, height: the canvas {self.width}×{self.height} has {self.width * self.height}"
                f" pixels, more than this bridge's limit of {lim.max_canvas_pixels}"
            )
            canvas_ok = False
        canvas = (self.width, self.height) if canvas_ok else None

        if not _is_int(self.variants) or not 1 <= self.variants <= lim.max_variants:
            p.append(f"variants: must be a whole number in 1..{lim.max_variants}, got {self.variants!r}")
        _check_int(p, "seed", self.seed, 0, 2**63 - 1)
        if self.seeds is not None:
            if not isinstance(self.seeds, list):
                p.append(f"seeds: must be a list of whole numbers or null, got {_json_type(self.seeds)}")
            else:
                if _is_int(self.variants) and len(self.seeds) != self.variants:
                    p.append(f"seeds: gives {len(self.seeds)} seeds for {self.variants} variants")
                for i, s in enumerate(self.seeds):
                    _check_int(p, f"seeds[{i}]", s, 0, 2**63 - 1)
        _check_int(p, "steps", self.steps, 1, lim.max_steps)
        _check_number(p, "guidance_scale", self.guidance_scale, 0.0, 100.0)
        _check_number(p, "strength", self.strength, 0.0, 1.0)
        _check_int(p, "feather_px", self.feather_px, 0, 64)
        if self.clip_skip is not None:
            _check_int(p, "clip_skip", self.clip_skip, 1, MAX_CLIP_SKIP)
        if self.scheduler not in SCHEDULERS:
            p.append(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            p.append(f"model: must be a model name or null, got {self.model!r}")
        if self.controlnet is not None and (
            not isinstance(self.controlnet, str) or not self.controlnet.strip()
        ):
            p.append(
                f"controlnet: must be the name of a ControlNet listed in /info or null, got {self.controlnet!r}"
            )
        if (
            not isinstance(self.background, list)
            or len(self.background) != 3
            or not all(_is_int(c) and 0 <= c <= 255 for c in self.background)
        ):
            p.append(
                f"background: must be an RGB colour, three whole numbers 0..255, got {self.background!r}"
            )
        if self.background_png is not None:
            _check_png(p, "background_png", self.background_png, lim.max_canvas_pixels, canvas)
        self._validate_regenerate(p, lim, canvas)
        self._validate_layers(p, lim, canvas)
        self._validate_loras(p)
        if self.output not in OUTPUTS:
            p.append(f"output: must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        return p

    def _validate_loras(self, p: list[str]) -> None:
        if not isinstance(self.loras, list):
            p.append(f'loras: must be a list of {{"name", "weight"}} objects, got {_json_type(self.loras)}')
            return
        if len(self.loras) > MAX_LORAS:
            p.append(f"loras: {len(self.loras)} LoRAs, more than the limit of {MAX_LORAS}")
        for i, item in enumerate(self.loras):
            where = f"loras[{i}]"
            if not isinstance(item, dict):
                p.append(f'{where}: must be a {{"name", "weight"}} object, got {_json_type(item)}')
                continue
            unknown = sorted(set(item) - {"name", "weight"})
            if unknown:
                p.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
            name = item.get("name")
            if not isinstance(name, str) or not name.strip():
                p.append(f"{where}.name: must be the name of a LoRA listed in /info, got {name!r}")
            _check_number(p, f"{where}.weight", item.get("weight", 1.0), -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)

    def _validate_regenerate(self, p: list[str], lim: Limits, canvas: tuple[int, int] | None) -> None:
        target = self.regenerate_layer is not None or self.regenerate_mask is not None
        if self.regenerate_layer is not None and self.regenerate_mask is not None:
            p.append("regenerate_layer, regenerate_mask: give one of them (a layer or a selection), not both")
        if (self.base_image is None) == target:
            given, missing = (
                ("base_image", "regenerate_layer or regenerate_mask")
                if self.base_image is not None
                else (
                    "regenerate_mask" if self.regenerate_mask is not None else "regenerate_layer",
                    "base_image",
                )
            )
            p.append(f"{missing}: missing; {given} needs it (regenerate takes both, or neither)")
        if self.base_image is not None:
            _check_png(p, "base_image", self.base_image, lim.max_canvas_pixels, canvas)
        if self.regenerate_mask is not None:
            _check_png(p, "regenerate_mask", self.regenerate_mask, lim.max_canvas_pixels, canvas)
        if self.regenerate_layer is not None:
            n = len(self.layers) if isinstance(self.layers, list) else 0
            if not _is_int(self.regenerate_layer) or not 0 <= self.regenerate_layer < max(n, 1):
                p.append(
                    f"regenerate_layer: must be the index of a layer, 0..{max(n - 1, 0)}, got {self.regenerate_layer!r}"
                )
            elif self.regenerate_layer < n and self.layers[self.regenerate_layer].visible is False:
                p.append(f"regenerate_layer: layer {self.regenerate_layer} is hidden (visible is false)")
        if target:
            _check_int(p, "regenerate_dilation", self.regenerate_dilation, 0, 256)

    def _validate_layers(self, p: list[str], lim: Limits, canvas: tuple[int, int] | None) -> None:
        if not isinstance(self.layers, list) or not self.layers:
            p.append("layers: a collage needs at least one layer")
            return
        if len(self.layers) > lim.max_layers:
            p.append(f"layers: {len(self.layers)} layers, more than this bridge's limit of {lim.max_layers}")
            return
        for i, layer in enumerate(self.layers):
            w = f"layers[{i}]"
            _check_text(p, f"{w}.text", layer.text, lim.max_text_chars, allow_empty=False)
            _check_text(p, f"{w}.name", layer.name, lim.max_text_chars, allow_empty=True)
            size = _check_png(p, f"{w}.png", layer.png, lim.max_layer_pixels, None)
            xy_ok = True
            for name in ("x", "y"):
                value = getattr(layer, name)
                if not _is_int(value) or abs(value) > 2 * lim.max_side:
                    p.append(
                        f"{w}.{name}: must be a whole number of pixels, |{name}| ≤ {2 * lim.max_side}, got {value!r}"
                    )
                    xy_ok = False
            if size and xy_ok and canvas and layer.visible is True:
                (lw, lh), (cw, ch) = size, canvas
                if layer.x >= cw or layer.y >= ch or layer.x + lw <= 0 or layer.y + lh <= 0:
                    p.append(
                        f"{w}.x, y: the layer ({lw}×{lh} at {layer.x},{layer.y}) lies entirely outside"
                        f" the {cw}×{ch} canvas"
                    )
            if not isinstance(layer.visible, bool):
                p.append(f"{w}.visible: must be true or false, got {layer.visible!r}")
            if not isinstance(layer.appearance, bool) and layer.appearance not in APPEARANCE_MODES:
                p.append(
                    f'{w}.appearance: must be "off", "learned", "reference", "ip-adapter", true'
                    f' (= "learned") or false (= "off"), got {layer.appearance!r}'
                )
            _check_number(p, f"{w}.appearance_weight", layer.appearance_weight, 0.0, 10.0)
            _check_number(p, f"{w}.opacity", layer.opacity, 0.0, 1.0)
            if layer.strength is not None:
                _check_number(p, f"{w}.strength", layer.strength, 0.0, 1.0)
            _check_number(p, f"{w}.attention_weight", layer.attention_weight, 0.0, 10.0)
            _check_number(p, f"{w}.control_weight", layer.control_weight, 0.0, 2.0)

    def summary(self) -> str:
        """One line for logs: never the pixels."""
        n = len(self.layers) if isinstance(self.layers, list) else 0
        return f"{self.width}×{self.height}, {n} layers, {self.variants} variants, {self.steps} steps"


def layer_from_rgba(
    text: str, width: int, height: int, rgba: bytes, x: int = 0, y: int = 0, **settings: object
) -> LayerSpec | None:
    """A LayerSpec from an uncropped RGBA image placed at (x, y): cropped, PNG-encoded.

    None when the image has no visible pixel (such a layer is not sent at all).
    """
    cropped = crop_to_content(width, height, rgba)
    if cropped is None:
        return None
    cx, cy, w, h, pixels = cropped
    return LayerSpec(text=text, png=encode_png(w, h, pixels), x=x + cx, y=y + cy, **settings)  # type: ignore[arg-type]
