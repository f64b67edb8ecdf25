"""Run model-generated Python (HumanEval, MBPP) in a contained subprocess.

`run_tests` (what HumanEval and MBPP use; `check_candidates` runs many on a thread pool)
runs the candidate's code (prompt + completion; MBPP: setup + completion) in the sandbox
and the trusted test code (HumanEval's ``check`` and ``check(<entry>)``; MBPP's setup and
asserts) in the harness, so the harness computes the verdict (below). `run_program` runs
one complete program (prompt + completion + tests + ``check(...)``) in the child and
reports whether it ran to its end and exited 0 within the limits; `check_programs` runs
many of them on a thread pool, each thread supervising one subprocess.

What the sandbox does, per program (POSIX; fully on Linux):

* under bubblewrap (``bwrap``) where it is installed and can create namespaces (checked
  once; otherwise a one-time ``RuntimeWarning`` and the guard below only): new user (uid
  65534, no capabilities), PID, network (loopback only), IPC, UTS, cgroup and mount
  namespaces; a read-only ``/usr`` and Python installation, ``/etc/ld.so.cache`` and
  nothing else of the host's files; a private 256 MB tmpfs ``/tmp`` holding only the
  program, the child script (both read-only) and the writable working directory; its own
  ``/proc`` and a minimal ``/dev``; ``--clearenv`` and the minimal environment below;
  ``--die-with-parent`` and ``--new-session``; the PID namespace dies with its first
  process; on x86_64 a seccomp deny-list (EPERM). The guard below still runs inside it;

* a separate interpreter, ``sys.executable -I -B`` (isolated: no user site, no ``PYTHON*``
  variables), in a new session, so the whole process group is killed (SIGKILL) and reaped
  on timeout, and stragglers are killed when the program ends;
* a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), removed afterwards;
  a minimal environment (no proxies, one thread for BLAS/OpenMP); stdin is ``/dev/null``;
* ``resource`` limits: address space (``memory_mb``), CPU time, file size, no core dumps,
  open files, and, when not running as root, a process count a little above the user's
  current one (the kernel does not apply that limit to root);
* inside the child, before the program runs: destructive ``os``/``posix`` functions (kill,
  system, fork, exec*, spawn*, chmod, chown, setuid, setsid, link, truncate, ...),
  ``shutil.rmtree``/``move``/``chown``, ``subprocess.Popen`` (hence ``run``/``call``/...),
  ``os.posix_spawn``, ``_posixsubprocess.fork_exec`` and ``resource.setrlimit`` raise
  ``PermissionError``; so do sockets and DNS lookups; ``open``/``os.open``/``os.mkdir``
  for writing, and ``os.remove``/``unlink``/``rmdir``/``rename``/``replace``, work inside
  the working directory only (``tempfile`` keeps working) and raise ``PermissionError``
  elsewhere. ``os.putenv`` stays (numpy needs it; it only changes the child's environment);
* output (stdout and stderr together) is read continuously and only the first
  ``max_output_bytes`` are kept, so a program printing forever cannot exhaust memory.

A program passes only if it runs to its end: one that leaves early through ``sys.exit`` or
``os._exit`` -- even with status 0, e.g. before the tests run -- fails, as in OpenAI's
human-eval. The program runs as ``__main__``.

run_tests' verdict cannot be forged by the candidate. Once its code has run, the child
reports the names of its top-level callables and serves calls; the tests run here, in the
harness's interpreter (in the calling thread), with a proxy for each name. A call sends
its arguments to the child and gets the result back, both as tagged JSON of plain data
only: None, bool, int, float (nan, inf, -0.0 kept), complex, str, bytes, bytearray, list,
tuple, set, frozenset, dict. A subclass of one of these (Counter, OrderedDict -- its order
is lost --, a namedtuple, an IntEnum, an int whose ``__eq__`` is always true) crosses as
its base type's value; the harness decodes with its own code into built-in objects, so no
object of the candidate's reaches the tests. An exception crosses as its type name and
message, raised here as that built-in exception (else `RemoteError`). Any other value (a
generator, an instance of the candidate's class) stays in the child as a `Handle`: it can
be passed back to the candidate's functions, called, and equals only itself. A call that
finds the child dead, past the deadline (import and tests together) or answering
nonsense ends the tests as failed. Whatever the candidate does in its own interpreter --
sending "end", relaying a secret, ``os._exit(0)``, patching builtins or ``sys.settrace``,
``ctypes``, writing to any descriptor, answering calls itself -- only changes which plain
values come back, which is what any function can do; the tests' own asserts and
comparisons run where it cannot reach. Fallback: when the tests pass the candidate an
argument that is not plain data (a lambda, an object of the tests' own), decided by the
trusted side only, run_tests runs the whole program with run_program instead, and the
detail says "(in-child verdict: ...)". Not preserved across the boundary: in-place
changes the candidate makes to its arguments (the harness keeps its own copies).

run_program's verdict: the child reports "end" on a pipe once
``exec`` of the whole program has returned; only then does the parent send a per-run
secret (``secrets.token_hex``, never in the child's environment, files or memory before)
on a second pipe, once, and it counts a pass only for "ok\t<that secret>" followed by exit
status 0. Writing "ok" to a descriptor, ``os._exit(0)``, patching the reporter or closing
the descriptors therefore fail. What remains: the program shares its interpreter with the
tests, so one written against this harness can send "end" itself and relay the secret,
or subvert the tests (``__eq__`` that is always true, trace-function jumps, ``ctypes``);
run_tests exists for that.

Without bubblewrap, what it is NOT: a security boundary. It stops the accidents a
language model produces (infinite loops, fork and memory bombs, ``rm -rf``, stray writes
and downloads), with the same stance as OpenAI's human-eval ``execution.py``. Code
written to escape can: call native code through ``ctypes`` (fork, setsid, syscalls,
writes), use ``io.FileIO`` or pre-imported references to the original functions, or
restore what was disabled. It runs with the caller's user id and filesystem permissions,
and the network is blocked only at the Python level. With bubblewrap the same code is
held by the kernel's namespaces instead (see the README for the list), and on x86_64 a
seccomp filter (`_seccomp_filter`, loaded by ``bwrap --seccomp``) refuses the system calls
that widen the kernel surface: new namespaces, mounts, ptrace, bpf, io_uring, ...
"""

