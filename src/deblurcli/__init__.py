"""deblurcli: one-step diffusion motion deblurring (OSDD, Liu et al. 2025).

The package root stays import-light (no torch) so that ``deblurcli --version`` is instant.
Import the library from its modules, e.g. ``from deblurcli.images import read_image``.
"""

import logging as _logging

from deblurcli._version import __version__

__all__ = ["__version__"]


class _DropThirdPartyHints(_logging.Filter):
    """Drops import-time log lines about optional extras deblurcli never uses.

    bitsandbytes (installed with the ``eval`` extra's pyiqa, imported by diffusers/peft) logs
    "Failed to load CPU gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16
    whenever torch models are imported; deblurcli does no 4-bit quantisation.
    """

    PREFIXES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropThirdPartyHints())
