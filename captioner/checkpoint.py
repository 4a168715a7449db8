"""Checkpoints: one safetensors file holding the weights, with the config, the
vocabulary and the model card as JSON in its header, and, once `captioner export` has
made one, the encoder as an ONNX graph (a uint8 tensor, described in the header).

Loading never unpickles anything, and the model is rebuilt from the file alone.
"""

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .model import CaptionModel, build_model
from .onnx_encoder import OnnxGraph, encoder_fingerprint
from .vocab import Vocabulary

FORMAT = "captioner"
FORMAT_VERSION = 1
ONNX_KEY = "onnx_encoder"  # the tensor of the graph's bytes, and the header entry saying what it is


class CheckpointError(ValueError):
    pass


def save_checkpoint(
    model: CaptionModel, path: str | Path, card: dict | None = None, onnx_encoder: OnnxGraph | None = None
) -> None:
    """A plain write to `path`, owner-only as safetensors creates it. A caller that wants atomic
    replacement (readers see the old file or the new one, never half of one) or a file other
    users can read writes to a temporary path and renames it, as training does.

    `onnx_encoder` must have been exported from this model's encoder weights, which the header
    records so that loading can tell."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "vocab": json.dumps(model.vocab.to_json()),
        "card": json.dumps(card or {}),
    }
    if onnx_encoder is not None:
        tensors[ONNX_KEY] = torch.frombuffer(bytearray(onnx_encoder.model), dtype=torch.uint8)
        metadata[ONNX_KEY] = json.dumps(
            {
                "precision": onnx_encoder.precision,
                "sha256": onnx_encoder.sha256,
                "encoder_sha256": encoder_fingerprint(model.encoder),
                **onnx_encoder.info,
            }
        )
    save_file(tensors, path, metadata=metadata)


def read_header(path: str | Path) -> tuple[ModelConfig, Vocabulary, dict]:
    """The config, vocabulary and card of a checkpoint, without reading its weights."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a safetensors checkpoint: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a captioner checkpoint")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}; "
            f"this version of captioner reads version {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        vocab = Vocabulary.from_json(json.loads(meta["vocab"]))
        card = json.loads(meta.get("card", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has a broken header: {e}") from e
    return config, vocab, card


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CaptionModel, dict]:
    """The model (in eval mode, on `device`) and its card."""
    from safetensors.torch import load_file

    config, vocab, card = read_header(path)
    model = build_model(config, vocab, pretrained=False)
    tensors = load_file(str(path))
    tensors.pop(ONNX_KEY, None)  # read_onnx_encoder's
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        details = [
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(f"{path} does not match its config: " + "; ".join(details))
    model.load_state_dict(tensors)
    return model.to(device).eval(), card


def read_onnx_encoder(path: str | Path, model: CaptionModel) -> OnnxGraph | None:
    """The checkpoint's ONNX encoder, if it has one; CheckpointError if its bytes are not the ones
    exported, or it was exported from other encoder weights than `model`'s (loaded from `path`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        described = (f.metadata() or {}).get(ONNX_KEY)
        if described is None:
            return None
        if ONNX_KEY not in set(f.keys()):  # a safe_open handle has no `in`
            raise CheckpointError(f"{path} describes an ONNX encoder but holds none")
        data = f.get_tensor(ONNX_KEY).numpy().tobytes()
    try:
        info = json.loads(described)
        precision, sha256, encoder_sha256 = info.pop("precision"), info.pop("sha256"), info.pop("encoder_sha256")
        graph = OnnxGraph(data, precision, info)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has a broken ONNX encoder entry: {e}") from e
    if graph.sha256 != sha256:
        raise CheckpointError(f"{path}: its ONNX encoder is damaged (the bytes are not the ones exported)")
    if encoder_fingerprint(model.encoder) != encoder_sha256:
        raise CheckpointError(
            f"{path}: its ONNX encoder was exported from other encoder weights than the checkpoint's; "
            "export it again (captioner export)"
        )
    return graph
