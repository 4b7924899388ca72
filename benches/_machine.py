"""What the benchmarks read about the machine they run on: the CPU's name, and how many
cores other processes used while something was measured (shared machines)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_reading() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None
    without /proc."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system  # minus idle, iowait


def foreign_cores(
    before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float, children_s: float = 0.0
) -> float:
    """Cores other processes used on average between two cpu_reading()s `wall` seconds
    apart; `children_s` is CPU time of this process's own children to leave out."""
    if before is None or after is None or wall <= 0:
        return 0.0
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1]) - children_s) / wall)
