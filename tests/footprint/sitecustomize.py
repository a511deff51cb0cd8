"""Records every import of the compiler, the trackers, Optuna or ONNX Runtime that hailo-sweep's code makes.

Put this folder first on PYTHONPATH of a process (a Dask device worker in tests/test_cluster.py) and set
``HAILO_SWEEP_IMPORT_LOG`` to a file: the first line says the hook is active; each offending import adds a line with
the module and the file that imported it. Imports made by the contract fakes themselves (``tests/fakes``: the fake
HailoRT computes with ONNX Runtime, the real one does not) are not hailo-sweep's and are not recorded.
"""

from __future__ import annotations

import builtins
import os
import sys

_LOG = os.environ.get("HAILO_SWEEP_IMPORT_LOG")
_WATCHED = {"hailo_sdk_client", "mlflow", "optuna", "onnxruntime"}
_FAKES = os.sep + os.path.join("tests", "fakes") + os.sep

if _LOG:
    with open(_LOG, "a", encoding="utf-8") as _fh:
        _fh.write(f"active in pid {os.getpid()}\n")
    _original = builtins.__import__

    def _importer() -> str:
        frame = sys._getframe(2)
        while frame is not None and ("importlib" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"

    def _watching_import(name, globals=None, locals=None, fromlist=(), level=0):  # type: ignore[no-untyped-def]
        top = name.split(".")[0]
        if level == 0 and top in _WATCHED and top not in sys.modules:
            where = _importer()
            if _FAKES not in where:
                with open(_LOG, "a", encoding="utf-8") as fh:
                    fh.write(f"{name} <- {where}\n")
        return _original(name, globals, locals, fromlist, level)

    builtins.__import__ = _watching_import
