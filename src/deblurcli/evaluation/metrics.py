"""Image-quality metrics through pyiqa, with an offline check of every weight file they need.

pyiqa downloads metric weights on first use, unverified. deblurcli never lets it: every metric
here lists the files it needs and where pyiqa (and the libraries under it) look for them, and
``deblurcli eval`` fetches a missing file itself, checked by SHA-256 (:mod:`.fetch`), unless it
runs offline:

* ``pyiqa/<file>``        -- pyiqa's own weights, in ``$TORCH_HOME/hub/pyiqa/`` (torch hub dir);
* ``checkpoints/<file>``  -- torchvision ImageNet backbones, in ``$TORCH_HOME/hub/checkpoints/``;
* ``clip/<file>``         -- OpenAI CLIP weights used by CLIP-IQA, in ``$TORCH_HOME/hub/clip/``;
* Hugging Face files      -- timm backbones, in the Hugging Face cache (``$HF_HOME/hub``).

``--metric-weights DIR`` is searched first with the same layout (``DIR/pyiqa/...``,
``DIR/checkpoints/...``, ``DIR/clip/...``); a file placed directly in ``DIR`` is found too.
Weights are checked *before* a metric is created, so a missing file is fetched (or, offline,
reported by name with the command that fetches it) instead of being downloaded by pyiqa.

pyiqa is an optional dependency (``pip install 'deblurcli[eval]'``), imported only here.

PSNR is computed with ``eps=0``: identical images give ``inf`` (see :func:`summarise`).

:func:`psnr` and :func:`ssim` score without pyiqa (training's validation, ``scripts/``,
``benchmarks/``, the lab): the same definitions, for images in ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deblurcli.errors import DeblurcliError, WeightsError

WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs.

    Attributes:
        folder: sub-folder of the torch hub dir (``"pyiqa"``, ``"checkpoints"``, ``"clip"``).
        name: the file name pyiqa / torchvision / clip look for.
        how: ``"option"`` -- passed to pyiqa as ``pretrained_model_path``; ``"load"`` -- the
            metric is built with ``pretrained=False`` and this file is loaded afterwards (strict);
            ``"hub"`` -- a backbone found by its library in the torch hub dir.
    """

    folder: str
    name: str
    how: str = "hub"


@dataclass(frozen=True)
class HFFile:
    """A file a metric's backbone loads from the Hugging Face cache (timm models)."""

    repo_id: str
    filenames: tuple[str, ...]  # any one of these is enough


@dataclass(frozen=True)
class MetricSpec:
    """What deblurcli knows about one metric."""

    name: str
    pyiqa_name: str
    full_reference: bool
    lower_better: bool
    description: str
    weights: tuple[WeightFile, ...] = ()
    hf_files: tuple[HFFile, ...] = ()
    min_side: int = 1  # smallest image side it can score

    @property
    def kind(self) -> str:
        """``"FR"`` (full reference) or ``"NR"`` (no reference)."""
        return "FR" if self.full_reference else "NR"

    @property
    def arrow(self) -> str:
        """``"↓"`` when lower is better, else ``"↑"``."""
        return "↓" if self.lower_better else "↑"

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights or self.hf_files)


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", "psnr", True, False, "PSNR in dB (RGB; --y-channel: Y of YCbCr)"),
        MetricSpec("ssim", "ssim", True, False, "SSIM (RGB; --y-channel: Y of YCbCr)",
                   min_side=11),  # its 11x11 window, at valid positions only
        MetricSpec(
            "lpips", "lpips", True, True, "LPIPS v0.1, AlexNet features",
            weights=(WeightFile("pyiqa", "LPIPS_v0.1_alex-df73285e.pth", "option"),
                     WeightFile("checkpoints", "alexnet-owt-7be5be79.pth")),
        ),
        MetricSpec(
            "dists", "dists", True, True, "DISTS, VGG16 features",
            weights=(WeightFile("pyiqa", "DISTS_weights-f5e65c96.pth", "option"),
                     WeightFile("checkpoints", "vgg16-397923af.pth")),
        ),
        MetricSpec(
            "niqe", "niqe", False, True, "NIQE (natural scene statistics)",
            weights=(WeightFile("pyiqa", "niqe_modelparameters.mat", "option"),),
            min_side=96,  # its statistics come from 96x96 blocks
        ),
        MetricSpec(
            "musiq", "musiq", False, False, "MUSIQ trained on KonIQ-10k",
            weights=(WeightFile("pyiqa", "musiq_koniq_ckpt-e95806b9.pth", "option"),),
        ),
        MetricSpec(
            "clipiqa", "clipiqa", False, False, "CLIP-IQA (CLIP RN50, antonym prompts)",
            weights=(WeightFile("clip", "RN50.pt"),),
        ),
        MetricSpec(
            "maniqa", "maniqa", False, False, "MANIQA trained on KonIQ-10k",
            weights=(WeightFile("pyiqa", "ckpt_koniq10k.pt", "load"),),
            hf_files=(HFFile("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k",
                             ("model.safetensors", "pytorch_model.bin")),),
        ),
    )
}

