"""The stage clock: wall seconds and peak resident memory of each stage of a run.

    clock = StageClock()
    with using(clock):
        with timed("fisher"):
            ...
    clock.to_dict()   # {"stages": {"fisher": {"seconds": .., "peak_rss_gib": .., "calls": ..}}}

Library code marks its stages with `timed(name)` (a no-op when no clock is in use), so the same
code runs timed under `rsavq quantize` and untimed in tests. Seconds are exclusive: while a
stage nested in another runs, the outer one's clock stops, so the stages add up to the run.
Peak RSS is inclusive (the most resident memory while the stage or one nested in it ran); on
Linux each stage starts from a reset high-water mark (`/proc/self/clear_refs`), elsewhere it is
the process's peak so far. `timed(name, index=i)` also keeps the seconds of item `i` (a decoder
block) apart. The clock also names the CPU it ran on (`cpu_name`): times, and with them the
checkpoint a run makes, differ between CPUs.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss() -> int:
    """Bytes: the resident high-water mark since the last reset (Linux), else the process's."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # (Windows: no peak to read)
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS


@dataclass
class _Stage:
    seconds: float = 0.0
    peak: int = 0
    calls: int = 0
    items: dict[int, float] = field(default_factory=dict)


class StageClock:
    """Wall seconds (exclusive) and peak RSS (inclusive) per named stage, in first-use order."""

    def __init__(self) -> None:
        self.stages: dict[str, _Stage] = {}
        self._active: list[tuple[str, int | None]] = []
        self._since = 0.0  # when the innermost active stage last (re)started
        self.started = time.perf_counter()

    def _charge(self, now: float) -> None:
        """Give the time since `_since` to the innermost active stage, and the memory peak
        since the last reset to every active one."""
        peak = _peak_rss()
        for name, _ in self._active:
            self.stages[name].peak = max(self.stages[name].peak, peak)
        if self._active:
            name, index = self._active[-1]
            stage = self.stages[name]
            stage.seconds += now - self._since
            if index is not None:
                stage.items[index] = stage.items.get(index, 0.0) + now - self._since
        self._since = now
        _reset_peak()

    @contextlib.contextmanager
    def stage(self, name: str, index: int | None = None) -> Iterator[None]:
        self._charge(time.perf_counter())
        self.stages.setdefault(name, _Stage()).calls += 1
        self._active.append((name, index))
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._active.pop()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started

    def to_dict(self) -> dict:
        """`{"stages": {name: {"seconds", "peak_rss_gib", "calls"[, "per_item"]}},
        "total_seconds", "untimed_seconds", "peak_rss_gib", "cpu"}` (JSON-ready)."""
        stages = {}
        for name, s in self.stages.items():
            row = {"seconds": s.seconds, "peak_rss_gib": s.peak / 2**30, "calls": s.calls}
            if s.items:
                row["per_item"] = {str(k): v for k, v in sorted(s.items.items())}
            stages[name] = row
        total = self.total
        return {
            "stages": stages,
            "total_seconds": total,
            "untimed_seconds": max(0.0, total - sum(s.seconds for s in self.stages.values())),
            "peak_rss_gib": max((s.peak for s in self.stages.values()), default=0) / 2**30,
            "cpu": cpu_name(),
        }


def cpu_name() -> str:
    """The CPU's model name, family and model (`/proc/cpuinfo`), or the platform's processor."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" in fields:
        family, model = fields.get("cpu family"), fields.get("model")
        return f"{fields['model name']} (family {family}, model {model})"
    return platform.processor() or platform.machine()


def format_clock(data: dict) -> str:
    """The clock of `StageClock.to_dict()` as aligned lines of text, the total last."""
    width = max([len(n) for n in data["stages"]] + [len("untimed")])
    lines = [
        f"  {name:<{width}}  {s['seconds'] / 60:7.2f} min  peak RSS {s['peak_rss_gib']:5.2f} GiB"
        for name, s in data["stages"].items()
    ]
    lines.append(f"  {'untimed':<{width}}  {data['untimed_seconds'] / 60:7.2f} min")
    lines.append(
        f"  {'total':<{width}}  {data['total_seconds'] / 60:7.2f} min  "
        f"peak RSS {data['peak_rss_gib']:5.2f} GiB"
    )
    return "\n".join(lines)


_clock: StageClock | None = None


@contextlib.contextmanager
def using(clock: StageClock) -> Iterator[StageClock]:
    """Make `clock` the one `timed` reports to for the duration (an outer one is kept aside)."""
    global _clock
    outer, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = outer


def current() -> StageClock | None:
    return _clock


@contextlib.contextmanager
def timed(name: str, index: int | None = None) -> Iterator[None]:
    """Time the body as stage `name` (item `index`) of the clock in use, if any."""
    if _clock is None:
        yield
        return
    with _clock.stage(name, index):
        yield
