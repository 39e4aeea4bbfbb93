"""The diffusers counterpart of each sdrt sampler: what parity tests and the torch baseline use."""

from __future__ import annotations

from typing import Any, Mapping
from sdrt.schedulers import is_flow_config

DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                            "solver_type": "midpoint", "use_karras_sigmas": True}),
}


# flow-matching models (SD3): sdrt's samplers for them
FLOW_DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def diffusers_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler of the same name, built from a scheduler_config as diffusers would."""
    import diffusers

    cls_name, extra = (FLOW_DIFFUSERS_SCHEDULERS if is_flow_config(config) else DIFFUSERS_SCHEDULERS)[name]
    return getattr(diffusers, cls_name).from_config({**config, **extra})
