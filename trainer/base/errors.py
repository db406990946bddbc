"""The errors a user sees as one line (the CLI prints str(e) and exits 2)."""


class UserError(Exception):
    """Bad input from the user (config, data, paths); str(e) is the one-line message shown."""


class ConfigError(UserError, ValueError):
    """A config problem; str(e) names the file (or the command line) and the key path."""
