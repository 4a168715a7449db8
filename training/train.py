"""Train a captioner on COCO-format data: the Shapes world, or MS COCO itself.

    captioner train --data data/shapes --out runs/shapes
    captioner train --data /data/coco --karpathy /data/coco/dataset_coco.json --out runs/coco \\
        --encoder efficientnet_lite0 --epochs 20 --min-word-count 5
    captioner train ... --resume                      # continue an interrupted run where it stopped
    captioner train ... --scst --init-from runs/shapes/best.safetensors --out runs/shapes-scst --lr 1e-4
    torchrun --nproc_per_node 2 -m cli train ...   # DistributedDataParallel (gloo on CPU, nccl on GPUs)
    captioner train ... --device cuda --amp           # a GPU, mixed precision
    captioner train --help                            # every setting, with its default

Region features of the frozen encoder are cached once (see training.features);
with --fine-tune-blocks N the encoder's last N blocks train too, end to end,
from the images. Each epoch is validated by real decoding, scored with CIDEr;
the best model is kept as OUT/best.safetensors, the state to resume from as
OUT/last.pt, and TensorBoard logs go to OUT/tensorboard. With --scst the loss is
self-critical sequence training's (training.scst) instead of cross-entropy, continuing
from the checkpoint --init-from names; all else is the same.

The file reads top to bottom: the settings and the command line; the loss and
the learning rate; `setup`, which builds a run; `train_one_epoch` and
`validation_scores`; the checkpoints; and `train`, which strings them together.
"""

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from captioner.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from captioner.config import ModelConfig
from captioner.decoding import MAX_BEAM_SIZE, DecodeOptions
from captioner.model import CaptionModel, build_model
from captioner.onnx_encoder import OnnxGraph
from captioner.vocab import Vocabulary
from runtime.allocator import keep_freed_memory
from runtime.devices import DEVICES, resolve_device
from runtime.distributed import Distributed, init_distributed, torchrun_restarts, torchrun_run_id
from runtime.files import full_disk_is_an_error, replacing, write_text
from runtime.flags import add_model_flags, model_from_flags
from runtime.home import captioner_home
from training.caption_metrics import cider
from training.cider_d import CiderD
from training.coco import CaptionSplit, load_split
from training.data import Batch, CaptionBatches, encode_captions
from training.evaluate import truth_scores
from training.features import ImageFiles, cached_features, encode_images
from training.image_check import BadImagesError, find_bad_images, skipped_note, usable_split
from training.scst import scst_loss

RESUME_STATE = "last.pt"  # in OUT, with the best model and the history
BEST_MODEL = "best.safetensors"


