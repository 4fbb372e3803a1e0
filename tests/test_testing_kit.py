"""The real-guest test kit without a guest: the pytest plugin's contract
(entry point, fixture, options, trio_mode on and off, log folders), device
specs, QEMU arguments, switches, the initramfs parts it writes, ELF reading
and apt output parsing."""

from __future__ import annotations

import gzip
import os
import shlex
import shutil
import stat
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vuser.devices.net.plugin import port_mac
from vuser.testing.lab import memory_mib
from vuser.testing.overlay import files_archive, guest_path
from vuser.testing.provision.apt import first_depends
from vuser.testing.provision.common import ProvisionError
from vuser.testing.provision.cpio import Cpio, concatenate
from vuser.testing.provision.elf import needs
from vuser.testing.provision.packages import package_image
from vuser.testing.served import DeviceSpec, ProcessDevice, as_spec
from vuser.testing.switches import Switch

pytest_plugins = ["pytester"]


def read_cpio(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a 'newc' archive, trailer excluded."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", off
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


# ------------------------------------------------------------------ plugin

def test_plugin_is_the_pytest11_entry_point_vuser() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("vuser") == "vuser.testing.pytest_plugin"


PLUGIN_TESTS = '''
import pytest

{mark}
async def test_lab(vuser_guest, request):
    assert vuser_guest.serve == "{serve}"
    assert request.node.get_closest_marker("guest") is not None
    (vuser_guest.workdir / "note").write_text("seen")
    print("WORKDIR", vuser_guest.workdir)
    assert {passes}
'''


@pytest.mark.parametrize("trio_mode", [False, True], ids=["marked", "trio_mode"])
def test_fixture_with_and_without_trio_mode(pytester: pytest.Pytester, trio_mode: bool) -> None:
    """The fixture needs no conftest: only pytest-trio, by mark or mode.
    A test that passes leaves no folder; one that fails keeps it and says so."""
    pytester.makeini("[pytest]\n" + ("trio_mode = true\n" if trio_mode else ""))
    mark = "" if trio_mode else "@pytest.mark.trio"
    pytester.makepyfile(test_pass=PLUGIN_TESTS.format(mark=mark, serve="in-process", passes=True),
                        test_fail=PLUGIN_TESTS.format(mark=mark, serve="in-process", passes=False))
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "--vuser-serve", "in-process")
    result.assert_outcomes(passed=1, failed=1)
    folders = [Path(line.split("WORKDIR ", 1)[1]) for line in result.outlines if "WORKDIR " in line]
    assert len(folders) == 2, result.outlines
    kept = [f for f in folders if f.exists()]
    assert len(kept) == 1 and (kept[0] / "note").read_text() == "seen"
    assert f"guest logs kept in {kept[0]}" in result.stdout.str()
    shutil.rmtree(kept[0])


