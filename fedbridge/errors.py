"""Errors a user can act on. Each message names the problem and the fix; the CLI prints them without a traceback."""


class FedbridgeError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class ConfigError(FedbridgeError, ValueError):
    """An unknown or malformed configuration value."""


class DataError(FedbridgeError, ValueError):
    """A dataset that cannot be used as given: missing file or column, unknown label, empty silo, bad bytes."""


class SiloRefusal(FedbridgeError):
    """A silo's deliberate answer "no" to a request, by its own rules (its privacy policy or budget): not a crash.
    The silo logs it as one warning line and replies with the reason; the server records it as a failure."""


class PrivacyBudgetExceeded(SiloRefusal):
    """A request that would spend more privacy budget than a silo has left."""


class PolicyRefusal(PrivacyBudgetExceeded):
    """A request the silo's node-config policy forbids whatever its budget (e.g. a non-private release from a strict
    silo). A subclass of ``PrivacyBudgetExceeded`` only so that callers catching that still see every refusal; catch
    ``SiloRefusal`` for both."""


class SiloFailure(FedbridgeError, RuntimeError):
    """No silo completed a step; the message carries the silos' own reason when they all failed alike."""