from __future__ import annotations

import builtins
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "killed")

_FILE_SIZE_LIMIT = 64 * 1024 * 1024  # largest file the program may write in its directory
_OPEN_FILES_LIMIT = 256
_NPROC_MARGIN = 64  # tasks (processes + threads) a sandbox may add to the user's count
_TAIL_BYTES = 4096  # end of the output kept to explain a crash the driver did not report
_DETAIL_CHARS = 300


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "killed" (resource limit / signal)
    detail: str  # short reason: last line of the traceback, "timed out after 3 s", ...
    duration: float  # seconds, wall clock, from launch to reaping
    output: str = field(default="", repr=False)  # stdout + stderr, first max_output_bytes

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------- the child

# Runs as `python -I -B _sandbox_child.py program status workdir memory cpu fsize nofile
# nproc`, by path (the file next to this one): see that module.
_CHILD = Path(__file__).with_name("_sandbox_child.py")


# ----------------------------------------------------------------------------- the parent


_TMPFS_BYTES = 256 * 1024 * 1024  # the sandbox's private /tmp (bubblewrap)
_SANDBOX_UID = 65534  # nobody, inside the user namespace
_isolation_lock = threading.Lock()
_isolation: str | None = None  # the bwrap path once checked ("" when unavailable)


def _bwrap_path() -> str:
    """bwrap's path when it can create the namespaces here (checked once, with a one-time
    warning when not), else ""."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            found = shutil.which("bwrap") if sys.platform.startswith("linux") else None
            why = "bubblewrap (bwrap) is not installed"
            if found:
                try:
                    probe = subprocess.run(
                        [found, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
                         "true"],
                        capture_output=True, timeout=30,
                    )  # fmt: skip
                    ok = probe.returncode == 0
                    why = f"bwrap cannot create namespaces: {probe.stderr.decode().strip()}"
                except (OSError, subprocess.SubprocessError) as exc:
                    ok, why = False, f"bwrap failed: {exc}"
                if not ok:
                    found = None
            _isolation = found or ""
            if not found:
                warnings.warn(
                    f"llamaforge sandbox: {why}; generated code runs under the in-process "
                    "guard only, which is not a security boundary (apt-get install "
                    "bubblewrap; see the README's sandbox paragraph)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _isolation


def isolation_available() -> bool:
    """True when programs run under bubblewrap (namespaces) rather than the guard only."""
    return bool(_bwrap_path())


# System calls a generated program never needs and that widen the kernel surface reachable
# from the namespaces (x86_64 numbers): new namespaces and mounts, ptrace and process_vm_*,
# module loading, kexec, bpf, perf, userfaultfd, io_uring, keyrings, clock and host
# settings, handle-based opens, pidfd_getfd, kcmp. They fail with EPERM.
_DENIED_X86_64 = (
    101, 103, 135, 153, 155, 159, 161, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172,
    173, 175, 176, 179, 212, 227, 246, 248, 249, 250, 272, 298, 300, 303, 304, 305, 308,
    310, 311, 312, 313, 320, 321, 323, 425, 426, 427, 428, 429, 430, 431, 432, 438, 442,
)  # fmt: skip


def _seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program (what ``bwrap --seccomp`` loads): kill on a foreign
    architecture or the x32 ABI, EPERM for `_DENIED_X86_64`, allow the rest. None off
    x86_64 (no filter there yet)."""
    import platform
    import struct

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill, eperm = 0x7FFF0000, 0x80000000, 0x00050000 | 1
    denied = _DENIED_X86_64
    n = len(denied)
    # 0 ld arch; 1 jeq x86_64 else kill; 2 ld nr; 3 jge x32 -> eperm; 4.. jeq nr -> eperm;
    # then: ret allow, ret eperm, ret kill
    allow_at, eperm_at, kill_at = 4 + n, 5 + n, 6 + n
    code = [(ld, 0, 0, 4), (jeq, 0, kill_at - 2, 0xC000003E), (ld, 0, 0, 0)]
    code.append((jge, eperm_at - 4, 0, 0x40000000))
    code += [(jeq, eperm_at - (4 + i) - 1, 0, nr) for i, nr in enumerate(denied)]
    code += [(ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, kill)]
    assert len(code) == kill_at + 1 and allow_at == 4 + n
    return b"".join(struct.pack("=HBBI", *insn) for insn in code)


