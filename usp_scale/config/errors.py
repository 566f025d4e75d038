"""The one error type of a config that does not fit the schema or breaks a rule (every config module raises it)."""


class ConfigError(ValueError):
    """A recipe, override or value that does not fit the schema or breaks a rule of
    :mod:`usp_scale.config.validate`; the message names the key, its value and where it was set."""
