"""The bridge's settings: one dataclass, filled by the command line or by tests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from krita_plugin.collage_diffusion import wire

#: Tokens shorter than this are refused for a non-loopback bind (they could be guessed).
MIN_TOKEN_CHARS = 16


def default_data_dir() -> Path:
    """`<cache>/bridge`, next to the demo model (see `core.paths.cache_dir`)."""
    from core.paths import cache_dir

    return cache_dir() / "bridge"


def is_loopback(host: str) -> bool:
    """Whether binding to `host` only listens on this machine ("localhost", 127.x, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass
class BridgeConfig:
    host: str = wire.DEFAULT_HOST
    port: int = wire.DEFAULT_PORT
    model: str = wire.DEFAULT_MODEL  # the default model, used when a request names none
    allowed_models: tuple[str, ...] = ()  # further models a request may name (--allow-model)
    # Model folders (--models-dir): their checkpoints may be named too, by library name
    # (core/model_library.py); their LoRAs, embeddings and ControlNets are listed in /info.
    models_dirs: tuple[Path, ...] = ()
    data_dir: Path = field(default_factory=default_data_dir)
    token: str | None = None
    # Settings of the engine's pieces (core.options.EngineOptions fields): attention schedule,
    # ControlNet. Chosen when the bridge starts; requests cannot name files.
    engine_options: dict = field(default_factory=dict)
    lora_cache_bytes: int = 1024**3  # LoRA files kept in memory between jobs (--lora-cache-mb)
    # LoRAs whose PEFT layers stay in the model between jobs, switched off (--loaded-loras,
    # --loaded-lora-mb; core/kept_loras.py); 0 LoRAs: removed after every job.
    loaded_loras: int = 4
    loaded_lora_bytes: int = 1024**3
    preload: bool = False  # load the default model at startup instead of on the first job
    device: str | None = None  # None: core picks the best
    limits: wire.Limits = field(default_factory=wire.Limits)
    max_queue: int = 256  # jobs waiting; more are refused with 503
    max_queued_bytes: int = 4 * 1024**3  # decoded layer pixels held by waiting jobs
    max_batch: int | None = None  # variants generated together; None: core decides
    preview_interval: float = 1.0  # seconds between preview images in progress events
    preview_size: int = 256  # longest side of a preview, pixels
    # zlib level of result PNGs; None: 0 (stored) on a loopback bind, where bytes cost nothing
    # and encoding is most of the transport time, else 1 (fast, about 2/3 of the size).
    result_png_level: int | None = None
    keep_seconds: float = 7 * 24 * 3600.0  # finished jobs older than this are removed
    keep_bytes: int = 2 * 1024**3  # beyond this, the oldest finished jobs are removed
    cleanup_interval: float = 3600.0  # seconds between cleanups (also at startup)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call (no CORS by default)
    max_events_kept: int = 64  # the last events of a finished job kept in memory, without previews

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.allowed_models = tuple(dict.fromkeys(self.allowed_models))
        self.models_dirs = tuple(Path(d).expanduser() for d in self.models_dirs)

    @property
    def png_level(self) -> int:
        """The zlib level result PNGs are written with (see `result_png_level`)."""
        if self.result_png_level is not None:
            return self.result_png_level
        return 0 if is_loopback(self.host) else 1

    @property
    def models(self) -> list[str]:
        """The models named on the command line, the default first (the model folders'
        checkpoints come on top: `catalog.ModelCatalog.names`)."""
        return list(dict.fromkeys([self.model, *self.allowed_models]))

    def problems(self) -> list[str]:
        """Why the bridge must not start with these settings (empty when it may)."""
        p = []
        if not is_loopback(self.host):
            if not self.token:
                p.append(
                    f"--host {self.host}: listening beyond this machine needs --token (anyone on the"
                    " network could otherwise use the GPU and read the results); make one with"
                    ' python -c "import secrets; print(secrets.token_urlsafe())"'
                )
            elif len(self.token) < MIN_TOKEN_CHARS:
                p.append(f"--token: must be at least {MIN_TOKEN_CHARS} characters for a network bind")
        if self.token is not None and not self.token.strip():
            p.append("--token: must not be empty")
        p += [f"--models-dir {d}: not a folder" for d in self.models_dirs if not d.is_dir()]
        if self.lora_cache_bytes < 0:
            p.append(f"--lora-cache-mb: must be 0 (no cache) or more, got {self.lora_cache_bytes // 1024**2}")
        if self.loaded_loras < 0:
            p.append(f"--loaded-loras: must be 0 (none kept) or more, got {self.loaded_loras}")
        if self.loaded_lora_bytes < 0:
            p.append(f"--loaded-lora-mb: must be 0 or more, got {self.loaded_lora_bytes // 1024**2}")
        if not 0 <= self.port < 65536:
            p.append(f"--port: must be in 0..65535 (0: any free port), got {self.port}")
        return p
