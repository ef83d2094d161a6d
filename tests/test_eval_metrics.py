"""Image metrics of `vistrain eval`: detector loading, reference statistics, FID / KID / IS / precision-recall.

The real detector (the 2015 FID Inception, ~90 MB) is not used here: a tiny TorchScript stand-in with the same
interface (uint8 N x 3 x H x W in, any size, `return_features=True` -> N x D features, without it -> class
logits) is saved to a file and loaded by path, through the same code path as the Inception.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from support.standin_detector import TwoHeaded, save_scripted
from vistrain.engine.dist import DistContext
from vistrain.errors import ConfigError
from vistrain.eval import detector as detector_mod
from vistrain.eval.detector import load_detector
from vistrain.eval.frechet import frechet_distance
from vistrain.eval.image_metrics import compute_image_metrics, precision_recall
from vistrain.eval.stats import RefStats, load_stats, reference_features

pytestmark = pytest.mark.usefixtures("one_thread")


class OneHeaded(nn.Module):
    """Features only, no keyword: the detector must not pass `return_features`, and IS must be refused."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1) @ self.proj


@pytest.fixture
def det_path(tmp_path):
    return save_scripted(TwoHeaded(), tmp_path / "standin.pt")


def make_images(n: int, seed: int, shift: int = 0, size: int = 32) -> Tensor:
    """Smooth random uint8 images: 4 x 4 random colours upsampled, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 200 + 20
    images = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    images = images + torch.randn(images.shape, generator=g) * 5 + shift
    return images.round().clamp(0, 255).to(torch.uint8)


def batches(images: Tensor, size: int = 16):
    return iter(images.split(size))


def write_pngs(folder, images: Tensor) -> None:
    for i, img in enumerate(images):
        sub = folder / f"part{i % 2}"  # nested folders: the reference is searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(sub / f"{i:04d}.png")


def test_a_set_against_itself_scores_zero_and_a_shifted_set_does_not(det_path):
    det = load_detector(det_path)
    assert det.num_features == 16 and det.can_classify
    real = make_images(160, seed=0)
    ref = RefStats.from_features(det.features(real).numpy())
    same = compute_image_metrics(["fid", "kid"], batches(real), ref, det)
    shifted = compute_image_metrics(["fid", "kid"], batches(make_images(160, seed=1, shift=40)), ref, det)
    scale = float(np.trace(ref.sigma))
    assert abs(same["fid"]) < 1e-3 * scale
    assert shifted["fid"] > 0.5 * scale and shifted["fid"] > 1e4 * max(abs(same["fid"]), 1e-12)
    # KID's unbiased estimate of the same set is ~0 (slightly negative: its cross term includes each point with
    # itself); a shifted set's is far above it
    assert abs(same["kid_mean"]) < 0.01 * shifted["kid_mean"]
    # torchmetrics' FID (seeded from the features) agrees with the formula implemented independently here
    fake = det.features(make_images(160, seed=1, shift=40))
    assert shifted["fid"] == pytest.approx(frechet_distance(fake, torch.from_numpy(ref.features)), rel=1e-6)


def test_fid_from_statistics_only_equals_fid_from_the_images(det_path, tmp_path):
    det = load_detector(det_path)
    folder = tmp_path / "real"
    write_pngs(folder, make_images(64, seed=2))
    from_images = reference_features(str(folder), det, batch_size=16, cache_dir=str(tmp_path / "cache"))
    assert from_images.features is not None and from_images.count == 64
    npz = tmp_path / "real_stats.npz"
    from_images.save_stats(str(npz), with_features=False)
    stats_only = reference_features(str(npz), det, batch_size=16)
    assert stats_only.features is None and stats_only.count == 64

    fake = make_images(48, seed=3, shift=10)
    a = compute_image_metrics(["fid"], batches(fake), from_images, det)["fid"]
    b = compute_image_metrics(["fid"], batches(fake), stats_only, det)["fid"]
    assert a > 0 and b == pytest.approx(a, rel=1e-9)
    # KID and precision/recall need the features themselves: refused up front, naming the file
    for metric in ("kid", "pr"):
        with pytest.raises(ConfigError, match="real_stats.npz.*fid alone"):
            compute_image_metrics([metric], batches(fake), stats_only, det)


def test_a_reference_folder_is_read_once_then_from_the_cache(det_path, tmp_path, monkeypatch):
    det = load_detector(det_path)
    folder, cache = tmp_path / "real", tmp_path / "cache"
    write_pngs(folder, make_images(20, seed=4))
    first = reference_features(str(folder), det, batch_size=8, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 1

    def no_detector(images):
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(det, "features", no_detector)
    second = reference_features(str(folder), det, batch_size=8, cache_dir=str(cache))
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    monkeypatch.undo()

    # a new image is a new reference: a second cache entry, with one more row
    Image.fromarray(make_images(1, seed=5)[0].permute(1, 2, 0).numpy()).save(folder / "extra.png")
    third = reference_features(str(folder), det, batch_size=8, cache_dir=str(cache))
    assert third.count == 21 and len(list(cache.glob("*.npz"))) == 2
    assert reference_features(str(folder), det, batch_size=8, cache_dir=str(cache), num=5).count == 5
    # images of another size: refused without a resolution, resized with one
    Image.fromarray(make_images(1, seed=6, size=48)[0].permute(1, 2, 0).numpy()).save(folder / "big.png")
    with pytest.raises(ConfigError, match="big.png.*resolution"):
        reference_features(str(folder), det, batch_size=8, cache_dir=str(cache))
    assert reference_features(str(folder), det, batch_size=8, cache_dir=str(cache), resolution=32).count == 22


def test_precision_recall_on_point_sets_with_known_answers():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])

    def clusters(which, per, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([centres[i] + torch.randn(per, 2, generator=gen) for i in which])

    real = clusters(range(4), 200, seed=1)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far_away = torch.randn(300, 2, generator=g) + 1000.0
    assert precision_recall(real, far_away) == (0.0, 0.0)
    # fresh samples of half the modes: all realistic, half the variety
    precision, recall = precision_recall(real, clusters([0, 3], 400, seed=2))
    assert precision > 0.95 and 0.45 < recall <= 0.5


def _rank_worker(rank: int, world: int, tmp: str, det_file: str, ref_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, 0, torch.device("cpu"), dist.group.WORLD)
        det = load_detector(det_file)
        ref = load_stats(ref_file, det)
        shard = make_images(125, seed=8, shift=15)[rank::world]  # interleaved and uneven: 63 and 62 images
        out = compute_image_metrics(["fid", "kid", "is", "pr"], batches(shard, 10), ref, det, ctx)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_the_same_as_one(det_path, tmp_path):
    det = load_detector(det_path)
    ref = RefStats.from_features(det.features(make_images(100, seed=7)).numpy(), detector=det.identity)
    ref_file = str(tmp_path / "ref.npz")
    ref.save_stats(ref_file)
    one = compute_image_metrics(["fid", "kid", "is", "pr"], batches(make_images(125, seed=8, shift=15), 32), ref, det)
    assert set(one) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert 1.0 < one["is_mean"] < 10.0  # between 1 and the number of classes

    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path), det_path, ref_file), nprocs=2, join=True)
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two.keys() == one.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key


def test_without_a_detector_path_or_network_the_error_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir().startswith(str(tmp_path))
    calls = []

    def offline(url, dst, progress=True):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match=r"eval\.detector=PATH.*--detector PATH"):
        load_detector(None)
    assert calls == [detector_mod.INCEPTION_URL]
    assert not os.path.exists(detector_mod.default_detector_path())
    with pytest.raises(ConfigError, match="downloading is off"):
        load_detector(None, download=False)


def test_a_downloaded_detector_lands_in_the_torch_hub_cache(det_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=True: __import__("shutil").copyfile(det_path, dst))
    det = load_detector(None)
    assert os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", "inception-2015-12-05.pt"))
    assert det.num_features == 16
    assert load_detector(None, download=False).identity == det.identity  # now read from the cache


def test_bad_detector_files_and_settings_are_named(det_path, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.detector / --detector: .*nowhere\.pt does not exist"):
        load_detector(str(tmp_path / "nowhere.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"<html>not a network</html>")
    with pytest.raises(ConfigError, match=r"eval\.detector / --detector: cannot load .*junk\.pt"):
        load_detector(str(junk))
    class TakesFloats(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.conv2d(x, torch.ones(4, 3, 3, 3)).mean((2, 3))  # a uint8 input fails in conv2d

    with pytest.raises(ConfigError, match=r"eval\.detector / --detector: .*floats\.pt does not map uint8"):
        load_detector(save_scripted(TakesFloats(), tmp_path / "floats.pt"))
    det = load_detector(det_path)
    ref = RefStats.from_features(det.features(make_images(20, seed=9)).numpy())
    with pytest.raises(ConfigError, match="unknown metric.*'fdi'.*fid, kid, is, pr"):
        compute_image_metrics(["fid", "fdi"], batches(make_images(4, seed=9)), ref, det)
    one_headed = load_detector(save_scripted(OneHeaded(), tmp_path / "one.pt"))
    assert one_headed.num_features == 16 and not one_headed.can_classify
    with pytest.raises(ConfigError, match="'is' needs class logits"):
        compute_image_metrics(["is"], batches(make_images(20, seed=9)), None, one_headed)
    with pytest.raises(ConfigError, match="16 features.*gives 8"):
        compute_image_metrics(["fid"], batches(make_images(4, seed=9)), ref,
                              load_detector(save_scripted(OneHeaded(dim=8), tmp_path / "eight.pt")))


def test_the_detector_is_a_feature_module_torchmetrics_accepts(det_path):
    """torchmetrics' contract for `feature=`: an nn.Module mapping what update() gets to N x D, with an int
    `num_features` (else it probes the width with a random uint8 1 x 3 x 299 x 299 image)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    det = load_detector(det_path)
    real, fake = make_images(64, seed=10), make_images(64, seed=11, shift=20)
    fid = FrechetInceptionDistance(feature=det)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ref = RefStats.from_features(det.features(real).numpy())
    ours = compute_image_metrics(["fid"], batches(fake), ref, det)["fid"]
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-6)
