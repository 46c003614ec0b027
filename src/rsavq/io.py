"""Atomic file writes: a file is either the old one or the complete new one, never half."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then move the result onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory with `fill(tmp_dir)` and rename it onto `path` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def rewrite_block(path: str | Path, name: str, block: str) -> Path:
    """Atomically replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in
    `path` by `block` (appending the marked block when absent; creating the file if needed)."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    marked = f"{begin}\n{block.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + marked + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + marked + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))
