"""The painter's own model folders: checkpoints, LoRAs, textual-inversion embeddings,
ControlNets, IP-Adapters and CLIP image encoders, found in ComfyUI's or A1111/Forge's layout or in a plain folder, each told from its
header (`core.weight_files`), never from its weights.

Layouts. A models dir is searched for kind folders, in itself and in its `models/` subfolder (so
the ComfyUI or A1111 root and their `models/` folder both work; names compared without case):

    ComfyUI      models/checkpoints  models/diffusers  models/loras  models/embeddings  models/controlnet
                 models/ipadapter  models/clip_vision
    A1111/Forge  models/Stable-diffusion  models/Lora  models/LyCORIS  embeddings/  models/ControlNet

A dir with none of them is a plain folder: every weights file and diffusers folder under it is
classified by its header. In a kind folder every weights file is listed under that kind, and one
that is something else (a LoRA among checkpoints), damaged, truncated or of a family the engine
does not run is listed with `error` saying so: the painter sees why it cannot be chosen. In a
plain folder what is none of the kinds (a VAE, an upscaler, a damaged file) is skipped with
one log line. Loose files beside the kind folders of a laid-out dir are not listed.

Names. An entry's name is its path relative to its kind folder (a plain folder: to the dir),
with forward slashes: `models/checkpoints/sdxl/illustrious.safetensors` is the checkpoint
`sdxl/illustrious.safetensors`; a diffusers folder is named by its folder. Names are unique per
kind: when two files get the same name (two models dirs, or ComfyUI's `checkpoints/` and
`diffusers/`), the first dir given wins (within a dir, the kind folders in the order above) and
the other is skipped with a log line. So a name stays the same across restarts as long as the
dirs are given in the same order.

Sidecar configuration. A single-file checkpoint whose weights do not have its family's standard
shapes loads with a diffusers configuration folder beside it named `<file stem>.config`
(`my-model.safetensors` + `my-model.config/`, which is then not listed itself).

Speed. Each listing walks the folders and stats the files; a file's header is read only when its
(size, modification time) changed since the last read, so listings after the first cost little
more than the walk. `ModelLibrary.listing` rescans at most every `max_age` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .demo_model import DEMO_MODEL_ID
from .families import FAMILIES, ModelFamily, UnsupportedModelError, checkpoint_family, families_of_unet_config
from .ip_adapter_files import (
    ImageEncoderInfo,
    IPAdapterError,
    IPAdapterFiles,
    IPAdapterInfo,
    describe_image_encoder,
    describe_ip_adapter,
)
from .model_sources import MODEL_FILE_SUFFIXES, ModelLoadError, folder_family, peek_model
from .weight_files import (
    CHECKPOINT,
    CLIP_VISION,
    CONTROLNET,
    EMBEDDING,
    IPADAPTER,
    KIND_WORDS,
    KINDS,
    LORA,
    WEIGHT_SUFFIXES,
    WeightsUnreadable,
    embedding_family,
    kind_of,
    lora_family,
    read_weight_names,
)

log = logging.getLogger(__name__)

# Kind folders (lower case), in the order that decides between equal names within one dir.
KIND_FOLDERS = (
    ("checkpoints", CHECKPOINT),
    ("stable-diffusion", CHECKPOINT),
    ("diffusers", CHECKPOINT),
    ("loras", LORA),
    ("lora", LORA),
    ("lycoris", LORA),
    ("embeddings", EMBEDDING),
    ("controlnet", CONTROLNET),
    ("ipadapter", IPADAPTER),
    ("clip_vision", CLIP_VISION),
)
CONFIG_SUFFIX = ".config"  # `<stem>.config/`: a single-file checkpoint's diffusers configuration
_MAX_DEPTH = 12  # folders below a kind folder (a symbolic link loop ends here at the latest)


@dataclass(frozen=True)
class LibraryEntry:
    """One model file or folder of the library."""

    kind: str  # one of weight_files.KINDS
    name: str  # unique within its kind; what requests and the command line name it by
    path: Path
    size: int  # bytes (a folder: all its files)
    family: ModelFamily | None = None  # None: not told by its header (e.g. a small test model)
    error: str = ""  # why it cannot be used ("" when it can)
    native_size: int = 0  # checkpoints: the side of the square it was trained at (0: unknown)
    context_dim: int | None = None  # LoRAs, ControlNets: the width of text features they read
    config: Path | None = None  # checkpoints: the sidecar diffusers configuration, if any
    ip_adapter: IPAdapterInfo | None = None  # IP-Adapters: what its shapes say
    image_encoder: ImageEncoderInfo | None = None  # CLIP image encoders: their widths

    @property
    def usable(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class _Found:
    """A weights file or model folder seen on disk, before its header is read."""

    path: Path
    kind: str | None  # its kind folder's kind; None in a plain folder
    name: str
    is_folder: bool
    size: int
    stamp: tuple  # changes whenever what is read from it may have changed
    config: Path | None = None


@dataclass(frozen=True)
class _Facts:
    """What a file's header says (cached per path and stamp); kind None: none of the four."""

    kind: str | None
    family: ModelFamily | None = None
    error: str = ""
    native_size: int = 0
    context_dim: int | None = None
    ip_adapter: IPAdapterInfo | None = None
    image_encoder: ImageEncoderInfo | None = None


