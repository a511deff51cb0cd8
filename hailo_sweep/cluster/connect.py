"""Reaching the Dask scheduler: the TLS settings of the ``cluster:`` config section and a bounded connection.

``distributed`` is imported inside the functions, so a machine without the ``[cluster]`` extra gets one clear line
(bad input: the fix is an install) instead of an ImportError. An address that cannot be reached within
``connect_timeout_s`` raises ``ClusterUnreachable`` (exit 3), naming the address with any password hidden. When the
sweep ends, ``close`` sends the client's own log lines (distributed, tornado, asyncio) to a log file instead of the
console before it disconnects: a closing connection makes them log ``CommClosedError`` tracebacks that mean nothing.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from hailo_sweep.cluster.config import ClusterConfig
from hailo_sweep.errors import ClusterUnreachable, UserInputError
from hailo_sweep.stores import redact_url

if TYPE_CHECKING:
    from distributed import Client
    from distributed.security import Security

INSTALL_FIX = "install the cluster extra: pip install 'hailo-sweep[cluster]'"
_ADDRESS = re.compile(r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?(?:(?P<userinfo>[^@/]*)@)?(?P<rest>.*)$")


def _distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise UserInputError(
            f"--cluster needs Dask distributed, which is not installed here ({exc})", key="cluster", fix=INSTALL_FIX
        ) from None


def security(cfg: ClusterConfig) -> Security | None:
    """Dask's ``Security`` for the config's TLS files (the client's certificate and key, the CA that signed the
    scheduler's); None without TLS. A TLS file that is not there is bad input naming its key."""
    if not cfg.uses_tls:
        return None
    cfg.check_files()
    _distributed()
    from distributed.security import Security

    return Security(
        tls_ca_file=str(cfg.tls_ca_file),
        tls_client_cert=str(cfg.tls_cert),
        tls_client_key=str(cfg.tls_key),
        require_encryption=True if cfg.require_encryption else None,  # None: Dask's default (encrypt when TLS is set)
    )


def dask_address(address: str, *, tls: bool) -> str:
    """The address Dask is given: ``tls://`` when TLS is configured (for ``tcp://`` or a bare ``host:port``), and no
    ``user:password@`` part (Dask's comms carry no credentials; its authentication is TLS client certificates)."""
    match = _ADDRESS.match(address.strip())
    assert match is not None  # the pattern matches any text
    scheme, rest = match["scheme"], match["rest"]
    if tls and scheme in (None, "tcp"):
        scheme = "tls"
    return f"{scheme}://{rest}" if scheme else rest


def connect(cfg: ClusterConfig, address: str | None) -> Client:
    """A ``distributed.Client`` on ``address`` (the ``--cluster`` value), else on ``cfg.address``, within
    ``cfg.connect_timeout_s``. No address, a malformed one, or ``tls://`` without the TLS files: bad input."""
    given = address or cfg.address
    if not given:
        raise UserInputError(
            "no Dask scheduler address", key="cluster.address",
            fix="pass --cluster tcp://SCHED:8786 or set cluster.address in the config",
        )
    shown = redact_url(given)
    target = dask_address(given, tls=cfg.uses_tls)
    if target.startswith(("tls://", "wss://")) and not cfg.uses_tls:
        raise UserInputError(
            f"{shown} is a TLS address but the config names no TLS files", key="cluster.tls_ca_file",
            fix="set cluster.tls_ca_file, cluster.tls_cert and cluster.tls_key (the files given to the scheduler's "
            "--tls-ca-file/--tls-cert/--tls-key), or use a tcp:// address on a private network",
        )
    if cfg.require_encryption and not target.startswith(("tls://", "wss://")):
        raise UserInputError(
            f"cluster.require_encryption is set but {shown} is not an encrypted address", key="cluster.address",
            fix="use a tls:// address (with the TLS files) or turn require_encryption off",
        )
    sec = security(cfg)
    _distributed()
    from distributed import Client

    try:
        return Client(target, security=sec, timeout=cfg.connect_timeout_s)
    except ValueError as exc:  # Dask's address parser: unknown scheme, a bad host:port
        raise UserInputError(
            f"{shown} is not a Dask scheduler address ({redact_url(str(exc))})", key="cluster.address",
            fix="give the address `dask scheduler` prints, e.g. tcp://SCHED:8786",
        ) from None
    except OSError as exc:  # refused, no route, a TLS handshake that fails, or no answer in time
        raise ClusterUnreachable(shown, _reason(exc, given, shown), cfg.connect_timeout_s) from None


def _reason(exc: BaseException, given: str, shown: str) -> str:
    """Dask's own words, with the address as given (and any password) never repeated in clear."""
    text = str(exc).replace(given, shown) or type(exc).__name__
    return redact_url(text)


#: the loggers of the client side of Dask: its own, its event loop's (tornado) and asyncio's
CLIENT_LOGGERS = ("distributed", "tornado", "asyncio")


def close(client: Client, log_file: Path | None) -> None:
    """Disconnect, the client's log lines going to ``log_file`` (appended; None: dropped) from now on, not the console."""
    hush_client_logs(log_file)
    client.close()


def hush_client_logs(log_file: Path | None) -> None:
    """Every console handler of the client-side loggers (``CLIENT_LOGGERS`` and their children that have handlers of
    their own, as distributed configures them) is replaced by one handler on ``log_file``; levels stay as they are."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        target: logging.Handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)  # made at the first line
        target.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        target = logging.NullHandler()
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in CLIENT_LOGGERS]
    for name in dict.fromkeys([*CLIENT_LOGGERS, *names]):
        logger = logging.getLogger(name)
        console = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # stderr/stdout, not a file
        for handler in console:
            logger.removeHandler(handler)
        if console or (name in CLIENT_LOGGERS and logger.propagate):
            logger.addHandler(target)
        if name in CLIENT_LOGGERS:
            logger.propagate = False  # not up to the root logger, whose last resort prints to stderr
