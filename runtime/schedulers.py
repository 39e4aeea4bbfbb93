"""Samplers as pure functions: per-step scalars for the in-graph update of the denoise step.

Every sampler here is, per step, a linear combination of a few tensors:

    x_next = a*x + b*out + Σk hx_k*x_{i-k} + Σk ho_k*out_{i-k} + d*noise    (out: guided U-Net output)

Each function below follows its diffusers scheduler's arithmetic line by line, but on `Lin`
(symbolic linear combinations of the step tensors) instead of tensors; `_row` then reads the
scalars off. So the sampler math lives here once and the graph only applies a row per step.
Scalars are fp64; the ᾱ table is built in fp32 as diffusers builds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping

import numpy as np

from sdrt.errors import InputError, is_integer

HISTORY = 4  # previous steps the graph keeps (PLMS reaches 4 back at its 5th step)
# A row of step coefficients: [c_in, a, b, hx_1..K, ho_1..K, d, ka, kn]. ka, kn re-noise the known
# region of an inpainting mask to the next step's level: known = ka * image_latents + kn * image_noise.
C_IN, A, B, HX, HO = 0, 1, 2, 3, 3 + HISTORY
D, KA, KN = 3 + 2 * HISTORY, 4 + 2 * HISTORY, 5 + 2 * HISTORY
N_COEFFS = 6 + 2 * HISTORY


class Lin:
    """A linear combination of step tensors, keyed ("x" | "out" | "noise", step index)."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[tuple[str, int], float]):
        self.terms = dict(terms)

    @staticmethod
    def var(kind: str, step: int) -> "Lin":
        return Lin({(kind, step): 1.0})

    def __add__(self, other: "Lin") -> "Lin":
        terms = dict(self.terms)
        for key, c in other.terms.items():
            terms[key] = terms.get(key, 0.0) + c
        return Lin(terms)

    def __mul__(self, s: float) -> "Lin":
        return Lin({k: c * float(s) for k, c in self.terms.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "Lin":
        return self * -1.0

    def __sub__(self, other: "Lin") -> "Lin":
        return self + (-other)

    def __truediv__(self, s: float) -> "Lin":
        return self * (1.0 / float(s))


@dataclass(frozen=True)
class SamplerPlan:
    """What the runtime needs to run one sampler for n steps."""

    name: str
    timesteps: np.ndarray  # (n,) f64, the U-Net's t per step
    coeffs: np.ndarray  # (n, N_COEFFS) f64 rows [c_in, a, b, hx_1..K, ho_1..K, d, ka, kn]
    init_noise_sigma: float  # text-to-image start: latents = init_noise_sigma * noise
    # image-to-image start, the scheduler's add_noise at the first step: latents = α * image + σ * noise
    start_level: tuple[float, float] = (0.0, 1.0)
    # (n, n) lower-triangular: the noise call i uses is Σ_j noise_mix[i, j] z_j over independent normal draws z
    # (DPM++ SDE's two calls per step read overlapping Brownian increments); None: call i uses z_i
    noise_mix: np.ndarray | None = None

    @property
    def uses_noise(self) -> bool:
        return bool(np.any(self.coeffs[:, D] != 0))

    def mix_noise(self, draws: np.ndarray) -> np.ndarray:
        """(n, ...) independent standard normals -> the (n, ...) noise the calls use."""
        if self.noise_mix is None:
            return draws
        return np.tensordot(self.noise_mix, draws, axes=1).astype(np.float32)

    def __len__(self) -> int:
        return len(self.timesteps)


def _row(x_next: Lin, step: int, c_in: float) -> np.ndarray:
    row = np.zeros(N_COEFFS)
    row[C_IN] = c_in
    for (kind, j), c in x_next.terms.items():
        lag = step - j
        if c == 0:  # a term that cancelled exactly (UniPC's substituted corrector)
            continue
        if kind == "noise" and lag == 0:
            row[D] += c
        elif lag == 0:
            row[A if kind == "x" else B] += c
        elif 1 <= lag <= HISTORY and kind in ("x", "out"):
            row[(HX if kind == "x" else HO) + lag - 1] += c
        else:
            raise AssertionError(f"sampler needs {kind} from {lag} steps back; the graph keeps {HISTORY}")
    return row


def _plan(name: str, timesteps: np.ndarray, rows: list[np.ndarray], init_noise_sigma: float,
          levels: list[tuple[float, float]], start: int, noise_mix: np.ndarray | None = None) -> SamplerPlan:
    """The plan of calls start..n-1 of an n-call grid. rows: their coefficients; levels[j]: the (α, σ)
    of the scheduler's add_noise at grid call j (the noised image there is α * image + σ * noise)."""
    n = len(timesteps)
    coeffs = np.array(rows, dtype=np.float64).reshape(n - start, N_COEFFS)
    coeffs[:, [KA, KN]] = [levels[j + 1] if j + 1 < n else (1.0, 0.0) for j in range(start, n)]  # clean at the end
    mix = None if noise_mix is None else noise_mix[start:, start:]
    return SamplerPlan(name, np.asarray(timesteps, np.float64)[start:], coeffs, init_noise_sigma, tuple(levels[start]),
                       mix)


def _vp_level(alpha_bar: float) -> tuple[float, float]:
    """DDPM's add_noise: sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε."""
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def _sigma_level(sigma: float) -> tuple[float, float]:
    """k-diffusion's add_noise (Euler): x0 + σ ε."""
    return 1.0, float(sigma)


def _dpm_level(sigma: float) -> tuple[float, float]:
    """DPM-Solver's add_noise: the VP (α_t, σ_t) of a k-diffusion σ."""
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def strength_start(steps: int, strength: float, flow: bool = False) -> int:
    """The first step image-to-image runs, as diffusers' get_timesteps: the last ⌊steps × strength⌋ run;
    flow (diffusers' SD3 pipelines): the first ⌊steps - steps × strength⌋ are skipped (in float, as there)."""
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1):
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
    run = steps - int(max(steps - min(steps * strength, steps), 0)) if flow else min(int(steps * strength), steps)
    if run < 1:
        raise InputError(f"strength {strength} of {steps} steps runs no step (⌊steps × strength⌋ = 0): "
                         "raise strength or steps")
    return steps - run


# scheduler_config.json keys that change diffusers' output for some sdrt sampler but that sdrt does not
# implement: refused (at `sdrt export` and at load) unless at the value that is diffusers' default.
# clip_sample / thresholding clip or rescale x0 (not a linear update); the others pick σ grids sdrt lacks.
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "clip_sample": (False, None),
    "thresholding": (False, None),
    "interpolation_type": ("linear", None),
    "final_sigmas_type": ("zero", None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "timestep_type": ("discrete", None),
    "sigma_min": (None,),
    "sigma_max": (None,),
}
# FlowMatchEulerDiscreteScheduler keys sdrt does not implement (SD3 and SD3.5 ship them at these values)
FLOW_UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "use_dynamic_shifting": (False, None),  # resolution-dependent shift (Flux)
    "shift_terminal": (None,),
    "invert_sigmas": (False, None),
    "stochastic_sampling": (False, None),
    "use_karras_sigmas": (False, None),
}
# Settings one sampler's diffusers class reads that sdrt runs at one value only. A key missing from
# scheduler_config.json takes that class's default, so a config saved from another class (Euler's has no
# clip_sample or skip_prk_steps) can ask for what sdrt does not run: that sampler is refused naming the key.
# sampler -> (its diffusers class, {key: (the class's default, the value sdrt runs)})
SAMPLER_SETTINGS: dict[str, tuple[str, dict[str, tuple[Any, Any]]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": (True, False)}),  # True clamps x0 to [-1, 1]: not a linear update
    "plms": ("PNDMScheduler", {"skip_prk_steps": (False, True)}),  # False: Runge-Kutta warm-up steps first
}
SAMPLER_SETTING_KEYS = sorted({key for _, table in SAMPLER_SETTINGS.values() for key in table})
FLOW = "flow"


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler_config.json is a flow-matching scheduler's (SD3): only its class says so."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule, from a diffusers scheduler_config.json."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None  # overrides beta_schedule
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None  # None: each scheduler's own default
    timestep_spacing: str | None = None  # None: each scheduler's own default
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, Algorithm 1
    use_karras_sigmas: bool = False  # Euler and DPM++ 2M follow it, as diffusers' schedulers do
    shift: float = 1.0  # flow matching: σ -> shift·σ / (1 + (shift - 1)·σ) (Esser et al. 2024, eq. 23)
    # the config's values of SAMPLER_SETTINGS keys (a key left out takes the sampler's class default)
    sampler_settings: tuple[tuple[str, Any], ...] = ()

    @property
    def flow(self) -> bool:
        """Rectified flow (SD3): x_t = (1 - σ) x0 + σ ε and the model predicts v = ε - x0."""
        return self.prediction_type == FLOW

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Refuses, naming the key, every setting sdrt would otherwise silently ignore."""
        flow = is_flow_config(config)
        unsupported = UNSUPPORTED_SETTINGS | (FLOW_UNSUPPORTED_SETTINGS if flow else {})
        for key, accepted in unsupported.items():
            if key in config and config[key] not in accepted:
                raise InputError(f"scheduler_config.json sets {key}={config[key]!r}, which sdrt does not implement "
                                 f"(supported: {accepted[0]!r}); edit the model's scheduler config or report it")
        known = {f for f in cls.__dataclass_fields__} - {"sampler_settings"}
        kwargs: dict[str, Any] = {k: v for k, v in config.items() if k in known}
        kwargs["sampler_settings"] = tuple((key, config[key]) for key in SAMPLER_SETTING_KEYS if key in config)
        if flow:
            if "prediction_type" in kwargs:
                raise InputError("scheduler_config.json: a flow-matching scheduler with a prediction_type; "
                                 "remove the key (flow models predict a velocity)")
            kwargs["prediction_type"] = FLOW
        elif "shift" in kwargs:
            raise InputError("scheduler_config.json sets shift, a flow-matching setting, on a "
                             f"{config.get('_class_name', 'noise-prediction')} scheduler: remove it")
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        schedule = cls(**kwargs)
        if schedule.trained_betas is None and schedule.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule {schedule.beta_schedule!r} is not supported ({', '.join(BETA_SCHEDULES)})")
        if schedule.trained_betas is not None and len(schedule.trained_betas) != schedule.num_train_timesteps:
            raise InputError(f"trained_betas has {len(schedule.trained_betas)} values for "
                             f"{schedule.num_train_timesteps} train timesteps")
        if schedule.prediction_type not in ((FLOW,) if flow else ("epsilon", "v_prediction")):  # flow: from the class
            raise InputError(f"prediction_type {schedule.prediction_type!r} is not supported (epsilon, v_prediction)")
        if not (isinstance(schedule.shift, (int, float)) and 0 < schedule.shift < 1000):
            raise InputError(f"scheduler_config.json: shift must be a positive number, got {schedule.shift!r}")
        if schedule.timestep_spacing not in SPACINGS + (None,):
            raise InputError(f"timestep_spacing {schedule.timestep_spacing!r} is not supported ({', '.join(SPACINGS)})")
        return schedule

    def betas(self) -> np.ndarray:
        """β_t, (T,) f32 as diffusers builds them (rescaled to zero terminal SNR if asked)."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.array(self.trained_betas, dtype=np.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, β capped at 0.999
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        if self.rescale_betas_zero_snr:  # shift √ᾱ so its last value is 0, rescale so its first is unchanged
            sqrt_acp = np.sqrt(np.cumprod(np.float32(1.0) - betas, dtype=np.float32))
            first, last = sqrt_acp[0].copy(), sqrt_acp[-1].copy()
            sqrt_acp = (sqrt_acp - last) * (first / (first - last))
            acp = sqrt_acp**2
            betas = np.float32(1.0) - np.concatenate([acp[:1], acp[1:] / acp[:-1]])
        return betas.astype(np.float32)

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t, (T,) — computed in fp32 like diffusers, returned as f64 (read-only). 0 at T with zero
        terminal SNR."""
        return self._alphas_cumprod

    @cached_property  # samplers and σ read it several times per plan; a cosine schedule costs 1,000 cos()
    def _alphas_cumprod(self) -> np.ndarray:
        acp = np.cumprod(np.float32(1.0) - self.betas(), dtype=np.float32).astype(np.float64)
        acp.flags.writeable = False
        return acp

    def sigmas(self) -> np.ndarray:
        """k-diffusion σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), (T,), computed in fp32 like diffusers; with zero
        terminal SNR the last ᾱ is 2^-24 (diffusers' σ schedulers), so σ_max stays finite."""
        acp = self.alphas_cumprod().astype(np.float32)
        if self.rescale_betas_zero_snr:
            acp[-1] = 2.0**-24
        return (((1 - acp) / acp) ** 0.5).astype(np.float64)

    def spacing(self, default: str) -> str:
        return self.timestep_spacing or default

    def final_alpha(self, default_to_one: bool) -> float:
        to_one = default_to_one if self.set_alpha_to_one is None else self.set_alpha_to_one
        return 1.0 if to_one else float(self.alphas_cumprod()[0])


# --- timestep grids (Lin et al. 2023, "Common Diffusion Noise Schedules ...", Table 2) ---------

def _discrete_timesteps(schedule: NoiseSchedule, n: int, spacing: str) -> np.ndarray:
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise InputError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    log_sigma = math.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), None, len(log_sigmas) - 2))
    w = float(np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1))
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _vp_predict(x: Lin, out: Lin, alpha_bar: float, prediction_type: str) -> tuple[Lin, Lin]:
    """(x0, eps) from the model output in the variance-preserving parametrization."""
    return _vp_x0_eps(x, out, math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar), prediction_type)