DEFAULT_FR_METRICS = ("psnr", "ssim", "lpips", "dists")
DEFAULT_NR_METRICS = ("niqe", "musiq", "clipiqa", "maniqa")


def parse_metric_names(text: str) -> list[str]:
    """Split ``"psnr, lpips"`` into known metric names (order kept, duplicates dropped).

    Raises ``ValueError`` naming the unknown entries.
    """
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name and name not in names:
            names.append(name)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(METRICS)}")
    if not names:
        raise ValueError("no metric named")
    return names


def torch_hub_dir() -> Path:
    """The torch hub folder (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``)."""
    import torch.hub

    return Path(torch.hub.get_dir())


def find_weight_file(wf: WeightFile, weights_dir: Path | None = None) -> Path | None:
    """Where ``wf`` is: ``weights_dir/<folder>/<name>``, ``weights_dir/<name>`` (pyiqa's own
    files only), then the torch hub dir; ``None`` if nowhere."""
    candidates: list[Path] = []
    if weights_dir is not None:
        candidates.append(Path(weights_dir) / wf.folder / wf.name)
        if wf.how != "hub":  # backbones are found by their libraries via the hub layout only
            candidates.append(Path(weights_dir) / wf.name)
    candidates.append(torch_hub_dir() / wf.folder / wf.name)
    for path in candidates:
        if path.is_file():
            return path
    return None


def find_hf_file(hf: HFFile) -> Path | None:
    """The cached copy of a Hugging Face file, or ``None`` (never contacts the Hub)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in hf.filenames:
        found = try_to_load_from_cache(hf.repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


@dataclass
class WeightCheck:
    """Result of looking for a metric's files: what was found and what is missing."""

    spec: MetricSpec
    found: dict[str, Path] = field(default_factory=dict)  # WeightFile.name -> path
    missing: list[str] = field(default_factory=list)      # one-line "file -> where" hints
    missing_files: list[WeightFile | HFFile] = field(default_factory=list)  # same order

    @property
    def ok(self) -> bool:
        return not self.missing


def check_weights(spec: MetricSpec, weights_dir: Path | None = None) -> WeightCheck:
    """Look for every file ``spec`` needs without creating the metric or touching the network."""
    check = WeightCheck(spec)
    hub = torch_hub_dir()
    for wf in spec.weights:
        path = find_weight_file(wf, weights_dir)
        if path is None:
            where = f"{hub / wf.folder}/" + (f" or {Path(weights_dir) / wf.folder}/"
                                             if weights_dir is not None else "")
            check.missing.append(f"{wf.name} (put it in {where})")
            check.missing_files.append(wf)
        else:
            check.found[wf.name] = path
    for hf in spec.hf_files:
        path = find_hf_file(hf)
        if path is None:
            from deblurcli.models.pretrained import hf_download_command

            check.missing.append(
                f"{hf.filenames[0]} of Hugging Face repo {hf.repo_id} (download it into the "
                f"Hugging Face cache: `{hf_download_command(hf.repo_id, hf.filenames[0])}`)")
            check.missing_files.append(hf)
        else:
            check.found[f"{hf.repo_id}/{path.name}"] = path
    return check


@dataclass(frozen=True)
class MetricInfo:
    """One row of ``--list-metrics``."""

    name: str
    kind: str
    arrow: str
    needs_weights: bool
    available: bool
    description: str
    missing: tuple[str, ...]


def list_metrics(weights_dir: Path | None = None) -> list[MetricInfo]:
    """Every metric with its kind, direction and whether it can run now: its weights are
    there and pyiqa, which computes every metric, is installed."""
    installed = pyiqa_installed()
    rows = []
    for spec in METRICS.values():
        check = check_weights(spec, weights_dir)
        rows.append(MetricInfo(spec.name, spec.kind, spec.arrow, spec.needs_weights,
                               check.ok and installed, spec.description, tuple(check.missing)))
    return rows


