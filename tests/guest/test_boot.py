"""Real-guest smoke tests through the vuser_guest fixture: every QEMU x
kernel pair boots, and the command channel returns output and exit status
exactly.  Needs `vuser provision`."""

from __future__ import annotations

import time

import pytest
import trio

from vuser.testing.child import gone
from vuser.testing.guest import GuestCommandError, GuestExited, GuestTimeout, kernel_info

QEMUS = ("7.2", "11")
KERNELS = ("bookworm", "sid")

# Every byte value, blank lines, CR LF, and a line that looks like the
# channel's own framing: the command server must pass all of it through.
PAYLOAD = (bytes(range(256)) + b"\n\nsecond line\r\n\t tabbed \n"
           b"@@vuser-result 1 0 :AAAA :\n" + "ünïcødé €\n".encode() + b"no newline at end")


def printf_script(data: bytes) -> str:
    """A shell printf that writes exactly ``data`` (octal escapes)."""
    return "printf '" + "".join(f"\\{b:03o}" for b in data) + "'"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qemu", QEMUS)
async def test_boot_and_run(vuser_guest, qemu: str, kernel: str) -> None:
    expected_release = kernel_info(kernel)["version"]
    t0 = time.monotonic()
    async with vuser_guest(qemu=qemu, kernel=kernel) as guest:
        result = await guest.run("uname -r", timeout=30)
        first_command = time.monotonic() - t0
        assert (result.exit_code, result.stdout, result.stderr) == (0, expected_release + "\n", "")

        result = await guest.run("echo out; echo err >&2; exit 3", timeout=30)
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")

        result = await guest.run(printf_script(PAYLOAD), timeout=30)
        assert result.exit_code == 0
        assert result.stdout_bytes == PAYLOAD
        assert result.stderr_bytes == b""

        # stdin goes through unchanged too
        result = await guest.run("cat; echo done >&2", input=PAYLOAD, timeout=30)
        assert (result.stdout_bytes, result.stderr) == (PAYLOAD, "done\n")

        result = await guest.run("echo a; echo b >&2; echo c", merge_stderr=True)
        assert (result.stdout, result.stderr) == ("a\nb\nc\n", "")

        with pytest.raises(GuestCommandError) as info:
            await guest.check("echo visible; false")
        assert info.value.result.exit_code == 1
        assert "visible" in str(info.value)

        await guest.write_file("/run/blob", PAYLOAD)
        assert await guest.read_file("/run/blob") == PAYLOAD

        # the shared-memory RAM shows up in QEMU's RssShmem
        with open(f"/proc/{guest.pid}/status") as status:
            assert any(line.startswith("RssShmem:") for line in status)
        assert "vuser-init" in guest.console_text()
        pid = guest.pid
    assert gone(pid)
    print(f"\nqemu {qemu} kernel {kernel}: boot {guest.boot_seconds:.2f}s, "
          f"first command answered {first_command:.2f}s after `async with`")


async def test_command_timeout_keeps_channel(vuser_guest) -> None:
    async with vuser_guest(qemu="11", kernel="sid") as guest:
        with pytest.raises(GuestTimeout) as info:
            await guest.run("echo started; sleep 30", timeout=1)
        # Killed in the guest at the limit (SIGKILL: 137), its output kept.
        assert info.value.result is not None
        assert info.value.result.exit_code == 137
        assert info.value.result.stdout == "started\n"
        assert (await guest.run("echo still here")).stdout == "still here\n"


async def test_failure_inside_context_has_diagnostics_and_no_orphan(vuser_guest) -> None:
    pid = None
    with pytest.raises(RuntimeError) as info:
        async with vuser_guest(qemu="7.2", kernel="bookworm") as guest:
            pid = guest.pid
            raise RuntimeError("boom")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "guest console" in notes and "vuser-init" in notes
    assert pid is not None and gone(pid)


async def test_cancelled_guest_leaves_no_orphan(vuser_guest) -> None:
    pids = []
    with trio.move_on_after(60) as scope:
        async with vuser_guest(qemu="11", kernel="bookworm") as guest:
            pids.append(guest.pid)
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught
    assert pids and gone(pids[0])


async def test_bad_qemu_arguments_fail_fast_with_log(vuser_guest) -> None:
    # QEMU's exit ends the wait at once: GuestExited, not the boot timeout.
    with pytest.raises(GuestExited) as info:
        async with vuser_guest(qemu="11", kernel="sid", qemu_args=["-device", "no-such-dev"]):
            pass
    assert "no-such-dev" in str(info.value)
