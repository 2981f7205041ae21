"""LoRA adapters kept injected in a model between jobs (`core.loras.applied_loras`'s `keep`).

Injecting a LoRA's PEFT layers and removing them again costs seconds a job on a full-size model
(core/loras.py); switching adapters that stay injected costs a tenth of that. So, within a bound
(`KeepLoras`: a number of adapters and bytes of their parameters, least recently used removed
first), a job's adapters stay in the model, and each job activates exactly its own, in its order,
with its weights (diffusers' `set_adapters` over the U-Net and every text encoder).

Between jobs every kept adapter is disabled (PEFT's `disable_adapters`: each wrapped layer calls
its base layer alone), so a job without LoRAs, or any code that uses the model outside
`applied_loras`, computes exactly what the model without LoRAs does (tests/test_lora_keeping.py
compares bytes). A job's LoRA that is already injected is only switched on; one whose file
changed on disk (size or modification time) is removed and loaded again. The first use of a file
in a job and its second use in the same job are two adapters, as they are two LoRAs to PEFT.

One registry per pipeline object (weakly held): a model dropped drops its registry with it.
Adapters something else removed (`unload_lora_weights`) are forgotten at the next job; when the
last kept adapter goes, the PEFT layers are removed too (`unload_lora_weights`), so the model's
modules are its own again. Not thread-safe: one job at a time per model, as the GPU thread runs.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .model_sources import stat_key

log = logging.getLogger(__name__)

DEFAULT_KEPT_LORAS = 4
DEFAULT_KEPT_BYTES = 1024**3  # an SDXL LoRA of rank 32 is ~0.2 GB in float16


@dataclass(frozen=True)
class KeepLoras:
    """How many LoRAs' PEFT layers stay in a model after a job: at most `max_loras` adapters and
    `max_bytes` of their parameters (the least recently used removed first). `max_loras` 0: every
    adapter is removed after its job. A job's own LoRAs are always loaded, even beyond the bound."""

    max_loras: int = DEFAULT_KEPT_LORAS
    max_bytes: int = DEFAULT_KEPT_BYTES

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KeepLoras.{name}: must be an integer >= 0, got {value!r}")


#: Today's behaviour before keeping: every job's PEFT layers removed after it.
KEEP_NONE = KeepLoras(0, 0)

# (resolved path, size and modification time, which use of the file in the job: 0, 1, ...)
AdapterKey = tuple[str, str, int]


@dataclass
class _Kept:
    name: str  # the adapter's name in the pipeline
    nbytes: int  # its parameters, all components together


@dataclass
class _Registry:
    entries: OrderedDict[AdapterKey, _Kept] = field(default_factory=OrderedDict)
    enabled: bool = False  # whether any kept adapter may be switched on now
    serial: int = 0  # adapter names are never reused

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def new_name(self) -> str:
        self.serial += 1
        return f"kept_lora_{self.serial}"


_registries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> _Registry


def _registry(pipe) -> _Registry:
    reg = _registries.get(pipe)
    if reg is None:
        reg = _registries[pipe] = _Registry()
    return reg


def kept_adapters(pipe) -> dict[AdapterKey, str]:
    """The adapters kept in `pipe` (a diffusers pipeline) by key, least recently used first."""
    reg = _registries.get(pipe)
    return {} if reg is None else {k: e.name for k, e in reg.entries.items()}


def kept_bytes(pipe) -> int:
    reg = _registries.get(pipe)
    return 0 if reg is None else reg.nbytes


def adapter_keys(paths: list[Path]) -> list[AdapterKey]:
    """Each LoRA file's key in a job: its version on disk and its use count so far in the job."""
    keys: list[AdapterKey] = []
    for path in paths:
        resolved = Path(path).resolve()
        version = (str(resolved), stat_key(resolved))
        uses = sum(1 for k in keys if k[:2] == version)
        keys.append((*version, uses))
    return keys


