"""CIFAR-style residual networks and the built-in ``resnet20``.

:class:`CifarResNet` is the ResNet of He et al. (2016, §4.2) for 32x32 images: a 3x3 stem
convolution, stages of :class:`BasicBlock` (two 3x3 convolutions with BatchNorm and a
shortcut), the first stage at stride 1 and each later one halving H and W and doubling
the channels, then global average pooling and one Linear. Shortcuts that change the shape
are option A (:class:`SubsamplePadShortcut`: ``x[:, :, ::2, ::2]`` plus zero channels, no
parameters, as in the widely used PyTorch CIFAR ResNets) or option B (1x1 convolution +
BatchNorm).

``resnet20``: blocks (3, 3, 3), widths (16, 32, 64), option A, 3x32x32 input, 10 classes,
269,722 parameters. Without data (:func:`random_resnet20`) its weights are a seeded
Kaiming-normal init and its BatchNorms get seeded affine parameters and the running
statistics of seeded random images: a model for hardware benches, not a classifier. With
CIFAR-10 arrays (:func:`train_resnet20`) it is trained with SGD for a few epochs.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FloatNet
from hwgen.frontend.torch_import import from_module

CIFAR_SHAPE = (3, 32, 32)
RESNET20_EPOCHS = 5
RESNET20_LR = 0.1
RESNET20_BATCH = 128


class SubsamplePadShortcut(nn.Module):
    """Option-A shortcut: keep every second row and column, add zero channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                if stride != 2 or planes != 2 * in_planes:
                    raise ValueError("option A needs stride 2 and twice the channels")
                self.shortcut = SubsamplePadShortcut(planes // 4)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """Stem, ``blocks[i]`` BasicBlocks of ``widths[i]`` channels per stage, pool, Linear."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        in_channels: int = 3,
        num_classes: int = 10,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, planes = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(planes, width, stride, shortcut))
                planes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.linear(torch.flatten(out, 1))


def seeded_init(model: nn.Module, seed: int, in_shape: tuple[int, ...]) -> nn.Module:
    """Kaiming-normal weights, random BatchNorm affine parameters and running statistics
    measured on random images, all from one seed; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, generator=g)
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    nn.init.uniform_(m.bias, -bound, bound, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5, generator=g)
                nn.init.uniform_(m.bias, -0.2, 0.2, generator=g)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the statistics do not depend on the machine's core count
        try:
            model(torch.rand((32, *in_shape), generator=g))
        finally:
            torch.set_num_threads(threads)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def build_resnet20() -> CifarResNet:
    """The untrained ResNet-20 (PyTorch default init)."""
    return CifarResNet((3, 3, 3), (16, 32, 64), in_channels=3, num_classes=10, shortcut="A")


def random_resnet20(seed: int = 0) -> CifarResNet:
    """ResNet-20 with seeded random weights and BatchNorm statistics (module docstring)."""
    return seeded_init(build_resnet20(), seed, CIFAR_SHAPE)  # type: ignore[return-value]


def train_resnet20(
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = RESNET20_EPOCHS,
    seed: int = 0,
    batch_size: int = RESNET20_BATCH,
    progress: bool = True,
) -> CifarResNet:
    """ResNet-20 trained on CIFAR-10 style arrays (float NCHW ``x``, labels ``y``).

    SGD (momentum 0.9, weight decay 1e-4, learning rate 0.1 annealed to 0 on a cosine),
    cross-entropy, seeded init and shuffling; no augmentation. Uses torch's threads (a run
    is minutes per epoch on a laptop CPU), so the weights may differ in the last bits
    between machines. ``progress`` shows a transient progress bar.
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != CIFAR_SHAPE:
        raise HwgenError(f"resnet20 trains on (N, 3, 32, 32) images, not shape {x.shape}")
    if y.shape != (len(x),) or len(x) == 0 or y.min() < 0 or y.max() > 9:
        raise HwgenError(f"resnet20 needs {len(x)} labels in 0..9 to train, got shape {y.shape}")
    model = random_resnet20(seed)
    tx = torch.from_numpy(np.asarray(x, np.float32))
    ty = torch.from_numpy(np.asarray(y, np.int64))
    opt = torch.optim.SGD(
        model.parameters(), lr=RESNET20_LR, momentum=0.9, weight_decay=1e-4, nesterov=True
    )
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"training resnet20 on {len(x)} images", total=steps)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                opt.zero_grad()
                F.cross_entropy(model(tx[idx]), ty[idx]).backward()
                opt.step()
                sched.step()
                bar.advance(task)
    return model.eval()


def resnet20_float_net(train: tuple[np.ndarray, np.ndarray] | None = None) -> FloatNet:
    """ResNet-20 as a float graph: trained on ``train`` = (x, y) if given, else seeded random
    (cached per process)."""
    if train is None:
        return _random_resnet20_net()
    return from_module(train_resnet20(*train), CIFAR_SHAPE, name="resnet20")


@functools.lru_cache(maxsize=1)
def _random_resnet20_net() -> FloatNet:
    return from_module(random_resnet20(0), CIFAR_SHAPE, name="resnet20")
