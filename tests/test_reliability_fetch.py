"""Issue 20, items 12 and 14: fetch never writes through symbolic links in the destination, and a
destination that is a file or read-only is one message."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.fetch import run


def test_a_dangling_link_in_the_destination_is_refused(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.yaml"
    name = "sft-tiny.yaml"
    (dest / name).symlink_to(outside)  # dangling: a copy would create outside.yaml
    with pytest.raises(TuneforgeError) as err:
        run("examples", dest)
    assert str(err.value).startswith(f"{dest} holds symbolic links where fetch would write ({dest / name})")
    assert not outside.exists()


def test_a_linked_subfolder_is_refused(tmp_path):
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "data").symlink_to(elsewhere, target_is_directory=True)  # examples/data/ holds files
    with pytest.raises(TuneforgeError, match="holds symbolic links where fetch would write"):
        run("examples", dest)
    assert not any(elsewhere.iterdir())


def test_a_file_or_an_unwritable_destination(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TuneforgeError) as err:
        run("docs", tmp_path / "file")
    assert str(err.value) == f"--dest {tmp_path / 'file'} is a file, not a folder; pass another --dest."

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / "x"))

    monkeypatch.setattr(shutil, "copy2", read_only)
    with pytest.raises(TuneforgeError) as err:
        run("docs", tmp_path / "ro")
    assert str(err.value) == (f"cannot write into {tmp_path / 'ro'}: Read-only file system ({tmp_path / 'ro' / 'x'}); "
                              "pass a writable --dest.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_destination(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(TuneforgeError, match="is read-only"):
            run("docs", ro)
    finally:
        ro.chmod(0o755)
