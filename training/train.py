"""Train a captioner on COCO-format data: the Shapes world, or MS COCO itself.

    captioner train --data data/shapes --out runs/shapes
    captioner train --data /data/coco --karpathy /data/coco/dataset_coco.json --out runs/coco \\
        --encoder efficientnet_lite0 --epochs 20 --min-word-count 5
    captioner train ... --resume                      # continue an interrupted run where it stopped
    torchrun --nproc_per_node 2 -m cli train ...   # DistributedDataParallel (gloo on CPU)
    captioner train ... --device cuda --amp           # a GPU, mixed precision

Region features of the frozen encoder are cached once (see training.features);
with --fine-tune-blocks N the encoder's last N blocks train too, end to end,
from the images. Each epoch is validated by real decoding, scored with CIDEr;
the best model is kept as OUT/best.safetensors, the state to resume from as
OUT/last.pt, and TensorBoard logs go to OUT/tensorboard.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from captioner.checkpoint import save_checkpoint
from captioner.config import ModelConfig
from captioner.decoding import DecodeOptions
from runtime.home import captioner_home
from captioner.model import CaptionModel, build_model
from captioner.vocab import Vocabulary
from training.data import CaptionBatches, encode_captions


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""  # the data set's root (COCO layout)
    out: str = "runs/captioner"
    karpathy: str = ""  # Karpathy's dataset_coco.json, for the usual COCO splits
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 10
    batch_size: int = 32  # images per step; each brings captions_per_image captions
    captions_per_image: int = 5
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 5.0  # global gradient norm
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regulariser
    min_word_count: int = 1
    max_words: int = 20  # longer training captions are cut
    val_limit: int = 0  # validate on the first N images only (0: all)
    val_beam_size: int = 1  # 1: greedy, the fastest honest validation
    patience: int = 3  # epochs without a better validation CIDEr before stopping
    seed: int = 0
    device: str = "cpu"
    amp: bool = False  # mixed precision: fp16 on CUDA, bf16 on CPU
    threads: int = 0  # torch threads (0: torch's default)
    fine_tune_blocks: int = 0  # train the encoder's last N blocks too (no feature cache)
    encoder_weights: str = ""  # ResNets: the ImageNet weights file
    cache_dir: str = ""  # feature cache (default: $CAPTIONER_HOME/features)
    workers: int = 2  # image decoding processes
    checkpoint_every: int = 0  # also save the resume state every N steps (0: at epoch ends)
    resume: bool = False
    progress: bool = True


# ---------------------------------------------------------------- the CLI

def _add_fields(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One --flag per dataclass field, same snake_case name, same default."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            group.add_argument(flag, dest=f.name, type=type(f.default), default=f.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_fields(parser, TrainConfig)
    _add_fields(parser, ModelConfig)


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    pick = lambda cls: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    return pick(TrainConfig), pick(ModelConfig)


def main(args: argparse.Namespace) -> int:
    train_config, model_config = configs_from_args(args)
    if not train_config.data:
        raise SystemExit("captioner train: --data ROOT is required")
    train(train_config, model_config)
    return 0


# ---------------------------------------------------------------- pieces

def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_loss(logits: torch.Tensor, alphas: torch.Tensor | None, captions: torch.Tensor,
                 alpha_c: float) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> Distributed:
    """torchrun sets WORLD_SIZE; gloo serves CPUs, nccl GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    dist = Distributed(torch.distributed.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(dist.local_rank)
    return dist


class FeatureRows(torch.utils.data.Dataset):
    """Cached region features, one image's (P, D) at a time, as float32."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.features[i], dtype=np.float32))  # (P, D)


def validate(model: CaptionModel, features: np.ndarray, split, limit: int, beam_size: int,
             batch_size: int = 64) -> dict[str, float]:
    """Decode (not teacher forcing) cached validation features: CIDEr, plus the truth
    metrics on the Shapes world."""
    from training.caption_metrics import cider
    from training.evaluate import truth_scores

    options = DecodeOptions(method="beam" if beam_size > 1 else "greedy", beam_size=beam_size, attention=True)
    device = next(model.parameters()).device
    h, w = model.grid
    image_ids = split.image_ids[:limit or None]
    model.eval()
    captions = {}
    for start in range(0, len(image_ids), batch_size):
        end = min(start + batch_size, len(image_ids))
        feats = torch.from_numpy(np.asarray(features[start:end], dtype=np.float32)).to(device)  # (B, P, D)
        for image_id, hyps in zip(image_ids[start:end], model.caption_features(feats, options)):
            best = hyps[0]
            captions[image_id] = {"tokens": [model.vocab.words[i] for i in best.token_ids],
                                  "attention": None if best.attention is None else best.attention.view(-1, h, w).numpy()}
    references = split.references()
    texts = {i: " ".join(c["tokens"]) for i, c in captions.items()}
    scores = {"CIDEr": cider({i: references[i] for i in texts}, texts)}
    truth = truth_scores(split, captions)
    scores.update({k: v for k, v in truth.items() if isinstance(v, float) and not math.isnan(v)})
    return scores


def save_state(path: Path, state: dict) -> None:
    """Atomically, so a crash mid-write leaves the previous state intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the loop

def train(config: TrainConfig, model_config: ModelConfig) -> Path:
    """Train; returns the path of the best checkpoint."""
    from training.coco import load_split
    from training.features import ImageFiles, cached_features, encode_images

    dist = init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device, dist.local_rank) if config.device == "cuda" else torch.device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_path = out / "last.pt"
    resumed = torch.load(resume_path, map_location="cpu", weights_only=True) if config.resume and resume_path.exists() else None
    if config.resume and resumed is None and dist.main:
        print(f"no {resume_path} to resume from: starting afresh")

    karpathy = Path(config.karpathy) if config.karpathy else None
    train_split = load_split(Path(config.data), config.train_split, karpathy)
    val_split = load_split(Path(config.data), config.val_split, karpathy)
    if resumed is not None:  # the run's own settings win over today's flags for what shapes the model
        model_config = ModelConfig.from_dict(resumed["model_config"])
        vocab = Vocabulary.from_json(resumed["vocab"])
    else:
        vocab = Vocabulary.build((c for cs in train_split.captions for c in cs), config.min_word_count)
    torch.manual_seed(config.seed)
    model = build_model(model_config, vocab, pretrained=True,
                        encoder_weights=config.encoder_weights or None).to(device)

    # the frozen encoder's features, computed once by the first process
    cache_dir = Path(config.cache_dir) if config.cache_dir else captioner_home() / "features"
    fine_tune = config.fine_tune_blocks > 0
    caches = {}
    for turn in (0, 1):  # rank 0 builds the caches, then the others read them
        if (turn == 0) == dist.main and not fine_tune:
            for split in (train_split, val_split):
                caches[split.name] = cached_features(model.encoder, split.image_paths, cache_dir,
                                                     f"{model_config.encoder}-{split.name}", device=device,
                                                     workers=config.workers, progress=config.progress and dist.main)
        dist.barrier()
    trainable_encoder = model.encoder.tail(config.fine_tune_blocks) if fine_tune else []
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for module in trainable_encoder:
        for p in module.parameters():
            p.requires_grad_(True)

    captions = encode_captions(train_split.captions, vocab, config.max_words)
    batches = CaptionBatches(captions, config.batch_size, config.captions_per_image, config.seed,
                             dist.rank, dist.world_size)
    # what a batch's images are: cached region features, or pixels when the encoder learns too
    images = ImageFiles(train_split.image_paths, model.preset) if fine_tune else FeatureRows(caches[train_split.name])
    total_steps = config.epochs * len(batches)

    # what learns: the decoder on cached features, or the whole model from pixels
    learner = model if fine_tune else model.decoder
    if dist.world_size > 1:
        learner = torch.nn.parallel.DistributedDataParallel(
            learner, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    use_amp = config.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")

    start_epoch, skip, step, best, bad_epochs, history = 0, 0, 0, -1.0, 0, []
    last_loss = float("nan")  # the cross-entropy of the latest step, the epoch's "loss" in history
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        start_epoch, skip, step = resumed["epoch"], resumed["batch"], resumed["step"]
        best, bad_epochs, history = resumed["best"], resumed["bad_epochs"], resumed["history"]
        last_loss = resumed.get("last_loss", last_loss)  # stopped after an epoch's last step: no step before its end
        torch.set_rng_state(resumed["rng"])

    def resume_state(epoch: int, batch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "batch": batch, "step": step, "best": best, "bad_epochs": bad_epochs,
                "history": history, "last_loss": last_loss, "rng": torch.get_rng_state(), "vocab": vocab.to_json(),
                "model_config": model_config.to_dict(), "train_config": dataclasses.asdict(config)}

    # SIGINT/SIGTERM: finish the step, save the resume state, stop
    stop = {"signal": None}
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[s] = signal.signal(s, lambda number, _: stop.update(signal=number))
    writer = None
    if dist.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    card_base = {
        "training_data": {"root": str(Path(config.data).resolve()), "train_split": config.train_split,
                          "train_images": len(train_split.image_ids), "val_split": config.val_split,
                          "karpathy": config.karpathy or None},
        "train_config": dataclasses.asdict(config),
    }
    best_path = out / "best.safetensors"
    started = time.time()
    try:
        for epoch in range(start_epoch, config.epochs):
            if bad_epochs >= config.patience:  # resuming a run that had stopped early (every rank read the same state)
                break
            model.train()
            model.encoder.eval()  # frozen BatchNorm statistics stay as pretrained
            for module in trainable_encoder:  # only the fine-tuned tail trains
                module.train()
            loader = torch.utils.data.DataLoader(
                images, batch_sampler=[b.indices for b in batches.epoch(epoch, skip)],
                num_workers=config.workers if fine_tune else 0,
                generator=torch.Generator().manual_seed(config.seed))  # not the global RNG: see resume_state's "rng"
            bar = tqdm(zip(loader, batches.epoch(epoch, skip)), total=len(batches) - skip,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (config.progress and dist.main))
            for batch_index, (inputs, batch) in enumerate(bar, start=skip):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, config)
                inputs, caps = inputs.to(device, non_blocking=True), batch.captions.to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits, alphas = learner(inputs, caps, config.captions_per_image)  # (N, T-1, V), (N, T-1, P)
                    loss, ce = caption_loss(logits, alphas, caps, config.alpha_c)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if writer and step % 10 == 0:
                    writer.add_scalar("train/loss", loss.item(), step)
                    writer.add_scalar("train/cross_entropy", ce.item(), step)
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                last_loss = ce.item()
                bar.set_postfix(loss=f"{last_loss:.3f}")
                if stop["signal"] is not None or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    if dist.main:
                        save_state(resume_path, resume_state(epoch, batch_index + 1))
                    if stop["signal"] is not None:
                        print(f"\nstopped by signal {stop['signal']}: resume with --resume")
                        return best_path
            skip = 0

            score = -1.0
            if dist.main:
                val_features = caches[val_split.name] if not fine_tune else encode_images(
                    model.encoder, val_split.image_paths[:config.val_limit or None], device=device,
                    workers=config.workers)
                scores = validate(model, val_features, val_split, config.val_limit, config.val_beam_size)
                score = scores["CIDEr"]
                for name, value in scores.items():
                    writer.add_scalar(f"val/{name}", value, epoch + 1)
                history.append({"epoch": epoch + 1, "loss": round(last_loss, 4),
                                "seconds": round(time.time() - started, 1),
                                **{f"val_{k}": round(v, 4) for k, v in scores.items()}})
                print(f"epoch {epoch + 1}: " + ", ".join(f"val {k} {v:.3f}" for k, v in scores.items()))
                if score > best:
                    best, bad_epochs = score, 0
                    save_checkpoint(model, best_path, {**card_base, "epoch": epoch + 1, "history": history,
                                                       "scores": {f"val_{k}": round(v, 4) for k, v in scores.items()}})
                else:
                    bad_epochs += 1
                save_state(resume_path, resume_state(epoch + 1, 0))
            if dist.world_size > 1:  # every rank stops together
                flag = torch.tensor([bad_epochs >= config.patience], dtype=torch.int32)
                torch.distributed.broadcast(flag, 0)
                stopping = bool(flag.item())
            else:
                stopping = bad_epochs >= config.patience
            if stopping:
                if dist.main:
                    print(f"early stop: no better validation CIDEr for {config.patience} epochs")
                break
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if writer:
            writer.close()
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if dist.main:
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return best_path
