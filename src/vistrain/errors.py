"""The error every layer may raise for a bad setting. A leaf module: it imports nothing of vistrain."""


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts; the message names the key."""
