"""The ``hailo`` backend: Hailo's Dataflow Compiler (``hailo_sdk_client``) and HailoRT (``hailo_platform``).

Neither package is on PyPI and neither is imported when this package is imported: ``_imports`` loads them on first
use and turns a missing wheel into ``BackendUnavailable`` with the install hint.

Modules, one job each:

- ``_imports``  lazy optional imports (Optuna's ``try_import`` style)
- ``naming``    ONNX output names <-> HN output layers <-> HEF output vstreams
- ``layout``    NCHW <-> NHWC and back to the ONNX output layout
- ``script``    model script (``.alls``) text from a trial's settings; pure, no SDK import
- ``compiler``  ClientRunner stages: translate (cached HAR), optimize (log captured), emulate, compile
- ``runtime``   HailoRT device runner: device lock, target check, InferModel / InferVStreams, dequantization
- ``backend``   ``HailoBackend``, wiring the above to ``hailo_sweep.backends.base.Backend``

Written against (read for facts, see ``/work/shared/docs/hailo-api.md`` for every call shape and its source):

- Hailo-8 / Hailo-8L: Dataflow Compiler 3.x (call sites in ``hailo-ai/hailo_model_zoo`` branch
  ``update-to-version-v2.18.0``, i.e. DFC 3.33.0) and HailoRT 4.23.0 (``hailo-ai/hailort`` branch ``hailo8``,
  commit 08f088d, ``pyhailort.py``). The InferModel path follows ``HRT_0_Async_Inference_Tutorial.ipynb``; the
  InferVStreams fallback follows ``HRT_2_Infer_Pipeline_Inference_Tutorial.ipynb`` and MZ ``hw_infer_utils.py``.
- Hailo-10H: DFC 5.x / HailoRT 5.2.0 (``hailo-ai/hailort`` branch ``master``, commit 41a720b). Only the calls whose
  names and signatures agree between 4.23 and 5.2 are used (VDevice.create_params, create_infer_model, InferModel
  streams and quant_infos, ConfiguredInferModel.run/run_async, Device.scan, Control.identify). InferVStreams is the
  fallback only; a forum report says it is not implemented on Hailo-10H.
"""

from __future__ import annotations

__all__ = ["HailoBackend"]


def __getattr__(name: str) -> object:
    # Lazy so that ``import hailo_sweep.backends.hailo`` stays cheap; the backend module itself never imports the SDK.
    if name == "HailoBackend":
        from hailo_sweep.backends.hailo.backend import HailoBackend

        return HailoBackend
    raise AttributeError(name)
