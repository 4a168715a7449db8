"""The torch device a command runs on, checked before any work starts."""

import torch

DEVICES = "cpu, cuda, cuda:N or mps"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `mps` as a device this machine has.

    A bare `cuda` is GPU `local_rank`: under torchrun, each process on a machine
    takes its own GPU. Raises ValueError, saying what is missing, rather than
    failing at the first tensor moved.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use {DEVICES}") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device mps: this machine has no Apple GPU that torch can use")
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: use {DEVICES}")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {name}: no CUDA GPU is available here (torch {torch.__version__}, {build})")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name}: GPU {index} does not exist; this machine has {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def add_device_arguments(parser) -> None:
    """--device, --amp and --backend for the commands that run a trained model."""
    parser.add_argument(
        "--device", default="cpu", help=f"{DEVICES} (default cpu); under torchrun, cuda is each process's own GPU"
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="run the encoder in mixed precision: bf16 on a CPU (fast where it has AMX), "
        "fp16 on a GPU; captions may differ slightly from float32's",
    )
    from captioner.predictor import BACKENDS

    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the encoder: onnxruntime (on a CPU, for a checkpoint made by `captioner export`), torch, "
        "or auto (default): onnxruntime where the checkpoint has its graph and --device is cpu without --amp",
    )
