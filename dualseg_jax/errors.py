"""Errors a user can act on: each names the file or config key and says what to do."""


class DataError(ValueError):
  """A bad, missing or inconsistent input file (the message names the file and the fix)."""


class ConfigError(ValueError):
  """An impossible or inconsistent configuration (the message names the key and allowed values)."""


class StorageError(DataError):
  """A write the filesystem refused: full, over quota, read-only or not permitted.

  The message says what was being written, where, the free space left there, what is safe and
  what to do. `failure`, `safe` and `remedy` are its parts, so that a caller that knows more (the
  training loop knows its last complete checkpoint) can fill in what is safe.
  """

  def __init__(self, failure: str, remedy: str, safe: str = ''):
    advice = '; '.join(part for part in (safe, remedy) if part)
    super().__init__(f'{failure}. {advice[:1].upper()}{advice[1:]}')
    self.failure, self.remedy, self.safe = failure, remedy, safe

  def __reduce__(self):  # raised in preprocessing workers and sent back to the parent
    return type(self), (self.failure, self.remedy, self.safe)

  def with_safe(self, safe: str) -> 'StorageError':
    return StorageError(self.failure, self.remedy, safe)
