"""The exception types a user sees: the CLI prints each as one line and exits with its ``exit_code``."""


class IlnasError(Exception):
    """A bad input (configuration, genotype, data, run directory) described in one line; nothing was written."""

    exit_code = 2


class RunFailed(IlnasError):
    """A run stopped part-way (divergence, a failed write); its last good checkpoint is kept."""

    exit_code = 3