def _bwrap_argv(bwrap: str, root: Path, env: dict[str, str], seccomp_fd: int | None) -> list[str]:
    """bwrap's options: new user/PID/network/IPC/UTS/cgroup/mount namespaces, a read-only
    /usr and Python installation, a private /tmp holding only this run's directory (the
    program and child script read-only, the working directory writable) and, read-only,
    a Python installation or checkout that lives under /tmp, a fresh /proc and /dev, no
    inherited environment, no capabilities."""
    argv = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID), "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += ["--ro-bind", name, name]
    if os.path.exists("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # mounts apply in order: the private /tmp first, so that a Python installation (a
    # venv) or a checkout under /tmp, bound after it, is not hidden by it
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(_TMPFS_BYTES), "--tmpfs", "/tmp", "--dir", str(root)]
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    python |= {str(Path(sys.executable).parent), str(Path(sys.executable).resolve().parents[1])}
    for path in sorted(python):
        if path and os.path.isdir(path) and not path.startswith("/usr/"):
            real = os.path.realpath(path)
            argv += ["--ro-bind", real, real]
            if real != path:
                argv += ["--symlink", real, path]
    argv += ["--ro-bind", str(_CHILD), str(_CHILD)]
    argv += ["--ro-bind", str(root / "program.py"), str(root / "program.py")]
    argv += ["--bind", str(root / "work"), str(root / "work"), "--chdir", str(root / "work")]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--"]


def _read_available(fd: int, feed: Callable[[bytes], None], max_chunks: int = 16) -> bool:
    """Hand what a non-blocking ``fd`` has to ``feed``; True at end of file."""
    for _ in range(max_chunks):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        feed(data)
    return False


