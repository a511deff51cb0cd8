"""The plumbing of ``--cluster``: the ``cluster:`` config, reaching a scheduler (TLS, unreachable, no extra), worker
resources on a live local cluster, the test harness itself, and the fake SDK's benchmark delays.

Every process binds to 127.0.0.1; timeouts are short (a second or two) where a test waits for something not to happen.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer

from hailo_sweep.cluster.config import ClusterConfig
from hailo_sweep.config import load_config
from hailo_sweep.console import handles_errors
from hailo_sweep.errors import ClusterUnreachable, ResourceMissing, UserInputError
from tests.conftest import WriteConfig, cli
from tests.test_cli import probe
from tests.dask_cluster import DaskCluster, StartCluster, WorkerSpec
from tests.hailo_fixtures import FakeHailo, TinyModel
from tests.tls_files import make_tls_files

distributed = pytest.importorskip("distributed")

from hailo_sweep.cluster.connect import connect, dask_address  # noqa: E402 - needs distributed
from hailo_sweep.cluster.resources import wait_for_resources, worker_resources  # noqa: E402

UNREACHABLE = "tcp://u:secret@127.0.0.1:1"  # port 1: nothing listens there


def exit_code(fn: Any, *args: Any) -> int:
    """The exit code the CLI's shared error handling gives ``fn``'s error."""
    with pytest.raises(typer.Exit) as raised:
        handles_errors(fn)(*args)
    return raised.value.exit_code


# -- config ---------------------------------------------------------------------------------------------------------------
def test_defaults_and_unknown_keys(write_config: WriteConfig) -> None:
    cfg = load_config(write_config())
    assert cfg.cluster == ClusterConfig()
    assert (cfg.cluster.address, cfg.cluster.connect_timeout_s, cfg.cluster.resource_timeout_s, cfg.cluster.queued) == (None, 20, 600, 1)
    with pytest.raises(UserInputError) as err:
        load_config(write_config(cluster={"adress": "tcp://x:8786"}))
    assert "cluster.adress" in str(err.value) and "did you mean 'address'" in str(err.value)


def test_tls_files_all_or_none(write_config: WriteConfig) -> None:
    with pytest.raises(UserInputError) as err:
        load_config(write_config(cluster={"tls_ca_file": "ca.pem", "tls_cert": "node.pem"}))
    assert "tls_key" in str(err.value) and err.value.key == "cluster"
    with pytest.raises(UserInputError, match="require_encryption needs the TLS files"):
        load_config(write_config(cluster={"require_encryption": True}))


def test_tls_paths_resolve_against_the_config_folder_and_a_missing_one_is_bad_input(write_config: WriteConfig) -> None:
    path = write_config(cluster={"tls_ca_file": "tls/ca.pem", "tls_cert": "tls/node.pem", "tls_key": "tls/node.key"})
    tls = make_tls_files(path.parent / "tls")
    tls.key.unlink()
    cfg = load_config(path)
    with pytest.raises(UserInputError) as err:
        cfg.cluster.resolved(cfg.source)
    assert err.value.key == "cluster.tls_key" and err.value.file == str(path)
    assert str(path.parent / "tls" / "node.key") in err.value.problem and "point cluster.tls_key at" in (err.value.fix or "")
    assert exit_code(cfg.cluster.resolved, cfg.source) == 2
    make_tls_files(path.parent / "tls")
    resolved = cfg.cluster.resolved(cfg.source)
    assert resolved.tls_cert == path.parent / "tls" / "node.pem" and resolved.uses_tls


# -- connecting -----------------------------------------------------------------------------------------------------------
def test_dask_address_upgrades_to_tls_and_drops_credentials() -> None:
    assert dask_address("tcp://u:pw@sched:8786", tls=False) == "tcp://sched:8786"
    assert dask_address("sched:8786", tls=True) == "tls://sched:8786"
    assert dask_address("tcp://sched:8786", tls=True) == "tls://sched:8786"
    assert dask_address("ws://sched:8786", tls=False) == "ws://sched:8786"


def test_unreachable_scheduler_names_the_address_without_its_password() -> None:
    cfg = ClusterConfig(connect_timeout_s=1)
    with pytest.raises(ClusterUnreachable) as err:
        connect(cfg, UNREACHABLE)
    assert err.value.address == "tcp://u:***@127.0.0.1:1"
    assert "tcp://u:***@127.0.0.1:1" in str(err.value) and "secret" not in str(err.value)
    assert exit_code(connect, cfg, UNREACHABLE) == 3


def test_bad_addresses_are_bad_input() -> None:
    with pytest.raises(UserInputError, match="not a Dask scheduler address") as err:
        connect(ClusterConfig(connect_timeout_s=1), "foo://u:secret@127.0.0.1:1")
    assert "secret" not in str(err.value)
    with pytest.raises(UserInputError, match="TLS address but the config names no TLS files"):
        connect(ClusterConfig(connect_timeout_s=1), "tls://127.0.0.1:1")
    with pytest.raises(UserInputError, match="no Dask scheduler address"):
        connect(ClusterConfig(), None)


def test_without_distributed_the_fix_is_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    with pytest.raises(UserInputError) as err:
        connect(ClusterConfig(connect_timeout_s=1), "tcp://127.0.0.1:1")
    assert "pip install 'hailo-sweep[cluster]'" in (err.value.fix or "")
    assert exit_code(connect, ClusterConfig(connect_timeout_s=1), "tcp://127.0.0.1:1") == 2


def test_cli_exits_3_for_an_unreachable_scheduler(write_config: WriteConfig, tmp_path: Path) -> None:
    help_text = cli(tmp_path, "run", "--help").stdout
    if "--cluster" not in help_text:
        pytest.skip("`hailo-sweep run --cluster` is not there yet (the driver of issue 13)")
    config = write_config(cluster={"connect_timeout_s": 1})
    result = cli(tmp_path, "run", str(config), "--cluster", UNREACHABLE)
    assert result.returncode == 3, result.stderr
    assert "127.0.0.1:1" in result.stderr and "secret" not in result.stdout + result.stderr
    # the scheduler is tried before MLflow, Optuna and onnxruntime are imported: the wait is the connect timeout alone
    code, out, heavy = probe("run", str(config), "--cluster", UNREACHABLE, cwd=tmp_path)
    assert code == 3 and "cannot reach the Dask scheduler" in out, out
    assert heavy == []


def test_tls_scheduler_accepts_a_client_with_the_config_files(dask_cluster: StartCluster, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    cluster = dask_cluster([WorkerSpec("w0", {"compile": 1})], tls=tls)
    assert cluster.address.startswith("tls://")
    plain_address = cluster.address.replace("tls://", "tcp://")  # the TLS files turn it back into tls://
    raw = {"tls_ca_file": "tls/ca.pem", "tls_cert": "tls/node.pem", "tls_key": "tls/node.key", "require_encryption": True, "connect_timeout_s": 10}
    cfg = ClusterConfig.model_validate(raw).resolved(tmp_path / "sweep.yaml")
    with connect(cfg, plain_address) as client:
        assert client.submit(sum, [1, 2], resources={"compile": 1}).result(timeout=30) == 3
        assert client.scheduler.address.startswith("tls://")
    with pytest.raises(ClusterUnreachable):  # no certificate, no connection
        connect(ClusterConfig(connect_timeout_s=1), plain_address)


def test_cli_reads_relative_tls_files_next_to_the_config(dask_cluster: StartCluster, write_config: WriteConfig, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    cluster = dask_cluster([], tls=tls)  # no worker: the run gets as far as waiting for one, over TLS
    config = write_config(cluster={"tls_ca_file": "tls/ca.pem", "tls_cert": "tls/node.pem", "tls_key": "tls/node.key",
                                   "require_encryption": True, "connect_timeout_s": 10, "resource_timeout_s": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli(elsewhere, "run", str(config), "--cluster", cluster.address)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "offers the resource" in result.stderr and cluster.address in result.stderr


# -- resources on a live cluster ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    specs = [WorkerSpec("compile-0", {"compile": 1}), WorkerSpec("pi-0", {"hailo8l": 1}), WorkerSpec("plain")]
    with DaskCluster(tmp_path_factory.mktemp("dask"), specs) as started:
        yield started


@pytest.fixture
def client(cluster: DaskCluster) -> Iterator[Any]:
    with connect(ClusterConfig(connect_timeout_s=10), cluster.address) as c:
        yield c


def test_worker_resources_per_worker(client: Any) -> None:
    resources = worker_resources(client)
    assert sorted(resources.values(), key=str) == sorted([{"compile": 1.0}, {"hailo8l": 1.0}, {}], key=str)


def test_present_resources_are_found_without_a_word(client: Any) -> None:
    said: list[str] = []
    found = wait_for_resources(client, ["compile", "hailo8l"], timeout_s=5, say=said.append)
    assert said == []
    resources = worker_resources(client)
    assert [resources[a] for a in found["compile"]] == [{"compile": 1.0}]
    assert [resources[a] for a in found["hailo8l"]] == [{"hailo8l": 1.0}]


def test_a_missing_resource_is_named_with_the_line_that_provides_it(client: Any, cluster: DaskCluster) -> None:
    said: list[str] = []
    with pytest.raises(ResourceMissing) as err:
        wait_for_resources(client, ["compile", "hailo10h"], timeout_s=1.5, say=said.append)
    assert err.value.missing == ["hailo10h"]
    line = f'dask worker {cluster.address} --nthreads 1 --resources "hailo10h=1"'
    assert line in str(err.value) and "'compile'" not in str(err.value)
    assert len(said) == 1 and "'hailo10h'" in said[0] and line in said[0]  # said once, however many polls
    assert exit_code(wait_for_resources, client, ["hailo10h"], 0.1, said.append) == 1


def test_waiting_ends_when_a_worker_with_the_resource_joins(dask_cluster: StartCluster) -> None:
    started = dask_cluster([])  # a scheduler with no worker yet
    said: list[str] = []

    def say(text: str) -> None:  # the user reads the hint and starts the worker
        said.append(text)
        started.start_worker(WorkerSpec("late-0", {"hailo8l": 1}))

    with connect(ClusterConfig(connect_timeout_s=10), started.address) as c:
        found = wait_for_resources(c, ["hailo8l"], timeout_s=60, say=say)
        assert len(said) == 1 and len(found["hailo8l"]) == 1
        assert worker_resources(c) == {found["hailo8l"][0]: {"hailo8l": 1.0}}


def test_a_killed_worker_stays_dead(dask_cluster: StartCluster) -> None:
    started = dask_cluster([WorkerSpec("compile-0", {"compile": 1}), WorkerSpec("pi-0", {"hailo8l": 1})])
    with connect(ClusterConfig(connect_timeout_s=10), started.address) as c:
        started.kill("pi-0")  # SIGKILL, no nanny: nothing brings it back
        with pytest.raises(ResourceMissing) as err:
            wait_for_resources(c, ["compile", "hailo8l"], timeout_s=3, say=lambda _: None)
        assert err.value.missing == ["hailo8l"]
        assert list(worker_resources(c).values()) == [{"compile": 1.0}]


# -- the fake SDK's benchmark delays --------------------------------------------------------------------------------------
def test_fake_delays_sleep_in_compile_and_device_load(hailo_fakes: FakeHailo, tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    core = sys.modules["_fake_hailo_core"]
    slept: list[float] = []
    monkeypatch.setattr(core, "time", SimpleNamespace(sleep=slept.append))
    runner = hailo_fakes.sdk.ClientRunner(hw_arch="hailo8")
    runner.translate_onnx_model(str(tiny_model.path), "tiny")
    runner.optimize(np.ascontiguousarray(tiny_model.calibration[:8].transpose(0, 2, 3, 1).astype(np.float32)))
    runner.compile()
    assert slept == []  # unset: no sleep
    monkeypatch.setenv("HAILO_FAKE_COMPILE_DELAY_S", "10")
    monkeypatch.setenv("HAILO_FAKE_DEVICE_DELAY_S", "2.5")
    hef_bytes = runner.compile()
    assert slept == [10.0]
    hrt = hailo_fakes.platform
    params = hrt.VDevice.create_params()
    params.scheduling_algorithm = hrt.HailoSchedulingAlgorithm.ROUND_ROBIN
    with hrt.VDevice(params) as vdevice:
        with vdevice.create_infer_model(hef_bytes).configure():
            pass
    assert slept == [10.0, 2.5]



HUSH = """
import logging, sys
import distributed  # configures its loggers: a handler on stderr each
from hailo_sweep.cluster.connect import hush_client_logs

