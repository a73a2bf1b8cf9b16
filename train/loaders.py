"""DataLoaders whose augmentations depend on (seed, epoch, sample) only.

The sampler yields ``epoch * n + index`` instead of ``index``; the dataset decodes that and
seeds the albumentations pipeline with a hash of (seed, epoch, index) before transforming.
So every sample gets its own draw whatever worker or process loads it, successive epochs
differ, and a run resumed mid-epoch sees exactly the augmentations an uninterrupted run
would have seen, which worker-level reseeding alone cannot give.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class EpochSampler(Sampler[int]):
    """A shuffled permutation per epoch, the same on every process, encoded with its epoch."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = range(self.num_samples)
        base = self.epoch * self.num_samples
        return iter(base + i for i in order)


class SeededAugmentDataset(Dataset):
    """Decode ``epoch * n + index`` and seed the wrapped dataset's transform for that sample."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.dataset))
        self.dataset.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def create_train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    """Shuffled, augmented training loader (drop_last keeps Mixup's even batches)."""
    return DataLoader(
        SeededAugmentDataset(dataset, seed),
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, shuffle=True),
        num_workers=num_workers,
        drop_last=len(dataset) >= batch_size,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Worker base seeds come from this generator, not the global RNG, so creating an
        # iterator (e.g. after a resume) does not shift the model's random stream.
        generator=torch.Generator().manual_seed(seed),
    )
