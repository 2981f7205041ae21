"""Collage Diffusion for Krita: the Krita plugin package.

This package is also imported outside Krita: the bridge server and the tests use its `wire`
module (the bridge's wire format, standard library only), and the tests its pure-logic modules
(`collage`, `settings`, `pixels`, `messages`). So nothing at import time may assume Krita or PyQt;
the dock registers itself only when the `krita` module exists, i.e. when Krita loads the plugin.

Modules: `qt` (PyQt5/PyQt6), `document` (reading layers), `collage` (building the request),
`settings` (stored in the document), `client` (the bridge, never blocking), `results` (writing
new layers), `model` (state and actions), `dock` (the UI), `actions` (Krita actions and their
shortcuts), `bridge_process` (a local bridge).
"""

try:
    import krita
except ImportError:  # outside Krita: the bridge, the tests, a stdlib client
    krita = None


def _register() -> None:
    from .actions import make_extension_class
    from .dock import DOCK_ID, make_dock_class

    app = krita.Krita.instance()
    app.addExtension(make_extension_class()(app))

    base = krita.DockWidgetFactoryBase
    position = getattr(base, "DockPosition", base).DockRight
    factory = krita.DockWidgetFactory(DOCK_ID, position, make_dock_class())
    app.addDockWidgetFactory(factory)


if krita is not None and hasattr(krita, "DockWidgetFactory"):
    _register()
