"""Benchmark: how long ``hailo-sweep ui`` takes to stop on SIGTERM and on Ctrl-C (SIGINT), with a browser attached
(issue 14: within 2 s, without a traceback).

For each signal and ``--repeat`` times: start ``hailo-sweep ui`` on a small tracking store, wait until it prints its
links, open the runs page in headless Chromium (when installed; else hold a keep-alive HTTP connection, which is what
kept uvicorn waiting), send the signal to the command, and time until the command has exited and the port is closed.
Reports each time, the exit codes, and whether the output had a traceback.

Usage: ``python benchmarks/bench_ui_stop.py [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_S = 2.0


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def one(root: Path, sig: int) -> dict[str, object]:
    from hailo_sweep.ui import free_port
    from tests.browser import Browser, chromium_path

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hailo_sweep.cli", "ui", "--port", str(port)], cwd=root, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "COLUMNS": "250"},
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "press Ctrl-C" in line:
            break
    url = re.search(r"runs page: (\S+)", "".join(seen))
    if url is None:
        raise SystemExit("ui did not print its links:\n" + "".join(seen))
    browser, conn = None, None
    if chromium_path():
        browser = Browser()
        browser.goto(url.group(1))
        browser.wait_for("document.body.innerText.includes('Runs')")
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        conn.getresponse().read()
    start = time.perf_counter()
    os.killpg(proc.pid, sig)
    rest = proc.communicate(timeout=60)[0]
    while port_open(port) and time.perf_counter() - start < 60:
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if browser is not None:
        browser.close()
    if conn is not None:
        conn.close()
    return {"seconds": seconds, "exit_code": proc.returncode, "traceback": "Traceback" in rest, "client": "chromium" if browser else "keep-alive"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ui-stop-") as tmp:
        root = Path(tmp)
        (root / "mlruns").mkdir()
        client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        exp = client.create_experiment("bench-ui-stop")
        client.set_terminated(client.create_run(exp, run_name="a run").info.run_id)
        for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGINT (Ctrl-C)", signal.SIGINT)):
            results[name] = [one(root, sig) for _ in range(args.repeat)]
    print(f"signal            stop times (target < {TARGET_S:.0f} s)          exit codes  traceback  client")
    for name, runs in results.items():
        times = " ".join(f"{r['seconds']:.2f}" for r in runs)
        worst = max(float(r["seconds"]) for r in runs)  # type: ignore[arg-type]
        print(f"{name:<17} {times:<30} {'ok' if worst < TARGET_S else 'SLOW':<5} {','.join(str(r['exit_code']) for r in runs):<11} "
              f"{'yes' if any(r['traceback'] for r in runs) else 'no':<10} {runs[0]['client']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
