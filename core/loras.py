"""LoRAs for one generation: loaded into the shared model with diffusers' loaders (PEFT), and
unloaded afterwards, also when the job fails or is cancelled.

A context manager around `generate` rather than a sampler hook: hooks are installed after the
prompt is encoded, and a LoRA changes the text encoders as well as the U-Net. Each file is read
as a state dict (safetensors or a pickle, tensors only) and given to `load_lora_weights`, which
understands the diffusers/PEFT and kohya/A1111 names. Before anything is loaded, each file's
names and shapes (`core.weight_files`) are checked against the model, so a LoRA of another family
is a clear error naming it and the model is never touched. Loaded LoRAs are not cached between
jobs: each job reads its files again (cheap next to sampling for LoRAs of usual size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .collage import CollageError
from .weight_files import KIND_WORDS, LORA, WeightsUnreadable, kind_of, lora_family, read_weight_names

MAX_WEIGHT = 4.0  # |weight| beyond this is almost surely a typo (A1111's sliders stop at 2 or so)


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
    return data.get("state_dict", data) if isinstance(data, dict) else data


@contextlib.contextmanager
def applied_loras(model, loras: Sequence[LoraSpec]) -> Iterator[None]:
    """Apply `loras` to `model`'s pipeline inside the block; on exit (also on error or cancel)
    every LoRA layer is removed and the model's weights and modules are as before.

    Raises `CollageError` (one "field: problem" per LoRA that does not fit) before touching the
    model."""
    if not loras:
        yield
        return
    problems = [
        f"{spec.field or spec.label}: {problem}"
        for spec in loras
        if (problem := lora_problem(spec, model)) is not None
    ]
    if problems:
        raise CollageError(problems)
    pipe = model.pipeline
    try:
        names = []
        for i, spec in enumerate(loras):
            name = f"job_lora_{i}"
            try:
                pipe.load_lora_weights(_read_state_dict(Path(spec.path)), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CollageError(
                    [f"{spec.field or spec.label}: LoRA '{spec.label}' cannot be loaded: {e}"]
                ) from e
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[float(s.weight) for s in loras])
        yield
    finally:
        # Removes the PEFT layers themselves (not only the adapters), so that the modules and
        # their state dicts are the model's own again.
        pipe.unload_lora_weights()
