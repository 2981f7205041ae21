"""`collage-bridge` / `python -m bridge_server`: run the bridge.

    collage-bridge [--host 127.0.0.1] [--port 7870] [--model demo] [--allow-model REF ...]
                   [--models-dir DIR ...] [--data-dir DIR] [--token TOKEN] [--preload] [--verbose]

Binding to anything but this machine (e.g. --host 0.0.0.0) needs a token; the token may also come
from the COLLAGE_BRIDGE_TOKEN environment variable (kept out of the process list). Only our own
messages are shown; --verbose (or COLLAGE_DEBUG=1) adds the libraries' notices (core/verbosity.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from core.engine_arguments import add_spatial_arguments, given_engine_options
from core.verbosity import DEBUG_ENV, debug_requested, set_verbose
from krita_plugin.collage_diffusion import wire

from .config import BridgeConfig, default_data_dir

TOKEN_ENV = "COLLAGE_BRIDGE_TOKEN"
MIB = 1024 * 1024


def parser() -> argparse.ArgumentParser:
    limits = wire.Limits()
    p = argparse.ArgumentParser(
        prog="collage-bridge", description="Collage Diffusion bridge for the Krita plugin."
    )
    p.add_argument("--host", default=wire.DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=wire.DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument(
        "--model",
        default=wire.DEFAULT_MODEL,
        help="the default model: 'demo', a hub id, a diffusers folder or a checkpoint file (default: %(default)s)",
    )
    p.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="REF",
        help="another model requests may choose by this exact name (repeatable)",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a ComfyUI or A1111/Forge folder (or a plain folder) of models: requests may choose its "
        "checkpoints by their path in it, /info lists its LoRAs, embeddings, ControlNets and IP-Adapters (repeatable)",
    )
    p.add_argument("--data-dir", type=Path, help=f"job records and results (default: {default_data_dir()})")
    p.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV})")
    p.add_argument("--preload", action="store_true", help="load the default model now, not on the first job")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--attention-schedule",
        choices=["ediffi", "collage"],
        default="ediffi",
        help="g(sigma) of masked attention",
    )
    add_spatial_arguments(p)
    p.add_argument(
        "--controlnet",
        help="a Canny ControlNet for the model: hub id, folder or file (the demo model brings its own)",
    )
    p.add_argument(
        "--controlnet-config",
        help="for a single-file ControlNet: its config folder or hub id (full-size SD 1.x/2.x/SDXL ones need none)",
    )
    p.add_argument(
        "--lora-cache-mb",
        type=int,
        default=1024,
        help="LoRA files kept in memory between jobs, least recently used dropped first; 0: none (default: %(default)s)",
    )
    p.add_argument(
        "--loaded-loras",
        type=int,
        default=4,
        help="LoRAs left loaded in the model between jobs, switched off, least recently used removed first;"
        " 0: each job's removed after it (default: %(default)s)",
    )
    p.add_argument(
        "--loaded-lora-mb",
        type=int,
        default=1024,
        help="at most this much of their parameters left loaded (default: %(default)s)",
    )
    p.add_argument("--max-layers", type=int, default=limits.max_layers)
    p.add_argument("--max-pixels", type=int, default=limits.max_canvas_pixels, help="canvas width × height")
    p.add_argument("--max-request-mb", type=int, default=limits.max_request_bytes // MIB)
    p.add_argument("--keep-days", type=float, default=7.0, help="remove finished jobs after this many days")
    p.add_argument("--keep-gb", type=float, default=2.0, help="keep at most this much of results")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call",
    )
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="of the log (default: INFO; DEBUG for our own modules with --verbose)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"also show the libraries' notices and our debug log (or set {DEBUG_ENV}=1)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    limits = wire.Limits(
        max_layers=args.max_layers,
        max_canvas_pixels=args.max_pixels,
        max_layer_pixels=args.max_pixels,
        max_request_bytes=args.max_request_mb * MIB,
    )
    config = BridgeConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        allowed_models=tuple(args.allow_model),
        models_dirs=tuple(args.models_dir),
        token=args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None,
        preload=args.preload,
        lora_cache_bytes=args.lora_cache_mb * MIB,
        loaded_loras=args.loaded_loras,
        loaded_lora_bytes=args.loaded_lora_mb * MIB,
        device=args.device,
        limits=limits,
        keep_seconds=args.keep_days * 86400,
        keep_bytes=int(args.keep_gb * 1024**3),
        allowed_origins=tuple(args.allow_origin),
        engine_options={
            "attention_schedule": args.attention_schedule,
            "controlnet": args.controlnet,
            "controlnet_config": args.controlnet_config,
            # The spatial modes' weights and the reference attention, only when given: the
            # engine's defaults otherwise.
            **given_engine_options(args),
        },
    )
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    return config


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        set_verbose()
    logging.basicConfig(
        level=args.log_level or "INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level is None and debug_requested():
        for ours in ("bridge_server", "core"):  # not the root: PIL's and asyncio's debug logs are noise
            logging.getLogger(ours).setLevel(logging.DEBUG)
    config = config_from_args(args)
    problems = config.problems()
    if problems:
        for problem in problems:
            print(f"collage-bridge: {problem}", file=sys.stderr)
        return 2

    from aiohttp import web

    from .app import create_app

    app = create_app(config)
    where = f"http://{config.host}:{config.port}"
    print(
        f"Collage bridge on {where} - model {config.model!r}, data in {config.data_dir}"
        + (f", models from {', '.join(map(str, config.models_dirs))}" if config.models_dirs else "")
        + (", token required" if config.token else ""),
        flush=True,
    )
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
