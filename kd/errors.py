"""Domain errors.

Each subclasses the built-in error a caller would expect (a missing cache is also a
FileNotFoundError) and carries a message that names the path, key or value and what was
expected. The CLI turns any of them into one line on stderr and exit code 1.
"""


class KDError(Exception):
    """Base class of every error the CLI reports as one line without a traceback."""


class ConfigError(KDError, ValueError):
    """A params.yaml section or command-line option is invalid (unknown key, bad value)."""


class InputError(KDError, ValueError):
    """An input file exists but its content is not what the stage expects."""


class MissingInputError(KDError, FileNotFoundError):
    """An input file or directory the stage needs does not exist."""


class CacheError(KDError, ValueError):
    """The teacher-output cache is corrupt, incomplete or does not match what was asked."""


class StaleCacheError(CacheError):
    """The cache was built from other data (or another teacher) than the one now in use."""


class CacheMissingError(CacheError):
    """The cache lacks a temperature, feature or view a student asks for.

    The message says what to add to the `label` section of params.yaml.
    """
