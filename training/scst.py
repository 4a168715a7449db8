"""Self-critical sequence training (Rennie et al., CVPR 2017): the loss a training step minimises.

    cider = CiderD(train_split.captions)      # once, from the training references
    loss, stats = scst_loss(model.decoder, features, [train_split.captions[i] for i in batch.indices],
                            cider, model.vocab, num_samples=5, max_length=16, seed=step)
    loss.backward()

Under DistributedDataParallel pass the wrapped decoder as `learner`: the re-scoring pass
is the one forward with gradient, and only a forward through the wrapper has the ranks
average their gradients in backward.

REINFORCE with the model's own greedy caption as the baseline: K captions are sampled
per image (`captioner.decoding.sample`), each is rewarded by its CIDEr-D minus that of
the image's greedy caption (`captioner.decoding.greedy`), and the loss is
-mean(advantage * log p(sampled caption)). Captions the model would not say at test
time are pushed down, better ones up, with no learned critic.

With `reference_weight` w > 0 the loss is the mixed objective of Paulus et al. (2017):
SCST's plus w times the cross-entropy (per word) of the image's reference captions, both
from one teacher-forced pass. CIDEr-D alone can be gamed by captions no reference would
say (a count from one template before the objects of another); the references' likelihood
keeps the captions in their language.

Both decodings run without gradient; the sampled captions are then scored again by
teacher forcing (`Decoder.forward`, one batched pass through `Decoder.step`), which
gives the same log-probabilities with gradient. That holds exactly when dropout is off
(the decoder in eval mode): with dropout each pass draws its own masks.
"""

import numpy as np
import torch

from captioner.decoder import Decoder
from captioner.decoding import greedy, sample
from captioner.vocab import Vocabulary
from training.cider_d import CiderD
from training.data import pad


def caption_log_probs(
    decoder: torch.nn.Module, features: torch.Tensor, captions: list[list[int]], captions_per_image: int = 1
) -> torch.Tensor:
    """(N,) summed log-probabilities, with gradient, of each caption's words and its <end>.

    decoder: a `Decoder`, or a wrapper with its forward (DistributedDataParallel). features
    (B, P, D); captions: N = B * captions_per_image word-id lists (no <start>, no <end>),
    image i's in rows i*k .. i*k+k-1. Nothing after a caption's <end> counts."""
    ids = pad([[Vocabulary.start_id, *c, Vocabulary.end_id] for c in captions]).to(features.device)  # (N, T)
    logits, _ = decoder(features, ids, captions_per_image)  # (N, T-1, V)
    targets = ids[:, 1:]  # (N, T-1)
    log_probs = logits.float().log_softmax(-1).gather(2, targets.unsqueeze(2)).squeeze(2)  # (N, T-1)
    return log_probs.masked_fill(targets == Vocabulary.pad_id, 0.0).sum(1)  # (N,)


def scst_loss(
    decoder: Decoder,
    features: torch.Tensor,
    references: list[list[str]],
    cider: CiderD,
    vocab: Vocabulary,
    num_samples: int = 5,
    max_length: int = 16,
    seed: int | None = None,
    learner: torch.nn.Module | None = None,
    reference_ids: list[list[int]] | None = None,
    reference_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SCST loss of a batch of images, and its mean rewards.

    features (B, P, D); references: each image's reference captions (raw text is fine:
    CiderD tokenises); seed makes the samples repeatable (None: fresh ones); learner: what
    re-scores the samples with gradient, `decoder` itself or its DistributedDataParallel
    wrapper (None: the decoder). reference_ids: with reference_weight > 0, the same number of
    reference captions per image as word ids (no <start>, no <end>), image i's after image
    i-1's, whose cross-entropy is added with that weight."""
    B, K = features.size(0), num_samples
    with torch.no_grad():
        memory = decoder.prepare(features)
        baseline = greedy(decoder, memory, max_length)  # B hypotheses
        samples = [h for hyps in sample(decoder, memory, K, max_length, seed=seed) for h in hyps]  # B*K, by image

    text = lambda hyps: [" ".join(vocab.decode(h.token_ids)) for h in hyps]
    sample_rewards = cider.scores(text(samples), [refs for refs in references for _ in range(K)])  # (B*K,)
    baseline_rewards = cider.scores(text(baseline), references)  # (B,)
    advantage = sample_rewards.reshape(B, K) - baseline_rewards[:, None]  # (B, K)

    refs = reference_ids if reference_ids and reference_weight > 0 else []
    C = len(refs) // B  # reference rows per image
    rows = [h.token_ids for h in samples]
    if C:  # one teacher-forced pass: each image's K samples, then its C references
        rows = [r for i in range(B) for r in rows[i * K : (i + 1) * K] + refs[i * C : (i + 1) * C]]
    rescorer = decoder if learner is None else learner
    log_probs = caption_log_probs(rescorer, features, rows, K + C).view(B, K + C)  # (B, K+C)
    advantage_t = torch.from_numpy(advantage).to(log_probs)  # (B, K), a constant
    loss = -(advantage_t * log_probs[:, :K]).mean()
    stats = {
        "sample_reward": float(np.mean(sample_rewards)),
        "greedy_reward": float(np.mean(baseline_rewards)),
        "sample_words": float(np.mean([len(h.token_ids) for h in samples])),
    }
    if C:
        words = sum(len(r) + 1 for r in refs)  # each caption's words and its <end>
        cross_entropy = -log_probs[:, K:].sum() / words
        loss = loss + reference_weight * cross_entropy
        stats["reference_cross_entropy"] = cross_entropy.item()
    return loss, stats
