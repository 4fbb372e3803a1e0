"""vuser as a vhost-user back-end program (vhost-user.rst "Backend program
conventions"): ``vuser-DEVICE`` programs taking ``--socket-path``, ``--fd``
(an inherited listening socket) and ``--print-capabilities``; the JSON
descriptors (vhost-user.json ``VhostUserBackend``) installed where the
caller says; the libvirt domain XML that attaches a device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from vuser.backend_program import program, scripts_dir
from vuser.cli import main
from vuser.frontend import Driver, Frontend
from vuser.plugin import LIBVIRT_QEMU_NS

DEVICES = ("rng", "balloon", "net")
# vhost-user.json: VHostUserBackendType, and the members of VhostUserBackend.
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng", "rpmsg",
                 "rproc-serial", "scsi", "vsock", "fs"}
DESCRIPTOR_KEYS = {"description", "type", "binary", "tags"}


def backend(device: str) -> str:
    path = scripts_dir() / program(device)
    if not path.is_file():
        pytest.skip(f"{path} not installed (pip install -e .)")
    return str(path)


@pytest.mark.parametrize("device", DEVICES)
def test_print_capabilities_ignores_other_options(device: str) -> None:
    run = subprocess.run([backend(device), "--print-capabilities", "--no-such-option", "x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"type": device}


def test_socket_path_and_fd_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "rng", "--socket-path", "/nonexistent/a", "--fd", "3"]) == 2
    assert main(["run", "rng"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["vuser run: give --socket PATH (--socket-path) or --fd N, not both",
                   "vuser run: give --socket PATH (--socket-path) or --fd N"]


async def served_once(path: str) -> None:
    """A probe of the rng through the harness and one request served."""
    async with Frontend.connect(path, num_queues=1, connect_timeout=30) as fe:
        drv = Driver(fe)
        await drv.probe()
        q = drv.queue(0)
        q.add_inbuf(32)
        q.kick()
        (elem,) = await q.wait_used(1, timeout=10)
        assert elem.length == 32


async def run_backend(argv: list[str], path: str, **popen: object) -> None:
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, **popen)  # type: ignore[arg-type]
    try:
        with trio.fail_after(60):
            await served_once(path)
    finally:
        proc.terminate()
        with trio.fail_after(15):
            assert await proc.wait() == 0


async def test_socket_path_is_served(tmp_path: Path) -> None:
    path = str(tmp_path / "rng.sock")
    await run_backend([backend("rng"), "--socket-path", path], path)


async def test_inherited_listening_socket_is_served(tmp_path: Path) -> None:
    """--fd N, as systemd socket activation hands it: the socket exists
    (made by someone else) before the back-end starts."""
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        fd = listener.fileno()
        await run_backend([backend("rng"), "--fd", str(fd)], path, pass_fds=[fd])
    finally:
        listener.close()


def test_inherited_fd_must_be_a_listening_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        run = subprocess.run([backend("rng"), "--fd", str(fd)], pass_fds=[fd], capture_output=True, text=True,
                             timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"vuser run: fd {fd} is not a listening socket\n"


def test_descriptors_install_into_a_directory(tmp_path: Path) -> None:
    dest = tmp_path / "qemu" / "vhost-user"
    run = subprocess.run([sys.executable, "-m", "vuser.cli", "descriptors", "--install", str(dest)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    written = sorted(Path(line).name for line in run.stdout.split())
    assert written == sorted(f"50-vuser-{d}.json" for d in DEVICES)
    for name in written:
        desc = json.loads((dest / name).read_text())
        assert set(desc) == DESCRIPTOR_KEYS and desc["type"] in BACKEND_TYPES
        binary = Path(desc["binary"])
        assert binary.is_absolute() and os.access(binary, os.X_OK)
        caps = subprocess.run([str(binary), "--print-capabilities"], capture_output=True, text=True, timeout=60)
        assert json.loads(caps.stdout) == {"type": desc["type"]}


# ---------------------------------------------------------------- libvirt XML


def libvirt(*args: str, capsys: pytest.CaptureFixture[str]) -> list[ET.Element]:
    assert main(["qemu-args", *args, "--libvirt"]) == 0
    text = capsys.readouterr().out
    assert "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" in text
    return list(ET.fromstring(f"<fragments>{text}</fragments>"))


def test_libvirt_net_interface_client_mode(capsys: pytest.CaptureFixture[str]) -> None:
    (iface,) = libvirt("net", "--socket", "/run/a,b.sock", "--queue-pairs", "1", "--mtu", "9000",
                       "--reconnect", "3", capsys=capsys)
    assert iface.tag == "interface" and iface.get("type") == "vhostuser"
    source = iface.find("source")
    assert source is not None and source.attrib == {"type": "unix", "path": "/run/a,b.sock", "mode": "client"}
    assert source.find("reconnect").attrib == {"enabled": "yes", "timeout": "3"}  # type: ignore[union-attr]
    assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    assert iface.find("mtu").get("size") == "9000"  # type: ignore[union-attr]
    assert iface.find("driver") is None   # one queue pair
    mac = iface.find("mac").get("address")  # type: ignore[union-attr]
    assert mac is not None and mac.startswith("52:54:00:")


def test_libvirt_net_server_mode_on_qemu_7(capsys: pytest.CaptureFixture[str]) -> None:
    iface, override = libvirt("net", "--socket", "/run/n.sock", "--qemu-server", "--qemu-version", "7.2",
                              "--queue-pairs", "2", capsys=capsys)
    assert iface.find("source").get("mode") == "server"  # type: ignore[union-attr]
    assert iface.find("driver").get("queues") == "2"  # type: ignore[union-attr]
    alias = iface.find("alias").get("name")  # type: ignore[union-attr]
    q = f"{{{LIBVIRT_QEMU_NS}}}"
    assert override.tag == q + "override"
    device = override.find(q + "device")
    assert device is not None and device.get("alias") == alias
    assert device.find(f"{q}frontend/{q}property").attrib == {  # type: ignore[union-attr]
        "name": "vectors", "type": "unsigned", "value": "0"}


def test_libvirt_generic_device_is_a_qemu_commandline(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = libvirt("balloon", "--socket", "/run/b.sock", capsys=capsys)
    q = f"{{{LIBVIRT_QEMU_NS}}}"
    assert line.tag == q + "commandline"
    values = [a.get("value") for a in line.findall(q + "arg")]
    assert values[:2] == ["-chardev", "socket,id=vu0,path=/run/b.sock"]
    assert values[2] == "-device" and values[3].startswith("vhost-user-test-device-pci,chardev=vu0,virtio-id=5,")
