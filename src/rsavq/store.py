"""The resumable store of long runs: what the run is, and the items it has finished.

Quantization (`OUT/.partial/`, one item per finished layer) and Fisher collection
(`STATS/checkpoint/`, a snapshot of every layer's accumulators) both keep their work here:

    run.json                  the run's identity; a run with another identity is refused
    items/<key>.safetensors   tensors, and string metadata in the safetensors header

Every file is written atomically (a reader sees the old file or the whole new one), and a
corrupt item is reported with the file and the fix, never silently recomputed over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rsavq.errors import UsageError
from rsavq.io import atomic_dir, atomic_write, atomic_write_json

RUN = "run.json"
ITEMS = "items"
SUFFIX = ".safetensors"

Item = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, metadata


def write_item(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """One safetensors file, atomically (tensors made contiguous and moved to the CPU)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_item(path: Path, fix: str) -> Item:
    """Tensors and metadata of one file; a missing or corrupt file is one line naming `fix`."""
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{path} is missing or corrupt ({exc}); {fix}") from exc
    return tensors, meta


class Store:
    """A directory holding one run's finished items (see the module docstring)."""

    def __init__(self, root: str | Path, fix: str):
        self.root = Path(root)
        self.fix = fix  # what to do about a corrupt item

    @classmethod
    def open(cls, root: str | Path, identity: dict, refuse: str, fix: str) -> Store:
        """The store at `root` for the run `identity`: created, or reopened when it was made
        by the same run; one made by another run is refused with the message `refuse`."""
        store = cls(root, fix)
        saved = store.identity()
        if saved is None:
            atomic_write_json(store.root / RUN, identity)
        elif saved != json.loads(json.dumps(identity)):
            raise UsageError(refuse)
        return store

    def identity(self) -> dict | None:
        path = self.root / RUN
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is corrupt ({exc.msg}); {self.fix}") from exc

    def path(self, key: str) -> Path:
        return self.root / ITEMS / f"{key}{SUFFIX}"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def keys(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in (self.root / ITEMS).glob(f"*{SUFFIX}"))

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        write_item(self.path(key), tensors, meta)

    def put_all(self, items: dict[str, Item]) -> None:
        """Replace every item at once (a snapshot: readers see the old set or the new one)."""

        def fill(tmp: Path) -> None:
            for key, (tensors, meta) in items.items():
                write_item(tmp / f"{key}{SUFFIX}", tensors, meta)

        atomic_dir(self.root / ITEMS, fill)

    def get(self, key: str) -> Item:
        return read_item(self.path(key), self.fix)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
