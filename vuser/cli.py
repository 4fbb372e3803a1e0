"""Command line: ``vuser run | devices | qemu-args | ctl | plot | descriptors | probe | provision``,
and the per-device back-end programs ``vuser-DEVICE`` (``backend_main``).

Every user error (an unknown device or option, a path that cannot be used,
a bad control command) is one line on stderr naming the thing and the
problem, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import trio

from . import registry
from .device import DeviceError
from .errors import UsageError
from .plugin import DevicePlugin, chardev_spec, with_device_property
from .probe.command import add_arguments as add_probe_arguments
from .testing.provision import cli as provision_cli

if TYPE_CHECKING:
    from .runner import RunnerGroup

log = logging.getLogger("vuser")

USAGE_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UserError(UsageError):
    """Something the user asked for that cannot be done (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message}\n")


def _logging_parent() -> Parser:
    parent = Parser(add_help=False)
    # SUPPRESS: a subcommand's absent option must not reset the global one.
    parent.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="log level (DEBUG decodes every vhost-user message)")
    return parent


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ------------------------------------------------------------------ run

def _add_run(sub: Any, parent: Parser, plugins: dict[str, DevicePlugin[Any]]) -> None:
    run = sub.add_parser("run", parents=[parent], help="serve a device on vhost-user sockets",
                         description="Serve DEVICE on vhost-user sockets.")
    devices = run.add_subparsers(dest="device", metavar="DEVICE", required=True, parser_class=Parser)
    for name, plugin in plugins.items():
        p = devices.add_parser(name, parents=[parent], help=plugin.description, description=plugin.description)
        p.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH", action="append",
                       help="vhost-user unix socket (repeatable for multi-port devices: one port per socket)")
        p.add_argument("--fd", type=int, action="append", metavar="N",
                       help="serve the listening vhost-user socket inherited as fd N instead (systemd socket "
                            "activation, a management layer); repeatable like --socket")
        p.add_argument("--print-capabilities", action="store_true",
                       help="print the back-end's capabilities (JSON) and exit; other options are ignored")
        p.add_argument("--client", action="store_true", help="connect to a front-end listening on --socket")
        p.add_argument("--allow-peer-uid", type=int, action="append", default=[], metavar="UID",
                       help="with --client: also serve a front-end running as UID (default: only "
                            "our own uid and root)")
        p.add_argument("--control", metavar="PATH", help="open a control socket at PATH (vuser ctl)")
        p.add_argument("--ring", choices=("native", "python"), default="native",
                       help="ring implementation: the C hot path or the pure-Python reference")
        p.add_argument("--no-ring-state", action="store_true",
                       help="do not keep packed ring state in SOCKET.rings (without it a restarted vuser "
                            "cannot resume packed rings under a reconnecting QEMU)")
        p.add_argument("--force-dirty-log", action="store_true",
                       help="log every write to guest memory into a private dirty log, as if the front-end "
                            "were migrating the guest (to measure what logging costs)")
        plugin.add_arguments(p)
        p.set_defaults(func=cmd_run, plugin=plugin)


def parse_run(argv: Sequence[str]) -> argparse.Namespace:
    """``vuser run ARGV`` parsed exactly as the command line does (the
    plugin in ``.plugin``), for callers that serve devices themselves (the
    real-guest test kit).  What argparse rejects raises UserError with its
    message instead of exiting."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return build_parser().parse_args(["run", *argv])
    except SystemExit:
        raise UserError(out.getvalue().strip() or f"cannot parse: vuser run {shlex.join(argv)}") from None


def runner_group(plugin: DevicePlugin[Any], devices: Sequence[Any], args: argparse.Namespace) -> RunnerGroup:
    """What ``vuser run`` serves: one runner per ``--socket`` and device,
    the control socket and the plugin's background work, in one group."""
    from .ringstate import default_path as default_ring_state_path
    from .runner import Runner, RunnerGroup

    peers = {os.getuid(), 0, *args.allow_peer_uid}
    fds: list[int | None] = list(args.fd or [None] * len(devices))
    runners = [Runner(dev, path, client=args.client, ring_impl=args.ring, plugin=plugin, peer_uids=sorted(peers),
                      ring_state=None if args.no_ring_state or fd is not None else default_ring_state_path(path),
                      fd=fd, force_dirty_log=args.force_dirty_log)
               for dev, path, fd in zip(devices, _socket_names(args), fds)]
    return RunnerGroup(runners, control_path=args.control, background=plugin.background(devices), plugin=plugin)


