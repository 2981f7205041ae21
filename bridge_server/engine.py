"""What the GPU thread runs for one job: `RunRequest` in, core's `GenerationResult` out. `Engine`
is the real one (models through `core.models`, then `core.generate` through
`core.sizing.generate_at_size`, so any canvas size works, with the configured hooks); tests and
benchmarks pass their own `RunJob`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from core.collage import Collage, CollageError
from core.generate import GenerationResult
from core.kept_loras import KeepLoras
from core.loras import DEFAULT_CACHE_BYTES, LoraCache
from core.progress import Progress
from krita_plugin.collage_diffusion import wire


def model_details(name: str, family, native_size: int) -> wire.ModelDetails:
    """The wire's description of a model of `family` (a `core.families.ModelFamily`, or None
    when it is not known yet)."""
    if family is None:
        return wire.ModelDetails(name, "", "", 0)
    return wire.ModelDetails(name, family.id, family.label, native_size, family.size_multiple)


@dataclass
class RunRequest:
    """What the GPU thread gets for one job."""

    collage: Collage
    model: str
    variants: int
    seeds: list[int] | None
    progress: Callable[[Progress], None]
    cancel: threading.Event
    max_batch: int | None
    base_image: np.ndarray | None = None
    regenerate_layer: int | None = None
    regenerate_dilation: int = 8
    regenerate_mask: np.ndarray | None = None  # (H, W) bool: a selection, instead of a layer
    loras: list = field(default_factory=list)  # core.loras.LoraSpec, checked against the family
    output: str = wire.OUTPUT_IMAGE  # OUTPUT_LAYERS: a `core.layer_stack.StackedResult` comes back
    embeddings: object = None  # core.embeddings.EmbeddingFiles the texts may name
    # The library ControlNet the request named (`core.model_library.LibraryEntry`); None: the
    # bridge's own (EngineOptions.controlnet, or the demo model's).
    controlnet: object | None = None

    @classmethod
    def of(cls, converted, progress: Callable[[Progress], None], cancel: threading.Event, max_batch):
        """The run of a decoded request (`convert.Converted`)."""
        return cls(
            collage=converted.collage,
            model=converted.model,
            variants=converted.variants,
            seeds=converted.seeds,
            progress=progress,
            cancel=cancel,
            max_batch=max_batch,
            base_image=converted.base_image,
            regenerate_layer=converted.regenerate_layer,
            regenerate_dilation=converted.regenerate_dilation,
            regenerate_mask=converted.regenerate_mask,
            loras=converted.loras,
            output=converted.output,
            embeddings=converted.embeddings,
            controlnet=converted.controlnet,
        )


#: Runs one job on the GPU thread; returns core's result or raises (GenerationCancelled, ...).
RunJob = Callable[[RunRequest], GenerationResult]


class Engine:
    """The real engine: models through `core.models.load_pipeline`, then `core.generate`.

    Core keeps one model in memory and reuses it for the same reference; the engine only
    remembers the last one it got (holding more would keep released models alive).
    """

    def __init__(
        self,
        device: str | None = None,
        options: dict | None = None,
        resolve: Callable[[str], tuple[str, str | None]] | None = None,
        lora_cache_bytes: int = DEFAULT_CACHE_BYTES,
        ip_adapter: Callable[[object], object] | None = None,
        keep_loras: KeepLoras | None = None,
    ):
        self.device = device
        # The loaded model -> its IP-Adapter files (`catalog.ModelCatalog.ip_adapter`), or None.
        self.ip_adapter = ip_adapter
        # A request's model name -> (reference, config folder) for core; `catalog.ModelCatalog`.
        self.resolve = resolve or (lambda name: (name, None))
        self.options = options or {}  # core.options.EngineOptions fields (attention, ControlNet)
        self.current = None  # core.models.LoadedModel
        self._peeked: dict[str, tuple] = {}  # ref -> (family, native size) read from its files
        self.current_ref: str | None = None
        # LoRA files read once and kept while they are reused (--lora-cache-mb), and the PEFT
        # layers of the last few left in the model, switched off between jobs (--loaded-loras).
        self.lora_cache = LoraCache(lora_cache_bytes)
        self.keep_loras = KeepLoras() if keep_loras is None else keep_loras

    def load(self, name: str):
        from core.models import load_pipeline

        ref, config = self.resolve(name)
        if self.current is not None and name != self.current_ref:
            self.release_loras()  # another model: the old one's LoRAs go with it
        model = load_pipeline(ref, device=self.device, config=config)
        self.current, self.current_ref = model, name
        return model

    def run(self, req: RunRequest) -> GenerationResult:
        from core.loras import applied_loras
        from core.sizing import generate_at_size, generation_size

        if req.model != self.current_ref:
            req.progress(Progress(wire.PHASE_LOADING, 0, 1))
        model = self.load(req.model)
        kwargs = {}
        if req.regenerate_layer is not None or req.regenerate_mask is not None:
            # ENGINE HOOK (regenerate): convert.engine_supports_regenerate() lets such requests
            # through only when core has this.
            from core.generate import Regenerate

            kwargs["regenerate"] = Regenerate(
                base_image=req.base_image,
                layer_index=req.regenerate_layer,
                dilation_px=req.regenerate_dilation,
                mask=req.regenerate_mask,
            )
        hooks, warnings = self._hooks(model, req)
        # Any canvas size: generated at the nearest multiples of 8 (the CLI's "document" size;
        # the dock sends those already), scaled back, strength-0 pixels pasted back unchanged.
        canvas = (req.collage.width, req.collage.height)
        size = generation_size(canvas, "document", model.native_size, model.family.size_multiple)
        # Exactly the job's LoRAs on; after it (also on error or cancel) all off, and removed
        # beyond --loaded-loras.
        with applied_loras(model, req.loras, self.lora_cache, self.keep_loras):
            result = generate_at_size(
                model,
                req.collage,
                size,
                variants=req.variants,
                seeds=req.seeds,
                progress=req.progress,
                cancel=req.cancel,
                max_batch=req.max_batch,
                hooks=hooks,
                embeddings=req.embeddings,
                **kwargs,
            )
            if req.output == wire.OUTPUT_LAYERS:  # one background fill per image, LoRAs still on
                from core.layer_stack import stack_results

                result = stack_results(
                    model,
                    req.collage,
                    result,
                    size,
                    progress=req.progress,
                    cancel=req.cancel,
                    embeddings=req.embeddings,
                )
        result.warnings[:0] = warnings
        return result

    def release_loras(self) -> None:
        """Remove the LoRAs left loaded in the current model (the model switch, the bridge's stop)."""
        from core.kept_loras import kept_adapters, release

        if self.current is not None and kept_adapters(self.current.pipeline):
            release(self.current.pipeline)

    def _hooks(self, model, req: RunRequest) -> tuple[list, list[str]]:
        """The job's sampler hooks. The ControlNet is cached by core and re-checked against this
        job's model each time. The bridge's own one that does not fit is a warning (the image is
        made without it); one the request named fails the job naming `controlnet`, by its name."""
        from core.models import ModelLoadError
        from core.options import EngineOptions, build_hooks

        options = EngineOptions(**self.options)
        if self.ip_adapter is not None:
            options.ip_adapter = self.ip_adapter
        if req.controlnet is None:
            return build_hooks(model, req.collage, options, controlnet_errors="warn")
        path, name = str(req.controlnet.path), req.controlnet.name
        options.controlnet, options.controlnet_config = path, None
        try:
            return build_hooks(model, req.collage, options)
        except ModelLoadError as error:  # no path of the server in what the client reads
            raise CollageError([f"controlnet: {str(error).replace(path, name)}"]) from None

    def details(self, ref: str) -> wire.ModelDetails:
        """A model's family and native size: the loaded model's own, else read from its files
        once (no weights are read; a hub id not downloaded yet stays unknown until loaded)."""
        model = self.current if self.current is not None and self.current_ref == ref else None
        if model is not None:
            family, native = model.family, model.native_size
        else:
            if ref not in self._peeked or self._peeked[ref][0] is None:
                from core.models import peek_model

                self._peeked[ref] = peek_model(ref)
            family, native = self._peeked[ref]
        return model_details(ref, family, native)

    def describe(self, ref: str) -> tuple[bool, str, str]:
        """(loaded, device, dtype) of a model: where it runs, or where it will once loaded."""
        if self.current is not None and self.current_ref == ref:
            return True, str(self.current.device), str(self.current.dtype).replace("torch.", "")
        try:
            from core.models import pick_device, pick_dtype

            device = pick_device(self.device)
            return False, str(device), str(pick_dtype(device)).replace("torch.", "")
        except Exception as error:  # e.g. --device cuda on a machine without one
            return False, f"unavailable: {error}", "?"
