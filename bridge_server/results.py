"""A finished job's images written to the job store as PNGs, and their descriptions for the wire
(`wire.ResultInfo`, and `wire.ResultLayerInfo` for the layers of a layer stack). Runs on the
bridge's io thread; the PNGs are encoded on the `encode` pool (zlib releases the GIL)."""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from core.generate import GenerationResult
from krita_plugin.collage_diffusion import wire

from .images import encode_png
from .storage import JobStore


def save_results(
    store: JobStore, encode: Executor, job_id: str, result: GenerationResult, level: int
) -> list[wire.ResultInfo]:
    """Each image of `result` (and its layer stack, for output "layers") stored under `job_id`."""
    images = [np.ascontiguousarray(generated.image) for generated in result.images]
    encoded = list(encode.map(lambda image: encode_png(image, level), images))
    infos = []
    for index, (generated, image, data) in enumerate(zip(result.images, images, encoded, strict=True)):
        store.write_result(job_id, index, data)
        infos.append(
            wire.ResultInfo(
                index=index,
                seed=int(generated.seed),
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                url=wire.route(wire.ROUTE_JOB_RESULT, job_id=job_id, index=index),
                bytes=len(data),
                layers=save_stack(store, encode, job_id, index, result, level),
            )
        )
    return infos


def save_stack(
    store: JobStore, encode: Executor, job_id: str, index: int, result: GenerationResult, level: int
) -> list[wire.ResultLayerInfo]:
    """The layers of result `index`'s stack (output "layers"), each a PNG; none otherwise.
    The stack's hidden flat layer is the result PNG itself and is not stored twice."""
    stacks = getattr(result, "stacks", None) or []
    if index >= len(stacks):
        return []
    layers = [layer for layer in stacks[index].layers if layer.kind != "flat"]
    encoded = list(encode.map(lambda layer: encode_png(layer.image, level), layers))
    infos = []
    for k, (layer, data) in enumerate(zip(layers, encoded, strict=True)):
        store.write_result_layer(job_id, index, k, data)
        infos.append(
            wire.ResultLayerInfo(
                name=layer.name,
                kind=layer.kind,
                x=int(layer.offset[0]),
                y=int(layer.offset[1]),
                width=int(layer.image.shape[1]),
                height=int(layer.image.shape[0]),
                url=wire.route(wire.ROUTE_JOB_RESULT_LAYER, job_id=job_id, index=index, layer=k),
                bytes=len(data),
            )
        )
    return infos
