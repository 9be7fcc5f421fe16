"""ImageFolder-style data and the original recipes, for ``python -m slimops train``.

``DIR/train/<class>/*.jpg|png`` (and ``DIR/val/...``) with the original implementation's
recipe per model (JiahuiYu/slimmable_networks, apps/*_train_val.yml). torchvision is not a
dependency (its wheels do not import beside this project's pinned torch): the dataset reads
images with Pillow, and the transforms are torch ops on ``[3, H, W]`` tensors.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional

import torch

RECIPES = {
    "s_mobilenet_v1": dict(widths=(0.25, 0.5, 0.75, 1.0), lr=0.045, schedule="exp",
                           gamma=0.98, epochs=480, batch_size=160, weight_decay=1e-4,
                           crop_scale=0.25, image_size=224),
    "s_mobilenet_v2": dict(widths=(0.35, 0.5, 0.75, 1.0), lr=0.045, schedule="exp",
                           gamma=0.98, epochs=480, batch_size=160, weight_decay=1e-4,
                           crop_scale=0.25, image_size=224),
    "s_resnet50": dict(widths=(0.25, 0.5, 0.75, 1.0), lr=0.1, schedule="multistep",
                       milestones=(30, 60, 90), gamma=0.1, epochs=100, batch_size=256,
                       weight_decay=1e-4, crop_scale=0.08, image_size=224),
    "s_shufflenet": dict(widths=(0.5, 1.0, 2.0), lr=0.5, schedule="linear", epochs=250,
                         batch_size=1024, weight_decay=1e-4, crop_scale=0.25, image_size=224),
    "slim_cnn": dict(widths=(0.25, 0.5, 0.75, 1.0), lr=0.1, schedule="linear", epochs=30,
                     batch_size=64, weight_decay=1e-4, crop_scale=0.25, image_size=32),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files as ``(transform(image), class index)``; classes are
    the sorted sub-directory names (or ``classes``, to give a val split the train split's
    indices). Images load with Pillow as RGB ``uint8`` tensors ``[3, H, W]``."""

    def __init__(self, root: str, transform=None, classes: Optional[List[str]] = None) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such directory: {root}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{root}: class {unknown[0]!r} is not among the training "
                                 f"classes ({len(classes)})")
        if not classes:
            raise ValueError(f"{root}: no class sub-directories (expected {root}/<class>/*.jpg)")
        self.root, self.classes, self.transform = root, list(classes), transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[tuple] = []
        for c in self.classes:
            folder = os.path.join(root, c)
            if not os.path.isdir(folder):
                continue
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
        if not self.samples:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import numpy as np
        from PIL import Image

        path, target = self.samples[index]
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)  # uint8 [3, H, W]
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _uniform(a: float, b: float) -> float:
    return float(torch.empty(()).uniform_(a, b))


def _resize(img: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (antialiased) resize of a float ``[C, H, W]`` to ``size`` (h, w)."""
    import torch.nn.functional as F

    return F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h <= w:
        return _resize(img, (size, max(1, round(w * size / h))))
    return _resize(img, (max(1, round(h * size / w)), size))


def _center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h < size or w < size:
        img = _resize_shorter(img, size)
        h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def _random_crop_box(h: int, w: int, scale, ratio=(3 / 4, 4 / 3)):
    """A random box of ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform);
    after 10 failed draws, the central box of the nearest allowed aspect ratio."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = h * w * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            return top, left, ch, cw
    if w / h < ratio[0]:
        cw, ch = w, min(h, round(w / ratio[0]))
    elif w / h > ratio[1]:
        ch, cw = h, min(w, round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


class TrainTransform:
    """The original's training augmentation on tensors: a random crop of ``crop_scale``
    to 1 of the area (aspect 3/4 to 4/3) resized to ``size``; brightness, contrast and
    saturation jitter (factors uniform in ``1 ± jitter``, in random order); a horizontal
    flip with probability 1/2; ImageNet mean/std normalisation. (The original also adds
    PCA lighting noise, but to uint8 pixels, where its increments of about ±0.02 round
    away; it is left out.)"""

    def __init__(self, size: int, crop_scale: float, jitter: float = 0.4) -> None:
        self.size, self.scale, self.jitter = size, (crop_scale, 1.0), jitter
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        img = image.float().div_(255)
        top, left, h, w = _random_crop_box(img.shape[1], img.shape[2], self.scale)
        img = _resize(img[:, top:top + h, left:left + w], (self.size, self.size))
        if self.jitter > 0:
            lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
            for op in torch.randperm(3).tolist():
                f = _uniform(lo, hi)
                if op == 0:  # brightness
                    img = img * f
                elif op == 1:  # contrast: towards the mean gray level
                    img = (img - _gray(img).mean()) * f + _gray(img).mean()
                else:  # saturation: towards the gray image
                    g = _gray(img)
                    img = (img - g) * f + g
                img = img.clamp_(0, 1)
        if bool(torch.rand(()) < 0.5):
            img = img.flip(-1)
        return (img - self.mean) / self.std


class ValTransform:
    """Resize the shorter side to ``size / 0.875`` (256 for 224), center-crop ``size``,
    normalise."""

    def __init__(self, size: int) -> None:
        self.size, self.resize = size, int(round(size / 0.875))
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        img = _center_crop(_resize_shorter(image.float().div_(255), self.resize), self.size)
        return (img - self.mean) / self.std


def make_scheduler(optimizer, recipe: dict, epochs: int, steps_per_epoch: int):
    """``(scheduler, interval)`` of the recipe: ``exp``: ×gamma per epoch; ``multistep``:
    ×gamma at each milestone epoch; ``linear``: from lr to 0 over all steps, per step."""
    kind = recipe["schedule"]
    if kind == "exp":
        gamma = recipe["gamma"]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: gamma ** e), "epoch"
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, list(recipe["milestones"]), recipe["gamma"]), "epoch"
    total = max(1, epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / total)), "step"
