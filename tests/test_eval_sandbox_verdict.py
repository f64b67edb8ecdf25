"""run_tests: the harness computes the verdict; the candidate's code runs in the sandbox and
the trusted tests in the harness against proxies, so only plain data crosses. Each forgery
here passed under run_program's in-child verdict (or could have) and must fail now."""

from __future__ import annotations

import sys

import pytest

import llamaforge.eval.sandbox as sandbox
from llamaforge.eval.sandbox import check_candidates, run_program, run_tests
from llamaforge.eval.tasks import get_task

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")


@pytest.fixture(autouse=True, params=["bwrap", "guard"])
def sandbox_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "bwrap" and not sandbox.isolation_available():
        pytest.skip("bubblewrap (bwrap) is not installed or cannot create namespaces here")
    if request.param == "guard":
        monkeypatch.setattr(sandbox, "_isolation", "")
    return request.param


WRONG = "def f(x):\n    return x\n"  # f(1) == 1, the tests want 2
TESTS = "assert f(1) == 2\n"

FORGERIES = {
    "relays the secret": (
        "import os, time\n"
        "parts = open('/proc/self/cmdline').read().split('\\0')\n"
        "at = [i for i, p in enumerate(parts) if p.endswith('program.py')][-1]\n"
        "report, secret = int(parts[at + 1]), int(parts[at + 2])\n"
        "os.write(report, b'end\\n')\n"
        "os.set_blocking(secret, False)\n"
        "s = b''\n"
        "for _ in range(50):\n"
        "    try:\n        s = os.read(secret, 256)\n        break\n"
        "    except BlockingIOError:\n        time.sleep(0.01)\n"
        "os.set_blocking(secret, True)\n"
        "os.write(report, b'ok\\t' + s.strip() + b'\\n')\n" + WRONG
    ),
    "always-true __eq__": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def f(x):\n    return Yes()\n"
    ),
    "int subclass with a rigged __eq__": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n"
        "def f(x):\n    return I(x)\n"
    ),
    "patches assert-related builtins and settrace": (
        "import builtins, sys\n"
        "class Quiet(Exception):\n    pass\n"
        "builtins.AssertionError = Quiet\n"
        "sys.settrace(lambda *a: None)\n"
        "builtins.__build_class__ = None\n" + WRONG
    ),
    "os._exit(0) at import": "import os\nos._exit(0)\n" + WRONG,
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n" + WRONG,
    "writes to every descriptor": (
        "import os\n"
        "for fd in range(3, 20):\n"
        "    for line in (b'end\\n', b'ok\\tx\\n', b'passed\\n', b'resp\\tgarbage\\n'):\n"
        "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n"
        + WRONG
    ),
    "exits inside the call": "import os\ndef f(x):\n    os._exit(0)\n",
    "closes its pipes": (
        "import os\nfor fd in range(3, 20):\n    try:\n        os.close(fd)\n"
        "    except OSError:\n        pass\n" + WRONG
    ),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgeries_fail(name):
    result = run_tests(FORGERIES[name], TESTS, timeout=5)
    assert not result.passed, result


def test_the_relay_beats_the_in_child_verdict_on_a_wrong_function():
    """The reason for run_tests: run_program passes this wrong function."""
    program = FORGERIES["relays the secret"] + "import os\nos._exit(0)\n" + TESTS
    assert run_program(program, timeout=5).passed
    assert not run_tests(FORGERIES["relays the secret"], TESTS, timeout=5).passed


def test_honest_programs_score_right():
    assert run_tests("def f(x):\n    return 2 * x\n", TESTS).passed
    failed = run_tests(WRONG, TESTS)
    assert failed.status == "failed" and "AssertionError" in failed.detail
    crash = run_tests("def f(x):\n    return 1 / 0\n", TESTS)
    assert crash.status == "failed" and "ZeroDivisionError" in crash.detail
    syntax = run_tests("def f(x) return x\n", TESTS)
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail
    slow = run_tests("def f(x):\n    while True:\n        pass\n", TESTS, timeout=1)
    assert slow.status == "timeout"
    hog = run_tests("x = bytearray(1 << 31)\n" + WRONG, TESTS, memory_mb=256)
    assert hog.status == "killed" and "MemoryError" in hog.detail