async def _serve(plugin: DevicePlugin[Any], devices: list[Any], args: argparse.Namespace) -> None:
    group = runner_group(plugin, devices, args)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(group.run)
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _socket_names(args: argparse.Namespace) -> list[str]:
    """The sockets' paths, or for inherited ones ``fd:N`` (status, logs, port names)."""
    return list(args.socket or [f"fd:{n}" for n in args.fd])


def cmd_run(args: argparse.Namespace) -> int:
    plugin: DevicePlugin[Any] = args.plugin
    if args.print_capabilities:
        from .backend_program import capabilities

        print(json.dumps(capabilities(plugin)))
        return 0
    # vhost-user.rst: --socket-path and --fd are incompatible.
    if bool(args.socket) == bool(args.fd):
        raise UserError("give --socket PATH (--socket-path) or --fd N" + (", not both" if args.socket else ""))
    if args.fd and args.client:
        raise UserError("--fd is a listening socket: not with --client")
    devices = create_devices(plugin, args, _socket_names(args))
    try:
        trio.run(_serve, plugin, devices, args)
    except (OSError, BaseExceptionGroup) as exc:
        # A socket that cannot be listened on (trio may wrap it in groups).
        found = _oserror(exc)
        if found is None:
            raise
        raise UserError(found.strerror or str(found)) from None
    finally:
        plugin.close(devices)
    return 0


def _oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _oserror(inner)
            if found is not None:
                return found
    return None


def create_devices(plugin: DevicePlugin[Any], args: argparse.Namespace, sockets: Sequence[str]) -> list[Any]:
    """The plugin's devices for ``sockets``; UserError for options that do
    not fit or host resources it cannot have."""
    try:
        return plugin.create(args, sockets)
    except DeviceError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        what = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise UserError(f"{plugin.name}: {what}") from None


# ------------------------------------------------------------------ devices

def describe(plugin: DevicePlugin[Any]) -> dict[str, Any]:
    parser = Parser()
    plugin.add_arguments(parser)
    devices = plugin.create(parser.parse_args([]), ["-"])
    try:
        dev = devices[0]
        return {
            "name": plugin.name,
            "virtio_id": dev.virtio_id,
            "description": plugin.description,
            "features": [{"bit": f.bit, "name": f.name, "queues": list(f.queues)} for f in dev.features],
            "transport_features": [f.name for f in dev.transport_features],
            "queues": dev.queue_layout(None).as_list(),
            "config": [{"name": c.name, "offset": c.offset, "size": c.size, "feature": c.feature,
                        "writable": c.writable} for c in dev.existing_fields()],
            "commands": [c.describe() for c in plugin.commands],
        }
    finally:
        plugin.close(devices)


def cmd_devices(args: argparse.Namespace) -> int:
    infos = [describe(p) for p in registry.load_all().values()]
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
        if info["commands"]:
            print("  control commands (vuser ctl PATH ...):")
            for c in info["commands"]:
                print(f"    {c['usage']:<20} {c['help']}")
    return 0


# ------------------------------------------------------------------ qemu-args

def qemu_args(plugin: DevicePlugin[Any], device: Any, socket_path: str, *, qemu_version: str = "11",
              memory: str | None = "512M", chardev_id: str = "vu0", reconnect: int | None = None,
              packed: bool = False, qemu_server: bool = False) -> list[str]:
    """QEMU arguments attaching ``device``; ``memory=None`` leaves out the
    shared memory backend (when the caller already gives one: a vhost-user
    back-end needs the guest RAM shared, e.g. memory-backend-memfd,share=on).
    ``reconnect``: seconds; QEMU 10.2 and later take ``reconnect-ms``.
    ``packed``: the virtio device property ``packed=on`` (QEMU 4.2+), which
    lets the guest negotiate VIRTIO_F_RING_PACKED (QEMU's generic device
    passes the back-end's offer through regardless).  ``qemu_server``: QEMU
    listens on the socket, vuser runs with ``--client``."""
    chardev = chardev_spec(socket_path, chardev_id, qemu_version=qemu_version, reconnect=reconnect,
                           server=qemu_server)
    mem_args = [] if memory is None else [
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", "q35,memory-backend=mem",
        "-m", memory,
    ]
    device_args = plugin.qemu_args(device, chardev_id, qemu_version)
    if packed:
        device_args = with_device_property(device_args, "packed=on")
    return [*mem_args, "-chardev", chardev, *device_args]


