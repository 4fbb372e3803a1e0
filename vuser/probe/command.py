"""``vuser probe``: the command line of the conformance checker.

::

    vuser probe --socket PATH --device DEVICE [--json]
    vuser probe --device blk --exec 'qemu-storage-daemon ... addr.path={socket} ...'
    vuser probe --device rng --listen --socket PATH --exec 'vuser run rng --client --socket {socket}'

Prints a table (or with ``--json`` one JSON object, ``report``); exit status
0 when no check failed or errored, 1 otherwise, 2 for a usage error.  The
heavy modules are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vuser.errors import UsageError

if TYPE_CHECKING:
    from vuser.probe.report import Report


class ProbeUsageError(UsageError):
    """Options that do not fit together (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help="the back-end's vhost-user socket (with --exec: default a private temporary one)")
    parser.add_argument("--device", required=True, metavar="DEVICE",
                        help="device type: rng, balloon, net, blk, fs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--exec", dest="command", metavar="'CMD {socket}'",
                        help="start the back-end with this command ({socket} is the socket path); it is "
                             "started again when it exits, and restarted for the reconnect check")
    parser.add_argument("--listen", action="store_true",
                        help="listen on the socket; the back-end connects (its client mode)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="wait this long for each reply (default 3)")
    parser.add_argument("--check", action="append", metavar="NAME",
                        help="run only this check (repeatable; 'hostile/' runs every hostile/... check)")
    parser.add_argument("--log", metavar="FILE", help="with --exec: the back-end's output goes to FILE")


def main(args: argparse.Namespace) -> int:
    from vuser.probe.profiles import PROFILES

    if args.device not in PROFILES:
        raise ProbeUsageError(f"unknown device {args.device!r} (known: {', '.join(PROFILES)})")
    if args.socket is None and args.command is None:
        raise ProbeUsageError("give --socket PATH, or --exec 'CMD {socket}' to start the back-end")
    try:
        command = None if args.command is None else shlex.split(args.command)
    except ValueError as exc:
        raise ProbeUsageError(f"--exec: {exc}") from None
    private = None if args.socket is not None else tempfile.mkdtemp(prefix="vuser-probe-")
    socket_path = args.socket or str(Path(private or ".") / "backend.sock")
    try:
        report: Report = trio.run(_probe, args, socket_path, command)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        how = f"started with: {args.command}" if args.command else "already running"
        print(report.table(f"vuser probe: {args.device} back-end on {socket_path} ({how})"))
    sys.stdout.flush()
    return report.exit_code


async def _probe(args: argparse.Namespace, socket_path: str, command: list[str] | None) -> Report:
    from vuser.probe.run import run_probe
    from vuser.probe.target import ProbeTarget

    try:
        target = ProbeTarget(socket_path, listen=args.listen, command=command, log_path=args.log,
                        timeout=args.timeout)
    except ValueError as exc:
        raise ProbeUsageError(f"--exec: {exc}") from None
    async with target:
        return await run_probe(target, args.device, only=args.check)


__all__ = ["ProbeUsageError", "add_arguments", "main"]
