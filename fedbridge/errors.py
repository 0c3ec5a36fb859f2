"""Errors a user can act on. Each message names the problem and the fix; the CLI prints them without a traceback."""


class FedbridgeError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class ConfigError(FedbridgeError, ValueError):
    """An unknown or malformed configuration value."""


class DataError(FedbridgeError, ValueError):
    """A dataset that cannot be used as given: missing file or column, unknown label, empty silo, bad bytes."""


class PrivacyBudgetExceeded(FedbridgeError):
    """A request that would spend more privacy budget than a silo has left."""


class SiloFailure(FedbridgeError, RuntimeError):
    """No silo completed a step; the message carries the silos' own reason when they all failed alike."""
