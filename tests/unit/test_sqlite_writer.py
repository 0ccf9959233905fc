"""Processes sharing a SQLite file take turns on the writer connection through a lock file (no sleeping
in SQLite's busy handler), and readers never wait for it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from sqlalchemy import text

from gateway.store import make_engine, reader_for


def _engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'gw.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    return engine


def test_a_writer_waits_for_the_process_holding_the_lock_then_proceeds(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    other = os.open(tmp_path / "gw.db-writer", os.O_RDWR)  # another open file: as another process holds it
    fcntl.flock(other, fcntl.LOCK_EX)
    done = threading.Event()

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert not done.wait(0.5), "the write went ahead while another process held the writer lock"
        with reader_for(engine).connect() as conn:  # readers do not queue behind the lock
            assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar_one() == 0
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    assert done.wait(10), "the write did not proceed once the lock was released"
    writer.join()
    with reader_for(engine).connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar_one() == 1
    engine.dispose()


def test_the_lock_is_released_when_the_connection_goes_back(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    other = os.open(tmp_path / "gw.db-writer", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the engine still held it
    finally:
        os.close(other)
    engine.dispose()


def test_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from sqlalchemy import text
        from gateway.store import make_engine
        engine = make_engine({f"sqlite:///{tmp_path / 'gw.db'}"!r})
        for n in range(200):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (:n)"), {{"n": n}})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    with reader_for(engine).connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar_one() == 600
    engine.dispose()