class TrainConfig(BaseModel):
    """How to train. Each field is a `captioner train` flag of the same name, checked by the same
    rules, and the model card keeps them all."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    data: str = Field("", description="the data set's root, in the COCO layout (required)")
    out: str = Field(
        "runs/captioner", description="the run's folder: best.safetensors, last.pt, history.json, tensorboard/"
    )
    karpathy: str = Field("", description="Karpathy's dataset_coco.json, for the usual COCO splits")
    train_split: str = Field("train", description="the split trained on")
    val_split: str = Field("val", description="the split each epoch is validated on")
    skip_bad_images: bool = Field(
        False,
        description="train without the images found missing or unreadable "
        "(the model card lists them) instead of stopping before any work",
    )
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(32, ge=1, description="images per step; each brings captions_per_image captions")
    captions_per_image: int = Field(5, ge=1, description="captions drawn per image and step")
    lr: float = Field(
        1e-3,
        ge=0.0,
        allow_inf_nan=False,
        description="Adam's peak learning rate, reached after the warm-up, then decayed by a cosine to a tenth",
    )
    warmup_steps: int = Field(100, ge=0, description="steps of linear warm-up")
    grad_clip: float = Field(5.0, gt=0.0, description="the global gradient norm is clipped to this")
    alpha_c: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="weight of the doubly stochastic "
        "attention regulariser (every region looked at about once per caption)",
    )
    word_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="cross-entropy only: each word the decoder reads is <unk> with this probability "
        "(the words it must predict stay), so a word leans on the picture more than on the word before",
    )
    min_word_count: int = Field(1, ge=1, description="rarer training words become <unk>")
    max_words: int = Field(20, ge=1, description="longer training captions are cut")
    val_limit: int = Field(0, ge=0, description="validate on the first N images only (0: all)")
    val_beam_size: int = Field(1, ge=1, le=MAX_BEAM_SIZE, description="1: greedy, the fastest honest validation")
    patience: int = Field(3, ge=1, description="epochs without a better validation CIDEr before stopping")
    seed: int = Field(0, ge=0, description="the same seed, the same run")
    device: str = Field("cpu", description=f"{DEVICES}; under torchrun, cuda is each process's own GPU")
    amp: bool = Field(False, description="mixed precision: fp16 on CUDA, bf16 on CPU")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")
    fine_tune_blocks: int = Field(
        0, ge=0, description="train the encoder's last N blocks too, from the pixels (no feature cache)"
    )
    encoder_weights: str = Field("", description="ResNets: the ImageNet weights file")
    cache_dir: str = Field("", description="the feature cache (none: $CAPTIONER_HOME/features)")
    workers: int = Field(2, ge=0, description="image decoding processes")
    checkpoint_every: int = Field(
        1000,
        ge=0,
        description="also save the resume state every N steps (0: at "
        "epoch ends only): the most a crash loses, or a worker lost under torchrun",
    )
    resume: bool = Field(
        False,
        description="continue the run in OUT where it stopped (under torchrun, its "
        "restarts after a failure resume by themselves)",
    )
    init_from: str = Field(
        "",
        description="start from this checkpoint (an earlier run's best.safetensors): its "
        "weights, model settings and vocabulary; the model flags are ignored",
    )
    scst: bool = Field(
        False,
        description="self-critical sequence training (Rennie et al. 2017) from --init-from "
        "instead of cross-entropy: each image's scst_samples sampled captions (at most max_words "
        "words) are rewarded by their CIDEr-D, with document frequencies from the training "
        "references, minus that of its greedy caption. The decoder runs in eval mode (dropout off), "
        "so the log-probabilities trained are those the captions were sampled with. Cached features "
        "only (no --fine-tune-blocks)",
    )
    scst_samples: int = Field(5, ge=1, description="with --scst: captions sampled per image and step")
    scst_reference_weight: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="with --scst: add this times the cross-entropy of each image's captions_per_image "
        "reference captions (a mixed objective), which keeps captions in the references' language "
        "while CIDEr-D is pursued",
    )
    progress: bool = Field(True, description="progress bars")

    @model_validator(mode="after")
    def _scst_needs_a_start_and_cached_features(self) -> "TrainConfig":
        if self.scst and not self.init_from:
            raise ValueError("--scst needs --init-from: the cross-entropy checkpoint to fine-tune")
        if self.scst and self.fine_tune_blocks:
            raise ValueError("--scst trains on cached features only: --fine-tune-blocks is not supported with it")
        return self


# ---------------------------------------------------------------- the command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, TrainConfig, title="training")
    add_model_flags(parser, ModelConfig, title="model (a resumed run keeps its own)")


# after a full disk (the feature cache, best.safetensors, last.pt, history.json): each is replaced
# whole, so the files there are the last ones saved, and --resume goes on from last.pt
RERUN = "run the same command again with --resume to go on from the last saved state"


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()  # this process's allocator policy, before any thread or worker starts
    try:
        config, model_config = model_from_flags(TrainConfig, args), model_from_flags(ModelConfig, args)
        if not config.data:
            raise ValueError("--data: the data set's root is required")
        # a GPU this machine lacks is refused now, as a usage error, not after the data is read
        resolve_device(config.device, Distributed.from_environment().local_rank)
        if config.init_from:  # so is a checkpoint that is not there
            check_checkpoint(config.init_from)
    except ValueError as e:
        print(f"captioner train: error: {e}", file=sys.stderr)
        return 2
    try:
        with full_disk_is_an_error("captioner train", RERUN):
            train(config, model_config)
    except BadImagesError as e:  # found before the long work: a message, not a traceback
        dist = Distributed.from_environment()
        if dist.is_main:
            print(f"captioner train: error: {e}", file=sys.stderr)
        dist.close()
        return 2
    return 0


def check_checkpoint(path: str) -> None:
    """ValueError naming --init-from unless `path` is a captioner checkpoint."""
    try:
        read_header(path)
    except (OSError, CheckpointError) as e:
        raise ValueError(f"--init-from: {e}") from None


# ---------------------------------------------------------------- the loss and the learning rate


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor | None, captions: torch.Tensor, alpha_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the words after <start>, plus the doubly stochastic regulariser
    lambda * mean_i (1 - sum_t alpha_ti)^2, which asks every region to be looked at
    about once over the caption. Returns (loss, cross-entropy)."""
    targets = captions[:, 1:]  # (N, T-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=0)
    if alphas is None or alpha_c == 0:
        return ce, ce.detach()
    mask = (targets != 0).unsqueeze(2).to(alphas.dtype)  # (N, T-1, 1)
    coverage = (alphas * mask).sum(dim=1)  # (N, P)
    return ce + alpha_c * ((1.0 - coverage.float()) ** 2).mean(), ce.detach()


