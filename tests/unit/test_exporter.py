from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_dead_children_are_marked_and_live_ones_kept(tmp_path: Path) -> None:
    from monitoring.exporter import mark_dead_processes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    assert mark_dead_processes(str(tmp_path)) == [dead.pid]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted(
        [f"counter_{dead.pid}.db", f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"]
    )


def test_prepare_multiprocess_refuses_when_too_late(tmp_path: Path) -> None:
    code = (
        "import prometheus_client\n"
        "from pathlib import Path\n"
        "from monitoring.multiprocess import prepare_multiprocess\n"
        f"prepare_multiprocess(Path({str(tmp_path / 'm')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "imported before multiprocess mode was set" in done.stderr


def test_prepare_multiprocess_empties_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"old")
    code = (
        "import os\n"
        "from pathlib import Path\n"
        "from monitoring.multiprocess import prepare_multiprocess\n"
        f"prepare_multiprocess(Path({str(directory)!r}))\n"
        f"assert os.listdir({str(directory)!r}) == []\n"
        f"assert os.environ['PROMETHEUS_MULTIPROC_DIR'] == {str(directory)!r}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
