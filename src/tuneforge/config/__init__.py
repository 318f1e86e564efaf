"""Configuration: `load(yaml, overrides) -> Config`, strict, with Axolotl's key names."""

from .errors import ConfigError, ConfigIssue
from .load import dump, load, parse_overrides
from .schema import Config

__all__ = ["Config", "ConfigError", "ConfigIssue", "dump", "load", "parse_overrides"]
