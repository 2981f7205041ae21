"""The Collage Diffusion bridge: a local aiohttp server on the GPU machine that runs collage jobs
for the Krita plugin. Start it with ``collage-bridge`` or ``python -m bridge_server``; the
protocol is `krita_plugin.collage_diffusion.wire`, documented in docs/api.md."""

__version__ = "0.1.0"
