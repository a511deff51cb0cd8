"""``hailo-sweep run`` beyond one local process: ``--jobs N`` local worker processes, or ``--cluster ADDRESS`` (Dask)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hailo_sweep.config import SweepConfig
from hailo_sweep.console import console, err_console
from hailo_sweep.progress import RichObserver
from hailo_sweep.selection import load_study
from hailo_sweep.stores import resolve_stores
from hailo_sweep.sweep import NullObserver, Sweep, SweepSummary, budget_used, chosen_trial
from hailo_sweep.sweep.faults import interrupts_end_trials, not_yet_retried, resume_line, signals_held, signame_of

if TYPE_CHECKING:
    from distributed import Client


def run_on_cluster(cfg: SweepConfig, client: Client, trials: int | None, direction: str) -> SweepSummary:
    """The sweep driven from here, its stages on a Dask cluster (see hailo_sweep.cluster.driver), through ``client``
    (``hailo_sweep.cluster.connect.connect``); the client is closed when the sweep ends."""
    from hailo_sweep.cluster.connect import close
    from hailo_sweep.cluster.driver import ClusterLoop

    try:
        with RichObserver(console) as observer:
            observer.set_direction(direction)
            loop = ClusterLoop(client, cfg, observer.message)
            return Sweep(loop.resolve(cfg), observer, loop=loop).run(trials)
    finally:  # distributed's lines while it disconnects go to the sweep's log folder, not the console
        close(client, resolve_stores(cfg).work_dir / "logs" / "dask-client.log")


def run_jobs(cfg: SweepConfig, config: Path, total: int, jobs: int) -> tuple[int | None, float | None]:
    """``init`` here, then ``jobs`` worker processes; their output goes to sweeps/<name>/logs/."""
    class Messages(NullObserver):  # the pre-flight's messages (calibration, device), once, before the workers start
        def message(self, text: str) -> None:
            console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True)

    sweep = Sweep(cfg, Messages())
    sweep.init()
    for t in sweep.requeued:  # interrupted trials enqueued again: the workers take them first
        console.print(resume_line(t), highlight=False)
    log_dir = sweep.stores.work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    try:
        # the signals become KeyboardInterrupt before the first worker starts: a Ctrl-C or SIGTERM while they start
        # (they run in their own process group, so only this process gets it) still reaches each one started
        with interrupts_end_trials():
            for index in range(jobs):
                log = (log_dir / f"worker-{index}.log").open("ab")
                cmd = [sys.executable, "-m", "hailo_sweep.cli", "worker", str(config), "--trials", str(total), "--worker-index", str(index)]
                # its own process group: a terminal's Ctrl-C reaches this process only, which forwards it once (below)
                popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"}, process_group=0)
                procs.append((popen, log))
            console.print(f"{jobs} workers started; their output: {log_dir}", soft_wrap=True)
            study, _ = load_study(cfg)
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
                task = progress.add_task(f"{jobs} workers", total=total)
                while any(p.poll() is None for p, _ in procs):
                    progress.update(task, completed=min(budget_used(study, count_running=False), total))
                    time.sleep(1.0)
                progress.update(task, completed=min(budget_used(study, count_running=False), total))
    except KeyboardInterrupt as exc:  # forward the signal to every worker, wait until each has recorded its trial
        sig = signal.SIGTERM if signame_of(exc) == "SIGTERM" else signal.SIGINT
        with signals_held():
            for p, _ in procs:
                if p.poll() is None:
                    p.send_signal(sig)
            for p, log in procs:
                p.wait()
                log.close()
        study, _ = load_study(cfg)
        for t in not_yet_retried(study):
            console.print(f"trial {t.number} interrupted ({t.user_attrs['interrupted']}) in stage {t.user_attrs.get('failed_stage', '?')}: the next `hailo-sweep run` retries it", highlight=False)
        console.print(f"interrupted: {len(procs)} workers stopped, their trials are on record (see {log_dir})", soft_wrap=True)
        raise
    failed = []
    for index, (proc, log) in enumerate(procs):
        log.close()
        if proc.returncode != 0:
            failed.append(index)
    if failed:
        err_console.print(f"[bold red]error:[/] worker(s) {failed} exited with an error; see {log_dir}")
        raise typer.Exit(code=1)
    best = chosen_trial(study)
    return (best.number, best.values[0]) if best is not None else (None, None)