# ---------------------------------------------------------------- setup


class FeatureRows(torch.utils.data.Dataset):
    """Cached region features, one image's (P, D) at a time, as float32."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.features[i], dtype=np.float32))  # (P, D)


@dataclass
class Progress:
    """Where a run has got to: what the resume state holds besides weights, optimizer and RNG."""

    epoch: int = 0  # the epoch under way (epochs before it are trained and validated)
    batch: int = 0  # its batches already trained
    step: int = 0
    best: float = -1.0  # the best validation CIDEr so far
    bad_epochs: int = 0  # epochs since it improved
    history: list[dict] = field(default_factory=list)  # one entry per validated epoch: history.json
    last_loss: float = math.nan  # the latest step's cross-entropy (SCST's loss with --scst): "loss" in history


@dataclass
class Run:
    """What `setup` builds for the loop, on this rank."""

    config: TrainConfig
    model_config: ModelConfig  # a resumed run's own, whatever today's flags say
    dist: Distributed
    device: torch.device
    train_split: CaptionSplit
    val_split: CaptionSplit
    vocab: Vocabulary
    model: CaptionModel
    features: dict[str, np.ndarray]  # split name -> the frozen encoder's (N, P, D); none when fine-tuning
    trainable_encoder: list[torch.nn.Module]  # the encoder's blocks that learn too
    batches: CaptionBatches
    images: torch.utils.data.Dataset  # a batch's inputs: cached features, or pixels when the encoder learns
    learner: torch.nn.Module  # what the loss flows through: the decoder, or the whole model (DDP-wrapped)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.time)  # history's "seconds" count from here
    cider: CiderD | None = None  # with --scst, the reward: document frequencies of the training references
    init_from: dict | None = None  # what the card says of the checkpoint the run started from

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def resume_path(self) -> Path:
        return self.out / RESUME_STATE

    @property
    def best_path(self) -> Path:
        return self.out / BEST_MODEL

    @property
    def fine_tune(self) -> bool:
        return self.config.fine_tune_blocks > 0

    @property
    def total_steps(self) -> int:
        return self.config.epochs * len(self.batches)

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16


def setup(config: TrainConfig, model_config: ModelConfig) -> Run:
    """This rank's run: device, data, vocabulary, model, feature caches, optimizer, and the state of
    a run resumed. A device the machine lacks is a ValueError before any of it."""
    dist, device = init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    resumed = load_resume_state(config, dist)
    initial, init_from = load_initial_model(config)
    if resumed is not None:  # the run's own settings win over today's flags for what shapes the model
        model_config = ModelConfig.from_dict(resumed["model_config"])
    elif initial is not None:  # and so do --init-from's
        model_config = initial.config
    train_split, val_split, vocab = load_data(config, resumed, dist)
    if resumed is None and initial is not None:
        vocab = initial.vocab
    torch.manual_seed(config.seed)
    if initial is None:
        initial = build_model(model_config, vocab, pretrained=True, encoder_weights=config.encoder_weights or None)
    model = initial.to(device)
    fine_tune = config.fine_tune_blocks > 0
    features = {} if fine_tune else cache_features(model, (train_split, val_split), config, dist, device)
    trainable_encoder = freeze_encoder(model, config.fine_tune_blocks)
    batches = CaptionBatches(
        encode_captions(train_split.captions, vocab, config.max_words),
        config.batch_size,
        config.captions_per_image,
        config.seed,
        dist.rank,
        dist.world_size,
    )
    # what a batch's images are: cached region features, or pixels when the encoder learns too
    images = ImageFiles(train_split.image_paths, model.preset) if fine_tune else FeatureRows(features[train_split.name])
    learner = learner_of(model, fine_tune, dist, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    cider_d = CiderD(train_split.captions) if config.scst else None
    run = Run(
        config,
        model_config,
        dist,
        device,
        train_split,
        val_split,
        vocab,
        model,
        features,
        trainable_encoder,
        batches,
        images,
        learner,
        params,
        optimizer,
        scaler,
        cider=cider_d,
        init_from=init_from,
    )
    if resumed is not None:
        restore(run, resumed)
    return run


def load_initial_model(config: TrainConfig) -> tuple[CaptionModel | None, dict | None]:
    """--init-from's model, and what its card says of it for this run's card; (None, None) without it."""
    if not config.init_from:
        return None, None
    model, card = load_checkpoint(config.init_from)
    return model, {
        "checkpoint": str(Path(config.init_from).resolve()),
        "objective": card.get("objective"),
        "epoch": card.get("epoch"),
        "scores": card.get("scores", {}),
    }


def load_data(
    config: TrainConfig, resumed: dict | None, dist: Distributed | None = None
) -> tuple[CaptionSplit, CaptionSplit, Vocabulary]:
    """The training and validation splits, and the vocabulary: a resumed run's own, else the
    training captions' words. Every image is checked first (by rank 0, which tells the others):
    bad ones are a BadImagesError naming them, or left out with --skip-bad-images."""
    dist = dist or Distributed()
    karpathy = Path(config.karpathy) if config.karpathy else None
    splits = [load_split(Path(config.data), name, karpathy) for name in (config.train_split, config.val_split)]
    bad = dist.broadcast_object([find_bad_images(split.image_paths) for split in splits] if dist.is_main else None)
    train_split, val_split = (usable_split(split, b, config.skip_bad_images) for split, b in zip(splits, bad))
    for split in (train_split, val_split):
        if split.skipped and dist.is_main:
            print(skipped_note(split))
    if resumed is not None:
        return train_split, val_split, Vocabulary.from_json(resumed["vocab"])
    vocab = Vocabulary.build((c for cs in train_split.captions for c in cs), config.min_word_count)
    return train_split, val_split, vocab


def cache_features(
    model: CaptionModel, splits: tuple[CaptionSplit, ...], config: TrainConfig, dist: Distributed, device: torch.device
) -> dict[str, np.ndarray]:
    """The frozen encoder's features of each split, split name -> (N, P, D): rank 0 computes what
    the cache lacks while the others wait, then they read what it wrote."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else captioner_home() / "features"
    features = {}
    for turn in (0, 1):
        if (turn == 0) == dist.is_main:
            for split in splits:
                features[split.name] = cached_features(
                    model.encoder,
                    split.image_paths,
                    cache_dir,
                    f"{model.config.encoder}-{split.name}",
                    device=device,
                    workers=config.workers,
                    progress=config.progress and dist.is_main,
                )
        dist.barrier()
    return features


