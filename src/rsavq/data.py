"""Text sources by name or path, seeded calibration windows, and evaluation windows.

A source spec is a name with an optional split (`wikitext2`, `wikitext2:validation`, `c4`,
`ptb:test`) or a path to a `.txt`, `.jsonl`, `.jsonl.gz`/`.json.gz` or `.parquet` file (field or
column `text`).
Named sources are read from a local data directory (`data_dir`, or `$RSAVQ_DATA_DIR`) when it holds
them, otherwise from the Hugging Face hub with `datasets`. The error lists every place tried.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rsavq.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "RSAVQ_DATA_DIR"
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass(frozen=True)
class Corpus:
    """Documents of one source and split, joined with `joiner` into one text."""

    name: str
    documents: tuple[str, ...]
    joiner: str = "\n\n"
    shuffle: bool = False  # calibration may sample documents in random order (web text)

    def text(self) -> str:
        return self.joiner.join(self.documents)


@dataclass(frozen=True)
class NamedSource:
    """Where a named dataset lives: local file patterns per split and a hub loader."""

    default_split: str
    local: dict[str, tuple[str, ...]]  # split -> glob patterns under the data directory
    read_local: Callable[[Path], list[str]]
    hub: Callable[[str], list[str]]
    joiner: str = "\n\n"
    shuffle: bool = False


SPLITS = {
    "test": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "train": "train",
}


def wikitext_rows(raw: str) -> list[str]:
    """Rebuild the Hugging Face `wikitext-2-raw-v1` rows from a `wiki.*.raw` file.

    A line that is just " \\n" is an empty row; every other line is a row keeping its newline.
    """
    rows = ["" if line == " \n" else line for line in raw.splitlines(keepends=True)]
    if "".join(row or " \n" for row in rows) != raw:
        raise DataError("wikitext file does not round-trip to rows; is it a wiki.*.raw file?")
    return rows


def _hub_wikitext(split: str) -> list[str]:
    return list(_hub_load("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _hub_c4(split: str) -> list[str]:
    files = {
        "validation": "en/c4-validation.00000-of-00008.json.gz",
        "train": "en/c4-train.00000-of-01024.json.gz",
    }
    if split not in files:
        raise DataError(f"c4 has no '{split}' split; use c4:validation or c4:train")
    return list(_hub_load("allenai/c4", data_files={split: files[split]}, split=split)["text"])


def _hub_ptb(split: str) -> list[str]:
    return list(_hub_load("ptb_text_only", "penn_treebank", split=split)["sentence"])


def _hub_load(*args, **kwargs):
    try:
        import datasets
    except ImportError as exc:
        raise DataError("the `datasets` package is needed to load from the hub") from exc
    return datasets.load_dataset(*args, **kwargs)


def _read_ptb(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


NAMED: dict[str, NamedSource] = {
    "wikitext2": NamedSource(
        "test",
        {
            s: (f"wikitext2/wiki.{f}.raw", f"wikitext-2-raw/wiki.{f}.raw")
            for s, f in (("test", "test"), ("validation", "valid"), ("train", "train"))
        },
        lambda p: wikitext_rows(p.read_text(encoding="utf-8")),
        _hub_wikitext,
    ),
    "c4": NamedSource(
        "validation",
        {
            "validation": (
                "c4/*validation*.jsonl.gz",
                "c4/*validation*.json.gz",
                "c4/*validation*.parquet",
                "c4/*validation*.jsonl",
            ),
            "train": ("c4/*train*.jsonl.gz", "c4/*train*.json.gz", "c4/*train*.parquet"),
        },
        lambda p: read_documents(p),
        _hub_c4,
        shuffle=True,
    ),
    "ptb": NamedSource(
        "test",
        {
            s: (f"ptb/ptb.{f}.txt",)
            for s, f in (("test", "test"), ("validation", "valid"), ("train", "train"))
        },
        _read_ptb,
        _hub_ptb,
        joiner=" ",
    ),
}


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data directory: the explicit one, else `$RSAVQ_DATA_DIR`, else none."""
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_corpus(spec: str, data_dir: str | Path | None = None, text_field: str = "text") -> Corpus:
    """Load a named source (`name[:split]`) or a local file into a Corpus."""
    if spec.endswith(LOCAL_SUFFIXES) or os.sep in spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"data file {path} not found; check the path")
        return Corpus(path.name, tuple(read_documents(path, text_field)))
    name, _, split = spec.partition(":")
    if name not in NAMED:
        raise DataError(
            f"unknown dataset '{name}'; use one of {', '.join(NAMED)} (optionally name:split) "
            f"or a path to a {', '.join(LOCAL_SUFFIXES)} file"
        )
    return _load_named(name, split, resolve_data_dir(data_dir))


def _load_named(name: str, split: str, root: Path | None) -> Corpus:
    source = NAMED[name]
    split = split or source.default_split
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' for {name}; use test, validation or train")
    split = SPLITS[split]
    tried: list[str] = []
    documents = _from_local(source, split, root, tried)
    if documents is None:
        documents = _from_hub(source, split, tried)
    if documents is None:
        raise DataError(
            f"dataset {name}:{split} not found. Tried:\n  "
            + "\n  ".join(tried)
            + f"\nPass --data-dir (or set {DATA_DIR_ENV}) to a directory holding "
            + " or ".join(source.local.get(split, ("?",)))
            + ", or make the hub reachable."
        )
    return Corpus(f"{name}:{split}", tuple(documents), source.joiner, source.shuffle)