class _Capture:
    """Keeps the first `limit` bytes of a stream and its last few KB; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = b""
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))
        self.tail = (self.tail + data)[-_TAIL_BYTES:]

    def read(self, fd: int) -> bool:
        """Read what is available (non-blocking fd); True at end of file."""
        return _read_available(fd, self.feed)

    def text(self) -> str:
        out = self.head.decode("utf-8", "replace")
        if self.dropped:
            out += f"\n[sandbox: {self.dropped} more bytes of output dropped]\n"
        return out

    def last_line(self) -> str:
        lines = self.tail.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


class _Reports:
    """The child's report pipe: lines "<kind>[\t<message>]". On the first "end" (the
    program ran to its end) the per-run secret is written to the secret pipe, which is
    then closed: it is sent once, and never before the child asks for it."""

    def __init__(self, secret_w: int, secret: str) -> None:
        self.secret_w: int | None = secret_w
        self.secret = secret
        self.buffer = bytearray()
        self.lines: list[str] = []
        self.sent = False

    def read(self, fd: int) -> bool:
        """Read what is available (non-blocking fd); True at end of file."""
        return _read_available(fd, self.feed)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *complete, rest = self.buffer.split(b"\n")
        self.buffer = bytearray(rest[:4096])
        for raw in complete:
            if len(self.lines) < 64:
                self.lines.append(raw[:4096].decode("utf-8", "replace"))
            if raw == b"end" and not self.sent:
                self.send_secret()

    def send_secret(self) -> None:
        self.sent = True
        if self.secret_w is not None:
            try:
                os.write(self.secret_w, self.secret.encode("ascii") + b"\n")
            except OSError:
                pass
            self.close()

    def close(self) -> None:
        if self.secret_w is not None:
            os.close(self.secret_w)
            self.secret_w = None

    def verdict_line(self) -> str:
        """ "ok" if the child proved it ran to its end, else its last failure report."""
        if self.sent and f"ok\t{self.secret}" in self.lines:
            return "ok"
        return _last_failure(self.lines)


def _last_failure(lines: list[str]) -> str:
    """The last failure the child reported ("error", "memory" or "exit" and its message),
    or ""."""
    failures = [line for line in lines if line.split("\t")[0] in ("error", "memory", "exit")]
    return failures[-1] if failures else ""


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Has the process ended? Leaves it unreaped (a zombie keeps its process group id
    reserved, so killing the group afterwards cannot hit an unrelated process)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return proc.poll() is not None
    try:
        return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    killpg = getattr(os, "killpg", None)
    if killpg is not None:
        try:
            killpg(proc.pid, signal.SIGKILL)  # start_new_session: process group id == pid
        except (ProcessLookupError, PermissionError):
            pass
    if proc.returncode is None:
        try:
            proc.kill()
        except (ProcessLookupError, PermissionError):
            pass


def _read_ready(
    sel: selectors.BaseSelector, ready: set[int], readers: dict[int, Callable[[int], bool]]
) -> None:
    """Read each descriptor of ``readers`` (fd -> its reader, True at the end of its input)
    that is in ``ready``; one at its end leaves ``sel``."""
    for fd, read in readers.items():
        if fd in ready and read(fd):
            sel.unregister(fd)


def _supervise(
    proc: subprocess.Popen[bytes],
    deadline: float,
    capture: _Capture,
    reports: _Reports,
    report_r: int,
) -> bool:
    """Read output and reports until the program ends or the deadline passes; kill its
    process group; reap it. True if it timed out."""
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    os.set_blocking(report_r, False)
    readers = {out: capture.read, report_r: reports.read}
    pidfd: int | None = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)  # readable once the process has exited
        except OSError:
            pidfd = None
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        sel.register(report_r, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                # without a pidfd, poll for the exit every 10 ms
                wait = remaining if pidfd is not None else min(remaining, 0.01)
                if sel.get_map():
                    ready = {key.fd for key, _ in sel.select(wait)}
                else:
                    time.sleep(wait)
                    ready = set()
                _read_ready(sel, ready, readers)
                if pidfd is not None and pidfd in ready:
                    break
                if pidfd is None and _exited(proc):
                    break
            _kill_group(proc)  # on timeout; otherwise the children it left behind
            drain_until = time.monotonic() + 1.0
            while any(fd in sel.get_map() for fd in readers) and time.monotonic() < drain_until:
                _read_ready(sel, {key.fd for key, _ in sel.select(0.05)}, readers)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep): leave it
        pass
    return timed_out


def _exit_status(returncode: int | None, bwrap: str) -> int | None:
    """The child's exit status as Popen reports it (-N: killed by signal N); under bwrap,
    which exits 128 + N for a child killed by signal N, that too."""
    if bwrap and returncode is not None and 128 < returncode < 128 + 65:
        return 128 - returncode
    return returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _verdict(
    timed_out: bool,
    returncode: int | None,
    report: str,
    capture: _Capture,
    timeout: float,
    memory_mb: int,
) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"timed out after {timeout:g} s"
    if returncode is None:
        return "killed", "could not be reaped"
    if returncode < 0:
        sig = -returncode
        if sig == getattr(signal, "SIGXCPU", None):
            return "killed", "CPU time limit exceeded (SIGXCPU)"
        if sig == getattr(signal, "SIGXFSZ", None):
            return "killed", "file size limit exceeded (SIGXFSZ)"
        return "killed", f"killed by signal {sig} ({_signal_name(sig)})"
    kind, _, message = report.partition("\t")
    if kind == "ok":
        if returncode == 0:
            return "passed", "passed"
        return "failed", f"exit code {returncode} at interpreter shutdown"
    if kind == "memory":
        return "killed", f"{message} (memory limit {memory_mb} MB)"
    if kind in ("error", "exit") and message:
        return "failed", message
    last = capture.last_line()
    why = f"exited with code {returncode} before the end of the program"
    return "failed", f"{why}: {last}" if last else why


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _launch(
    root: Path, program: str, memory_mb: int, cpu: int, bwrap: str, serve: bool
) -> tuple[subprocess.Popen[bytes] | OSError, int, int]:
    """Write the program under `root` and start the child (under bwrap when `bwrap`).
    Returns (the process or the launch error, the report pipe's read end, the secret /
    request pipe's write end); the child's ends are closed here."""
    workdir = root / "work"
    workdir.mkdir()
    program_path = root / "program.py"
    program_path.write_text(program, encoding="utf-8")
    # the child reports on one pipe; the parent writes to it on the other (the secret, or
    # run_tests' calls); the child's ends are inherited, the parent's are close-on-exec
    report_r, report_w = os.pipe()
    secret_r, secret_w = os.pipe()
    argv = [
        sys.executable or "python3", "-I", "-B", str(_CHILD), str(program_path),
        str(report_w), str(secret_r), str(workdir), str(memory_mb * 1024 * 1024),
        str(cpu), str(_FILE_SIZE_LIMIT), str(_OPEN_FILES_LIMIT), str(_NPROC_MARGIN),
    ]  # fmt: skip
    if serve:
        argv.append("serve")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    extra_fds: tuple[int, ...] = ()
    if bwrap:
        bpf = _seccomp_filter()
        if bpf is not None:  # bwrap reads it from a pipe (a few hundred bytes)
            bpf_r, bpf_w = os.pipe()
            os.write(bpf_w, bpf)
            os.close(bpf_w)
            extra_fds = (bpf_r,)
        argv = _bwrap_argv(bwrap, root, env, extra_fds[0] if extra_fds else None) + argv
    try:
        proc: subprocess.Popen[bytes] | OSError = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=(report_w, secret_r, *extra_fds),
        )
    except OSError as exc:
        proc = exc
    for fd in (report_w, secret_r, *extra_fds):
        os.close(fd)
    return proc, report_r, secret_w


def _not_launched(error: OSError, report_r: int, write_end: int) -> SandboxResult:
    """The result of a child that could not start; its pipes' parent ends closed."""
    os.close(report_r)
    os.close(write_end)
    return SandboxResult("failed", _short(f"sandbox error: {error}"), 0.0)


def _check_limits(
    timeout: float,
    memory_mb: int,
    max_output_bytes: int,
    cpu_seconds: int | None,
    isolate: bool | None,
) -> tuple[int, str]:
    """Validate a run's limits; return its CPU seconds (default ceil(timeout) + 1) and the
    bubblewrap binary to use ("" for the guard only)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    if cpu <= 0:
        raise ValueError(f"cpu_seconds must be positive, got {cpu_seconds}")
    bwrap = _bwrap_path() if isolate is not False else ""
    if isolate and not bwrap:
        raise RuntimeError("isolate=True but bubblewrap cannot run here")
    return cpu, bwrap


def run_program(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    cpu_seconds: int | None = None,
    max_output_bytes: int = 65536,
    isolate: bool | None = None,
) -> SandboxResult:
    """Run one complete Python program (e.g. prompt + completion + test code +
    ``check(entry_point)``) in a sandbox; passed iff it runs to its end and exits 0 within
    the limits. `cpu_seconds` defaults to ceil(timeout) + 1. `isolate`: None runs it under
    bubblewrap when that works here (else the guard only, with a one-time warning), True
    requires bubblewrap (RuntimeError without), False uses the guard only. Never raises
    because of what the program does (a failure to launch it is reported as "failed")."""
    cpu, bwrap = _check_limits(timeout, memory_mb, max_output_bytes, cpu_seconds, isolate)
    capture = _Capture(max_output_bytes)
    with tempfile.TemporaryDirectory(
        prefix="llamaforge-sandbox-", ignore_cleanup_errors=True
    ) as tmp:
        start = time.monotonic()
        proc, report_r, secret_w = _launch(Path(tmp), program, memory_mb, cpu, bwrap, False)
        if isinstance(proc, OSError):
            return _not_launched(proc, report_r, secret_w)
        reports = _Reports(secret_w, secrets.token_hex(16))
        try:
            timed_out = _supervise(proc, start + timeout, capture, reports, report_r)
        finally:
            if proc.returncode is None:  # interrupted (KeyboardInterrupt): leave nothing
                _kill_group(proc)
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
            os.close(report_r)
            reports.close()
        duration = time.monotonic() - start
    report = reports.verdict_line()
    returncode = _exit_status(proc.returncode, bwrap)
    status, detail = _verdict(timed_out, returncode, report, capture, timeout, memory_mb)
    return SandboxResult(status, _short(detail), duration, capture.text())


def check_programs(
    programs: Sequence[str],
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool = False,
    isolate: bool | None = None,
) -> list[SandboxResult]:
    """Run many programs concurrently (a thread pool of `workers`, default os.cpu_count(),
    each thread launching one sandboxed subprocess); results in input order; never raises
    because of the programs' behaviour."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not timeout > 0 or memory_mb <= 0:
        raise ValueError(f"timeout and memory_mb must be positive: {timeout}, {memory_mb}")
    if isolate and not isolation_available():
        raise RuntimeError("isolate=True but bubblewrap cannot run here")
    results: list[SandboxResult | None] = [None] * len(programs)
    if not programs:
        return []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="sandbox", unit="program")
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
            futures = {
                pool.submit(run_program, program, timeout, memory_mb, isolate=isolate): i
                for i, program in enumerate(programs)
            }
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as exc:  # a harness fault: report it, go on
                    results[i] = SandboxResult("failed", _short(f"sandbox error: {exc!r}"), 0.0)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


