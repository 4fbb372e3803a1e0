"""The test guest's QEMU: its command line, and its memory as the host sees it.

Pure functions, no process handling (that is :mod:`vuser.testing.guest`).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["RSS_FIELDS", "qemu_command", "qemu_rss"]


def qemu_command(binary: str, *, vmlinuz: str, initramfs: str, memory_mb: int,
                 cmd_socket: str, console_log: str, qmp_socket: str | None = None,
                 kernel_cmdline_extra: str = "", extra_args: Sequence[str] = (),
                 smp: int = 1) -> list[str]:
    """The QEMU argv of a test guest: q35 under TCG, RAM in a shared memfd
    (so vhost-user back-ends can map it), ttyS0 = console log, ttyS1 = the
    command channel (QEMU connects to ``cmd_socket``)."""
    cmdline = "console=ttyS0 panic=-1 quiet"
    if kernel_cmdline_extra:
        cmdline += " " + kernel_cmdline_extra
    argv = [
        binary,
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-accel", "tcg",
        "-machine", "q35,memory-backend=mem",
        "-m", f"{memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-smp", str(smp),
        "-kernel", vmlinuz, "-initrd", initramfs, "-append", cmdline,
        "-chardev", f"file,id=vuser-console,path={console_log}",
        "-serial", "chardev:vuser-console",
        "-chardev", f"socket,id=vuser-cmd,path={cmd_socket}",
        "-serial", "chardev:vuser-cmd",
    ]
    if qmp_socket:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return argv + list(extra_args)


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def qemu_rss(pid: int) -> dict[str, int]:
    """Resident memory of a process (e.g. :attr:`Guest.pid`), in bytes, from
    ``/proc/<pid>/status``: ``VmRSS`` and its parts ``RssAnon``, ``RssFile``
    and ``RssShmem``.  A guest's RAM is a shared memfd, so it shows in
    ``RssShmem`` (pages the guest touched and the back-ends did not punch
    out).  Raises OSError if the process is gone."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in RSS_FIELDS:
                value, _, unit = rest.strip().partition(" ")
                out[key] = int(value) * (1024 if unit.strip().lower() == "kb" else 1)
    return out
