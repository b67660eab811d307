"""The built-in LightningCLI configs. Installed as the package ``dwcp_lstm.configs`` (pyproject.toml maps this folder
to it, for a wheel and for the editable install alike), so ``dwcp-lstm fit`` finds them outside the repository too.
Relative data paths in them (``../shared/...``) are relative to the working directory, as any config's."""