# ------------------------------------------------------- run_tests: the harness's verdict

_MAX_REPLY_BYTES = 64 * 1024 * 1024  # the largest answer to one call


class _Abort(BaseException):
    """Ends the tests (a BaseException, so the tests' own ``except Exception`` cannot
    swallow it): the child died, hung past the deadline or broke the protocol."""


class _Unsendable(BaseException):
    """An argument the tests pass is not plain data (e.g. a lambda): the in-child path."""


class Handle:
    """A value the candidate returned that is not plain data (a generator, an instance of
    its class, ...). It stays in the child; the harness can only pass it back to the
    candidate's functions. It equals nothing but itself."""

    def __init__(self, link: _Link, number: int, type_name: str) -> None:
        self._link, self._number, self._type_name = link, number, type_name

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._link.call({"h": self._number}, args, kwargs)

    def __repr__(self) -> str:
        return f"<{self._type_name} in the sandbox>"


class RemoteError(Exception):
    """An exception the candidate raised that is not a built-in one (its type name and
    message crossed, as text)."""


def _encode(value: object, depth: int = 0) -> object:
    t = type(value)
    if depth > 200:
        raise _Unsendable("too deeply nested")
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return {"f": repr(value)}
    if t is complex:
        return {"c": [repr(value.real), repr(value.imag)]}  # type: ignore[attr-defined]
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "ba": value.hex()}  # type: ignore[attr-defined]
    tags = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
    if t in tags:
        return {tags[t]: [_encode(v, depth + 1) for v in value]}  # type: ignore[attr-defined]
    if t is dict:
        items = value.items()  # type: ignore[attr-defined]
        return {"d": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in items]}
    if t is Handle:
        return {"h": value._number}  # type: ignore[attr-defined]
    raise _Unsendable(f"a {t.__name__} cannot be sent to the sandbox")


