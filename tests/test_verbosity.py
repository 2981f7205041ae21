"""core/verbosity.py: the libraries stay quiet unless the user asks (COLLAGE_DEBUG, --verbose)."""

from __future__ import annotations

import os

import pytest

from core import verbosity
from core.verbosity import DEBUG_ENV, debug_requested, quiet_libraries, set_verbose

VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


@pytest.fixture
def clean(monkeypatch):
    """No library variables and no COLLAGE_DEBUG; whatever the test sets is undone after."""
    for name in (*VARIABLES, DEBUG_ENV):
        monkeypatch.setenv(name, "x")  # recorded, so the teardown restores the session's value
        monkeypatch.delenv(name)
    monkeypatch.setattr(verbosity, "_set_by_us", set())
    return monkeypatch


@pytest.mark.parametrize(
    ("value", "asked"), [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)]
)
def test_debug_requested(clean, value, asked):
    clean.setenv(DEBUG_ENV, value)
    assert debug_requested() is asked


def test_quiet_sets_error_level_but_keeps_a_users_choice(clean):
    clean.setenv("DIFFUSERS_VERBOSITY", "info")
    quiet_libraries()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"


def test_debug_leaves_the_libraries_alone(clean):
    clean.setenv(DEBUG_ENV, "1")
    quiet_libraries()
    assert not any(name in os.environ for name in VARIABLES)


def test_verbose_undoes_only_our_settings(clean):
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = [logs.get_verbosity() for logs in (diffusers_logging, transformers_logging)]
    clean.setenv("DIFFUSERS_VERBOSITY", "info")  # the user's
    quiet_libraries()
    try:
        transformers_logging.set_verbosity_error()
        set_verbose()
        assert os.environ[DEBUG_ENV] == "1"  # child processes and core.models see it
        assert "TRANSFORMERS_VERBOSITY" not in os.environ
        assert os.environ["DIFFUSERS_VERBOSITY"] == "info"
        # transformers was imported already: its level is back to its own default.
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING
    finally:
        for logs, level in zip((diffusers_logging, transformers_logging), levels, strict=True):
            logs.set_verbosity(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_bridge_takes_verbose(clean, tmp_path, capsys, verbose):
    from bridge_server import __main__ as bridge

    calls = []
    clean.setattr(bridge, "set_verbose", lambda: calls.append(1))
    clean.delenv("COLLAGE_BRIDGE_TOKEN", raising=False)
    args = ["--host", "0.0.0.0", "--data-dir", str(tmp_path)]  # refused before it serves
    assert bridge.main([*args, *(["--verbose"] if verbose else [])]) == 2
    assert calls == ([1] if verbose else [])
    assert "needs --token" in capsys.readouterr().err
