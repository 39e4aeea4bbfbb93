"""Each sampler against the diffusers scheduler of the same name, step by step.

Both sides see the same fp32 model outputs and noise; ours applies its fp64 scalars to the
fp32 tensors exactly as the graph does. Tolerance: relative error ≤ 1e-5 (norm-wise), per step
(2e-4 from σ = 4096 on, zero terminal SNR).
"""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.export.reference import DIFFUSERS_SCHEDULERS, diffusers_scheduler  # noqa: E402
from sdrt.export.architectures import SD15_SCHEDULER_CONFIG  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.export.architectures import SD3_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG  # noqa: E402
from sdrt.schedulers import (SAMPLER_SETTINGS, A, B, C_IN, D, HISTORY, HO, HX, KA, KN, UNSUPPORTED_SETTINGS,  # noqa: E402
                             TWO_CALLS_A_STEP, WITHOUT_ZERO_SNR, NoiseSchedule, make_plan)

REL_TOL = 1e-5
# Zero terminal SNR starts at σ = 4096 (ᾱ = 2^-24): diffusers' own fp32 arithmetic there cancels to ~1e-4
# (its add_noise, the known region, to ~3e-4).
REL_TOL_OF = {"v_zero_snr": 2e-4}
KNOWN_TOL_OF = {"v_zero_snr": 5e-4}
# diffusers' results that are not a reference: its fp32 σ -> t rounds the capped cosine end to 998, not 999,
# and its Euler a overflows to NaN on it (ours stays finite)
NOT_A_REFERENCE = {("dpmpp_2m_karras", "cosine"), ("euler_a", "cosine"), ("dpmpp_2m_sde_karras", "cosine"),
                   ("dpmpp_sde_karras", "cosine"), ("dpm2_a", "cosine")}  # the last: NaN σ_mid there
# diffusers' fp32 tensors cancel on the capped cosine's σ ~ 1e4 (Heun's trapezoid, 1.5e-4): its arithmetic in
# float64 (the same fp32 tables) is the reference there
IN_FLOAT64 = {("heun", "cosine")}

