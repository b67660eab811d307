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
