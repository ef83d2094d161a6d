"""The `data` section of a config: the key every task shares, the image data sets' and the VQA data's (the engine's
sections are engine/config_sections.py, the whole experiment's schema and loader vistrain/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class VQASource:
    """One subset: ``path`` is a folder written by ``save_to_disk`` (a Dataset, or a DatasetDict whose
    ``split`` is taken), a folder of parquet files (split by file name, as on the Hub), or a parquet file or
    glob. A Dataset, file or glob is a single split: a ``split`` other than "train" is refused there.
    ``streaming`` reads it as an IterableDataset instead of memory-mapping it.

    Images may be Image features, image bytes, {bytes, path} dicts or paths; a relative path is read from
    the source's folder (``path`` itself if it is a folder, else the folder that holds it).
    """

    name: str
    path: str
    split: str = "train"
    streaming: bool = False


@dataclass
class VLMDataConfig(DataConfig):
    """Visual question answering data, for the VLM task."""

    name: str = "digits"  # digits (the embedded default, no download) | vqa (the_cauldron-shaped sources)
    sources: list[VQASource] = field(default_factory=list)  # data.name=vqa: training subsets
    val_sources: list[VQASource] = field(default_factory=list)  # held out; empty: val_size rows split off
    val_size: int = 256  # validation samples
    digits_image_size: int = 32
    seq_length: int = 1024  # tokens per packed row
    max_images_per_pack: int = 18
    max_image_size: int = 0  # long side in pixels, a multiple of the tile (vision.image_size); 0: 4 tiles
    pack_window: int = 4096  # samples packed together (a pure function of seed and position)
    chat_template: str = "chatml"  # chatml | tokenizer (the tokenizer's own); the smolvlm layout has SmolVLM's
    image_layout: str = ""  # vistrain | smolvlm (SmolVLM's prompt and tiling); "": model.init's, else vistrain
    min_ratings: dict[str, int] = field(default_factory=dict)  # the_cauldron rating column -> minimum
    cache_dir: Optional[str] = None  # per-sample lengths are computed once and cached here
