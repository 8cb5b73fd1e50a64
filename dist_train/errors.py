"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, command line) that they can fix."""


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type, out of range or inconsistent."""
