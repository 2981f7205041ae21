"""Collage Diffusion for Krita: the Krita plugin package.

This package is also imported outside Krita: the bridge server and the tests use its `wire`
module (the bridge's wire format, standard library only). So nothing at import time may assume
Krita or PyQt; the dock registers itself only when Krita loads the plugin.
"""

try:
    import krita
except ImportError:  # outside Krita: the bridge, the tests, a stdlib client
    krita = None
