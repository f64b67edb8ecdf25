"""The sandbox for generated code: real subprocesses, no mocks.

Every hostile program here is bounded by itself (a few hundred processes at most, 4 GB
asked of a 256 MB limit), so a failing defence cannot take the machine down.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llamaforge.eval.sandbox as sandbox
from llamaforge.eval.sandbox import SandboxResult, check_programs, run_program

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


@pytest.fixture(autouse=True, params=["bwrap", "guard"])
def sandbox_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both paths: under bubblewrap (skipped where it cannot run) and with
    the in-process guard only (the fallback)."""
    if request.param == "bwrap" and not sandbox.isolation_available():
        pytest.skip("bubblewrap (bwrap) is not installed or cannot create namespaces here")
    if request.param == "guard":
        monkeypatch.setattr(sandbox, "_isolation", "")
    return request.param


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _live_processes_named(name: str) -> list[int]:
    """Pids of the processes whose comm is `name`, zombies excluded (they are dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if comm == name and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _marker() -> str:
    return "sbx" + uuid.uuid4().hex[:10]  # comm holds 15 characters


# Native code (ctypes) forks past the disabled os.fork, as a C extension could; the
# children rename themselves so the test can find them in /proc.
_NATIVE_FORKS = """
import ctypes, time
libc = ctypes.CDLL(None)
for _ in range({forks}):
    libc.fork()
