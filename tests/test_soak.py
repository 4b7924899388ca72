"""A short run of scripts/soak.py: 8 threads, mixed valid and invalid requests, every
valid result equal to the one-at-a-time result, every invalid one failing alone."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_short_soak() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--threads", "8", "--requests", "200"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "200 requests" in out.stdout and "OK" in out.stdout
