"""The errors a sweep or tune reports, in a module of their own so that the CLI can catch
them without importing the simulator or pandas (it does so before it knows which command runs)."""


class ConfigError(ValueError):
    """A user error in an experiment config; the message says where and what is allowed."""


class RunError(RuntimeError):
    """A simulation raised; the message names the run."""
