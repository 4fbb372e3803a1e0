"""Choices shared by the pytest plugin and the lab.  Standard library only:
the plugin imports this at every pytest start, in every project where vuser
is installed, and must stay cheap (the lab, with all of vuser behind it, is
imported only when a test asks for a guest)."""

from __future__ import annotations

__all__ = ["DEFAULT_SERVE", "SERVE_MODES", "check_serve"]

# How a guest's devices are served: as `vuser run` child processes (as in
# production) or by the test's own trio loop (quicker to start; the device
# objects can be inspected).
SERVE_MODES = ("process", "in-process")
DEFAULT_SERVE = "process"


def check_serve(serve: str, what: str = "serve") -> str:
    """``serve`` if it is one of SERVE_MODES, else ValueError naming ``what``."""
    if serve not in SERVE_MODES:
        raise ValueError(f"{what}={serve!r}, expected one of {', '.join(SERVE_MODES)}")
    return serve
