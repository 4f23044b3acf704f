"""Synthetic Neuron-Inverter-like samples: simulated voltage traces of a 4-compartment neuron.

The Neuron Inverter benchmark regresses the ion-channel conductances of a neuron model from its
voltage traces. Here each sample is a real simulation of a small Hodgkin-Huxley-type cell: a
soma and a chain of three dendritic compartments (soma - d1 - d2 - d3) coupled by an axial
conductance, driven by a current stimulus injected at the soma. Probe ``k`` records the
membrane potential of compartment ``k`` (probe 0 is the soma) at 8 kHz, 1,600 bins (0.2 s) by
default, in mV with 0.5 mV Gaussian measurement noise. A CNN has to recover the six
conductances that shaped the traces.

Membrane equation of compartment ``i`` (capacitance 1 uF/cm^2, conductances in mS/cm^2,
currents in uA/cm^2, time in ms)::

    C dV_i/dt = I_stim,i - sum_c g_c,i * gates_c(V_i) * (V_i - E_c) + sum_j k_ij (V_j - V_i)

Channels (Traub-Miles kinetics as in Pospischil et al. 2008 for Na, K and M)::

    I_Na = g_na   * m^3 h * (V - 50)   fast sodium, soma only
    I_K  = g_k    * n^4   * (V + 90)   delayed rectifier, soma only
    I_M  = g_m    * p     * (V + 90)   slow non-inactivating K (M current), soma only
    I_h  = g_h    * q     * (V + 30)   hyperpolarisation-activated cation current, density
                                       growing along the dendrite (x1, x2, x3, x4)
    I_L  = g_leak         * (V + 72)   leak, uniform

The coupling ``k_ij`` is ``g_axial`` between neighbours, halved at the soma (a soma has twice
the membrane area of a dendritic compartment, so the same axial current moves it less).

The stimulus is the same for every sample (a fixed protocol is what makes the conductances
identifiable), laid out in fractions of the trace so that any ``num_bins`` sees all of it; at
1,600 bins (200 ms):

- 0-15 ms: no current. Resting potential, about -65 mV (-70 to -57 over the prior).
- 15-65 ms: hyperpolarising step of -4 uA/cm^2, down to -70 to -95 mV. Passive response and
  the I_h sag.
- 65-80 ms: no current. Rebound depolarisation (I_h deactivating slowly).
- 80-195 ms: depolarising step of 4.5 uA/cm^2 with a 0.4 uA/cm^2 chirp ripple (20 to 200 Hz).
  Repetitive spiking with adaptation in most cells (about 85% of the prior fires, up to
  ~30 spikes), a few spikes then silence in strongly adapting ones, none in leaky ones.
- 195-200 ms: no current. After-hyperpolarisation.

The parameters, all log-uniform, and where each shows in the traces. The numbers are rank
correlations of hand-made trace features with the parameter over the prior, and the held-out
R^2 of a ridge fit of the parameter's log on ~15 such features (quadratic terms included) at
full resolution -> after 4x time averaging, measured on 512 samples:

``g_na`` (25 to 100 mS/cm^2, sodium)
    Spike height (somatic peaks up to +48 mV, median +40; rank correlation 0.8) and upstroke
    speed, spike delay into the dendrite. A fast feature: a spike is about 1 ms wide, 8 bins
    at 8 kHz, and 4x averaging lowers the sampled peak by 16 mV on average (up to 30; 2x: 4
    mV). R^2 0.78 -> 0.71.
``g_k`` (3.5 to 14 mS/cm^2, delayed rectifier)
    Repolarisation speed, i.e. spike width (rank correlation -0.9), and the depth of the fast
    after-hyperpolarisation (-0.7). Spike shape, but the AHP and firing pattern carry much of
    it through averaging: R^2 0.83 -> 0.81 (0.76 at 8x). The weakest K currents with strong
    coupling occasionally (~2%) end in depolarisation block near -20 mV.
``g_m`` (0.02 to 0.2 mS/cm^2, M current, time constant ~100 ms while firing)
    Spike-frequency adaptation during the depolarising step: the late-over-early spike count
    ratio falls as ``g_m`` grows (rank correlation -0.5 to -0.7), and fewer spikes overall.
    A slow feature, and the hardest parameter to read (R^2 ~0.45 at any resolution).
``g_leak`` (0.03 to 0.15 mS/cm^2)
    Input resistance: depth of the hyperpolarising response (-0.7), charging time constants,
    resting potential (-0.5) and rheobase, so the spike count (-0.8). Slow; R^2 0.99.
``g_h`` (0.02 to 0.2 mS/cm^2 at the soma, I_h)
    Sag during the hyperpolarising step (rank correlation 0.94, time constant 10-30 ms), the
    rebound after it (0.9) and a depolarised rest (0.85), strongest on the distal probes.
    Slow; R^2 0.99.
``g_axial`` (0.5 to 5 mS/cm^2, axial coupling between neighbouring compartments)
    How much of the somatic spike reaches the dendrites (peak on probe 1: rank correlation
    0.96) and how late (delay -0.9, a fraction of a ms), and the steady-state attenuation of
    the hyperpolarising step along the chain. The last is slow, so R^2 stays ~0.94 after
    averaging even though the spike delay is lost.

So 2x or 4x time averaging keeps ``g_leak``, ``g_h``, ``g_axial`` and ``g_m`` and degrades
the spike-shape features (peak height, width, dendritic delay) that carry ``g_na`` and part of
``g_k``; multi-resolution training has to trade cheap coarse inputs against those.

Numerics: the gates use exponential Euler with tabulated rates (0.01 mV grid, the 0/0 points
of the rate functions replaced by their limits) and the voltages a semi-implicit Euler step
(own conductances implicit, neighbours explicit, like NEURON's default backward Euler), which
keeps ``V`` a convex combination of reversal potentials, neighbours and a bounded stimulus
term, so it cannot blow up; ``V`` is also clipped to [-120, 60] mV. The internal step is 1/4 of
a bin (31.25 us at 8 kHz) and each bin samples ``V`` at its start. Every sample starts at its
own resting state (the fixed point of the equations, by Newton iteration), so the first bins
show rest, not a transient.

:func:`generate` is the per-sample entry point, deterministic in ``(seed, index)`` alone.
:func:`generate_batch` integrates many samples together and returns exactly the same rows: the
Python loop over 6,400 steps sets the cost (~0.3 s for one sample, ~10 ms per sample in
batches of 64 or more on one CPU core), so write datasets in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from hpc_multires.data.synth.priors import ParamSpec, Prior

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
_TAU_M_MAX = 400.0  # M-current time constant scale, ms: adaptation within the 115 ms step
_V_MIN, _V_MAX = -120.0, 60.0
_REST_ITERATIONS = 25  # Newton steps for the resting state
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
_DEPOL = (0.4, 0.975, 4.5)
# A small chirp on the depolarising step probes the membrane's frequency response (I_h and
# I_M resonances) and makes spike timing less regular than on a flat step.
_CHIRP_AMP = 0.4  # uA/cm^2
_CHIRP_HZ = (20.0, 200.0)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("g_na", 25.0, 100.0, log=True, unit="mS/cm^2"),
    ParamSpec("g_k", 3.5, 14.0, log=True, unit="mS/cm^2"),
    ParamSpec("g_m", 0.02, 0.2, log=True, unit="mS/cm^2"),
    ParamSpec("g_leak", 0.03, 0.15, log=True, unit="mS/cm^2"),
    ParamSpec("g_h", 0.02, 0.2, log=True, unit="mS/cm^2"),
    ParamSpec("g_axial", 0.5, 5.0, log=True, unit="mS/cm^2"),
)

LABEL_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)

PRIOR = Prior(PARAMS)


# The prior's draws and label maps (log space for log-uniform parameters), by name.
sample_params = PRIOR.sample
scale_labels = PRIOR.scale
unscale_labels = PRIOR.unscale


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
    hyperpolarising step, rest, a depolarising step with a small chirp ripple, rest) is laid
    out in fractions of the trace; see the module docstring for the times at 1,600 bins.
    The returned array is cached and read-only.
    """
    if num_bins < 16:
        raise ValueError(f"num_bins must be >= 16, got {num_bins}")
    total = num_bins * _BIN_MS  # ms
    t = (np.arange(num_bins * _SUBSTEPS) + 0.5) * _DT  # (S,) ms
    f = t / total
    i = np.zeros_like(t)
    i[(f >= _HYPER[0]) & (f < _HYPER[1])] = _HYPER[2]
    on = (f >= _DEPOL[0]) & (f < _DEPOL[1])
    t_on = t[on] - _DEPOL[0] * total  # ms since the step's onset
    dur = (_DEPOL[1] - _DEPOL[0]) * total
    f0, f1 = _CHIRP_HZ[0] / 1000.0, _CHIRP_HZ[1] / 1000.0  # cycles per ms
    # Linear chirp: the instantaneous frequency sweeps f0 -> f1 over the step.
    phase = 2.0 * np.pi * (f0 * t_on + 0.5 * (f1 - f0) / dur * t_on**2)
    i[on] = _DEPOL[2] + _CHIRP_AMP * np.sin(phase)
    i.setflags(write=False)
    return i


