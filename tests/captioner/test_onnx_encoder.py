"""The encoder on ONNX Runtime: exported graphs give the torch encoder's features, int8 ones
nearly; the checkpoint stores the graph and refuses a damaged or foreign one; the predictor
picks its backend and says which; sessions are made in the process that runs them."""

import json
import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from captioner.checkpoint import CheckpointError, load_checkpoint, read_onnx_encoder, save_checkpoint
from captioner.decoding import DecodeOptions
from captioner.encoder import build_encoder
from captioner.onnx_encoder import (
    OnnxEncoder,
    OnnxEncoderError,
    OnnxGraph,
    export_encoder,
    quantize_encoder,
)
from captioner.predictor import Predictor
from tests.captioner.conftest import random_images
from tests.conftest import assert_same_captions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_graph() -> OnnxGraph:
    from tests.conftest import talkative_tiny_model

    return export_encoder(talkative_tiny_model().encoder)


def run(graph: OnnxGraph, encoder, pixels: torch.Tensor) -> torch.Tensor:
    return OnnxEncoder(graph, encoder.image_size, encoder.grid, encoder.dim)(pixels)


def quantized_names(graph: OnnxGraph) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load_from_string(graph.model).graph.node}


@pytest.mark.parametrize("batch", [1, 5])
def test_an_exported_graph_gives_the_torch_encoders_features_at_any_batch(tiny_model, tiny_graph, batch):
    pixels = random_images(batch, seed=batch)
    with torch.no_grad():
        expected = tiny_model.encoder(pixels)  # (B, P, D)
    features = run(tiny_graph, tiny_model.encoder, pixels)
    assert features.shape == expected.shape == (batch, 64, 32)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    assert tiny_graph.precision == "fp32"


@pytest.mark.slow
def test_efficientnet_lite0_s16_exports_with_its_stride_two_convolutions_and_folded_batch_norms():
    """The default model's encoder, ImageNet weights and all: timm's 'SAME' stride-2 convolutions
    (captioner's StrideTwoSameConv) and the image-by-image front export as plain layers."""
    encoder = build_encoder("efficientnet_lite0_s16").eval()
    pixels = random_images(3, size=224)
    with torch.no_grad():
        expected = encoder(pixels)
    features = run(export_encoder(encoder), encoder, pixels)
    assert features.shape == (3, 196, 432)
    torch.testing.assert_close(features, expected, atol=2e-3, rtol=1e-3)


def test_int8_is_quantized_and_stays_close_to_fp32(tiny_model, tiny_graph):
    calibration = random_images(32, seed=1).split(8)
    int8 = quantize_encoder(tiny_graph, calibration)
    assert int8.precision == "int8" and int8.info["calibration"] == "minmax"
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantized_names(int8)
    assert "QuantizeLinear" not in quantized_names(tiny_graph)
    pixels = random_images(8, seed=2)
    with torch.no_grad():
        expected = tiny_model.encoder(pixels)
    similarity = F.cosine_similarity(run(int8, tiny_model.encoder, pixels).flatten(1), expected.flatten(1))
    assert similarity.min() > 0.95


def test_convolutions_kept_in_fp32_are_not_quantized(tiny_graph):
    import onnx

    int8 = quantize_encoder(tiny_graph, random_images(8, seed=1).split(8), keep_fp32=("body.0",))
    graph = onnx.load_from_string(int8.model).graph
    # a quantized convolution reads its weight from a DequantizeLinear; a kept one reads it as stored
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    weights = {node.input[1]: made_by.get(node.input[1]) for node in graph.node if node.op_type == "Conv"}
    assert weights["body.0.weight"] is None
    assert len(weights) == 3 and list(weights.values()).count("DequantizeLinear") == 2
    assert int8.info["kept_fp32"] == ["body.0"]
    with pytest.raises(ValueError, match=r"no convolution of the encoder is named body\.9, stem"):
        quantize_encoder(tiny_graph, random_images(8, seed=1).split(8), keep_fp32=("body.0", "body.9", "stem"))


@pytest.mark.parametrize("damage", ["not onnx", "wrong grid"])
def test_a_graph_that_cannot_run_or_gives_other_features_is_refused(tiny_model, tiny_graph, damage):
    encoder = tiny_model.encoder
    if damage == "not onnx":
        onnx_encoder = OnnxEncoder(OnnxGraph(b"\x08\x07garbage", "fp32"), encoder.image_size, encoder.grid, encoder.dim)
        message = "cannot run"
    else:
        onnx_encoder = OnnxEncoder(tiny_graph, encoder.image_size, (7, 7), encoder.dim)
        message = r"shape \(1, 64, 32\); the decoder reads \(1, 49, 32\)"
    with pytest.raises(OnnxEncoderError, match=message):
        onnx_encoder.check()


