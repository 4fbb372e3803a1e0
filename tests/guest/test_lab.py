"""The vuser_guest fixture itself: files and packages in the guest, devices
served both ways, and what a test sees when something breaks — errors that
carry the console and device logs and name the log folder, and nothing left
running afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vuser.testing.child import gone, stop_group
from vuser.testing.errors import DeviceExited, GuestCommandError, GuestExited
from vuser.testing.lab import Lab
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcessError
from vuser.testing.served import ProcessDevice


async def test_files_are_in_the_guest_from_boot(vuser_guest: Lab, tmp_path: Path) -> None:
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho \"tool ran with $1\"\n")
    tool.chmod(0o755)
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    (conf / "a.txt").write_text("alpha\n")
    (conf / "sub" / "b.txt").write_text("beta\n")
    (conf / "sub" / "b.txt").chmod(0o600)
    os.symlink("a.txt", conf / "link")
    files = {"/usr/local/bin/tool": tool, "/etc/conf": conf, "/data/blob": tool}
    async with vuser_guest(files=files) as guest:
        assert (await guest.check("tool x")).stdout == "tool ran with x\n"
        modes = await guest.check("stat -c '%a %n' /usr/local/bin/tool /etc/conf/sub/b.txt /data/blob")
        assert modes.stdout.split("\n")[:3] == ["755 /usr/local/bin/tool", "600 /etc/conf/sub/b.txt",
                                                "755 /data/blob"]
        assert (await guest.check("cat /etc/conf/link /etc/conf/sub/b.txt")).stdout == "alpha\nbeta\n"
        # The provisioned image is still all there underneath.
        assert (await guest.check("cat /etc/vuser/modules | wc -l")).stdout.strip() != "0"


async def test_files_bad_paths_fail_before_boot(vuser_guest: Lab, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        async with vuser_guest(files={"relative/path": tmp_path}):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        async with vuser_guest(files={"/x": tmp_path / "missing"}):
            pass


async def test_packages_run_with_their_libraries(vuser_guest: Lab) -> None:
    async with vuser_guest(packages=["iperf3"]) as guest:
        version = await guest.check("iperf3 --version")
        assert version.stdout.startswith("iperf 3"), version.stdout
        # A real run over the guest's loopback: the libraries load and work.
        await guest.check("iperf3 -s -D -1")
        result = await guest.check("iperf3 -c 127.0.0.1 -t 1 -J", timeout=60)
        assert '"bits_per_second"' in result.stdout


async def test_devices_served_either_way(vuser_guest: Lab) -> None:
    async with vuser_guest("rng", "rng --ring python", serve="in-process") as guest:
        assert set(guest.devices) == {"rng", "rng#2"}
        assert guest.device("rng").instances[0].name == "rng"
        await guest.check("head -c 64 /dev/hwrng >/dev/null")
        served = [(await guest.device(label).status())["bytes_served"] for label in ("rng", "rng#2")]
        assert sum(served) >= 64, served
        with pytest.raises(KeyError, match="balloon"):
            guest.device("balloon")
    async with vuser_guest("rng", serve="process") as guest:
        device = guest.device("rng")
        assert isinstance(device, ProcessDevice)
        with pytest.raises(TypeError, match="in-process"):
            device.instances  # noqa: B018
        pid = device.pid
        assert not gone(pid)
    assert gone(pid)


async def test_bad_device_specs_fail_before_boot(vuser_guest: Lab) -> None:
    with pytest.raises(ValueError, match="--bogus"):
        async with vuser_guest("balloon --bogus"):
            pass
    with pytest.raises(ValueError, match="test kit"):
        async with vuser_guest("rng --socket /tmp/x"):
            pass
    with pytest.raises(ValueError, match="serve"):
        async with vuser_guest("rng", serve="threads"):
            pass


async def test_failing_command_carries_console_device_log_and_folder(vuser_guest: Lab) -> None:
    async with vuser_guest("rng", qemu="7.2") as guest:
        with pytest.raises(GuestCommandError) as info:
            await guest.check("echo to-stdout; echo to-stderr >&2; exit 7")
        message = str(info.value)
        assert info.value.result.exit_code == 7
        assert "to-stdout" in message and "to-stderr" in message
        assert "guest console" in message and "vuser-init" in message
        assert "`vuser run rng`" in message and "listening on" in message   # the device log's tail
        assert f"logs: {vuser_guest.workdir}" in message


async def test_device_process_that_dies_is_reported_at_once(vuser_guest: Lab) -> None:
    # Leaving judges the device's end too: it died with a signal.
    with pytest.raises(VuserProcessError, match="exited with status -9"):
        async with vuser_guest("rng", qemu="7.2") as guest:
            device = guest.device("rng")
            os.kill(device.pid, signal.SIGKILL)   # not through the fixture: a crash
            # Reading /dev/hwrng would wait for the dead device forever; the
            # device's exit ends the command instead.
            with pytest.raises(DeviceExited) as info:
                await guest.run("head -c 4096 /dev/hwrng | wc -c", timeout=600)
            message = str(info.value)
            assert "`vuser run rng`" in message and "status -9" in message
            assert "listening on" in message and f"logs: {vuser_guest.workdir}" in message
            qemu_pid = guest.pid
    assert gone(qemu_pid)


async def test_guest_that_does_not_boot_names_devices_and_leaves_nothing(vuser_guest: Lab) -> None:
    session = vuser_guest("rng", qemu="11", qemu_args=["-device", "no-such-dev"])
    with pytest.raises(GuestExited) as info:
        async with session:
            pass
    message = str(info.value)
    assert "no-such-dev" in message
    assert "`vuser run rng`" in message and "listening on" in message
    device = session.own[0]
    assert isinstance(device, ProcessDevice) and gone(device.pid)


INTERRUPTED = '''
import pytest

@pytest.mark.trio
async def test_long(vuser_guest):
    async with vuser_guest("rng", qemu="7.2") as guest:
        print("PIDS", guest.pid, guest.device("rng").pid, flush=True)
        await guest.run("sleep 600", timeout=900)
'''


@pytest.mark.guest
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_interrupted_run_leaves_nothing_running(tmp_path: Path, signum: int) -> None:
    """Ctrl-C, or a CI job's timeout (SIGTERM), in the middle of a guest
    command: QEMU and `vuser run` are stopped before pytest ends."""
    (tmp_path / "test_interrupted.py").write_text(INTERRUPTED)
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
            # Its log folder, kept since the run was interrupted: in tmp_path.
            env={**os.environ, "TMPDIR": str(tmp_path)},
            # A child inherits ignored SIGINT from a background shell: undo it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = await wait_until(lambda: next((ln for ln in out.read_text().splitlines()
                                              if ln.startswith("PIDS")), None), 120, "the guest to boot", 0.2)
        pids = [int(p) for p in line.split()[1:]]
        assert not any(gone(p) for p in pids)
        proc.send_signal(signum)
        with trio.fail_after(60):
            await proc.wait()
        assert all(gone(p) for p in pids), (pids, out.read_text()[-3000:])
    finally:
        await stop_group(proc)