def freeze_encoder(model: CaptionModel, blocks: int) -> list[torch.nn.Module]:
    """Freeze the encoder but for its last `blocks` blocks, which it returns."""
    tail = model.encoder.tail(blocks)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for module in tail:
        for p in module.parameters():
            p.requires_grad_(True)
    return tail


def learner_of(model: CaptionModel, fine_tune: bool, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """What the loss flows through: the decoder on cached features, or the whole model from the
    pixels; under torchrun, wrapped so that the ranks average their gradients."""
    learner: torch.nn.Module = model if fine_tune else model.decoder
    if dist.world_size == 1:
        return learner
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(learner, device_ids=device_ids)


# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM are noted in the list yielded, not raised: the loop finishes its step,
    saves the resume state and stops. The previous handlers come back afterwards; only the main
    thread may set handlers, so elsewhere nothing is caught."""
    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda number, _: received.append(number))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def tensorboard(run: Run) -> contextlib.AbstractContextManager:
    """TensorBoard's writer for OUT/tensorboard on rank 0; None on the others."""
    if not run.dist.is_main:
        return contextlib.nullcontext()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.out / "tensorboard"))


def train_step(run: Run, inputs: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step on (B, P, D) features or (B, 3, S, S) pixels and their (N, T) captions:
    (loss, cross-entropy, gradient norm before clipping)."""
    config = run.config
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.progress.step, run.total_steps, config)
    inputs, captions = inputs.to(run.device, non_blocking=True), captions.to(run.device)
    read = drop_words(captions, config.word_dropout) if config.word_dropout else captions  # (N, T)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=config.amp):
        logits, alphas = run.learner(inputs, read, config.captions_per_image)  # (N, T-1, V), (N, T-1, P)
        loss, ce = caption_loss(logits, alphas, captions, config.alpha_c)
    grad_norm = apply_gradients(run, loss)
    return loss, ce, grad_norm


def drop_words(captions: torch.Tensor, p: float) -> torch.Tensor:
    """(N, T) captions with each word after <start> replaced by <unk> with probability p (word
    dropout, Bowman et al. 2016); padding stays padding. Drawn from the global RNG, as dropout is."""
    dropped = (torch.rand(captions.shape, device=captions.device) < p) & (captions > Vocabulary.end_id)  # (N, T)
    dropped[:, 0] = False
    return captions.masked_fill(dropped, Vocabulary.unk_id)


def scst_step(run: Run, inputs: torch.Tensor, batch: Batch, writer) -> tuple[torch.Tensor, ...]:
    """One optimizer step of self-critical sequence training on (B, P, D) features of the batch's
    images (their (N, T) captions are the references of the mixed objective): (loss, loss detached,
    gradient norm before clipping). Rewards go to `writer`."""
    config, progress = run.config, run.progress
    assert run.cider is not None  # the loop calls scst_step only when run.cider is set (--scst)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(progress.step, run.total_steps, config)
    run.learner.eval()  # dropout off: the re-scoring pass gives the sampled captions' own log-probabilities
    features = inputs.to(run.device, non_blocking=True)
    references = [run.train_split.captions[i] for i in batch.indices]
    reference_ids = [strip_specials(row) for row in batch.captions.tolist()] if config.scst_reference_weight else None
    # samples of their own per rank and step, the same again when a run is resumed
    seed = int(np.random.SeedSequence([config.seed, run.dist.rank, progress.step]).generate_state(1)[0])
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=config.amp):
        # re-scored through the learner: under torchrun, the DDP wrapper that averages the gradients
        loss, stats = scst_loss(
            run.model.decoder,
            features,
            references,
            run.cider,
            run.vocab,
            config.scst_samples,
            config.max_words,
            seed,
            learner=run.learner,
            reference_ids=reference_ids,
            reference_weight=config.scst_reference_weight,
        )
    grad_norm = apply_gradients(run, loss)
    if writer and progress.step % 10 == 0:
        for name, value in stats.items():
            writer.add_scalar(f"scst/{name}", value, progress.step)
    return loss, loss.detach(), grad_norm


def strip_specials(row: list[int]) -> list[int]:
    """A padded `<start> words <end>` row's words."""
    words = row[1:]
    return words[: words.index(Vocabulary.end_id)] if Vocabulary.end_id in words else words


def apply_gradients(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Backward, clip, step: the optimizer's step on `loss`; the gradient norm before clipping."""
    optimizer, scaler = run.optimizer, run.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    run.progress.step += 1
    return grad_norm


def train_one_epoch(run: Run, writer, stop: list[int]) -> bool:
    """The batches left of epoch `run.progress.epoch`; False when a signal stopped it (the state
    saved first)."""
    config, progress = run.config, run.progress
    epoch, skip = progress.epoch, progress.batch
    run.model.train()
    run.model.encoder.eval()  # frozen BatchNorm statistics stay as pretrained
    for module in run.trainable_encoder:  # only the fine-tuned tail trains
        module.train()
    loader = torch.utils.data.DataLoader(
        run.images,
        batch_sampler=[b.indices for b in run.batches.epoch(epoch, skip)],
        num_workers=config.workers if run.fine_tune else 0,
        generator=torch.Generator().manual_seed(config.seed),
    )  # not the global RNG: see resume_state's "rng"
    bar = tqdm(
        zip(loader, run.batches.epoch(epoch, skip), strict=True),
        total=len(run.batches) - skip,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (config.progress and run.dist.is_main),
    )
    for batch_index, (inputs, batch) in enumerate(bar, start=skip):
        if run.cider is None:
            loss, ce, grad_norm = train_step(run, inputs, batch.captions)
        else:  # then `ce` is SCST's loss, and the rewards are logged
            loss, ce, grad_norm = scst_step(run, inputs, batch, writer)
        progress.batch, progress.last_loss = batch_index + 1, ce.item()
        if writer and progress.step % 10 == 0:
            writer.add_scalar("train/loss", loss.item(), progress.step)
            if run.cider is None:
                writer.add_scalar("train/cross_entropy", ce.item(), progress.step)
            writer.add_scalar("train/grad_norm", float(grad_norm), progress.step)
            writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], progress.step)
        bar.set_postfix(loss=f"{progress.last_loss:.3f}")
        # a signal caught by any rank stops every rank after this same step (one small all-reduce)
        caught = run.dist.all_reduce_max(stop[-1] if stop else 0)
        if caught or (config.checkpoint_every and progress.step % config.checkpoint_every == 0):
            save_resume_state(run)
        if caught:
            rank = f" (rank {run.dist.rank} of {run.dist.world_size})" if run.dist.world_size > 1 else ""
            print(f"\nstopped by signal {caught} after step {progress.step}{rank}: resume with --resume")
            return False
    return True


