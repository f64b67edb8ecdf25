"""Run model-generated Python (HumanEval, MBPP) in a contained subprocess.

`run_program` runs one complete program (prompt + completion + tests + ``check(...)``) and
reports whether it ran to its end and exited 0 within the limits. `check_programs` runs many
of them on a thread pool, each thread supervising one subprocess.

What the sandbox does, per program (POSIX; fully on Linux):

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

What it is NOT: a security boundary. It stops the accidents a language model produces
(infinite loops, fork and memory bombs, ``rm -rf``, stray writes and downloads), with the
same stance as OpenAI's human-eval ``execution.py``. Code written to escape can: call
native code through ``ctypes`` (fork, setsid, syscalls, writes), use ``io.FileIO`` or
pre-imported references to the original functions, or restore what was disabled. It runs
with the caller's user id and filesystem permissions, and the network is blocked only at
the Python level. Run untrusted code at scale inside a container or VM without network.
"""

from __future__ import annotations

import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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

# Runs as `python -I -B -c _DRIVER program status workdir memory cpu fsize nofile nproc`.
# It sets the limits, disables what it must, runs the program and writes one line to the
# status file: "ok", or "<kind>\t<last line of the traceback>" with kind error/memory/exit.
_DRIVER = r"""
import builtins, errno, io, os, posix, resource, sys, traceback
import _io, _posixsubprocess, _socket, shutil, socket, subprocess

(PROGRAM, STATUS, WORKDIR, MEMORY, CPU, FSIZE, NOFILE, NPROC) = sys.argv[1:9]
status_fd = os.open(STATUS, os.O_WRONLY | os.O_APPEND)
with open(PROGRAM, encoding="utf-8") as f:
    source = f.read()


def report(kind, message=""):
    line = kind if not message else kind + "\t" + " ".join(message.split())
    try:
        os.write(status_fd, line.encode("utf-8", "replace")[:4000] + b"\n")
    except OSError:
        pass


def count_user_tasks(uid):
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/" + name + "/status", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


def limit(which, soft, hard=None):
    hard = soft if hard is None else hard
    try:
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_FSIZE, int(FSIZE))
limit(resource.RLIMIT_NOFILE, int(NOFILE))
limit(resource.RLIMIT_CPU, int(CPU), int(CPU) + 1)
if sys.platform.startswith("linux") and os.getuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
    try:
        limit(resource.RLIMIT_NPROC, count_user_tasks(os.getuid()) + int(NPROC))
    except (OSError, ValueError):
        pass
limit(resource.RLIMIT_AS, int(MEMORY))  # last: the rest needs no memory to speak of


def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, name + " is disabled in the sandbox")
    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


for module in (os, posix):
    for name in (
        "kill", "killpg", "system", "popen", "removedirs",
        "renames", "truncate", "link",
        "symlink", "fork", "forkpty", "setsid", "setpgid", "setpgrp", "tcsetpgrp", "chmod",
        "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chflags", "lchflags",
        "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid",
        "setresgid", "setgroups", "execv", "execve", "execl", "execle", "execlp", "execlpe",
        "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
        "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "mkfifo", "mknod", "plock",
    ):
        if hasattr(module, name):
            setattr(module, name, refuse("os." + name))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, refuse("shutil." + name))
for name in ("setrlimit", "prlimit"):
    if hasattr(resource, name):
        setattr(resource, name, refuse("resource." + name))
_posixsubprocess.fork_exec = refuse("_posixsubprocess.fork_exec")


class Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, "subprocess.Popen is disabled in the sandbox")


subprocess.Popen = Popen


def no_network(name):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, name + ": network access is disabled in the sandbox")
    return refused


class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "socket: network access is disabled in the sandbox")


class NoRawSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "socket: network access is disabled in the sandbox")


socket.socket = socket.SocketType = NoSocket
_socket.socket = _socket.SocketType = NoRawSocket
for module in (socket, _socket):
    for name in (
        "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
        "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo",
    ):
        if hasattr(module, name):
            setattr(module, name, no_network("socket." + name))

ROOT = os.path.realpath(WORKDIR)
WRITABLE_DEVICES = {"/dev/null"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode


def check_writable(path, what, root_too=True):
    path = fsdecode(fspath(path))
    resolved = realpath(path)
    if resolved.startswith(ROOT + os.sep) or resolved in WRITABLE_DEVICES:
        return
    if root_too and resolved == ROOT:
        return
    raise PermissionError(errno.EACCES, what + " outside the sandbox directory is refused", path)


original = {name: getattr(os, name) for name in ("open", "mkdir", "remove", "rmdir", "rename")}
original_open = builtins.open


def guarded_open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and any(c in str(mode) for c in "wax+"):
        check_writable(file, "writing")
    return original_open(file, mode, *args, **kwargs)


def no_dir_fd(name, kwargs):
    if any(kwargs.get(key) is not None for key in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
        raise PermissionError(errno.EACCES, "os." + name + " with a dir_fd is refused")


def guarded_os_open(path, flags, mode=0o777, **kwargs):
    if flags & WRITE_FLAGS:
        no_dir_fd("open", kwargs)
        check_writable(path, "writing")
    return original["open"](path, flags, mode, **kwargs)


def guarded_mkdir(path, mode=0o777, **kwargs):
    no_dir_fd("mkdir", kwargs)
    check_writable(path, "creating a directory")
    return original["mkdir"](path, mode)


def guarded_remove(path, **kwargs):  # os.remove and os.unlink: tempfile needs them
    no_dir_fd("remove", kwargs)
    check_writable(path, "removing", root_too=False)
    return original["remove"](path)


def guarded_rmdir(path, **kwargs):
    no_dir_fd("rmdir", kwargs)
    check_writable(path, "removing", root_too=False)
    return original["rmdir"](path)


def guarded_rename(src, dst, **kwargs):  # os.rename and os.replace
    no_dir_fd("rename", kwargs)
    check_writable(src, "renaming", root_too=False)
    check_writable(dst, "renaming", root_too=False)
    return original["rename"](src, dst)


builtins.open = io.open = _io.open = guarded_open
for module in (os, posix):
    module.open, module.mkdir, module.rmdir = guarded_os_open, guarded_mkdir, guarded_rmdir
    module.remove = module.unlink = guarded_remove
    module.rename = module.replace = guarded_rename

namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": PROGRAM}
sys.argv = [PROGRAM]
reserve = bytearray(1 << 20)  # freed on MemoryError, so the report can be written
try:
    exec(compile(source, PROGRAM, "exec"), namespace)
except MemoryError as exc:
    reserve = None
    exc.__traceback__ = None
    namespace.clear()
    report("memory", "MemoryError" + (": " + str(exc) if str(exc) else ""))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)
except SystemExit as exc:
    report("exit", "the program called exit(%r) before its end" % (exc.code,))
    sys.exit(1)
except BaseException as exc:
    try:
        tb = exc.__traceback__
        traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
        lines = traceback.format_exception_only(type(exc), exc)
        message = "".join(lines).strip().splitlines()[-1]
    except BaseException:
        message = type(exc).__name__
    report("error", message)
    sys.exit(1)
report("ok")
"""


