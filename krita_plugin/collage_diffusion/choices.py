"""The document's model, LoRAs and ControlNet against what a bridge lists in /info: the entries of
the dock's model picker, LoRA list and ControlNet picker, and what a request sends. Standard
library only (tested without Qt).

A document keeps names (`DocumentSettings.model`, `.loras`, `.controlnet`), never paths. A name the bridge no
longer lists stays in the document and is shown as such; Generate then refuses in plain words
rather than sending it or quietly using another model (the painter chose it; a silent fallback
would give a different picture without saying why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .settings import DocumentSettings
from .wire_responses import InfoResponse, LibraryEntry, ModelDetails

NOT_ON_BRIDGE = "not on this bridge"


@dataclass
class ModelOption:
    """One entry of the model picker."""

    name: str  # what is saved and sent; "" = the bridge's default (the request's model None)
    label: str
    family: str = ""  # "sd1", "sd2", "sdxl"; "" when not known
    usable: bool = True  # False: shown for information only (a damaged file)
    missing: bool = False  # the document's model, which the bridge does not list
    tip: str = ""


@dataclass
class LoraOption:
    """One LoRA the dock offers to add."""

    name: str
    label: str
    family: str = ""
    fits: bool = True  # made for the chosen model's family, or its family is not known
    usable: bool = True
    tip: str = ""


def model_options(info: InfoResponse | None, saved: str = "") -> list[ModelOption]:
    """The picker's entries: the bridge's default first, then its other models (with their
    family), then checkpoints it cannot use (not choosable, the reason as tip). The document's
    `saved` model, when the bridge does not list it, comes last as "NAME (not on this bridge)".
    Without /info (not connected): the default and the saved name, unchecked."""
    if info is None:
        options = [
            ModelOption(
                "", "default (the bridge's model)", tip="Not connected: the list comes from the bridge"
            )
        ]
        if saved:
            options.append(ModelOption(saved, saved, tip="Not connected: not checked against the bridge yet"))
        return options
    options = [_model_option(info, "", info.model)]
    # The default again by its name only when a document names it (so the picker can show that).
    options += [_model_option(info, n, n) for n in info.models if n != info.model or (saved and n == saved)]
    listed = {o.name for o in options} | {info.model}
    for entry in info.checkpoints:
        if entry.name not in listed and entry.error:
            options.append(
                ModelOption(
                    entry.name, f"{entry.name} (cannot be used)", entry.family, usable=False, tip=entry.error
                )
            )
    if saved and saved not in listed:
        options.append(
            ModelOption(
                saved,
                f"{saved} ({NOT_ON_BRIDGE})",
                usable=False,
                missing=True,
                tip="Saved with this document; this bridge does not list it. Choose another model"
                " or start the bridge with the folder that holds it (--models-dir).",
            )
        )
    return options


def _model_option(info: InfoResponse, name: str, shown: str) -> ModelOption:
    details = info.details(name or None)
    family, family_label = (details.family, details.family_label) if details else ("", "")
    label = f"default ({shown})" if not name else shown
    if family_label:
        label += f" · {family_label}"
    tip = f"native size {details.native_size} px" if details and details.native_size else ""
    return ModelOption(name, label, family, tip=tip)


def chosen_details(info: InfoResponse | None, model: str) -> ModelDetails | None:
    """The details of the document's model (`model` "" = the bridge's default), if listed."""
    if info is None or (model and model not in info.models):
        return None
    return info.details(model or None)


def chosen_family(info: InfoResponse | None, model: str) -> str:
    details = chosen_details(info, model)
    return details.family if details is not None else ""


def lora_options(
    info: InfoResponse | None, family: str, exclude: Sequence[str] = (), all_families: bool = False
) -> list[LoraOption]:
    """The LoRAs to add, not counting those in `exclude` (already chosen): those that fit the
    model's `family` (or whose family is not known), then, with `all_families`, the others
    marked with their family; LoRAs the bridge cannot use last, not choosable."""
    if info is None:
        return []
    fitting, others, unusable = [], [], []
    for entry in info.loras:
        if entry.name in exclude:
            continue
        fits = _fits(entry, family)
        if not fits and not all_families:
            continue
        if entry.error:
            unusable.append(
                LoraOption(
                    entry.name, f"{entry.name} (cannot be used)", entry.family, fits, False, entry.error
                )
            )
        elif fits:
            tip = (
                ""
                if entry.family
                else "Its file does not say which model family it is for; the bridge checks it."
            )
            fitting.append(LoraOption(entry.name, entry.name, entry.family, True, tip=tip))
        else:
            label = entry.family_label or entry.family
            others.append(
                LoraOption(entry.name, f"{entry.name} (for {label})", entry.family, False, tip=_misfit(entry))
            )
    return fitting + others + unusable


def lora_mark(info: InfoResponse | None, family: str, name: str) -> str:
    """What is wrong with a chosen LoRA, in a few words ("" when nothing, or not connected)."""
    return _mark(info.loras, family, name) if info is not None else ""


def controlnet_mark(info: InfoResponse | None, family: str, name: str) -> str:
    """What is wrong with the chosen ControlNet, as `lora_mark` ("" for the bridge's own)."""
    return _mark(info.controlnets, family, name) if info is not None and name else ""


def _mark(entries: list[LibraryEntry], family: str, name: str) -> str:
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        return NOT_ON_BRIDGE
    if entry.error:
        return f"cannot be used: {entry.error}"
    if not _fits(entry, family):
        return f"for {entry.family_label or entry.family}, not this model"
    return ""


def request_choices(
    settings: DocumentSettings, info: InfoResponse | None
) -> tuple[str | None, list[dict], list[str]]:
    """(the request's `model`, its `loras`, problems that stop Generate). Checked against /info
    when the dock has it (else the bridge judges): a model or LoRA it does not list, a LoRA it
    cannot use or made for another family than the model's."""
    model = settings.model or None
    loras = [lora.to_dict() for lora in settings.loras]
    problems: list[str] = []
    if info is None:
        return model, loras, problems
    if model is not None and model not in info.models:
        problems.append(
            f"The model '{model}' chosen for this document is not on this bridge: choose one of its"
            f" models in the dock's Model list (it has {', '.join(info.models) or 'none'})."
        )
        return model, loras, problems
    details = info.details(model)
    family = details.family if details is not None else ""
    shown = model or f"{info.model} (the default)"
    for lora in settings.loras:
        entry = next((e for e in info.loras if e.name == lora.name), None)
        if entry is None:
            problems.append(
                f"The LoRA '{lora.name}' is not on this bridge: remove it from the dock's LoRA list"
                " (or put its file into one of the bridge's model folders)."
            )
        elif entry.error:
            problems.append(f"The LoRA '{lora.name}' cannot be used: {entry.error}")
        elif not _fits(entry, family):
            problems.append(
                f"The LoRA '{lora.name}' was made for {entry.family_label or entry.family}, but the model"
                f" {shown} is {details.family_label or family}: remove the LoRA or choose a model of its family."
            )
    return model, loras, problems


DEFAULT_CONTROLNET_TIP = (
    "The bridge's own ControlNet (its --controlnet, or the demo model's); a model it does not fit"
    " runs without one, with a warning"
)


def controlnet_options(info: InfoResponse | None, family: str, saved: str = "") -> list[ModelOption]:
    """The ControlNet picker's entries: the bridge's own first, then the bridge's ControlNets made
    for the model's `family` (or whose family is not known), those it cannot use last, not
    choosable. The document's `saved` choice, when the bridge does not list it or it does not
    fit the model, comes last, marked (`missing`). Without /info: the default and the saved name."""
    options = [ModelOption("", "bridge default", tip=DEFAULT_CONTROLNET_TIP)]
    if info is None:
        if saved:
            options.append(ModelOption(saved, saved, tip="Not connected: not checked against the bridge yet"))
        return options
    usable, unusable = [], []
    for entry in info.controlnets:
        if not _fits(entry, family) or (entry.error and entry.name == saved):
            continue  # the saved one is shown below, with what is wrong
        if entry.error:
            unusable.append(
                ModelOption(
                    entry.name, f"{entry.name} (cannot be used)", entry.family, False, tip=entry.error
                )
            )
            continue
        label = f"{entry.name} · {entry.family_label}" if entry.family_label else entry.name
        tip = "" if entry.family else "Its files do not say which model family it is for; the job checks it."
        usable.append(ModelOption(entry.name, label, entry.family, tip=tip))
    options += usable + unusable
    mark = controlnet_mark(info, family, saved)
    if saved and mark:
        tip = (
            "Saved with this document; this bridge does not list it. Choose another ControlNet or start"
            " the bridge with the folder that holds it (--models-dir)."
            if mark == NOT_ON_BRIDGE
            else f"Saved with this document: {mark}. Choose another ControlNet."
        )
        options.append(ModelOption(saved, f"{saved} ({mark})", usable=False, missing=True, tip=tip))
    return options


def controlnet_choice(settings: DocumentSettings, info: InfoResponse | None) -> tuple[str | None, list[str]]:
    """(the request's `controlnet`, problems with it). The problems stop Generate only when a
    layer uses structure (`collage.build_request`): else the ControlNet is not used at all. Checked
    against /info when the dock has it (else the bridge judges), as `request_choices`."""
    name = settings.controlnet or None
    if info is None or name is None:
        return name, []
    family = chosen_family(info, settings.model)
    mark = controlnet_mark(info, family, name)
    if not mark:
        return name, []
    if mark == NOT_ON_BRIDGE:
        listed = ", ".join(e.name for e in info.controlnets if not e.error) or "none"
        problem = (
            f"The ControlNet '{name}' chosen for this document is not on this bridge: choose another in"
            f" the dock's ControlNet list, or 'bridge default' (it has {listed})."
        )
    elif mark.startswith("cannot be used"):
        problem = f"The ControlNet '{name}' {mark}: choose another in the dock's ControlNet list."
    else:
        entry = next(e for e in info.controlnets if e.name == name)
        details = chosen_details(info, settings.model)
        shown = settings.model or f"{info.model} (the default)"
        problem = (
            f"The ControlNet '{name}' was made for {entry.family_label or entry.family}, but the model"
            f" {shown} is {details.family_label or family}: choose a ControlNet of its family in the"
            " dock's ControlNet list, or 'bridge default'."
        )
    return name, [problem]


def ip_adapter_missing(info: InfoResponse | None, model: str) -> str:
    """Why the bridge cannot run the "ip-adapter" look for the document's `model` ("" = it can;
    also "" when not connected, or when /info does not tell the model's family: the bridge then
    judges the job). /info's `ip_adapter_families` lists the families with an IP-Adapter and an
    image encoder it reads."""
    details = chosen_details(info, model)
    if info is None or details is None or not details.family or details.family in info.ip_adapter_families:
        return ""
    family = details.family_label or details.family
    return f"the bridge has no IP-Adapter with its image encoder for {family} models"


def _fits(entry: LibraryEntry, family: str) -> bool:
    return not family or not entry.family or entry.family == family


def _misfit(entry: LibraryEntry) -> str:
    return f"Made for {entry.family_label or entry.family}: it does not fit the chosen model."
