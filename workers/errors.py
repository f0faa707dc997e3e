"""The base of every error whose message is written for an operator to read."""


class FleetError(Exception):
    """An error with a one-line message naming what is wrong and where.

    The CLI prints it as it is (``fleet: error: <message>``) instead of a traceback.
    """
