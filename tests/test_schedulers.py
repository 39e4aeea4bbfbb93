"""Each sampler against the diffusers scheduler of the same name, step by step.

Both sides see the same fp32 model outputs and noise; ours applies its fp64 scalars to the
fp32 tensors exactly as the graph does. Tolerance: relative error ≤ 1e-5 (norm-wise), per step.
"""

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.export.reference import DIFFUSERS_SCHEDULERS, diffusers_scheduler  # noqa: E402
from sdrt.export.testmodel import SD15_SCHEDULER_CONFIG  # noqa: E402
from sdrt.schedulers import HISTORY, NoiseSchedule, make_plan  # noqa: E402

REL_TOL = 1e-5


CONFIGS = {
    "sd15": SD15_SCHEDULER_CONFIG,
    "v_trailing": {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}


def apply_row(row, x, out, x_hist, out_hist, noise):
    k = HISTORY
    nxt = row[1] * x + row[2] * out + row[-1] * noise
    for j in range(k):
        nxt = nxt + row[3 + j] * x_hist[j] + row[3 + k + j] * out_hist[j]
    return nxt.astype(np.float32)


def rel_err(a, b):
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), "NaN/inf in scheduler output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_sampler_matches_diffusers(name, steps, config):
    cfg = CONFIGS[config]
    if name == "lcm" and cfg.get("prediction_type") == "v_prediction":
        pytest.skip("LCM is trained for epsilon only")
    ref = diffusers_scheduler(name, cfg)
    ref.set_timesteps(steps)
    plan = make_plan(name, NoiseSchedule.from_config(cfg), steps)

    assert len(plan) == len(ref.timesteps)
    np.testing.assert_allclose(plan.timesteps, ref.timesteps.double().numpy(), rtol=1e-6, atol=1e-4)
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(0)
    shape = (1, 4, 8, 8)
    x = (rng.standard_normal(shape) * plan.init_noise_sigma).astype(np.float32)
    ref_x = torch.from_numpy(x.copy())
    x_hist = [np.zeros(shape, np.float32)] * HISTORY
    out_hist = [np.zeros(shape, np.float32)] * HISTORY
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    for i, t in enumerate(ref.timesteps):
        c_in_ref = float((ref.scale_model_input(ref_x, t) / ref_x).flatten()[0])
        assert plan.coeffs[i, 0] == pytest.approx(c_in_ref, rel=1e-6)
        out = rng.standard_normal(shape).astype(np.float32)
        seed = 1000 + i
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
        kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
        ref_x = ref.step(torch.from_numpy(out), t, ref_x, **kwargs).prev_sample
        ours = apply_row(plan.coeffs[i], x, out, x_hist, out_hist, noise)
        err = rel_err(ours, ref_x.numpy())
        assert err <= REL_TOL, f"{name} step {i}: rel err {err:.2e}"
        x_hist = [x] + x_hist[:-1]
        out_hist = [out] + out_hist[:-1]
        x = ref_x.numpy().astype(np.float32)  # follow the reference trajectory


def test_unknown_scheduler_and_bad_steps():
    from sdrt.errors import InputError

    schedule = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    with pytest.raises(InputError, match="choose one of"):
        make_plan("heun", schedule, 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="steps"):
            make_plan("euler", schedule, bad)
