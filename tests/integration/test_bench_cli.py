"""``python -m benchmarks`` (issue 18, the benchmark report): ``--help`` prints usage and starts
nothing, ``--list`` names each benchmark ``--only`` runs alone, and an unknown name is one
``error:`` line (argparse's), never a traceback. Run as the user runs it: a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/ is not installed


def bench(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args, "--output", str(tmp / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_prints_usage_and_runs_nothing(tmp_path: Path) -> None:
    res = bench("--help", tmp=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m benchmarks"), res
    assert "--only NAME" in res.stdout
    assert not (tmp_path / "out.json").exists()  # no benchmark ran, no report was written


def test_list_names_every_benchmark_only_accepts(tmp_path: Path) -> None:
    res = bench("--list", tmp=tmp_path)
    names = res.stdout.split()
    assert res.returncode == 0 and {"split_load", "read", "ingress", "ingress_latency", "api"} <= set(names), res
    assert not (tmp_path / "out.json").exists()


def test_an_unknown_benchmark_is_one_error_line(tmp_path: Path) -> None:
    res = bench("--only", "nonesuch", tmp=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [line for line in res.stderr.splitlines() if "error:" in line] == [
        line for line in res.stderr.splitlines() if line.startswith("python -m benchmarks: error: argument --only")]
    assert not (tmp_path / "out.json").exists()
