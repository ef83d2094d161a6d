"""Configuration of the image data sets shared by the GAN, VQ-VAE and VAR tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
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
    num_workers: int = 2  # loader worker processes per rank; 0 loads in the training process
