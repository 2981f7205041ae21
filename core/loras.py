"""LoRAs for one generation: loaded into the shared model with diffusers' loaders (PEFT), and
switched off afterwards, also when the job fails or is cancelled.

A context manager around `generate` rather than a sampler hook: hooks are installed after the
prompt is encoded, and a LoRA changes the text encoders as well as the U-Net. Each file is read
as a state dict (safetensors or a pickle, tensors only) and given to `load_lora_weights`, which
understands the diffusers/PEFT and kohya/A1111 names. Before anything is loaded, each file's
names and shapes (`core.weight_files`) are checked against the model, so a LoRA of another family
is a clear error naming it and the model is never touched.

Between jobs the files' state dicts stay in a `LoraCache` (CPU memory, least recently used dropped
past a byte bound; keyed by path, size and modification time, so an edited file is read again).
Injecting and removing the PEFT layers is the larger part of a LoRA's cost: benchmarks/
bench_loras.py, full-size SD 1.5 U-Net and text encoder on a shared 2-core CPU, rank-32 kohya LoRA
of 33 MiB: reading the file 0.07-0.1 s (what the cache saves), converting kohya names 2 ms,
injecting and removing the layers 3.8-9.2 s, switching kept adapters on and off 0.1-0.15 s. So
with `keep` (`core.kept_loras.KeepLoras`; the bridge's `--loaded-loras`) the layers stay in the
model after the job, switched off, and a later job switches on exactly its own. The default,
`KEEP_NONE`, removes them after every job (the CLI's one job needs nothing kept): the model's
modules and state dict are then its own again. Either way a job computes byte for byte what it
computes on a model that never saw a LoRA (tests/test_lora_keeping.py), as PEFT's switched-off
layers call their base layer alone and an inactive adapter's layers are skipped.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .collage import CollageError
from .kept_loras import (
    KEEP_NONE,
    KeepLoras,
    activate,
    adapter_keys,
    add,
    forget_failed,
    kept_adapters,
    prepare,
    settle,
)
from .model_sources import stat_key
from .weight_files import KIND_WORDS, LORA, WeightsUnreadable, kind_of, lora_family, read_weight_names

MAX_WEIGHT = 4.0  # |weight| beyond this is almost surely a typo (A1111's sliders stop at 2 or so)
DEFAULT_CACHE_BYTES = 1024**3  # a few dozen LoRAs of usual size (10-300 MB each)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a job: its file, its weight, and how the request named it (for errors)."""

    path: Path
    weight: float = 1.0
    field: str = ""  # e.g. "loras[0]"; problems are reported under it ("" → the file name)
    name: str = ""  # what the user called it ("" → the file name)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


