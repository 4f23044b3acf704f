"""Synthetic Neuron-Inverter-like samples: simulated voltage traces of a 4-compartment neuron.

The Neuron Inverter benchmark regresses the ion-channel conductances of a neuron model from its
voltage traces. Here each sample is a real simulation of a small Hodgkin-Huxley-type cell: a
soma and a chain of three dendritic compartments (soma - d1 - d2 - d3) coupled by an axial
conductance, driven by a current stimulus injected at the soma. Each probe records one
compartment's membrane potential (probe 0 is the soma, probe ``k`` the ``k``-th dendritic
compartment) at 8 kHz, 1,600 bins (0.2 s) by default, in mV with 0.5 mV Gaussian measurement
noise. A CNN has to recover the six conductances that shaped the traces.

Membrane equation of compartment ``i`` (capacitance 1 uF/cm^2, conductances in mS/cm^2,
currents in uA/cm^2, time in ms)::

    C dV_i/dt = I_stim,i - sum_c g_c,i * gates_c(V_i) * (V_i - E_c) + sum_j k_ij (V_j - V_i)

Channels (Traub-Miles / Pospischil et al. 2008 kinetics for the spiking currents)::

    I_Na = g_na  * m^3 h * (V - 50)     fast sodium, soma only
    I_K  = g_k   * n^4   * (V + 90)     delayed rectifier, soma only
    I_M  = g_m   * p     * (V + 90)     slow non-inactivating K (M current), soma only
    I_h  = g_h   * q     * (V + 30)     hyperpolarisation-activated cation current, density
                                        growing along the dendrite (x1, x2, x3, x4)
    I_L  = g_leak        * (V + 70)     leak, uniform

The stimulus is the same for every sample (a fixed protocol is what makes the conductances
identifiable), laid out in fractions of the trace so any ``num_bins`` sees all of it; at 1,600
bins (200 ms):

- 0-15 ms: no current. Resting potential, about -67 mV (-73 to -60 over the prior).
- 15-65 ms: hyperpolarising step of -1.5 uA/cm^2. Passive response and I_h sag.
- 65-80 ms: no current. Rebound (I_h deactivating), sometimes a rebound spike.
- 80-195 ms: depolarising ramp from 3 to 4.5 uA/cm^2, plus a fixed small 300-600 Hz chirp
  ripple. Repetitive spiking with adaptation.
- 195-200 ms: no current. After-hyperpolarisation.

The parameters, all log-uniform, and where each shows in the traces:

``g_na`` (25 to 100 mS/cm^2, sodium)
    Spike height (peaks near +15 mV at the low end, +40 mV at the high end) and upstroke
    speed, spike threshold and so the spike count. The height is a fast feature: a spike is
    about 1 ms wide, 8 bins at 8 kHz, and 4x time averaging cuts its peak by 20-40 mV.
``g_k`` (2.5 to 10 mS/cm^2, delayed rectifier)
    Repolarisation speed (spike width), depth of the fast after-hyperpolarisation, and the
    firing rate. Mostly a fast, spike-shape feature.
``g_m`` (0.02 to 0.2 mS/cm^2, M current, time constant ~100 ms)
    Spike-frequency adaptation over the depolarising ramp (late vs early inter-spike
    intervals), plus a little on rest and rheobase. A slow feature that survives averaging.
``g_leak`` (0.03 to 0.15 mS/cm^2)
    Input resistance: the depth of the hyperpolarising response, the membrane time constant
    (charging curves), the resting potential and the rheobase. Slow.
``g_h`` (0.01 to 0.08 mS/cm^2 at the soma, I_h)
    Sag during the hyperpolarising step (time constant 10-30 ms), rebound depolarisation
    after it, and a depolarised rest; strongest on the distal probes. Slow.
``g_axial`` (0.5 to 5 mS/cm^2, axial coupling between neighbouring compartments)
    How much of the somatic spike reaches the dendrites and how late: dendritic spike
    amplitude falls and its delay grows along the chain when ``g_axial`` is small. The delay
    (a fraction of a ms) and the attenuated spike peaks are fast features; the steady-state
    attenuation of the hyperpolarising step is slow.

So 2x or 4x time averaging keeps ``g_m``, ``g_leak``, ``g_h`` and most of ``g_axial`` but
loses part of ``g_na`` and ``g_k``, which multi-resolution training has to trade off.

Numerics: gating variables use exponential Euler with tabulated rates (0.01 mV grid, the
0/0 points of the rate functions replaced by their limits) and voltages a semi-implicit Euler
step (own conductances implicit, neighbours explicit), which keeps ``V`` a convex combination of
reversal potentials, neighbours and a bounded stimulus term, so it cannot blow up; ``V`` is also
clipped to [-120, 60] mV. The internal step is 1/4 of a bin (31.25 us at 8 kHz) and the trace
is sampled at the start of each bin. Every sample starts at its own resting state (a fixed
point of the equations with gates at steady state), so the first bins show rest, not a
transient. :func:`generate_batch` integrates many samples together (the Python loop over 6,400
steps is the cost, so batching amortises it); :func:`generate` is the per-sample entry point,
deterministic in ``(seed, index)`` alone and exactly equal to a batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "COMPARTMENTS",
    "GENERATOR_NAME",
    "LABEL_NAMES",
    "NOISE_MV",
    "PARAMS",
    "SAMPLE_RATE_HZ",
    "ParamSpec",
    "generate",
    "generate_batch",
    "sample_params",
    "scale_labels",
    "simulate",
    "stimulus",
    "unscale_labels",
]

GENERATOR_NAME = "neuron-hh-synth-v1"
SAMPLE_RATE_HZ = 8000
COMPARTMENTS = 4  # soma + 3 dendritic compartments; probes record the first `probes` of them
NOISE_MV = 0.5  # measurement noise std, mV

_BIN_MS = 1000.0 / SAMPLE_RATE_HZ  # 0.125 ms
_SUBSTEPS = 4  # internal steps per bin
_DT = _BIN_MS / _SUBSTEPS  # 0.03125 ms
_CM = 1.0  # membrane capacitance, uF/cm^2

# Reversal potentials, mV.
_E_NA = 50.0
_E_K = -90.0
_E_H = -30.0
_E_LEAK = -72.0
_V_T = -56.2  # Traub-Miles threshold offset (Pospischil et al. 2008)
_TAU_M_MAX = 400.0  # M-current time constant scale, ms: adaptation within the 115 ms ramp
_V_MIN, _V_MAX = -120.0, 60.0
_REST_ITERATIONS = 200
_TABLE_DV = 0.01  # mV

# Channel densities along the chain (soma, d1, d2, d3), relative to the soma's parameter value.
_NA_PROFILE = np.array([1.0, 0.0, 0.0, 0.0])
_K_PROFILE = np.array([1.0, 0.0, 0.0, 0.0])
_M_PROFILE = np.array([1.0, 0.0, 0.0, 0.0])
_H_PROFILE = np.array([1.0, 2.0, 3.0, 4.0])
# Axial coupling seen by each compartment from its left / right neighbour, relative to
# g_axial. The soma is larger than a dendritic compartment, so the same axial current moves its
# voltage less (area ratio 0.5); the last compartment has no right neighbour.
_LEFT_W = np.array([0.0, 1.0, 1.0, 1.0])
_RIGHT_W = np.array([0.5, 1.0, 1.0, 0.0])

# Stimulus protocol at the soma: (start, end) as fractions of the trace, and current, uA/cm^2.
_HYPER = (0.075, 0.325, -4.0)
_DEPOL = (0.4, 0.975, 4.5, 4.5)
_CHIRP_AMP = 0.4  # uA/cm^2
_CHIRP_HZ = (20.0, 200.0)


@dataclass(frozen=True)
class ParamSpec:
    """One regressed parameter: its name, prior range (log-uniform when ``log``) and unit."""

    name: str
    low: float
    high: float
    log: bool
    unit: str = "mS/cm^2"


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("g_na", 25.0, 100.0, log=True),
    ParamSpec("g_k", 2.5, 10.0, log=True),
    ParamSpec("g_m", 0.02, 0.2, log=True),
    ParamSpec("g_leak", 0.03, 0.15, log=True),
    ParamSpec("g_h", 0.02, 0.2, log=True),
    ParamSpec("g_axial", 0.5, 5.0, log=True),
)

LABEL_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)

# Bounds in the space where each prior is uniform, precomputed for the label maps.
_LO = np.array([np.log(p.low) if p.log else p.low for p in PARAMS], dtype=np.float64)
_HI = np.array([np.log(p.high) if p.log else p.high for p in PARAMS], dtype=np.float64)
_IS_LOG = np.array([p.log for p in PARAMS], dtype=bool)


def sample_params(rng: np.random.Generator) -> np.ndarray:
    """Draw one parameter vector from the prior.

    Returns float64 (6,) physical values in :data:`PARAMS` order (mS/cm^2), uniform in range, or
    log-uniform for parameters with ``log=True``.
    """
    u = rng.uniform(_LO, _HI)  # (P,) in prior space
    return np.where(_IS_LOG, np.exp(u), u)


def scale_labels(params: np.ndarray) -> np.ndarray:
    """Map physical parameters (..., 6) to float32 labels in [-1, 1].

    Log-uniform parameters are mapped in log space so labels are uniform under the prior.
    """
    p = np.asarray(params, dtype=np.float64)
    if p.shape[-1:] != (len(PARAMS),):
        raise ValueError(f"expected parameters with last axis {len(PARAMS)}, got shape {p.shape}")
    x = np.where(_IS_LOG, np.log(np.where(_IS_LOG, p, 1.0)), p)
    return (2.0 * (x - _LO) / (_HI - _LO) - 1.0).astype(np.float32)


def unscale_labels(labels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`scale_labels`: labels (..., 6) in [-1, 1] to float64 physical values."""
    y = np.asarray(labels, dtype=np.float64)
    if y.shape[-1:] != (len(PARAMS),):
        raise ValueError(f"expected labels with last axis {len(PARAMS)}, got shape {y.shape}")
    x = _LO + (y + 1.0) * 0.5 * (_HI - _LO)
    return np.where(_IS_LOG, np.exp(x), x)


