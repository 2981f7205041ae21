"""Photoshop documents (.psd, and .psb, the large-document format) through psd-tools.

A PSD has no place for our settings, so they come from an optional sidecar beside it,
``<stem>.collage.json`` (same schema as the ORA's collage.json; see `document.sidecar_path`).

Real files hold layers psd-tools can only draw with its optional composite dependencies
(gradient fills need scipy, vector strokes aggdraw: ``psd-tools[composite]``, installed with
the project) or not at all. Such a layer is skipped with a note naming it; the document still
reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..collage import Layer, LayerGroup
from .document import DocumentError, LoadedDocument, build_document, sidecar_settings
from .images import to_rgba8

_NORMAL_MODES = ("NORMAL", "PASS_THROUGH")
#: PIL modes that carry alpha ("A" is also a band of "LAB", where it is a colour axis).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SUFFIXES = (".psd", ".psb")


def read_psd(path: Path) -> LoadedDocument:
    """Read a .psd or .psb (psd-tools opens both the same way)."""
    from psd_tools import PSDImage  # imported here: only PSD users pay for it

    try:
        psd = PSDImage.open(path)
    except Exception as error:  # psd-tools raises many kinds (struct, value, assertion) on bad input
        raise DocumentError(
            path, [f"not a readable Photoshop file: {type(error).__name__}: {error}"]
        ) from None
    warnings: list[str] = []
    tree = _read_group(psd, warnings)
    if not tree:
        tree = _flattened(psd, warnings, has_layers=_count(psd) > 0)
    return build_document(path, tree, int(psd.width), int(psd.height), sidecar_settings(path), warnings)


def _read_group(group, warnings: list[str]) -> list[Layer | LayerGroup]:
    nodes: list[Layer | LayerGroup] = []
    try:
        members = list(group)  # psd-tools iterates bottom to top, like our trees
    except Exception as error:
        warnings.append(f"{_what(group)}: psd-tools cannot list its layers ({_reason(error)}); skipped")
        return nodes
    for layer in members:
        try:
            node = _read_layer(layer, warnings)
        except ImportError as error:  # psd-tools' message names the missing package
            warnings.append(
                f"{_what(layer)} needs psd-tools' optional dependencies to be drawn ({_reason(error)};"
                " install them with: pip install 'psd-tools[composite]'); skipped"
            )
            continue
        except Exception as error:  # one layer psd-tools cannot draw must not lose the document
            warnings.append(f"{_what(layer)} cannot be read ({_reason(error)}); skipped")
            continue
        if node is not None:
            nodes.append(node)
    return nodes


def _read_layer(layer, warnings: list[str]) -> Layer | LayerGroup | None:
    from psd_tools.api.layers import AdjustmentLayer

    what = _what(layer)
    name = str(layer.name or "")
    common = {"name": name, "visible": bool(layer.visible), "opacity": int(layer.opacity) / 255.0}
    mode = getattr(layer.blend_mode, "name", str(layer.blend_mode))
    if mode not in _NORMAL_MODES:
        warnings.append(f"{what} uses blend mode {mode.lower()}; treated as normal")
    if layer.is_group():
        return LayerGroup(children=_read_group(layer, warnings), **common)
    if getattr(layer, "clipping", False):
        warnings.append(f"{what} is a clipping mask in Photoshop; read as an ordinary layer")
    if isinstance(layer, AdjustmentLayer):
        warnings.append(f"{what} is an adjustment layer (no pixels of its own); skipped")
        return None
    pixels = _pixels(layer)
    offset = (int(layer.left), int(layer.top))
    if pixels is None:
        # No stored raster (shape and fill layers): let psd-tools draw it. Its drawing has the
        # layer's opacity baked in, so the layer itself is then fully opaque.
        drawn = layer.composite()
        if drawn is None or 0 in drawn.size:
            warnings.append(f"{what} has no pixels; skipped")
            return None
        pixels = to_rgba8(drawn)
        offset = (int(layer.bbox[0]), int(layer.bbox[1]))  # the drawing covers the layer's box
        common["opacity"] = 1.0
    return Layer(text="", image=pixels, offset=offset, **common)


def _pixels(layer) -> np.ndarray | None:
    """The layer's own pixels as RGBA, with its (enabled) pixel mask applied to the alpha."""
    from psd_tools.constants import ChannelID

    image = layer.topil()
    if image is None or 0 in image.size:
        return None
    rgba = to_rgba8(image)
    if image.mode not in _ALPHA_MODES:
        # PIL cannot hold CMYK or Lab with alpha, so topil() drops it: fetch the transparency
        # channel alone (a layer without one is opaque).
        alpha = layer.topil(ChannelID.TRANSPARENCY_MASK)
        rgba[..., 3] = 255
        if alpha is not None and alpha.size == image.size:
            rgba[..., 3] = np.asarray(to_rgba8(alpha))[..., 0]
    if layer.has_mask() and not layer.mask.disabled:
        mask = layer.mask.topil(layer_sized=True)
        if mask is not None and mask.size == image.size:
            rgba[..., 3] = (rgba[..., 3].astype(np.uint16) * to_rgba8(mask)[..., 0] + 127) // 255
    return rgba


def _flattened(psd, warnings: list[str], has_layers: bool) -> list[Layer | LayerGroup]:
    """A file saved flattened, or whose layers could not be read, still has its merged image:
    read it as the "Background" layer (the background image, unless the settings give it a text),
    so writing the document back keeps its pixels and the error says what is missing."""
    what = "no layer of the file could be read" if has_layers else "the file has no layers"
    try:
        image = psd.topil() or psd.composite()
    except Exception as error:
        warnings.append(f"{what}, and its flattened image cannot be read either ({_reason(error)})")
        return []
    if image is None or 0 in image.size:
        return []
    warnings.append(f"{what}; its flattened image is read as the background")
    return [Layer(text="", image=to_rgba8(image), offset=(0, 0), name="Background")]


def _count(psd) -> int:
    try:
        return len(psd)
    except Exception:
        return 0


def _what(layer) -> str:
    try:
        name = str(layer.name or "")
    except Exception:
        name = ""
    return f"layer {name!r}" if name.strip() else "an unnamed layer"


def _reason(error: Exception) -> str:
    """The error's first line (psd-tools' messages go on with advice over several lines)."""
    first = (str(error).splitlines() or [""])[0].strip()
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
