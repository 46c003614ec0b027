"""Resident memory of one command over time, split into anonymous memory and file pages
(sampled from /proc/PID/status every 50 ms; Linux), and where its peak falls.

    python benchmarks/rss_trace.py trace.json -- rsavq fisher --model M --stream-weights ...

Writes the samples to the JSON and prints the peak's VmRSS, RssAnon and RssFile in GiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def sample(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except FileNotFoundError:
        return None
    return {
        line.split(":")[0]: int(line.split()[1]) / 2**20  # KiB -> GiB
        for line in status.splitlines()
        if line.startswith(FIELDS)
    }


def main() -> None:
    out, command = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    start, samples = time.time(), []
    while process.poll() is None:
        row = sample(process.pid)
        if row and "VmRSS" in row:
            samples.append({**row, "t": time.time() - start})
        time.sleep(0.05)
    with open(out, "w") as f:
        json.dump(samples, f)
    peak = max(samples, key=lambda r: r["VmRSS"])
    print(", ".join(f"{k} {peak[k]:.2f} GiB" for k in FIELDS if k in peak), f"at {peak['t']:.0f} s")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
