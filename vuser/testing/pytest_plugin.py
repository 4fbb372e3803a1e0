"""vuser's pytest plugin: real Linux guests with vuser devices in any
project's tests.  Registered as the entry point ``vuser`` of the group
``pytest11``, so pytest loads it wherever vuser is installed::

    import pytest

    @pytest.mark.trio
    async def test_entropy(vuser_guest):
        async with vuser_guest("rng", qemu="7.2") as guest:
            result = await guest.run("head -c 16 /dev/hwrng | wc -c", timeout=30)
            assert result.stdout.strip() == "16"
            assert (await guest.device("rng").status())["bytes_served"] >= 16

The fixture ``vuser_guest`` is a :class:`vuser.testing.lab.Lab`: call it
with devices and options for a guest to ``async with``; ``vuser_guest.
switch(...)`` declares a switch, ``vuser_guest.together(...)`` boots several
guests at once.  It is an async fixture for pytest-trio, which a test gets
with ``@pytest.mark.trio`` or by setting ``trio_mode = true``.  Guests need
``vuser provision`` run once.

Options: ``--vuser-serve process|in-process`` (the default way devices are
served; also the ini value ``vuser_serve``), ``--vuser-keep`` (keep every
test's guest logs, not only the failed ones').  Tests that use the fixture
are marked ``guest``, so ``-m "not guest"`` leaves them out.

Work folders: every test's guests share one folder of sockets and logs; it
is removed after a test that passed and kept after one that failed, named
in the report (section "vuser") and in every guest error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Generator

import pytest

from vuser.testing.options import DEFAULT_SERVE, SERVE_MODES

if TYPE_CHECKING:
    from vuser.testing.lab import Lab

__all__ = ["vuser_guest"]

_LABS = pytest.StashKey[list["Lab"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vuser", "vuser real-guest tests")
    group.addoption("--vuser-serve", choices=SERVE_MODES, default=None,
                    help="how vuser_guest serves devices unless a test says: in 'process'es "
                         "(vuser run, as in production; the default) or 'in-process'")
    group.addoption("--vuser-keep", action="store_true",
                    help="keep the guest logs of tests that passed too")
    parser.addini("vuser_serve", "default of --vuser-serve", default=DEFAULT_SERVE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a real Linux guest under QEMU (slow)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "vuser_guest" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.guest)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    # pytest-trio tears the fixture down inside the call phase, before the
    # test's outcome is known: the work folder is kept or removed here.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    labs = item.stash.get(_LABS, [])
    if report.when == "call" or (report.failed and labs):
        for lab in labs:
            if report.failed:
                lab.failed = True
            if lab.tidy():
                report.sections.append(("vuser", f"guest logs kept in {lab.workdir}"))
        labs.clear()


@pytest.fixture
async def vuser_guest(request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    """Boot real guests with vuser devices: ``async with vuser_guest("rng",
    qemu="7.2") as guest`` (see :class:`vuser.testing.lab.Lab`)."""
    from vuser.testing.lab import open_lab   # the heavy part, only when used

    serve = request.config.getoption("vuser_serve") or request.config.getini("vuser_serve")
    keep = True if request.config.getoption("vuser_keep") else None
    async with open_lab(serve=serve, keep=keep, cleanup=False) as lab:
        request.node.stash.setdefault(_LABS, []).append(lab)
        yield lab
