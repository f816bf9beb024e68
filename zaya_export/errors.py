"""User-facing errors: each carries a one-line message naming the file and the problem, and the CLI turns it
into exit code 2 with no traceback. Bugs in zaya-export itself are not ZayaErrors and keep their tracebacks."""


class ZayaError(Exception):
    """Bad input to zaya-export (a checkpoint, a prompt, an option)."""

    exit_code = 2


class CheckpointError(ZayaError):
    """A checkpoint directory that cannot be loaded as it is."""


class InputError(ZayaError):
    """A prompt or option that cannot be used with the given model."""