def _present(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def adapter_nbytes(pipe, name: str) -> int:
    """Bytes of the parameters adapter `name` added to `pipe`'s components."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    total = 0
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for layer_name in module.adapter_layer_names:
                part = getattr(module, layer_name, {})
                if name in part:
                    total += sum(p.numel() * p.element_size() for p in part[name].parameters())
    return total


def prepare(pipe, keys: list[AdapterKey], keep: KeepLoras) -> tuple[list[str | None], _Registry]:
    """Before a job: forget adapters no longer in `pipe`, remove older versions of the job's
    files and, within `keep`, the least recently used adapters the job does not use. Returns each
    key's kept adapter name (None: to be loaded) and the registry."""
    reg = _registry(pipe)
    if reg.entries:
        present = _present(pipe)
        for key in [k for k, e in reg.entries.items() if e.name not in present]:
            del reg.entries[key]
        if not reg.entries:
            reg.enabled = False
    versions = {k[:2] for k in keys}
    paths = {k[0] for k in keys}
    stale = [k for k in reg.entries if k[0] in paths and k[:2] not in versions]
    if stale:
        _remove(pipe, reg, stale)
    new = sum(1 for k in set(keys) if k not in reg.entries)
    _evict(pipe, reg, keep, protect=set(keys), extra=new)
    return [reg.entries[k].name if k in reg.entries else None for k in keys], reg


def add(pipe, reg: _Registry, key: AdapterKey, name: str) -> None:
    """Record adapter `name`, just loaded for `key`."""
    reg.entries[key] = _Kept(name, adapter_nbytes(pipe, name))
    reg.enabled = True


def activate(pipe, reg: _Registry, keys: list[AdapterKey], weights: list[float]) -> None:
    """Switch on exactly the job's adapters, in its order, at its weights (none: all off)."""
    for key in keys:
        reg.entries.move_to_end(key)
    if keys:
        pipe.enable_lora()  # layers injected before a newer adapter are still disabled
        reg.enabled = True
        pipe.set_adapters([reg.entries[k].name for k in keys], adapter_weights=weights)
        _freeze(pipe)
    elif reg.enabled:
        pipe.disable_lora()
        reg.enabled = False


def _freeze(pipe) -> None:
    """PEFT makes active adapters trainable; nothing here trains them, and gradients a job takes
    through the text encoder (textual inversion) would otherwise also fill, and keep, theirs."""
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            if param.requires_grad and ".lora_" in name:
                param.requires_grad_(False)


def settle(pipe, keep: KeepLoras) -> None:
    """After a job (also a failed or cancelled one): every kept adapter off, then removed beyond
    `keep`. Whatever goes wrong here ends in all PEFT layers removed, never in a half state."""
    reg = _registry(pipe)
    try:
        if reg.enabled and reg.entries:
            pipe.disable_lora()
        reg.enabled = False
        _evict(pipe, reg, keep)
    except Exception:
        log.exception("could not switch off the kept LoRAs; removing them all")
        release(pipe)


def release(pipe) -> None:
    """Remove every LoRA's PEFT layers from `pipe` (kept or not): its modules are its own again."""
    reg = _registry(pipe)
    reg.entries.clear()
    reg.enabled = False
    pipe.unload_lora_weights()


def forget_failed(pipe, reg: _Registry, name: str) -> None:
    """After `load_lora_weights` failed for `name`: remove what it injected."""
    try:
        if name in _present(pipe):
            pipe.delete_adapters([name])
    except Exception:
        log.exception("could not remove the LoRA that failed to load; removing them all")
        release(pipe)


def _evict(pipe, reg: _Registry, keep: KeepLoras, protect: set = frozenset(), extra: int = 0) -> None:
    """Remove the least recently used unprotected adapters while the bound is exceeded
    (`extra`: adapters about to be loaded). No adapter left: no PEFT layer left either."""
    if not reg.entries:
        return
    drop: list[AdapterKey] = []
    count, nbytes = len(reg.entries) + extra, reg.nbytes
    for key, entry in reg.entries.items():
        if count <= keep.max_loras and nbytes <= keep.max_bytes:
            break
        if key in protect:
            continue
        drop.append(key)
        count, nbytes = count - 1, nbytes - entry.nbytes
    if drop:
        _remove(pipe, reg, drop)


def _remove(pipe, reg: _Registry, keys: list[AdapterKey]) -> None:
    if len(keys) == len(reg.entries):
        release(pipe)  # one pass, and the modules are the model's own again
        return
    pipe.delete_adapters([reg.entries[k].name for k in keys])
    for key in keys:
        del reg.entries[key]
