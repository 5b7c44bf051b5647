"""OSDDPipeline: the one-step deblurring model as a diffusers ``DiffusionPipeline``.

Components (one sub-folder each, see :mod:`deblurcli.modelfolder`):

* ``evae``   -- :class:`~deblurcli.models.evae.EVAE` (encoder E1 with skips, decoder; E2 for
  training);
* ``unet``   -- a stock ``UNet2DConditionModel`` carrying the ``real`` and ``synthetic`` LoRA
  adapters (diffusers LoRA files beside it);
* ``prompt`` -- :class:`~deblurcli.models.onestep.OneStepPrompt`, the learned prompt and the
  fixed timestep.

Example::

    pipe = OSDDPipeline.from_pretrained("MODEL_DIR", gamma=0.7)
    sharp = pipe(blurry)            # (B, 3, H, W) in [-1, 1], H and W multiples of 8
    pipe.set_gamma(0.9)             # unet.set_adapters(["real", "synthetic"], [0.9, 0.1])
    pipe.fuse(0.9)                  # unet.fuse_lora + unload_lora
    pipe.save_pretrained("OUT")

For images of any size (tiles, padding, 16-bit, colour fix) use
:class:`deblurcli.pipeline.DeblurPipeline` on ``pipe.model``, as ``deblurcli deblur`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from torch import Tensor

from deblurcli.models.evae import EVAE
from deblurcli.models.onestep import OneStepDenoiser, OneStepPrompt
from deblurcli.models.osdd import OSDDModel


class OSDDPipeline(DiffusionPipeline):
    """Blurry image -> eVAE E1 -> one UNet step at the fixed timestep -> eVAE decoder."""

    def __init__(self, evae: EVAE, unet, prompt: OneStepPrompt) -> None:
        """The pipeline of these modules (``OSDDPipeline(**pipe.components)`` too). The
        adapters inside ``unet`` come along; their γ is unknown here until :meth:`set_gamma`
        (which :meth:`from_pretrained` and :meth:`from_model` do not need)."""
        from deblurcli.models.adapters import specs_in

        super().__init__()
        self.register_modules(evae=evae, unet=unet, prompt=prompt)
        self._model = OSDDModel(evae, OneStepDenoiser(unet, prompt), specs_in(unet))

    @classmethod
    def from_model(cls, model: OSDDModel) -> OSDDPipeline:
        """The pipeline around an :class:`OSDDModel` (sharing its modules and adapter state)."""
        pipe = cls(evae=model.evae, unet=model.unet, prompt=model.denoiser.prompt)
        pipe._model = model
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, gamma: float = 0.7,
                        fuse: bool = False, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", verify: bool = True,
                        offline: bool = False,
                        warn: Callable[[str], None] | None = None) -> OSDDPipeline:
        """Load a model folder written by ``save_pretrained`` or ``train-diffusion`` (or a hub
        id: from the local cache, fetched once unless ``offline`` / ``HF_HUB_OFFLINE=1``).

        ``gamma`` sets the dual-adapter blend; ``fuse`` merges it into the UNet (faster, and
        γ is fixed from then on). ``verify`` checks ``checksums.sha256`` first. ``warn`` gets
        the loader's notes (a fused folder's own γ taking the place of ``gamma``, ...).
        """
        from deblurcli.modelfolder import load_model_folder

        model = load_model_folder(pretrained_model_name_or_path, gamma=gamma, fuse=fuse,
                                  dtype=torch_dtype or torch.float32, device=device,
                                  verify=verify, offline=offline, warn=warn)
        return cls.from_model(model)

    def save_pretrained(self, save_directory: str | Path, *,
                        storage_dtype: torch.dtype = torch.float32,
                        include_sharp_encoder: bool = True) -> None:
        """Write the standard folder (``model_index.json``, ``evae/``, ``unet/``, ``prompt/``,
        the LoRA files, ``checksums.sha256``); see :mod:`deblurcli.modelfolder`."""
        from deblurcli.modelfolder import save_model_folder

        save_model_folder(save_directory, self._model, storage_dtype=storage_dtype,
                          include_sharp_encoder=include_sharp_encoder)

    @property
    def model(self) -> OSDDModel:
        """The network as one ``nn.Module`` (what :class:`~deblurcli.pipeline.DeblurPipeline`
        and training run)."""
        return self._model

    @property
    def gamma(self) -> float | None:
        """The current blend weight (the fused one for a fused model)."""
        return self._model.gamma

    def set_gamma(self, gamma: float) -> None:
        """``W x + γ·Δ_real x + (1 − γ)·Δ_synthetic x`` (diffusers' ``set_adapters``)."""
        self._model.set_gamma(gamma)

    def fuse(self, gamma: float) -> None:
        """Merge the γ-blend into the UNet (diffusers' ``fuse_lora``) and unload the LoRA layers."""
        self._model.fuse(gamma)

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        """Deblur ``image`` ``(B, 3, H, W)`` in ``[-1, 1]`` (H, W multiples of 8) in one step.

        Raises:
            TypeError: ``image`` is not a tensor (a numpy image is DeblurPipeline's input).
            ValueError: ``image`` is not of floating point (a uint8 one came back as 0s and 1s).
        """
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"expected a (B, 3, H, W) tensor in [-1, 1], got "
                            f"{type(image).__name__} (deblurcli.pipeline.DeblurPipeline takes "
                            "numpy images of any size)")
        if not image.is_floating_point():
            raise ValueError(f"expected float values in [-1, 1], got {image.dtype} (from 8-bit "
                             "pixels: image / 127.5 - 1)")
        return self._model(image)
