"""Data sets and loaders: values, labels, bad files, clear errors, and reproducible loading."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.data.data_config import ImageDataConfig
from vistrain.data.digits import DigitsDataset, _split_indices
from vistrain.data.images import ImageFolderDataset
from vistrain.data.loader import MicroBatchStream, build_image_dataset, check_enough_data
from vistrain.data.sampler import StreamOrder


@pytest.fixture(scope="module")
def digits_train():
    return DigitsDataset("train", resolution=16, channels=3, hflip=True)


@pytest.fixture(scope="module")
def digits_val():
    return DigitsDataset("val", resolution=16, channels=1)


def save_png(path, rgb_HW3: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_HW3.astype(np.uint8), "RGB").save(path)


def solid(color, h=8, w=12) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()


# ----------------------------------------------------------------------------------------------- digits


def test_digits_values_shapes_and_balanced_fixed_split(digits_train, digits_val):
    assert (len(digits_train), len(digits_val)) == (1617, 180)
    item = digits_train[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert torch.equal(item["image"][0], item["image"][2])  # grey replicated to RGB
    assert digits_val[0]["image"].shape == (1, 16, 16)
    x = torch.stack([digits_val[i]["image"] for i in range(len(digits_val))])
    assert x.min() == -1.0 and x.max() > 0.9 and x.max() <= 1.0
    assert (x[:, 0, 0, 0] == -1.0).float().mean() > 0.95  # the background (corners) is -1
    labels = torch.stack([digits_val[i]["label"] for i in range(len(digits_val))])
    assert torch.bincount(labels).tolist() == [18] * 10
    assert digits_train.num_classes == 10 and digits_val.channels == 1 and digits_val.resolution == 16


def test_digits_split_is_disjoint_and_independent_of_global_seed():
    labels = torch.as_tensor(np.repeat(np.arange(10), 30))
    torch.manual_seed(0)
    val = _split_indices(labels, "val")
    torch.manual_seed(123)
    assert torch.equal(val, _split_indices(labels, "val"))
    train = _split_indices(labels, "train")
    assert sorted(torch.cat([val, train]).tolist()) == list(range(300))


def test_digits_flip_comes_from_the_sample_seed_only(digits_train):
    plain = digits_train[5]["image"]
    state = torch.get_rng_state()
    outs = [digits_train[(5, s)]["image"] for s in range(20)]
    assert torch.equal(state, torch.get_rng_state())
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, plain) for f, o in zip(flipped, outs))
    assert 0 < sum(flipped) < 20
    assert all(torch.equal(digits_train[(5, s)]["image"], outs[s]) for s in range(20))


# ----------------------------------------------------------------------------------------- image folder


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "train"
    save_png(root / "red" / "a.png", solid((255, 0, 0)))
    save_png(root / "red" / "b.png", solid((255, 0, 0)))
    save_png(root / "blue" / "deep" / "c.PNG", solid((0, 0, 255)))  # recursive, upper-case extension
    (root / "blue" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_by_sorted_class_name_and_maps_colours(class_folder):
    ds = ImageFolderDataset(str(class_folder), resolution=8, train=False)
    assert ds.num_classes == 2 and ds.classes == ["blue", "red"] and len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [int(it["label"]) for it in items] == [0, 1, 1]
    blue = items[0]["image"]
    assert blue.shape == (3, 8, 8)
    assert torch.allclose(blue[2], torch.ones(8, 8)) and torch.allclose(blue[:2], -torch.ones(2, 8, 8))
    grey = ImageFolderDataset(str(class_folder), resolution=4, channels=1)[1]["image"]
    assert grey.shape == (1, 4, 4) and abs(float(grey.mean()) - (76 / 127.5 - 1)) < 0.02  # luma of red


def test_random_crop_and_flip_follow_the_sample_seed(tmp_path):
    ramp = np.zeros((8, 32, 3), dtype=np.uint8)
    ramp[:, :, 0] = np.arange(32)[None, :] * 8  # red increases left to right
    save_png(tmp_path / "flat" / "ramp.png", ramp)
    train = ImageFolderDataset(str(tmp_path / "flat"), resolution=8, train=True, hflip=True)
    crops = [train[(0, s)]["image"][0] for s in range(30)]
    assert all(torch.equal(train[(0, s)]["image"][0], crops[s]) for s in range(30))  # reproducible
    lefts = {round((float(c.min()) + 1) * 127.5) // 8 for c in crops}  # the crop's leftmost column
    assert len(lefts) > 5 and lefts <= set(range(25))  # many crop positions, all inside the image
    assert any(c[0, 0] > c[0, -1] for c in crops) and any(c[0, 0] < c[0, -1] for c in crops)  # flips both ways
    val = ImageFolderDataset(str(tmp_path / "flat"), resolution=8, train=False, hflip=True)
    centre = val[(0, 3)]["image"][0]
    assert torch.equal(centre, val[(0, 4)]["image"][0])
    assert round((float(centre[0, 0]) + 1) * 127.5) == 12 * 8  # columns 12..19 of 32, not flipped


def test_flat_folder_is_unconditional(tmp_path):
    for k in range(3):
        save_png(tmp_path / f"{k}.jpg", solid((k * 50, 0, 0)))
    ds = ImageFolderDataset(str(tmp_path), resolution=8)
    assert ds.num_classes == 0 and len(ds) == 3
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 0, 0]


def test_unreadable_image_is_skipped_with_a_warning_naming_it(class_folder):
    (class_folder / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = ImageFolderDataset(str(class_folder), resolution=8, train=False)
    assert len(ds) == 4  # blue/broken.png, blue/deep/c.PNG, red/a.png, red/b.png
    with pytest.warns(UserWarning, match="broken.png"):
        item = ds[0]
    assert ds.num_skipped == 1
    assert torch.equal(item["image"], ds[1]["image"])  # replaced by the next readable image


def test_only_unreadable_images_gives_a_clear_error(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(b"junk")
    ds = ImageFolderDataset(str(tmp_path), resolution=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="could not be read"):
            ds[0]


def test_empty_or_missing_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no images.*png"):
        ImageFolderDataset(str(tmp_path), resolution=8)
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        ImageFolderDataset(str(tmp_path / "nowhere"), resolution=8)


def test_separate_val_folder_keeps_training_labels(class_folder, tmp_path):
    save_png(tmp_path / "val" / "red" / "v.png", solid((255, 0, 0)))
    cfg = ImageDataConfig(name="image_folder", root=str(class_folder), val_root=str(tmp_path / "val"), resolution=8)
    val = build_image_dataset(cfg, "val")
    assert val.classes == ["blue", "red"] and int(val[0]["label"]) == 1


# ------------------------------------------------------------------------------------------ build/check


def test_build_dataset_errors_name_the_key():
    with pytest.raises(ValueError, match="digits, image_folder"):
        build_image_dataset(ImageDataConfig(name="cifar"), "train")
    with pytest.raises(ValueError, match="data.root"):
        build_image_dataset(ImageDataConfig(name="image_folder"), "train")


def test_too_few_images_for_one_global_batch(digits_val):
    check_enough_data(digits_val, 180, "data (val)")
    with pytest.raises(ValueError, match=r"data \(val\) has 180 items.*train.batch_size=256"):
        check_enough_data(digits_val, 256, "data (val)")


# ---------------------------------------------------------------------------------------------- loaders


def first_batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_train_stream_same_batches_with_workers_resume_and_no_global_rng(digits_train):
    state = torch.get_rng_state()

    def make(workers, rank=1):
        order = StreamOrder(len(digits_train), seed=4)
        return MicroBatchStream(digits_train, order, 4, rank=rank, world_size=2, num_workers=workers)

    ref = first_batches(make(0), 5)
    assert ref[0]["image"].shape == (4, 3, 16, 16)
    assert_same_batches(ref, first_batches(make(2), 5))
    resumed = make(0)
    resumed.load_state_dict({"position": 3 * 8})
    assert_same_batches(ref[3:], first_batches(resumed, 2))
    assert torch.equal(state, torch.get_rng_state())
    other_rank = first_batches(make(0, rank=0), 1)
    assert not torch.equal(other_rank[0]["image"], ref[0]["image"])
