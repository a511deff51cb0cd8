"""A MobileNetV2-like classifier with fixed random weights, and real photos to feed it, built offline.

Why: the quantization benchmarks and tests need a model shaped like the real classifiers users bring (3x3 stem with
stride 2, inverted residual blocks of 1x1 expand -> 3x3 depthwise -> 1x1 project with ReLU6 = ``Clip(0, 6)``,
residual ``Add``, global average pool, ``Gemm``), at any size, without downloading weights. The weights are random
but fixed (one seed) and initialized from the data (each conv's output channels are normalized on a few images,
then given a random per-channel scale and shift), so activations have realistic, per-channel-varying ranges: the
property that makes per-tensor weights, clipping and 16 bit matter. BN is folded (conv + bias), as in exports.

Images: scikit-learn's two bundled photos (and scikit-image's color samples when it is installed), cut into
deterministic random crops, flips and scales: ``photos(n, size, seed)`` returns uint8 NCHW frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# per-channel scale spread, gains of activated / projection convs, shift of activated convs (chosen so that int8
# per-channel MinMax gives about 12 dB logit SQNR, like the real classifier of issue 10)
GAMMA_SIGMA, ACT_GAIN, PROJ_GAIN, ACT_SHIFT = 0.2, 1.0, 0.25, 1.5
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# (expansion t, output channels c, repeats n, first stride s), MobileNetV2's table at width 1.0
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


@dataclass(frozen=True)
class CnnSpec:
    size: int = 224
    width: float = 0.5
    last_channels: int = 1024  # 1.66 M parameters at the defaults
    classes: int = 1000
    seed: int = 0


def _channels(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


def photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 (N, 3, size, size) crops of bundled photos: random box (30-100 % of the short side), flip, resize."""
    from sklearn.datasets import load_sample_images

    sources = [np.asarray(img, np.uint8) for img in load_sample_images().images]
    try:  # optional: more variety when scikit-image is installed
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            sources.append(np.asarray(getattr(skdata, name)(), np.uint8)[..., :3])
    except Exception:  # noqa: BLE001 - scikit-image absent or a sample missing: the bundled photos suffice
        pass
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        img = sources[int(rng.integers(len(sources)))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[top : top + side, left : left + side]
        idx = (np.arange(size) * side / size).astype(int)  # nearest-neighbour resize: exact on every machine
        crop = crop[idx][:, idx]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop.transpose(2, 0, 1)
    return out


def normalize(frames: np.ndarray) -> np.ndarray:
    mean = np.asarray(MEAN, np.float32)[None, :, None, None]
    std = np.asarray(STD, np.float32)[None, :, None, None]
    return ((frames.astype(np.float32) - mean) / std).astype(np.float32)


class _Builder:
    def __init__(self, spec: CnnSpec, probe: np.ndarray):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.probe = probe  # normalized NCHW images used to initialize each layer from data
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _model(self, output: str, shape: list[int | str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "mobilenet_like",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, self.spec.size, self.spec.size])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model

    def _run(self, tensor: str) -> np.ndarray:
        model = self._model(tensor, ["N", "C", "H", "W"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run([tensor], {"input": self.probe})[0]

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, group: int = 1, act: bool = True) -> str:
        name = self._name("conv")
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(fan_in) * np.exp(self.rng.normal(0.0, 0.6, (cout, 1, 1, 1)))).astype(np.float32)
        b = np.zeros(cout, np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        out = f"{name}.out"
        self.nodes.append(
            helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, kernel_shape=[k, k],
                             strides=[stride, stride], pads=[k // 2] * 4, group=group)
        )
        # fold a data-derived "BN": normalize every channel on the probe images, then a random scale and shift
        y = self._run(out).astype(np.float64)
        mean, std = y.mean(axis=(0, 2, 3)), y.std(axis=(0, 2, 3)) + 1e-6
        gamma = np.exp(self.rng.normal(0.0, GAMMA_SIGMA, cout)) * (ACT_GAIN if act else PROJ_GAIN)
        beta = self.rng.normal(ACT_SHIFT if act else 0.0, 0.5, cout)
        w_new = w * (gamma / std)[:, None, None, None]
        b_new = beta - mean * gamma / std
        self.inits[-2] = numpy_helper.from_array(w_new.astype(np.float32), f"{name}.weight")
        self.inits[-1] = numpy_helper.from_array(b_new.astype(np.float32), f"{name}.bias")
        if not act:
            return out
        relu = f"{name}.relu6"
        self.nodes.append(helper.make_node("Clip", [out, "zero", "six"], [relu], name=f"{name}_relu6"))
        return relu

    def build(self) -> onnx.ModelProto:
        s = self.spec
        self.inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(6.0, np.float32), "six")]
        cin = _channels(32 * s.width)
        x = self.conv("input", 3, cin, 3, 2)
        for t, c, n, first_stride in _BLOCKS:
            cout = _channels(c * s.width)
            for i in range(n):
                stride = first_stride if i == 0 else 1
                hidden = cin * t
                y = self.conv(x, cin, hidden, 1, 1) if t != 1 else x
                y = self.conv(y, hidden, hidden, 3, stride, group=hidden)
                y = self.conv(y, hidden, cout, 1, 1, act=False)
                if stride == 1 and cin == cout:
                    add = self._name("add")
                    self.nodes.append(helper.make_node("Add", [x, y], [f"{add}.out"], name=add))
                    y = f"{add}.out"
                x, cin = y, cout
        x = self.conv(x, cin, s.last_channels, 1, 1)
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
        w = self.rng.standard_normal((s.classes, s.last_channels)).astype(np.float32)
        feats = self._run(x).mean(axis=(2, 3))
        logits = feats @ w.T
        scale = 3.0 / (logits.std() + 1e-6)
        bias = (-logits.mean(axis=0) * scale).astype(np.float32)
        self.inits += [numpy_helper.from_array((w * scale).astype(np.float32), "fc.weight"), numpy_helper.from_array(bias, "fc.bias")]
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
        model = self._model("logits", ["N", s.classes])
        onnx.checker.check_model(model)
        return model


def build_model(spec: CnnSpec = CnnSpec()) -> onnx.ModelProto:
    """The model for ``spec`` (deterministic for a given spec and library versions)."""
    probe = normalize(photos(8, spec.size, seed=spec.seed + 1000))
    return _Builder(spec, probe).build()


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(init.dims) for init in model.graph.initializer))