class ModelLibrary:
    """The models in one or more models dirs, listed on demand (see the module's doc).
    Thread-safe: the bridge lists from its request threads and resolves from its GPU thread."""

    def __init__(self, dirs: Sequence[str | os.PathLike[str]], max_age: float = 1.0):
        self.dirs = [Path(d).expanduser().resolve() for d in dirs]
        self.max_age = max_age
        self.headers_read = 0  # files and folders whose header was read (not served from the cache)
        self._cache: dict[Path, tuple[tuple, _Facts]] = {}
        self._listing: dict[str, list[LibraryEntry]] | None = None
        self._scanned_at = 0.0
        self._told: set[tuple] = set()  # log lines already written (a listing repeats every second)
        self._lock = threading.Lock()

    def problems(self) -> list[str]:
        """Why the dirs cannot be listed (each given dir must be a folder)."""
        return [f"--models-dir {d}: not a folder" for d in self.dirs if not d.is_dir()]

    def listing(self, max_age: float | None = None) -> dict[str, list[LibraryEntry]]:
        """Every entry by kind, sorted by name; rescanned when older than `max_age` seconds."""
        max_age = self.max_age if max_age is None else max_age
        with self._lock:
            if self._listing is None or time.monotonic() - self._scanned_at > max_age:
                self._listing = self._scan()
                self._scanned_at = time.monotonic()
            return self._listing

    def scan(self) -> dict[str, list[LibraryEntry]]:
        """A fresh listing (headers read only for new or changed files)."""
        return self.listing(max_age=-1)

    def entries(self, kind: str, max_age: float | None = None) -> list[LibraryEntry]:
        return self.listing(max_age)[kind]

    def find(self, kind: str, name: str) -> LibraryEntry | None:
        """The entry of this kind and name, rescanning once when it is not in the last listing
        (a file added a moment ago is found at once)."""
        for max_age in (None, -1):
            found = next((e for e in self.listing(max_age)[kind] if e.name == name), None)
            if found is not None:
                return found
        return None

    # --- scanning -----------------------------------------------------------------------------
    def _scan(self) -> dict[str, list[LibraryEntry]]:
        listing: dict[str, list[LibraryEntry]] = {kind: [] for kind in KINDS}
        taken: dict[tuple[str, str], Path] = {}
        seen: set[Path] = set()
        for found in (f for d in self.dirs for f in self._walk_dir(d)):
            seen.add(found.path)
            facts = self._facts(found)
            kind = found.kind or facts.kind
            if kind not in KINDS:  # in a plain folder: not a model (a VAE, ...), or unreadable
                level = logging.WARNING if facts.error else logging.INFO
                why = facts.error or f"it is {_NONE_OF}"
                self._tell(level, found, f"model library: skipped {found.path}: {why}")
                continue
            if (kind, found.name) in taken:
                first = taken[kind, found.name]
                self._tell(
                    logging.WARNING,
                    found,
                    f"model library: skipped {found.path}: {first} has the same {kind} name {found.name!r}",
                )
                continue
            taken[kind, found.name] = found.path
            listing[kind].append(_entry(found, kind, facts))
        for path in set(self._cache) - seen:  # forget files that are gone
            del self._cache[path]
        for entries in listing.values():
            entries.sort(key=lambda e: (e.name.lower(), e.name))
        return listing

    def _facts(self, found: _Found) -> _Facts:
        cached = self._cache.get(found.path)
        if cached is not None and cached[0] == found.stamp:
            return cached[1]
        self.headers_read += 1
        facts = _read_facts(found)
        self._cache[found.path] = (found.stamp, facts)
        return facts

    def _tell(self, level: int, found: _Found, message: str) -> None:
        key = (found.path, found.stamp, message)
        if key not in self._told:
            self._told.add(key)
            log.log(level, message)

    def _walk_dir(self, root: Path) -> Iterator[_Found]:
        if not root.is_dir():
            self._tell(
                logging.WARNING, _Found(root, None, "", False, 0, ()), f"model library: {root} is gone"
            )
            return
        folders = kind_folders(root)
        if not folders:
            yield from _walk(root, None, root, 0, set())
        for folder, kind in folders:
            yield from _walk(folder, kind, folder, 0, set())


