import pytest
import torch

from rsavq.errors import UsageError
from rsavq.store import Store


def open_store(root, identity=None):
    return Store.open(root, identity or {"run": 1}, refuse="other run", fix="delete it")


def test_items_round_trip_and_survive_reopening(tmp_path):
    store = open_store(tmp_path / "s")
    store.put("a.b", {"x": torch.arange(3)}, {"k": "v"})
    again = open_store(tmp_path / "s")
    tensors, meta = again.get("a.b")
    assert torch.equal(tensors["x"], torch.arange(3)) and meta == {"k": "v"}
    assert again.has("a.b") and not again.has("c") and again.keys() == ["a.b"]


def test_another_run_is_refused_and_nothing_is_touched(tmp_path):
    store = open_store(tmp_path / "s")
    store.put("a", {"x": torch.ones(1)}, {})
    with pytest.raises(UsageError, match="other run"):
        open_store(tmp_path / "s", {"run": 2})
    assert store.keys() == ["a"]


def test_snapshot_replaces_every_item(tmp_path):
    store = open_store(tmp_path / "s")
    store.put_all({"a": ({"x": torch.ones(1)}, {}), "b": ({"x": torch.zeros(1)}, {})})
    store.put_all({"c": ({"x": torch.ones(2)}, {})})
    assert store.keys() == ["c"]


def test_corrupt_item_names_the_file_and_the_fix(tmp_path):
    store = open_store(tmp_path / "s")
    store.put("a", {"x": torch.ones(1)}, {})
    store.path("a").write_bytes(b"garbage")
    with pytest.raises(UsageError, match=r"a\.safetensors is missing or corrupt .*delete it"):
        store.get("a")
    (tmp_path / "s" / "run.json").write_text("{")
    with pytest.raises(UsageError, match="run.json is corrupt"):
        open_store(tmp_path / "s")


def test_remove(tmp_path):
    store = open_store(tmp_path / "s")
    store.put("a", {"x": torch.ones(1)}, {})
    store.remove()
    assert not (tmp_path / "s").exists()
