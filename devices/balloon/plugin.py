"""``vuser run balloon``: options, QEMU's generic device (the plugin
default), the control commands ``set-target``, ``stats``, ``hint`` and
``policy``, and the rows of a recorded time series."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from vuser.device import DeviceError
from vuser.plugin import Command, DevicePlugin, Param

from .device import BalloonDevice
from .pages import PAGE_SIZE, parse_size
from .policy import ActivePolicy

POLICY_ACTIONS = ("show", "set", "off")


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


def _policy_action(text: str) -> str:
    if text not in POLICY_ACTIONS:
        raise DeviceError(f"policy takes {'|'.join(POLICY_ACTIONS)}")
    return text


def _policy(devices: Sequence[BalloonDevice], action: str, spec: str | None = None) -> dict[str, Any]:
    dev = devices[0]
    if (spec is None) != (action != "set"):
        raise DeviceError("usage: policy show | policy set NAME[:key=value,...] | policy off")
    if action == "set":
        assert spec is not None
        dev.set_policy(ActivePolicy.load(spec))
    elif action == "off":
        dev.set_policy(None)
    return dev.policy_status()


class BalloonPlugin(DevicePlugin[BalloonDevice]):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--target", default="0", help="initial balloon size (e.g. 64M, pages with p)")
        parser.add_argument("--stats-interval", type=float, default=2.0,
                            help="seconds between stats requests (0: never; a policy sets its own)")
        parser.add_argument("--policy", metavar="NAME[:KEY=VALUE,...]",
                            help="a balloon policy sets the target (built in: auto; others from the "
                                 "vuser.balloon_policies entry points)")

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"target_pages": parse_size(args.target), "stats_interval": args.stats_interval,
                "policy": None if args.policy is None else ActivePolicy.load(args.policy)}

    def sample(self, devices: Sequence[BalloonDevice], since: int | None) -> dict[str, Any]:
        """Sizes in bytes: the target and what the guest holds, its RAM, what
        vuser gave back to the host, the guest's stats, the host figures the
        policy last read, and its decisions since the previous row
        (``cursor``: the last one's seq)."""
        dev = devices[0]
        inputs = dev.policy_input()
        policy = dev.policy
        decisions = policy.decisions_since(since) if policy is not None else []
        return {"connected": dev.context is not None,
                "guest_ram": None if inputs is None else inputs.guest_ram,
                "target": dev.num_pages * PAGE_SIZE, "actual": dev.actual * PAGE_SIZE,
                "bytes_released": dev.bytes_released, "oom_deflated": dev.oom_deflated_pages * PAGE_SIZE,
                "stats": dict(dev.stats), "stats_time": dev.stats_time,
                "policy": None if policy is None else str(policy.spec),
                "host": None if policy is None or policy.last_host is None else policy.last_host.as_dict(),
                "decisions": decisions, "cursor": decisions[-1]["seq"] if decisions else since}


plugin = BalloonPlugin(BalloonDevice, commands=(
    Command("set-target", "set the balloon size (the guest gives that much memory back)", _set_target,
            (Param("size", parse_size, "64M, 1G, 4096 (bytes) or 100p (pages)"),)),
    Command("stats", "the guest's latest memory statistics (with --watch: recorded rows, live)", _stats),
    Command("hint", "start or stop free page hinting", _hint, (Param("action", _hint_action, "start|stop"),)),
    Command("policy", "show, set or switch off the policy that sets the target", _policy,
            (Param("action", _policy_action, "show|set|off"),
             Param("spec", str, "with set: NAME[:key=value,...], e.g. auto:floor=128M", optional=True))),
))