# ----------------------------------------------------------------------------- the parent


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

    def read(self, fd: int, max_chunks: int = 16) -> bool:
        """Read what is available (non-blocking fd); True at end of file."""
        for _ in range(max_chunks):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            self.feed(data)
        return False

    def text(self) -> str:
        out = self.head.decode("utf-8", "replace")
        if self.dropped:
            out += f"\n[sandbox: {self.dropped} more bytes of output dropped]\n"
        return out

    def last_line(self) -> str:
        lines = self.tail.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


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


def _supervise(proc: subprocess.Popen[bytes], deadline: float, capture: _Capture) -> bool:
    """Read output until the program ends or the deadline passes; kill its process group;
    reap it. True if it timed out."""
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    pidfd: int | None = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)  # readable once the process has exited
        except OSError:
            pidfd = None
    timed_out, eof = False, False
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
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
                if out in ready:
                    eof = capture.read(out)
                    if eof:
                        sel.unregister(out)
                if pidfd is not None and pidfd in ready:
                    break
                if pidfd is None and _exited(proc):
                    break
            _kill_group(proc)  # on timeout; otherwise the children it left behind
            drain_until = time.monotonic() + 1.0
            while not eof and time.monotonic() < drain_until:
                if any(key.fd == out for key, _ in sel.select(0.05)):
                    eof = capture.read(out)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep): leave it
        pass
    return timed_out


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


def run_program(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    cpu_seconds: int | None = None,
    max_output_bytes: int = 65536,
) -> SandboxResult:
    """Run one complete Python program (e.g. prompt + completion + test code +
    ``check(entry_point)``) in a sandbox; passed iff it runs to its end and exits 0 within
    the limits. `cpu_seconds` defaults to ceil(timeout) + 1. Never raises because of what
    the program does (a failure to launch it is reported as "failed")."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    if cpu <= 0:
        raise ValueError(f"cpu_seconds must be positive, got {cpu_seconds}")
    capture = _Capture(max_output_bytes)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(
        prefix="llamaforge-sandbox-", ignore_cleanup_errors=True
    ) as tmp:
        root = Path(tmp)
        workdir = root / "work"
        workdir.mkdir()
        program_path, status_path = root / "program.py", root / "status"
        program_path.write_text(program, encoding="utf-8")
        status_path.write_bytes(b"")
        argv = [
            sys.executable or "python3", "-I", "-B", "-c", _DRIVER,
            str(program_path), str(status_path), str(workdir), str(memory_mb * 1024 * 1024),
            str(cpu), str(_FILE_SIZE_LIMIT), str(_OPEN_FILES_LIMIT), str(_NPROC_MARGIN),
        ]  # fmt: skip
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return SandboxResult("failed", _short(f"sandbox error: {exc}"), 0.0)
        try:
            timed_out = _supervise(proc, start + timeout, capture)
        finally:
            if proc.returncode is None:  # interrupted (KeyboardInterrupt): leave nothing
                _kill_group(proc)
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        duration = time.monotonic() - start
        try:
            report = status_path.read_bytes()[:4096].decode("utf-8", "replace")
        except OSError:
            report = ""
    report = report.splitlines()[0] if report.strip() else ""
    status, detail = _verdict(timed_out, proc.returncode, report, capture, timeout, memory_mb)
    return SandboxResult(status, _short(detail), duration, capture.text())


def check_programs(
    programs: Sequence[str],
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool = False,
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
                pool.submit(run_program, program, timeout, memory_mb): i
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
