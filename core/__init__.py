"""Collage Diffusion engine: layered collages in, harmonized images out (torch + diffusers)."""

import os

# transformers warns on import about optional image backends this project never uses; those
# notices would land in every painter's terminal. An explicit user setting still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
