"""Images in, captions out: the four phases of serving a model.

load (`from_checkpoint`), preprocess (`prepare`: decode and resize one image,
safe to run in worker threads or processes), infer (`caption_batch`: one
batch through the encoder, then batched decoding), and postprocess into the
public result format that the folder CLI and the HTTP API share.

The encoder runs on one of two backends: torch, or ONNX Runtime on a CPU when the checkpoint
holds an exported graph (captioner.onnx_encoder). The decoder and decoding are always torch's.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .checkpoint import CheckpointError, load_checkpoint, read_onnx_encoder
from .decoding import DecodeOptions, Hypothesis
from .encoder import fold_batch_norms
from .images import ImageLimits, ImageSource, open_image, stack_pixels
from .model import CaptionModel
from .onnx_encoder import OnnxEncoder

ONNX_ENCODER_BATCH = 4  # images per call of an ONNX Runtime encoder on a CPU (see encoder_batch_size)
Backend = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "onnxruntime")

DEFAULT_LIMITS = ImageLimits()  # frozen: one instance serves every default
DEFAULT_OPTIONS = DecodeOptions()  # frozen too


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # (3, S, S), normalised, channels-last in memory
    width: int  # of the user's picture, after EXIF orientation
    height: int


class Predictor:
    """A captioning model ready to serve: images in, result dicts out.

    Made with `Predictor.from_checkpoint(path)`; `caption(sources, options)` is all most callers
    need. The result of one image, as `caption` and `caption_batch` return it and as the HTTP API
    (beside the image's "file" name) and `captioner caption` write it:

        {"width": 640, "height": 480,           # the picture's size, after EXIF orientation
         "method": "beam",                      # the DecodeOptions method that made the captions
         "attention_grid": [14, 14],            # h, w: the shape of each word's attention grid
         "captions": [                          # best first; DecodeOptions.num_captions of them
             {"text": "a red circle above a blue square",
              "tokens": ["a", "red", ...],      # the words of "text"
              "log_prob": -3.2169,              # the caption's summed log-probability
              "attention": [grid, ...]}]}       # with DecodeOptions(attention=True) only: one
                                                # h x w grid (lists of floats, sums to 1) a token
    """

    def __init__(
        self,
        model: CaptionModel,
        card: dict | None = None,
        device: str | torch.device = "cpu",
        limits: ImageLimits = DEFAULT_LIMITS,
        max_batch_size: int = 32,
        encoder_batch_size: int | None = None,
        amp: bool = False,
        onnx_encoder: OnnxEncoder | None = None,
    ):
        """`onnx_encoder`: run the encoder on ONNX Runtime (CPU only) instead of `model.encoder`."""
        if onnx_encoder is not None and (torch.device(device).type != "cpu" or amp):
            raise ValueError("the onnxruntime backend runs on the CPU, in its own precision: no --device or --amp")
        self.model = model.to(device).eval()
        self.onnx_encoder = onnx_encoder
        self.encoder: Callable[[torch.Tensor], torch.Tensor] = onnx_encoder or self.model.encoder
        self.card = card or {}
        self.device = torch.device(device)
        self.limits = limits
        self.max_batch_size = max_batch_size
        # Mixed precision for the encoder only: bf16 on a CPU (fast where it has AMX), fp16 on a
        # GPU. Decoding stays in float32: its log-probabilities rank the beams.
        self.amp = amp
        # On a CPU the torch encoder's deep stages are cheapest per image at 16 to 32 images a call
        # (its front runs image by image: captioner.encoder.run_front); ONNX Runtime runs every
        # layer on the whole call, and is cheapest at a few images, whose activations stay in the
        # caches (docs/performance.md). Decoding is cheapest in batches as large as they come
        # (fewer steps per image): each gets its own. A GPU takes the whole batch.
        default = (ONNX_ENCODER_BATCH if onnx_encoder else 16) if self.device.type == "cpu" else max_batch_size
        self.encoder_batch_size = encoder_batch_size or default
        self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.preset = model.preset

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", backend: Backend = "auto", **kwargs
    ) -> "Predictor":
        """The model saved at `path` (a .safetensors checkpoint, as `captioner train` or `captioner
        demo` writes it), served on `device` ("cpu", "cuda", "cuda:1"; one the caller has checked
        this machine has).

        `backend` runs the encoder: "auto" (the default) takes the checkpoint's ONNX encoder when it
        has one (`captioner export`) and the model runs on a CPU without `amp`, else torch;
        "torch" always torch; "onnxruntime" insists on the ONNX encoder (CheckpointError if the
        checkpoint has none). `predictor.runtime` says which one runs. The other keyword
        arguments are the constructor's: `limits`, `max_batch_size`, `encoder_batch_size`, `amp`.
        Raises FileNotFoundError for no file, CheckpointError for one this code cannot load."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        model, card = load_checkpoint(path, device)
        graph = None if backend == "torch" else read_onnx_encoder(path, model)  # before folding changes the weights
        if backend == "onnxruntime" and graph is None:
            raise CheckpointError(f"{path} has no ONNX encoder; make one with `captioner export {path} --out NEW`")
        if backend == "auto" and (torch.device(device).type != "cpu" or kwargs.get("amp")):
            graph = None
        onnx_encoder = None
        if graph is not None:
            encoder = model.encoder
            onnx_encoder = OnnxEncoder(graph, encoder.image_size, encoder.grid, encoder.dim)
            onnx_encoder.check()
        fold_batch_norms(model.encoder)  # this model only serves
        return cls(model, card, device, onnx_encoder=onnx_encoder, **kwargs)

    @property
    def runtime(self) -> dict:
        """Which backend runs the encoder, in which precision; the decoder is always torch's, in fp32.

        {"backend": "torch", "precision": "fp32" (or with amp "bf16" on a CPU, "fp16" on a GPU),
        "device": the torch device, e.g. "cpu"}, or {"backend": "onnxruntime", "precision": "fp32"
        or "int8"}, which runs on the CPU."""
        if self.onnx_encoder is not None:
            return {"backend": "onnxruntime", "precision": self.onnx_encoder.graph.precision, "device": "cpu"}
        amp = {"cpu": "bf16", "cuda": "fp16"}.get(self.device.type, "fp32") if self.amp else "fp32"
        return {"backend": "torch", "precision": amp, "device": str(self.device)}

    def info(self) -> dict:
        """What the model is: the basis of a model card."""
        c = self.model.config
        return {
            "encoder": c.encoder,
            "attention": c.attention,
            "cell": c.cell,
            "num_layers": c.num_layers,
            "vocab_size": len(self.model.vocab),
            "attention_grid": list(self.model.grid),
            "image_size": self.preset.size,
            "config": c.to_dict(),
            "runtime": self.runtime,
            **self.card,
        }

    def prepare(self, source: ImageSource) -> PreparedImage:
        """Decode and preprocess one image; raises ImageError for anything unusable."""
        image = open_image(source, self.limits, min_size=self.preset.size)
        width, height = image.info.get("full_size", image.size)
        return PreparedImage(self.preset(image), width, height)

    def caption_batch(self, images: list[PreparedImage], options: DecodeOptions) -> list[dict]:
        """One result per image, in order, in chunks of at most `max_batch_size`."""
        results = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            pixels = stack_pixels([im.pixels for im in chunk])  # (B, 3, S, S)
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()  # so the copy below does not wait for the GPU
            pixels = pixels.to(self.device, non_blocking=True)
            with torch.inference_mode():
                captions = self.model.caption_features(self.encode(pixels), options)
            results += [self.format_result(im, hyps, options) for im, hyps in zip(chunk, captions)]
        return results

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Region features (B, P, D) in float32 for pixels (B, 3, S, S) on the device, in as few
        encoder calls of `encoder_batch_size` at most as there can be, of equal sizes: 18 images
        go as 9 and 9, not 16 and an expensive 2."""
        calls = -(-pixels.size(0) // self.encoder_batch_size)
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp):
            features = torch.cat([self.encoder(part) for part in pixels.tensor_split(calls)])  # (B, P, D)
        return features.float()

    def caption(self, sources: list[ImageSource], options: DecodeOptions = DEFAULT_OPTIONS) -> list[dict]:
        """One result dict per source, in order (the format is the class docstring's).

        A source is a path (str or Path), the bytes of an image file, or a PIL image; JPEG, PNG,
        WebP, GIF and BMP are read. The images are prepared here, one after another, and decoded as
        batches of at most `max_batch_size`. The first unusable source raises ImageError (its
        `code` says why) and no image is captioned."""
        return self.caption_batch([self.prepare(s) for s in sources], options)

    def format_result(self, image: PreparedImage, hypotheses: list[Hypothesis], options: DecodeOptions) -> dict:
        h, w = self.model.grid
        captions = []
        for hyp in hypotheses:
            tokens = [self.model.vocab.words[i] for i in hyp.token_ids]
            caption = {"text": " ".join(tokens), "tokens": tokens, "log_prob": round(hyp.log_prob, 4)}
            if options.attention and hyp.attention is not None:
                grids = hyp.attention.float().view(-1, h, w)  # (T, h, w)
                caption["attention"] = (
                    grids.double().round(decimals=5).tolist()
                )  # in double: 0.01303, not 0.013030000030994415
            captions.append(caption)
        return {
            "width": image.width,
            "height": image.height,
            "method": options.method,
            "attention_grid": [h, w],
            "captions": captions,
        }
