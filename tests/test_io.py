import json

import pytest

from rsavq.io import atomic_dir, atomic_write, atomic_write_json, rewrite_block


def test_atomic_write_json_roundtrip(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir(target, lambda d: (d / "a").write_text("1"))
    with pytest.raises(ValueError):
        atomic_dir(target, lambda d: (_ for _ in ()).throw(ValueError("x")))
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_rewrite_block_replaces_only_the_marked_text(tmp_path):
    path = tmp_path / "doc.md"
    rewrite_block(path, "t", "first")
    assert path.read_text() == "<!-- t:begin -->\nfirst\n<!-- t:end -->\n"
    path.write_text("# Title\n\n" + path.read_text() + "\n## After\n")
    rewrite_block(path, "t", "second\n")
    assert path.read_text() == "# Title\n\n<!-- t:begin -->\nsecond\n<!-- t:end -->\n\n## After\n"
    rewrite_block(path, "u", "other")
    assert path.read_text().endswith("## After\n\n<!-- u:begin -->\nother\n<!-- u:end -->\n")