def _decode(value: object, link: _Link) -> object:
    """Tagged JSON from the child into plain built-in values (or handles); nothing else."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is not dict or not value:
        raise _Abort("malformed answer")
    tag, v = next(iter(value.items()))
    if tag == "f" and type(v) is str:
        return float(v)
    if tag == "c" and type(v) is list and len(v) == 2:
        return complex(float(v[0]), float(v[1]))
    if tag in ("b", "ba") and type(v) is str:
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "h" and type(v) is int:
        return Handle(link, v, str(value.get("type", "object"))[:100])
    if tag == "d" and type(v) is list:
        return {_decode(k, link): _decode(x, link) for k, x in v}  # unhashable: TypeError
    kinds: dict[str, type] = {"l": list, "t": tuple, "s": set, "fs": frozenset}
    if tag in kinds and type(v) is list:
        return kinds[tag](_decode(x, link) for x in v)
    raise _Abort("malformed answer")


class _Link:
    """The harness's end of the conversation with a serving child."""

    def __init__(self, proc: subprocess.Popen[bytes], report_r: int, request_w: int,
                 deadline: float) -> None:  # fmt: skip
        self.proc, self.report_r, self.request_w = proc, report_r, request_w
        self.deadline = deadline
        self.buffer = bytearray()
        self.lines: list[str] = []  # report lines other than answers (the last 64)
        self.next_id = 0
        self.failure = ""  # why the tests were aborted
        os.set_blocking(report_r, False)

    def abort(self, why: str) -> _Abort:
        self.failure = self.failure or why
        return _Abort(why)

    def line(self) -> bytes:
        """The next line from the child, within the deadline."""
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self.abort("timeout")
            ready = selectors.DefaultSelector()
            try:
                ready.register(self.report_r, selectors.EVENT_READ)
                if not ready.select(min(remaining, 0.05)):
                    continue
            finally:
                ready.close()
            try:
                data = os.read(self.report_r, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                raise self.abort("the program's process ended during the tests")
            self.buffer += data
            if len(self.buffer) > _MAX_REPLY_BYTES:
                raise self.abort("an answer larger than 64 MB")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line

    def wait_ready(self) -> list[str]:
        """The names the child's program defined (callables), once it ran to its end."""
        while True:
            kind, _, message = self.line().decode("utf-8", "replace").partition("\t")
            if kind == "ready":
                names = json.loads(message)
                return [n for n in names if type(n) is str] if type(names) is list else []
            self.lines = (self.lines + [kind + "\t" + message])[-64:]

    def send(self, data: bytes) -> None:
        while data:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self.abort("timeout")
            with selectors.DefaultSelector() as sel:
                sel.register(self.request_w, selectors.EVENT_WRITE)
                if not sel.select(min(remaining, 0.05)):
                    continue
            try:
                data = data[os.write(self.request_w, data[: 1 << 16]) :]
            except BlockingIOError:
                continue
            except OSError:
                raise self.abort("the program's process ended during the tests") from None

    def call(self, target: dict[str, object], args: tuple, kwargs: dict) -> object:
        try:
            request = dict(target, args=_encode(list(args)), kwargs=_encode(dict(kwargs)))
        except RecursionError:
            raise _Unsendable("too deeply nested") from None
        self.next_id += 1
        request["id"] = self.next_id
        self.send(json.dumps(request).encode() + b"\n")
        while True:
            kind, _, text = self.line().partition(b"\t")
            if kind != b"resp":
                self.lines = (self.lines + [kind.decode("utf-8", "replace")])[-64:]
                continue
            try:
                answer = json.loads(text)
            except ValueError:
                raise self.abort("malformed answer") from None
            if type(answer) is not dict or answer.get("id") != self.next_id:
                continue  # not the answer to this call
            if "raise" in answer:
                name, message = str(answer["raise"])[:100], str(answer.get("msg", ""))[:500]
                cls = getattr(builtins, name, None)
                if isinstance(cls, type) and issubclass(cls, Exception):
                    raise cls(message)
                raise RemoteError(f"{name}: {message}")
            try:
                return _decode(answer.get("ok"), self)
            except (TypeError, ValueError, RecursionError):
                raise self.abort("malformed answer") from None


class _Proxy:
    """Stands, in the harness, for one of the candidate's functions."""

    def __init__(self, link: _Link, name: str) -> None:
        self._link, self.__name__ = link, name

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._link.call({"fn": self.__name__}, args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__name__} in the sandbox>"


def run_tests(
    candidate: str,
    tests: str,
    entry_point: str | None = None,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    cpu_seconds: int | None = None,
    max_output_bytes: int = 65536,
    isolate: bool | None = None,
    program: str | None = None,
) -> SandboxResult:
    """Run the candidate's code (e.g. prompt + completion) in the sandbox, and the trusted
    `tests` here, in the harness, against proxies of the candidate's top-level callables;
    then ``check(<entry_point>)`` when `entry_point` is given (HumanEval). Passed iff the
    tests run to their end within `timeout` (import and tests together). Only plain data
    crosses; see the module docstring. When the tests pass the candidate something that is
    not plain data (a lambda), the whole `program` (default: candidate + tests + check)
    runs in the child instead, with `run_program`'s verdict, and the detail says so."""
    cpu, bwrap = _check_limits(timeout, memory_mb, max_output_bytes, cpu_seconds, isolate)
    capture = _Capture(max_output_bytes)
    with tempfile.TemporaryDirectory(
        prefix="llamaforge-sandbox-", ignore_cleanup_errors=True
    ) as tmp:
        start = time.monotonic()
        proc, report_r, request_w = _launch(Path(tmp), candidate, memory_mb, cpu, bwrap, True)
        if isinstance(proc, OSError):
            return _not_launched(proc, report_r, request_w)
        link = _Link(proc, report_r, request_w, start + timeout)
        status, detail, unsendable, died = _run_harness(link, capture, tests, entry_point)
        duration = time.monotonic() - start
    if unsendable:
        if program is None:
            check_call = f"\ncheck({entry_point})\n" if entry_point is not None else ""
            program = candidate + "\n" + tests + check_call
        result = run_program(program, timeout, memory_mb, cpu_seconds, max_output_bytes, isolate)
        note = f" (in-child verdict: {unsendable})"
        return SandboxResult(result.status, _short(result.detail + note), result.duration,
                             result.output)  # fmt: skip
    if link.failure:  # even if the tests swallowed the _Abort
        status, detail = _link_failure(link, died, bwrap, capture, timeout, memory_mb)
    return SandboxResult(status, _short(detail), duration, capture.text())


def _drain(fd: int, capture: _Capture) -> None:
    """Feed ``fd``'s bytes to ``capture`` until its end (run on a thread of its own)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        capture.feed(data)


def _run_harness(
    link: _Link, capture: _Capture, tests: str, entry_point: str | None
) -> tuple[str, str, str, bool]:
    """Run the trusted ``tests`` here against proxies of the child's callables, its output
    drained meanwhile; then end the child and close its pipes. Returns the status, the
    detail, why the tests must run in the child instead ("" if they need not) and whether
    the child had ended on its own."""
    proc = link.proc
    assert proc.stdout is not None
    drainer = threading.Thread(target=_drain, args=(proc.stdout.fileno(), capture), daemon=True)
    drainer.start()
    status, detail, unsendable = "passed", "passed", ""
    try:
        names = link.wait_ready()
        namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": builtins}
        namespace.update({name: _Proxy(link, name) for name in names})
        exec(compile(tests, "<tests>", "exec"), namespace)
        if entry_point is not None:
            check = namespace["check"]
            assert callable(check), "the tests define no check()"
            check(namespace[entry_point])
    except _Abort:
        status, detail = "failed", link.failure
    except _Unsendable as exc:
        unsendable = str(exc)
    except Exception as exc:
        status = "failed"
        lines = traceback.format_exception_only(type(exc), exc)
        detail = "".join(lines).strip().splitlines()[-1] if lines else type(exc).__name__
    finally:
        died = _exited(proc)  # on its own, before the harness kills it
        _kill_group(proc)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        drainer.join(timeout=2)
        proc.stdout.close()
        os.close(link.report_r)
        os.close(link.request_w)
    return status, detail, unsendable, died


def _link_failure(
    link: _Link, died: bool, bwrap: str, capture: _Capture, timeout: float, memory_mb: int
) -> tuple[str, str]:
    """The status and detail of tests the link aborted: a timeout, what the child reported
    last (an error, the memory limit, its exit), the signal that killed it, or the
    failure with the child's last output line."""
    if link.failure == "timeout":
        return "timeout", f"timed out after {timeout:g} s"
    status, detail = "failed", link.failure
    proc = link.proc
    why = _last_failure(link.lines)
    if why:
        kind, _, message = why.partition("\t")
        status = "killed" if kind == "memory" else "failed"
        detail = f"{message} (memory limit {memory_mb} MB)" if kind == "memory" else message
    elif died and proc.returncode is not None and proc.returncode != 0:
        code = _exit_status(proc.returncode, bwrap)
        if code is not None and code < 0:
            status, detail = _verdict(False, code, "", capture, timeout, memory_mb)
    elif link.failure.startswith("the program's process ended") and capture.last_line():
        detail = f"{link.failure}: {capture.last_line()}"
    return status, detail


def check_candidates(
    cases: Sequence[tuple[str, str, str | None, str | None]],
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    isolate: bool | None = None,
) -> list[SandboxResult]:
    """`run_tests` for many (candidate, tests, entry_point, program) cases on a thread
    pool; results in input order; never raises because of the candidates' behaviour."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isolate and not isolation_available():
        raise RuntimeError("isolate=True but bubblewrap cannot run here")
    if not cases:
        return []

    def one(case: tuple[str, str, str | None, str | None]) -> SandboxResult:
        candidate, tests, entry_point, program = case
        try:
            return run_tests(candidate, tests, entry_point, timeout, memory_mb,
                             isolate=isolate, program=program)  # fmt: skip
        except Exception as exc:  # a harness fault: report it, go on
            return SandboxResult("failed", _short(f"sandbox error: {exc!r}"), 0.0)

    with ThreadPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        return list(pool.map(one, cases))
