"""Per-document and per-layer settings, kept inside the document as one JSON annotation.

Krita saves annotations into the .kra file, so the prompt, the seed, which layers take part and
each layer's text and sliders come back when the document is reopened. Layers are keyed by
Krita's node uniqueId (which .kra files keep); when a document's layers got new ids (a copy, an
import from .ora/.psd) an entry is matched by the layer's name instead, if that is unambiguous.

Standard library only: reading never raises, whatever the annotation holds (a broken or future
annotation gives the defaults for what cannot be read).

The model and the LoRAs are per document too (`model`, `loras`): names the bridge lists in /info
(`choices.py` turns them into the request's `model` and `loras`); so are the ControlNet
(`controlnet`, a name of /info's controlnets) and the clip skip (`clip_skip`, the key the CLI's
collage.json uses too).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from .wire_request import APPEARANCE_MODES, MAX_CLIP_SKIP, MAX_LORA_WEIGHT

#: The annotation's type in the document (and in the .kra file: ``annotations/collage-diffusion``).
ANNOTATION_TYPE = "collage-diffusion"
ANNOTATION_DESCRIPTION = (
    "Collage Diffusion settings (prompt, seed, model and LoRAs, per-layer texts and weights)"
)
VERSION = 1

#: Size policies: how big the generated image is, given the document's size.
SIZE_POLICIES = {
    "auto": "Model's size (auto)",
    "document": "Document size",
    "512": "Fit 512 px",
    "768": "Fit 768 px",
    "1024": "Fit 1024 px",
}

#: How a result arrives (the wire's `JobRequest.output`): the dock's "Result as" choice.
OUTPUTS = {"image": "One layer", "layers": "Layer stack"}

#: Ranges of the numeric settings (the wire format's), used to clamp what is read.
RANGES = {
    "seed": (0, 2**63 - 1),
    "steps": (1, 1000),
    "variants": (1, 16),
    "strength": (0.0, 1.0),
    "guidance_scale": (0.0, 100.0),
    "attention_weight": (0.0, 10.0),
    "control_weight": (0.0, 2.0),
    "appearance_weight": (0.0, 10.0),
}


@dataclass
class LayerSettings:
    name: str = ""  # the layer's name when last seen (for the name fallback)
    enabled: bool = True  # takes part in the collage
    text: str = ""  # what the layer shows; empty: the layer's name
    strength: float = 0.75  # how much this layer's region may change (SDEdit strength)
    attention_weight: float = 1.0
    control_weight: float = 0.0
    appearance: str = "off"  # keep the layer's look: "off", "reference" or "learned" (docs/appearance.md)
    appearance_weight: float = 1.0  # how strongly "reference" keeps it, 0..10


@dataclass
class LoraChoice:
    """A LoRA chosen in the dock: its name as the bridge lists it (/info's loras) and its weight."""

    name: str
    weight: float = 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight}


