"""The one error family shared by every layer: the user asked for
something that cannot be (an unknown device, option, feature or command, a
bad argument, a path that cannot be used).  The command line answers it
with one line and exit status 2, the control socket with a ``usage``
error; nothing else is the user's fault."""

from __future__ import annotations


class UsageError(Exception):
    """A user error; the message names the thing and the problem."""
