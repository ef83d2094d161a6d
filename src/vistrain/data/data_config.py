"""The `data` section of a config: the key every task shares and the image data sets' keys (the engine's
sections are engine/config_sections.py, the whole experiment's schema and loader vistrain/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """`data.*` keys every task has; a task's own data section extends this one."""

    num_workers: int = 2  # loader worker processes per rank; 0 loads in the training process


@dataclass
class ImageDataConfig(DataConfig):
    """Labelled image data sets, for the GAN, VQ-VAE and VAR tasks."""

    name: str = "digits"  # digits | image_folder
    # image_folder: a folder of class sub-folders (ImageNet layout: root/<class>/**/<image>) or a flat
    # folder of images (unconditional, every label 0).
    root: Optional[str] = None
    # image_folder: a separate validation folder with the same class sub-folders; when unset, validation
    # reads `root` again with the validation transform (centre crop, no flip).
    val_root: Optional[str] = None
    resolution: int = 32  # square output side in pixels
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    hflip: bool = False  # random horizontal flip in training only