def test_serve_option_is_checked(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--vuser-serve", "threads")
    assert result.ret != 0
    assert "invalid choice" in result.stderr.str()


# ------------------------------------------------------------------ specs and devices

def test_memory_sizes() -> None:
    assert [memory_mib(m) for m in ("512M", "1G", 256, "2GiB", "64m")] == [512, 1024, 256, 2048, 64]
    with pytest.raises(ValueError):
        memory_mib("lots")


def test_device_spec_checks() -> None:
    assert as_spec("balloon --without FREE_PAGE_HINT").kind == "balloon"
    for bad in ("", "--without X", "rng --socket /x", "rng --control=/x", "net --client"):
        with pytest.raises(ValueError):
            as_spec(bad)
    with pytest.raises(ValueError, match="serve"):
        as_spec(DeviceSpec("rng", serve="thread"))


async def test_device_specs_parse_as_vuser_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--bogus"):
        ProcessDevice("b", ["balloon", "--bogus"], [tmp_path / "b.sock"], tmp_path / "b.ctl", tmp_path / "b.log")
    with pytest.raises(ValueError, match="invalid choice"):
        ProcessDevice("x", ["nosuch"], [tmp_path / "x.sock"], tmp_path / "x.ctl", tmp_path / "x.log")
    rng = ProcessDevice("rng", ["rng"], [tmp_path / "r.sock"], tmp_path / "r.ctl", tmp_path / "r.log")
    assert rng.args.socket == [str(tmp_path / "r.sock")] and rng.args.control == str(tmp_path / "r.ctl")
    assert await rng.qemu_args(0, qemu_version="7.2", chardev_id="vu3") == [
        "-chardev", f"socket,id=vu3,path={tmp_path / 'r.sock'}", "-device", "vhost-user-rng-pci,chardev=vu3"]
    generic = await rng.qemu_args(0, qemu_version="11", chardev_id="vu0", reconnect=1, qemu_opts=",x=y")
    assert generic[1].endswith(",reconnect-ms=1000") and generic[-1].endswith("config_size=0,x=y"), generic


async def test_net_qemu_arguments_leave_host_resources_to_the_process(tmp_path: Path) -> None:
    """A switch served by a process: QEMU's arguments come from devices made
    here without its tap or pcap (which only the process may open)."""
    pcap = tmp_path / "p.pcap"
    socks = [tmp_path / "p0.sock", tmp_path / "p1.sock"]
    net = ProcessDevice("net", ["net", "--queue-pairs", "2", "--pcap", str(pcap), "--tap", "vutnotmade0"],
                        socks, tmp_path / "ctl", tmp_path / "log")
    args = await net.qemu_args(1, qemu_version="7.2", chardev_id="vu1")
    device = args[args.index("-device") + 1]
    assert f"mac={port_mac(str(socks[1])).hex(':')}" in device and "vectors=0" in device and "mq=on" in device
    assert "queues=2" in args[args.index("-netdev") + 1]
    assert not pcap.exists()
    assert not os.path.exists("/sys/class/net/vutnotmade0")


def test_switch_ports_addresses_and_options(tmp_path: Path) -> None:
    sw = Switch("lan", 3, tmp_path, ports=2, tap=True, spec="net --mtu 9000")
    assert sw.take("a") == 0 and sw.take("b") == 1
    with pytest.raises(ValueError, match="no free port"):
        sw.take("c")
    sw.release("a")
    assert sw.take("c") == 0
    assert sw.address(1) == f"{sw.subnet}.3" and sw.host_address == f"{sw.subnet}.1"
    assert sw.subnet.startswith("10.203.") and sw.tap is not None and len(sw.tap) <= 15
    sw.agrees(["net"])
    sw.agrees(shlex.split("net --mtu 9000"))
    with pytest.raises(ValueError, match="runs 'net --mtu 9000'"):
        sw.agrees(["net", "--mtu", "1500"])
    with pytest.raises(ValueError):
        Switch("x", 0, tmp_path, spec="rng")


# ------------------------------------------------------------------ initramfs parts

def test_files_archive_keeps_modes_links_and_makes_parents(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"F")
    (tmp_path / "d" / "e" / "f").chmod(0o640)
    (tmp_path / "x").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "x").chmod(0o755)
    os.symlink("e/f", tmp_path / "d" / "link")
    entries = read_cpio(files_archive({"/opt/tool/run": tmp_path / "x", "/srv/data": tmp_path / "d"}))
    by_name = {name: (mode, body) for name, mode, body in entries}
    names = [name for name, _, _ in entries]
    for name in ("opt", "opt/tool", "srv"):   # parents before children
        assert names.index(name) < names.index({"opt": "opt/tool", "opt/tool": "opt/tool/run",
                                                 "srv": "srv/data"}[name])
    assert by_name["opt/tool/run"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert by_name["srv/data/e/f"] == (stat.S_IFREG | 0o640, b"F")
    assert by_name["srv/data/link"] == (stat.S_IFLNK | 0o777, b"e/f")
    assert stat.S_ISDIR(by_name["srv/data/e"][0])
    for bad in ("relative", "/", "/a/../../etc"):
        with pytest.raises(ValueError):
            guest_path(bad)


def test_concatenated_parts_start_on_four_byte_boundaries(tmp_path: Path) -> None:
    first = tmp_path / "a.gz"
    first.write_bytes(gzip.compress(b"odd length!"))
    cpio = Cpio()
    cpio.file("f", b"x")
    second = tmp_path / "b.cpio"
    second.write_bytes(cpio.finish())
    out = tmp_path / "out"
    concatenate([first, second], out)
    data = out.read_bytes()
    start = data.index(b"070701")
    assert start % 4 == 0 and set(data[len(first.read_bytes()):start]) <= {0}


def test_elf_needs_of_host_programs() -> None:
    env = needs(Path("/usr/bin/env").read_bytes())
    assert env.interpreter == "/lib64/ld-linux-x86-64.so.2" and "libc.so.6" in env.libraries
    assert needs(Path("/bin/busybox").read_bytes()).libraries == []   # static
    with pytest.raises(ProvisionError):
        needs(b"#!/bin/sh\n" + bytes(64))


class FakeApt:
    def __init__(self, text: str) -> None:
        self.text = text

    def apt_cache(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(args), 0, self.text, "")

    def apt_get(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        raise AssertionError("no downloads here")


def test_first_depends_takes_first_alternatives() -> None:
    # "|Depends: A" then "Depends: B": A or B (the bar marks that another
    # alternative follows).  A virtual package's providers are indented.
    text = ("iperf3\n  Depends: debconf\n |Depends: libc6\n  Depends: cdebconf\n"
            "  Depends: <debconf-2.0>\n    cdebconf\n  PreDepends: libiperf0\n"
            "libiperf0\n  Depends: libc6\n")
    assert first_depends(FakeApt(text), ["iperf3", "libiperf0"]) == {
        "iperf3": ["debconf", "libc6", "<debconf-2.0>", "libiperf0"], "libiperf0": ["libc6"]}


def test_package_names_are_checked_before_apt(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="not Debian package names"):
        package_image(tmp_path, ["iperf3", "-oAPT::Get::foo=1"])
    assert not (tmp_path / "packages").exists()


# ------------------------------------------------------------------ the guide

ROOT = Path(__file__).resolve().parent.parent


def test_readme_guide_examples_are_tests_of_the_example_project() -> None:
    """Every Python example of the README's "Testing with real guests" is a
    whole test file of examples/hwprobe, which CI runs."""
    readme = (ROOT / "README.md").read_text()
    guide = readme.split("## Testing with real guests", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in guide.split("```python\n")[1:]]
    tests = {p.read_text() for p in (ROOT / "examples/hwprobe/tests").glob("test_*.py")}
    assert len(blocks) == 3
    for block in blocks:
        assert block in tests, block


async def test_qemu_arguments_under_a_device_process_environment(tmp_path: Path) -> None:
    """With env= the process's environment decides what its options mean:
    `vuser qemu-args` runs under it (here the environment adds nothing,
    so the answer must be the one the device objects give)."""
    plain = ProcessDevice("b", ["balloon", "--without", "REPORTING"], [tmp_path / "b.sock"], tmp_path / "b.ctl",
                          tmp_path / "b.log")
    with_env = ProcessDevice("b", ["balloon", "--without", "REPORTING"], [tmp_path / "b.sock"],
                             tmp_path / "b.ctl", tmp_path / "b.log", env={"VUSER_TEST_MARK": "1"})
    kw = dict(qemu_version="11", chardev_id="vu2", reconnect=2, qemu_opts=",packed=on")
    assert await with_env.qemu_args(0, **kw) == await plain.qemu_args(0, **kw)
    assert "num_vqs=4" in (await plain.qemu_args(0, **kw))[-1]