V_TRAILING = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
CONFIGS = {
    "sd15": SD15_SCHEDULER_CONFIG,
    "v_trailing": V_TRAILING,
    "v_zero_snr": {**V_TRAILING, "rescale_betas_zero_snr": True},  # Lin et al. 2023 fine-tunes
    "sdxl": SDXL_SCHEDULER_CONFIG,  # Euler, leading spacing, steps_offset 1
    "karras_in_config": {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True},
    "cosine": {**SD15_SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {**SD15_SCHEDULER_CONFIG, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
}


def apply_row(row, x, out, x_hist, out_hist, noise):
    k = HISTORY
    nxt = row[A] * x + row[B] * out + row[D] * noise
    for j in range(k):
        nxt = nxt + row[HX + j] * x_hist[j] + row[HO + j] * out_hist[j]
    return nxt.astype(np.float32)


def rel_err(a, b):
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), "NaN/inf in scheduler output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_sampler_matches_diffusers(name, steps, config):
    check_against_diffusers(name, config, steps, strength=1.0)


@pytest.mark.parametrize("config", ["sd15", "v_trailing", "sdxl", "karras_in_config"])
@pytest.mark.parametrize("steps,strength", [(4, 0.5), (20, 0.3), (20, 0.8), (7, 0.99)])
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_img2img_start_and_known_levels_match_diffusers(name, steps, strength, config):
    """get_timesteps' first step, add_noise there (the start) and at every next step (the inpainting
    mask's known region), and the steps from there on with the scheduler's state fresh."""
    check_against_diffusers(name, config, steps, strength)


def check_against_diffusers(name, config, steps, strength):
    cfg = CONFIGS[config]
    if name == "lcm" and cfg.get("prediction_type") == "v_prediction":
        pytest.skip("LCM is trained for epsilon only")
    if (name, config) in NOT_A_REFERENCE:
        pytest.skip("diffusers' fp32 result is not a reference here (see NOT_A_REFERENCE)")
    if name in WITHOUT_ZERO_SNR and cfg.get("rescale_betas_zero_snr"):
        with pytest.raises(InputError, match="zero-terminal-SNR"):
            make_plan(name, NoiseSchedule.from_config(cfg), steps)
        return
    ref = diffusers_scheduler(name, cfg)
    ref.set_timesteps(steps)
    plan = make_plan(name, NoiseSchedule.from_config(cfg), steps, strength)
    timesteps = ref.timesteps
    if strength < 1:  # the img2img pipelines' get_timesteps
        t_start = max(steps - min(int(steps * strength), steps), 0) * ref.order
        timesteps = ref.timesteps[t_start:]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start)

    assert len(plan) == len(timesteps)
    # Karras timesteps are interpolated in fp32 log σ, where numpy's and torch's fp32 cumprod of ᾱ differ
    # in the last bits: 5e-5 relative at t ≈ 4 for Euler on trained betas (the steps' results hold 1e-5)
    np.testing.assert_allclose(plan.timesteps, timesteps.double().numpy(), rtol=1e-4, atol=1e-4)
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(0)
    shape = (1, 4, 8, 8)
    image, image_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))

    def noised(level):
        return (level[0] * image + level[1] * image_noise).astype(np.float32)

    if strength < 1:
        x = ref.add_noise(torch.from_numpy(image), torch.from_numpy(image_noise), timesteps[:1]).numpy()
        assert rel_err(noised(plan.start_level), x) <= REL_TOL, "img2img start latents"
    else:
        x = (rng.standard_normal(shape) * plan.init_noise_sigma).astype(np.float32)
    dtype = torch.float64 if (name, config) in IN_FLOAT64 else torch.float32
    ref_x = torch.from_numpy(x.copy()).to(dtype)
    x_hist = [np.zeros(shape, np.float32)] * HISTORY
    out_hist = [np.zeros(shape, np.float32)] * HISTORY
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    # the independent draws the calls' noise mixes (seeded per call as diffusers' generator is), then the mix
    draws = np.stack([torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i)).numpy()
                      for i in range(len(timesteps))])
    noises = plan.mix_noise(draws)
    if hasattr(ref, "noise_sampler"):  # DPMSolverSDEScheduler's Brownian tree: handed the same noise
        ref.noise_sampler = lambda sigma, sigma_next: torch.from_numpy(noises[call])
    for call, t in enumerate(timesteps):
        i = call
        c_in_ref = float((ref.scale_model_input(ref_x, t) / ref_x).flatten()[0])
        assert plan.coeffs[i, C_IN] == pytest.approx(c_in_ref, rel=1e-6)
        out = rng.standard_normal(shape).astype(np.float32)
        kwargs = {"generator": torch.Generator().manual_seed(1000 + i)} if takes_generator else {}
        ref_x = ref.step(torch.from_numpy(out).to(dtype), t, ref_x, **kwargs).prev_sample
        ours = apply_row(plan.coeffs[i], x, out, x_hist, out_hist, noises[i])
        err = rel_err(ours, ref_x.numpy().astype(np.float32))
        assert err <= REL_TOL_OF.get(config, REL_TOL), f"{name} step {i}: rel err {err:.2e}"
        # legacy inpainting re-noises the known region to the next step's level (diffusers' add_noise)
        known = plan.coeffs[i, [KA, KN]]
        if i + 1 < len(timesteps):
            ref_known = ref.add_noise(torch.from_numpy(image), torch.from_numpy(image_noise), timesteps[i + 1 : i + 2])
            err = rel_err(noised(known), ref_known.numpy())
            assert err <= KNOWN_TOL_OF.get(config, REL_TOL), f"{name} known region after step {i}: rel err {err:.2e}"
        else:
            assert tuple(known) == (1.0, 0.0), "the known region is the clean image after the last step"
        x_hist = [x] + x_hist[:-1]
        out_hist = [out] + out_hist[:-1]
        x = ref_x.numpy().astype(np.float32)  # follow the reference trajectory


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_bad_strength_is_refused(strength):
    with pytest.raises(InputError, match="strength must be a number in"):
        make_plan("euler", NoiseSchedule(), 10, strength)


def test_strength_that_runs_no_step_is_refused():
    with pytest.raises(InputError, match="runs no step"):
        make_plan("euler", NoiseSchedule(), 4, 0.2)
    assert len(make_plan("euler", NoiseSchedule(), 4, 0.25)) == 1


def test_unknown_scheduler_and_bad_steps():
    from sdrt.errors import InputError

    schedule = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    with pytest.raises(InputError, match="choose one of"):
        make_plan("dpm_adaptive", schedule, 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="steps"):
            make_plan("euler", schedule, bad)


def test_zero_snr_changes_the_plan():
    """The setting that used to be ignored moves every sampler's scalars."""
    plain, zero = NoiseSchedule.from_config(V_TRAILING), NoiseSchedule.from_config(CONFIGS["v_zero_snr"])
    assert zero.alphas_cumprod()[-1] == 0.0 and plain.alphas_cumprod()[-1] > 0
    for name in ("ddim", "euler", "dpmpp_2m"):
        assert not np.allclose(make_plan(name, plain, 4).coeffs, make_plan(name, zero, 4).coeffs)


