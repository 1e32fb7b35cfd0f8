"""Folder walking and watching on trees no camera would write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from photd.watcher import MAX_DEPTH, FolderWatcher, walk


@pytest.fixture
def deep(tmp_path: Path):
    """1200 folders one inside the other (made, and removed, without recursion:
    shutil.rmtree and pytest's own clean-up of old temporary folders recurse)."""
    here = tmp_path
    for _ in range(1200):
        here = here / "d"
        here.mkdir()
    yield here
    while here != tmp_path:
        for child in here.iterdir():
            child.unlink()
        here.rmdir()
        here = here.parent


def test_walk_stops_at_the_depth_limit_on_a_thousand_nested_folders(
        tmp_path: Path, deep: Path) -> None:
    (tmp_path / "night").mkdir()
    (tmp_path / "night" / "a.fits").write_bytes(b"")
    (deep / "deep.fits").write_bytes(b"")
    tree = walk([tmp_path])
    assert tree.files == [tmp_path / "night" / "a.fits"]
    assert tree.too_deep == [tmp_path.joinpath(*["d"] * (MAX_DEPTH + 1))]
    assert len(tree.folders) == 2 + MAX_DEPTH  # root, night, d .. d (MAX_DEPTH levels)


def test_walk_does_not_follow_a_link_to_a_folder(tmp_path: Path) -> None:
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "loop").symlink_to(tmp_path)
    (tmp_path / "cam" / "x.fits").write_bytes(b"")
    tree = walk([tmp_path / "cam"])
    assert tree.folders == [tmp_path / "cam"]
    assert tree.files == [tmp_path / "cam" / "x.fits"]


def test_walk_lists_names_that_are_not_utf8(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/bad-\xff\xfe.fits"
    with open(raw, "wb"):
        pass
    tree = walk([tmp_path])
    assert [os.fsencode(p) for p in tree.files] == [raw]


def test_watcher_start_on_a_too_deep_tree_reports_instead_of_raising(
        tmp_path: Path, deep: Path) -> None:
    watcher = FolderWatcher([tmp_path])
    problem = watcher.start()
    try:
        if problem is None:  # a watchdog that no longer recurses: events simply work
            assert watcher.alive()
        else:
            assert "RecursionError" in problem
            assert not watcher.alive()
    finally:
        watcher.stop()
