"""Structural fidelity: a ControlNet per layer, masked and weighted (algorithm.md §3).

Three parts, one module each (`images`, `loading` with `files` for single-file ControlNets,
`hook`); every public name is importable from `core.control`:

* **Control images.** A `ControlDetector` turns one layer's own RGBA pixels into an edge map
  (`CannyDetector`: Canny edges of the object's outline and of its inside). Each layer with
  ``control_weight > 0`` gets its map, placed on the canvas at the layer's offset; where an upper
  layer covers it (whatever that layer's own weight) its edges are hidden, like its pixels are.
  The maps are combined (maximum) into one white-on-black RGB image, what diffusers' Canny
  ControlNets expect. Other detectors (depth, pose...) fit behind the same protocol.
* **Loading.** `load_controlnet` mirrors `core.models.load_pipeline`: a hub id, a diffusers
  ControlNet folder, or a single checkpoint file (diffusers' or the original layout; a full-size
  SD 1.x, 2.x or SDXL one loads offline with the configuration shipped for its family); one
  ControlNet is kept loaded and reused. The family a ControlNet was made for is read from its
  config (`core.families.families_of_unet_config`); one of another family than the model's is
  refused with a message naming both.
* **The sampler hook.** `controlnet_hook(...)` builds a `core.generate` hook. At each step in the
  guidance range it runs the ControlNet on the step's U-Net input (both classifier-free-guidance
  halves, as diffusers does) and multiplies every residual — each down-block residual and the
  mid-block residual, at its own resolution — by the weight map

      W(p) = sum_i control_weight_i * m_i(p)

  (m_i the visible masks, area-averaged to that resolution; the background has weight 0) before
  it is passed to the U-Net as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``. SDXL ControlNets get the U-Net's added conditioning (pooled
  text embedding and ``time_ids``) too. Outside the layers with a weight > 0 the residuals are
  exactly zero, and they scale linearly with the weights.

    controlnet = load_controlnet("lllyasviel/control_v11p_sd15_canny", model=model)
    generate(model, collage, hooks=[controlnet_hook(controlnet)])

The builder returns None when no visible layer has a control weight > 0, so that run is exactly
the run without a ControlNet. See docs/control.md.
"""

from .hook import ControlNetHook, controlnet_hook, step_in_range
from .images import (
    DETECT_PAD,
    DETECTORS,
    NEUTRAL_GREY,
    CannyDetector,
    ControlDetector,
    control_image,
    get_detector,
    layer_control_map,
    weight_map,
)
from .loading import (
    CONTROLNET_FILE_SUFFIXES,
    LoadedControlNet,
    compatibility_problem,
    load_controlnet,
    missing_controlnet_warning,
    unload_controlnet,
    wrap_controlnet,
)

__all__ = [
    "CONTROLNET_FILE_SUFFIXES",
    "DETECTORS",
    "DETECT_PAD",
    "NEUTRAL_GREY",
    "CannyDetector",
    "ControlDetector",
    "ControlNetHook",
    "LoadedControlNet",
    "compatibility_problem",
    "control_image",
    "controlnet_hook",
    "get_detector",
    "layer_control_map",
    "load_controlnet",
    "missing_controlnet_warning",
    "step_in_range",
    "unload_controlnet",
    "weight_map",
    "wrap_controlnet",
]
