"""SimPy model of a pipeline-parallel replica driven by the core Scheduler."""
from sim.config import SimConfig, default_workload
from sim.pipeline import ConstantLatency, PipelineSim
from sim.run import SimResult, fitted_model, simulate

__all__ = ["ConstantLatency", "PipelineSim", "SimConfig", "SimResult", "default_workload", "fitted_model", "simulate"]
