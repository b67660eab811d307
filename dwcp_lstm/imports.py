"""What a config file or flag may name as code.

jsonargparse builds objects from any dotted path a value names (``class_path`` plus ``init_args``, or a plain path
for a callable argument) and imports the module to find it, so that a config file could run code: a
``unittest.mock.Mock`` whose ``return_value`` is ``subprocess.Popen``, nested as a scheduler's ``lr_lambda`` or a
callback's hook, ran a shell command when the run was set up, and naming any module ran its top-level code at parse
time. jsonargparse's own import-path policy closes that: everything is denied except the packages a run of this
project is built from. Checked by jsonargparse before it imports anything.

A refusal names the path and the policy in one line (:func:`denied_message`). A trusted module of your own (a
callback, a logger) is allowed by the person running the command, never by a config:
``DWCP_LSTM_ALLOW_IMPORTS=my_package,other.module python -m dwcp_lstm fit ...``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

ENV = "DWCP_LSTM_ALLOW_IMPORTS"
ALLOWED = (
    "torch.optim",  # optimizers and learning-rate schedulers (preflight.check_factories narrows it further)
    "lightning.pytorch.callbacks", "lightning.pytorch.loggers", "lightning.pytorch.strategies",
    "lightning.pytorch.plugins", "lightning.pytorch.profilers", "lightning.pytorch.accelerators",
    "lightning.fabric.plugins",  # where Lightning's cluster environments and checkpoint IO are defined
    "dwcp_lstm.callbacks",
)  # fmt: skip
# Inside the allowed packages: classes whose whole purpose is to call a function the config names.
DENIED = (  # the re-exported name and the module that defines it (jsonargparse checks both paths a value can take)
    "lightning.pytorch.callbacks.LambdaCallback",
    "lightning.pytorch.callbacks.lambda_function",
    "torch.optim.lr_scheduler.LambdaLR",
    "torch.optim.lr_scheduler.MultiplicativeLR",
)


def restrict_config_imports() -> None:
    """Install the policy (global to jsonargparse; idempotent). Also stops jsonargparse from building a
    ``class_path`` found inside a plain dict or ``Any`` argument, where no type says what may be built."""
    from jsonargparse import set_parsing_settings

    from dwcp_lstm.errors import ConfigError

    extra = [p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()]
    for entry in extra:
        if not all(part.isidentifier() for part in entry.split(".")) or entry.split(".")[0] == "jsonargparse":
            raise ConfigError(f"environment variable {ENV}: {entry!r} is not a module or object path such as "
                              "my_package.callbacks (jsonargparse itself cannot be allowed)")  # fmt: skip
    try:
        set_parsing_settings(
            instantiate_subclass_spec_in_any=False,
            import_path_denylist=["*", *DENIED],
            import_path_allowlist=[*ALLOWED, *extra],
        )
    except ValueError as exc:  # e.g. JSONARGPARSE_DEBUG=1: jsonargparse reads its own variables here
        raise ConfigError(" ".join(str(exc).split())) from None


class ConfigFileRefused(BaseException):  # noqa: N818 (a signal that carries the error, like KeyboardInterrupt)
    """A file that jsonargparse was about to read as config, refused: it carries the :class:`ConfigError` out of
    jsonargparse, whose union and type handlers catch any ``Exception`` (and would try the next type, or name the
    file's contents in a message of their own). :func:`config_files_checked` turns it back into the error."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_reads_allowed: ContextVar[str | None] = ContextVar("dwcp_config_reads", default=None)
_READ_TEXT = "_dwcp_original_read_text"


def _checked_read_text(path) -> str:
    """jsonargparse's ``Path.read_text`` for every file it reads as config: a ``--config``, and a group given as a
    file (``--data FILE``, ``--data.synthetic FILE``, ``data: FILE`` inside a config). Each gets the checks that a
    ``--config`` file gets: UTF-8 (a UnicodeDecodeError traceback named no file), no alias bomb, no key written
    twice (:func:`dwcp_lstm.runs.check_yaml_size`)."""
    from dwcp_lstm.errors import ConfigError

    if path._std_io or path._is_url or path._is_fsspec:
        return getattr(type(path), _READ_TEXT)(path)
    name = str(path)
    refused = _reads_allowed.get()
    if refused is not None:  # a run's own config.yaml: written by the fit with every setting inline
        why = "a run's config.yaml holds every setting inline (as the fit wrote it), so it is not read"
        raise ConfigFileRefused(ConfigError(f"{refused}: a setting names the file {name}; {why}"))
    from dwcp_lstm.runs import check_yaml_size
    from dwcp_lstm.tables import first_line

    try:
        with open(path._absolute, "rb") as f:
            text = f.read().decode("utf-8")
        check_yaml_size(text, name)
    except UnicodeDecodeError as exc:
        raise ConfigFileRefused(ConfigError(f"{name}: not UTF-8 text ({first_line(exc)[:120]})")) from None
    except OSError as exc:
        raise ConfigFileRefused(ConfigError(f"{name}: cannot read ({exc.strerror or exc})")) from None
    except ConfigError as exc:
        raise ConfigFileRefused(exc) from None
    return text


def check_config_reads() -> None:
    """Route every config file jsonargparse reads through :func:`_checked_read_text` (global; idempotent)."""
    from jsonargparse._paths import Path as ArgPath  # the one place it reads a file's text

    if not hasattr(ArgPath, _READ_TEXT):
        setattr(ArgPath, _READ_TEXT, ArgPath.read_text)
        ArgPath.read_text = _checked_read_text


@contextmanager
def config_files_checked(run_config: str | None = None):
    """Parse inside this: a refused file comes out as its :class:`ConfigError`. With ``run_config`` (a run's
    config.yaml) no other file may be read at all: a tampered ``synthetic: /any/file`` made ``report`` read any
    YAML file on the machine and echo its keys."""
    check_config_reads()
    token = _reads_allowed.set(run_config)
    try:
        yield
    except ConfigFileRefused as exc:
        raise exc.error from None
    finally:
        _reads_allowed.reset(token)


def denied_message(text: str) -> str | None:
    """One readable line for jsonargparse's refusal of an import (its own message repeats the reason for every type
    it tried, 2,000+ characters); None when ``text`` is not such a refusal."""
    import re

    found = re.search(r"Importing '([^']+)' is not allowed", text)
    if found is None:
        return None
    key = re.search(r'Parser key "([^"]+)"', text)
    where = f"--{key.group(1)}: " if key else ""
    return (
        f"{where}a config may not name {found.group(1)}: only code from {', '.join(ALLOWED)}, less the classes "
        f"that call a function the config names (trusted modules of your own: {ENV}=module,...)"
    )
