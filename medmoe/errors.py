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


def is_out_of_memory(err: BaseException) -> bool:
    import torch  # here, so that importing the errors stays light

    # A GPU raises OutOfMemoryError; the CPU allocator a plain RuntimeError; torch.compile may wrap either.
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError) or (
                isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
            return True
        err = err.__cause__
    return False
