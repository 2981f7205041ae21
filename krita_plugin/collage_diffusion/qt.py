"""PyQt5 / PyQt6 in one place: every other plugin module imports Qt from here.

Krita 5.x embeds PyQt5, Krita 6 embeds PyQt6. The binding Krita has already loaded wins (the
``krita`` module imports it before any plugin), so a system that has both installed still gets
the one Krita uses. Outside Krita (tests, tools) PyQt5 is tried first, then PyQt6;
``COLLAGE_QT=5`` or ``6`` forces one.

The rest of the plugin writes Qt code that runs on both: fully scoped enums
(``QImage.Format.Format_ARGB32``, which PyQt5 5.11+ accepts too), ``exec()`` (PyQt5 has it on
Python 3), and the few helpers below for what differs (QAction's module, raw image bytes).
"""

from __future__ import annotations

import os
import sys


def _binding() -> int:
    forced = os.environ.get("COLLAGE_QT", "").strip()
    if forced in ("5", "6"):
        return int(forced)
    if "PyQt6.QtCore" in sys.modules:
        return 6
    if "PyQt5.QtCore" in sys.modules:
        return 5
    try:
        import PyQt5.QtCore  # noqa: F401

        return 5
    except ImportError:
        return 6


QT_BINDING = _binding()

if QT_BINDING == 6:
    from PyQt6 import QtCore, QtGui, QtNetwork, QtWidgets
    from PyQt6.QtGui import QAction
else:
    from PyQt5 import QtCore, QtGui, QtNetwork, QtWidgets
    from PyQt5.QtWidgets import QAction

# The names the plugin uses, re-exported.
Qt = QtCore.Qt
QObject = QtCore.QObject
QTimer = QtCore.QTimer
QEventLoop = QtCore.QEventLoop
QByteArray = QtCore.QByteArray
QBuffer = QtCore.QBuffer
QIODevice = QtCore.QIODevice
QUrl = QtCore.QUrl
QUrlQuery = QtCore.QUrlQuery
QRect = QtCore.QRect
QSize = QtCore.QSize
QProcess = QtCore.QProcess
QProcessEnvironment = QtCore.QProcessEnvironment
QElapsedTimer = QtCore.QElapsedTimer
pyqtSignal = QtCore.pyqtSignal
QImage = QtGui.QImage
QPixmap = QtGui.QPixmap
QIcon = QtGui.QIcon
QColor = QtGui.QColor
QNetworkAccessManager = QtNetwork.QNetworkAccessManager
QNetworkRequest = QtNetwork.QNetworkRequest
QNetworkReply = QtNetwork.QNetworkReply

__all__ = [
    "QAction",
    "QT_BINDING",
    "QtCore",
    "QtGui",
    "QtNetwork",
    "QtWidgets",
    "image_bytes",
    "image_view",
    "image_from_bgra",
    "png_bytes",
    "qbytes",
    "spin",
    "to_bytes",
]


def qbytes(data: bytes | str) -> QtCore.QByteArray:
    """A QByteArray of `data` (text is UTF-8 encoded)."""
    return QByteArray(data.encode("utf-8") if isinstance(data, str) else bytes(data))


def to_bytes(data: object) -> bytes:
    """Python bytes of a QByteArray (or of bytes, bytearray, memoryview)."""
    return bytes(data)  # QByteArray supports the buffer protocol in PyQt5 and PyQt6


def image_bytes(image: QtGui.QImage) -> bytes:
    """The raw pixel bytes of `image` (rows of ``bytesPerLine()``)."""
    size = image.sizeInBytes() if hasattr(image, "sizeInBytes") else image.byteCount()
    ptr = image.constBits()
    ptr.setsize(size)
    return bytes(ptr)


def image_view(image: QtGui.QImage):
    """The raw pixel bytes of `image` as a memoryview, without a copy (valid while `image` lives
    and is not changed); a copy where the binding's pointer has no buffer interface."""
    size = image.sizeInBytes() if hasattr(image, "sizeInBytes") else image.byteCount()
    ptr = image.constBits()
    ptr.setsize(size)
    try:
        return memoryview(ptr)
    except TypeError:  # pragma: no cover - sip pointers have had the buffer interface for years
        return bytes(ptr)


def image_from_bgra(data: bytes, width: int, height: int) -> QtGui.QImage:
    """A QImage (owning its pixels) of BGRA bytes, Krita's byte order for RGBA/U8 layers.

    On little-endian machines (every machine Krita runs on) QImage's ARGB32 is B, G, R, A in
    memory: the bytes are used as they are, and Qt converts, crops and encodes in C++.
    """
    if sys.byteorder == "little":
        return QImage(data, width, height, width * 4, QImage.Format.Format_ARGB32).copy()
    from .pixels import bgra_to_rgba

    return QImage(bgra_to_rgba(data), width, height, width * 4, QImage.Format.Format_RGBA8888).copy()


def png_bytes(image: QtGui.QImage, compression: int = 1) -> bytes:
    """`image` as PNG bytes; `compression` is zlib's level 0..9 (1: fast, a little bigger)."""
    # Qt maps PNG "quality" q to the zlib level (100 - q) * 9 // 91 (q 100: level 0, q 0: 9).
    level = max(0, min(9, int(compression)))
    quality = 100 - (level * 91 + 8) // 9  # the largest quality that still gives `level`
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG", quality):
        raise OSError("Qt could not encode the image as PNG")
    return bytes(buffer.data())


def spin(condition, timeout_ms: int, step_ms: int = 20) -> bool:
    """Run Qt's event loop until `condition()` is true or `timeout_ms` passed; whether it became
    true. For scripts and tests (kritarunner has no running event loop): the UI never calls it."""
    timer = QElapsedTimer()
    timer.start()
    loop = QEventLoop()
    while not condition():
        if timer.elapsed() >= timeout_ms:
            return bool(condition())
        QTimer.singleShot(step_ms, loop.quit)
        loop.exec()
    return True
