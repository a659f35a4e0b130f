"""Latency tables (schema, loader), the latency model fitted on them, and the
analytical roofline generator (profiles.analytical, not imported here so that
`python -m profiles.analytical` runs cleanly)."""
from profiles.latency_model import FitError, LatencyModel, fit
from profiles.schema import Profile, ProfileError, list_tables, load_profile, save_profile

__all__ = ["FitError", "LatencyModel", "Profile", "ProfileError", "fit", "list_tables",
           "load_profile", "save_profile"]