def lora_problem(spec: LoraSpec, model) -> str | None:
    """Why `spec` cannot be applied to `model` (a `core.models.LoadedModel`), or None.

    Read from the file's header only. The width of the text features its cross-attention keys
    read decides when the file has them (that also tells the small test models apart); else the
    family its names or metadata tell, when they tell one."""
    label = f"LoRA '{spec.label}'"
    if not isinstance(spec.weight, (int, float)) or not -MAX_WEIGHT <= spec.weight <= MAX_WEIGHT:
        return f"{label}: weight must be a number in {-MAX_WEIGHT:g}..{MAX_WEIGHT:g}, got {spec.weight!r}"
    path = Path(spec.path)
    if not path.is_file():
        return f"{label}: no such file {path}"
    try:
        names = read_weight_names(path)
    except WeightsUnreadable as e:
        return f"{label}: cannot be read ({e})"
    kind = kind_of(names)
    if kind != LORA:
        return f"{label}: is {KIND_WORDS.get(kind, 'not a weights file of a known kind')}, not a LoRA"
    family, width = lora_family(names)
    model_width = model.pipeline.unet.config.cross_attention_dim
    model_label = model.family.label
    made_for = family.label if family is not None else f"text features of width {width}"
    if width is not None and width != model_width:
        return f"{label}: was made for {made_for}, not for this {model_label} model (width {model_width})"
    if width is None and family is not None and family is not model.family:
        return f"{label}: was made for {family.label}, not for this {model_label} model"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LoraCache:
    """LoRA files' state dicts (CPU tensors) kept between jobs, at most `max_bytes` of them (0:
    none kept); the least recently used go first. A file larger than the bound is read each time.

    Keyed by resolved path, size and modification time: a file written again is read again. The
    tensors are never changed (diffusers copies them into its layers), so one state dict serves
    every job. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str], tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        try:
            key = self._key(Path(path))  # type: ignore[arg-type]
        except (OSError, TypeError):
            return False
        return key in self._entries

    def state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        """The file's tensors by name, from the cache or read now (and kept if they fit)."""
        path = Path(path)
        key = self._key(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        state = _read_state_dict(path)
        size = _nbytes(state)
        with self._lock:
            if size <= self.max_bytes:
                for old in [k for k in self._entries if k[0] == key[0]]:  # an older version of the file
                    del self._entries[old]
                self._entries[key] = (state, size)
                total = sum(n for _, n in self._entries.values())
                while total > self.max_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    total -= dropped
        return state

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    def _key(path: Path) -> tuple[str, str]:
        resolved = path.resolve()
        return str(resolved), stat_key(resolved)


#: The cache `applied_loras` uses unless given another (the bridge sizes its own: --lora-cache-mb).
DEFAULT_CACHE = LoraCache()


@contextlib.contextmanager
def applied_loras(
    model, loras: Sequence[LoraSpec], cache: LoraCache | None = None, keep: KeepLoras | None = None
) -> Iterator[None]:
    """Apply exactly `loras` to `model`'s pipeline inside the block, at their weights. The files
    are read through `cache` (default: `DEFAULT_CACHE`).

    `keep` (default `KEEP_NONE`: every LoRA's PEFT layers removed on exit, the model's modules
    its own again) lets adapters stay injected after the job, switched off, within its bound
    (`core.kept_loras`); a later job switches on its own and nothing else. Either way, on exit
    (also on error or cancel) the model computes what the model without LoRAs does.

    Raises `CollageError` (one "field: problem" per LoRA that does not fit) before touching the
    model."""
    keep = KEEP_NONE if keep is None else keep
    pipe = model.pipeline
    if not loras and not kept_adapters(pipe):
        yield
        return
    problems = [
        f"{spec.field or spec.label}: {problem}"
        for spec in loras
        if (problem := lora_problem(spec, model)) is not None
    ]
    if problems:
        raise CollageError(problems)
    cache = DEFAULT_CACHE if cache is None else cache
    try:
        keys = adapter_keys([Path(spec.path) for spec in loras])
        names, registry = prepare(pipe, keys, keep)
        for spec, key, name in zip(loras, keys, names, strict=True):
            if name is not None:
                continue
            name = registry.new_name()
            try:
                # A shallow copy: diffusers renames keys (kohya's) in the dict it is given.
                state = dict(cache.state_dict(Path(spec.path)))
                pipe.load_lora_weights(state, adapter_name=name)
            except BaseException as e:  # nothing half-loaded stays behind, whatever it was
                forget_failed(pipe, registry, name)
                if not isinstance(e, (ValueError, KeyError, RuntimeError, OSError)):
                    raise
                raise CollageError(
                    [f"{spec.field or spec.label}: LoRA '{spec.label}' cannot be loaded: {e}"]
                ) from e
            add(pipe, registry, key, name)
        activate(pipe, registry, keys, [float(s.weight) for s in loras])
        yield
    finally:
        # Every adapter off, and removed beyond `keep` (all of them, PEFT layers included, by
        # default), so that the modules and their state dicts are the model's own again.
        settle(pipe, keep)
