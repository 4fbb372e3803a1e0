"""Device plugins: what a device *type* brings besides the device itself.

A plugin is the target of a ``vuser.devices`` entry point (vuser's own
devices register the same way a third-party package does).  It owns:

* the command-line options of ``vuser run DEVICE`` / ``vuser qemu-args
  DEVICE`` and how they become device instances, one per socket
  (``create``; net makes several ports of one switch);
* the QEMU arguments that attach a device (``qemu_args``), and the libvirt
  domain XML that does (``libvirt_xml``);
* its type for QEMU's and libvirt's discovery of back-end programs
  (``backend_type``, vhost-user.json's VHostUserBackendType);
* background work shared by every instance (``background``);
* control commands (``commands``): typed callables that the control server
  runs and ``vuser devices`` lists;
* the rows of a recorded time series (``sample``).

A device with nothing special needs only ``DevicePlugin(MyDevice)``.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from .device import POLICIES, Device, DeviceError
from .errors import UsageError

D = TypeVar("D", bound=Device)

BackgroundTask = Callable[..., Awaitable[None]]
"""``async fn(*, task_status=trio.TASK_STATUS_IGNORED)``: started once per
process, for as long as the device serves."""


class CommandError(UsageError):
    """A control command given the wrong arguments (the user's error)."""


@dataclass(frozen=True)
class Param:
    """One positional argument of a control command."""

    name: str
    parse: Callable[[str], Any] = str
    help: str = ""
    optional: bool = False  # may be left out (only at the end of a command's params)
    variadic: bool = False  # takes every argument left, one or more (only the last param)

    @property
    def usage(self) -> str:
        name = self.name.upper() + ("..." if self.variadic else "")
        return f"[{name}]" if self.optional else name


@dataclass(frozen=True)
class Command(Generic[D]):
    """A control command: ``run(devices, *values)`` gets the process's
    device instances (socket order) and the parsed arguments and returns
    something JSON can encode."""

    name: str
    help: str
    run: Callable[..., Any]
    params: tuple[Param, ...] = ()

    @property
    def usage(self) -> str:
        return " ".join([self.name, *(p.usage for p in self.params)])

    def __call__(self, devices: Sequence[D], args: Sequence[str]) -> Any:
        required = sum(not p.optional for p in self.params)
        variadic = bool(self.params) and self.params[-1].variadic
        most = len(args) if variadic else len(self.params)
        if not required <= len(args) <= most:
            counts = (f"{required} or more" if variadic else f"{required}" if required == len(self.params)
                      else f"{required} to {len(self.params)}")
            raise CommandError(f"{self.name} takes {counts} argument(s): {self.usage}")
        values: list[Any] = []
        for i, p in enumerate(self.params):
            texts = args[i:] if p.variadic else args[i:i + 1]
            try:
                parsed = [p.parse(t) for t in texts]
            except (ValueError, DeviceError) as exc:
                raise CommandError(f"{self.name}: bad {p.name} {' '.join(texts)!r}: {exc}") from None
            if p.variadic:
                values.append(parsed)
            elif parsed:
                values.append(parsed[0])
        return self.run(devices, *values)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "usage": self.usage, "help": self.help,
                "params": [{"name": p.name, "help": p.help, "optional": p.optional, "variadic": p.variadic}
                           for p in self.params]}


