"""Escape attempts against the code sandbox, written as hostile generated code would be.

Each attempt runs against a small world the test owns: a secret file and a victim file
outside the sandbox, a secret environment variable in the parent, a victim process, and
a listening socket. After every attempt the world must be intact: no secret in the
program's output, no file created or changed, the victim process alive, no connection.

Every attempt is shown contained on the isolated path (bubblewrap; skipped where it
cannot run). On the guard-only path (no bubblewrap) only the attempts the README lists
as contained there are run -- the others would succeed, some of them harmfully (killing
a process, writing outside), so they are skipped with that reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamaforge.eval import sandbox
from llamaforge.eval.sandbox import SandboxResult, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

_LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
_REIMPORT = (  # single-phase C modules come back with their original functions
    "import sys\n"
    "for name in ('os', 'posix', 'subprocess', '_posixsubprocess', 'socket', '_socket'):\n"
    "    sys.modules.pop(name, None)\n"
)

# name -> (program, contained without bubblewrap too?). Placeholders: TARGET (a file that
# must never appear), VICTIM_FILE (must keep "keep"), SECRET_FILE, VICTIM_PID, PARENT_PID,
# PORT, THIS_FILE (a file of the parent's checkout).
ESCAPES: dict[str, tuple[str, bool]] = {
    # reading secrets by absolute path
    "read a secret file with open": ("print(open('SECRET_FILE').read())", False),
    "read a secret file with os.open": (
        "import os\nprint(os.read(os.open('SECRET_FILE', os.O_RDONLY), 100))",
        False,
    ),
    "read /etc/shadow": ("print(open('/etc/shadow').read())", os.getuid() != 0),
    "read the parent's source files": ("print(open('THIS_FILE').read())", False),
    "read the parent's /proc/PPID/environ": (
        "print(open('/proc/PARENT_PID/environ', 'rb').read())",
        False,
    ),
    "read another process's /proc/PID/environ": (
        "print(open('/proc/VICTIM_PID/environ', 'rb').read())",
        False,
    ),
    "read every /proc/*/environ": (
        "import os\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        print(open('/proc/' + pid + '/environ', 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n",
        False,
    ),
    # environment
    "print the inherited environment": ("import os\nprint(dict(os.environ))", True),
    "read its own /proc/self/environ": ("print(open('/proc/self/environ', 'rb').read())", True),
    # writes outside through every file API
    "write with open": ("open('TARGET', 'w').write('pwned')", True),
    "write with io.FileIO": ("import io\nio.FileIO('TARGET', 'w').write(b'pwned')", False),
    "write with _io.FileIO": ("import _io\n_io.FileIO('TARGET', 'w').write(b'pwned')", False),
    "overwrite a file with io.FileIO": (
        "import io\nio.FileIO('VICTIM_FILE', 'w').write(b'pwned')",
        False,
    ),
    "write with os.open": (
        "import os\nos.write(os.open('TARGET', os.O_CREAT | os.O_WRONLY), b'pwned')",
        True,
    ),
    "write with sqlite3": (
        "import sqlite3\nsqlite3.connect('TARGET').execute('create table t (x)')",
        False,
    ),
    "write with shutil.copyfile": (
        "import shutil\nopen('mine', 'w').write('pwned')\nshutil.copyfile('mine', 'TARGET')",
        True,
    ),
    "remove a file with os.remove": ("import os\nos.remove('VICTIM_FILE')", True),
    "write through ctypes open/write": (
        _LIBC + "fd = libc.open(b'TARGET', 0o101, 0o644)\nlibc.write(fd, b'pwned', 5)",
        False,
    ),
    "remove a file through ctypes unlink": (_LIBC + "libc.unlink(b'VICTIM_FILE')", False),
    # processes: re-imported os/subprocess, ctypes, exec
    "os.system after re-importing os": (
        _REIMPORT + "import os\nos.system('echo pwned > TARGET')",
        False,
    ),
    "subprocess after re-importing it": (
        _REIMPORT + "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > TARGET'])",
        False,
    ),
    "os.fork after re-importing os": (
        _REIMPORT + "import os\n"
        "if os.fork() == 0:\n"
        "    os.write(os.open('TARGET', os.O_CREAT | os.O_WRONLY), b'pwned')\n"
        "    os._exit(0)\n"
        "os.wait()\n",
        False,
    ),
    "os.execv after re-importing os": (
        _REIMPORT + "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned > TARGET'])",
        False,
    ),
    "system through ctypes": (_LIBC + "libc.system(b'echo pwned > TARGET')", False),
    # network
    "connect with a re-imported socket": (
        _REIMPORT + "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
        False,
    ),
    "connect through ctypes": (
        _LIBC + "import struct\n"
        "fd = libc.socket(2, 1, 0)\n"
        "addr = struct.pack('!HH4s8x', 0, PORT, bytes([127, 0, 0, 1]))\n"
        "addr = struct.pack('=H', 2) + addr[2:]\n"
        "assert libc.connect(fd, addr, 16) == 0, ctypes.get_errno()\n",
        False,
    ),
    "connect with urllib": (
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:PORT/', timeout=2)",
        True,
    ),
    # signals to the parent and other processes
    "os.kill a process": ("import os\nos.kill(VICTIM_PID, 9)", True),
    "os.kill after re-importing os": (_REIMPORT + "import os\nos.kill(VICTIM_PID, 9)", False),
    "kill through ctypes": (_LIBC + "libc.kill(VICTIM_PID, 9)", False),
    "pidfd_send_signal through ctypes": (
        _LIBC + "fd = libc.syscall(434, VICTIM_PID, 0)\n"  # pidfd_open
        "assert fd >= 0, ctypes.get_errno()\n"
        "libc.syscall(424, fd, 9, None, 0)\n",  # pidfd_send_signal
        False,
    ),
    "os.pidfd_open + signal.pidfd_send_signal": (
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(VICTIM_PID), 9)",
        False,
    ),
}

# attempts judged by the sandbox's own verdict, not by the world
BOUNDED = {
    "infinite loop": ("while True:\n    pass\n", "timeout"),
    "memory bomb": ("x = [bytearray(10**7) for _ in range(1000)]\n", "killed"),
    "forged verdict: ok to every descriptor": (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, b'end\\nok\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
        "assert False\n",
        "failed",
    ),
    "forged verdict: os._exit(0)": ("import os\nos._exit(0)\nassert False\n", "failed"),
}


@dataclass
class World:
    secret: str
    secret_file: Path
    victim_file: Path
    target: Path
    victim: subprocess.Popen[bytes]
    listener: socket.socket

    def program(self, template: str) -> str:
        for key, value in {
            "SECRET_FILE": self.secret_file,
            "VICTIM_FILE": self.victim_file,
            "TARGET": self.target,
            "VICTIM_PID": self.victim.pid,
            "PARENT_PID": os.getpid(),
            "PORT": self.listener.getsockname()[1],
            "THIS_FILE": Path(__file__).resolve(),
        }.items():
            template = template.replace(key, str(value))
        return template

    def assert_intact(self, result: SandboxResult) -> None:
        assert self.secret not in result.output, "a secret leaked"
        assert "root:" not in result.output, "/etc/shadow leaked"
        assert "written as hostile generated code" not in result.output, "the parent's files leaked"
        assert not self.target.exists(), "a file was written outside"
        assert self.victim_file.read_text() == "keep", "a file outside was changed"
        assert self.victim.poll() is None, "the victim process was killed"
        self.listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.listener.accept()  # nothing ever connected


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    secret = "secret-" + uuid.uuid4().hex
    monkeypatch.setenv("LLAMAFORGE_ESCAPE_SECRET", secret)
    (tmp_path / "secret.txt").write_text(secret)
    (tmp_path / "victim.txt").write_text("keep")
    victim = subprocess.Popen(["sleep", "60"])  # its environment holds the secret
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        try:
            yield World(
                secret,
                tmp_path / "secret.txt",
                tmp_path / "victim.txt",
                tmp_path / "escaped.txt",
                victim,
                listener,
            )
        finally:
            victim.kill()
            victim.wait()


@pytest.fixture(params=["bwrap", "guard"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "bwrap" and not sandbox.isolation_available():
        pytest.skip("bubblewrap (bwrap) is not installed or cannot create namespaces here")
    if request.param == "guard":
        monkeypatch.setattr(sandbox, "_isolation", "")
    return request.param


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_attempt_is_contained(name: str, mode: str, world: World) -> None:
    template, without_bwrap = ESCAPES[name]
    if mode == "guard" and not without_bwrap:
        pytest.skip("not contained without bubblewrap (listed in the README)")
    result = run_program(world.program(template), timeout=5, isolate=mode == "bwrap")
    world.assert_intact(result)


@pytest.mark.parametrize("name", list(BOUNDED))
def test_bounded_attempt_is_contained(name: str, mode: str) -> None:
    program, expected = BOUNDED[name]
    result = run_program(program, timeout=1.5, memory_mb=256, isolate=mode == "bwrap")
    assert result.status == expected, result


def _live(name: str) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            comm = (entry / "comm").read_text().strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += comm == name and state not in ("Z", "X")
    return count


@pytest.mark.parametrize("how", ["re-imported os.fork", "ctypes fork"])
def test_fork_bomb_is_contained(how: str, mode: str) -> None:
    """2**6 processes (bounded, should the defence fail), all gone after the timeout."""
    if mode == "guard" and how == "re-imported os.fork":
        pytest.skip("not contained without bubblewrap (listed in the README)")
    name = "sbx" + uuid.uuid4().hex[:10]
    fork = "os.fork()" if how == "re-imported os.fork" else "ctypes.CDLL(None).fork()"
    program = (
        _REIMPORT + "import os, ctypes, time\n"
        f"for _ in range(6):\n    {fork}\n"
        f"ctypes.CDLL(None).prctl(15, {name!r}.encode(), 0, 0, 0)\n"
        "time.sleep(60)\n"
    )
    result = run_program(program, timeout=1.5, isolate=mode == "bwrap")
    assert result.status == "timeout", result
    end = time.monotonic() + 3
    while _live(name) and time.monotonic() < end:
        time.sleep(0.05)
    assert _live(name) == 0


@pytest.mark.skipif(sandbox._seccomp_filter() is None, reason="no seccomp filter here")
def test_seccomp_refuses_new_namespaces_ptrace_and_mounts(mode: str) -> None:
    """Without the filter, unshare(CLONE_NEWUSER) succeeds inside bubblewrap (a nested
    user namespace, root in it): the kernel surface the filter takes away."""
    if mode == "guard":
        pytest.skip("the filter is loaded by bubblewrap")
    program = (
        _LIBC + "for name, call in [\n"
        "    ('unshare', lambda: libc.unshare(0x10000000)),\n"
        "    ('ptrace', lambda: libc.syscall(101, 16, 1, 0, 0)),\n"
        "    ('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)),\n"
        "    ('bpf', lambda: libc.syscall(321, 0, 0, 0)),\n"
        "    ('userfaultfd', lambda: libc.syscall(323, 0)),\n"
        "    ('io_uring_setup', lambda: libc.syscall(425, 1, 0)),\n"
        "]:\n"
        "    assert call() == -1 and ctypes.get_errno() == 1, name\n"
    )
    result = run_program(program, isolate=True)
    assert result.passed, result


def test_the_sandbox_sees_its_own_pid_namespace_and_no_network(mode: str) -> None:
    if mode == "guard":
        pytest.skip("namespaces need bubblewrap")
    program = (
        "import os\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "assert len(pids) <= 3, pids\n"
        "assert os.getuid() == 65534\n"
        "assert sorted(os.listdir('/sys/class/net') if os.path.exists('/sys') else []) in "
        "([], ['lo'])\n"
        "assert not os.path.exists('/home') and not os.path.exists('/root/.ssh')\n"
    )
    result = run_program(program, isolate=True)
    assert result.passed, result
    assert signal.SIGKILL  # (imported for the reader: the victims above are killed by 9)
