"""libvirt's own daemon, started by a test in a private directory, and the
test guest as a libvirt domain.

::

    async with libvirt_session() as lv:          # libvirtd, session mode
        xml = guest_domain("g1", kernel=lv.copy_kernel(kinfo), emulator=..., devices=[...])
        async with lv.guest_channel() as pending:   # listening before the domain starts
            await lv.virsh("create", lv.write("g1.xml", xml))
            channel = await pending.accept("g1")      # the guest's command server
            await channel.run("uname -r", timeout=30, input=b"", merge_stderr=True)

The daemon is Debian's ``libvirtd`` (package libvirt-daemon, with its QEMU
driver) in *session* mode: it runs as an unprivileged user (``nobody``)
with HOME and the XDG directories inside a fresh directory, so its
sockets, configuration, logs and domains are all there and nothing of the
host's libvirt (system daemon, /etc/libvirt, /var/lib/libvirt) is touched.
Its QEMU runs as that user too, so everything a domain uses (kernel,
initramfs, sockets, the directory) is made reachable for it; a vhost-user
back-end run by root must accept that uid (``vuser run --client
--allow-peer-uid UID`` with libvirt's ``mode='server'``).

Resource handling: leaving ``libvirt_session`` destroys every domain it
runs, stops the daemon (SIGTERM, then SIGKILL) and removes the directory.
Error handling: ``LibvirtError`` with the daemon's log tail when it does
not come up or a virsh command fails; every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import trio

from vuser.testing.channel import CommandChannel
from vuser.testing.child import read_text, stop_group
from vuser.testing.errors import tail

__all__ = ["LIBVIRTD", "ChannelListener", "LibvirtError", "LibvirtSession", "available", "guest_domain",
           "libvirt_session"]

LIBVIRTD = "libvirtd"
VIRSH = "virsh"
SESSION_USER = "nobody"
URI = "qemu:///session"
START_TIMEOUT = 30.0
STOP_STEPS = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
# The daemon's QEMU settings: QEMU's output to a file in the log directory
# (no virtlogd to start).
QEMU_CONF = 'stdio_handler = "file"\n'


class LibvirtError(Exception):
    """libvirtd did not come up, or virsh failed."""


def available() -> bool:
    return bool(shutil.which(LIBVIRTD) and shutil.which(VIRSH)) and os.geteuid() == 0


@dataclass
class LibvirtSession:
    """A running session daemon; made by :func:`libvirt_session`."""

    dir: Path
    user: pwd.struct_passwd
    env: Mapping[str, str]
    log: Path

    def write(self, name: str, text: str) -> str:
        """A file in the session directory, readable by the daemon's user."""
        path = self.dir / name
        path.write_text(text)
        self.give(path)
        return str(path)

    def give(self, path: Path) -> None:
        os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def copy_kernel(self, kernel: Mapping[str, Any]) -> dict[str, Any]:
        """A manifest kernel entry with its vmlinuz and initramfs copied into
        the session directory (the provisioning cache may be private)."""
        out = dict(kernel)
        for key in ("vmlinuz", "initramfs"):
            copy = self.dir / Path(kernel[key]).name
            shutil.copyfile(kernel[key], copy)
            self.give(copy)
            out[key] = str(copy)
        return out

    async def virsh(self, *args: str, timeout: float = 120.0) -> str:
        """``virsh -c qemu:///session ARGS`` as the daemon's user; its stdout."""
        with trio.fail_after(timeout):
            run = await trio.run_process([VIRSH, "-c", URI, *args], capture_stdout=True, capture_stderr=True,
                                         check=False, env=dict(self.env), user=self.user.pw_uid,
                                         group=self.user.pw_gid, extra_groups=[])
        if run.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {run.stderr.decode(errors='replace').strip()}\n"
                               f"--- libvirtd log (tail) ---\n{tail(read_text(self.log), 20)}")
        return bytes(run.stdout).decode(errors="replace")

    def qemu_log(self, domain: str) -> str:
        return read_text(self.dir / "cache" / "libvirt" / "qemu" / "log" / f"{domain}.log")

    @asynccontextmanager
    async def guest_channel(self, name: str = "cmd.sock") -> AsyncIterator[ChannelListener]:
        """Listen on ``name`` in the session directory for a domain's
        command server (its ttyS1, a ``<serial type='unix'>`` connecting
        there: the domain must start after this is entered)."""
        path = self.dir / name
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        pending = ChannelListener(listener, self)
        try:
            await listener.bind(str(path))
            self.give(path)          # the domain's QEMU connects as the daemon's user
            listener.listen(1)
            yield pending
        finally:
            if pending.channel is not None:
                await pending.channel.aclose()
            listener.close()


