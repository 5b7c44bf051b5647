"""deblurcli: one-step diffusion motion deblurring (OSDD, Liu et al. 2025).

The package root stays import-light (no torch) so that ``deblurcli --version`` is instant.
Import the library from its modules, e.g. ``from deblurcli.images import read_image``.
"""

from deblurcli._version import __version__

__all__ = ["__version__"]