def _from_local(source: NamedSource, split: str, root: Path | None, tried: list[str]):
    if root is None:
        tried.append(f"local: no data directory (--data-dir or ${DATA_DIR_ENV})")
        return None
    for pattern in source.local.get(split, ()):
        matches = sorted(root.glob(pattern))
        if matches:
            logger.info("reading %s", matches[0])
            return source.read_local(matches[0])
    tried.append(f"local: nothing matching {', '.join(source.local.get(split, ()))} in {root}")
    return None


def _from_hub(source: NamedSource, split: str, tried: list[str]):
    try:
        return source.hub(split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds when offline
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        tried.append(f"hub: {type(exc).__name__}: {first[:200]}")
        return None


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of a local file: a whole .txt/.raw, or the `text_field` of json lines / parquet."""
    name = path.name
    if name.endswith((".txt", ".raw")):
        return [path.read_text(encoding="utf-8")]
    if name.endswith(".parquet"):
        return _read_parquet(path, text_field)
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return _read_jsonl(path, text_field)
    raise DataError(f"unsupported data file {path}; use {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if field not in record:
                raise DataError(f"{path}:{number}: no '{field}' field; pick one with --text-field")
            docs.append(record[field])
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise DataError(
            f"{path}: no '{field}' column (has {', '.join(table.column_names)}); "
            "pick one with --text-field"
        )
    return table.column(field).to_pylist()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids `[T]` of one text, as the protocol does it (tokenizer's special tokens on)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids  # [1, T]
    return ids[0]


def evaluation_windows(tokenizer, corpus: Corpus, seqlen: int, limit: int | None = None):
    """Non-overlapping windows `[N, seqlen]` over the whole tokenized corpus (tail dropped)."""
    ids = tokenize(tokenizer, corpus.text())
    count = ids.numel() // seqlen
    if count == 0:
        raise DataError(
            f"{corpus.name} has {ids.numel()} tokens, fewer than one window of "
            f"{seqlen}; lower --seqlen or use a longer text"
        )
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int = 0):
    """`nsamples` distinct, non-overlapping random windows `[nsamples, seqlen]`, seeded.

    Web-text corpora are read in a seeded random document order, only as far as needed.
    """
    generator = torch.Generator().manual_seed(seed)
    documents = _ordered(corpus, generator)
    taken, ids = _enough(tokenizer, corpus, documents, nsamples * seqlen)
    slots = ids.numel() // seqlen
    if slots < nsamples:
        raise DataError(
            f"{corpus.name} has {ids.numel()} tokens, fewer than {nsamples} windows "
            f"of {seqlen}; lower --nsamples/--seqlen or use a larger source"
        )
    chosen = torch.randperm(slots, generator=generator)[:nsamples]
    return ids[: slots * seqlen].view(slots, seqlen)[chosen]


def heldout_windows(
    tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int, count: int
) -> torch.Tensor:
    """`count` windows `[count, seqlen]` from documents that `calibration_windows` with the same
    arguments never reads (the next ones in its seeded order): text to measure over-fitting on."""
    rest = unread_documents(tokenizer, corpus, nsamples * seqlen, seed)
    _, ids = _enough(tokenizer, corpus, rest, count * seqlen)
    if ids.numel() < count * seqlen:
        raise DataError(
            f"{corpus.name} has too little text beyond the calibration documents for "
            f"{count} held-out windows of {seqlen}; lower the count or use a larger source"
        )
    return ids[: count * seqlen].view(count, seqlen)


def unread_documents(tokenizer, corpus: Corpus, tokens: int, seed: int = 0) -> list[str]:
    """The documents, in the seeded order `calibration_windows` reads them, after the leading
    ones that hold `tokens` tokens: text that no calibration of at most `tokens` tokens with
    this seed reads."""
    documents = _ordered(corpus, torch.Generator().manual_seed(seed))
    taken, _ = _enough(tokenizer, corpus, documents, tokens)
    return documents[len(taken) :]


def _ordered(corpus: Corpus, generator: torch.Generator) -> list[str]:
    documents = list(corpus.documents)
    if corpus.shuffle:
        order = torch.randperm(len(documents), generator=generator).tolist()
        documents = [documents[i] for i in order]
    return documents


def _enough(tokenizer, corpus: Corpus, documents: list[str], tokens: int):
    """The leading documents holding at least `tokens` tokens (or all), and their token ids."""
    budget = tokens * 8  # characters; ~4 per token, doubled for safety
    while True:
        taken = _take_chars(documents, budget)
        ids = tokenize(tokenizer, corpus.joiner.join(taken)) if taken else torch.empty(0).long()
        if ids.numel() >= tokens or len(taken) == len(documents):
            return taken, ids
        budget *= 2


def _take_chars(documents: list[str], budget: int) -> list[str]:
    """The leading documents holding at least `budget` characters (or all of them)."""
    taken, chars = [], 0
    for doc in documents:
        if chars >= budget:
            break
        taken.append(doc)
        chars += len(doc)
    return taken