def _vp_x0_eps(x: Lin, out: Lin, sa: float, sb: float, prediction_type: str) -> tuple[Lin, Lin]:
    """(x0, eps) at x = sa·x0 + sb·eps."""
    if prediction_type == "v_prediction":  # Salimans & Ho 2022
        return sa * x - sb * out, sa * out + sb * x
    return (x - sb * out) / sa, out


def _sigma_grid(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """σ at float timesteps, f32 as diffusers stores them, with a final 0."""
    all_sigmas = schedule.sigmas()
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)


# --- samplers -------------------------------------------------------------------------------------

def ddim(schedule: NoiseSchedule, n: int, start: int = 0) -> SamplerPlan:
    """Song et al. 2021, η = 0 (diffusers DDIMScheduler)."""
    ts = _discrete_timesteps(schedule, n, schedule.spacing("leading"))
    acp = schedule.alphas_cumprod()
    final = schedule.final_alpha(default_to_one=True)
    rows = []
    for i in range(start, n):
        t = ts[i]
        x, out = Lin.var("x", i), Lin.var("out", i)
        prev_t = t - schedule.num_train_timesteps // n
        a_prev = acp[prev_t] if prev_t >= 0 else final
        x0, eps = _vp_predict(x, out, acp[t], schedule.prediction_type)
        rows.append(_row(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, i, 1.0))
    return _plan("ddim", ts, rows, 1.0, [_vp_level(acp[t]) for t in ts], start)


