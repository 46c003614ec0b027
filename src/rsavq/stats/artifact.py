"""The Fisher statistics artifact: one safetensors file per layer plus `manifest.json`.

Layout of a stats directory:
    manifest.json            written last: its presence means the statistics are complete
    layers/<name>.safetensors   F_O, F_I (fp32, symmetric: their upper triangles, packed row
                             by row, as F_O.upper / F_I.upper), g (fp32); sq_norm and count in
                             the metadata (format 1 stored F_O and F_I whole; still read)
    checkpoint/              an interrupted run's accumulators (`rsavq.store.Store`), then removed
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rsavq import __version__
from rsavq.algorithms.natural_gradient import LayerFisher
from rsavq.errors import UsageError
from rsavq.io import atomic_write_json
from rsavq.modules import weight_shape
from rsavq.store import Store, read_item, write_item

FORMAT_VERSION = 2  # 2: symmetric factors stored as packed upper triangles
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint"
RECOLLECT = "delete the stats directory and recollect"
VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "use_cache",
    "quantization_config",
}


def config_hash(config) -> str:
    """A hash of a model config's architecture-defining fields (names and dtypes ignored)."""
    items = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FisherStats:
    """A stats directory: its manifest, with layers read from disk on demand."""

    root: Path
    manifest: dict = field(repr=False)

    @property
    def layer_names(self) -> list[str]:
        return list(self.manifest["layers"])

    def layer(self, name: str, device="cpu") -> LayerFisher:
        if name not in self.manifest["layers"]:
            raise UsageError(
                f"no statistics for layer {name} in {self.root}; "
                "recollect them with `rsavq fisher` for this model"
            )
        return read_layer(self.root / "layers" / f"{name}.safetensors", device)

    def check_model(self, model, layers: dict[str, torch.nn.Module]) -> None:
        """Refuse statistics made from another model (config hash or layer shapes differ)."""
        expected = config_hash(model.config)
        if self.manifest["config_hash"] != expected:
            raise UsageError(
                f"statistics in {self.root} were made from another model (config hash "
                f"{self.manifest['config_hash']} != {expected}); recollect them with "
                "`rsavq fisher --model ...` for this model or pass the right --stats"
            )
        for name, layer in layers.items():
            shape = self.manifest["layers"].get(name, {}).get("shape")
            if shape != list(weight_shape(layer)):
                raise UsageError(
                    f"statistics in {self.root} do not match layer {name}: shape "
                    f"{shape} != {list(weight_shape(layer))}; recollect them"
                )


def read_layer(path: Path, device="cpu", fix: str = RECOLLECT) -> LayerFisher:
    tensors, meta = read_item(path, fix)
    try:
        count, sq_norm = int(meta["count"]), float(meta["sq_norm"])
        g = tensors["g"].to(device)
        F_O, F_I = (_factor(tensors, k, dim).to(device) for k, dim in (("F_O", 0), ("F_I", 1)))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{path} lacks {exc}: it is corrupt; {fix}") from exc
    if F_O.shape[0] != g.shape[0] or F_I.shape != (g.shape[1],) * 2:
        raise UsageError(f"{path} holds factors that do not fit its gradient: it is corrupt; {fix}")
    return LayerFisher(F_O, F_I, g, sq_norm, count)


def _item(stats: LayerFisher):
    tensors = {"g": stats.g, "F_I.upper": pack_upper(stats.F_I)}
    if stats.diag_output:
        tensors["F_O"] = stats.F_O
    else:
        tensors["F_O.upper"] = pack_upper(stats.F_O)
    return tensors, {"sq_norm": repr(stats.sq_norm), "count": str(stats.count)}


def _factor(tensors: dict, key: str, dim: int) -> torch.Tensor:
    """A factor as stored: whole (format 1, or diag(F_O)), or a packed upper triangle whose
    size is that of `g`'s `dim`."""
    if key in tensors:
        return tensors[key]
    return unpack_upper(tensors[f"{key}.upper"], tensors["g"].shape[dim])


