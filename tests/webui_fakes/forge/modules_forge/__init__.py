"""Fake of Forge's own top-level package: only its presence marks the host as Forge."""
