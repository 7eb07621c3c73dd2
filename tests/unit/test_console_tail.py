"""The console log a console_log task answers: the file's tail, cut at whole lines, bounded in
bytes and lines, flagged when bytes were cut; a log not written yet is empty."""

from __future__ import annotations

from pathlib import Path

from services.agent.tasks import compute


def test_the_whole_log_when_it_fits(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"one\ntwo\nthree\n")
    assert compute.read_tail(log, 1 << 20, 0) == ("one\ntwo\nthree\n", False)


def test_the_last_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"one\ntwo\nthree\n")
    assert compute.read_tail(log, 1 << 20, 2) == ("two\nthree\n", False)


def test_a_log_larger_than_the_limit_is_cut_at_a_whole_line(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"a" * 100 + b"\nlast line\n")
    text, truncated = compute.read_tail(log, 15, 0)
    assert (text, truncated) == ("last line\n", True)


def test_invalid_bytes_are_replaced_and_a_missing_log_is_empty(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot \xff\xfe ok\n")
    assert compute.read_tail(log, 1 << 20, 0) == ("boot \ufffd\ufffd ok\n", False)
    assert compute.read_tail(tmp_path / "never-written.log", 1 << 20, 0) == ("", False)