def _channel_densities(params: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal conductances per compartment from params (B, 6), seven (B, 4) arrays:
    Na, delayed-rectifier K, M, h, leak, and the coupling to the left and right neighbours."""
    g_na, g_k, g_m, g_leak, g_h, g_ax = (params[:, k : k + 1] for k in range(len(PARAMS)))
    return (g_na * _NA_PROFILE, g_k * _K_PROFILE, g_m * _M_PROFILE, g_h * _H_PROFILE,
            g_leak * np.ones(COMPARTMENTS), g_ax * _LEFT_W, g_ax * _RIGHT_W)


def _steady_current(v: np.ndarray, densities: tuple[np.ndarray, ...]) -> np.ndarray:
    """Membrane current (B, 4) in uA/cm^2 at voltages ``v`` (B, 4) with every gate at its
    steady state (table lookup, as the simulation sees it)."""
    gna, gk, gm, gh, gl = densities[:5]
    m, h, n, p, q = _gate_table()[:5].take(_table_index(v), axis=1, mode="clip")  # 5 x (B, 4)
    return (gna * m**3 * h * (v - _E_NA) + (gk * n**4 + gm * p) * (v - _E_K)
            + gh * q * (v - _E_H) + gl * (v - _E_LEAK))


def _resting_state(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resting voltages (B, 4) and gates (5, B, 4) with no stimulus.

    The fixed point of the equations with every gate at its steady state, by step-limited Newton
    iteration from -65 mV. Plain fixed-point iteration crawls for cells close to spontaneous
    firing (strong I_h, little leak), whose current-voltage curve is nearly flat at rest. The
    Jacobian is tridiagonal (the chain), solved by the Thomas algorithm written out with
    elementwise operations, so a sample's result does not depend on its batch.
    """
    dens = _channel_densities(params)
    wl, wr = dens[5], dens[6]
    v = np.full_like(wl, -65.0)  # (B, 4)
    delta = 0.25  # mV, central-difference step for the membrane slope conductance
    for _ in range(_REST_ITERATIONS):
        vp = np.pad(v, ((0, 0), (1, 1)))  # (B, 6), the pads weigh 0
        f = _steady_current(v, dens) - wl * (vp[:, :-2] - v) - wr * (vp[:, 2:] - v)  # (B, 4)
        slope = (_steady_current(v + delta, dens) - _steady_current(v - delta, dens)) / (
            2.0 * delta)
        # Tridiagonal J: sub-diagonal -wl, diagonal slope + wl + wr, super-diagonal -wr.
        diag = slope + wl + wr
        c_prime = np.zeros_like(v)
        d_prime = np.zeros_like(v)
        for i in range(COMPARTMENTS):
            denom = diag[:, i] + (wl[:, i] * c_prime[:, i - 1] if i else 0.0)
            # Guard the (never observed) zero pivot of a cell sitting exactly on a fold.
            denom = np.where(np.abs(denom) < 1e-9, 1e-9, denom)
            c_prime[:, i] = -wr[:, i] / denom
            d_prime[:, i] = (f[:, i] + (wl[:, i] * d_prime[:, i - 1] if i else 0.0)) / denom
        step = np.zeros_like(v)
        step[:, -1] = d_prime[:, -1]
        for i in range(COMPARTMENTS - 2, -1, -1):
            step[:, i] = d_prime[:, i] - c_prime[:, i] * step[:, i + 1]
        # Limited steps keep Newton on the branch it starts on, near -65 mV.
        v = np.clip(v - np.clip(step, -5.0, 5.0), _V_MIN, _V_MAX)
    return v, _gate_table()[:5].take(_table_index(v), axis=1, mode="clip")


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
    b = params.shape[0]
    c_dt = np.full_like(gl, _CM / _DT)  # (B, 4)
    # Voltage-independent parts of the implicit step's denominator and numerator.
    g_const = gl + wl + wr + c_dt  # (B, 4)
    i_const = gl * _E_LEAK
    # One buffer holds the gates (m, h, n, p, q) and the open fractions m^3 h and n^4 after
    # them, so that rows 3-6 are the open fractions of the M, h, Na and K channels, in that
    # order, and one product with the stacked conductances gives every channel at once.
    state = np.empty((7, b, COMPARTMENTS))
    v0, state[:5] = _resting_state(params)  # (B, 4), (5, B, 4)
    gates, opens = state[:5], state[3:]  # (5, B, 4), (4, B, 4) views
    m, h, n, _, _, o_na, o_k = state  # (B, 4) views
    gbar = np.stack([np.stack([gm, gh, gna, gk]),
                     np.stack([gm * _E_K, gh * _E_H, gna * _E_NA, gk * _E_K])])  # (2, 4, B, 4)
    prod = np.empty_like(gbar)
    vp = np.zeros((b, COMPARTMENTS + 2))  # (B, 6) padded voltages: neighbours are slices
    vp[:, 1:-1] = v0
    v = vp[:, 1:-1]  # (B, 4) view, updated in place
    left, right = vp[:, :-2], vp[:, 2:]
    scaled = np.empty_like(v)
    num = np.empty_like(v)
    out = np.empty((num_bins, b, probes))  # (T, B, probes), transposed at the end
    # Operations with a Python scalar cost twice those with an array, so the constants of the
    # loop are arrays: the table index map and the stimulus, which enters at the soma only.
    inv_dv = np.full_like(v, 1.0 / _TABLE_DV)
    offset = np.full_like(v, -_V_MIN / _TABLE_DV + 0.5)
    inject = current[:, None, None] * np.array([1.0, 0.0, 0.0, 0.0])  # (S, 1, 4)
    # The loop body is ~25 NumPy calls on tiny arrays, so Python overhead sets the cost: the
    # channels are stacked and every constant is folded into a precomputed array. All of it
    # is elementwise (the sum over channels adds them in a fixed order), so a row's result
    # does not depend on the batch.
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
            np.multiply(m, m, out=o_na)
            o_na *= m
            o_na *= h  # m^3 h
            np.multiply(n, n, out=o_k)
            o_k *= o_k  # n^4
            np.multiply(gbar, opens, out=prod)  # (2, 4, B, 4): g and g * E per channel
            g_e = prod.sum(axis=1)  # (2, B, 4)
            # Semi-implicit voltage step: own conductances implicit, neighbours explicit.
            gtot = g_e[0]
            gtot += g_const
            np.multiply(c_dt, v, out=num)
            num += g_e[1]
            num += i_const
            num += wl * left
            num += wr * right
            num += inject[j * _SUBSTEPS + s]
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
