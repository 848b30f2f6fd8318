"""Errors a user can act on. The CLI prints their message without a traceback."""


class MlamoeError(Exception):
    """Base class: the message names the file/field/value and the fix."""


class ConfigError(MlamoeError):
    pass


class CheckpointError(MlamoeError):
    pass