@pytest.mark.parametrize("key", UNSUPPORTED_SETTINGS)
def test_unimplemented_settings_are_refused_by_name(key):
    off_default = {"clip_sample": True, "thresholding": True, "interpolation_type": "log_linear",
                   "final_sigmas_type": "sigma_min", "use_exponential_sigmas": True, "use_beta_sigmas": True,
                   "use_lu_lambdas": True, "timestep_type": "continuous", "sigma_min": 0.1, "sigma_max": 10.0}
    NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, key: UNSUPPORTED_SETTINGS[key][0]})  # default: fine
    with pytest.raises(InputError, match=key):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, key: off_default[key]})


@pytest.mark.parametrize("key,value", [("timestep_spacing", "karras"), ("beta_schedule", "sigmoid"),
                                       ("prediction_type", "sample"), ("trained_betas", [0.01] * 10)])
def test_unknown_values_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, key: value})


# --- flow matching (SD3) --------------------------------------------------------------------------

FLOW_CONFIGS = {"sd35": SD3_SCHEDULER_CONFIG, "unshifted": {**SD3_SCHEDULER_CONFIG, "shift": 1.0}}


@pytest.mark.parametrize("config", FLOW_CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_euler_matches_diffusers_step_by_step_bit_for_bit(config, steps):
    """Timesteps and every step's x_next equal FlowMatchEulerDiscreteScheduler's exactly (f32)."""
    schedule = NoiseSchedule.from_config(FLOW_CONFIGS[config])
    plan = make_plan("euler", schedule, steps)
    ref = diffusers_scheduler("euler", FLOW_CONFIGS[config])
    assert type(ref).__name__ == "FlowMatchEulerDiscreteScheduler"
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps.astype(np.float32), ref.timesteps.numpy())
    assert plan.init_noise_sigma == 1.0 and np.all(plan.coeffs[:, C_IN] == 1.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    zeros = np.zeros((HISTORY,) + x.shape, np.float32)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
        got = apply_row(plan.coeffs[i].astype(np.float32), x, v, zeros, zeros, np.zeros_like(x))
        np.testing.assert_array_equal(got, want)
        x = want


@pytest.mark.parametrize("steps", [7, 10, 28])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.35, 0.6, 0.7, 0.75, 0.999, 1.0])
def test_flow_img2img_starts_where_diffusers_sd3_does(steps, strength):
    """StableDiffusion3Img2ImgPipeline.get_timesteps (float rounding, unlike SD 1.x's), the start level
    (1 - σ, σ) of scale_noise at that step, and every blend level after it."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    schedule = NoiseSchedule.from_config(FLOW_CONFIGS["sd35"])
    ref = diffusers_scheduler("euler", FLOW_CONFIGS["sd35"])
    ref.set_timesteps(steps)
    timesteps, runs = StableDiffusion3Img2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    plan = make_plan("euler", schedule, steps, strength)
    assert len(plan) == runs
    np.testing.assert_array_equal(plan.timesteps.astype(np.float32), timesteps.numpy())
    x0, noise = torch.ones(1), torch.zeros(1)  # scale_noise(x0, t, ε) = (1 - σ)·x0 + σ·ε
    level = (float(ref.scale_noise(x0, timesteps[:1], noise)), float(ref.scale_noise(noise, timesteps[:1], x0)))
    np.testing.assert_allclose(plan.start_level, level, rtol=1e-6)
    sigmas = ref.sigmas.numpy()[steps - runs + 1:]  # each step's next σ; 0 after the last
    np.testing.assert_allclose(plan.coeffs[:, [KA, KN]], np.stack([1 - sigmas, sigmas], 1), rtol=1e-6, atol=1e-7)


def test_flow_models_refuse_noise_prediction_samplers_and_unimplemented_settings():
    schedule = NoiseSchedule.from_config(SD3_SCHEDULER_CONFIG)
    assert schedule.flow and schedule.shift == 3.0
    with pytest.raises(InputError, match="samples with euler"):
        make_plan("dpmpp_2m_karras", schedule, 10)
    for key, value in (("use_dynamic_shifting", True), ("shift_terminal", 0.1), ("invert_sigmas", True),
                       ("stochastic_sampling", True), ("use_karras_sigmas", True)):
        with pytest.raises(InputError, match=key):
            NoiseSchedule.from_config({**SD3_SCHEDULER_CONFIG, key: value})
    with pytest.raises(InputError, match="shift"):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, "shift": 3.0})


# --- a key missing from the config takes the chosen sampler's diffusers class's default ----------

@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_sampler_settings_cover_every_unimplemented_default_of_diffusers(name):
    """For each sampler's diffusers class, every unimplemented setting's default is one sdrt runs, or it is
    listed in SAMPLER_SETTINGS with that very default (then refused where the config leaves the key out)."""
    cls_name, extra = DIFFUSERS_SCHEDULERS[name]
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    listed_cls, listed = SAMPLER_SETTINGS.get(name, (cls_name, {}))
    assert listed_cls == cls_name
    for key, (default, _) in listed.items():
        assert params[key].default == default, f"{cls_name}.{key}"
    for key, accepted in UNSUPPORTED_SETTINGS.items():
        if key in params and key not in extra and key not in listed:
            assert params[key].default in accepted, f"{cls_name}.{key}={params[key].default!r}"


def _without(config, *keys):
    return {k: v for k, v in config.items() if k not in keys}


@pytest.mark.parametrize("name, key", [("ddim", "clip_sample"), ("plms", "skip_prk_steps")])
def test_a_setting_left_to_the_class_default_sdrt_lacks_is_refused_naming_the_key(name, key):
    """A config saved from Euler: diffusers' DDIM clamps x0 (clip_sample=True), its PNDM runs Runge-Kutta
    warm-up steps (skip_prk_steps=False); sdrt refuses both samplers, runs the others, and runs them once
    the key says what sdrt implements."""
    saved = _without(SDXL_SCHEDULER_CONFIG, "clip_sample", "skip_prk_steps")
    default, runs = SAMPLER_SETTINGS[name][1][key]
    assert getattr(diffusers_scheduler(name, saved).config, key) == default  # what a user's scheduler does
    schedule = NoiseSchedule.from_config(saved)
    with pytest.raises(InputError, match=f"no '{key}' key.*{SAMPLER_SETTINGS[name][0]}.*\"{key}\": {str(runs).lower()}"):
        make_plan(name, schedule, 4)
    for other in set(DIFFUSERS_SCHEDULERS) - set(SAMPLER_SETTINGS):
        assert len(make_plan(other, schedule, 4)) == (7 if other in TWO_CALLS_A_STEP else 4)
    assert len(make_plan(name, NoiseSchedule.from_config({**saved, key: runs}), 4)) >= 4  # PLMS: 5 rows
    with pytest.raises(InputError, match=f"sets {key}={default!r}"):
        make_plan(name, NoiseSchedule.from_config({**saved, key: default}), 4)


def test_the_a1111_sampler_list_holds_what_the_model_runs():
    from sdrt.schedulers import NoiseSchedule, a1111_labels

    everything = a1111_labels()
    assert a1111_labels(NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)) == everything
    plain = NoiseSchedule.from_config({"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085,
                                       "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    runs = a1111_labels(plain)  # no clip_sample / skip_prk_steps keys: DDIM and PLMS would differ from diffusers
    assert "DDIM" in everything and "PLMS" in everything and "DDIM" not in runs and "PLMS" not in runs
    assert "Euler a" in runs and runs["DPM++ 2M"] == everything["DPM++ 2M"]
    assert list(a1111_labels(NoiseSchedule.from_config(SD3_SCHEDULER_CONFIG))) == ["Euler"]


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_sde_karras"])
def test_dpmpp_sde_noise_correlates_its_two_calls_as_the_brownian_tree_does(name):
    """DPM++ SDE's calls of one step draw Brownian increments over [σ_mid, σ_j] and [σ_{j+1}, σ_j], which overlap:
    the plan's noise_mix must give them the correlation diffusers' Brownian tree (torchsde) gives, and none
    across steps. 40,000 independent scalars: the estimate's standard error is 0.005."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    plan = make_plan(name, NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG), 4)
    sigma = np.sqrt(1 / plan.coeffs[:, C_IN] ** 2 - 1)  # the σ each call sees: σ_0, σ_mid0, σ_1, σ_mid1, ...
    tree = BrownianTreeNoiseSampler(torch.zeros(40_000), float(sigma[-1]), float(sigma[0]), seed=0)
    mix = plan.noise_mix
    np.testing.assert_allclose((mix**2).sum(axis=1), 1.0, rtol=1e-12)  # each call's noise is a standard normal
    previous = None
    for j in range(len(plan) // 2):
        s, s_mid, s_next = (float(v) for v in sigma[2 * j: 2 * j + 3])
        first, second = tree(s, s_mid).numpy(), tree(s, s_next).numpy()
        assert float(np.mean(first * second)) == pytest.approx(mix[2 * j + 1, 2 * j], abs=0.025)
        assert 0.3 < mix[2 * j + 1, 2 * j] < 0.95, "the two calls' noise is neither independent nor the same"
        if previous is not None:
            assert abs(float(np.mean(previous * first))) < 0.025 and not mix[2 * j, : 2 * j].any()
        previous = second