logging.getLogger("distributed.client").error("before: CommClosedError while closing")
hush_client_logs(__import__("pathlib").Path(sys.argv[1]))
logging.getLogger("distributed.client").error("CommClosedError: in <TCP (closed)>")
logging.getLogger("distributed.core").warning("connection lost")
logging.getLogger("tornado.application").error("Exception in callback")
logging.getLogger("asyncio").error("Task exception was never retrieved")
logging.getLogger("distributed.core").debug("below distributed's level: nowhere")
print("our own line")
"""


def test_the_clients_closing_lines_go_to_the_log_file_not_the_console(tmp_path: Path) -> None:
    import subprocess

    log = tmp_path / "logs" / "dask-client.log"
    proc = subprocess.run([sys.executable, "-c", HUSH, str(log)], capture_output=True, text=True, timeout=120, check=True)
    assert "before: CommClosedError" in proc.stderr  # distributed's own handler prints it, as it does during the sweep
    assert "CommClosedError: in" not in proc.stderr and "connection lost" not in proc.stderr and "callback" not in proc.stderr
    assert "never retrieved" not in proc.stderr and proc.stdout == "our own line\n"
    text = log.read_text()
    for line in ("CommClosedError: in <TCP (closed)>", "connection lost", "Exception in callback", "Task exception was never retrieved"):
        assert line in text
    assert "below distributed's level" not in text and "before:" not in text
