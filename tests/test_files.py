"""slimops._files: atomic writes (checkpoints, latency tables) and their leftovers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from slimops._files import atomic_write, atomic_write_text, remove_stale_temporaries


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(str(path), "one")
    atomic_write_text(str(path), "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_text(str(path), "good")

    def failing(f):
        f.write(b"half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), failing)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_writer_leaves_the_old_file_whole_and_its_temporary_is_removable(tmp_path):
    path = tmp_path / "latest.pt"
    atomic_write_text(str(path), "good")
    script = textwrap.dedent(f"""
        import os, signal
        from slimops._files import atomic_write

        def write(f):
            f.write(b"partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the save

        atomic_write({str(path)!r}, write)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "good"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "latest.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith("latest.pt.tmp")
    assert remove_stale_temporaries(str(path)) == [str(tmp_path / leftovers[0])]
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_remove_stale_temporaries_only_touches_its_own(tmp_path):
    for name in ("a.pt.tmp1", "a.pt.tmpXYZ", "a.pt", "b.pt.tmp1", "a.ptx.tmp1"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(str(tmp_path / "a.pt"))
    assert sorted(os.path.basename(r) for r in removed) == ["a.pt.tmp1", "a.pt.tmpXYZ"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.ptx.tmp1", "b.pt.tmp1"]
