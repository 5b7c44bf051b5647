"""Camera-shake trajectories after Boracchi & Foi (2012), the model DeblurGAN used.

The camera position is a 2-D point (a complex number ``x = re + i·im``, in pixels) that moves at
constant speed for ``N`` samples covering a total path length ``L``. Let ``s = L / (N − 1)`` be the
step length and ``d_t`` the unit direction of motion (``|d_t| = 1``). Starting from ``x_0 = 0`` and
``d_0 = e^{iθ}``, each step is::

    Δ_t     = J_t · 2·d_t·e^{i(π + u_t)}  +  a · s · (g·ξ_t − c·x_t)
    d_{t+1} = (d_t + Δ_t) / |d_t + Δ_t|
    x_{t+1} = x_t + s·d_{t+1}

* the shake and pull act per unit of path length (factor ``s``), as in the original model;
* ``ξ_t`` is a standard complex Gaussian (Gaussian shake of strength ``g``);
* ``−c·x_t`` is a centripetal pull towards the starting point (strength ``c``);
* ``J_t ~ Bernoulli(p·a)`` triggers an impulsive near-reversal: ``u_t ~ U(−½, ½)`` rad, so the
  new direction points roughly backwards;
* ``a`` is the "anxiety" (exploration) parameter: it scales both the shake and the probability of
  impulsive reversals. ``a = 0`` gives a straight line of length ``L`` (linear motion blur).

Every parameter is drawn from a documented range by :func:`sample_trajectory_params`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TrajectoryRanges:
    """Ranges ``(low, high)`` the trajectory parameters are drawn from (uniformly).

    Attributes:
        length: total path length ``L`` in pixels.
        samples: number of trajectory samples ``N`` (integers, inclusive).
        anxiety: exploration ``a``; scales the shake and the reversal probability.
        centripetal: pull ``c`` towards the start (per pixel of displacement).
        shake: Gaussian shake strength ``g``.
        reversal_prob: base probability ``p`` of an impulsive near-reversal (times ``a``).
    """

    length: tuple[float, float] = (4.0, 40.0)
    samples: tuple[int, int] = (256, 1024)
    anxiety: tuple[float, float] = (0.0, 0.1)
    centripetal: tuple[float, float] = (0.0, 0.7)
    shake: tuple[float, float] = (0.0, 10.0)
    reversal_prob: tuple[float, float] = (0.0, 0.2)


@dataclass(frozen=True)
class TrajectoryParams:
    """Concrete parameters of one trajectory (see the module docstring for the equations).

    ``angle`` is the initial direction ``θ`` in radians.
    """

    length: float
    samples: int
    anxiety: float
    centripetal: float
    shake: float
    reversal_prob: float
    angle: float

    def to_dict(self) -> dict:
        """Plain-JSON view (floats rounded for a readable manifest; exact values re-drawn from the seed)."""
        d = asdict(self)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def sample_trajectory_params(
    rng: np.random.Generator, ranges: TrajectoryRanges = TrajectoryRanges()
) -> TrajectoryParams:
    """Draw :class:`TrajectoryParams` uniformly from ``ranges`` using ``rng``."""

    def u(lo_hi: tuple[float, float]) -> float:
        lo, hi = lo_hi
        return float(rng.uniform(lo, hi)) if hi > lo else float(lo)

    lo, hi = ranges.samples
    samples = int(rng.integers(lo, hi + 1)) if hi > lo else int(lo)
    return TrajectoryParams(
        length=u(ranges.length),
        samples=max(2, samples),
        anxiety=u(ranges.anxiety),
        centripetal=u(ranges.centripetal),
        shake=u(ranges.shake),
        reversal_prob=u(ranges.reversal_prob),
        angle=float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def make_trajectory(params: TrajectoryParams, rng: np.random.Generator) -> np.ndarray:
    """Simulate one trajectory; returns complex128 positions (pixels) of shape ``(samples,)``.

    The path starts at 0, moves at constant speed ``s = length / (samples − 1)`` and so has total
    length ``length`` exactly (up to rounding).
    """
    n = int(params.samples)
    if n < 2:
        raise ValueError("a trajectory needs at least 2 samples")
    step = params.length / (n - 1)
    a = params.anxiety
    # Draw every random number up front: the same rng state gives the same path.
    jumps = rng.random(n - 1) < params.reversal_prob * a
    turn = rng.uniform(-0.5, 0.5, size=n - 1)
    xi = rng.standard_normal(n - 1) + 1j * rng.standard_normal(n - 1)

    x = np.zeros(n, dtype=np.complex128)
    d = complex(math.cos(params.angle), math.sin(params.angle))
    pos = 0j
    for t in range(n - 1):
        delta = a * step * (params.shake * xi[t] - params.centripetal * pos)
        if jumps[t]:
            delta += 2.0 * d * complex(math.cos(math.pi + turn[t]), math.sin(math.pi + turn[t]))
        nd = d + delta
        mag = abs(nd)
        d = nd / mag if mag > 1e-12 else d
        pos = pos + step * d
        x[t + 1] = pos
    return x
