"""Priors over the physical parameters a synthetic dataset encodes, and the label maps.

Labels are the parameters mapped to [-1, 1], in log space for log-uniform parameters, so
that labels are uniform under the prior whatever the parameter's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    """One regressed parameter: its name, prior range (log-uniform when ``log``) and unit."""

    name: str
    low: float
    high: float
    log: bool
    unit: str = ""


class Prior:
    """Sampling and label scaling for a tuple of parameters."""

    def __init__(self, params: tuple[ParamSpec, ...]) -> None:
        self.params = params
        # Bounds in the space where each prior is uniform.
        self._lo = np.array([np.log(p.low) if p.log else p.low for p in params], np.float64)
        self._hi = np.array([np.log(p.high) if p.log else p.high for p in params], np.float64)
        self._is_log = np.array([p.log for p in params], dtype=bool)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One float64 (P,) parameter vector: uniform in range, or log-uniform where ``log``."""
        u = rng.uniform(self._lo, self._hi)  # (P,) in prior space
        return np.where(self._is_log, np.exp(u), u)

    def _check(self, a: np.ndarray, what: str) -> None:
        if a.shape[-1:] != (len(self.params),):
            raise ValueError(f"expected {what} with last axis {len(self.params)}, got shape "
                             f"{a.shape}")

    def scale(self, params: np.ndarray) -> np.ndarray:
        """Physical parameters (..., P) -> float32 labels in [-1, 1]."""
        p = np.asarray(params, dtype=np.float64)
        self._check(p, "parameters")
        x = np.where(self._is_log, np.log(np.where(self._is_log, p, 1.0)), p)
        return (2.0 * (x - self._lo) / (self._hi - self._lo) - 1.0).astype(np.float32)

    def unscale(self, labels: np.ndarray) -> np.ndarray:
        """Inverse of `scale`: labels (..., P) in [-1, 1] -> float64 physical values."""
        y = np.asarray(labels, dtype=np.float64)
        self._check(y, "labels")
        x = self._lo + (y + 1.0) * 0.5 * (self._hi - self._lo)
        return np.where(self._is_log, np.exp(x), x)
