"""Command-line options of the engine's pieces that `collage generate` and `collage-bridge` share
(argparse only: the bridge parses its command line before importing torch)."""

from __future__ import annotations

import argparse


def non_negative(text: str) -> float:
    """argparse type of a weight: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_spatial_arguments(group) -> None:
    """--regional-weight and --self-attention-weight (docs/attention.md, "Spatial modes") and
    --reference-attention (docs/appearance.md) on a parser or argument group; None (not given)
    keeps the engine's default."""
    group.add_argument(
        "--regional-weight",
        type=non_negative,
        help="regional conditioning: how much each layer's pixels read the layer's own text (0 off;"
        " default: the engine's, docs/attention.md)",
    )
    group.add_argument(
        "--self-attention-weight",
        type=non_negative,
        help="self-attention modulation inside the layers' masks (0 off; default: the engine's)",
    )
    group.add_argument(
        "--reference-attention",
        action="store_true",
        default=None,
        help='the reference look (appearance "reference") also runs masked reference attention: one'
        " extra U-Net pass per step (default off: no gain measured on the demo model, docs/appearance.md)",
    )


#: The EngineOptions fields these arguments set.
ENGINE_FIELDS = ("regional_weight", "self_attention_weight", "reference_attention")


def given_engine_options(args: argparse.Namespace) -> dict[str, object]:
    """The EngineOptions fields the command line gave (the engine's defaults for the others)."""
    return {name: getattr(args, name) for name in ENGINE_FIELDS if getattr(args, name, None) is not None}
