"""Imports every subsystem that registers a configuration section."""
import fedrpc.encoders.config  # noqa: F401
