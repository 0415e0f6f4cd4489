"""The one exception type a user sees: the CLI turns it into a one-line message and exit code 2."""


class IlnasError(Exception):
    """A bad input (configuration, genotype, data, run directory) described in one line."""
