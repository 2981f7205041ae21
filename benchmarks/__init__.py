"""Benchmarks and evaluations. Each runs from the repository root as `python -m benchmarks.NAME`
or as `python benchmarks/NAME.py` (whose first lines then put the repository root on sys.path and
import this package), and imports its neighbours as `benchmarks.NAME`.

Importing the package first quiets the libraries' notices before a script imports diffusers
(core/verbosity.py; COLLAGE_DEBUG=1 shows them).
"""

from core.verbosity import quiet_libraries

quiet_libraries()
