"""Command line: ``vuser run | devices | qemu-args | ctl``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from typing import Any, Sequence

import trio

from . import registry
from .device import Device, DeviceError

log = logging.getLogger("vuser")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _device_parser(prog: str, cls: type[Device], with_socket: bool = True,
                   multi_socket: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=cls.description or cls.name)
    if multi_socket:
        p.add_argument("--socket", required=True, metavar="PATH", action="append",
                       help="vhost-user unix socket (repeatable for multi-port devices: "
                            "one port per socket)")
    elif with_socket:
        p.add_argument("--socket", required=True, metavar="PATH", help="vhost-user unix socket")
    cls.add_arguments(p)
    return p


def _devices_for_sockets(cls: type[Device], args: argparse.Namespace) -> list[Device]:
    """One device per socket.  A device class with ``from_args_sockets``
    (net: ports of one switch) makes them all; others serve one socket."""
    sockets = args.socket
    make = getattr(cls, "from_args_sockets", None)
    if make is not None:
        return list(make(args, sockets))
    if len(sockets) > 1:
        raise DeviceError(f"{cls.name} serves one socket; --socket given {len(sockets)} times")
    args.socket = sockets[0]
    return [cls.from_args(args)]


# ------------------------------------------------------------------ run

async def _run(devices: list[Device], sockets: list[str], args: argparse.Namespace) -> None:
    from .runner import Runner, RunnerGroup

    runners = [Runner(dev, path, client=args.client, ring_impl=args.ring) for dev, path in zip(devices, sockets)]
    tasks = getattr(devices[0], "background_tasks", None)
    group = RunnerGroup(runners, control_path=args.control, background=tasks() if tasks else [])
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(group.run)
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def cmd_run(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: vuser run DEVICE --socket PATH [--socket PATH...] [--client] [--control PATH] "
              "[device options]",
              file=sys.stderr)
        return 2
    name, rest = argv[0], list(argv[1:])
    try:
        cls = registry.load(name)
    except KeyError as exc:
        print(f"vuser: {exc.args[0]}", file=sys.stderr)
        return 2
    p = _device_parser(f"vuser run {name}", cls, multi_socket=True)
    p.add_argument("--client", action="store_true", help="connect to a front-end listening on --socket")
    p.add_argument("--control", metavar="PATH", help="open a control socket at PATH (vuser ctl)")
    p.add_argument("--ring", choices=("native", "python"), default="native",
                   help="ring implementation: the C hot path or the pure-Python reference")
    args = p.parse_args(rest)
    sockets = list(args.socket)
    try:
        devices = _devices_for_sockets(cls, args)
    except (DeviceError, OSError) as exc:
        print(f"vuser: {exc}", file=sys.stderr)
        return 2
    trio.run(_run, devices, sockets, args)
    return 0


# ------------------------------------------------------------------ devices

def describe(cls: type[Device]) -> dict[str, Any]:
    dev = cls()
    layout = dev.queue_layout(None)
    return {
        "name": cls.name,
        "virtio_id": cls.virtio_id,
        "description": cls.description,
        "features": [{"bit": f.bit, "name": f.name, "queues": list(f.queues)} for f in cls.features],
        "transport_features": [f.name for f in cls.transport_features],
        "queues": layout.as_list(),
        "config": [{"name": c.name, "offset": c.offset, "size": c.size, "feature": c.feature,
                    "writable": c.writable} for c in dev.existing_fields()],
    }


def cmd_devices(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vuser devices")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    infos = [describe(cls) for cls in registry.load_all().values()]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        print(f"{info['name']} (virtio id {info['virtio_id']}): {info['description']}")
        print("  features offered:")
        for f in info["features"]:
            q = f" -> queues {', '.join(f['queues'])}" if f["queues"] else ""
            print(f"    bit {f['bit']:2d} {f['name']}{q}")
        for name in info["transport_features"]:
            print(f"    {name}")
        print("  queue layout (all features offered, policy 'offered'):")
        for q in info["queues"]:
            print(f"    {q['index']}: {q['role']}")
        if info["config"]:
            print("  config:")
            for c in info["config"]:
                rw = "rw" if c["writable"] else "ro"
                dep = f" (with {c['feature']})" if c["feature"] else ""
                print(f"    {c['offset']:3d} +{c['size']} {c['name']} {rw}{dep}")
    return 0


# ------------------------------------------------------------------ qemu-args

def qemu_args(device: Device, socket_path: str, *, qemu_version: str = "11", memory: str | None = "512M",
              chardev_id: str = "vu0", reconnect: int | None = None) -> list[str]:
    """QEMU arguments attaching ``device``; ``memory=None`` leaves out the
    shared memory backend (when the caller already gives one: a vhost-user
    back-end needs the guest RAM shared, e.g. memory-backend-memfd,share=on)."""
    chardev = f"socket,id={chardev_id},path={socket_path}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    mem_args = [] if memory is None else [
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", "q35,memory-backend=mem",
        "-m", memory,
    ]
    return [
        *mem_args,
        "-chardev", chardev,
        # A netdev-style device (net) needs its -netdev before the -device.
        *getattr(device, "qemu_extra_args", lambda c, v: [])(chardev_id, qemu_version),
        "-device", device.qemu_device_args(chardev_id, qemu_version),
    ]


def cmd_qemu_args(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: vuser qemu-args DEVICE --socket PATH [--qemu-version 7.2|11] [--memory 512M]",
              file=sys.stderr)
        return 2
    name, rest = argv[0], list(argv[1:])
    cls = registry.load(name)
    p = _device_parser(f"vuser qemu-args {name}", cls)
    p.add_argument("--qemu-version", default="11", help="QEMU major.minor to target (7.2 or 11)")
    p.add_argument("--memory", default="512M", help="guest RAM (shared memfd backend)")
    p.add_argument("--chardev-id", default="vu0")
    p.add_argument("--no-memory", action="store_true",
                   help="leave out the shared memory backend (the caller gives one, once per guest)")
    args = p.parse_args(rest)
    if isinstance(args.socket, list):  # run-style repeatable --socket
        args.socket = args.socket[0]
    device = cls.from_args(args)
    print(shlex.join(qemu_args(device, args.socket, qemu_version=args.qemu_version,
                               memory=None if args.no_memory else args.memory, chardev_id=args.chardev_id)))
    return 0


# ------------------------------------------------------------------ ctl

def cmd_ctl(argv: Sequence[str]) -> int:
    from .control import call

    p = argparse.ArgumentParser(prog="vuser ctl")
    p.add_argument("path", help="control socket of a running 'vuser run ... --control PATH'")
    p.add_argument("command")
    p.add_argument("args", nargs="*")
    args = p.parse_args(argv)
    try:
        result = trio.run(call, args.path, args.command, args.args)
    except (OSError, RuntimeError, trio.TooSlowError) as exc:
        print(f"vuser ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


COMMANDS = {"run": cmd_run, "devices": cmd_devices, "qemu-args": cmd_qemu_args, "ctl": cmd_ctl}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level = "INFO"
    # --log-level is global and may stand anywhere.
    for i, a in enumerate(argv):
        if a == "--log-level" and i + 1 < len(argv):
            level = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--log-level="):
            level = a.split("=", 1)[1]
            del argv[i]
            break
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: vuser [--log-level LEVEL] {run,devices,qemu-args,ctl} ...\n\n"
              "  run DEVICE --socket PATH [--client] [--control PATH] [options]  serve a device\n"
              "  devices [--json]                       list devices, features, queue layouts\n"
              "  qemu-args DEVICE --socket PATH         QEMU arguments that attach a device\n"
              "  ctl PATH COMMAND [ARGS]                talk to a running device's control socket",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging(level)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