def _vtrap(x: np.ndarray, y: float) -> np.ndarray:
    """``x / (exp(x / y) - 1)``, with its limit ``y * (1 - x / (2 y))`` near the 0/0 at x = 0."""
    r = x / y
    small = np.abs(r) < 1e-6
    safe = np.where(small, 1.0, r)  # keeps expm1 away from 0 where the series is used instead
    return np.where(small, y * (1.0 - 0.5 * r), x / np.expm1(safe))


def _steady_states(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steady states and time constants (ms) of the gates (m, h, n, p, q), each (len(v), 5)."""
    u = v - _V_T
    a_m = 0.32 * _vtrap(-(u - 13.0), 4.0)
    b_m = 0.28 * _vtrap(u - 40.0, 5.0)
    a_h = 0.128 * np.exp(-(u - 17.0) / 18.0)
    b_h = 4.0 / (1.0 + np.exp(-(u - 40.0) / 5.0))
    a_n = 0.032 * _vtrap(-(u - 15.0), 5.0)
    b_n = 0.5 * np.exp(-(u - 10.0) / 40.0)
    p_inf = 1.0 / (1.0 + np.exp(-(v + 35.0) / 10.0))
    tau_p = _TAU_M_MAX / (3.3 * np.exp((v + 35.0) / 20.0) + np.exp(-(v + 35.0) / 20.0))
    q_inf = 1.0 / (1.0 + np.exp((v + 80.0) / 8.0))
    tau_q = 10.0 + 40.0 / (np.exp((v + 75.0) / 15.0) + np.exp(-(v + 75.0) / 15.0))
    inf = np.stack([a_m / (a_m + b_m), a_h / (a_h + b_h), a_n / (a_n + b_n), p_inf, q_inf], -1)
    tau = np.stack([1.0 / (a_m + b_m), 1.0 / (a_h + b_h), 1.0 / (a_n + b_n), tau_p, tau_q], -1)
    return inf, tau


@lru_cache(maxsize=1)
def _gate_table() -> np.ndarray:
    """Gate table on the 0.01 mV grid, float64 (15, N): rows 0-4 the steady states of
    (m, h, n, p, q), rows 5-9 the exponential-Euler decay ``exp(-dt / tau)`` and rows 10-14
    ``inf * (1 - decay)``, so one step is ``gate = gate * decay + inf * (1 - decay)``.

    Looking rates up instead of evaluating a dozen exponentials per step is what makes the step
    loop cheap. Gate-major layout keeps each gate's slice contiguous in the step loop.
    """
    n = round((_V_MAX - _V_MIN) / _TABLE_DV) + 1
    v = _V_MIN + _TABLE_DV * np.arange(n)
    inf, tau = _steady_states(v)  # (N, 5) each
    decay = np.exp(-_DT / tau)
    table = np.ascontiguousarray(np.concatenate([inf, decay, inf * (1.0 - decay)], axis=1).T)
    # Shared across calls through the cache, so it must not be mutated by a caller.
    table.setflags(write=False)
    return table


def _table_index(v: np.ndarray) -> np.ndarray:
    """Nearest row of the gate table for voltages ``v`` (any shape), as intp."""
    return ((v - _V_MIN) * (1.0 / _TABLE_DV) + 0.5).astype(np.intp)


def _check_shape(num_bins: int, probes: int) -> None:
    if num_bins < 16:
        raise ValueError(f"num_bins must be >= 16, got {num_bins}")
    if not 1 <= probes <= COMPARTMENTS:
        raise ValueError(f"probes must be between 1 and {COMPARTMENTS}, got {probes}")


@lru_cache(maxsize=8)
def stimulus(num_bins: int = 1600) -> np.ndarray:
    """Somatic stimulus current for a trace of ``num_bins`` bins, float64 (num_bins * 4,) uA/cm^2.

    One value per internal step, taken at the step's midpoint. The protocol (rest, a
    hyperpolarising step, rest, a depolarising ramp with a small chirp ripple, rest) is laid
    out in fractions of the trace; see the module docstring for the times at 1,600 bins.
    """
    if num_bins < 16:
        raise ValueError(f"num_bins must be >= 16, got {num_bins}")
    total = num_bins * _BIN_MS  # ms
    t = (np.arange(num_bins * _SUBSTEPS) + 0.5) * _DT  # (S,) ms
    f = t / total
    i = np.zeros_like(t)
    i[(f >= _HYPER[0]) & (f < _HYPER[1])] = _HYPER[2]
    on = (f >= _DEPOL[0]) & (f < _DEPOL[1])
    s = (f[on] - _DEPOL[0]) / (_DEPOL[1] - _DEPOL[0])  # 0 -> 1 across the ramp
    t_on = t[on] - _DEPOL[0] * total  # ms since ramp onset
    dur = (_DEPOL[1] - _DEPOL[0]) * total
    f0, f1 = _CHIRP_HZ[0] / 1000.0, _CHIRP_HZ[1] / 1000.0  # cycles per ms
    phase = 2.0 * np.pi * (f0 * t_on + 0.5 * (f1 - f0) / dur * t_on**2)
    i[on] = _DEPOL[2] + (_DEPOL[3] - _DEPOL[2]) * s + _CHIRP_AMP * np.sin(phase)
    i.setflags(write=False)
    return i


def _channel_densities(params: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal conductances per compartment from params (B, 6), seven (B, 4) arrays:
    Na, delayed-rectifier K, M, h, leak, and the coupling to the left and right neighbours."""
    g_na, g_k, g_m, g_leak, g_h, g_ax = (params[:, k : k + 1] for k in range(len(PARAMS)))
    return (g_na * _NA_PROFILE, g_k * _K_PROFILE, g_m * _M_PROFILE, g_h * _H_PROFILE,
            g_leak * np.ones(COMPARTMENTS), g_ax * _LEFT_W, g_ax * _RIGHT_W)


