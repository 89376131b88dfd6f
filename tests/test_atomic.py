"""`softalign.atomic`: a file is replaced whole or not at all, and no temporary is left behind."""

import os
import stat

import pytest

from softalign.atomic import atomic_file, atomic_write_text


def test_atomic_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "summary.json"
    atomic_write_text(target, "old\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_text("complete\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as temp:
        temp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_a_writer_that_writes_nothing_is_an_error_and_changes_nothing(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"png")
    with pytest.raises(FileNotFoundError), atomic_file(target):
        pass
    assert target.read_bytes() == b"png"


def test_concurrent_writers_of_one_path_get_different_temporaries(tmp_path):
    target = tmp_path / "index.json"
    with atomic_file(target) as first, atomic_file(target) as second:
        assert first != second
        assert first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer writer finishes last


def test_the_result_has_the_permissions_of_the_umask_not_a_private_temporary(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "card.md", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "card.md").stat().st_mode) == 0o644
