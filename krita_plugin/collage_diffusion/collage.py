"""From the document's layers to a bridge request: pure logic, standard library only.

`document.py` turns Krita nodes into `LayerRecord`s (pixels already cropped, scaled and
PNG-encoded); everything after that (which layers take part, their texts and weights, the
generation size, regenerate) happens here, on plain data, so it is tested without Krita.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import wire
from .settings import DocumentSettings, LayerSettings
from .wire import is_default_name

RESULTS_GROUP_NAME = "Collage results"


def layer_text(settings: LayerSettings, name: str) -> str:
    """What a layer shows: its text from the dock, else its name unless that is a made-up one ("")."""
    return settings.text.strip() or ("" if is_default_name(name) else name.strip())


@dataclass
class LayerRecord:
    """One visible layer of the document, as it will be sent.

    `doc_box` is the layer's visible content in document pixels (cropped to alpha > 0 and to the
    canvas); `png` is that content at generation scale, placed at (`x`, `y`) of the generated
    image. `opacity` includes the opacity of the groups around the layer.
    """

    uid: str
    name: str
    kind: str  # Krita's node type: "paintlayer", "vectorlayer", "filelayer", "filllayer", ...
    doc_box: tuple[int, int, int, int]
    png: bytes
    x: int
    y: int
    opacity: float = 1.0
    path: tuple[str, ...] = ()  # names of the groups it is in, outermost first
    note: str = ""  # how it was read, when that is worth saying ("projection", "converted")
    # The bottom layer named "Background" whose pixels cover the canvas may become the image's
    # background (see `build_request`): then one of these is set, flattened over white.
    background_rgb: list[int] | None = None  # its colour, when it is a single one
    background_png: bytes | None = None  # else the canvas at generation size, RGB
    problem: str = ""  # read layers have none (see NodeInfo)

    @property
    def may_be_background(self) -> bool:
        return self.background_rgb is not None or self.background_png is not None


@dataclass
class NodeInfo:
    """A layer as listed in the dock (no pixels): what the layer list shows and keys by.

    `problem` says why the document keeps it out, before any setting ("empty", "no pixel on the
    canvas", "hidden by group 'x'"); `may_be_background` as `LayerRecord`'s, from its bounds.
    """

    uid: str
    name: str
    kind: str
    path: tuple[str, ...] = ()
    depth: int = 0
    opacity: float = 1.0  # with the groups' around it
    problem: str = ""
    may_be_background: bool = False


@dataclass
class Standing:
    """Which layers take part (`take_part`): those chosen, in order, and why each other one not."""

    chosen: list = field(default_factory=list)  # LayerRecord or NodeInfo
    left_out: dict[str, str] = field(default_factory=dict)  # uid -> why, a few plain words
    notes: list[str] = field(default_factory=list)  # sentences for the dock's notice
    background: object | None = None  # the layer that became the image's background


#: The reason of a layer the user ticked off: the dock shows it as its tick, not as a mark.
TICKED_OFF = "ticked off"


def take_part(items: list, layers: dict[str, LayerSettings]) -> Standing:
    """The rules of which layers take part, for the request (`build_request`, on read layers)
    and for the dock's marks (`layer_marks`, on listed ones): bottom to top, a layer is left out
    when the document keeps it out (`problem`), it is ticked off, its opacity is 0, it is the
    bottom "Background" covering the canvas with no text (then the image's background), or
    nothing says what it shows."""
    out = Standing()
    for r in items:
        s = layers.get(r.uid, LayerSettings())
        if r.problem:
            out.left_out[r.uid] = r.problem
        elif not s.enabled:
            out.left_out[r.uid] = TICKED_OFF
        elif r.opacity <= 0:
            out.left_out[r.uid] = "at opacity 0"
            out.notes.append(f"layer '{r.name}' has opacity 0; left out")
        elif not out.chosen and out.background is None and r.may_be_background and not s.text.strip():
            out.background = r
            out.left_out[r.uid] = "the background"
            out.notes.append(f"layer '{r.name}' is the background (give it a text to make it an object)")
        elif not layer_text(s, r.name):
            out.left_out[r.uid] = "not described"
            out.notes.append(
                f"layer '{r.name}' is left out: its name says nothing about what it shows;"
                " give it a text in the dock (or a name like 'a red armchair')"
            )
        else:
            out.chosen.append(r)
    return out


def layer_marks(listed: list[NodeInfo], layers: dict[str, LayerSettings]) -> dict[str, str]:
    """uid -> why the layer will not take part, for the dock's list (ticked-off ones show as such)."""
    return {uid: why for uid, why in take_part(listed, layers).left_out.items() if why != TICKED_OFF}


@dataclass
class Plan:
    """A request ready to send, with what the dock needs to handle its answer."""

    request: wire.JobRequest
    uids: list[str]  # the uniqueId of each layer of the request, in order
    doc_size: tuple[int, int]
    kind: str = "generate"  # "generate", "variants" or "regenerate"
    regenerate_uid: str | None = None
    regenerate_name: str = ""
    notes: list[str] = field(default_factory=list)


def generation_size(
    doc_width: int,
    doc_height: int,
    policy: str,
    limits: wire.Limits | None = None,
    model: wire.ModelDetails | None = None,
) -> tuple[int, int]:
    """The size of the generated image for a document, under a size policy.

    "auto": the model's own liking (`wire.auto_size`: the document's size when it is near the
    model's native area, else the nearest size the model likes, e.g. ~1 MP in multiples of 64 for
    SDXL), or the document's size while the model is unknown; "document": the document's own size
    (rounded to multiples of 8); "512"/"768"/"1024": the longest side is that many pixels, aspect
    kept. Always scaled down if the bridge's pixel or side limits would refuse it. The engine
    needs multiples of 8 and at least 64 a side.
    """
    lim = limits or wire.Limits()
    w, h = max(1, doc_width), max(1, doc_height)
    if policy == "auto" and model is not None and model.native_size > 0:
        w, h = wire.auto_size(model.native_size, model.size_multiple or 8, w, h)
        scale = 1.0
    elif policy in ("document", "auto"):
        scale = 1.0
    else:
        try:
            scale = int(policy) / max(w, h)
        except ValueError:
            scale = 1.0
    scale = min(scale, lim.max_side / max(w, h), math.sqrt(lim.max_canvas_pixels / (w * h)))
    gw, gh = wire.round8(w * scale), wire.round8(h * scale)
    while gw * gh > lim.max_canvas_pixels or max(gw, gh) > lim.max_side:  # rounding up overshot
        gw, gh = (gw - 8, gh) if gw >= gh else (gw, gh - 8)
    return gw, gh


def result_layer_name(prompt: str, seed: int, regenerated: str | None = None, limit: int = 48) -> str:
    """A result layer's name: the prompt (shortened), then the seed (and what was regenerated)."""
    text = " ".join(prompt.split()) or "collage"
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    if regenerated is not None:
        return f"{text} · regenerated {regenerated} · seed {seed}"
    return f"{text} · seed {seed}"


def build_request(
    records: list[LayerRecord],
    settings: DocumentSettings,
    layers: dict[str, LayerSettings],
    size: tuple[int, int],
    doc_size: tuple[int, int],
    *,
    kind: str = "generate",
    seed: int | None = None,
    variants: int = 1,
    base_png: bytes | None = None,
    regenerate_uid: str | None = None,
    model: str | None = None,
    loras: list[dict] | None = None,
    regenerate_mask: bytes | None = None,
    controlnet: str | None = None,
    controlnet_problems: list[str] | None = None,
    ip_adapter_missing: str = "",
) -> tuple[Plan | None, list[str]]:
    """The request for the layers that take part, or None and what stops it (plain sentences).

    `records` are the document's visible, non-empty layers bottom to top; `layers` their settings
    by uniqueId (`DocumentSettings.resolve`). Layers ticked off in the dock are left out.
    `model` and `loras` are the request's (`choices.request_choices`); `controlnet` and its
    `controlnet_problems` (`choices.controlnet_choice`) count only when a layer that takes part
    has a control weight (else no ControlNet runs: it is not sent). `ip_adapter_missing` is why the
    bridge cannot run the "ip-adapter" look (`choices.ip_adapter_missing`; "" = it can, or the bridge
    judges): a layer taking part with that look then stops the request. A regenerate redoes the
    layer `regenerate_uid`, or with `regenerate_mask` (a grey PNG of the selection at `size`)
    the selected pixels instead.
    """
    problems: list[str] = []
    standing = take_part(records, layers)
    chosen: list[LayerRecord] = standing.chosen
    notes, skipped = standing.notes, standing.left_out  # skipped: uid -> why it is not a layer
    background = standing.background.background_rgb if standing.background is not None else None
    background_png = standing.background.background_png if standing.background is not None else None
    specs: list[wire.LayerSpec] = []
    for r in chosen:
        s = layers.get(r.uid, LayerSettings())
        specs.append(
            wire.LayerSpec(
                text=layer_text(s, r.name),
                png=r.png,
                x=r.x,
                y=r.y,
                name=r.name,
                opacity=round(min(1.0, max(0.0, r.opacity)), 4),
                strength=s.strength,
                attention_weight=s.attention_weight,
                control_weight=s.control_weight,
                appearance=s.appearance,
                appearance_weight=s.appearance_weight,
            )
        )
    if not records:
        problems.append(
            "The document has no visible layer with content to send (hidden and empty layers are left out)."
        )
    elif not chosen:
        problems.append("No layer to generate from: tick at least one layer in the list and describe it.")
        problems += [n for n in notes if "left out" in n]
    regenerate_index = None
    regenerate_name = ""
    if kind == "regenerate":
        if base_png is None:
            problems.append("Nothing to regenerate from yet: generate an image first.")
        uids = [r.uid for r in chosen]
        if regenerate_mask is not None:
            regenerate_uid, regenerate_name = None, "selection"
        elif regenerate_uid is None:
            problems.append("Select the layer to regenerate in Krita's layer list (or select an area) first.")
        elif regenerate_uid not in uids:
            names = {r.uid: r.name for r in records}
            why = skipped.get(regenerate_uid)
            if why == TICKED_OFF:
                problems.append(
                    f"The selected layer '{names[regenerate_uid]}' is ticked off in the dock: tick it to regenerate it."
                )
            elif why is not None:
                problems.append(
                    f"The selected layer '{names[regenerate_uid]}' is not an object of the collage ({why}):"
                    " give it a text in the dock, or select another layer."
                )
            else:
                problems.append(
                    "The selected layer is not part of the collage (it is hidden, empty, a result layer"
                    " or not a layer the dock lists): select one of the collage's layers."
                )
        else:
            regenerate_index = uids.index(regenerate_uid)
            regenerate_name = chosen[regenerate_index].name
    uses_structure = any(spec.control_weight > 0 for spec in specs)
    if uses_structure:
        problems += controlnet_problems or []
    if ip_adapter_missing:
        problems += [
            f"The layer '{spec.name}' has the look 'ip-adapter', but {ip_adapter_missing}: choose another"
            " look for it, or give the bridge an IP-Adapter (docs/appearance.md)."
            for spec in specs
            if spec.appearance == "ip-adapter" and spec.appearance_weight > 0
        ]
    if problems:
        return None, problems
    # Without a prompt, the layers' texts, bottom to top, each once (as the CLI's readers do).
    prompt = settings.prompt.strip() or ", ".join(dict.fromkeys(spec.text for spec in specs))
    request = wire.JobRequest(
        prompt=prompt,
        negative_prompt=settings.negative_prompt,
        layers=specs,
        width=size[0],
        height=size[1],
        seed=settings.seed if seed is None else seed,
        variants=variants,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        strength=settings.strength,
        model=model,
        loras=list(loras or []),
        output=settings.output,
        clip_skip=settings.clip_skip,
        controlnet=controlnet if uses_structure else None,
    )
    if background is not None:
        request.background = list(background)
    if background_png is not None:
        request.background_png = background_png
    if regenerate_index is not None:
        request.base_image = base_png
        request.regenerate_layer = regenerate_index
    elif kind == "regenerate":
        request.base_image = base_png
        request.regenerate_mask = regenerate_mask
    problems = request.validate()
    if problems:
        return None, [_plain_problem(p, chosen) for p in problems]
    plan = Plan(
        request=request,
        uids=[r.uid for r in chosen],
        doc_size=doc_size,
        kind=kind,
        regenerate_uid=regenerate_uid if regenerate_index is not None else None,
        regenerate_name=regenerate_name,
        notes=notes + [f"layer '{r.name}': {r.note}" for r in chosen if r.note],
    )
    return plan, []


def _plain_problem(problem: str, chosen: list[LayerRecord]) -> str:
    """A validation problem with ``layers[i]`` replaced by the layer's name."""
    if problem.startswith("layers[") and "]" in problem:
        index_text, _, rest = problem[len("layers[") :].partition("]")
        if index_text.isdigit() and int(index_text) < len(chosen):
            return f"layer '{chosen[int(index_text)].name}'{rest}"
    return problem
