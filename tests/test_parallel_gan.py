"""The engine's parallel options on networks like a GAN's. train.channels_last: the trainable networks and the
image batches really are channels_last, a few steps give the default's numbers to float rounding, and a resumed
run stays bit-identical. train.compile=blocks: blocks that all differ each keep a compiled graph."""

import json
import re

import pytest
import torch
from torch import nn

from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.config_sections import TrainConfig
from vistrain.engine.dist import DistContext
from vistrain.engine.parallel import Parallel
from vistrain.registry import make_trainer

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("one_thread")  # the same kernels in every run: bit-exact resume


def resnet_gan(out_dir, *overrides):
    return load_config(None, [
        "task=gan", f"run.out_dir={out_dir}", "run.loggers=[jsonl]", "train.max_steps=4", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=100", "train.ckpt_every=2", "train.keep_last=0",
        "data.num_workers=0", "data.resolution=16", "model.generator.name=resnet",
        "model.discriminator.name=resnet", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
        "gan.num_samples=8", "gan.fd_samples=16", *overrides,
    ])


def final_weights(out_dir):
    return ckpt_lib.load_weights(ckpt_lib.latest_checkpoint(out_dir / "checkpoints"))


def channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()  # not both, as 1x1 is


def conv_kernels(net: nn.Module) -> list[torch.Tensor]:
    """3x3 kernels as parameters (spectral norm's `original`: reading `weight` would run a power iteration)."""
    return [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def logged(out_dir, key: str) -> list[float]:
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [e[key] for e in events if e.get("split") == "train"]


def test_networks_and_images_are_channels_last_and_train_as_the_default(tmp_path):
    make_trainer(resnet_gan(tmp_path / "plain"), CPU).fit()
    trainer = make_trainer(resnet_gan(tmp_path / "cl", "train.channels_last=true"), CPU)
    nets = trainer.task.nets
    assert all(channels_last(w) for w in conv_kernels(nets["G"]) + conv_kernels(nets["D"]))
    assert not any(channels_last(w) for w in conv_kernels(nets["G_ema"]))  # frozen: left as it is
    seen = []  # D's inputs: the reals of the batch (with G's fakes) as the engine delivers them
    nets["D"].register_forward_pre_hook(lambda _m, args: seen.append(channels_last(args[0])))
    trainer.fit()
    assert seen and all(seen)

    # NHWC kernels sum in another order: every step's losses and logits are the default's to rounding ...
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert logged(tmp_path / "cl", key) == pytest.approx(logged(tmp_path / "plain", key), rel=1e-4, abs=1e-6)
    # ... and so are the weights, except the biases of G's convolutions that a BatchNorm follows (and the running
    # means that track them): BatchNorm subtracts them again, so their gradient is rounding noise, which Adam's
    # first steps scale to +-lr whatever its size, in either layout (and which changes no output).
    ours, theirs = final_weights(tmp_path / "cl"), final_weights(tmp_path / "plain")
    assert ours.keys() == theirs.keys()
    cancelled = re.compile(r"G(_ema)?\.((fc|blocks\.\d+\.(conv1|conv2|shortcut))\.bias|.*\.running_mean)")
    compared = [key for key in ours if not cancelled.fullmatch(key)]
    for key in compared:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_channels_last_run_resumes_bit_identically(tmp_path):
    make_trainer(resnet_gan(tmp_path / "a", "train.channels_last=true"), CPU).fit()
    middle = tmp_path / "a" / "checkpoints" / "step_00000002"
    make_trainer(resnet_gan(tmp_path / "b", "train.channels_last=true", f"run.resume={middle}"), CPU).fit()
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Widen(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width + 1)

    def forward(self, x):
        return torch.relu(self.linear(x))


def test_per_block_compile_keeps_a_graph_for_each_of_many_different_blocks(monkeypatch):
    """torch.compile keeps 8 graphs per function by default and runs the rest eagerly: a 256 px GAN has 12 blocks'
    worth per network. Ten blocks of ten widths share one forward and must all run compiled."""
    from torch._dynamo import config
    from torch._dynamo.utils import counters

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager", **kw))
    net = nn.Module()
    net.blocks = nn.Sequential(*(Widen(width) for width in range(1, 11)))
    # torch's default, restored after the test by the config's own patch (monkeypatch's undo would delete the key
    # from torch's config module, and every later compile in this process would fail)
    with config.patch(recompile_limit=8):
        Parallel({"net": net}, ("net",), TrainConfig(compile="blocks"), CPU)
        before = counters["stats"]["unique_graphs"]
        net.blocks(torch.randn(2, 1)).sum().backward()
        assert counters["stats"]["unique_graphs"] - before == 10
