"""Collage Diffusion engine: layered collages in, harmonized images out (torch + diffusers)."""

from .verbosity import quiet_libraries

# Before transformers or diffusers is imported anywhere: some of their notices come on import.
quiet_libraries()
