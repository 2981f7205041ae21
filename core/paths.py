"""Where Collage Diffusion keeps files it builds or downloads (demo model, inversion cache, ...)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_NAME = "collage-diffusion"
CACHE_ENV = "COLLAGE_CACHE"


def cache_dir() -> Path:
    """The user's cache folder for this app: `$COLLAGE_CACHE`, else the platform's usual place.

    Windows: `%LOCALAPPDATA%\\collage-diffusion`; macOS: `~/Library/Caches/collage-diffusion`;
    elsewhere: `$XDG_CACHE_HOME/collage-diffusion` or `~/.cache/collage-diffusion`.
    The folder is not created here; callers create what they write.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / APP_NAME
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / APP_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    # XDG says relative paths in XDG_CACHE_HOME are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / APP_NAME
