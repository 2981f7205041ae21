"""Photoshop (.psd) documents through psd-tools.

A PSD has no place for our settings, so they come from an optional sidecar beside it,
``<stem>.collage.json`` (same schema as the ORA's collage.json; see `document.sidecar_path`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..collage import Layer, LayerGroup
from .document import DocumentError, LoadedDocument, build_document, sidecar_settings
from .images import to_rgba8

_NORMAL_MODES = ("NORMAL", "PASS_THROUGH")


def read_psd(path: Path) -> LoadedDocument:
    from psd_tools import PSDImage  # imported here: only PSD users pay for it

    try:
        psd = PSDImage.open(path)
    except Exception as error:  # psd-tools raises many kinds (struct, value, assertion) on bad input
        raise DocumentError(
            path, [f"not a readable Photoshop file: {type(error).__name__}: {error}"]
        ) from None
    warnings: list[str] = []
    tree = _read_group(psd, warnings)
    return build_document(path, tree, int(psd.width), int(psd.height), sidecar_settings(path), warnings)


def _read_group(group, warnings: list[str]) -> list[Layer | LayerGroup]:
    from psd_tools.api.layers import AdjustmentLayer

    nodes: list[Layer | LayerGroup] = []
    for layer in group:  # psd-tools iterates bottom to top, like our trees
        name = str(layer.name or "")
        what = f"layer {name!r}" if name.strip() else "an unnamed layer"
        common = {"name": name, "visible": bool(layer.visible), "opacity": int(layer.opacity) / 255.0}
        mode = getattr(layer.blend_mode, "name", str(layer.blend_mode))
        if mode not in _NORMAL_MODES:
            warnings.append(f"{what} uses blend mode {mode.lower()}; treated as normal")
        if layer.is_group():
            nodes.append(LayerGroup(children=_read_group(layer, warnings), **common))
            continue
        if getattr(layer, "clipping", False):
            warnings.append(f"{what} is a clipping mask in Photoshop; read as an ordinary layer")
        if isinstance(layer, AdjustmentLayer):
            warnings.append(f"{what} is an adjustment layer (no pixels of its own); skipped")
            continue
        pixels = _pixels(layer)
        if pixels is None:
            # No stored raster (shape/fill layers): let psd-tools draw it. Its drawing has the
            # layer's opacity baked in, so the layer itself is then fully opaque.
            drawn = layer.composite()
            if drawn is None:
                warnings.append(f"{what} has no pixels; skipped")
                continue
            pixels = to_rgba8(drawn)
            common["opacity"] = 1.0
        nodes.append(Layer(text="", image=pixels, offset=(int(layer.left), int(layer.top)), **common))
    return nodes


def _pixels(layer) -> np.ndarray | None:
    """The layer's own pixels as RGBA, with its (enabled) pixel mask applied to the alpha."""
    from psd_tools.constants import ChannelID

    image = layer.topil()
    if image is None or 0 in image.size:
        return None
    rgba = to_rgba8(image)
    if "A" not in image.getbands():
        # PIL cannot hold CMYK with alpha, so topil() drops it: fetch the transparency channel alone.
        alpha = layer.topil(ChannelID.TRANSPARENCY_MASK)
        if alpha is not None and alpha.size == image.size:
            rgba[..., 3] = np.asarray(to_rgba8(alpha))[..., 0]
    if layer.has_mask() and not layer.mask.disabled:
        mask = layer.mask.topil(layer_sized=True)
        if mask is not None and mask.size == image.size:
            rgba[..., 3] = (rgba[..., 3].astype(np.uint16) * to_rgba8(mask)[..., 0] + 127) // 255
    return rgba
