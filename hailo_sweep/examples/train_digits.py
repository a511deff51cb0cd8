"""Train the shipped example model: a small two-output CNN on the digits frames, exported to ONNX.

Why: hailo-sweep needs a real, trained model shaped like the user story's (one 1-channel image input, a feature-map
output and a classification output) to test against and to demo with. The result is committed as
``configs/models/digits_cnn.onnx``; this script is how it was made and how to remake it.

Usage::

    pip install 'hailo-sweep[train]'
    python -m hailo_sweep.examples.train_digits            # writes configs/models/digits_cnn.onnx
    python -m hailo_sweep.examples.train_digits --out my.onnx

The model takes ``input`` float32 (N, 1, 96, 128), already normalized as ``(x - MEAN) / STD`` with the constants of
:mod:`hailo_sweep.examples.digits`, and returns ``featmap`` (N, 8, 12, 16) and ``logits`` (N, 10). torch is an
optional extra: it is imported only here, never by the rest of the package.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hailo_sweep.examples import digits

try:
    import torch
    from torch import nn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only where torch is missing
    raise ModuleNotFoundError(
        "training the example model needs torch: pip install 'hailo-sweep[train]'", name=exc.name
    ) from exc

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "configs" / "models" / "digits_cnn.onnx"
OPSET = 17
ALLOWED_OPS = frozenset({"Conv", "Relu", "MaxPool", "GlobalAveragePool", "ReduceMean", "Gemm", "Flatten", "Reshape"})


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults reproduce the shipped model."""

    epochs: int = 12
    batch_size: int = 64
    max_lr: float = 0.01
    weight_decay: float = 1e-4
    seed: int = 0


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Conv3x3 + BN + ReLU; the conv has no bias because BN's shift replaces it (and BN folds away on export)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """96x128 -> stride 2 (48x64) -> pool (24x32) -> pool (12x16); a 1x1-conv map head and a pooled class head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _conv_block(1, 16, stride=2),
            nn.MaxPool2d(2),
            _conv_block(16, 32),
            nn.MaxPool2d(2),
            _conv_block(32, 64),
            _conv_block(64, 64),
        )
        self.featmap_head = nn.Conv2d(64, 8, kernel_size=1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        featmap = self.featmap_head(features)
        logits = self.classifier(features.mean(dim=(2, 3)))
        return featmap, logits


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1) frames -> float32 NCHW model input."""
    frames = frames_uint8.reshape(frames_uint8.shape[0], 1, digits.HEIGHT, digits.WIDTH).astype(np.float32)
    return (frames - np.float32(digits.MEAN)) / np.float32(digits.STD)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
    """Adam + OneCycle over a seeded shuffle of the train split; prints loss per epoch."""
    steps_per_epoch = -(-len(x) // config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    order_rng = np.random.default_rng(config.seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(config.epochs):
        order = torch.from_numpy(order_rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            _, logits = model(x[batch])
            loss = loss_fn(logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1:2d}/{config.epochs}  loss {total / len(x):.4f}", flush=True)


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    _, logits = model(x)
    return float((logits.argmax(dim=1) == y).float().mean())


def export(model: DigitsCNN, out: Path) -> None:
    """Legacy (TorchScript) exporter at opset 17: BN folded, one self-contained file, no external data."""
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(1, 1, digits.HEIGHT, digits.WIDTH)
    torch.onnx.export(
        model,
        (sample,),
        str(out),
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["input"],
        output_names=["featmap", "logits"],
        dynamic_axes={"input": {0: "batch"}, "featmap": {0: "batch"}, "logits": {0: "batch"}},
    )


def check_graph(path: Path) -> list[str]:
    """Problems with the exported file: ops outside the plain set, wrong opset, external data. Empty when fine."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    problems: list[str] = []
    ops = {node.op_type for node in model.graph.node}
    if ops - ALLOWED_OPS:
        problems.append(f"unexpected ops {sorted(ops - ALLOWED_OPS)}")
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        problems.append(f"opset {opsets}, expected {OPSET}")
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        problems.append(f"external data for {external}")
    return problems


def verify_onnx(path: Path, model: DigitsCNN, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    """Check ONNX Runtime matches torch within 1e-4 on the evaluation set; return the ONNX accuracy."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    featmap, logits = session.run(["featmap", "logits"], {"input": x_eval})
    model.eval()
    with torch.no_grad():
        ref_featmap, ref_logits = (t.numpy() for t in model(torch.from_numpy(x_eval)))
    diff = max(float(np.abs(featmap - ref_featmap).max()), float(np.abs(logits - ref_logits).max()))
    print(f"onnxruntime vs torch: max |diff| {diff:.2e}")
    if diff > 1e-4:
        raise RuntimeError(f"ONNX output differs from torch by {diff:.2e} (> 1e-4)")
    return float((logits.argmax(axis=1) == y_eval).mean())


def _evaluation_set() -> tuple[np.ndarray, np.ndarray]:
    """The exact evaluation file users get from digits.build(), normalized to model input."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = digits.build(Path(tmp))
        with np.load(paths["evaluation"], allow_pickle=False) as data:
            return normalize(data["x"]), data["y"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"ONNX path (default {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args(argv)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)

    _seed_everything(config.seed)
    parts = digits.split()
    x_train = torch.from_numpy(normalize(parts["train"][0]))
    y_train = torch.from_numpy(parts["train"][1])
    x_test = torch.from_numpy(normalize(parts["test"][0]))
    y_test = torch.from_numpy(parts["test"][1])

    model = DigitsCNN()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    started = time.perf_counter()
    train(model, x_train, y_train, config)
    print(f"training time: {time.perf_counter() - started:.1f} s")
    print(f"test accuracy (torch, {len(y_test)} frames): {accuracy(model, x_test, y_test):.4f}")

    export(model, args.out)
    problems = check_graph(args.out)
    if problems:
        raise RuntimeError(f"{args.out}: {'; '.join(problems)}")
    x_eval, y_eval = _evaluation_set()
    onnx_accuracy = verify_onnx(args.out, model, x_eval, y_eval)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    print(f"evaluation accuracy (onnxruntime, {len(y_eval)} frames): {onnx_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
