"""Errors a user can act on: each names the file or config key and says what to do."""


class DataError(ValueError):
  """A bad, missing or inconsistent input file (the message names the file and the fix)."""


class ConfigError(ValueError):
  """An impossible or inconsistent configuration (the message names the key and allowed values)."""