libc.prctl(15, {name!r}.encode(), 0, 0, 0)  # PR_SET_NAME
time.sleep(60)
"""


# ----------------------------------------------------------------------------- verdicts


def test_passing_program() -> None:
    program = "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n"
    result = run_program(program + "\ncheck(add)\nprint('done')\n")
    assert isinstance(result, SandboxResult)
    assert (result.status, result.detail, result.passed) == ("passed", "passed", True)
    assert result.output == "done\n"
    assert 0 < result.duration < 3


def test_failing_assertion_is_failed_with_its_message() -> None:
    result = run_program("def f():\n    return 1\n\nassert f() == 2, 'wrong answer'\n")
    assert result.status == "failed" and not result.passed
    assert result.detail == "AssertionError: wrong answer"
    assert "Traceback" in result.output and "program.py" in result.output


def test_exception_and_syntax_error_are_failed() -> None:
    raised = run_program("raise ValueError('bad value')")
    assert (raised.status, raised.detail) == ("failed", "ValueError: bad value")
    syntax = run_program("def f(:\n    return 1\n")
    assert syntax.status == "failed"
    assert syntax.detail.startswith("SyntaxError")


def test_leaving_before_the_end_is_failed_even_with_status_0() -> None:
    """A completion that exits before the tests run must not pass (as in human-eval)."""
    early = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert (early.status, early.detail) == ("failed", "the program called exit(0) before its end")
    hard = run_program("import os\nos._exit(0)\nassert False\n")
    assert hard.status == "failed"
    assert hard.detail == "exited with code 0 before the end of the program"


_FORGERIES = {
    "writes the success token to every descriptor, exits 0": (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    for line in (b'ok\\n', b'end\\n', b'ok\\tguess\\n'):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    ),
    "os._exit(0) before the tests": "import os\nos._exit(0)\n",
    "monkeypatches the reporting function and sys.exit": (
        "import os, sys, __main__\n"
        "__main__.report = lambda kind, message='': os.write(__main__.status_fd, b'ok\\n')\n"
        "sys.exit = lambda code=0: os._exit(0)\n"
    ),
    "closes every descriptor, then runs to its end": "import os\nos.closerange(3, 1024)\n",
    "reads the secret pipe before the end": (
        "import os, __main__\n"
        "os.set_blocking(__main__.secret_fd, False)\n"
        "try:\n"
        "    got = os.read(__main__.secret_fd, 256)\n"
        "except BlockingIOError:\n"
        "    got = b'nothing yet'\n"
        "os.write(__main__.status_fd, b'ok\\t' + got.strip() + b'\\n')\n"
        "os._exit(0)\n"
    ),
}


@pytest.mark.parametrize("program", list(_FORGERIES.values()), ids=list(_FORGERIES))
def test_a_forged_verdict_is_not_passed(program: str) -> None:
    """The verdict carries a per-run secret the parent sends only after the program ran
    to its end: writing "ok", leaving early, patching the reporter or closing the
    descriptors cannot pass a program whose tests never ran."""
    result = run_program(program + "\nassert False, 'the tests ran and failed'\n", timeout=3)
    assert result.status in ("failed", "timeout") and not result.passed, result


def test_honest_programs_still_score_right_after_the_secret_exchange() -> None:
    results = check_programs(
        [
            "assert sum([1, 2]) == 3\n",
            "assert sum([1, 2]) == 4\n",
            "import os\nos.closerange(3, 1024)",
        ],
        workers=2,
    )
    assert [r.status for r in results] == ["passed", "failed", "failed"]
    assert results[1].detail == "AssertionError"


# ----------------------------------------------------------------------------- limits


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert (result.status, result.detail) == ("timeout", "timed out after 1 s")
    assert 1.0 <= result.duration < 2.0
    assert time.monotonic() - start < 2.5


def test_cpu_limit_kills() -> None:
    result = run_program("while True:\n    pass\n", timeout=10.0, cpu_seconds=1)
    assert (result.status, result.detail) == ("killed", "CPU time limit exceeded (SIGXCPU)")
    assert result.duration < 5


@linux_only
def test_memory_bomb_is_killed_quickly() -> None:
    at_once = run_program("x = bytearray(4 * 1024**3)\n", memory_mb=256)
    assert (at_once.status, at_once.detail) == ("killed", "MemoryError (memory limit 256 MB)")
    growing = run_program(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", memory_mb=256
    )
    assert (growing.status, growing.detail) == ("killed", "MemoryError (memory limit 256 MB)")
    assert at_once.duration < 2 and growing.duration < 3
    assert run_program("x = bytearray(64 * 1024**2)\n", memory_mb=256).passed


def test_output_is_capped() -> None:
    result = run_program("import sys\nsys.stdout.write('x' * 100_000_000)\n", max_output_bytes=1000)
    assert result.status == "passed"
    assert result.output.startswith("x" * 1000)
    assert "99999000 more bytes of output dropped" in result.output
    assert len(result.output) < 1100


# ----------------------------------------------------------------------------- processes


@linux_only
def test_children_are_killed_on_timeout() -> None:
    name = _marker()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_program, _NATIVE_FORKS.format(forks=1, name=name), 1.5)
        started = _wait_for(lambda: len(_live_processes_named(name)) == 2, 1.4)
        result = future.result()
    assert started, "the program did not fork its child"
    assert (result.status, result.detail) == ("timeout", "timed out after 1.5 s")
    assert _wait_for(lambda: not _live_processes_named(name), 2.0)


def test_python_fork_bomb_is_refused() -> None:
    # 2**8 = 256 processes at most, each exiting at once, should the defence fail
    result = run_program("import os\nfor _ in range(8):\n    os.fork()\n")
    assert result.status == "failed"
    assert result.detail == "PermissionError: [Errno 1] os.fork is disabled in the sandbox"
    pool = run_program(
        "import multiprocessing\n"
        "for _ in range(8):\n"
        "    multiprocessing.Process(target=print).start()\n"
    )
    assert pool.status == "failed" and "is disabled in the sandbox" in pool.detail
    assert run_program("print('still fine')").output == "still fine\n"


@linux_only
def test_native_fork_bomb_is_contained() -> None:
    """Forks the disabled functions cannot stop (2**6 = 64 processes, bounded) die with
    the process group when the timeout hits; the harness goes on."""
    name = _marker()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_program, _NATIVE_FORKS.format(forks=6, name=name), 1.5)
        forked = _wait_for(lambda: len(_live_processes_named(name)) > 8, 1.4)
        result = future.result()
    assert forked, "the bomb did not go off"
    assert result.status == "timeout"
    assert _wait_for(lambda: not _live_processes_named(name), 3.0)
    assert run_program("print('still fine')").passed


def test_stragglers_are_killed_when_the_program_ends() -> None:
    """A passing program that leaves a native child behind returns at once (the child
    holds the output pipe, but is killed with the group)."""
    program = (
        "import ctypes, time\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        "    time.sleep(60)\n"
        "print('parent done')\n"
    )
    result = run_program(program, timeout=5.0)
    assert result.status == "passed" and "parent done" in result.output
    assert result.duration < 2


# ----------------------------------------------------------------------------- filesystem


def test_writes_outside_the_directory_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "escape.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    programs = [
        f"open({str(target)!r}, 'w').write('pwned')",
        f"open({str(target)!r}, 'a').write('pwned')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        f"import shutil\nopen('mine', 'w').close()\nshutil.copy('mine', {str(target)!r})",
        f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})",
        f"import os\nos.chdir('/')\nopen({os.path.relpath(target, '/')!r}, 'w')",
        f"open({str(victim)!r}, 'w').write('pwned')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen')",
    ]
    results = check_programs(programs, timeout=5.0, workers=2)
    for program, result in zip(programs, results):
        assert result.status == "failed", program
        assert "outside the sandbox directory is refused" in result.detail, program
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "keep"


def test_writes_inside_the_directory_work_and_it_is_removed() -> None:
    program = (
        "import os, tempfile\n"
        "open('note.txt', 'w').write('ok')\n"
        "assert open('note.txt').read() == 'ok'\n"
        "os.mkdir('sub')\n"
        "os.rename('note.txt', 'sub/note.txt')\n"
        "os.remove('sub/note.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x')\n"
        "print(os.getcwd())\n"
    )
    result = run_program(program)
    assert result.passed, result.detail
    workdir = Path(result.output.strip())
    assert workdir.name == "work" and not workdir.exists()


def test_destructive_functions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "file").write_text("keep")
    refused = {
        "import os\nos.system('true')": "os.system",
        f"import shutil\nshutil.rmtree({str(tmp_path / 'data')!r})": "shutil.rmtree",
        "import subprocess\nsubprocess.run(['true'])": "subprocess.Popen",
        "import subprocess\nsubprocess.check_output('echo hi', shell=True)": "subprocess.Popen",
        "import os\nos.kill(os.getppid(), 9)": "os.kill",
        f"import os\nos.chmod({str(tmp_path)!r}, 0)": "os.chmod",
        "import os\nos.execv('/bin/true', ['true'])": "os.execv",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})": "os.posix_spawn",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))": "resource.setrlimit",
    }
    results = check_programs(list(refused), workers=2)
    for (program, name), result in zip(refused.items(), results):
        assert result.status == "failed", program
        assert result.detail == f"PermissionError: [Errno 1] {name} is disabled in the sandbox"
    assert (tmp_path / "data" / "file").read_text() == "keep"


# ----------------------------------------------------------------------------- network


def test_network_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        programs = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            f"s.connect(('127.0.0.1', {port}))",
            f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ]
        results = check_programs(programs, timeout=5.0, workers=2)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    for program, result in zip(programs, results):
        assert result.status == "failed", program
        assert "network access is disabled in the sandbox" in result.detail, program


# ----------------------------------------------------------------------------- many


def test_check_programs_keeps_input_order() -> None:
    programs = [
        "import time\ntime.sleep(0.5)\n",  # finishes after the ones below
        "assert 1 + 1 == 3\n",
        "while True:\n    print('y' * 1000)\n",
        "def broken(:\n",
        "x = bytearray(4 * 1024**3)\n",
        "print('fast')\n",
    ]
    results = check_programs(programs, timeout=1.5, memory_mb=256, workers=3)
    statuses = [r.status for r in results]
    expected = ["passed", "failed", "timeout", "failed", "killed", "passed"]
    if not sys.platform.startswith("linux"):  # RLIMIT_AS is not enforced everywhere
        statuses, expected = statuses[:4] + statuses[5:], expected[:4] + expected[5:]
    assert statuses == expected
    assert results[1].detail == "AssertionError"
    assert results[3].detail.startswith("SyntaxError")
    assert results[5].output == "fast\n"
    assert len(results[2].output) < 65536 + 100  # printing forever is capped
    assert check_programs([]) == []


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError):
        run_program("pass", memory_mb=0)
    with pytest.raises(ValueError):
        check_programs(["pass"], workers=0)


def test_child_is_a_script_run_by_path_without_the_package():
    assert sandbox._CHILD.is_file() and sandbox._CHILD.parent == Path(sandbox.__file__).parent
    with pytest.raises(ImportError, match="run by sandbox.py"):
        import llamaforge.eval._sandbox_child  # noqa: F401
    program = (
        "import sys\n"
        "assert not [m for m in sys.modules if m.startswith('llamaforge')], sorted(sys.modules)\n"
        f"assert {str(sandbox._CHILD.parent)!r} not in sys.path, sys.path\n"
        "assert sys.argv == [__file__] and __name__ == '__main__'\n"
    )
    result = run_program(program, timeout=10)
    assert result.passed, result


def test_missing_bubblewrap_falls_back_with_one_warning(
    sandbox_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sandbox_mode == "bwrap":
        pytest.skip("one path is enough")
    monkeypatch.setattr(sandbox, "_isolation", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="bubblewrap .* is not installed") as caught:
        assert not sandbox.isolation_available()
        assert run_program("assert 1 + 1 == 2").passed
    assert len(caught) == 1
    with pytest.raises(RuntimeError, match="isolate=True"):
        run_program("pass", isolate=True)


def test_a_python_installation_under_tmp_is_not_hidden_by_the_private_tmp(monkeypatch, tmp_path):
    """bubblewrap applies mounts in order: the private /tmp must come before the bind of a
    venv that lives under /tmp (as in a CI checkout there), or the child cannot start."""
    from llamaforge.eval import sandbox

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    monkeypatch.setattr(sandbox.sys, "prefix", str(venv))
    argv = sandbox._bwrap_argv("bwrap", tmp_path / "run", {}, None)
    binds = [i for i, a in enumerate(argv) if a == "--ro-bind" and argv[i + 1] == str(venv)]
    assert binds and argv.index("--tmpfs") < binds[0]
