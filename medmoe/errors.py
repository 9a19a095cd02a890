"""Errors a user can hit. Each message names the file or setting and says how to fix it."""


class MedMoEError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(MedMoEError, ValueError):
    """A configuration value, recipe entry or override is wrong."""


class ImageError(MedMoEError, ValueError):
    """An image file is missing, corrupt, too large or not an image."""


class DataError(MedMoEError, ValueError):
    """A dataset file is missing or malformed (bad JSON, missing field, wrong split sizes)."""


class CheckpointError(MedMoEError, ValueError):
    """A checkpoint cannot be loaded: missing or unexpected keys, unsafe format, wrong shapes."""
