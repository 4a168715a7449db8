"""The encoder on ONNX Runtime: the same region features from an exported graph, faster on a CPU.

`export_encoder` writes a torch encoder (BatchNorms folded) as an ONNX graph with a dynamic
batch; `quantize_encoder` makes a static int8 graph of it, calibrated on pixels the caller
prepares. `OnnxEncoder` runs a graph and is called as the torch encoder is, (B, 3, S, S) pixels
in, (B, P, D) float32 features out, so the predictor has one seam for both.

Sessions are made where they run: ONNX Runtime's thread pools do not survive fork(), so each
process makes its own on its first call, with as many intra-op threads as torch has at that
call (the applications set torch's threads per worker and per call, and the graph follows).
"""

import copy
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, StrideTwoSameConv, fold_batch_norms

if TYPE_CHECKING:
    import onnxruntime

OPSET = 18
INPUT, OUTPUT = "images", "features"
Precision = Literal["fp32", "int8"]
CalibrationMethod = Literal["minmax", "percentile", "entropy"]


class OnnxEncoderError(ValueError):
    """An ONNX encoder that cannot run, or does not compute its checkpoint's features."""


@dataclass(frozen=True)
class OnnxGraph:
    """An exported encoder: the serialized ONNX model and what it is (stored in the checkpoint)."""

    model: bytes = field(repr=False)
    precision: Precision
    info: dict = field(default_factory=dict)  # how it was made: opset, calibration

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A hash of the encoder's weights as the checkpoint stores them: a graph exported from other
    weights (another model, a later fine-tuning) is refused rather than run beside this decoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain_convs(encoder: nn.Module) -> nn.Module:
    """Each StrideTwoSameConv as the plain Conv2d it computes (its wider kernel stored): ONNX
    Runtime would not load the graph of the padded-weight form."""
    for name, module in list(encoder.named_modules()):
        if isinstance(module, StrideTwoSameConv):
            k = module.kernel_size[0]
            has_bias = module.bias is not None
            conv = nn.Conv2d(
                module.in_channels, module.out_channels, k + 1, 2, k // 2, groups=module.groups, bias=has_bias
            )
            conv.weight = nn.Parameter(F.pad(module.weight.detach(), (1, 0, 1, 0)))  # (O, I / g, k + 1, k + 1)
            if module.bias is not None:
                conv.bias = nn.Parameter(module.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, conv)
    return encoder


@torch.no_grad()
def export_encoder(encoder: Encoder) -> OnnxGraph:
    """The encoder as an fp32 ONNX graph: input `images` (B, 3, S, S), output `features` (B, P, D)."""
    module = _plain_convs(copy.deepcopy(encoder).cpu().float().eval())
    fold_batch_norms(module)
    example = torch.zeros(2, 3, encoder.image_size, encoder.image_size)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    return OnnxGraph(program.model_proto.SerializeToString(), "fp32", {"opset": OPSET})


def quantize_encoder(
    graph: OnnxGraph,
    calibration: Iterable[torch.Tensor],
    method: CalibrationMethod = "minmax",
    keep_fp32: Sequence[str] = (),
) -> OnnxGraph:
    """A static int8 graph: QDQ, per-channel int8 weights, uint8 activations in a reduced range
    (on CPUs without VNNI, int8 x int8 products would saturate the 16-bit sums ONNX Runtime uses),
    ranges from the batches of `calibration` (normalised pixels, (B, 3, S, S)). Convolutions whose
    weights are named (as in the torch encoder) with one of the prefixes `keep_fp32` stay in fp32:
    ("stem", "blocks.6") keeps EfficientNet's first and last stages."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter(calibration)

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {INPUT: batch.contiguous().numpy()}

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="captioner-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(graph.model)
        quant_pre_process(str(fp32), str(prepared))
        convs = [node for node in _nodes(prepared) if node.op_type == "Conv"]
        unknown = [p for p in keep_fp32 if not any(_named(node.input[1], (p,)) for node in convs)]
        if unknown:
            raise ValueError(f"no convolution of the encoder is named {', '.join(unknown)} (keep_fp32)")
        kept = [node.name for node in convs if _named(node.input[1], keep_fp32)]
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=kept,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        model = int8.read_bytes()
    return OnnxGraph(model, "int8", {**graph.info, "calibration": method, "kept_fp32": list(keep_fp32)})


def _named(weight: str, prefixes: Sequence[str]) -> bool:
    return any(weight == p or weight.startswith(p + ".") for p in prefixes)


def _nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def make_session(model: bytes, threads: int) -> "onnxruntime.InferenceSession":
    """A CPU session with `threads` intra-op threads that sleep, not spin, between calls: the
    decoder (torch) runs on the same cores as soon as the encoder is done."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings name graph internals, not the user's problem
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


_INHERITED: list[dict] = []  # sessions a forked process inherited, kept (never used) for its lifetime


class OnnxEncoder:
    """An ONNX graph called like the torch encoder: pixels (B, 3, S, S) in, features (B, P, D) out."""

    def __init__(self, graph: OnnxGraph, image_size: int, grid: tuple[int, int], dim: int):
        self.graph, self.image_size, self.grid, self.dim = graph, image_size, grid, dim
        self._sessions: dict[int, onnxruntime.InferenceSession] = {}  # by thread count, this process's
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Run the graph once on one blank image in a one-thread session (no thread pool left
        behind in a process that will fork): OnnxEncoderError if it cannot load, cannot run, or
        gives features of another shape than the decoder reads."""
        blank = np.zeros((1, 3, self.image_size, self.image_size), np.float32)
        try:
            (features,) = make_session(self.graph.model, 1).run([OUTPUT], {INPUT: blank})
        except Exception as e:  # onnxruntime raises its own types for a bad protobuf, graph or input
            raise OnnxEncoderError(f"the ONNX encoder cannot run: {type(e).__name__}: {e}") from e
        expected = (1, self.grid[0] * self.grid[1], self.dim)
        if tuple(features.shape) != expected:
            raise OnnxEncoderError(
                f"the ONNX encoder gives features of shape {tuple(features.shape)}; the decoder reads {expected}"
            )

    def session(self) -> "onnxruntime.InferenceSession":
        threads = torch.get_num_threads()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sessions have no threads here
                _INHERITED.append(self._sessions)  # and must not be destroyed: that joins threads that are not here
                self._sessions, self._pid = {}, os.getpid()
            if threads not in self._sessions:
                self._sessions[threads] = make_session(self.graph.model, threads)
            return self._sessions[threads]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.session().run([OUTPUT], {INPUT: pixels.cpu().float().contiguous().numpy()})
        return torch.from_numpy(features)  # (B, P, D)