def decode_features(
    model: CaptionModel, features: np.ndarray, image_ids: list[int], beam_size: int, batch_size: int = 64
) -> dict[int, dict]:
    """image id -> the best caption's {"tokens", "attention": (T, h, w)} from its features, row i of
    `features` being image_ids[i]'s."""
    # the model's own captions: no repeat blocking, which is a choice of the applications' decoding
    options = DecodeOptions(
        method="beam" if beam_size > 1 else "greedy", beam_size=beam_size, attention=True, no_repeat_ngram_size=0
    )
    device = next(model.parameters()).device
    h, w = model.grid
    model.eval()
    captions = {}
    for start in range(0, len(image_ids), batch_size):
        end = min(start + batch_size, len(image_ids))
        feats = torch.from_numpy(np.asarray(features[start:end], dtype=np.float32)).to(device)  # (B, P, D)
        for image_id, hyps in zip(image_ids[start:end], model.caption_features(feats, options), strict=True):
            best = hyps[0]
            attention = None if best.attention is None else best.attention.view(-1, h, w).numpy()  # (T, h, w)
            captions[image_id] = {"tokens": [model.vocab.words[i] for i in best.token_ids], "attention": attention}
    return captions


def validation_scores(
    model: CaptionModel,
    features: "np.ndarray | EncodedImages",
    split: CaptionSplit,
    limit: int,
    beam_size: int,
    batch_size: int = 64,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Validation by real decoding (not teacher forcing) of the first `limit` images' features (0:
    all): CIDEr, plus the truth metrics on the Shapes world. Each rank decodes every world_size-th
    batch of `batch_size` images, the very batches one process decodes, so the captions are the
    same; rank 0 gathers and scores them and returns the scores, the other ranks {}."""
    dist = dist or Distributed()  # alone
    image_ids = split.image_ids[: limit or None]
    mine = {}
    for start in range(dist.rank * batch_size, len(image_ids), dist.world_size * batch_size):
        end = min(start + batch_size, len(image_ids))
        mine.update(decode_features(model, features[start:end], image_ids[start:end], beam_size, batch_size))
    if split.instances is None:  # only the Shapes world's pointing game reads the attention: not sent
        mine = {i: {**c, "attention": None} for i, c in mine.items()}
    shares = dist.gather(mine)
    if shares is None:
        return {}
    decoded = {i: c for share in shares for i, c in share.items()}
    captions = {i: decoded[i] for i in image_ids}  # in one process's order, so the sums add up alike
    references = split.references()
    texts = {i: " ".join(c["tokens"]) for i, c in captions.items()}
    scores = {"CIDEr": cider({i: references[i] for i in texts}, texts)}
    truth = truth_scores(split, captions)
    scores.update({k: v for k, v in truth.items() if isinstance(v, float) and not math.isnan(v)})
    return scores


class EncodedImages:
    """Region features (N, P, D) of images, encoded when rows are sliced out: a rank encodes only
    the validation images it decodes."""

    def __init__(self, encoder, paths: list[Path], device: torch.device, workers: int):
        self.encoder, self.paths, self.device, self.workers = encoder, paths, device, workers

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return encode_images(self.encoder, self.paths[rows], device=self.device, workers=self.workers)


def validation_features(run: Run) -> np.ndarray | EncodedImages:
    """The validation images' (N, P, D) features: cached, or encoded as they are decoded by an
    encoder that learns."""
    if not run.fine_tune:
        return run.features[run.val_split.name]
    return EncodedImages(
        run.model.encoder, run.val_split.image_paths[: run.config.val_limit or None], run.device, run.config.workers
    )


def end_epoch(run: Run, writer) -> None:
    """Every rank, once epoch `run.progress.epoch` is trained: validate (each rank decodes its share,
    rank 0 scores and tells the others, so every rank's progress is the same), log, keep the best
    model and save the resume state (rank 0 writes)."""
    config, progress, dist = run.config, run.progress, run.dist
    scores = dist.broadcast_object(
        validation_scores(
            run.model, validation_features(run), run.val_split, config.val_limit, config.val_beam_size, dist=dist
        )
    )
    if writer:  # rank 0's
        for name, value in scores.items():
            writer.add_scalar(f"val/{name}", value, progress.epoch)
    progress.history.append(
        {
            "epoch": progress.epoch,
            "loss": round(progress.last_loss, 4),
            "seconds": round(time.time() - run.started, 1),
            **{f"val_{k}": round(v, 4) for k, v in scores.items()},
        }
    )
    if dist.is_main:
        print(f"epoch {progress.epoch}: " + ", ".join(f"val {k} {v:.3f}" for k, v in scores.items()))
    if scores["CIDEr"] > progress.best:
        progress.best, progress.bad_epochs = scores["CIDEr"], 0
        if dist.is_main:
            save_model(run.model, run.best_path, model_card(run, scores))
    else:
        progress.bad_epochs += 1
    save_resume_state(run)


def train_epochs(run: Run, writer, stop: list[int]) -> bool:
    """The epochs left, each trained, then validated, until the last or `patience` epochs without a
    better CIDEr; False when a signal stopped the run."""
    config, progress, dist = run.config, run.progress, run.dist
    # a run resumed after it had stopped early trains no further (every rank read the same state)
    while progress.epoch < config.epochs and progress.bad_epochs < config.patience:
        if not train_one_epoch(run, writer, stop):
            return False
        progress.epoch, progress.batch = progress.epoch + 1, 0
        end_epoch(run, writer)
        if dist.broadcast_flag(progress.bad_epochs >= config.patience):  # rank 0 scored: every rank stops together
            if dist.is_main:
                print(f"early stop: no better validation CIDEr for {config.patience} epochs")
            break
    return True


# ---------------------------------------------------------------- checkpoints


def save_model(model: CaptionModel, path: Path, card: dict, onnx_encoder: OnnxGraph | None = None) -> None:
    """The model as a checkpoint (with its encoder's ONNX graph, if given), replaced whole (a
    server may be reading the old one) and readable by other users (a server in a container runs as one)."""
    with replacing(path) as tmp:
        save_checkpoint(model, tmp, card, onnx_encoder)


def model_card(run: Run, scores: dict[str, float]) -> dict:
    """What best.safetensors says of itself: its data, its settings, its epoch and scores."""
    config = run.config
    return {
        "training_data": {
            "root": str(Path(config.data).resolve()),
            "train_split": config.train_split,
            "train_images": len(run.train_split.image_ids),
            "val_split": config.val_split,
            "karpathy": config.karpathy or None,
            # --skip-bad-images: what was left out, split by split
            "skipped_images": {
                split.name: {"count": len(split.skipped), "images": split.skipped}
                for split in (run.train_split, run.val_split)
                if split.skipped
            },
        },
        "train_config": config.model_dump(),
        "objective": "SCST" if config.scst else "cross-entropy",
        "init_from": run.init_from,
        "epoch": run.progress.epoch,
        "history": run.progress.history,
        "scores": {f"val_{k}": round(v, 4) for k, v in scores.items()},
    }


def resume_state(run: Run) -> dict | None:
    """Everything a resumed run needs to continue bit for bit as if it had never stopped, every
    rank's global RNG (dropout's) included: on rank 0; None on the others. Every rank calls it."""
    rng_ranks = run.dist.gather(torch.get_rng_state())  # each rank drew its own dropout masks
    if rng_ranks is None:
        return None
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        **asdict(run.progress),
        "rng": torch.get_rng_state(),
        "rng_ranks": rng_ranks,
        "vocab": run.vocab.to_json(),
        "model_config": run.model_config.to_dict(),
        "train_config": run.config.model_dump(),
        "torchrun_run_id": torchrun_run_id(),
    }


def save_resume_state(run: Run) -> None:
    """OUT/last.pt, written by rank 0 with what every rank gave; every rank calls it at the same step."""
    state = resume_state(run)
    if state is not None:
        save_state(run.resume_path, state)


def save_state(path: Path, state: dict) -> None:
    """Atomically, so a crash or a full disk mid-write leaves the previous state intact. Through a
    Python file: torch's own writer, given a path, reports a full disk as "unexpected pos", with
    no errno; a Python file's OSError stays behind torch's error, where `replacing` finds it."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_resume_state(config: TrainConfig, dist: Distributed) -> dict | None:
    """OUT/last.pt, if there is one, with --resume; and when torchrun restarted the workers after one
    failed (--max-restarts), if this torchrun job wrote it: they go on from its last checkpoint by
    themselves."""
    path = Path(config.out) / RESUME_STATE
    restarts = torchrun_restarts()
    if not (config.resume or restarts):
        return None
    if not path.exists():
        if dist.is_main:
            print(f"no {path} to resume from: starting afresh")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not config.resume:  # restarted
        if state.get("torchrun_run_id") != torchrun_run_id():
            if dist.is_main:
                print(f"{path} is an earlier run's: starting afresh")
            return None
        if dist.is_main:
            print(f"torchrun restarted the workers (restart {restarts}): resuming from {path} at step {state['step']}")
    return state


def restore(run: Run, state: dict) -> None:
    """Put a resumed run back where `state` left it."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    # states saved before last_loss was kept lack it: the default stands in
    run.progress = Progress(**{f.name: state[f.name] for f in fields(Progress) if f.name in state})
    # each rank's own RNG; rank 0's for all when the state is older or the number of ranks changed
    rng_ranks = state.get("rng_ranks") or []
    torch.set_rng_state(rng_ranks[run.dist.rank] if len(rng_ranks) == run.dist.world_size else state["rng"])


# ---------------------------------------------------------------- all together


def train(config: TrainConfig, model_config: ModelConfig) -> Path:
    """Train; returns the path of the best checkpoint."""
    run = setup(config, model_config)
    try:
        with stop_on_signals() as stop, tensorboard(run) as writer:
            finished = train_epochs(run, writer, stop)
    finally:
        run.dist.close()
    if finished and run.dist.is_main:
        write_text(run.out / "history.json", json.dumps(run.progress.history, indent=1))
    return run.best_path
