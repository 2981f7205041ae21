"""The models a request may name: the references given on the command line (--model,
--allow-model) and the checkpoints of the model folders (--models-dir) by their library names.

Only names cross the wire. `resolve` turns a name into what core loads, on the bridge: a request
can never make it load a path of its choosing. A command-line reference means what it meant
before there were model folders ("demo", a path, a hub id) unless it is not an existing path and
is a library name (`core.model_library.resolve_model_name`); a name only the library has is
always that library entry.
"""

from __future__ import annotations

from core.embeddings import EmbeddingFiles
from core.families import FAMILIES
from core.ip_adapter_files import IPAdapterFiles
from core.model_library import (
    LibraryEntry,
    ModelLibrary,
    find_ip_adapter,
    ip_adapter_families,
    is_plain_reference,
    resolve_model_name,
)
from core.model_sources import ModelLoadError
from core.weight_files import CHECKPOINT, CLIP_VISION, CONTROLNET, EMBEDDING, IPADAPTER, LORA
from krita_plugin.collage_diffusion import wire

from .config import BridgeConfig
from .engine import model_details

#: InfoResponse's field for each kind of library entry.
INFO_FIELDS = {
    CHECKPOINT: "checkpoints",
    LORA: "loras",
    EMBEDDING: "embeddings",
    CONTROLNET: "controlnets",
    IPADAPTER: "ipadapters",
    CLIP_VISION: "clip_vision",
}
# Seconds a listing is reused: /info and requests then cost no walk of the folders. A request
# naming a checkpoint missing from the last listing rescans at once, so a new file works.
LISTING_MAX_AGE = 2.0


class ModelCatalog:
    def __init__(self, config: BridgeConfig):
        self.config = config
        self.library = ModelLibrary(config.models_dirs, LISTING_MAX_AGE) if config.models_dirs else None

    def refresh(self) -> None:
        """List the model folders if the last listing is old (blocking: run it off the event loop)."""
        if self.library is not None:
            self.library.listing()

    def names(self) -> list[str]:
        """Every model a request may name: the command line's first (the default first), then the
        model folders' usable checkpoints."""
        library = [e.name for e in self._checkpoints() if e.usable]
        return list(dict.fromkeys([*self.config.models, *library]))

    def allows(self, name: str) -> bool:
        return name in self.config.models or self._find(name) is not None

    def resolve(self, name: str) -> tuple[str, str | None]:
        """(reference, config folder) for `core.models.load_pipeline`. Raises `ModelLoadError`."""
        if name in self.config.models:
            ref, config = resolve_model_name(name, self.library)
            return ref, (str(config) if config else None)
        entry = self._find(name)
        if entry is not None and not entry.path.exists():  # removed since the last listing
            self.library.scan()
            entry = self._find(name)
        if entry is None:
            raise ModelLoadError(f"model {name!r} is no longer in the model folders")
        return str(entry.path), (str(entry.config) if entry.config else None)

    def details(self, name: str, engine) -> wire.ModelDetails:
        """Family and native size of a model a request may name: a library checkpoint's from its
        listing, anything else's from the engine (`Engine.details`)."""
        entry = self._entry_of(name)
        if entry is None:
            return engine.details(name)
        return model_details(name, entry.family, entry.native_size)

    def listing(self) -> dict[str, list]:
        """InfoResponse's library fields (`checkpoints`, `loras`, ...), each entry by name, and
        `ip_adapter_families`."""
        if self.library is None:
            return {}
        fields: dict[str, list] = {
            INFO_FIELDS[kind]: [_wire_entry(e) for e in entries]
            for kind, entries in self.library.listing().items()
        }
        # Exactly the families whose jobs `may_have_ip_adapter` accepts, so the dock offers the
        # look where the bridge takes it (an adapter of no known family, e.g. for the demo model,
        # counts for every family: the engine checks its width when the job runs).
        known, any_width = self._ip_adapter_reach()
        fields["ip_adapter_families"] = list(FAMILIES) if any_width else known
        return fields

    def ip_adapter(self, model) -> IPAdapterFiles | None:
        """The library IP-Adapter and image encoder for a loaded model (`EngineOptions.ip_adapter`)."""
        return find_ip_adapter(self.library, model.pipeline.unet.config.cross_attention_dim)

    def may_have_ip_adapter(self, family_id: str) -> bool:
        """Whether a job for a model of this family ("" unknown) may use an IP-Adapter: the library
        has one for the family, or one for a width no family has (small test models), which the
        engine checks against the loaded model when the job runs."""
        known, any_width = self._ip_adapter_reach()
        return any_width or family_id in known

    def _ip_adapter_reach(self) -> tuple[list[str], bool]:
        """(the families the library has an IP-Adapter and a fitting image encoder for, whether
        it has an adapter of a width no family has and some image encoder), read once per call."""
        if self.library is None:
            return [], False
        listing = self.library.listing()
        any_width = any(
            e.usable and e.family is None and e.ip_adapter is not None for e in listing[IPADAPTER]
        ) and bool(listing[CLIP_VISION])
        return ip_adapter_families(self.library), any_width

    def find_lora(self, name: str) -> LibraryEntry | None:
        """The usable library LoRA by this name (rescanning once when it is not listed)."""
        entry = self.library.find(LORA, name) if self.library is not None else None
        return entry if entry is not None and entry.usable else None

    def embedding_files(self, rescan: bool = False) -> EmbeddingFiles:
        """The usable library embeddings, which a job's texts may name (from the last listing, or
        a fresh one with `rescan`)."""
        if rescan and self.library is not None:
            self.library.scan()
        return EmbeddingFiles.from_library(self.library)

    def embedding_family(self, name: str):
        """The family a library embedding was made for (None: not told by its header)."""
        if self.library is None:
            return None
        return next((e.family for e in self.library.entries(EMBEDDING) if e.name == name), None)

    def find_controlnet(self, name: str) -> LibraryEntry | None:
        """The usable library ControlNet by this name (rescanning once when it is not listed)."""
        entry = self.library.find(CONTROLNET, name) if self.library is not None else None
        return entry if entry is not None and entry.usable else None

    def _checkpoints(self) -> list[LibraryEntry]:
        return self.library.entries(CHECKPOINT) if self.library is not None else []

    def _find(self, name: str) -> LibraryEntry | None:
        """The usable library checkpoint by this name (rescanning once when it is not listed)."""
        entry = self.library.find(CHECKPOINT, name) if self.library is not None else None
        return entry if entry is not None and entry.usable else None

    def _entry_of(self, name: str) -> LibraryEntry | None:
        """The library checkpoint a name stands for, if any (from the last listing)."""
        if self.library is None or (name in self.config.models and is_plain_reference(name)):
            return None
        return next((e for e in self._checkpoints() if e.name == name), None)


def _wire_entry(entry: LibraryEntry) -> wire.LibraryEntry:
    family = entry.family
    return wire.LibraryEntry(
        name=entry.name,
        kind=entry.kind,
        family=family.id if family else "",
        family_label=family.label if family else "",
        size=entry.size,
        error=entry.error,
    )