def test_plain_data_round_trips():
    candidate = (
        "from collections import Counter, namedtuple\n"
        "P = namedtuple('P', 'a b')\n"
        "def f(x):\n"
        "    return [x, float('nan'), float('inf'), -0.0, (1, 2), {3}, frozenset({4}),\n"
        "            b'\\x00', bytearray(b'a'), {'k': [1]}, 1j, None, True, 10**30,\n"
        "            Counter('aab'), P(1, 2), '\\udc80']\n"
    )
    tests = (
        "import math\n"
        "r = f((1, {2: b'x'}))\n"
        "assert r[0] == (1, {2: b'x'}) and type(r[0]) is tuple\n"
        "assert math.isnan(r[1]) and r[2] == math.inf and math.copysign(1, r[3]) == -1\n"
        "assert r[4:9] == [(1, 2), {3}, frozenset({4}), b'\\x00', bytearray(b'a')]\n"
        "assert r[9:] == [{'k': [1]}, 1j, None, True, 10**30, {'a': 2, 'b': 1}, (1, 2),"
        " '\\udc80']\n"
        "assert r[12] is True and r[11] is None and type(r[12]) is bool\n"
    )
    result = run_tests(candidate, tests)
    assert result.passed, result


def test_exceptions_cross_as_plain_exceptions():
    candidate = (
        "class Mine(Exception):\n    pass\n"
        "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    raise Mine('m')\n"
    )
    tests = (
        "try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
        "else:\n    raise AssertionError\n"
        "try:\n    f(1)\nexcept Exception as e:\n    assert 'Mine: m' in str(e)\n"
    )
    assert run_tests(candidate, tests).passed


def test_opaque_values_stay_in_the_child_as_handles():
    candidate = (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def longest(pairs):\n    return max(p.b - p.a for p in pairs)\n"
        "def gen(n):\n    return (i for i in range(n))\n"
    )
    tests = "assert longest([Pair(1, 5), Pair(2, 3)]) == 4\nassert gen(2) != [0, 1]\n"
    assert run_tests(candidate, tests).passed
    assert not run_tests(candidate, "assert list(gen(2)) == [0, 1]\n").passed


def test_unsendable_arguments_fall_back_to_the_in_child_verdict():
    candidate = "def apply(g, x):\n    return g(x)\n"
    result = run_tests(candidate, "assert apply(lambda v: v + 1, 1) == 2\n")
    assert result.passed and "in-child verdict" in result.detail
    result = run_tests(candidate, "assert apply(lambda v: v, 1) == 2\n")
    assert not result.passed and "in-child verdict" in result.detail


def test_a_swallowed_abort_still_fails():
    tests = "try:\n    f(1)\nexcept BaseException:\n    pass\n"
    assert not run_tests("import os\ndef f(x):\n    os._exit(0)\n", tests).passed


def test_humaneval_style():
    prompt = (
        "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
        "def find_zero(xs):\n"
    )
    test = (
        "import math\n\nMETADATA = {}\n\ndef check(candidate):\n"
        "    for xs in ([1, 2], [-6, 11, -6, 1]):\n"
        "        assert math.fabs(poly(xs, candidate(xs))) < 1e-4\n"
    )
    good = (
        "    lo, hi = -10.0, 10.0\n    while hi - lo > 1e-10:\n        mid = (lo + hi) / 2\n"
        "        if poly(xs, lo) * poly(xs, mid) > 0:\n            lo = mid\n"
        "        else:\n            hi = mid\n    return lo\n"
    )
    assert run_tests(prompt + good, test, "find_zero").passed
    assert not run_tests(prompt + "    return 0.5\n", test, "find_zero").passed
    task = get_task("humaneval", n=2, temperature=0.8, ks=(1, 2))
    doc = {"task_id": "t/32", "prompt": prompt, "entry_point": "find_zero", "test": test}
    assert task.score(doc, [[good, "    return 0.5\n"]]) == {"pass@1": 0.5, "pass@2": 1.0}


def test_mbpp_style():
    mbpp = get_task("mbpp", n=2, temperature=0.8, ks=(1, 2))
    doc = {
        "setup": "import math",
        "test_list": ["assert area(1) == math.pi", "assert math.isclose(area(2), 4 * math.pi)"],
    }
    good = "def area(r):\n    return math.pi * r * r\n"
    forged = "class Y(float):\n    def __eq__(s, o):\n        return True\n" + (
        "def area(r):\n    return Y(0)\n"
    )
    assert mbpp.score(doc, [[good, forged]]) == {"pass@1": 0.5, "pass@2": 1.0}
    results = check_candidates([mbpp.case(doc, good), mbpp.case(doc, forged)], workers=2)
    assert [r.passed for r in results] == [True, False]