def _add_qemu_args(sub: Any, parent: Parser, plugins: dict[str, DevicePlugin[Any]]) -> None:
    qa = sub.add_parser("qemu-args", parents=[parent], help="QEMU arguments that attach a device",
                        description="Print the QEMU arguments that attach DEVICE served on --socket.")
    devices = qa.add_subparsers(dest="device", metavar="DEVICE", required=True, parser_class=Parser)
    for name, plugin in plugins.items():
        p = devices.add_parser(name, parents=[parent], help=plugin.description)
        p.add_argument("--socket", required=True, metavar="PATH", help="the device's vhost-user socket")
        p.add_argument("--qemu-version", default="11", help="QEMU major.minor to target (7.2 or 11)")
        p.add_argument("--memory", default="512M", help="guest RAM (shared memfd backend)")
        p.add_argument("--chardev-id", default="vu0")
        p.add_argument("--reconnect", type=int, metavar="SECONDS",
                       help="QEMU reconnects to a restarted back-end (reconnect= / reconnect-ms=)")
        p.add_argument("--no-memory", action="store_true",
                       help="leave out the shared memory backend (the caller gives one, once per guest)")
        p.add_argument("--packed", action="store_true",
                       help="packed=on: let the guest use packed virtqueues (VIRTIO_F_RING_PACKED)")
        p.add_argument("--qemu-server", action="store_true",
                       help="QEMU listens on the socket (libvirt mode='server'); run vuser with --client")
        p.add_argument("--libvirt", action="store_true",
                       help="print the libvirt domain XML that attaches the device instead")
        plugin.add_arguments(p)
        p.set_defaults(func=cmd_qemu_args, plugin=plugin)


def cmd_qemu_args(args: argparse.Namespace) -> int:
    plugin: DevicePlugin[Any] = args.plugin
    devices = create_devices(plugin, args, [args.socket])
    try:
        if args.libvirt:
            print(plugin.libvirt_xml(devices[0], args.socket, qemu_version=args.qemu_version,
                                     chardev=args.chardev_id, reconnect=args.reconnect,
                                     qemu_server=args.qemu_server))
            return 0
        print(shlex.join(qemu_args(plugin, devices[0], args.socket, qemu_version=args.qemu_version,
                                   memory=None if args.no_memory else args.memory,
                                   chardev_id=args.chardev_id, reconnect=args.reconnect,
                                   packed=args.packed, qemu_server=args.qemu_server)))
    finally:
        plugin.close(devices)
    return 0


# ------------------------------------------------------------------ ctl

def cmd_ctl(args: argparse.Namespace) -> int:
    from .control import ControlError, call
    from .recorder import absolute_record_args

    words = list(args.args)
    try:
        if args.command == "stats" and "--watch" in words:
            return _watch(args.path, words)
        if args.command == "record":  # FILE is opened by vuser, whose cwd is not ours
            words = absolute_record_args(words, os.getcwd())
        result = trio.run(call, args.path, args.command, words)
    except ControlError as exc:
        print(f"vuser ctl: {exc}", file=sys.stderr)
        return USAGE_ERROR if exc.usage else 1
    except OSError as exc:
        raise UserError(f"{args.path}: {exc.strerror or exc}") from None
    except trio.TooSlowError:
        print(f"vuser ctl: {args.path}: no answer in time", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _watch(path: str, words: list[str]) -> int:
    """``stats --watch [--interval S] [--count N]``: the rows ``record``
    writes, printed live (one JSON line each) until Ctrl-C or N rows."""
    from .recorder import DEFAULT_INTERVAL, RecordUsageError, parse_interval

    parser = Parser(prog="vuser ctl PATH stats", add_help=False)
    parser.add_argument("--watch", action="store_true", required=True)
    parser.add_argument("--interval", default=str(DEFAULT_INTERVAL))
    parser.add_argument("--count", type=int, help="stop after N rows")
    opts = parser.parse_args(words)
    try:
        interval = parse_interval(opts.interval)
    except RecordUsageError as exc:
        raise UserError(str(exc)) from None
    try:
        trio.run(_watch_rows, path, interval, opts.count)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # | head
        sys.stderr.close()
    return 0


async def _watch_rows(path: str, interval: float, count: int | None) -> None:
    from .control import call

    cursor: Any = None
    start = trio.current_time()
    rows = 0
    while count is None or rows < count:
        row = await call(path, "sample", [] if cursor is None else [str(cursor)])
        cursor = row.get("cursor", cursor)
        print(json.dumps(row, separators=(",", ":")), flush=True)
        rows += 1
        await trio.sleep_until(start + rows * interval)


# ------------------------------------------------------------------ plot

def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import PlotError, picture_facts, plot_file

    try:
        kind = plot_file(args.file, args.output, title=args.title)
        facts = picture_facts(args.output)
    except PlotError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"{exc.filename or args.file}: {exc.strerror or exc}") from None
    print(f"{args.output}: {kind} time series from {args.file} ({facts['width']}x{facts['height']}, "
          f"{facts['bytes'] // 1024} KiB)")
    return 0