def resolve_model_name(name: str, library: ModelLibrary | None) -> tuple[str, Path | None]:
    """What `core.models.load_pipeline` loads for a model named on the command line: (reference,
    config folder). "demo" and an existing file or folder are themselves (as without a library);
    otherwise a checkpoint of the library by that name is its path (and sidecar configuration);
    anything else is returned as given (a hub id, or a path that load_pipeline reports missing).
    Raises `ModelLoadError` for a library checkpoint that cannot be used, saying why."""
    if library is None or is_plain_reference(name):
        return name, None
    entry = library.find(CHECKPOINT, name)
    if entry is None:
        return name, None
    if entry.error:
        raise ModelLoadError(f"the checkpoint {name!r} of the model folders cannot be used: {entry.error}")
    return str(entry.path), entry.config


def is_plain_reference(name: str) -> bool:
    """Whether a model named on the command line is "demo" or an existing file or folder, which
    it stays whatever the model folders hold."""
    return name == DEMO_MODEL_ID or Path(name).expanduser().exists()


def kind_folders(root: Path) -> list[tuple[Path, str]]:
    """The kind folders of a models dir, in `KIND_FOLDERS` order (the dir's own before its
    `models/` folder's); empty for a plain folder."""
    bases = [root, *(c for c in _subfolders(root) if c.name.lower() == "models")]
    order = {name: i for i, (name, _) in enumerate(KIND_FOLDERS)}
    kinds = dict(KIND_FOLDERS)
    found = [
        (order[child.name.lower()], i, child)
        for i, base in enumerate(bases)
        for child in _subfolders(base)
        if child.name.lower() in kinds
    ]
    return [(child, kinds[child.name.lower()]) for _, _, child in sorted(found)]


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _walk(folder: Path, kind: str | None, top: Path, depth: int, visited: set[Path]) -> Iterator[_Found]:
    """Weights files and model folders under `folder`, sorted by name, named relative to `top`."""
    try:
        real = folder.resolve()
        if real in visited or depth > _MAX_DEPTH:
            return
        visited.add(real)
        children = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        log.warning("model library: cannot read %s: %s", folder, e)
        return
    files = {c.name for c in children if c.is_file()}
    for child in children:
        path = Path(child.path)
        if child.name.startswith("."):
            continue
        name = path.relative_to(top).as_posix()
        try:
            if child.is_dir():
                stem = child.name.removesuffix(CONFIG_SUFFIX)
                if child.name != stem and any(stem + s in files for s in MODEL_FILE_SUFFIXES):
                    continue  # a checkpoint's sidecar configuration
                if _is_model_folder(path):
                    size, stamp = _folder_stamp(path)
                    yield _Found(path, kind, name, True, size, stamp)
                else:
                    yield from _walk(path, kind, top, depth + 1, visited)
            elif path.suffix.lower() in WEIGHT_SUFFIXES:
                st = child.stat()
                config = path.with_name(path.stem + CONFIG_SUFFIX)
                config_stamp = _stat_stamp(config / "model_index.json") if config.is_dir() else None
                yield _Found(
                    path,
                    kind,
                    name,
                    False,
                    st.st_size,
                    (st.st_size, st.st_mtime_ns, config_stamp),
                    config if config_stamp else None,
                )
        except OSError as e:  # removed while listing, a broken link
            log.debug("model library: skipped %s: %s", path, e)


def _is_model_folder(folder: Path) -> bool:
    """A diffusers pipeline folder, a diffusers model (a ControlNet, once its config is read) or a
    transformers model (a CLIP image encoder); other folders are walked into."""
    if (folder / "model_index.json").is_file():
        return True
    weights = ("diffusion_pytorch_model*", "model.safetensors", "pytorch_model.bin")
    return (folder / "config.json").is_file() and any(any(folder.glob(w)) for w in weights)


def _stat_stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _folder_stamp(folder: Path) -> tuple[int, tuple]:
    """(total bytes, stamp) of a model folder: every file's size and modification time."""
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        parts.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return sum(p[1] for p in parts), tuple(parts)


def _entry(found: _Found, kind: str, facts: _Facts) -> LibraryEntry:
    # Errors name the entry, not the server's path (they are shown to clients of the bridge).
    error = facts.error.replace(str(found.path), repr(found.name))
    return LibraryEntry(
        kind=kind,
        name=found.name,
        path=found.path,
        size=found.size,
        family=facts.family,
        error=error,
        native_size=facts.native_size,
        context_dim=facts.context_dim,
        config=found.config if kind == CHECKPOINT else None,
        ip_adapter=facts.ip_adapter,
        image_encoder=facts.image_encoder,
    )


