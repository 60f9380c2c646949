"""Errors a user can cause and fix: entry points print their message without a traceback."""


class UserError(ValueError):
    """Bad input (config value, path, file content). The message says what is wrong and what would be right."""


class ConfigError(UserError):
    """A configuration value is missing or out of range."""


class EvaluationError(UserError):
    """An evaluation during training failed for a user-fixable reason; the trained weights were saved first."""
