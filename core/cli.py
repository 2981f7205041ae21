"""`collage`: generate from a layered document on the command line.

    collage generate INPUT -o OUT.png|OUT.ora [--layers] [--model demo] [--models-dir DIR] [--lora FILE_OR_NAME[:WEIGHT]] [--ip-adapter FILE --image-encoder PATH] [--steps 30] [--seed 0] [--variants 1] [-v]
    collage generate INPUT -o OUT.png --base EARLIER.png --regenerate-mask SELECTION.png [--dilation 8]
    collage inspect INPUT [-v]

INPUT is an OpenRaster .ora (Krita saves these), a .psd/.psb, or a folder with collage.toml/json.
Only our own messages reach the terminal; --verbose (or COLLAGE_DEBUG=1) adds the libraries' notices
and the debug log (core/verbosity.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .cli_models import controlnet_reference, embedding_files, ip_adapter_choice, lora_specs, model_reference
from .collage import SCHEDULERS, CollageError, appearance_mode
from .engine_arguments import add_spatial_arguments, given_engine_options
from .progress import FILL_PHASE
from .verbosity import DEBUG_ENV, debug_requested, set_verbose


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collage", description="Collage Diffusion: layers in, one image out."
    )
    common = argparse.ArgumentParser(add_help=False)  # options every command takes, after its name
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"also show the libraries' notices and our debug log (or set {DEBUG_ENV}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", parents=[common], help="generate an image from a layered document")
    gen.add_argument(
        "input", type=Path, help=".ora, .psd, .psb, or a folder with collage.toml / collage.json"
    )
    gen.add_argument(
        "-o", "--output", type=Path, required=True, help="result .png (or .ora: input layers + result)"
    )
    gen.add_argument(
        "--model",
        default="demo",
        help="'demo', a hub id, a diffusers folder, a .safetensors/.ckpt file, or a checkpoint's name in --models-dir",
    )
    gen.add_argument(
        "--models-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a ComfyUI or A1111/Forge folder (or a plain folder) of models, named by their path in it;"
        " its embeddings can be used in the texts as embedding:NAME or by file name (repeatable)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE_OR_NAME[:WEIGHT]",
        help="apply a LoRA (a file, or its name in --models-dir) at WEIGHT (default 1) (repeatable)",
    )
    gen.add_argument(
        "--model-config", help="for a single-file model: a diffusers folder or hub id with its config"
    )
    gen.add_argument("--prompt", help="full-image prompt (default: the document's, or the layer texts)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--strength", type=float, help="SDEdit strength for layers that set none, 0..1")
    gen.add_argument("--guidance", type=float, dest="guidance_scale")
    gen.add_argument("--scheduler", choices=SCHEDULERS)
    gen.add_argument(
        "--clip-skip",
        type=int,
        help="text encoder layer to read, 1 = last, 2 = penultimate (A1111's count); "
        "default: the model's (SD 1/2: 1, SDXL: 2)",
    )
    gen.add_argument("--variants", type=int, default=1, help="number of images, seeds seed, seed+1, ...")
    gen.add_argument(
        "--layers",
        action="store_true",
        help="each result as a layer stack (.ora output): one layer per object, a background with"
        " the objects' places filled by one more inpainting pass, the flat result hidden on top",
    )
    gen.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    gen.add_argument(
        "--size",
        type=_size_arg,
        default="auto",
        help="auto (default): near the model's own size (SD 1.5 ~512², SDXL ~1 MP), aspect kept, "
        "scaled back to the canvas; document: the canvas size; or WIDTHxHEIGHT",
    )
    regen = gen.add_argument_group("regenerate part of an earlier result")
    regen.add_argument(
        "--base", type=Path, metavar="FILE", help="the earlier result (canvas-size image) to redo part of"
    )
    regen.add_argument(
        "--regenerate-mask",
        type=Path,
        metavar="FILE",
        help="with --base: a canvas-size grey image; its non-black pixels (grown by --dilation) are redone",
    )
    regen.add_argument(
        "--dilation", type=int, default=8, help="pixels around the mask that may change too (default 8)"
    )
    pieces = gen.add_argument_group("Collage Diffusion pieces")
    pieces.add_argument(
        "--attention-schedule",
        choices=["ediffi", "collage"],
        default="ediffi",
        help="g(sigma) of masked attention",
    )
    add_spatial_arguments(pieces)
    pieces.add_argument(
        "--controlnet",
        help="a Canny ControlNet for the model: hub id, folder or file, or its name in --models-dir "
        "(the demo model brings its own)",
    )
    pieces.add_argument(
        "--controlnet-config",
        help="for a single-file ControlNet: its config folder or hub id (full-size SD 1.x/2.x/SDXL ones need none)",
    )
    pieces.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    pieces.add_argument(
        "--control-start", type=float, default=0.0, help="fraction of steps before ControlNet acts"
    )
    pieces.add_argument(
        "--control-end", type=float, default=1.0, help="fraction of steps after which it stops"
    )
    pieces.add_argument("--canny-low", type=int, default=100)
    pieces.add_argument("--canny-high", type=int, default=200)
    pieces.add_argument(
        "--ip-adapter",
        type=Path,
        help='the IP-Adapter file for layers with appearance "ip-adapter" (default: one of --models-dir '
        "models/ipadapter that fits the model); with --image-encoder",
    )
    pieces.add_argument(
        "--image-encoder", type=Path, help="the CLIP image encoder (file or folder) of --ip-adapter"
    )

    ins = commands.add_parser("inspect", parents=[common], help="show how a document is read as a collage")
    ins.add_argument("input", type=Path)
    return parser


def _size_arg(text: str):
    from .sizing import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _apply_overrides(collage, args) -> None:
    for field in (
        "prompt",
        "negative_prompt",
        "steps",
        "seed",
        "strength",
        "guidance_scale",
        "scheduler",
        "clip_skip",
    ):
        value = getattr(args, field, None)
        if value is not None:
            setattr(collage, field, value)


def _variant_paths(output: Path, seeds: list[int]) -> list[Path]:
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-seed{s}{output.suffix}") for s in seeds]


def _inspect(args) -> int:
    from .formats import load_collage
    from .sizing import validate_any_size

    doc = load_collage(args.input)
    c = doc.collage
    print(f"{args.input}: {c.width}×{c.height}, prompt {c.prompt!r}")
    print(f"  seed {c.seed}, steps {c.steps}, guidance {c.guidance_scale}, strength {c.strength}")
    for i, layer in enumerate(c.layers):
        h, w = layer.image.shape[:2]
        print(
            f"  [{i}] {layer.text!r}: {w}×{h} at {layer.offset}, opacity {layer.opacity:.2f},"
            f" strength {c.layer_strength(layer):.2f}, attention {layer.attention_weight:g},"
            f" control {layer.control_weight:g}, appearance {appearance_mode(layer.appearance)}"
            + (
                f" {layer.appearance_weight:g}"
                if appearance_mode(layer.appearance) in ("reference", "ip-adapter")
                else ""
            )
        )
    for warning in doc.warnings:
        print(f"  note: {warning}")
    validate_any_size(c)  # any canvas size: generate scales it to a valid one and back
    return 0


class _PhaseBars:
    """One progress bar per phase (learning an appearance, sampling a batch of variants), opened
    at the phase's first report: only then is its total known (the steps the strength plan runs,
    fewer than the collage's steps below strength 1) and closed when the next phase starts."""

    def __init__(self) -> None:
        self._bar = None
        self._phase: tuple[str, int] | None = None  # (description, total) of the open bar

    def on_progress(self, p) -> None:
        if p.phase == "sampling":
            done, asked = p.variants
            description = f"sampling from variant {done + 1}/{asked}" if asked > 1 else "sampling"
        elif p.phase.startswith("learning appearance") or p.phase == FILL_PHASE:
            description = p.phase
        else:
            return
        if self._bar is None or (description, p.total) != self._phase or p.step < self._bar.n:
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(total=p.total, unit="step", desc=description)
            self._phase = (description, p.total)
        self._bar.update(p.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _regenerate(args, width: int, height: int):
    """--base with --regenerate-mask as a `core.generate.Regenerate`, or None. Raises
    `CollageError` naming the option."""
    if args.base is None and args.regenerate_mask is None:
        return None
    if args.base is None or args.regenerate_mask is None:
        given, missing = ("--base", "--regenerate-mask") if args.base else ("--regenerate-mask", "--base")
        raise CollageError([f"{missing}: missing; {given} needs it"])
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from .generate import Regenerate

    images, problems = {}, []
    for option, path, mode in (
        ("--base", args.base, "RGB"),
        ("--regenerate-mask", args.regenerate_mask, "L"),
    ):
        try:
            with Image.open(path) as image:
                images[option] = np.asarray(image.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as error:
            problems.append(f"{option}: cannot be read as an image ({error})")
            continue
        h, w = images[option].shape[:2]
        if (w, h) != (width, height):
            problems.append(f"{option}: is {w}×{h}, the canvas is {width}×{height}")
    if not problems and not images["--regenerate-mask"].any():
        problems.append("--regenerate-mask: selects no pixel (the image is black)")
    if problems:
        raise CollageError(problems)
    return Regenerate(images["--base"], mask=images["--regenerate-mask"] > 0, dilation_px=args.dilation)


def _generate(args) -> int:
    from .formats import load_collage, save_ora, save_png
    from .loras import applied_loras
    from .models import load_pipeline
    from .options import EngineOptions, build_hooks
    from .sizing import generate_at_size, model_generation_size, validate_any_size

    doc = load_collage(args.input)
    for warning in doc.warnings:
        print(f"note: {warning}", file=sys.stderr)
    collage = doc.collage
    _apply_overrides(collage, args)
    if args.variants < 1:
        raise CollageError(["--variants: must be at least 1"])
    suffix = args.output.suffix.lower()
    if suffix not in (".png", ".ora"):
        raise CollageError([f"--output: must end in .png or .ora, got {args.output.name!r}"])
    if args.layers and suffix != ".ora":
        raise CollageError([f"--layers: a layer stack needs an .ora output, got {args.output.name!r}"])
    # Before loading a model: a bad document should fail in a second. A canvas that is not a
    # multiple of 8 is fine: it is generated at a size that is, and scaled back.
    validate_any_size(collage)
    regenerate = _regenerate(args, collage.width, collage.height)

    loras = lora_specs(args)
    ip_adapter = ip_adapter_choice(args)
    embeddings = embedding_files(args, collage)
    ref, config = model_reference(args)
    print(f"loading model {args.model!r}" + (f" ({ref})" if ref != args.model else "") + "…", file=sys.stderr)
    model = load_pipeline(ref, device=args.device, config=args.model_config or config)
    options = EngineOptions(
        attention_schedule=args.attention_schedule,
        controlnet=controlnet_reference(args),
        controlnet_config=args.controlnet_config,
        control_scale=args.control_scale,
        control_start=args.control_start,
        control_end=args.control_end,
        canny_low=args.canny_low,
        canny_high=args.canny_high,
        ip_adapter=ip_adapter,
        **given_engine_options(args),
    )
    hooks, warnings = build_hooks(model, collage, options)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    bars = _PhaseBars()
    try:
        size = model_generation_size(model, (collage.width, collage.height), args.size)
        if size != (collage.width, collage.height):
            hint = " (--size document to generate at the canvas size)" if args.size == "auto" else ""
            print(
                f"generating at {size[0]}×{size[1]} ({model.family.label}), scaled back to "
                f"{collage.width}×{collage.height}{hint}",
                file=sys.stderr,
            )
        with applied_loras(model, loras):
            t0 = time.perf_counter()
            result = generate_at_size(
                model,
                collage,
                size,
                variants=args.variants,
                progress=bars.on_progress,
                hooks=hooks,
                embeddings=embeddings,
                regenerate=regenerate,
            )
            seconds = time.perf_counter() - t0
            if args.layers:
                from .layer_stack import stack_results

                result = stack_results(
                    model, collage, result, size, progress=bars.on_progress, embeddings=embeddings
                )
    finally:
        bars.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.layers:  # the fill's cost next to the generation's
        print(f"generated in {seconds:.1f} s; background fill {result.fill_seconds:.1f} s", file=sys.stderr)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".ora" and args.layers:
        from .layer_stack import as_layer_group

        groups = [as_layer_group(s, f"collage result (seed {s.seed})") for s in result.stacks]
        save_ora(args.output, doc.tree, collage.width, collage.height, result_groups=groups, collage=collage)
        print(f"wrote {args.output} ({len(groups)} result group(s) on top of the input layers)")
    elif suffix == ".ora":
        results = [(f"collage result (seed {img.seed})", img.image) for img in result.images]
        save_ora(args.output, doc.tree, collage.width, collage.height, results=results, collage=collage)
        print(f"wrote {args.output} ({len(results)} result layer(s) on top of the input layers)")
    else:
        paths = _variant_paths(args.output, [img.seed for img in result.images])
        for path, img in zip(paths, result.images, strict=True):
            save_png(path, img.image)
            print(f"wrote {path} (seed {img.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        set_verbose()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if debug_requested():
        logging.getLogger("core").setLevel(logging.DEBUG)  # ours only: PIL's debug log is noise
    try:
        return _inspect(args) if args.command == "inspect" else _generate(args)
    except (CollageError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
