"""Balloon policies without a guest: specs, host memory sources, the
``auto`` rules, the checks that switch a policy off, and discovery through
the ``vuser.balloon_policies`` entry-point group."""

from __future__ import annotations

from dataclasses import replace

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vuser.device import DeviceError
from vuser.devices.balloon import BalloonDevice
from vuser.devices.balloon.auto import AutoPolicy
from vuser.devices.balloon.host import HostMemory, HostMemoryError, HostSource, read_cgroup, read_meminfo
from vuser.devices.balloon.policy import ActivePolicy, PolicyFailed, PolicyInput, PolicySpec, Target, available
from vuser.testing.distribution import write_distribution

MiB = 1 << 20
RAM = 512 * MiB


def meminfo_file(path: Path, total_kb: int, available_kb: int) -> str:
    path.write_text(f"MemTotal:       {total_kb} kB\nMemFree:        {available_kb // 2} kB\n"
                    f"MemAvailable:   {available_kb} kB\nCached:  10 kB\n")
    return str(path)


def inputs(*, target: int = 0, actual: int | None = None, available: int | None = 400 * MiB,
           total: int = 470 * MiB, host_share: float | None = 0.5, doo: bool = False) -> PolicyInput:
    stats = {} if available is None else {"total-memory": total, "available-memory": available,
                                          "free-memory": available}
    host = None if host_share is None else HostMemory(1000 * MiB, int(1000 * MiB * host_share), "test")
    return PolicyInput(time=time.time(), guest_ram=RAM, target=target, actual=target if actual is None else actual,
                       stats=stats, stats_age=0.5, deflate_on_oom=doo, host=host)


# ---------------------------------------------------------------- specs

def test_spec_parses_name_and_params() -> None:
    spec = PolicySpec.parse("auto:floor=128M, step=5%,cgroup=/sys/fs/cgroup/a=b")
    assert spec.name == "auto"
    assert spec.params == {"floor": "128M", "step": "5%", "cgroup": "/sys/fs/cgroup/a=b"}
    assert PolicySpec.parse("auto").params == {}
    assert str(PolicySpec.parse("auto:floor=1G")) == "auto:floor=1G"