@dataclass
class DocumentSettings:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    size_policy: str = "auto"  # the model's liked size: docs/plugin.md
    variants: int = 4
    strength: float = 0.75  # the job's strength: what no layer covers (the background)
    guidance_scale: float = 7.5
    layers: dict[str, LayerSettings] = field(default_factory=dict)  # by node uniqueId
    results_group: str = ""  # uniqueId of the "Collage results" group
    model: str = ""  # a model the bridge lists (/info's models); "": the bridge's default
    loras: list[LoraChoice] = field(default_factory=list)  # sent as JobRequest.loras, in order
    output: str = "image"  # a result as one layer ("image") or as a layer stack ("layers")
    clip_skip: int | None = None  # 1..MAX_CLIP_SKIP, A1111's count; None: the model family's default
    controlnet: str = ""  # a ControlNet the bridge lists (/info's controlnets); "": the bridge's own

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "loras")}
        data["version"] = VERSION
        data["layers"] = {uid: vars(s).copy() for uid, s in self.layers.items()}
        data["loras"] = [lora.to_dict() for lora in self.loras]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> DocumentSettings:
        """Settings from an annotation; defaults for whatever is missing or unreadable."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            return cls()
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> DocumentSettings:
        if not isinstance(data, dict):
            return cls()
        settings = cls(**_read(cls, data, skip=("layers", "loras")))
        if settings.size_policy not in SIZE_POLICIES:
            settings.size_policy = "auto"
        settings.model = settings.model.strip()
        settings.controlnet = settings.controlnet.strip()
        settings.loras = _read_loras(data.get("loras"))
        settings.clip_skip = _read_clip_skip(data.get("clip_skip"))
        if settings.output not in OUTPUTS:
            settings.output = "image"
        layers = data.get("layers")
        if isinstance(layers, dict):
            for uid, entry in layers.items():
                if isinstance(uid, str) and isinstance(entry, dict):
                    settings.layers[uid] = _read_layer(entry)
        return settings

    @classmethod
    def from_file_settings(cls, data: object) -> DocumentSettings:
        """Settings from a document file's own ``collage.json`` (what `collage generate` and
        `core.formats.save_ora` write into an .ora): the collage's fields, and the per-layer
        entries keyed by layer *name* (``name:<name>`` placeholders that `resolve` matches to
        the layers by name). Unusable values are skipped, as everywhere here. The file's `model`
        is a reference on the machine that wrote it (a path, a hub id), not a bridge's model name:
        the dock keeps the bridge's default (and its ControlNet)."""
        if not isinstance(data, dict):
            return cls()
        skip = (
            "layers",
            "variants",
            "size_policy",
            "results_group",
            "model",
            "loras",
            "output",
            "controlnet",
        )
        settings = cls(**_read(cls, data, skip=skip))
        settings.clip_skip = _read_clip_skip(data.get("clip_skip"))
        layers = data.get("layers")
        if isinstance(layers, dict):
            for name, entry in layers.items():
                if isinstance(name, str) and isinstance(entry, dict):
                    values = {"strength": settings.strength, **entry}  # null/absent: the collage's
                    if values["strength"] is None:
                        values["strength"] = settings.strength
                    settings.layers[f"name:{name}"] = _read_layer(values, name=name)
        return settings

    # -- layers ----------------------------------------------------------------------------------

    def resolve(self, nodes: list[tuple[str, str]]) -> dict[str, LayerSettings]:
        """The settings of each of the document's layers, given as (uniqueId, name) pairs.

        A layer's own entry (same uniqueId) wins. A layer without one takes the entry saved under
        the same name, when exactly one such entry exists, its uniqueId is not a layer of this
        document and no other layer of the document has that name. Otherwise the defaults.
        The result is keyed by uniqueId; entries found by name are copied under the new id.
        """
        present = {uid for uid, _ in nodes}
        name_count: dict[str, int] = {}
        for _, name in nodes:
            name_count[name] = name_count.get(name, 0) + 1
        orphans: dict[str, list[LayerSettings]] = {}
        for uid, entry in self.layers.items():
            if uid not in present:
                orphans.setdefault(entry.name, []).append(entry)
        resolved = {}
        for uid, name in nodes:
            entry = self.layers.get(uid)
            if entry is None:
                candidates = orphans.get(name, [])
                if len(candidates) == 1 and name_count[name] == 1 and name:
                    entry = LayerSettings(**vars(candidates[0]))
                else:
                    entry = LayerSettings()
            entry.name = name
            resolved[uid] = entry
        return resolved

    def layer(self, uid: str, name: str) -> LayerSettings:
        """One layer's settings (the name fallback applies as in `resolve`, for this layer alone)."""
        return self.resolve([(uid, name)])[uid]

    def update_layers(self, resolved: dict[str, LayerSettings], keep: int = 500) -> None:
        """Store `resolved` (from `resolve`, maybe edited); entries of layers no longer in the
        document are kept (an undo may bring a layer back), the oldest dropped beyond `keep`."""
        for uid, entry in resolved.items():
            self.layers.pop(uid, None)
            self.layers[uid] = entry  # re-inserted: the most recently seen come last
        while len(self.layers) > keep:
            self.layers.pop(next(iter(self.layers)))


def _read_loras(data: object) -> list[LoraChoice]:
    """The saved LoRAs: entries without a usable name are dropped, weights clamped to the wire's
    range (a missing or unreadable weight is 1)."""
    if not isinstance(data, list):
        return []
    out = []
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            continue
        weight = entry.get("weight", 1.0)
        usable = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        weight = min(MAX_LORA_WEIGHT, max(-MAX_LORA_WEIGHT, float(weight))) if usable else 1.0
        out.append(LoraChoice(entry["name"].strip(), round(weight, 4)))
    return out


def _read_clip_skip(value: object) -> int | None:
    """The saved clip skip: a whole number clamped to 1..MAX_CLIP_SKIP; None (the model's default)
    for null, a missing key (documents saved before the setting) or anything unreadable."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return min(MAX_CLIP_SKIP, max(1, int(value)))


def _read_layer(entry: dict, **fixed) -> LayerSettings:
    """One layer's saved settings; `appearance` was a bool before it became a mode (true: the
    textual inversion, now "learned"), and an unknown mode reads as "off"."""
    values = dict(entry)
    if isinstance(values.get("appearance"), bool):
        values["appearance"] = "learned" if values["appearance"] else "off"
    layer = LayerSettings(**fixed, **_read(LayerSettings, values, skip=tuple(fixed)))
    if layer.appearance not in APPEARANCE_MODES:
        layer.appearance = "off"
    return layer


def _read(cls: type, data: dict, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` found in `data` with a usable value (clamped to RANGES)."""
    defaults = cls()
    out = {}
    for f in fields(cls):
        if f.name in skip or f.name not in data:
            continue
        value, default = data[f.name], getattr(defaults, f.name)
        if isinstance(default, bool):
            if isinstance(value, bool):
                out[f.name] = value
        elif isinstance(default, int):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f.name] = _clamp(f.name, int(value))
        elif isinstance(default, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f.name] = _clamp(f.name, float(value))
        elif isinstance(default, str) and isinstance(value, str):
            out[f.name] = value
    return out


def _clamp(name: str, value):
    low, high = RANGES.get(name, (None, None))
    if low is not None and value < low:
        return low
    if high is not None and value > high:
        return high
    return value