@dataclass
class ChannelListener:
    """A domain's command channel, listening; ``accept`` waits for the
    guest's command server."""

    listener: trio.socket.SocketType
    session: LibvirtSession
    channel: CommandChannel | None = None

    async def accept(self, domain: str, timeout: float = 120.0) -> CommandChannel:
        async def guard(fn: Any, what: str) -> Any:
            return await fn()

        def diagnostics() -> str:
            return (f"--- {domain}: QEMU log (tail) ---\n{tail(self.session.qemu_log(domain), 20)}\n"
                    f"--- console (tail) ---\n{tail(read_text(self.session.dir / 'console.log'), 20)}")

        with trio.fail_after(timeout):
            sock, _ = await self.listener.accept()
            self.channel = CommandChannel(trio.SocketStream(sock), guard=guard, diagnostics=diagnostics)
            await self.channel.wait_ready()
        return self.channel


@asynccontextmanager
async def libvirt_session(user: str = SESSION_USER) -> AsyncIterator[LibvirtSession]:
    """Start libvirtd in session mode as ``user`` in a fresh directory; see
    the module docstring."""
    account = pwd.getpwnam(user)
    base = Path(tempfile.mkdtemp(prefix="vuser-libvirt-"))
    base.chmod(0o755)        # its QEMU (as ``user``) reaches files here
    dirs = {name: base / name for name in ("home", "run", "config", "cache")}
    for d in dirs.values():
        d.mkdir(mode=0o700)
    (dirs["config"] / "libvirt").mkdir()
    (dirs["config"] / "libvirt" / "qemu.conf").write_text(QEMU_CONF)
    for path in [base, *base.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(dirs["home"]),
           "XDG_RUNTIME_DIR": str(dirs["run"]), "XDG_CONFIG_HOME": str(dirs["config"]),
           "XDG_CACHE_HOME": str(dirs["cache"])}
    session = LibvirtSession(base, account, env, base / "libvirtd.log")
    log = open(session.log, "wb")
    proc = None
    try:
        proc = await trio.lowlevel.open_process(
            [LIBVIRTD], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            user=account.pw_uid, group=account.pw_gid, extra_groups=[], start_new_session=True)
        sock = dirs["run"] / "libvirt" / "libvirt-sock"
        with trio.move_on_after(START_TIMEOUT):
            while not sock.exists() and proc.poll() is None:
                await trio.sleep(0.05)
        if not sock.exists():
            raise LibvirtError(f"libvirtd did not listen on {sock}:\n{tail(read_text(session.log), 20)}")
        yield session
    finally:
        with trio.CancelScope(shield=True):
            if proc is not None and proc.poll() is None:
                with trio.move_on_after(60):
                    for name in (await session.virsh("list", "--name")).split():
                        await session.virsh("destroy", name)
            if proc is not None:
                await stop_group(proc, STOP_STEPS)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def guest_domain(name: str, *, kernel: Mapping[str, Any], emulator: str, console_log: str, cmd_socket: str,
                memory_mb: int = 256, devices: Sequence[ET.Element] = (),
                domain_extra: Sequence[ET.Element] = ()) -> str:
    """The test guest (vuser.testing.qemu's, as a libvirt domain): TCG q35,
    RAM in a shared memfd (vhost-user back-ends map it), the kernel and
    initramfs given, ttyS0 to ``console_log``, ttyS1 the command channel
    (QEMU connects to ``cmd_socket``); ``devices`` go in ``<devices>``,
    ``domain_extra`` in ``<domain>`` (``<qemu:override>``)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(dom, "vcpu").text = "1"
    backing = ET.SubElement(dom, "memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(kernel["vmlinuz"])
    ET.SubElement(os_, "initrd").text = str(kernel["initramfs"])
    ET.SubElement(os_, "cmdline").text = "console=ttyS0 panic=-1 quiet"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devs = ET.SubElement(dom, "devices")
    ET.SubElement(devs, "emulator").text = emulator
    console = ET.SubElement(devs, "serial", type="file")
    ET.SubElement(console, "source", path=console_log)
    ET.SubElement(console, "target", port="0")
    channel = ET.SubElement(devs, "serial", type="unix")
    ET.SubElement(channel, "source", mode="connect", path=cmd_socket)
    ET.SubElement(channel, "target", port="1")
    ET.SubElement(devs, "memballoon", model="none")
    devs.extend(devices)
    dom.extend(domain_extra)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
