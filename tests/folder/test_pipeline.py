"""The folder pipeline's workers: forked processes on a CPU, threads elsewhere, and the same lines either way."""

import os

import pytest
import torch

from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor
from folder.files import find_entries
from folder.pipeline import PipelineConfig, caption_entries, workers_are_processes
from tests.folder.conftest import FAILED, ORDER, SKIPPED


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_process_workers_and_thread_workers_write_the_same_lines_in_order(mixed_folder, tiny_checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, max_batch_size=3)
    entries = find_entries([mixed_folder], recursive=True, follow_links=False)
    options = DecodeOptions(method="beam", beam_size=2, attention=True)
    written, tallies = {}, {}
    for processes in (True, False):
        config = PipelineConfig(batch_size=3, workers=2, processes=processes, overlays=tmp_path / f"sheets{processes}")
        assert workers_are_processes(predictor.device, config) == (processes and os.uname().sysname == "Linux")
        batches, progress = [], []
        tallies[processes] = caption_entries(predictor, entries, options, config, batches.append, progress.append)
        assert all(len(batch) <= 3 + len(SKIPPED) for batch in batches)
        assert sum(progress) == len(ORDER) - len(SKIPPED)  # progress counts images, not skipped files
        written[processes] = [line for batch in batches for line in batch]

    assert written[True] == written[False]
    assert [line.split('"file":"')[1].split('"')[0] for line in written[True]] == ORDER
    tally = tallies[True]
    assert (tally.captioned, tally.failed, tally.skipped) == (
        len(ORDER) - len(FAILED) - len(SKIPPED),
        len(FAILED),
        len(SKIPPED),
    )
    assert tallies[False] == tally
    sheets = {
        processes: sorted(
            p.relative_to(tmp_path / f"sheets{processes}").as_posix()
            for p in (tmp_path / f"sheets{processes}").rglob("*.png")
        )
        for processes in written
    }
    assert sheets[True] == sheets[False] and len(sheets[True]) == tally.captioned


@pytest.mark.parametrize(
    "device, workers, processes, expected",
    [
        ("cpu", 2, True, True),
        ("cpu", 1, True, False),  # one worker: nothing to gain from another process
        ("cpu", 4, False, False),
        ("cuda", 2, True, False),  # CUDA cannot be forked once started
        ("cuda:1", 8, True, False),
    ],
)
def test_workers_are_forked_only_on_a_cpu_and_for_more_than_one_worker(device, workers, processes, expected):
    config = PipelineConfig(workers=workers, processes=processes)
    on_linux = os.uname().sysname == "Linux"
    assert workers_are_processes(torch.device(device), config) == (expected and on_linux)


def test_a_worker_that_fails_fails_the_run_instead_of_losing_lines(mixed_folder, tiny_checkpoint):
    """A bug or a dead worker is not an image error: it stops the run, and nothing after it is written."""
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    predictor.model.decoder.step = None  # any decoding now raises TypeError, in the forked workers too
    entries = find_entries([mixed_folder], recursive=True, follow_links=False)
    batches = []
    with pytest.raises(TypeError):
        caption_entries(predictor, entries, DecodeOptions(), PipelineConfig(batch_size=4, workers=2), batches.append)
    assert batches == []