def pyiqa_installed() -> bool:
    """Whether pyiqa can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("pyiqa") is not None


@contextlib.contextmanager
def _hub_dir(path: Path | None) -> Iterator[None]:
    """Point torch hub at ``path`` while a metric is built (backbones under --metric-weights)."""
    if path is None:
        yield
        return
    import torch.hub

    # torch.hub keeps an explicit set_dir() in a module variable (None: follow $TORCH_HOME);
    # restore that exact state so that a later change of $TORCH_HOME still takes effect.
    explicit = hasattr(torch.hub, "_hub_dir")
    previous = torch.hub._hub_dir if explicit else torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        if explicit:
            torch.hub._hub_dir = previous
        else:  # pragma: no cover - other torch versions
            torch.hub.set_dir(previous)


class Metric:
    """A pyiqa metric created once on a device; call it with float32 (H, W, 3) arrays in [0, 1]."""

    def __init__(self, spec: MetricSpec, model, device) -> None:
        self.spec = spec
        self.model = model
        self.device = device

    @property
    def name(self) -> str:
        return self.spec.name

    def _tensor(self, pixels: np.ndarray):
        import torch

        arr = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None].to(self.device)

    def __call__(self, pred: np.ndarray, ref: np.ndarray | None = None) -> float:
        """Score ``pred`` (against ``ref`` for full-reference metrics)."""
        import torch

        if min(pred.shape[:2]) < self.spec.min_side:
            raise ValueError(f"{self.name} needs images of at least {self.spec.min_side}x"
                             f"{self.spec.min_side} pixels, this one is {pred.shape[1]}x"
                             f"{pred.shape[0]}")

        if self.spec.full_reference:
            if ref is None:
                raise ValueError(f"{self.name} needs a reference image")
            if pred.shape != ref.shape:
                raise ValueError(f"{self.name}: image sizes differ ({pred.shape[1]}x{pred.shape[0]}"
                                 f" vs reference {ref.shape[1]}x{ref.shape[0]})")
            with torch.no_grad():
                out = self.model(self._tensor(pred), self._tensor(ref))
        else:
            with torch.no_grad():
                out = self.model(self._tensor(pred))
        return float(torch.as_tensor(out).detach().float().reshape(-1)[0].cpu())


def create_metric(spec: MetricSpec, check: WeightCheck, *, device,
                  y_channel: bool = False, as_loss: bool = False) -> Metric:
    """Build one pyiqa metric from files already found by :func:`check_weights`.

    ``as_loss=True`` keeps gradients flowing (training's perceptual losses use this).

    pyiqa prints "Loading pretrained model ..." on stdout; that text is swallowed here so that
    library code never writes to the user's stdout.
    """
    pyiqa = import_pyiqa()
    if not check.ok:
        raise WeightsError(f"metric {spec.name} is missing {check.missing[0]}")
    options: dict = {}
    if spec.name == "psnr":  # Y as MATLAB's rgb2ycbcr (pyiqa's default is YIQ's full range)
        options.update(test_y_channel=y_channel, eps=0.0, color_space="ycbcr")
    elif spec.name == "ssim":
        return Metric(spec, StandardSsim(y_channel), device)
    load_after: list[Path] = []
    hub_override: Path | None = None
    hub = torch_hub_dir()
    for wf in spec.weights:
        path = check.found[wf.name]
        if wf.how == "option":
            options["pretrained_model_path"] = str(path)
        elif wf.how == "load":
            options["pretrained"] = False
            load_after.append(path)
        elif path.parent != hub / wf.folder:  # a backbone under --metric-weights DIR/<folder>/
            hub_override = path.parent.parent
    with contextlib.redirect_stdout(io.StringIO()), _hub_dir(hub_override):
        model = pyiqa.create_metric(spec.pyiqa_name, as_loss=as_loss, device=device, **options)
        for path in load_after:
            model.load_weights(str(path), weight_keys=None)
    model.eval()
    return Metric(spec, model, device)


PYIQA_MISSING = ("deblurcli eval needs pyiqa, which is not installed: "
                 "pip install 'deblurcli[eval]'")


def import_pyiqa():
    """``import pyiqa``, or a :class:`DeblurcliError` saying how to install it."""
    try:
        import pyiqa
    except ImportError:
        raise DeblurcliError(PYIQA_MISSING) from None
    return pyiqa


def fetch_command(names: Sequence[str]) -> str:
    """The command that fetches the weights of ``names`` (works with deblurcli alone)."""
    return f"deblurcli eval --fetch-metrics {','.join(names)}"


def fetch_missing(spec: MetricSpec, check: WeightCheck, fetcher, weights_dir: Path | None = None,
                  note: WarnFn | None = None) -> tuple[WeightCheck, str | None]:
    """Fetch every file ``check`` misses with ``fetcher``; return the new check and, if a fetch
    failed, a one-line reason."""
    from deblurcli.evaluation.fetch import describe

    for item in check.missing_files:
        if note is not None:
            note(f"fetching {describe(item)} for metric {spec.name} (once, checked by SHA-256)")
        try:
            fetcher(item)
        except Exception as exc:  # noqa: BLE001 - network and checksum errors alike: skip, say why
            text = " ".join(str(exc).split()) or type(exc).__name__
            return check_weights(spec, weights_dir), (f"could not fetch {describe(item)} "
                                                      f"({type(exc).__name__}: {text[:160]})")
    return check_weights(spec, weights_dir), None


def create_metrics(names: Sequence[str], *, device, y_channel: bool = False,
                   weights_dir: Path | None = None, fetcher=None,
                   warn: WarnFn | None = None, note: WarnFn | None = None,
                   skipped_reasons: dict[str, str] | None = None) -> list[Metric]:
    """Create the named metrics once, after checking (and, with a ``fetcher``, fetching) all
    their weight files.

    ``fetcher`` (:func:`deblurcli.evaluation.fetch.fetch_file`, or ``None`` offline) is called
    once per missing file. A metric whose files are still missing is skipped and ``warn`` gets
    one line naming the files and the command that fetches them (and ``skipped_reasons``, when
    given, the metric's name and why); ``note`` hears of each fetch. Raises
    :class:`DeblurcliError` when no metric is left.
    """
    specs = [METRICS[n] for n in names]
    import_pyiqa()  # every metric goes through pyiqa: say how to install it before anything
    kept, skipped = [], []
    for spec in specs:
        check = check_weights(spec, weights_dir)
        reason = None
        if not check.ok and fetcher is not None:
            check, reason = fetch_missing(spec, check, fetcher, weights_dir, note)
        if check.ok:
            kept.append((spec, check))
            continue
        skipped.append(spec.name)
        if reason is None:
            files = ", ".join(m.split(" (", 1)[0] for m in check.missing)
            reason = f"{files} not in the cache{' (offline)' if fetcher is None else ''}"
        if skipped_reasons is not None:
            skipped_reasons[spec.name] = reason
        if warn is not None:
            warn(f"metric {spec.name} skipped: {reason}; fetch with: {fetch_command([spec.name])}")
    metrics = []
    for spec, check in kept:
        try:
            metrics.append(create_metric(spec, check, device=device, y_channel=y_channel))
        except Exception as exc:  # noqa: BLE001 - a damaged weight file: pyiqa, torch, scipy
            if isinstance(exc, (DeblurcliError, MemoryError)) or not check.found or \
                    type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
                raise  # (not the file's fault)
            files = ", ".join(str(path) for path in check.found.values())
            text = " ".join(str(exc).split())[:120] or type(exc).__name__
            reason = f"cannot load {files} ({type(exc).__name__}: {text})"
            skipped.append(spec.name)
            if skipped_reasons is not None:
                skipped_reasons[spec.name] = reason
            if warn is not None:
                warn(f"metric {spec.name} skipped: {reason}; delete the damaged file and fetch "
                     f"it again with: {fetch_command([spec.name])}")
    if not metrics:
        raise DeblurcliError(f"no metric could run ({', '.join(skipped)} skipped); fetch their "
                             f"weights with: {fetch_command(skipped)}, or give --metric-weights DIR")
    return metrics


@dataclass(frozen=True)
class Summary:
    """Mean of one metric over a set of images.

    ``mean`` is over finite values only; ``n_inf`` counts infinite scores (PSNR of a pixel-identical
    pair), ``n`` all scores. ``mean`` is ``nan`` when no finite score exists.
    """

    mean: float
    n: int
    n_inf: int
    n_scored: int = -1  # scores that are not nan (images the metric could score); -1: all n

    def __post_init__(self) -> None:
        if self.n_scored < 0:
            object.__setattr__(self, "n_scored", self.n)


def summarise(values: Sequence[float]) -> Summary:
    """Average scores, leaving out ``inf`` (counted separately) and ``nan``."""
    finite = [v for v in values if math.isfinite(v)]
    n_inf = sum(1 for v in values if math.isinf(v))
    mean = float(np.mean(np.asarray(finite, dtype=np.float64))) if finite else float("nan")
    return Summary(mean=mean, n=len(values), n_inf=n_inf,
                   n_scored=sum(1 for v in values if not math.isnan(v)))


def fetch_metric_weights(names: Sequence[str], fetcher, weights_dir: Path | None = None,
                         note: WarnFn | None = None) -> dict[str, str | None]:
    """Fetch the missing weight files of each named metric.

    Returns metric name -> ``None`` when every file it needs is now present, else a one-line
    reason it is not.
    """
    result: dict[str, str | None] = {}
    for name in names:
        spec = METRICS[name]
        check = check_weights(spec, weights_dir)
        reason = None
        if not check.ok:
            check, reason = fetch_missing(spec, check, fetcher, weights_dir, note)
        result[name] = None if check.ok else (reason or "; ".join(check.missing))
    return result


# ----------------------------------------------------------------------------- without pyiqa
def _numpy(image) -> np.ndarray:
    """A numpy float64 copy of an array or a torch tensor (on any device)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    return np.asarray(image, dtype=np.float64)


def psnr(pred, ref) -> float:
    """PSNR in dB of two images in ``[0, 1]`` of the same shape (numpy arrays or torch tensors,
    any layout), computed in float64; ``inf`` for identical images, as ``eval`` reports them."""
    mse = float(np.mean((_numpy(pred) - _numpy(ref)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(pred, ref) -> float:
    """Mean SSIM of two images in ``[0, 1]``: an 11×11 Gaussian window (σ = 1.5), valid
    positions only, averaged over the channels (Wang et al. 2004, the usual constants); the
    values as given (``eval`` rounds them to 8 bits first, as MATLAB does: :class:`StandardSsim`).

    Torch tensors are ``(N, C, H, W)`` (computed on their device); numpy arrays ``(H, W, C)``.
    """
    import torch

    def batch(image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image.float()
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1))[None]

    return float(ssim_per_image(batch(pred), batch(ref), data_range=1.0).mean().item())


def ssim_per_image(x, y, *, data_range: float):
    """SSIM of each image of two ``(N, C, H, W)`` batches (Wang et al. 2004): an 11×11 Gaussian
    window (σ = 1.5), valid positions only, the mean over positions and channels; the contrast
    term as it is (pyiqa clamps it at zero, which raises the score of poorly matching images),
    so the values are MATLAB's ``ssim_index`` and scikit-image's ``structural_similarity``."""
    import torch

    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-(coords ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    rows, cols = g.view(1, 1, 1, 11).expand(x.shape[1], 1, 1, 11), \
        g.view(1, 1, 11, 1).expand(x.shape[1], 1, 11, 1)

    def blur(t):  # the 11x11 Gaussian as two passes of 11 (it is separable): 5x fewer products
        conv = torch.nn.functional.conv2d
        return conv(conv(t, rows, groups=t.shape[1]), cols, groups=t.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return value.mean(dim=(1, 2, 3))


def matlab_values(image, y_channel: bool):
    """An ``(N, 3, H, W)`` batch in ``[0, 1]`` as MATLAB's metric code sees an 8-bit image:
    float64 values 0..255 rounded to integers; with ``y_channel`` only the Y of YCbCr (BT.601,
    16..235, MATLAB's ``rgb2ycbcr``)."""
    import torch

    if image.device.type == "mps":  # no float64 there
        image = image.cpu()
    image = (image.to(torch.float64) * 255.0).round()  # the 8-bit image
    if y_channel:  # rgb2ycbcr of it, rounded to 8 bits again
        weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64,
                               device=image.device).view(1, 3, 1, 1) / 255.0
        image = (16.0 + (image * weights).sum(dim=1, keepdim=True)).round()
    return image


class StandardSsim:
    """``eval``'s SSIM: :func:`ssim_per_image` of :func:`matlab_values` (``y_channel``: the Y of
    YCbCr), the scores published tables use; pyiqa's, which clamps the contrast term, reads up
    to 0.04 higher on blurred images."""

    def __init__(self, y_channel: bool = False) -> None:
        self.y_channel = y_channel

    def __call__(self, pred, ref):
        return ssim_per_image(matlab_values(pred, self.y_channel),
                              matlab_values(ref, self.y_channel), data_range=255.0)
