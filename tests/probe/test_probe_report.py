"""The probe's report (the JSON contract, the table, the exit status),
what each exception a check raises becomes, and usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from vuser.frontend import BackendTimeout
from vuser.probe.report import CheckResult, Report
from vuser.probe.run import classify
from vuser.probe.target import BackendGone, expand_command
from vuser.probe.work import Fail, Skip


def report(*results: str, policy: str | None = None) -> Report:
    r = Report("balloon", queue_policy=policy)
    for i, res in enumerate(results):
        r.add(CheckResult(f"check/{i}", res, f"detail {i}"))
    return r


def test_json_is_the_contract() -> None:
    out = report("pass", "skip", policy="offered").as_json()
    assert list(out) == ["device", "checks", "queue_policy", "summary"]
    assert out["checks"][0] == {"name": "check/0", "result": "pass", "detail": "detail 0"}
    assert out["summary"] == {"pass": 1, "fail": 0, "skip": 1, "error": 0}
    assert list(report("pass").as_json()) == ["device", "checks", "summary"]  # no queue policy: absent


@pytest.mark.parametrize("results,code", [(("pass", "skip"), 0), (("pass", "fail"), 1), (("error",), 1), ((), 0)])
def test_exit_code(results: tuple[str, ...], code: int) -> None:
    assert report(*results).exit_code == code


def test_table_has_every_check_and_the_summary() -> None:
    text = report("pass", "fail", policy="negotiated").table("title")
    assert text.splitlines()[0] == "title"
    assert "PASS   check/0  detail 0" in text and "FAIL   check/1  detail 1" in text
    assert "queue policy: negotiated" in text and text.endswith("1 pass, 1 fail, 0 skip, 0 error")


def test_unknown_result_or_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        CheckResult("x", "maybe", "")
    with pytest.raises(ValueError):
        report(policy="random").as_json()


@pytest.mark.parametrize("exc,result", [
    (Skip("no"), "skip"), (Fail("bad"), "fail"), (BackendGone("gone"), "error"),
    (BackendTimeout("GET_FEATURES", "no reply"), "fail"), (trio.TooSlowError(), "error"),
    (ValueError("oops"), "error"), (ExceptionGroup("g", [Fail("inner")]), "fail"),
])
def test_classify(exc: Exception, result: str) -> None:
    assert classify(exc)[0] == result


def test_exec_command_must_name_the_socket() -> None:
    assert expand_command(["b", "--socket-path={socket}"], "/s") == ["b", "--socket-path=/s"]
    with pytest.raises(ValueError):
        expand_command(["b"], "/s")


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu", "--socket", "/x"], "unknown device 'gpu'"),
    (["--device", "rng"], "give --socket PATH"),
    (["--device", "rng", "--exec", "backend --no-socket"], "must name the socket as {socket}"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    run = subprocess.run([sys.executable, "-m", "vuser.cli", "probe", *args], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