# ------------------------------------------------------------------ descriptors

def cmd_descriptors(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .backend_program import descriptors, install

    bindir = None if args.bindir is None else Path(args.bindir)
    if args.install is None:
        print(json.dumps(descriptors(bindir), indent=2))
        return 0
    try:
        written = install(Path(args.install), bindir)
    except OSError as exc:
        raise UserError(f"{exc.filename or args.install}: {exc.strerror or exc}") from None
    for path in written:
        print(path)
    return 0


# ------------------------------------------------------------------ probe

def cmd_probe(args: argparse.Namespace) -> int:
    from .probe.command import ProbeUsageError, main as probe_main

    if "log_level" not in vars(args):  # the table is the output; the harness's INFO lines are noise here
        logging.getLogger("vuser").setLevel(logging.ERROR)
    try:
        return probe_main(args)
    except ProbeUsageError as exc:
        raise UserError(str(exc)) from None


# ------------------------------------------------------------------ provision

def cmd_provision(args: argparse.Namespace) -> int:
    return provision_cli.run(args)


# ------------------------------------------------------------------ main

def build_parser() -> Parser:
    parent = _logging_parent()
    parser = Parser(prog="vuser", parents=[parent],
                    description="virtio devices served from Python over vhost-user sockets")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    plugins = registry.load_all()
    _add_run(sub, parent, plugins)
    dev = sub.add_parser("devices", parents=[parent], help="devices, their features, queue layouts, commands")
    dev.add_argument("--json", action="store_true")
    dev.set_defaults(func=cmd_devices)
    _add_qemu_args(sub, parent, plugins)
    ctl = sub.add_parser("ctl", parents=[parent], help="talk to a running device's control socket")
    ctl.add_argument("path", help="control socket of a running 'vuser run ... --control PATH'")
    ctl.add_argument("command", help="status, commands, or a device command (see vuser devices)")
    ctl.add_argument("args", nargs=argparse.REMAINDER,
                     help="the command's arguments (all the rest: record FILE --interval S, stats --watch)")
    ctl.set_defaults(func=cmd_ctl)
    plot = sub.add_parser("plot", parents=[parent], help="draw a recorded time series (needs vuser[plot])",
                          description="Draw a time series recorded with 'vuser ctl PATH record FILE': "
                                      "memory, targets and policy decisions for a balloon; rates and drops "
                                      "per port for net.")
    plot.add_argument("file", help="JSON lines written by 'vuser ctl PATH record'")
    plot.add_argument("-o", "--output", required=True, metavar="PNG", help="the picture to write")
    plot.add_argument("--title", help="title above the plot (default: the device and the file name)")
    plot.set_defaults(func=cmd_plot)
    desc = sub.add_parser("descriptors", parents=[parent],
                          help="vhost-user JSON descriptors for QEMU and libvirt (vhost-user.json)",
                          description="Print the vhost-user back-end descriptors of the installed "
                                      "vuser-DEVICE programs, or install them into DIR (e.g. "
                                      "/usr/share/qemu/vhost-user, /etc/qemu/vhost-user, "
                                      "~/.config/qemu/vhost-user).")
    desc.add_argument("--install", metavar="DIR", help="write 50-vuser-DEVICE.json files into DIR")
    desc.add_argument("--bindir", metavar="DIR",
                      help="where the vuser-DEVICE programs are (default: this installation's scripts)")
    desc.set_defaults(func=cmd_descriptors)
    probe = sub.add_parser("probe", parents=[parent], help="check a vhost-user back-end against the spec",
                           description="Connect to a vhost-user back-end (any implementation) as a "
                                       "front-end and run conformance checks for its device type.")
    add_probe_arguments(probe)
    probe.set_defaults(func=cmd_probe)
    prov = sub.add_parser("provision", parents=[parent], description=provision_cli.DESCRIPTION,
                          help="install and cache what real-guest tests need (QEMU, kernels, initramfs)")
    provision_cli.add_arguments(prov)
    prov.set_defaults(func=cmd_provision)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["run"] and "--print-capabilities" in words[2:]:
        words = words[:2] + ["--print-capabilities"]   # vhost-user.rst: other options are ignored
    args = build_parser().parse_args(words)
    _setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"vuser {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR


def backend_main() -> int:
    """``vuser-DEVICE``: ``vuser run DEVICE`` as a back-end program of its
    own, the binary its vhost-user descriptor names (vuser.backend_program)."""
    from .backend_program import device_of

    device = device_of(sys.argv[0])
    if device is None:
        print(f"{sys.argv[0]}: not a vuser-DEVICE program", file=sys.stderr)
        return USAGE_ERROR
    return main(["run", device, *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
