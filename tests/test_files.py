"""files.py: the one atomic file writer and the one atomic directory writer."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from llamaforge.files import NoSpaceError, atomic_dir, atomic_open, atomic_path, atomic_write


class Boom(RuntimeError):
    pass


def test_atomic_write_str_and_bytes(tmp_path):
    p = atomic_write(tmp_path / "sub" / "a.txt", "héllo\n")
    assert p == tmp_path / "sub" / "a.txt" and p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["a.txt"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # as a plain open() makes it
    with pytest.raises(TypeError, match="str or bytes"):
        atomic_write(p, 3)  # type: ignore[arg-type]


def test_final_name_never_holds_partial_content(tmp_path):
    target = tmp_path / "shard.bin"
    with pytest.raises(Boom):
        with atomic_open(target, "wb") as f:
            f.write(b"first half")
            f.flush()
            assert not target.exists()  # the partial data is under a hidden name
            (hidden,) = tmp_path.iterdir()
            assert hidden.name.startswith(".shard.bin.tmp-") and hidden.read_bytes()
            raise Boom
    assert list(tmp_path.iterdir()) == []
    # an existing file keeps its old content when the new writer fails mid-way
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise Boom
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["shard.bin"]
    with atomic_open(target) as f:
        f.write("new")
    assert target.read_text() == "new"


def test_atomic_write_refuses_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        atomic_write(tmp_path, "x")


def test_atomic_dir_renames_into_place_only_on_success(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "a.json").write_text("{}")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b").write_text("b")
        assert not out.exists()
    assert (out / "a.json").read_text() == "{}" and (out / "nested" / "b").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "other") as tmp:
            (tmp / "half").write_text("x")
            raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_refuses_an_existing_target_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(FileExistsError, match=f"{out}: already exists"):
        with atomic_dir(out):
            pytest.fail("the block must not run")
    assert (out / "keep").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_keeps_the_old_dir_until_the_new_is_complete(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "v").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "v").write_text("new, half")
            assert (out / "v").read_text() == "old"
            raise Boom
    assert (out / "v").read_text() == "old"  # a failed replacement leaves the old one
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("new")
        assert (out / "v").read_text() == "old"  # still there while the new one is written
    assert (out / "v").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old one is removed


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "tokenizer.model"
    target.write_bytes(b"old")
    with pytest.raises(NoSpaceError) as e:
        with atomic_open(target, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            _enospc()  # the writer's next write finds the disk full
    assert str(e.value) == f"no space left on device while writing {target}"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert e.value.exit_code == 1 and isinstance(e.value.__cause__, OSError)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["tokenizer.model"]
    # atomic_write: the write itself fails (the fake writer: os.fsync of a full disk)
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(NoSpaceError, match=f"while writing {target}"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["tokenizer.model"]
    # no room for the temporary itself
    monkeypatch.setattr(tempfile, "mkstemp", _enospc)
    monkeypatch.setattr(tempfile, "mkdtemp", _enospc)
    with pytest.raises(NoSpaceError, match="while writing .*tokenizer.model"):
        atomic_write(target, b"new")
    with pytest.raises(NoSpaceError, match="while writing .*ckpt"):
        with atomic_dir(tmp_path / "ckpt"):
            pass
    assert target.read_bytes() == b"old"


def test_full_disk_in_a_directory_keeps_the_old_one(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(NoSpaceError, match=f"no space left on device while writing {out}$"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            raise RuntimeError(
                "Error while serializing: IoError(Os { code: 28, kind: "
                'StorageFull, message: "No space left on device" })'
            )
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_short_write_on_a_full_device_is_no_space_other_errors_are_not(tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    full = shutil._ntuple_diskusage(10**9, 10**9, 4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: full)
    with pytest.raises(NoSpaceError, match="while writing .*model.gguf"):
        with atomic_path(target):
            raise OSError("12288 requested and 7568 written")
    for other in (Boom("not a write error"), ValueError("bad value"), KeyboardInterrupt()):
        with pytest.raises(type(other)):
            with atomic_path(target):
                raise other
    monkeypatch.undo()
    with pytest.raises(OSError, match="requested") as e:  # room left: the error as it was
        with atomic_path(target):
            raise OSError("12288 requested and 7568 written")
    assert not isinstance(e.value, NoSpaceError) and os.listdir(tmp_path) == []


def test_cli_prints_one_line_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from llamaforge.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("tiny corpus, a few words\n" * 20)
    out = tmp_path / "t.model"
    out.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    args = ["tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "280"]
    assert main([*args, "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"llamaforge tokenizer train: error: no space left on device while writing {out}"
    assert out.read_bytes() == b"old"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk(tiny_tmpfs):
    target = tiny_tmpfs / "shard.bin"
    atomic_write(target, b"old" * 1000)
    with pytest.raises(NoSpaceError, match=f"while writing {target}$"):
        atomic_write(target, b"\0" * 200_000)
    assert target.read_bytes() == b"old" * 1000 and os.listdir(tiny_tmpfs) == ["shard.bin"]
    with pytest.raises(NoSpaceError, match="while writing .*ckpt"):
        with atomic_dir(tiny_tmpfs / "ckpt") as tmp:
            with open(tmp / "weights", "wb") as f:
                f.write(b"\0" * 200_000)
    assert os.listdir(tiny_tmpfs) == ["shard.bin"]
