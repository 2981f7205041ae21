"""How much of the libraries' own chatter reaches the terminal.

transformers and diffusers log notices a painter cannot act on; some while being imported (without
torchvision, transformers says on import of any diffusers pipeline that `CLIPImageProcessor` and
`SiglipImageProcessor` fall back to PIL, a backend this project never uses). Our entry points show
only our own messages; ``COLLAGE_DEBUG=1`` (or ``--verbose``, which sets it for child processes
too) lets the libraries speak again. A library verbosity the user set explicitly always wins.

Stdlib only: `quiet_libraries` runs when `core` is imported, before either library is.
"""

from __future__ import annotations

import importlib
import os
import sys

DEBUG_ENV = "COLLAGE_DEBUG"
# The variables the libraries read their default log level from when they are imported.
_LEVEL_VARIABLES = {"transformers": "TRANSFORMERS_VERBOSITY", "diffusers": "DIFFUSERS_VERBOSITY"}
_set_by_us: set[str] = set()


def debug_requested() -> bool:
    """Whether the user asked for the libraries' messages (``COLLAGE_DEBUG`` set, not 0/false/no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def quiet_libraries() -> None:
    """Have transformers and diffusers log errors only, unless debugging is asked for.

    Through their environment variables, so it holds for notices logged while they are imported
    (this must run first) and in child processes.
    """
    if debug_requested():
        return
    for variable in _LEVEL_VARIABLES.values():
        if variable not in os.environ:
            os.environ[variable] = "error"
            _set_by_us.add(variable)


def set_verbose() -> None:
    """``--verbose``: undo `quiet_libraries` (also in libraries already imported) and set
    ``COLLAGE_DEBUG=1`` so that `core.models` and child processes leave the libraries alone too."""
    os.environ[DEBUG_ENV] = "1"
    for variable in _set_by_us:
        os.environ.pop(variable, None)
    _set_by_us.clear()
    for library, variable in _LEVEL_VARIABLES.items():
        if library in sys.modules and variable not in os.environ:
            importlib.import_module(
                f"{library}.utils.logging"
            ).set_verbosity_warning()  # the libraries' own default level
