"""Imports every subsystem that registers a configuration section."""
