"""One root exception per concern, each carrying enough context to act on."""

from __future__ import annotations


class CustomsEdgeError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(CustomsEdgeError):
    """A unit or hub config was refused. `problems` holds one line per bad key: 'path.to.key: why'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid config\n" + "\n".join(f"  {p}" for p in problems))


class DriverFault(CustomsEdgeError):
    """The instrument cannot be read right now (silent, unplugged, refusing). The runtime reports it,
    reopens the port with backoff, and keeps everything else running."""


class DriverSilent(DriverFault):
    """The port is open but no valid frame arrived within the configured silence window."""


class ModelError(CustomsEdgeError):
    """A model file does not match its manifest (hash, inputs, outputs, shapes) or cannot be loaded."""