def _resting_state(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resting voltages (B, 4) and gates (5, B, 4) with no stimulus.

    The fixed point of the equations with every gate at its steady state, found by damped
    fixed-point iteration from -65 mV (the conductances vary slowly with V below threshold,
    so it converges well within the iterations). Elementwise operations only, so a sample's
    result does not depend on its batch.
    """
    table = _gate_table()
    gna, gk, gm, gh, gl, wl, wr = _channel_densities(params)
    vp = np.zeros((params.shape[0], COMPARTMENTS + 2))  # (B, 6) padded; pads weigh 0
    vp[:, 1:-1] = -65.0
    for _ in range(_REST_ITERATIONS):
        v = vp[:, 1:-1]
        m, h, n, p, q = table[:5].take(_table_index(v), axis=1, mode="clip")  # 5 x (B, 4)
        g_na = gna * m**3 * h
        g_kk = gk * n**4 + gm * p
        g_h = gh * q
        gtot = g_na + g_kk + g_h + gl + wl + wr
        ge = g_na * _E_NA + g_kk * _E_K + g_h * _E_H + gl * _E_LEAK
        v_new = (ge + wl * vp[:, :-2] + wr * vp[:, 2:]) / gtot
        vp[:, 1:-1] = np.clip(0.5 * v + 0.5 * v_new, _V_MIN, _V_MAX)
    v = vp[:, 1:-1].copy()
    return v, table[:5].take(_table_index(v), axis=1, mode="clip")


def simulate(params: np.ndarray, num_bins: int = 1600, probes: int = COMPARTMENTS) -> np.ndarray:
    """Noise-free voltage traces for a batch of parameter vectors.

    ``params`` is float64 (B, 6) physical values in :data:`PARAMS` order. Returns float64
    (B, probes, num_bins) in mV: compartment ``k`` sampled at 8 kHz from the resting state.
    Each row depends on its own parameters only, bit for bit, whatever the batch.
    """
    _check_shape(num_bins, probes)
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != len(PARAMS):
        raise ValueError(f"expected params of shape (B, {len(PARAMS)}), got {params.shape}")
    table = _gate_table()
    current = stimulus(num_bins)  # (num_bins * substeps,)
    gna, gk, gm, gh, gl, wl, wr = _channel_densities(params)
    c_dt = np.full_like(gl, _CM / _DT)
    # Voltage-independent parts of the implicit step's denominator and numerator.
    g_const = gl + wl + wr + c_dt  # (B, 4)
    i_const = gl * _E_LEAK
    gna_e, gk_e, gm_e, gh_e = gna * _E_NA, gk * _E_K, gm * _E_K, gh * _E_H
    v0, gates = _resting_state(params)  # (B, 4), (5, B, 4)
    b = params.shape[0]
    vp = np.zeros((b, COMPARTMENTS + 2))  # (B, 6) padded voltages: neighbours are slices
    vp[:, 1:-1] = v0
    v = vp[:, 1:-1]  # (B, 4) view, updated in place
    left, right = vp[:, :-2], vp[:, 2:]
    m, h, n, p, q = gates  # views, updated in place through `gates`
    scaled = np.empty_like(v)
    out = np.empty((num_bins, b, probes))  # (T, B, probes), transposed at the end
    inv_dv = 1.0 / _TABLE_DV
    offset = -_V_MIN * inv_dv + 0.5
    # The loop body is ~30 NumPy calls on tiny arrays, so Python overhead sets the cost; every
    # avoidable temporary and scalar broadcast is folded into the precomputed arrays above.
    for j in range(num_bins):
        # The implicit step keeps V bounded already; the clip guards the table and the data.
        np.maximum(v, _V_MIN, out=v)
        np.minimum(v, _V_MAX, out=v)
        out[j] = v[:, :probes]
        for s in range(_SUBSTEPS):
            # Exponential Euler for the gates at the current voltage.
            np.multiply(v, inv_dv, out=scaled)
            scaled += offset
            tab = table.take(scaled.astype(np.intp), axis=1, mode="clip")  # (15, B, 4)
            gates *= tab[5:10]
            gates += tab[10:]
            o_na = m * m
            o_na *= m
            o_na *= h  # m^3 h
            o_k = n * n
            o_k *= o_k  # n^4
            # Semi-implicit voltage step: own conductances implicit, neighbours explicit.
            gtot = gna * o_na
            gtot += gk * o_k
            gtot += gm * p
            gtot += gh * q
            gtot += g_const
            num = gna_e * o_na
            num += gk_e * o_k
            num += gm_e * p
            num += gh_e * q
            num += i_const
            num += c_dt * v
            num += wl * left
            num += wr * right
            num[:, 0] += current[j * _SUBSTEPS + s]  # the stimulus enters at the soma
            np.divide(num, gtot, out=v)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def generate_batch(indices: Sequence[int], seed: int, num_bins: int = 1600,
                   probes: int = COMPARTMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Generate samples ``indices`` of the dataset with ``seed``, simulated together.

    Row ``b`` equals :func:`generate` ``(indices[b], seed, ...)`` exactly: each sample's own
    generator draws its parameters and its noise, and the integration is elementwise.

    Returns voltages float32 (B, probes, num_bins) in mV and labels float32 (B, 6) in [-1, 1].
    """
    _check_shape(num_bins, probes)
    if len(indices) == 0:
        raise ValueError("indices must hold at least one sample index")
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, int(i)])) for i in indices]
    params = np.stack([sample_params(r) for r in rngs])  # (B, 6)
    v = simulate(params, num_bins, probes)  # (B, probes, T)
    for b, r in enumerate(rngs):
        v[b] += NOISE_MV * r.standard_normal((probes, num_bins))
    return v.astype(np.float32), scale_labels(params)


def generate(index: int, seed: int, num_bins: int = 1600,
             probes: int = COMPARTMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Generate sample ``index`` of the dataset with ``seed``: (voltages, labels).

    Deterministic in ``(seed, index)`` only, so any rank can produce any sample, and equal to
    the matching row of :func:`generate_batch`. Costs one batch-of-one simulation; generating
    many samples through :func:`generate_batch` is much cheaper per sample.

    Returns voltages float32 (probes, num_bins) in mV and labels float32 (6,) in [-1, 1].
    """
    x, y = generate_batch([index], seed, num_bins, probes)
    return x[0], y[0]
