"""Network definitions for OSDD (torch).

* :mod:`deblurcli.models.evae` -- :class:`EVAE`, the enhanced VAE with encoder-decoder skips.
* :mod:`deblurcli.models.onestep` -- SD schedule, :func:`predict_x0`, :class:`OneStepDenoiser`.
* :mod:`deblurcli.models.adapters` -- the Dynamic Dual-Adapter (two LoRA adapters, gamma blend).
* :mod:`deblurcli.models.osdd` -- :class:`OSDDModel`, blurry image -> sharp image in one UNet call.

Import from the sub-modules; this package root stays free of heavy imports.
"""
