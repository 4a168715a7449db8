"""Training throughput: captions per second from the feature cache, against re-encoding pixels.

    .venv/bin/python benchmarks/training_throughput.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/training_throughput.py --steps 2 --batch-size 2 --encoder tiny  # quick

With the default model's recipe (training/demo.py), one optimizer step after another on
random pixels and captions of Shapes length (the content does not change the cost):
- cache: what `captioner train` does, the decoder on the frozen encoder's cached region
  features (stored in fp16, read as float32), each image projected once for its captions;
- tutorials: what the tutorial repositories do, every (image, caption) pair encoded from
  pixels at every step, the frozen encoder under no_grad, then the same decoder step.
Each keeps its best of --rounds rounds of --steps steps, after one warm-up step.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from captioner.model import build_model
from captioner.vocab import Vocabulary
from training.demo import DEMO_MODEL, DEMO_TRAINING
from training.train import caption_loss

sys.path.insert(0, str(Path(__file__).parent))
from results_file import describe_machine, machine, markdown_table, save_results, write_section

SECTION = "## Training throughput"
VOCABULARY = "a big small red green blue yellow purple circle square triangle diamond above below left right of to the"
CAPTION_LENGTH = 12  # <start>, ten words and <end>: a typical Shapes caption


def step_from_features(model, optimizer, features: torch.Tensor, captions: torch.Tensor, per_image: int) -> None:
    """One step of `captioner train`: features (B, P, D) in float32, captions (B * per_image, T)."""
    logits, alphas = model.decoder(features, captions, per_image)  # (N, T-1, V), (N, T-1, P)
    loss, _ = caption_loss(logits, alphas, captions, DEMO_TRAINING.alpha_c)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def contenders(model, optimizer, batch_size: int, per_image: int) -> dict[str, Callable[[], None]]:
    """name -> one training step on `batch_size` images with `per_image` captions each."""
    generator = torch.Generator().manual_seed(0)
    S, (h, w), D = model.encoder.image_size, model.grid, model.encoder.dim
    captions = torch.randint(4, len(model.vocab), (batch_size * per_image, CAPTION_LENGTH), generator=generator)
    captions[:, 0] = Vocabulary.start_id
    cached = torch.randn(batch_size, h * w, D, generator=generator).half()  # (B, P, D) as the cache stores it
    pixels = torch.randn(batch_size * per_image, 3, S, S, generator=generator)  # (N, 3, S, S): a copy per caption

    def from_cache() -> None:
        step_from_features(model, optimizer, cached.float(), captions, per_image)

    def from_pixels() -> None:
        with torch.no_grad():
            features = model.encoder(pixels)  # (N, P, D)
        step_from_features(model, optimizer, features, captions, 1)

    return {"cache": from_cache, "tutorials": from_pixels}


def best_rate(step: Callable[[], None], steps: int, rounds: int, captions_per_step: int) -> float:
    """Captions per second, the best of `rounds` rounds of `steps` steps after a warm-up step."""
    step()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * captions_per_step / (time.perf_counter() - start))
    return max(rates)


def render(results: dict) -> str:
    cache = results["captions_per_s"]["cache"]
    rows = [[name, f"{rate:.1f}", f"{cache / rate:.1f}"] for name, rate in results["captions_per_s"].items()]
    return (
        "\n".join(
            [
                SECTION,
                "",
                f"{describe_machine(results['machine'])}; encoder {results['encoder']}, batch {results['batch_size']} "
                f"images x {results['captions_per_image']} captions, best of {results['rounds']} rounds of "
                f"{results['steps']} steps.",
                "",
                *markdown_table(["contender", "captions/s", "cache is x times as fast"], rows),
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the RESULTS.md whose section to write")
    parser.add_argument("--encoder", default=DEMO_MODEL.encoder)
    parser.add_argument("--batch-size", type=int, default=DEMO_TRAINING.batch_size)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = DEMO_MODEL.model_copy(update={"encoder": args.encoder})
    model = build_model(config, Vocabulary.build([VOCABULARY]), pretrained=False).train()
    model.encoder.eval()  # frozen, as `captioner train` keeps it
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=DEMO_TRAINING.lr)
    per_image = DEMO_TRAINING.captions_per_image
    steps = contenders(model, optimizer, args.batch_size, per_image)
    captions_per_step = args.batch_size * per_image
    results = {
        "machine": machine(),
        "encoder": args.encoder,
        "batch_size": args.batch_size,
        "captions_per_image": per_image,
        "steps": args.steps,
        "rounds": args.rounds,
        "captions_per_s": {
            name: best_rate(step, args.steps, args.rounds, captions_per_step) for name, step in steps.items()
        },
    }
    print(text := render(results))
    if args.out:
        save_results(args.out, "training_throughput", results)
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