def pack_upper(F: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric `F` `[k, k]`, row by row: `k (k + 1) / 2` numbers."""
    return torch.cat([F[i, i:] for i in range(F.shape[0])])


def unpack_upper(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The symmetric `[k, k]` matrix whose upper triangle `pack_upper` gave."""
    if packed.numel() != k * (k + 1) // 2:
        raise ValueError(f"a packed triangle of {packed.numel()} numbers is not {k} x {k}")
    F = packed.new_empty(k, k)
    start = 0
    for i in range(k):
        F[i, i:] = packed[start : start + k - i]
        start += k - i
    lower = torch.ones(k, k, dtype=torch.bool, device=F.device).tril(-1)
    return torch.where(lower, F.T, F)


def write_layer(path: Path, stats: LayerFisher) -> None:
    write_item(path, *_item(stats))


def build_manifest(model, model_id: str, run: dict, layers: dict) -> dict:
    """The manifest; `layers` maps each name to its accumulator, or to its manifest entry
    (`{"shape", "count", "diag_output"}`)."""
    layers = {
        name: value if isinstance(value, dict) else {
            "shape": list(value.stats.g.shape),
            "count": value.stats.count,
            "diag_output": value.stats.diag_output,
        }
        for name, value in layers.items()
    }  # fmt: skip
    return {
        "format_version": FORMAT_VERSION,
        "rsavq_version": __version__,
        "model": model_id,
        "config_hash": config_hash(model.config),
        **run,
        "layers": layers,
    }


def save_layers(root: Path, accumulators) -> None:
    """Write finished layers' statistics (before the manifest, which marks completion)."""
    for name, acc in accumulators.items():
        write_layer(root / "layers" / f"{name}.safetensors", acc.stats)


def save_stats(root: Path, manifest: dict, accumulators) -> FisherStats:
    """Write the finished statistics (layers first, manifest last) and drop any checkpoint."""
    save_layers(root, accumulators)
    atomic_write_json(root / MANIFEST, manifest)
    shutil.rmtree(root / CHECKPOINT, ignore_errors=True)
    return FisherStats(root, manifest)


def _checkpoint(root: Path, manifest: dict, name: str = CHECKPOINT) -> Store:
    return Store.open(
        root / name,
        run_key(manifest),
        refuse=f"{root} holds a checkpoint of a different run (model, data or settings "
        "differ); use another --out or delete it to start over",
        fix=f"delete {root / name} to start the collection over",
    )


def save_checkpoint(root: Path, manifest: dict, accumulators, name: str = CHECKPOINT) -> None:
    """Replace the checkpoint's accumulators with the current ones, all at once (`name`: the
    checkpoint's directory; each rank of a distributed run has its own)."""
    items = {layer: _item(acc.stats) for layer, acc in accumulators.items()}
    _checkpoint(root, manifest, name).put_all(items)


def load_checkpoint(root: Path, manifest: dict, accumulators, name: str = CHECKPOINT) -> int:
    """Restore accumulators from the checkpoint if it was made by the same run; return count."""
    store = _checkpoint(root, manifest, name)
    if not any(store.has(layer) for layer in accumulators):
        return 0  # nothing yet (or only an earlier pass's layers, which are written already)
    for name, acc in accumulators.items():
        acc.stats = read_layer(store.path(name), fix=store.fix)
    counts = {acc.stats.count for acc in accumulators.values()}
    if len(counts) != 1:
        raise UsageError(f"checkpoint in {root} is inconsistent; {store.fix}")
    return counts.pop()


def load_stats(root: str | Path) -> FisherStats:
    """Open a complete stats directory (verifying its manifest)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        hint = (
            " (an interrupted run: rerun the same `rsavq fisher` command to resume)"
            if any(root.glob(f"{CHECKPOINT}*"))
            else ""
        )
        raise UsageError(
            f"no Fisher statistics in {root}: {MANIFEST} missing{hint}; "
            "collect them with `rsavq fisher --model ... --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt ({exc.msg}); recollect the statistics") from exc
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise UsageError(
            f"{root} has stats format {manifest.get('format_version')}, this rsavq reads "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; recollect them"
        )
    return FisherStats(root, manifest)


def run_key(manifest: dict) -> dict:
    """What identifies a collection run (everything but progress counts and the version)."""
    drop = {"layers", "rsavq_version", "format_version"}  # (every readable format is the same run)
    return {k: v for k, v in manifest.items() if k not in drop} | {
        "layer_names": sorted(manifest["layers"])
    }
