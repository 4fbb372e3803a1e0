"""``vuser run balloon``: options, QEMU's generic device (the plugin
default), and the control commands ``set-target``, ``stats``, ``hint``."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from vuser.device import DeviceError
from vuser.plugin import Command, DevicePlugin, Param

from .device import BalloonDevice, parse_size

def _set_target(devices: Sequence[BalloonDevice], pages: int) -> dict[str, Any]:
    devices[0].set_target(pages)
    return devices[0].status()


def _stats(devices: Sequence[BalloonDevice]) -> dict[str, Any]:
    stats: dict[str, Any] = devices[0].status()["stats"]
    return stats


def _hint(devices: Sequence[BalloonDevice], action: str) -> dict[str, Any]:
    return {"cmd_id": devices[0].hint(action)}


def _hint_action(text: str) -> str:
    if text not in ("start", "stop"):
        raise DeviceError("hint takes start or stop")
    return text


class BalloonPlugin(DevicePlugin[BalloonDevice]):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--target", default="0", help="initial balloon size (e.g. 64M, pages with p)")
        parser.add_argument("--stats-interval", type=float, default=2.0,
                            help="seconds between stats requests (0: never)")

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"target_pages": parse_size(args.target), "stats_interval": args.stats_interval}


plugin = BalloonPlugin(BalloonDevice, commands=(
    Command("set-target", "set the balloon size (the guest gives that much memory back)", _set_target,
            (Param("size", parse_size, "64M, 1G, 4096 (bytes) or 100p (pages)"),)),
    Command("stats", "the guest's latest memory statistics", _stats),
    Command("hint", "start or stop free page hinting", _hint, (Param("action", _hint_action, "start|stop"),)),
))
