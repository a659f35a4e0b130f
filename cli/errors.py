"""The usage error every command raises, in a module of its own: cli.main catches it before
it knows which command runs, and importing it loads nothing else."""

EXIT_USAGE = 2


class UsageError(ValueError):
    """Reported as `pipetwin CMD: error: MESSAGE`, exit 2."""
