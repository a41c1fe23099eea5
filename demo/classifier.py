"""A small CNN digit classifier (all 10 classes, 16x16 inputs in [-1, 1]).

It judges the demo's samples twice: its predicted label says whether a class-conditional sample
shows the right digit, and its penultimate features (:data:`FEATURE_DIM` values) feed the
Fréchet distance (:mod:`demo.fid`), the FID recipe with a digit network in place of Inception.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 32


class DigitClassifier(nn.Module):
    """``logits = net(x [B, 1, 16, 16])``; ``net.features(x)`` gives the [B, 32] penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def predict(classifier: DigitClassifier, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N], features [N, 32])`` of images ``x`` (clamped to the data range [-1, 1] first,
    as an image would be when saved)."""
    labels, feats = [], []
    for chunk in x.clamp(-1, 1).split(batch):
        f = classifier.features(chunk)
        feats.append(f)
        labels.append(classifier.head(f).argmax(1))
    return torch.cat(labels), torch.cat(feats)


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int = 1500, batch: int = 64, seed: int = 0, progress=None
) -> DigitClassifier:
    """Train from seed ``seed`` with AdamW and one-pixel random shifts (so small misalignments of
    generated digits do not decide their class)."""
    torch.manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(images.shape[0], (batch,), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(images[idx], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, float(loss))
    return net.eval()
