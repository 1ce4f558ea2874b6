"""The `ptq-studio` console script: the one place that knows both the GUI (app) and the CLI (core.cli.main)."""