def test_the_checkpoint_stores_the_graph_and_says_what_it_is(tiny_model, tiny_graph, tmp_path):
    path = tmp_path / "onnx.safetensors"
    save_checkpoint(tiny_model, path, {"scores": {}}, onnx_encoder=tiny_graph)
    model, _ = load_checkpoint(path)  # the torch weights load as before, the graph aside
    graph = read_onnx_encoder(path, model)
    assert graph is not None and graph.model == tiny_graph.model and graph.precision == "fp32"
    assert graph.info == {"opset": 18}
    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()["onnx_encoder"])
    assert described["sha256"] == tiny_graph.sha256 and described["precision"] == "fp32"
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(tiny_model, plain)
    assert read_onnx_encoder(plain, load_checkpoint(plain)[0]) is None


def test_a_damaged_graph_or_one_exported_from_other_weights_is_refused(tiny_model, tiny_graph, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "onnx.safetensors"
    save_checkpoint(tiny_model, path, onnx_encoder=tiny_graph)
    data = bytearray(path.read_bytes())
    data[bytes(data).find(tiny_graph.model[-64:]) + 10] ^= 0xFF  # one byte of the graph flipped
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        read_onnx_encoder(damaged, load_checkpoint(damaged)[0])
    # the encoder's weights changed after the export (a fine-tuning written over them): the graph
    # would compute the old features beside a decoder trained on the new ones
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("encoder.") and k.endswith("weight"))
    tensors[name] = tensors[name] + 0.01
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, str(changed), metadata=metadata)
    with pytest.raises(CheckpointError, match="exported from other encoder weights"):
        read_onnx_encoder(changed, load_checkpoint(changed)[0])


@pytest.fixture
def onnx_checkpoint(tiny_model, tiny_graph, tmp_path):
    path = tmp_path / "onnx.safetensors"
    save_checkpoint(tiny_model, path, {"scores": {}}, onnx_encoder=tiny_graph)
    return path


def test_the_predictor_picks_its_backend_and_says_which(onnx_checkpoint, tiny_checkpoint, image_files):
    auto = Predictor.from_checkpoint(onnx_checkpoint)
    torch_backend = Predictor.from_checkpoint(onnx_checkpoint, backend="torch")
    plain = Predictor.from_checkpoint(tiny_checkpoint)
    assert auto.runtime == auto.info()["runtime"] == {"backend": "onnxruntime", "precision": "fp32", "device": "cpu"}
    assert torch_backend.runtime == {"backend": "torch", "precision": "fp32", "device": "cpu"}
    assert plain.runtime["backend"] == "torch"
    assert Predictor.from_checkpoint(onnx_checkpoint, amp=True).runtime == {
        "backend": "torch",
        "precision": "bf16",
        "device": "cpu",
    }
    files = [image_files[name] for name in ("jpeg_RGB", "png_RGBA", "bmp")]
    options = DecodeOptions(method="beam", beam_size=3, attention=True)
    assert_same_captions(auto.caption(files, options), torch_backend.caption(files, options))


def test_asking_for_onnxruntime_without_a_graph_or_off_the_cpu_is_an_error(onnx_checkpoint, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="has no ONNX encoder; make one with `captioner export"):
        Predictor.from_checkpoint(tiny_checkpoint, backend="onnxruntime")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Predictor.from_checkpoint(onnx_checkpoint, backend="onnxruntime", amp=True)
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor.from_checkpoint(onnx_checkpoint, backend="tensorrt")  # type: ignore[arg-type]


def _features_in_child(onnx_encoder: OnnxEncoder, pixels: torch.Tensor, out) -> None:
    features = onnx_encoder(pixels).numpy()
    out.send((len(onnx_encoder._sessions), features))


def test_a_forked_process_makes_its_own_session_with_the_threads_torch_has(tiny_model, tiny_graph):
    encoder = tiny_model.encoder
    onnx_encoder = OnnxEncoder(tiny_graph, encoder.image_size, encoder.grid, encoder.dim)
    pixels = random_images(2)
    in_parent = onnx_encoder(pixels).numpy()
    assert list(onnx_encoder._sessions) == [1]  # one torch thread here (one_torch_thread)
    torch.set_num_threads(2)
    onnx_encoder(pixels)
    assert sorted(onnx_encoder._sessions) == [1, 2]
    torch.set_num_threads(1)
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_features_in_child, args=(onnx_encoder, pixels, send))
    child.start()
    sessions_in_child, in_child = receive.recv()
    child.join(30)
    assert child.exitcode == 0
    assert sessions_in_child == 1  # the parent's two were not used there
    np.testing.assert_array_equal(in_child, in_parent)
