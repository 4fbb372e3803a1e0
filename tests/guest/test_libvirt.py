"""vuser under libvirt: the test starts libvirt's daemon from Debian's
packages (a private session daemon, vuser.testing.libvirt), defines a TCG
domain whose network card is the XML ``vuser qemu-args net --libvirt``
prints, boots it, and pings a second guest (QEMU started by the test)
through one ``vuser run net`` process.

libvirt's QEMU runs as the session user (``nobody``), so the interface is
in libvirt's server mode (QEMU listens) and vuser connects as a client
that accepts that uid (``--client --allow-peer-uid``); the second guest's
QEMU listens too.  QEMU 7.2 (the host's) with bookworm's kernel: the
fragment then carries the ``<qemu:override>`` with vectors=0.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import trio

from vuser.plugin import LIBVIRT_QEMU_NS
from vuser.testing import libvirt
from vuser.testing.channel import CommandChannel
from vuser.testing.guest import boot_guest, kernel_info, qemu_info
from vuser.testing.process import VuserProcess

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(not libvirt.available(), reason="needs root and libvirtd, virsh "
                                 "(libvirt-daemon, libvirt-clients; scripts/provision installs them)")]

QEMU, KERNEL = "7.2", "bookworm"
DOMAIN = "vuser-net"


def qemu_args_output(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "vuser.cli", "qemu-args", "net", *args], capture_output=True,
                         text=True, timeout=60, check=True)
    return run.stdout


def fragments(text: str) -> list[ET.Element]:
    return list(ET.fromstring(f"<fragments xmlns:qemu='{LIBVIRT_QEMU_NS}'>{text}</fragments>"))


async def test_libvirt_domain_pings_a_second_guest_through_vuser() -> None:
    with trio.fail_after(600):
        async with libvirt.libvirt_session() as lv:
            socks = [str(lv.dir / "vnet0.sock"), str(lv.dir / "vnet1.sock")]
            pieces = fragments(qemu_args_output("--socket", socks[0], "--libvirt", "--qemu-server",
                                                "--qemu-version", QEMU, "--queue-pairs", "1"))
            devices = [e for e in pieces if e.tag == "interface"]
            extra = [e for e in pieces if e.tag != "interface"]
            assert len(devices) == 1 and [e.tag for e in extra] == [f"{{{LIBVIRT_QEMU_NS}}}override"]
            xml = libvirt.guest_domain(DOMAIN, kernel=lv.copy_kernel(kernel_info(KERNEL)),
                                       emulator=qemu_info(QEMU)["binary"], console_log=str(lv.dir / "console.log"),
                                       cmd_socket=str(lv.dir / "cmd.sock"), devices=devices, domain_extra=extra)
            second = shlex.split(qemu_args_output("--socket", socks[1], "--no-memory", "--qemu-server",
                                                  "--qemu-version", QEMU, "--queue-pairs", "1",
                                                  "--chardev-id", "vu1"))
            async with VuserProcess("net", socks, client=True,
                                    args=["--queue-pairs", "1", "--allow-peer-uid", str(lv.user.pw_uid)]):
                async with lv.guest_channel() as pending:
                    await lv.virsh("create", lv.write(f"{DOMAIN}.xml", xml))
                    first = await pending.accept(DOMAIN)
                    async with boot_guest(QEMU, KERNEL, memory_mb=256, extra_args=second) as other:
                        await run(first, "ip addr add 10.14.0.1/24 dev eth0 && ip link set eth0 up")
                        await other.check("ip addr add 10.14.0.2/24 dev eth0 && ip link set eth0 up")
                        out = await run(first, "i=0; until ping -c 1 -W 1 10.14.0.2 >/dev/null; do "
                                               "i=$((i+1)); [ $i -ge 20 ] && exit 1; done; "
                                               "ping -c 3 -i 0.3 -W 2 10.14.0.2", timeout=60)
                        assert "3 packets transmitted, 3 packets received" in out, out
                    assert DOMAIN in await lv.virsh("list", "--name")
                    await lv.virsh("destroy", DOMAIN)


async def run(channel: CommandChannel, command: str, timeout: float = 30) -> str:
    """A command in the libvirt guest; its output (stdout and stderr),
    failing the test on a non-zero status."""
    result = await channel.run(command, timeout=timeout, input=b"", merge_stderr=True)
    assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}"
    return result.stdout