# --- reading one file or folder ------------------------------------------------------------------
_NONE_OF = "none of a checkpoint, LoRA, embedding, ControlNet, IP-Adapter or CLIP image encoder"


def _read_facts(found: _Found) -> _Facts:
    """What the file or folder is; in a kind folder, anything else is that kind with an error."""
    try:
        facts = _folder_facts(found.path) if found.is_folder else _file_facts(found)
    except (OSError, ValueError) as e:  # changed or removed while read, a config that is not JSON
        facts = _Facts(None, error=f"it could not be read: {e}")
    if found.kind is None or facts.kind == found.kind:
        return facts
    if facts.error and facts.kind is None:  # unreadable: say why
        return _Facts(found.kind, error=facts.error)
    if facts.kind is None:
        return _Facts(found.kind, error=f"it is not {KIND_WORDS[found.kind]}: its weights are {_NONE_OF}")
    return _Facts(found.kind, error=f"it is {KIND_WORDS[facts.kind]}, not {KIND_WORDS[found.kind]}")


def _file_facts(found: _Found) -> _Facts:
    try:
        names = read_weight_names(found.path)
    except WeightsUnreadable as e:
        return _Facts(None, error=str(e))
    kind = kind_of(names)
    if kind == CHECKPOINT:
        suffix = found.path.suffix.lower()
        if suffix not in MODEL_FILE_SUFFIXES:
            return _Facts(kind, error=f"a model file must be .safetensors or .ckpt, not {suffix}")
        try:
            family = checkpoint_family(names.shapes, names.shape_of)
        except UnsupportedModelError as e:
            return _Facts(kind, error=f"it cannot be used as a model: {e}")
        native = family.native_size
        if found.config is not None:
            native = peek_model(found.config)[1] or native
        return _Facts(kind, family, native_size=native)
    if kind == LORA:
        family, width = lora_family(names)
        return _Facts(kind, family, context_dim=width)
    if kind == EMBEDDING:
        return _Facts(kind, embedding_family(names))
    if kind == CONTROLNET:
        from .control.files import describe_controlnet_weights

        info = describe_controlnet_weights(list(names.shapes), names.shape_of)
        return _Facts(kind, info.family, context_dim=info.context_dim)
    if kind == IPADAPTER:
        try:
            adapter = describe_ip_adapter(names)
        except IPAdapterError as e:
            return _Facts(kind, error=f"it cannot be used: {e}")
        return _Facts(kind, adapter.family, context_dim=adapter.context_dim, ip_adapter=adapter)
    if kind == CLIP_VISION:
        return _Facts(kind, image_encoder=describe_image_encoder(found.path))
    return _Facts(kind)  # a VAE, or weights of no kind listed


def _folder_facts(folder: Path) -> _Facts:
    if (folder / "model_index.json").is_file():
        try:
            family = folder_family(folder)
        except ModelLoadError as e:
            return _Facts(CHECKPOINT, error=str(e))
        return _Facts(CHECKPOINT, family, native_size=peek_model(folder)[1] or family.native_size)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if isinstance(config, dict) and "CLIPVisionModelWithProjection" in (config.get("architectures") or []):
        try:
            return _Facts(CLIP_VISION, image_encoder=describe_image_encoder(folder))
        except IPAdapterError as e:
            return _Facts(CLIP_VISION, error=str(e))
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        return _Facts(None)  # a lone U-Net, a VAE, ...
    families = families_of_unet_config(config)
    width = config.get("cross_attention_dim")
    return _Facts(
        CONTROLNET,
        families[0] if len(families) == 1 else None,
        context_dim=width if isinstance(width, int) else None,
    )


# --- IP-Adapters with their image encoders ---------------------------------------------------------
def find_ip_adapter(library: ModelLibrary | None, context_dim: int) -> IPAdapterFiles | None:
    """The first usable IP-Adapter (by name) for a U-Net reading `context_dim`-wide text features,
    with the first usable image encoder whose features it reads; None when there is no such pair."""
    if library is None:
        return None
    listing = library.listing()
    encoders = [e for e in listing[CLIP_VISION] if e.usable and e.image_encoder is not None]
    for adapter in listing[IPADAPTER]:
        if not adapter.usable or adapter.ip_adapter is None or adapter.ip_adapter.context_dim != context_dim:
            continue
        encoder = next((e for e in encoders if e.image_encoder.fits(adapter.ip_adapter)), None)
        if encoder is not None:
            return IPAdapterFiles(adapter.path, encoder.path)
    return None


def ip_adapter_families(library: ModelLibrary | None) -> list[str]:
    """The ids of the families the library has an IP-Adapter and a fitting image encoder for."""
    return [f.id for f in FAMILIES.values() if find_ip_adapter(library, f.context_dim) is not None]
