"""The sandbox's child: run by eval/sandbox.py as a script, by its file path,

    python -I -B _sandbox_child.py PROGRAM REPORT_FD SECRET_FD WORKDIR MEMORY CPU FSIZE NOFILE NPROC

so that it imports only the standard library, never the llamaforge package (``-I`` keeps
the script's directory off ``sys.path``). It sets the limits, disables what it must, runs
the program and writes lines to the report pipe: "<kind>\t<last line of the traceback>"
with kind error/memory/exit when the program fails; when it has run to its end, "end",
then -- after reading the per-run secret the parent sends only in answer to "end" --
"ok\t<secret>". See sandbox.py's docstring for what it disables and what the secret does
and does not prevent.
"""

# ruff: noqa: E402  (the guard below runs before the imports)
if __name__ != "__main__":
    raise ImportError("llamaforge.eval._sandbox_child is a script run by sandbox.py, not a module")

import _io
import _posixsubprocess
import _socket
import builtins
import errno
import io
import json
import os
import posix
import resource
import shutil
import socket
import subprocess
import sys
import traceback

(PROGRAM, REPORT_FD, SECRET_FD, WORKDIR, MEMORY, CPU, FSIZE, NOFILE, NPROC) = sys.argv[1:10]
SERVE = sys.argv[10:11] == ["serve"]  # run_tests: serve calls instead of the secret
status_fd, secret_fd = int(REPORT_FD), int(SECRET_FD)
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


# fmt: off
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
# fmt: on
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
# fmt: off
for module in (socket, _socket):
    for name in (
        "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
        "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo",
    ):
        if hasattr(module, name):
            setattr(module, name, no_network("socket." + name))
# fmt: on

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
    report("exit", f"the program called exit({exc.code!r}) before its end")
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


def encode(value, handles, depth=0):
    """Plain data as tagged JSON; a subclass of a built-in type (Counter, OrderedDict, a
    namedtuple, an IntEnum, an int with a rigged __eq__) crosses as its base type's
    value, so only plain data reaches the harness. Anything else raises TypeError (the
    value then stays here behind a handle)."""
    if depth > 200:
        raise ValueError("too deep")
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return {"f": float.__repr__(float.__float__(value))}
    if isinstance(value, complex):
        return {"c": [repr(float(value.real)), repr(float(value.imag))]}
    if isinstance(value, (bytes, bytearray)):
        return {"b" if isinstance(value, bytes) else "ba": bytes(value).hex()}
    for kind, tag in ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs")):
        if isinstance(value, kind):
            return {tag: [encode(v, handles, depth + 1) for v in kind.__iter__(value)]}
    if isinstance(value, dict):
        pairs = list(dict.items(value))
        return {"d": [[encode(k, handles, depth + 1), encode(v, handles, depth + 1)]
                      for k, v in pairs]}  # fmt: skip
    raise TypeError(type(value).__name__)


def decode(value, handles):
    if not isinstance(value, dict):
        return value
    ((tag, v),) = value.items()
    if tag == "f":
        return float(v)
    if tag == "c":
        return complex(float(v[0]), float(v[1]))
    if tag in ("b", "ba"):
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "h":
        return handles[v]
    if tag == "d":
        return {decode(k, handles): decode(x, handles) for k, x in v}
    kind = {"l": list, "t": tuple, "s": set, "fs": frozenset}[tag]
    return kind(decode(x, handles) for x in v)


def serve():
    """Answer the harness's calls, one JSON line each on the request pipe, with one
    "resp\t<json>" line each on the report pipe. Only plain data crosses."""
    handles, buffer = {}, b""
    names = [n for n, v in namespace.items() if callable(v) and not n.startswith("__")]
    report("ready", json.dumps(names))
    while True:
        while b"\n" not in buffer:
            chunk = os.read(secret_fd, 1 << 16)
            if not chunk:
                return
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        request = json.loads(line)
        answer = {"id": request["id"]}
        try:
            fn = namespace[request["fn"]] if "fn" in request else handles[request["h"]]
            args = decode(request["args"], handles)
            kwargs = decode(request["kwargs"], handles)
            result = fn(*args, **kwargs)
        except Exception as exc:
            answer["raise"] = type(exc).__name__
            answer["msg"] = str(exc)[:500]
        else:
            try:
                answer["ok"] = encode(result, handles)
            except (TypeError, ValueError, RecursionError):
                handles[len(handles)] = result
                answer["ok"] = {"h": len(handles) - 1, "type": type(result).__name__}
        text = json.dumps(answer)
        data = ("resp\t" + text + "\n").encode()
        while data:
            data = data[os.write(status_fd, data) :]


if SERVE:
    try:
        serve()
    except MemoryError:
        reserve = None
        report("memory", "MemoryError while serving a call")
    os._exit(0)
# The program ran to its end. Ask the parent for the secret (sent once, only now) and
# prove it: a program that wrote "ok" itself, or left early, never had it to write.
report("end")
secret = b""
try:
    while len(secret) < 256:
        chunk = os.read(secret_fd, 256)
        if not chunk:
            break
        secret += chunk
except OSError:
    pass
report("ok", secret.decode("ascii", "replace").strip())
