"""Benchmark: how long the command line takes to answer when it has nothing heavy to do (issue 14: under 1 s).

Measures wall time, process start to exit, of:
- ``hailo-sweep --help``, ``hailo-sweep --version``, ``hailo-sweep run --help``, ``hailo-sweep diagnose --help``;
- ``hailo-sweep run BAD.yaml`` where BAD.yaml has a one-character typo in a key (exit 2, the config error);
- ``hailo-sweep run MISSING.yaml`` (a config file that does not exist, exit 2);
and, for each, which heavy modules (mlflow, optuna, onnxruntime, matplotlib) the process imported.
Each command runs ``--repeat`` times (default 5) through the installed ``hailo-sweep`` script next to this Python;
the median and the worst are reported against the 1 s target.

Usage: ``python benchmarks/bench_cli_start.py [--repeat 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
HEAVY = ("mlflow", "optuna", "onnxruntime", "matplotlib")

# run the CLI in-process under `python -c` so that the modules it imported can be listed when it exits
PROBE = """
import atexit, sys
heavy = {heavy!r}
atexit.register(lambda: sys.stderr.write("HEAVY:" + ",".join(h for h in heavy if h in sys.modules) + "\\n"))
sys.argv = ["hailo-sweep", *sys.argv[1:]]
from hailo_sweep.cli import app
app()
"""


def script() -> list[str]:
    exe = Path(sys.executable).with_name("hailo-sweep")
    if not exe.is_file():
        raise SystemExit(f"{exe} not found: install the package first (make install)")
    return [str(exe)]


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, float]:
    """Wall seconds, exit code, and CPU seconds (user + system) of one run: on a loaded machine the wall time is
    mostly waiting for a core, the CPU time is what the command itself costs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, proc.returncode, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(args: list[str], cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd, capture_output=True, text=True, check=False)
    line = next((l for l in proc.stderr.splitlines() if l.startswith("HEAVY:")), "HEAVY:")
    return [h for h in line.removeprefix("HEAVY:").split(",") if h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        root = Path(tmp)
        good = (REPO / "configs" / "digits.yaml").read_text()
        assert "\ntarget:" in good
        (root / "bad.yaml").write_text(good.replace("\ntarget:", "\ntarged:"))  # a one-character typo in a key
        cases = {
            "--help": ["--help"],
            "--version": ["--version"],
            "run --help": ["run", "--help"],
            "diagnose --help": ["diagnose", "--help"],
            "config typo (exit 2)": ["run", "bad.yaml"],
            "missing config (exit 2)": ["run", "missing.yaml"],
        }
        timed(script() + ["--version"], root)  # warm the file cache once, like a second use
        results = {}
        for name, cmd_args in cases.items():
            runs = [timed(script() + cmd_args, root) for _ in range(args.repeat)]
            codes = sorted({code for _, code, _ in runs})
            seconds = [s for s, _, _ in runs]
            results[name] = {
                "median_s": statistics.median(seconds), "max_s": max(seconds), "cpu_median_s": statistics.median(c for _, _, c in runs), "exit_codes": codes,
                "heavy_imports": heavy_imports(cmd_args, root),
            }
    width = max(len(n) for n in results)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall median and max, CPU median; target < {TARGET_S:.0f} s")
    print(f"{'command':<{width}}  median    max    cpu  exit  heavy modules imported")
    for name, r in results.items():
        ok = "ok" if r["max_s"] < TARGET_S else "SLOW"
        print(f"{name:<{width}}  {r['median_s']:5.2f} s {r['max_s']:5.2f} s {r['cpu_median_s']:4.2f} s  {','.join(map(str, r['exit_codes'])):>4}  {','.join(r['heavy_imports']) or '-':<22} {ok}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