def plms(schedule: NoiseSchedule, n: int, start: int = 0) -> SamplerPlan:
    """Liu et al. 2022, pseudo linear multistep (diffusers PNDMScheduler, skip_prk_steps). Its grid has
    n + 1 steps (the second repeats the first's timestep); image-to-image starts on it fresh, as diffusers."""
    spacing = schedule.spacing("leading")
    T = schedule.num_train_timesteps
    if spacing == "leading":
        base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + schedule.steps_offset
    elif spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    else:
        base = _discrete_timesteps(schedule, n, spacing)[::-1]
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    acp = schedule.alphas_cumprod()
    final = schedule.final_alpha(default_to_one=True)

    def prev_sample(sample: Lin, t: int, prev_t: int, out: Lin) -> Lin:
        a_t, a_p = acp[t], (acp[prev_t] if prev_t >= 0 else final)
        if schedule.prediction_type == "v_prediction":
            out = math.sqrt(a_t) * out + math.sqrt(1 - a_t) * sample
        denom = a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p)
        return math.sqrt(a_p / a_t) * sample - ((a_p - a_t) / denom) * out

    ets: list[Lin] = []
    cur_sample: Lin | None = None
    rows = []
    for i in range(start, len(ts)):
        counter = i - start  # PNDMScheduler.counter
        x, out = Lin.var("x", i), Lin.var("out", i)
        t = int(ts[i])
        prev_t = t - T // n
        if counter != 1:
            ets = ets[-3:] + [out]
        else:
            prev_t, t = t, t + T // n
        if len(ets) == 1 and counter == 0:
            model_out, cur_sample = out, x
        elif len(ets) == 1 and counter == 1:
            model_out, x = (out + ets[-1]) / 2, cur_sample
        elif len(ets) == 2:
            model_out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_out = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        rows.append(_row(prev_sample(x, t, prev_t, model_out), i, 1.0))
    return _plan("plms", ts, rows, 1.0, [_vp_level(acp[t]) for t in ts], start)


