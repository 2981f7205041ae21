"""Typed keys of the objects the application holds."""

from __future__ import annotations

from aiohttp import web

from .config import BridgeConfig
from .jobs import JobManager

CONFIG = web.AppKey("config", BridgeConfig)
MANAGER = web.AppKey("manager", JobManager)
