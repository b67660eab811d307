"""The project's error types: every one is a problem the user can fix, and the CLI prints its one-line message with
exit code 2 (never a traceback). Standard library only, so that any module, the torch-free predictor included, can
import them without pulling pandas or torch."""

from __future__ import annotations


class DwcpError(ValueError):
    """Base: a refusal with a one-line message that names the file, key, column or row and what is wrong."""


class DataError(DwcpError):
    """A telemetry file (CSV or Parquet) that cannot be used as it is: a missing column, a bad cell, a broken split."""


class ConfigError(DwcpError):
    """A configuration value (a flag or a YAML key) that cannot work: found before the first training step."""


class CheckpointError(DwcpError):
    """A checkpoint that cannot be used: missing, truncated, foreign, for another model, or needing code to load."""


class ModelFileError(DwcpError):
    """An exported model pair (model.onnx + model_metadata.json) that is missing, altered, or invalid."""


def parse_flags(parser, argv):
    """Parse ``argv`` with a jsonargparse parser: a flag of the wrong type is a :class:`ConfigError` (one ``error:``
    line, exit 2) like every other refusal, not the parser's usage text."""
    import argparse

    parser.exit_on_error = False  # raise ArgumentError instead of printing the usage and exiting
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None


def check_named(value: str | None, flag: str, what: str) -> None:
    """Refuse a path flag given as '' (or spaces) in one line naming ``flag``: ``Path('')`` is the working directory,
    so ``--model ''`` quietly read whatever ``./model.onnx`` was (or was "model.onnx: file not found")."""
    if value is not None and not str(value).strip():
        raise ConfigError(f"{flag} must name {what}, got {value!r}")


MAX_SEED = 2**32 - 1  # numpy's seed range; torch's is wider, but seed + step must stay inside it as a run goes on


def check_seed(seed, flag: str) -> None:
    """Refuse a seed outside 0 .. :data:`MAX_SEED` in one line naming ``flag`` (numpy's own message names no flag,
    and torch's overflow came after training had started)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{flag} must be an integer from 0 to 2**32 - 1, got {seed!r}")


def not_a_regular_file(path) -> str | None:
    """What is wrong with reading ``path`` as a file (None: nothing), checked before it is opened: a FIFO blocks the
    reader or reads as "file is empty", /dev/zero never ends, and a /proc or /sys file (/proc/self/environ) states
    a size of 0 though it holds bytes. Directories are left to the callers, whose messages say what they expect."""
    import os
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, device or socket)"
    if st.st_size == 0 and str(os.path.realpath(path)).startswith(("/proc/", "/sys/")):
        return "not a regular file (a /proc or /sys file, whose size reads 0)"
    return None
