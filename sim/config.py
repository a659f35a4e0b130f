"""Simulation config: one slotted dataclass, validated on creation, loadable from YAML dicts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from core.metrics import SLO
from core.policies import make_policy
from core.validation import check_keys
from core.workloads import Workload

STAGE_MODELS = ("recursion", "resources")


def default_workload() -> dict[str, Any]:
    """Synthetic, shaped like the Azure conversation trace (see core.workloads.default_workload)."""
    return {"num_requests": 1000,
            "arrival": {"kind": "gamma", "rate": 4.0, "burstiness": 1.0},
            "prompt_len": {"kind": "lognormal", "mean": 1155, "spread": 0.960, "max": 8192},
            "output_len": {"kind": "lognormal", "mean": 211, "spread": 0.771, "max": 2048}}


@dataclass(slots=True)
class SimConfig:
    profile: str = "qwen2.5-32b_a100-80gb_pp4"   # shipped table name or a profile folder
    policy: str = "token_throttling"             # built-in name or dotted path to a class
    policy_params: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=default_workload)
    seed: int = 0                                # seeds the workload
    pp: int | None = None                        # optional check against the profile's pp
    num_pages: int | None = None                 # None: derived from GPU memory in the profile
    memory_fraction: float = 0.9
    page_size: int = 16
    time_limit: float | None = None              # simulated seconds; unfinished are reported
    stage_model: str = "recursion"               # "resources": SimPy resources (reference)
    # The scheduler shares stage 0's thread, as in pipetwin's runtime: it sees completions
    # and decides only between stage-0 computes (see sim/pipeline.py). False: a scheduler
    # on its own core that reacts at once.
    driver_on_stage0: bool = False
    # Multiply each micro-batch's stage times by a row of the profile's measured jitter
    # (jitter.csv: in-situ tables have one), drawn with jitter_seed; see sim/pipeline.py.
    stage_jitter: bool = False
    jitter_seed: int = 0
    slo: dict[str, float | None] = field(default_factory=dict)  # ttft / tpot / e2e seconds
    # The table whose fitted model a policy that plans in seconds (time_balanced) prices
    # batches with; None: the profile that times the run. The twin sets it to the table the
    # runtime prices with, so both sides decide alike while the in-situ table times the sim.
    stage_time_profile: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str, value: Any) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {value!r}")
        if not isinstance(self.profile, str) or not self.profile:
            raise bad("profile", "a table name or a folder path", self.profile)
        if not isinstance(self.policy_params, dict):
            raise bad("policy_params", "a mapping of parameter names to values", self.policy_params)
        make_policy(self.policy, self.policy_params)  # validates name and every parameter
        if not isinstance(self.workload, dict):
            raise bad("workload", "a mapping (synthetic spec or {trace: PATH, ...})", self.workload)
        if "seed" in self.workload and self.workload["seed"] != self.seed:
            raise ValueError(f"workload.seed ({self.workload['seed']!r}) differs from seed ({self.seed!r}); "
                             "set the seed once, at the top level")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise bad("seed", "an int >= 0", self.seed)
        Workload.from_dict(self.workload_spec())  # every workload key and value, before any run
        if self.pp is not None and not (isinstance(self.pp, int) and self.pp >= 1):
            raise bad("pp", "an int >= 1 or null", self.pp)
        if self.num_pages is not None and not (isinstance(self.num_pages, int) and self.num_pages >= 1):
            raise bad("num_pages", "an int >= 1 or null", self.num_pages)
        if not (isinstance(self.memory_fraction, (int, float)) and 0 < self.memory_fraction <= 1):
            raise bad("memory_fraction", "a number in (0, 1]", self.memory_fraction)
        if not (isinstance(self.page_size, int) and self.page_size >= 1):
            raise bad("page_size", "an int >= 1", self.page_size)
        if self.time_limit is not None and not (isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            raise bad("time_limit", "a number of seconds > 0 or null", self.time_limit)
        if self.stage_model not in STAGE_MODELS:
            raise bad("stage_model", f"one of {list(STAGE_MODELS)}", self.stage_model)
        if not isinstance(self.driver_on_stage0, bool):
            raise bad("driver_on_stage0", "true or false", self.driver_on_stage0)
        if self.driver_on_stage0 and self.stage_model != "recursion":
            raise ValueError("driver_on_stage0 needs stage_model 'recursion' (it reads when stage 0 "
                             "is next free, which the recursion knows at dispatch)")
        if not isinstance(self.stage_jitter, bool):
            raise bad("stage_jitter", "true or false", self.stage_jitter)
        if not (isinstance(self.jitter_seed, int) and not isinstance(self.jitter_seed, bool)
                and self.jitter_seed >= 0):
            raise bad("jitter_seed", "an int >= 0", self.jitter_seed)
        SLO.of(self.slo)  # validates keys
        if self.stage_time_profile is not None and not (isinstance(self.stage_time_profile, str)
                                                        and self.stage_time_profile):
            raise bad("stage_time_profile", "null or a table name or folder path", self.stage_time_profile)

    def workload_spec(self) -> dict[str, Any]:
        return {**self.workload, "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimConfig":
        check_keys(d, [f.name for f in fields(cls)], "the simulation config")
        return cls(**dict(d))
