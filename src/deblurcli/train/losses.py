"""Training losses: perceptual back-ends, the edge-aware perceptual loss and the GAN losses.

Images entering these functions are ``(B, 3, H, W)`` tensors in ``[-1, 1]``.

* **Edge-aware perceptual loss** (paper Sec. 3.2): ``EA(x̂, x) = P(x̂, x) + P(S(x̂), S(x))`` where
  ``S`` is the 3×3 Sobel gradient magnitude of the grey image, repeated to three channels.
* **Perceptual back-ends** ``P``: ``dists`` and ``lpips`` through pyiqa (their weights must already
  be in pyiqa's / torchvision's cache: nothing is downloaded here), ``stlpips`` (the
  ``stlpips-pytorch`` package ships its weights) and ``none``.
* **GAN losses** on discriminator logits: ``L_D = −log D(z_h) − log(1 − D(ẑ_h))`` and the
  non-saturating generator loss ``L_G = −log D(ẑ_h)``, both computed with ``BCEWithLogits``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deblurcli.errors import DeblurcliError, WeightsError
from deblurcli.train.config import PERCEPTUAL_CHOICES

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- pure math
def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, repeated to 3 channels.

    ``x`` is ``(B, 3, H, W)`` in ``[-1, 1]``; the result has the same shape and range. The grey
    image is the Rec.601 luma of ``(x + 1) / 2``; the magnitude is divided by 4 (a unit step then
    gives 1) and clamped to ``[0, 1]`` before mapping back to ``[-1, 1]``.
    """
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = ((x + 1.0) * 0.5 * weights).sum(dim=1, keepdim=True)
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx)
    gy = F.conv2d(padded, ky)
    mag = torch.sqrt(gx * gx + gy * gy + 1e-12) / 4.0
    mag = mag.clamp(0.0, 1.0) * 2.0 - 1.0
    return mag.repeat(1, 3, 1, 1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_D = −log D(z_h) − log(1 − D(ẑ_h))`` on logits (mean over the batch)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``L_G = −log D(ẑ_h)`` on logits (mean over the batch)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# ----------------------------------------------------------------------------- back-ends
class PerceptualLoss(nn.Module):
    """A frozen perceptual distance: ``forward(a, b) -> scalar`` (inputs in ``[-1, 1]``).

    ``name`` is the back-end actually in use (after any fallback). The wrapped network's
    parameters never receive gradients, but gradients flow to the inputs.
    """

    def __init__(self, name: str, net: nn.Module | None,
                 fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self._fn = fn
        if net is not None:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # always stays in eval mode
        super().train(False)
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            return a.new_zeros(())
        return self._fn(a.float(), b.float())


def edge_aware(metric: PerceptualLoss, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Edge-aware perceptual loss ``P(x̂, x) + P(S(x̂), S(x))`` (zero for the ``none`` back-end)."""
    if metric.name == "none":
        return pred.new_zeros(())
    return metric(pred, target) + metric(sobel_magnitude(pred), sobel_magnitude(target))


def check_perceptual_size(metric: PerceptualLoss, size: int,
                          larger: str = "a larger --crop") -> None:
    """A :class:`DeblurcliError` when ``metric`` cannot score crops of ``size`` pixels (ST-LPIPS
    needs 24): said before the run, not as a RuntimeError at its first step."""
    if metric.name == "none":
        return
    device = next((p.device for p in metric.parameters()), torch.device("cpu"))
    probe = torch.zeros(1, 3, size, size, device=device)
    try:
        with torch.no_grad():
            edge_aware(metric, probe, probe)
    except RuntimeError:
        raise DeblurcliError(f"crops of {size}x{size} pixels are too small for --perceptual "
                             f"{metric.name}; give {larger} or --perceptual none") from None


def _missing_weights_message(name: str, missing: Sequence[str]) -> str:
    return (f"perceptual loss {name!r} needs {missing[0]}; or choose --perceptual stlpips/none "
            f"or --perceptual-fallback stlpips")


def _build_pyiqa(name: str, device: torch.device) -> PerceptualLoss:
    # the evaluation module owns pyiqa's weight files and quiet construction
    from deblurcli.evaluation.metrics import METRICS, check_weights, create_metric

    spec = METRICS[name]
    metric = create_metric(spec, check_weights(spec), device=device, as_loss=True).model

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        score = metric((a + 1.0) * 0.5, (b + 1.0) * 0.5)
        return score.mean()

    return PerceptualLoss(name, metric, fn)


def _import_stlpips() -> types.ModuleType:
    """Import ``stlpips_pytorch.stlpips``.

    That module imports ``IPython`` and ``torchsummary`` at top level but never uses them for the
    loss; when they are not installed, inert stand-ins are registered only for the duration of the
    import and removed afterwards.
    """
    shims = {"IPython": "embed", "torchsummary": "summary"}
    added: list[str] = []
    for module_name, attr in shims.items():
        if module_name not in sys.modules and importlib.util.find_spec(module_name) is None:
            shim = types.ModuleType(module_name)
            setattr(shim, attr, lambda *args, **kwargs: None)
            sys.modules[module_name] = shim
            added.append(module_name)
    try:
        return importlib.import_module("stlpips_pytorch.stlpips")
    except ImportError as exc:
        raise WeightsError(f"perceptual loss 'stlpips' needs the stlpips-pytorch package "
                           f"({exc}); pip install stlpips-pytorch") from None
    finally:
        for module_name in added:
            sys.modules.pop(module_name, None)


def stlpips_weight_file() -> Path:
    """The packaged ST-LPIPS (AlexNet, shift-tolerant) weight file."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or spec.origin is None:
        raise WeightsError("perceptual loss 'stlpips' needs the stlpips-pytorch package; "
                           "pip install stlpips-pytorch")
    return Path(spec.origin).parent / "weights" / "vST0.0" / "alex_shift_tolerant.pth"


def _build_stlpips(device: torch.device) -> PerceptualLoss:
    path = stlpips_weight_file()
    if not path.is_file():
        raise WeightsError(f"perceptual loss 'stlpips' needs {path}, which is missing; "
                           "reinstall stlpips-pytorch")
    module = _import_stlpips()
    net = module.LPIPS(net="alex", variant="shift_tolerant", model_path=str(path), verbose=False)
    net = net.to(device)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(a, b).mean()

    return PerceptualLoss("stlpips", net, fn)


def perceptual_available(name: str) -> tuple[bool, list[str]]:
    """Whether back-end ``name`` can be built offline, and one-line hints for what is missing."""
    if name == "none":
        return True, []
    if name == "stlpips":
        try:
            path = stlpips_weight_file()
        except WeightsError:
            return False, ["the stlpips-pytorch package (pip install stlpips-pytorch)"]
        return path.is_file(), ([] if path.is_file() else
                                [f"{path.name} (reinstall stlpips-pytorch; expected at {path})"])
    from deblurcli.evaluation.metrics import METRICS, check_weights

    check = check_weights(METRICS[name])
    return check.ok, list(check.missing)


def build_perceptual(name: str, *, fallback: str | None = None,
                     device: torch.device | str = "cpu") -> PerceptualLoss:
    """Create the perceptual back-end ``name``, or ``fallback`` when its weights are missing.

    Weight files are checked *before* anything is created, so nothing tries to download.

    Raises:
        WeightsError: the weights of ``name`` (and of the fallback, if any) are missing.
        ValueError: an unknown back-end name.
    """
    for candidate in (name, fallback):
        if candidate is not None and candidate not in PERCEPTUAL_CHOICES:
            raise ValueError(f"unknown perceptual loss {candidate!r}; "
                             f"choose from {', '.join(PERCEPTUAL_CHOICES)}")
    device = torch.device(device)
    ok, missing = perceptual_available(name)
    chosen = name
    if not ok:
        if fallback is None:
            raise WeightsError(_missing_weights_message(name, missing))
        ok_fb, missing_fb = perceptual_available(fallback)
        if not ok_fb:
            raise WeightsError(_missing_weights_message(fallback, missing_fb))
        chosen = fallback
    if chosen == "none":
        return PerceptualLoss("none", None, None)
    if chosen == "stlpips":
        return _build_stlpips(device)
    return _build_pyiqa(chosen, device)
