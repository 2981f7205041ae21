"""Reading and writing collage documents: OpenRaster (.ora), Photoshop (.psd, .psb), a folder of PNGs.

`load_collage` reads any of them into a `LoadedDocument`: the `Collage` to generate, the layer
tree as the document has it (to write back with `save_ora`), and warnings for what was skipped.

Real documents are messy, so readers forgive what they can and raise `DocumentError` only for a
document that cannot be read at all. The rules, shared by every format:

* Hidden layers and hidden groups are left out (quietly: hiding is a deliberate choice); groups
  are walked into, their opacity multiplying their children's (`flatten_layers`).
* Every layer is cropped to the bounding box of its non-transparent pixels, its offset moved to
  match, so a big canvas with small objects stays cheap.
* A layer that is entirely transparent, has opacity 0, or shows no pixel on the canvas is skipped
  with a warning.
* 16- and 32-bit, grey, palette, CMYK and Lab pixels are converted to 8-bit RGBA.
* A layer's text is its name, whitespace stripped, unless collage.json gives it one. A name an
  editor makes up ("", "Layer 3", "Paint Layer 2", "Group 1", "Background", "Layer 3 copy") says
  nothing about the layer, so such a layer is skipped with a warning asking for a real name.
* Exception: the bottom-most usable layer (visible, with pixels on the canvas), if it is named
  "Background" (any case), has no text from collage.json, and its non-transparent pixels reach all
  four edges of the canvas, becomes the collage's background image instead of a layer. Holes in it
  show white; a single-colour one becomes that colour. (Krita's and Photoshop's new documents
  start with exactly such a layer.) A "Background" anywhere else is just a default name.
* Layers listed under "results" in collage.json are earlier generated images: kept in the tree,
  never generated from. A group listed there is a result as a layer stack: all its layers are
  results (they carry the input layers' names, so only the group is listed).
* Without a prompt in the settings, the prompt is the layer texts joined: "salmon sushi, sliced
  ginger" (each text once, bottom to top). Callers (the CLI) may override it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..collage import CollageError
from .document import DocumentError, LoadedDocument, ResultGroup, ResultLayer, is_default_name, sidecar_path
from .folder import MANIFESTS, read_folder
from .images import as_uint8_image
from .ora import read_ora, save_ora
from .psd import SUFFIXES as PSD_SUFFIXES
from .psd import read_psd
from .settings import SETTINGS_ENTRY, SETTINGS_VERSION, DocumentSettings, collage_settings, parse_settings

__all__ = [
    "SETTINGS_ENTRY",
    "SETTINGS_VERSION",
    "CollageError",
    "DocumentError",
    "DocumentSettings",
    "LoadedDocument",
    "ResultGroup",
    "ResultLayer",
    "collage_settings",
    "is_default_name",
    "load_collage",
    "parse_settings",
    "save_ora",
    "save_png",
    "sidecar_path",
]

SUPPORTED = (
    "an OpenRaster file (.ora), a Photoshop file (.psd, .psb), or a folder with collage.toml or collage.json"
)


def load_collage(path: str | Path) -> LoadedDocument:
    """Read a collage document; raises `DocumentError` (a `CollageError`) naming the file if it cannot."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.exists():
        raise DocumentError(path, [f"no such file or folder (expected {SUPPORTED})"])
    if path.name in MANIFESTS:  # the manifest itself was named: read its folder
        return read_folder(path.parent)
    suffix = path.suffix.lower()
    if suffix == ".ora":
        return read_ora(path)
    if suffix in PSD_SUFFIXES:
        return read_psd(path)
    hint = " (Krita: File → Export… → OpenRaster .ora)" if suffix == ".kra" else ""
    raise DocumentError(
        path, [f"cannot read {suffix or 'files without an extension'}{hint}; expected {SUPPORTED}"]
    )


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an 8-bit grey, RGB or RGBA array as a PNG; returns the path."""
    path = Path(path)
    Image.fromarray(as_uint8_image(image)).save(path, format="PNG")
    return path