def qemu_escape(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled
    (QEMU's QemuOpts syntax; ``path=/a,,b`` is the path ``/a,b``)."""
    return value.replace(",", ",,")


def chardev_spec(socket_path: str, chardev_id: str = "vu0", *, qemu_version: str = "11",
                 reconnect: int | None = None, server: bool = False) -> str:
    """QEMU's ``-chardev`` value for a vhost-user socket.  ``server``: QEMU
    listens (and waits for the back-end, run with ``--client``);
    ``reconnect``: seconds between QEMU's attempts to reach a restarted
    back-end (client mode; QEMU 10.2 and later take ``reconnect-ms``)."""
    spec = f"socket,id={chardev_id},path={qemu_escape(socket_path)}"
    if server:
        return spec + ",server=on"
    if reconnect is not None:
        major = int(qemu_version.split(".")[0])
        spec += f",reconnect={reconnect}" if major < 10 else f",reconnect-ms={reconnect * 1000}"
    return spec


# libvirt: the namespace of <qemu:commandline> and <qemu:override>.
LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", LIBVIRT_QEMU_NS)
SHARED_MEMORY_NOTE = ("<!-- vhost-user maps the guest's RAM: the domain needs "
                      "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> -->")


def xml_text(*elements: ET.Element, notes: tuple[str, ...] = ()) -> str:
    """Domain XML fragments, indented, after ``notes`` (XML comments)."""
    for e in elements:
        ET.indent(e)
    return "\n".join([*notes, *(ET.tostring(e, encoding="unicode") for e in elements)])


def with_device_property(qemu_args: list[str], prop: str) -> list[str]:
    """``qemu_args`` with ``,PROP`` added to every ``-device`` (e.g.
    ``packed=on``, a property of every virtio device)."""
    return [arg + "," + prop if before == "-device" else arg for before, arg in zip(["", *qemu_args], qemu_args)]


@dataclass
class DevicePlugin(Generic[D]):
    """The device type ``device`` as the CLI, QEMU and the control socket
    see it; subclass to add options, commands or several ports."""

    device: type[D]
    commands: tuple[Command[D], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def description(self) -> str:
        return self.device.description or self.device.name

    # ----------------------------------------------------------- command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``vuser run NAME`` and ``vuser qemu-args NAME``
        (override and call super)."""
        parser.add_argument("--without", action="append", default=[], metavar="FEATURE",
                            help="do not offer FEATURE (spec name, with or without its prefix)")
        parser.add_argument("--queue-policy", choices=POLICIES, default="offered",
                            help="how queue indexes follow features (default: offered)")

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Device constructor arguments from the parsed options (override)."""
        return {}

    def create(self, args: argparse.Namespace, sockets: Sequence[str]) -> list[D]:
        """One device instance per socket (socket order).  Raises
        DeviceError for options that do not fit."""
        if len(sockets) != 1:
            raise DeviceError(f"{self.name} serves one socket; --socket given {len(sockets)} times")
        return [self.device(without=args.without, queue_policy=args.queue_policy, **self.options(args))]

    def close(self, devices: Sequence[D]) -> None:
        """Release what ``create`` acquired (files, taps)."""

    def background(self, devices: Sequence[D]) -> list[BackgroundTask]:
        """Work shared by every instance, run once per process."""
        return []

    # ----------------------------------------------------------- QEMU

    def qemu_args(self, device: D, chardev: str, qemu_version: str) -> list[str]:
        """QEMU arguments after ``-chardev socket,id=CHARDEV,...`` that put
        the device in the guest.  Default: QEMU 11's generic device."""
        return ["-device", f"vhost-user-test-device-pci,chardev={chardev},virtio-id={device.virtio_id},"
                           f"num_vqs={device.max_queues},config_size={device.config_size}"]

    def libvirt_xml(self, device: D, socket_path: str, *, qemu_version: str = "11", chardev: str = "vu0",
                    reconnect: int | None = None, qemu_server: bool = False) -> str:
        """The libvirt domain XML that attaches the device.  Default: libvirt
        has no element for it, so ``<qemu:commandline>`` with the QEMU
        arguments (the domain declares the ``qemu`` namespace)."""
        spec = chardev_spec(socket_path, chardev, qemu_version=qemu_version, reconnect=reconnect,
                            server=qemu_server)
        line = ET.Element(f"{{{LIBVIRT_QEMU_NS}}}commandline")
        for arg in ["-chardev", spec, *self.qemu_args(device, chardev, qemu_version)]:
            ET.SubElement(line, f"{{{LIBVIRT_QEMU_NS}}}arg", value=arg)
        return xml_text(line, notes=(SHARED_MEMORY_NOTE,))

    # ----------------------------------------------------------- back-end program

    @property
    def backend_type(self) -> str:
        """The device's VHostUserBackendType (vhost-user.json): what
        ``--print-capabilities`` and the installed descriptor say."""
        return self.name

    # ----------------------------------------------------------- control

    def sample(self, devices: Sequence[D], since: int | None) -> dict[str, Any]:
        """One row of the time series ``vuser ctl PATH record`` writes and
        ``stats --watch`` prints (override: the figures worth plotting).
        ``since``: the ``cursor`` of the previous row, if the row had one,
        so a row can carry what happened since then (balloon decisions)."""
        return {"devices": [d.status() for d in devices]}

    def command(self, name: str) -> Command[D] | None:
        for c in self.commands:
            if c.name == name:
                return c
        return None

    def default_device(self) -> D:
        """An instance with default options (for ``vuser devices``)."""
        parser = argparse.ArgumentParser()
        self.add_arguments(parser)
        return self.create(parser.parse_args([]), ["-"])[0]
