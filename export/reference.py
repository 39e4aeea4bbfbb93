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
