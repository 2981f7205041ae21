"""Our settings inside a document: the ``collage.json`` mapping (ORA zip entry, PSD sidecar).

Schema (every key optional; unknown keys are errors so that typos do not pass silently)::

    {
      "version": 1,
      "prompt": "a bento box",            "negative_prompt": "",
      "seed": 0, "steps": 30, "guidance_scale": 7.5, "strength": 0.75,
      "scheduler": "default",             "model": null,
      "clip_skip": null,                   # 1 = last layer, 2 = penultimate; null = the model's
      "layers": {                          # keyed by the layer's name in the document
        "Layer 3": {"text": "salmon sushi", "strength": 0.6, "attention_weight": 1.0,
                    "control_weight": 0.0, "appearance": false,   # or "learned", "reference", "ip-adapter"
                    "appearance_weight": 1.0}
      },
      "results": ["collage result (seed 0)"]   # generated layers, skipped when reading
    }

Types are checked here; ranges are left to `Collage.validate`, which names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..collage import Collage, Layer, appearance_mode

SETTINGS_VERSION = 1
SETTINGS_ENTRY = "collage.json"  # zip entry in an ORA, and the sidecar's suffix for a PSD

_NUMBER = "a number"
_WHOLE = "a whole number"
_TEXT = "text"
_BOOL = "true or false"
_APPEARANCE = 'true, false, "off", "learned" or "reference"'

#: collage-level keys → the type they must have (also the keys `DocumentSettings` applies).
COLLAGE_KEYS: dict[str, str] = {
    "prompt": _TEXT,
    "negative_prompt": _TEXT,
    "seed": _WHOLE,
    "steps": _WHOLE,
    "guidance_scale": _NUMBER,
    "strength": _NUMBER,
    "scheduler": _TEXT,
    "model": _TEXT,
    "clip_skip": _WHOLE,
}
#: collage-level keys that may be null (the runner's model, the model's clip skip).
NULLABLE_KEYS = ("model", "clip_skip")
#: per-layer keys → type.
LAYER_KEYS: dict[str, str] = {
    "text": _TEXT,
    "strength": _NUMBER,
    "attention_weight": _NUMBER,
    "control_weight": _NUMBER,
    "appearance": _APPEARANCE,
    "appearance_weight": _NUMBER,
}
_LAYER_DEFAULTS: dict[str, Any] = {
    "strength": None,
    "attention_weight": 1.0,
    "control_weight": 0.0,
    "appearance": False,
    "appearance_weight": 1.0,
}


@dataclass
class DocumentSettings:
    """Parsed collage.json: only the keys that were given (the rest keep the collage's defaults)."""

    collage: dict[str, Any] = field(default_factory=dict)  # subset of COLLAGE_KEYS
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → subset of LAYER_KEYS
    results: list[str] = field(default_factory=list)

    def apply_to_collage(self, collage: Collage) -> None:
        for key, value in self.collage.items():
            setattr(collage, key, value)

    def apply_to_layer(self, layer: Layer) -> bool:
        """Apply the settings stored under the layer's name; False if there are none."""
        values = self.layers.get(layer.name)
        if values is None:
            values = self.layers.get(layer.name.strip())
        if values is None:
            return False
        for key, value in values.items():
            setattr(layer, key, value.strip() if key == "text" else value)
        return True


def check_value(value: object, kind: str, *, nullable: bool = False) -> bool:
    if value is None:
        return nullable
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _APPEARANCE:
        return appearance_mode(value) is not None
    if isinstance(value, bool):
        return False
    if kind == _WHOLE:
        return isinstance(value, int)
    return isinstance(value, (int, float))


def describe(kind: str, *, nullable: bool = False) -> str:
    return f"{kind} or null" if nullable else kind


def parse_settings(data: object) -> tuple[DocumentSettings, list[str]]:
    """Check and parse a decoded collage.json; returns the settings and every problem found."""
    settings = DocumentSettings()
    problems: list[str] = []
    if not isinstance(data, dict):
        return settings, [f"must be a JSON object, got {type(data).__name__}"]
    for key, value in data.items():
        if key == "version":
            if not check_value(value, _WHOLE) or value > SETTINGS_VERSION:
                problems.append(
                    f"version: this reader understands version {SETTINGS_VERSION} or older, got {value!r}"
                )
        elif key == "layers":
            if not isinstance(value, dict):
                problems.append(f"layers: must be an object keyed by layer name, got {type(value).__name__}")
                continue
            for name, entry in value.items():
                parsed = _parse_layer(entry, f"layers[{name!r}]", problems)
                if parsed is not None:
                    settings.layers[name] = parsed
        elif key == "results":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"results: must be a list of layer names, got {value!r}")
            else:
                settings.results = list(value)
        elif key in COLLAGE_KEYS:
            nullable = key in NULLABLE_KEYS
            if check_value(value, COLLAGE_KEYS[key], nullable=nullable):
                settings.collage[key] = value
            else:
                problems.append(
                    f"{key}: must be {describe(COLLAGE_KEYS[key], nullable=nullable)}, got {value!r}"
                )
        else:
            problems.append(f"unknown key {key!r} (known: {', '.join(_all_keys())})")
    return settings, problems


def _parse_layer(entry: object, where: str, problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be an object, got {type(entry).__name__}")
        return None
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in LAYER_KEYS:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(LAYER_KEYS)})")
            continue
        nullable = key == "strength"  # null = use the collage's strength
        if not check_value(value, LAYER_KEYS[key], nullable=nullable):
            problems.append(
                f"{where}.{key}: must be {describe(LAYER_KEYS[key], nullable=nullable)}, got {value!r}"
            )
        else:
            out[key] = value
    return out


def _all_keys() -> list[str]:
    return ["version", *COLLAGE_KEYS, "layers", "results"]


def layer_settings(layer: Layer) -> dict[str, Any]:
    """The per-layer settings worth storing: text when it differs from the name, non-default values."""
    out: dict[str, Any] = {}
    if layer.text and layer.text.strip() != layer.name.strip():
        out["text"] = layer.text
    for key, default in _LAYER_DEFAULTS.items():
        value = getattr(layer, key)
        if value != default:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars (a seed from np.random, say) as the Python numbers JSON can hold."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def collage_settings(collage: Collage) -> dict[str, Any]:
    """A collage.json mapping for a collage: its generation settings and its layers' settings."""
    data: dict[str, Any] = {"version": SETTINGS_VERSION}
    for key in COLLAGE_KEYS:
        data[key] = _plain(getattr(collage, key))
    layers: dict[str, dict[str, Any]] = {}
    for layer in collage.layers:
        values = layer_settings(layer)
        name = layer.name or layer.text
        if values and name not in layers:
            layers[name] = values
    if layers:
        data["layers"] = layers
    return data


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
