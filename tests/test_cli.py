"""The command line as a new user meets it: every user error is one line on
stderr that names the thing and the problem, exit status 2, no traceback;
and what ``vuser qemu-args`` prints is valid QEMU option syntax."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from vuser.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits for usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("argv, needles", [
    (["qemu-args", "nosuch", "--socket", "S"], ["nosuch"]),
    (["run", "nosuch", "--socket", "S"], ["nosuch"]),
    (["run", "rng"], ["--socket"]),
    (["run", "rng", "--socket", "/no/such/dir/x.sock"], ["/no/such/dir/x.sock", "No such file or directory"]),
    (["ctl", "/no/such.ctl", "status"], ["/no/such.ctl", "No such file or directory"]),
    (["run", "rng", "--socket", "a.sock", "--socket", "b.sock"], ["rng", "one socket"]),
    (["run", "rng", "--socket", "S", "--without", "NOPE"], ["NOPE", "unknown feature"]),
    (["run", "rng", "--socket", "S", "--source", "/no/such/entropy"], ["/no/such/entropy"]),
    (["run", "balloon", "--socket", "S", "--target", "lots"], ["lots"]),
    (["run", "net", "--socket", "S", "--queue-pairs", "99"], ["queue pairs"]),
    (["run", "rng", "--socket", "S", "--queue-policy", "random"], ["random"]),
    (["--log-level", "loud", "devices"], ["LOUD", "--log-level"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_user_errors_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                               needles: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, *needles)


def test_qemu_args_escape_commas_in_paths(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "qemu-args", "rng", "--socket", "/tmp/a,b.sock", "--qemu-version", "7.2")
    assert code == 0
    args = shlex.split(out)
    chardev = args[args.index("-chardev") + 1]
    assert chardev == "socket,id=vu0,path=/tmp/a,,b.sock"


def test_qemu_args_reconnect_follows_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    # QEMU 10.2 removed reconnect=; reconnect-ms= replaces it.
    _, out, _ = run(capsys, "qemu-args", "net", "--socket", "/tmp/n.sock", "--qemu-version", "7.2",
                    "--reconnect", "1")
    assert ",reconnect=1" in out and "reconnect-ms" not in out
    _, out, _ = run(capsys, "qemu-args", "net", "--socket", "/tmp/n.sock", "--qemu-version", "11",
                    "--reconnect", "1")
    assert ",reconnect-ms=1000" in out


def test_devices_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "devices")
    assert code == 0
    assert "set-target SIZE" in out and "fdb" in out


def test_log_level_anywhere(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "qemu-args", "rng", "--socket", str(tmp_path / "s"), "--log-level", "debug")
    assert code == 0 and not err