@pytest.mark.parametrize("text", ["", ":a=b", "auto:floor", "auto:=3", "a b", "auto;x", "auto:cgroup=/a,b"])
def test_bad_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(DeviceError):
        PolicySpec.parse(text)


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown balloon policy 'nope'"),
    ("auto:floor=lots", "floor='lots' is not a size"),
    ("auto:pressure=2", "outside 0..1"),
    ("auto:pressure=0.4,relax=0.3", "below pressure"),
    ("auto:bogus=1", "bogus"),
    ("auto:interval=0", "interval 0 is outside"),
    ("auto:interval=soon", "not a number of seconds"),
    ("auto:meminfo=/no/such/file", "No such file"),
    ("auto:cgroup=/no/such/dir", "memory.current"),
])
def test_load_refuses_what_cannot_work(text: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        ActivePolicy.load(text)


def test_auto_is_registered_and_loads() -> None:
    assert available()["auto"] == "vuser.devices.balloon.auto:AutoPolicy"
    policy = ActivePolicy.load("auto:interval=0.5,floor=128M")
    assert isinstance(policy.fn, AutoPolicy) and policy.interval == 0.5
    assert policy.own_params == {"floor": "128M"}
    assert policy.host.describe() == "meminfo /proc/meminfo"


# ---------------------------------------------------------------- host memory

def test_real_proc_meminfo_reads() -> None:
    host = read_meminfo()
    assert 0 < host.available <= host.total


def test_meminfo_file(tmp_path: Path) -> None:
    host = read_meminfo(meminfo_file(tmp_path / "mi", 1_000_000, 100_000))
    assert (host.total, host.available) == (1_000_000 * 1024, 100_000 * 1024)
    assert host.available_fraction == pytest.approx(0.1)
    (tmp_path / "bad").write_text("nothing here\n")
    with pytest.raises(HostMemoryError, match="MemTotal"):
        read_meminfo(tmp_path / "bad")


def test_cgroup_v2_and_v1_and_unlimited(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000\n")
    (v2 / "memory.current").write_text("900\n")
    assert read_cgroup(v2) == HostMemory(1000, 100, f"cgroup {v2}")
    (v2 / "memory.current").write_text("1200\n")  # over the limit: nothing available, not negative
    assert read_cgroup(v2).available == 0
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory.usage_in_bytes").write_text("500\n")
    assert read_cgroup(v1).available == 1500
    (v2 / "memory.max").write_text("max\n")
    mi = meminfo_file(tmp_path / "mi", 1000, 250)
    unlimited = read_cgroup(v2, mi)
    assert (unlimited.total, unlimited.available) == (1000 * 1024, 250 * 1024)
    assert "has no limit" in unlimited.source
    (v2 / "memory.max").write_text("lots\n")
    with pytest.raises(HostMemoryError, match="not a number"):
        read_cgroup(v2)


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(HostMemoryError, match="not a regular file"):
        read_meminfo(fifo)
    with pytest.raises(HostMemoryError, match="not a regular file"):
        read_meminfo("/dev/zero")
    with pytest.raises(DeviceError, match="not a regular file"):
        ActivePolicy.load(f"auto:meminfo={fifo}")


def test_host_source_prefers_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("100\n")
    (tmp_path / "memory.current").write_text("10\n")
    assert HostSource(cgroup=str(tmp_path)).read().available == 90
    assert HostSource().read().source == "meminfo /proc/meminfo"


# ---------------------------------------------------------------- auto's rules

def auto(**kw: str) -> AutoPolicy:
    return AutoPolicy(**{"floor": "128M", "step": "32M", **kw})


def test_no_stats_no_move() -> None:
    answer = auto()(inputs(target=64 * MiB, available=None, host_share=0.01))
    assert answer.size == 64 * MiB and "no guest stats" in answer.reason


def test_host_short_inflates_by_a_step() -> None:
    answer = auto()(inputs(target=0, host_share=0.1))
    assert answer.size == 32 * MiB and "host short" in answer.reason


def test_inflation_keeps_the_guest_reserve_and_a_step() -> None:
    # total 200, available 80: reserve 40, a step 32 -> only 8 MiB may go.
    answer = auto()(inputs(target=100 * MiB, available=80 * MiB, total=200 * MiB, host_share=0.1))
    assert answer.size == 108 * MiB
    answer = auto()(inputs(target=100 * MiB, available=70 * MiB, total=200 * MiB, host_share=0.1))
    assert answer.size == 100 * MiB and "nothing to take" in answer.reason


def test_never_past_the_floor() -> None:
    ceiling = RAM - 128 * MiB
    answer = auto()(inputs(target=ceiling - 10 * MiB, host_share=0.0))
    assert answer.size == ceiling
    assert auto()(inputs(target=ceiling, host_share=0.0)).size == ceiling
    # Someone set it past the floor by hand: back to the floor.
    answer = auto()(inputs(target=RAM - 64 * MiB, host_share=0.0))
    assert answer.size == ceiling and "floor" in answer.reason
    # A share of RAM works as a floor too.
    assert AutoPolicy(floor="50%", step="100%")(inputs(target=0, host_share=0.0)).size <= RAM // 2


def test_guest_short_deflates_past_the_shortfall_even_when_the_host_is_short() -> None:
    # total 100, available 5: reserve 20, short by 15 -> 15 + a step of 32 back.
    answer = auto()(inputs(target=300 * MiB, available=5 * MiB, total=100 * MiB, host_share=0.0))
    assert answer.size == 300 * MiB - 47 * MiB and "guest short" in answer.reason
    assert auto()(inputs(target=10 * MiB, available=0, total=100 * MiB)).size == 0


def test_guest_short_looks_ahead_by_what_the_guest_used_between_samples() -> None:
    # total 200: reserve 40.  Available 60, then 45 with the balloon unmoved:
    # the guest used 15 a sample, so by the next one it will have 30 --
    # short by 10: 10 + a step of 32 back now, not a sample too late.
    policy = auto()
    first = policy(replace(inputs(target=100 * MiB, available=60 * MiB, total=200 * MiB, host_share=0.25), time=10.0))
    assert first.size == 100 * MiB
    again = replace(inputs(target=100 * MiB, available=45 * MiB, total=200 * MiB, host_share=0.25), time=11.0)
    answer = policy(again)
    assert answer.size == 100 * MiB - 42 * MiB and "using 15 MiB a sample" in answer.reason
    # The same sample seen again keeps the estimate; a fall the balloon
    # itself caused (it took 30 MiB) is no use by the guest.
    assert policy(replace(again, time=11.2, stats_age=0.7)).size == 58 * MiB
    grown = replace(inputs(target=130 * MiB, available=15 * MiB + 30 * MiB, total=200 * MiB, host_share=0.25),
                    time=12.0)
    assert policy(replace(grown, stats={**grown.stats, "available-memory": 45 * MiB - 30 * MiB + 30 * MiB})).size \
        == 130 * MiB


def test_deflate_on_oom_total_counts_the_balloon_out() -> None:
    # With DEFLATE_ON_OOM MemTotal still holds the balloon: 470 - 400 = 70 usable.
    i = inputs(target=400 * MiB, available=10 * MiB, total=470 * MiB, host_share=0.0, doo=True)
    assert i.guest_total == 70 * MiB
    assert "guest short" in auto()(i).reason


def test_hysteresis_between_pressure_and_relax() -> None:
    assert auto()(inputs(target=64 * MiB, host_share=0.25)).size == 64 * MiB
    assert auto()(inputs(target=64 * MiB, host_share=0.35)).size == 32 * MiB
    assert auto()(inputs(target=16 * MiB, host_share=0.9)).size == 0


def test_a_guest_behind_its_target_is_not_asked_for_more() -> None:
    answer = auto()(inputs(target=200 * MiB, actual=100 * MiB, host_share=0.0))
    assert answer.size == 200 * MiB and "lags" in answer.reason


def test_no_host_figures_only_guest_rules() -> None:
    assert auto()(inputs(target=64 * MiB, host_share=None)).size == 64 * MiB
    # Short by 19 MiB (reserve 20, 1 available), plus a step of 32.
    assert auto()(inputs(target=64 * MiB, available=1 * MiB, total=100 * MiB, host_share=None)).size == 13 * MiB


# ---------------------------------------------------------------- answers checked

def active(fn: Any, *, params: dict[str, str] | None = None) -> ActivePolicy:
    return ActivePolicy(PolicySpec("test", params or {}), fn, interval=1.0, host=HostSource())


async def test_a_good_answer_is_a_decision_logged_with_its_inputs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    policy = active(lambda i: Target(i.guest_ram // 4 + 123, "a quarter"))
    decision = await policy.consult(inputs())
    assert decision is not None
    assert decision["to"] == RAM // 4 and decision["action"] == "inflate" and decision["reason"] == "a quarter"
    assert decision["inputs"]["host"]["source"] == "meminfo /proc/meminfo"   # read in the policy's thread
    assert "inflate 0 -> 128 MiB (a quarter); inputs: guest 400 of 470 MiB available" in caplog.text
    assert "host" in caplog.text and "/proc/meminfo" in caplog.text
    assert await policy.consult(inputs(target=RAM // 4)) is None     # no move, no decision
    assert policy.describe()["decisions"] == 1 and policy.describe()["consulted"] == 2
    assert policy.decisions_since(decision["seq"]) == [] and policy.decisions_since(None) == [decision]


async def test_functions_get_their_params_in_the_inputs() -> None:
    seen = []
    policy = active(lambda i: seen.append(dict(i.params)) or 0, params={"share": "0.5", "interval": "3"})
    await policy.consult(inputs(target=4096))
    assert seen == [{"share": "0.5"}]


@pytest.mark.parametrize("answer,message", [
    (-4096, "not a size"),
    (RAM + 4096, "more than the guest's"),
    ("64M", "not a number"),
    (None, "not a number"),
    (True, "not a number"),
    (math.nan, "not a size"),
    (math.inf, "not a size"),
    (Target(-1), "not a size"),
])
async def test_nonsense_switches_off(answer: Any, message: str) -> None:
    with pytest.raises(PolicyFailed, match=message):
        await active(lambda i: answer).consult(inputs())


async def test_raising_switches_off() -> None:
    def broken(i: PolicyInput) -> int:
        raise ZeroDivisionError("oops")

    with pytest.raises(PolicyFailed, match="raised ZeroDivisionError: oops"):
        await active(broken).consult(inputs())


async def test_a_hung_policy_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import vuser.devices.balloon.policy as policy_module

    monkeypatch.setattr(policy_module, "TIMEOUT", 0.2)
    release = threading.Event()

    def hung(i: PolicyInput) -> int:
        # Answers only once the test lets it, which it does after consult
        # returned: a consult that waited for its thread would get 0 here
        # (after 60 s) and make a decision instead of raising.
        release.wait(60)
        return 0

    try:
        with pytest.raises(PolicyFailed, match="no answer within"):
            await active(hung).consult(inputs(target=4096))
    finally:
        release.set()


async def test_the_device_switches_a_failing_policy_off_and_keeps_its_target(
        caplog: pytest.LogCaptureFixture) -> None:
    dev = BalloonDevice(target_pages=100, stats_interval=0.5)
    policy = active(lambda i: -1)
    dev.set_policy(policy)
    assert dev.stats_interval == 1.0           # the policy's interval while on
    dev.policy_input = lambda: inputs(target=100 * 4096)  # type: ignore[method-assign]
    await dev._consult(policy)
    assert dev.policy is None and "not a size" in (dev.policy_off or "")
    assert dev.num_pages == 100 and dev.stats_interval == 0.5
    assert "switched off" in caplog.text
    assert dev.status()["policy"] == {"on": False, "switched_off": dev.policy_off}


# ---------------------------------------------------------------- entry points

USER_POLICIES = """\
def quarter(inputs):
    return inputs.guest_ram * float(inputs.params.get("share", "0.25"))

class Fixed:
    def __init__(self, size="0"):
        self.size = int(size)

    def __call__(self, inputs):
        return self.size
"""


@pytest.fixture
def installed_policy(tmp_path: Path) -> Iterator[Path]:
    """A distribution on sys.path registering two user policies."""
    write_distribution(tmp_path, "mypolicies", {"mypolicies": USER_POLICIES},
                       {"vuser.balloon_policies": {"quarter": "mypolicies:quarter", "fixed": "mypolicies:Fixed"}})
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mypolicies", None)


async def test_user_policies_come_from_the_entry_point_group(installed_policy: Path) -> None:
    assert available()["quarter"] == "mypolicies:quarter"
    quarter = ActivePolicy.load("quarter:share=0.5")
    decision = await quarter.consult(inputs())
    assert decision is not None and decision["to"] == RAM // 2
    fixed = ActivePolicy.load("fixed:size=8192")
    assert (await fixed.consult(inputs()) or {}).get("to") == 8192
    with pytest.raises(DeviceError, match="unexpected keyword"):
        ActivePolicy.load("fixed:colour=red")
