"""The exception types a user sees: the CLI prints each as one line and exits with its ``exit_code``."""


class IlnasError(Exception):
    """A bad input (configuration, genotype, data, run directory) described in one line; nothing was written."""

    exit_code = 2


class RunFailed(IlnasError):
    """A run stopped part-way (divergence, a failed write); its last good checkpoint is kept."""

    exit_code = 3


class Stopped(Exception):
    """A run asked to stop by a signal (a cluster's preemption or time-limit notice) that wrote a checkpoint
    between two steps and can be continued; the CLI exits with 128 + the signal's number, as the shell does."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
