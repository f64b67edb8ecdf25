"""files.py: the one atomic file writer and the one atomic directory writer."""

from __future__ import annotations

import os
import stat

import pytest

from llamaforge.files import atomic_dir, atomic_open, atomic_path, atomic_write


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