def _euler_grid(schedule: NoiseSchedule, n: int, karras: bool,
                round_karras: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """k-diffusion's σ grid of diffusers' σ schedulers: (n,) timesteps, (n + 1,) σ ending in 0, init σ."""
    spacing = schedule.spacing("linspace")
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
        ts = _discrete_timesteps(schedule, n, spacing).astype(np.float32).astype(np.float64)
    sigmas = _sigma_grid(schedule, ts)
    if karras:
        log_sigmas = np.log(schedule.sigmas().astype(np.float32)).astype(np.float64)  # fp32 log, as diffusers
        sigmas = karras_sigmas(n, sigmas[-2], sigmas[0])
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        ts = ts.round() if round_karras else ts
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    sigma_max = float(sigmas.max())
    init = sigma_max if spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    return ts.astype(np.float32).astype(np.float64), sigmas, init


def _k_denoised(x: Lin, out: Lin, sigma: float, prediction_type: str) -> Lin:
    """x0 in k-diffusion's σ-space, where the U-Net sees x / sqrt(σ² + 1)."""
    if prediction_type == "v_prediction":
        return out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return x - sigma * out


def _k_slope(x: Lin, out: Lin, sigma: float, prediction_type: str) -> Lin:
    """dx/dσ of the probability-flow ODE at (x, σ): (x - x0) / σ (Karras et al. 2022, eq. 3)."""
    return (x - _k_denoised(x, out, sigma, prediction_type)) / sigma


def euler(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False) -> SamplerPlan:
    """Karras et al. 2022, Algorithm 2 without churn (diffusers EulerDiscreteScheduler)."""
    ts, sigmas, init = _euler_grid(schedule, n, karras)
    rows = []
    for i in range(start, n):
        x, out = Lin.var("x", i), Lin.var("out", i)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = _k_slope(x, out, sigma, schedule.prediction_type)
        rows.append(_row(x + derivative * (sigma_next - sigma), i, 1 / math.sqrt(sigma**2 + 1)))
    return _plan("euler_karras" if karras else "euler", ts, rows, init, [_sigma_level(s) for s in sigmas], start)


def euler_ancestral(schedule: NoiseSchedule, n: int, start: int = 0) -> SamplerPlan:
    """Euler with ancestral noise (k-diffusion sample_euler_ancestral, η = 1)."""
    ts, sigmas, init = _euler_grid(schedule, n, karras=False)
    rows = []
    for i in range(start, n):
        x, out, noise = Lin.var("x", i), Lin.var("out", i), Lin.var("noise", i)
        s_from, s_to = sigmas[i], sigmas[i + 1]
        s_up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_down = math.sqrt(s_to**2 - s_up**2)
        derivative = _k_slope(x, out, s_from, schedule.prediction_type)
        rows.append(_row(x + derivative * (s_down - s_from) + s_up * noise, i, 1 / math.sqrt(s_from**2 + 1)))
    return _plan("euler_a", ts, rows, init, [_sigma_level(s) for s in sigmas], start)


def _lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial of σ_{i-j} over σ_i..σ_{i-order+1}: exact
    (diffusers integrates the same polynomial numerically, scipy's quad)."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def lms(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False, max_order: int = 4) -> SamplerPlan:
    """Linear multistep on the probability-flow ODE in σ, order 4 (Karras et al. 2022 §3; diffusers
    LMSDiscreteScheduler): x_next = x + Σ_j c_j d_{i-j}, the c_j integrals of Lagrange polynomials."""
    ts, sigmas, init = _euler_grid(schedule, n, karras)
    rows, derivatives = [], []  # newest last
    for i in range(start, n):
        x, out = Lin.var("x", i), Lin.var("out", i)
        derivatives = (derivatives + [_k_slope(x, out, sigmas[i], schedule.prediction_type)])[-max_order:]
        # diffusers' order counts grid steps, not the steps run: image-to-image's first step takes the order-4
        # coefficient of its one derivative (the others are zipped away), as there
        order = min(i + 1, max_order)
        x_next = x
        for j, d in zip(range(order), reversed(derivatives)):
            x_next = x_next + _lms_coefficient(sigmas, i, order, j) * d
        rows.append(_row(x_next, i, 1 / math.sqrt(sigmas[i] ** 2 + 1)))
    return _plan("lms_karras" if karras else "lms", ts, rows, init, [_sigma_level(s) for s in sigmas], start)


# --- two model calls a step: the plan's calls interleave a first-order move and its correction ----------------
# k-diffusion's second-order samplers evaluate the model twice per step but the last: n steps are 2n - 1 calls,
# each one engine call with its own row (diffusers' interleaved timesteps). Image-to-image skips 2 × start calls.

def _interleaved(values: np.ndarray) -> np.ndarray:
    """[v0, v1, v1, v2, v2, ...]: diffusers' layout of a per-step table over the 2n - 1 calls."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2)])


def _two_call_levels(sigmas: np.ndarray) -> list[tuple[float, float]]:
    """add_noise's level at each call of diffusers' Heun-layout σ table [σ0, σ1, σ1, ..., σ_{n-1}, σ_{n-1}, 0]."""
    return [_sigma_level(s) for s in list(_interleaved(sigmas[:-1])) + [0.0]]


def heun(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False) -> SamplerPlan:
    """Karras et al. 2022, Algorithm 1 without churn (diffusers HeunDiscreteScheduler): an Euler move to σ_{j+1},
    then the trapezoid of both slopes from x_j."""
    ts, sigmas, init = _euler_grid(schedule, n, karras)
    pt = schedule.prediction_type
    rows = []
    for k in range(2 * start, 2 * n - 1):
        x, out = Lin.var("x", k), Lin.var("out", k)
        j = k // 2
        if k % 2 == 0:  # to σ_{j+1} (the last step: to 0, done)
            sigma = sigmas[j]
            x_next = x + _k_slope(x, out, sigma, pt) * (sigmas[j + 1] - sigma)
        else:  # from x_j with the mean slope
            sigma, x_j, out_j = sigmas[j + 1], Lin.var("x", k - 1), Lin.var("out", k - 1)
            x_next = x_j + (_k_slope(x_j, out_j, sigmas[j], pt) + _k_slope(x, out, sigma, pt)) / 2 * (sigma - sigmas[j])
        rows.append(_row(x_next, k, 1 / math.sqrt(sigma**2 + 1)))
    return _plan("heun", _interleaved(ts), rows, init, _two_call_levels(sigmas), 2 * start)


def _log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp((log a + log b) / 2) in fp32, as diffusers' lerp of log σ; 0 where either is 0."""
    with np.errstate(divide="ignore"):
        mid = np.exp((np.log(a.astype(np.float32)) + np.log(b.astype(np.float32))) / 2).astype(np.float32)
    return mid.astype(np.float64)


def _call_timesteps(ts: np.ndarray, mids: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """The 2n - 1 calls' timesteps: the grid's, and between them the t of each step's midpoint σ (but the last's)."""
    log_sigmas = np.log(schedule.sigmas().astype(np.float32)).astype(np.float64)
    call_ts = np.empty(2 * len(ts) - 1)
    call_ts[0::2], call_ts[1::2] = ts, [_sigma_to_t(s, log_sigmas) for s in mids[:-1]]
    return call_ts


def dpm2(schedule: NoiseSchedule, n: int, start: int = 0, ancestral: bool = False,
         karras: bool = False) -> SamplerPlan:
    """Karras et al. 2022, the DPM-Solver-2 step (diffusers KDPM2DiscreteScheduler): an Euler move to the
    log-midpoint σ_mid, the slope there carries x_j to σ_{j+1}. ancestral (KDPM2AncestralDiscreteScheduler):
    to σ_down, then σ_up of fresh noise (η = 1)."""
    ts, sigmas, init = _euler_grid(schedule, n, karras, round_karras=True)
    pt = schedule.prediction_type
    target = sigmas[1:]  # where step j lands: σ_{j+1}, or σ_down_j
    up = np.zeros(n)
    if ancestral:  # in fp32 as diffusers: σ_down = sqrt(σ_next² - σ_up²) cancels, and its midpoint is σ_{j+1}
        s, s_next = sigmas[:-1].astype(np.float32), sigmas[1:].astype(np.float32)
        up32 = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down32 = (s_next**2 - up32**2) ** 0.5
        # at a capped cosine's σ ~ 1e4 it cancels to 0 (diffusers' midpoint is NaN there): the closed form σ_next²/σ
        down32 = np.where((down32 == 0) & (s_next > 0), s_next**2 / s, down32)
        up, target = up32.astype(np.float64), down32.astype(np.float64)
    mids = _log_midpoint(sigmas[:-1], target)  # 0 at the last step: its first call lands on x0
    rows = []
    for k in range(2 * start, 2 * n - 1):
        x, out, noise = Lin.var("x", k), Lin.var("out", k), Lin.var("noise", k)
        j = k // 2
        if k % 2 == 0:
            sigma = sigmas[j]
            x_next = x + _k_slope(x, out, sigma, pt) * (mids[j] - sigma)
        else:
            sigma, x_j = mids[j], Lin.var("x", k - 1)
            x_next = x_j + _k_slope(x, out, sigma, pt) * (target[j] - sigmas[j]) + up[j] * noise
        rows.append(_row(x_next, k, 1 / math.sqrt(sigma**2 + 1)))
    levels = [_sigma_level(s) for s in _interleaved(sigmas)]  # diffusers' add_noise reads σ_{j+1} at a midpoint
    return _plan("dpm2_a" if ancestral else "dpm2", _call_timesteps(ts, mids, schedule), rows, init, levels, 2 * start)


def dpmpp_sde(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False) -> SamplerPlan:
    """Lu et al. 2022, DPM-Solver++ (2S) with ancestral noise, r = 1/2 (k-diffusion sample_dpmpp_sde; diffusers
    DPMSolverSDEScheduler): to the log-midpoint σ_mid, then from x_j with the data prediction there. Both calls
    add noise over Brownian increments that overlap ([σ_mid, σ_j] within [σ_{j+1}, σ_j]): noise_mix correlates
    them as the Brownian tree does."""
    ts, sigmas, init = _euler_grid(schedule, n, karras)
    pt = schedule.prediction_type
    mids = _log_midpoint(sigmas[:-1], sigmas[1:])
    calls = 2 * n - 1
    mix = np.eye(calls)
    rows = []

    def ancestral(x: Lin, x0: Lin, s_from: float, s_to: float, noise: Lin) -> Lin:
        s_up = min(s_to, math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
        s_down = math.sqrt(s_to**2 - s_up**2)
        return (s_down / s_from) * x - (s_down / s_from - 1) * x0 + s_up * noise

    for k in range(2 * start, calls):
        x, out, noise = Lin.var("x", k), Lin.var("out", k), Lin.var("noise", k)
        j = k // 2
        if k == calls - 1:  # to σ = 0: an Euler move lands on x0
            sigma = sigmas[j]
            x_next = _k_denoised(x, out, sigma, pt)
        elif k % 2 == 0:
            sigma = sigmas[j]
            x_next = ancestral(x, _k_denoised(x, out, sigma, pt), sigma, mids[j], noise)
        else:
            sigma = mids[j]
            x_next = ancestral(Lin.var("x", k - 1), _k_denoised(x, out, sigma, pt), sigmas[j], sigmas[j + 1], noise)
            span = sigmas[j] - sigmas[j + 1]
            mix[k, k - 1] = math.sqrt((sigmas[j] - mids[j]) / span)
            mix[k, k] = math.sqrt((mids[j] - sigmas[j + 1]) / span)
        rows.append(_row(x_next, k, 1 / math.sqrt(sigma**2 + 1)))
    name = "dpmpp_sde_karras" if karras else "dpmpp_sde"
    return _plan(name, _call_timesteps(ts, mids, schedule), rows, init, _two_call_levels(sigmas),
                 2 * start, mix)


def _dpm_grid(schedule: NoiseSchedule, n: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver's grid (diffusers DPMSolverMultistepScheduler and UniPCMultistepScheduler): (n,) integer
    timesteps and (n + 1,) σ ending in 0."""
    T = schedule.num_train_timesteps
    spacing = schedule.spacing("linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    else:
        ts = _discrete_timesteps(schedule, n, spacing)
    if not karras:
        return ts, _sigma_grid(schedule, ts.astype(np.float64))
    all_sigmas = schedule.sigmas()
    log_sigmas = np.log(all_sigmas.astype(np.float32)).astype(np.float64)  # fp32 log, as diffusers
    sigmas = karras_sigmas(n, all_sigmas[0], all_sigmas[-1])
    ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).round()
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)


def _half_log_snr(sigma: float) -> float:
    """λ = log α_t - log σ_t of a k-diffusion σ (∞ at σ = 0)."""
    alpha, s = _dpm_level(sigma)
    return math.inf if s == 0 else math.log(alpha) - math.log(s)


def _dpm_x0(x: Lin, out: Lin, sigma: float, prediction_type: str) -> Lin:
    """The data prediction DPM-Solver++ and UniPC convert the model output to, in VP variables."""
    return _vp_x0_eps(x, out, *_dpm_level(sigma), prediction_type)[0]


def dpmpp_2m(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False, sde: bool = False) -> SamplerPlan:
    """Lu et al. 2022, DPM-Solver++(2M), midpoint, lower order at the end (diffusers DPMSolverMultistepScheduler,
    algorithm_type dpmsolver++, solver_order 2); sde: its stochastic form (algorithm_type sde-dpmsolver++)."""
    ts, sigmas = _dpm_grid(schedule, n, karras)
    rows, x0_prev = [], None
    for i in range(start, n):
        x, noise = Lin.var("x", i), Lin.var("noise", i)
        x0 = _dpm_x0(x, Lin.var("out", i), sigmas[i], schedule.prediction_type)
        alpha_t, sigma_t = _dpm_level(sigmas[i + 1])
        sigma_s = _dpm_level(sigmas[i])[1]
        if sigmas[i + 1] == 0:  # λ = ∞: the update lands on x0
            x_next = x0
        else:
            h = _half_log_snr(sigmas[i + 1]) - _half_log_snr(sigmas[i])
            # ODE: x_t = σ_t/σ_s x + α_t(1 - e^-h) D
            # SDE: x_t = σ_t/σ_s e^-h x + α_t(1 - e^-2h) D + σ_t sqrt(1 - e^-2h) z
            phi = -alpha_t * (-math.expm1(-2 * h) if sde else -math.expm1(-h))
            x_next = (sigma_t / sigma_s * (math.exp(-h) if sde else 1.0)) * x - phi * x0
            if x0_prev is not None and i != n - 1:
                r0 = (_half_log_snr(sigmas[i]) - _half_log_snr(sigmas[i - 1])) / h
                x_next = x_next - 0.5 * phi * ((x0 - x0_prev) / r0)
            if sde:
                x_next = x_next + (sigma_t * math.sqrt(-math.expm1(-2 * h))) * noise
        rows.append(_row(x_next, i, 1.0))
        x0_prev = x0
    name = "dpmpp_2m" + ("_sde" if sde else "") + ("_karras" if karras else "")
    return _plan(name, ts, rows, 1.0, [_dpm_level(s) for s in sigmas], start)


def _unipc_coefficients(h: float, rks: list[float], corrector: bool) -> list[float]:
    """Zhao et al. 2023, UniPC's ρ for the B(h) = e^h - 1 variant (bh2), data prediction: diffusers'
    multistep_uni_p/c_bh_update. rks: the ratios r_k of the earlier steps' λ gaps to h, then 1."""
    hh = -h
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1
    rows, b = [], []
    for k in range(1, len(rks) + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / math.expm1(hh))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        return [0.5] if len(rks) == 1 else list(np.linalg.solve(np.array(rows), np.array(b)))
    return [0.5] if len(rks) == 2 else []  # the predictor: order 2 -> ρ = 1/2, order 1 -> none


def _unipc_update(x: Lin, sigma_s: float, sigma_t: float, m0: Lin, earlier: list[tuple[Lin, float]],
                  model_t: Lin | None) -> Lin:
    """UniPC's x_t from x at σ_s: m0, the data prediction at σ_s; earlier: (prediction, σ) of the steps
    before; model_t: the prediction at σ_t (the corrector) or None (the predictor)."""
    alpha_t, s_t = _dpm_level(sigma_t)
    lam_s = _half_log_snr(sigma_s)
    h = _half_log_snr(sigma_t) - lam_s
    if math.isinf(h):  # σ_t = 0: λ = ∞, the update lands on m0 (the last step is first order)
        return m0
    rks = [(_half_log_snr(s) - lam_s) / h for _, s in earlier] + [1.0]
    d1s = [(m - m0) / r for (m, _), r in zip(earlier, rks)]
    rhos = _unipc_coefficients(h, rks, corrector=model_t is not None)
    b_h = math.expm1(-h)
    x_t = (s_t / _dpm_level(sigma_s)[1]) * x - (alpha_t * math.expm1(-h)) * m0
    residual = Lin({})
    for rho, d1 in zip(rhos, d1s):
        residual = residual + rho * d1
    if model_t is not None:
        residual = residual + rhos[-1] * (model_t - m0)
    return x_t - (alpha_t * b_h) * residual


def unipc(schedule: NoiseSchedule, n: int, start: int = 0, karras: bool = False) -> SamplerPlan:
    """Zhao et al. 2023, UniPC: bh2, order 2, the corrector on every step but the first, lower order at the end
    (diffusers UniPCMultistepScheduler's defaults). The corrector refines the previous step's sample with this
    step's model output; the model saw the uncorrected one, which the graph holds. So the corrected sample of
    step i - 1 is rewritten in terms of x_i (the predictor's output): it stays within the graph's history."""
    ts, sigmas = _dpm_grid(schedule, n, karras)
    rows: list[np.ndarray] = []
    outputs: list[Lin] = []  # data predictions, newest last
    last_sample: Lin | None = None
    order = 0
    for i in range(start, n):
        x = Lin.var("x", i)
        m = _dpm_x0(x, Lin.var("out", i), sigmas[i], schedule.prediction_type)
        sample = x
        if last_sample is not None:  # order: the previous step's
            earlier = [(outputs[-2], sigmas[i - 2])] if order == 2 else []
            sample = _unipc_update(last_sample, sigmas[i - 1], sigmas[i], outputs[-1], earlier, m)
        outputs = (outputs + [m])[-2:]
        order = min(2, n - i, len(outputs))  # lower_order_final; a warm-up of one step
        earlier = [(outputs[-2], sigmas[i - 1])] if order == 2 else []
        x_next = _unipc_update(sample, sigmas[i], sigmas[i + 1], m, earlier, None)
        rows.append(_row(x_next, i, 1.0))
        if sigmas[i + 1] != 0:  # the corrected sample, from x_next = c * sample + rest
            c = _dpm_level(sigmas[i + 1])[1] / _dpm_level(sigmas[i])[1]
            last_sample = (Lin.var("x", i + 1) - (x_next - c * sample)) / c
    return _plan("unipc_karras" if karras else "unipc", ts, rows, 1.0, [_dpm_level(s) for s in sigmas], start)


def lcm(schedule: NoiseSchedule, n: int, start: int = 0, original_steps: int = 50,
        timestep_scaling: float = 10.0) -> SamplerPlan:
    """Luo et al. 2023, latent consistency multistep sampling (diffusers LCMScheduler)."""
    T = schedule.num_train_timesteps
    if not 1 <= n <= original_steps:
        raise InputError(f"LCM takes 1 to {original_steps} steps, got {n}: lower --steps")
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    acp = schedule.alphas_cumprod()
    final = schedule.final_alpha(default_to_one=True)
    rows = []
    for i in range(start, n):
        t = ts[i]
        x, out, noise = Lin.var("x", i), Lin.var("out", i), Lin.var("noise", i)
        prev_t = ts[i + 1] if i + 1 < n else t
        a_prev = acp[prev_t] if prev_t >= 0 else final
        scaled = t * timestep_scaling
        c_skip = 0.25 / (scaled**2 + 0.25)  # σ_data = 0.5
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        x0, _ = _vp_predict(x, out, acp[t], schedule.prediction_type)
        denoised = c_out * x0 + c_skip * x
        x_next = denoised if i == n - 1 else math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * noise
        rows.append(_row(x_next, i, 1.0))
    return _plan("lcm", ts, rows, 1.0, [_vp_level(acp[t]) for t in ts], start)


def _flow_sigmas(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """The shifted σ grid of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps, f32, with a final 0.
    Its ends are the training table's σ (already shifted once), shifted again as diffusers does."""
    T = schedule.num_train_timesteps

    def shifted(sigma: np.ndarray) -> np.ndarray:
        return schedule.shift * sigma / (1 + (schedule.shift - 1) * sigma)

    table = shifted(np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / np.float32(T)).astype(np.float32)
    sigmas = shifted(np.linspace(float(table[0]) * T, float(table[-1]) * T, n) / T).astype(np.float32)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)


def flow_euler(schedule: NoiseSchedule, n: int, start: int = 0) -> SamplerPlan:
    """Euler on the rectified-flow ODE dx/dσ = v (Esser et al. 2024; diffusers FlowMatchEulerDiscreteScheduler):
    x_next = x + (σ_next - σ)·v. The transformer sees x itself, at timestep σ·T."""
    sigmas = _flow_sigmas(schedule, n)
    ts = (sigmas[:-1].astype(np.float32) * np.float32(schedule.num_train_timesteps)).astype(np.float64)
    rows = []
    for i in range(start, n):
        x, out = Lin.var("x", i), Lin.var("out", i)
        step = float(np.float32(sigmas[i + 1]) - np.float32(sigmas[i]))  # dt in f32, as diffusers
        rows.append(_row(x + out * step, i, 1.0))
    return _plan("euler", ts, rows, 1.0, [(1.0 - s, s) for s in sigmas], start)


# name -> (schedule, steps, first step) -> plan
FLOW_SAMPLERS: dict[str, Callable[[NoiseSchedule, int, int], SamplerPlan]] = {"euler": flow_euler}
SAMPLERS: dict[str, Callable[[NoiseSchedule, int, int], SamplerPlan]] = {
    "ddim": ddim,
    "euler": lambda s, n, start: euler(s, n, start, karras=s.use_karras_sigmas),
    "euler_karras": lambda s, n, start: euler(s, n, start, karras=True),
    "euler_a": euler_ancestral,
    "dpmpp_2m": lambda s, n, start: dpmpp_2m(s, n, start, karras=s.use_karras_sigmas),
    "dpmpp_2m_karras": lambda s, n, start: dpmpp_2m(s, n, start, karras=True),
    "lcm": lcm,
    "plms": plms,
    "unipc": lambda s, n, start: unipc(s, n, start, karras=s.use_karras_sigmas),
    "heun": lambda s, n, start: heun(s, n, start, karras=s.use_karras_sigmas),
    "lms": lambda s, n, start: lms(s, n, start, karras=s.use_karras_sigmas),
    "lms_karras": lambda s, n, start: lms(s, n, start, karras=True),
    "dpm2": lambda s, n, start: dpm2(s, n, start, karras=s.use_karras_sigmas),
    "dpm2_a": lambda s, n, start: dpm2(s, n, start, ancestral=True, karras=s.use_karras_sigmas),
    "dpmpp_sde": lambda s, n, start: dpmpp_sde(s, n, start, karras=s.use_karras_sigmas),
    "dpmpp_sde_karras": lambda s, n, start: dpmpp_sde(s, n, start, karras=True),
    "dpmpp_2m_sde": lambda s, n, start: dpmpp_2m(s, n, start, karras=s.use_karras_sigmas, sde=True),
    "dpmpp_2m_sde_karras": lambda s, n, start: dpmpp_2m(s, n, start, karras=True, sde=True),
}
# The samplers that call the model twice a step (all steps but the last): n steps are 2n - 1 engine calls.
TWO_CALLS_A_STEP = ("heun", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_sde_karras")

# sdrt sampler -> (AUTOMATIC1111's sampler label, its schedule type), as A1111 >= 1.9 names them
A1111_SAMPLERS: dict[str, tuple[str, str]] = {
    "ddim": ("DDIM", "Automatic"),
    "euler": ("Euler", "Automatic"),
    "euler_karras": ("Euler", "Karras"),
    "euler_a": ("Euler a", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Automatic"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "lcm": ("LCM", "Automatic"),
    "plms": ("PLMS", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
    "heun": ("Heun", "Automatic"),
    "lms": ("LMS", "Automatic"),
    "lms_karras": ("LMS", "Karras"),
    "dpm2": ("DPM2", "Automatic"),
    "dpm2_a": ("DPM2 a", "Automatic"),
    "dpmpp_sde": ("DPM++ SDE", "Automatic"),
    "dpmpp_sde_karras": ("DPM++ SDE", "Karras"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "Automatic"),
    "dpmpp_2m_sde_karras": ("DPM++ 2M SDE", "Karras"),
}
A1111_SCHEDULE_TYPES = ("Automatic", "Karras")


def a1111_labels(schedule: NoiseSchedule | None = None) -> dict[str, list[str]]:
    """A1111 sampler label -> the sdrt samplers under it (one per schedule type), in table order; with
    a schedule, only those the model can run (check_sampler)."""
    labels: dict[str, list[str]] = {}
    for name, (label, _) in A1111_SAMPLERS.items():
        if schedule is None or _runs(name, schedule):
            labels.setdefault(label, []).append(name)
    return labels


def _runs(name: str, schedule: NoiseSchedule) -> bool:
    try:
        check_sampler(name, 1, schedule)
    except InputError:
        return False
    return True


def from_a1111(sampler: str, schedule_type: str | None) -> str | None:
    """The sdrt sampler for an A1111 label (case-insensitive; the pre-1.9 combined labels such as
    "DPM++ 2M Karras" too) and schedule type (None or "Automatic": the label's own), else None."""
    label, kind = sampler.strip().lower(), (schedule_type or "automatic").strip().lower()
    for name, (a1111_label, a1111_kind) in A1111_SAMPLERS.items():
        combined = f"{a1111_label} {a1111_kind}".lower()
        if label == combined and kind in ("automatic", a1111_kind.lower()):
            return name
        if label == a1111_label.lower() and kind == a1111_kind.lower():
            return name
    return None


# Samplers whose diffusers scheduler has no zero-terminal-SNR rescaling (their classes ignore the key).
WITHOUT_ZERO_SNR = ("plms", "heun", "lms", "lms_karras", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_sde_karras")


def samplers_of(schedule: NoiseSchedule | None) -> dict[str, Callable[[NoiseSchedule, int, int], SamplerPlan]]:
    """The samplers a model's schedule can run: flow models only their own."""
    return FLOW_SAMPLERS if schedule is not None and schedule.flow else SAMPLERS


def check_sampler(name: str, steps: int, schedule: NoiseSchedule | None = None) -> None:
    usable = samplers_of(schedule)
    if name not in usable:
        if name in SAMPLERS:
            raise InputError(f"scheduler {name!r} is for noise-prediction models; this flow-matching model (SD3) "
                             f"samples with {', '.join(usable)}")
        raise InputError(f"unknown scheduler {name!r}: choose one of {', '.join(usable)}")
    if not is_integer(steps) or steps < 1:
        raise InputError(f"steps must be an integer ≥ 1, got {steps!r}")
    if schedule is not None:
        _check_sampler_settings(name, schedule)
    if schedule is not None and schedule.rescale_betas_zero_snr and name in WITHOUT_ZERO_SNR:
        usable = ", ".join(n for n in SAMPLERS if n not in WITHOUT_ZERO_SNR)
        raise InputError(f"{name} cannot sample a zero-terminal-SNR model (rescale_betas_zero_snr): use {usable}")


def _check_sampler_settings(name: str, schedule: NoiseSchedule) -> None:
    """Refuses a sampler whose diffusers class would read a setting (given, or its default) sdrt does not run."""
    cls, table = SAMPLER_SETTINGS.get(name, ("", {}))
    given = dict(schedule.sampler_settings)
    for key, (default, runs) in table.items():
        value = given.get(key, default)
        if value != runs:
            asks = (f"sets {key}={value!r}" if key in given else
                    f"has no {key!r} key, so diffusers' {cls} takes its default {key}={default!r}")
            raise InputError(f"sampler {name}: the model's scheduler_config.json {asks}, which sdrt does not "
                             f"implement; set \"{key}\": {json.dumps(runs)} in the model's "
                             "scheduler/scheduler_config.json and re-export it, or choose another sampler")


def make_plan(name: str, schedule: NoiseSchedule, steps: int, strength: float = 1.0) -> SamplerPlan:
    """The plan of `steps` steps; strength < 1 (image-to-image) runs its last steps (strength_start)."""
    check_sampler(name, steps, schedule)
    start = strength_start(int(steps), strength, schedule.flow)
    return samplers_of(schedule)[name](schedule, int(steps), start)
