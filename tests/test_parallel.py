"""Parallelism from outside the models: the global-batch gradient with uneven micro-batches, FSDP2 against
DDP, accumulation without a reduction per micro-batch, sharded checkpoints resumed on another number of
ranks, and compile / activation checkpointing per block. torchrun with gloo on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.engine_checks import capture_gradients
from support.toy_task import MLP, PairsDataset
from vistrain.config import load_config
from vistrain.data.sampler import StreamOrder
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.engine.rng import seed_everything
from vistrain.registry import make_trainer

TESTS = Path(__file__).resolve().parent
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# No dropout: runs on different numbers of ranks draw different random streams, and only the data and the
# arithmetic should matter here.
TOY = ["task=support.toy_task", "toy.dropout=0.0", "train.batch_size=16", "train.log_every=2", "train.eval_every=100",
       "train.ckpt_every=2", "train.keep_last=0", "data.num_workers=0", "run.loggers=[]", "train.grad_clip=1.0"]


def torchrun(args, env, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train(out_dir, env, *overrides, nproc=1):
    args = ["-m", "vistrain", "train", str(TESTS / "support" / "toy.yaml"), f"run.out_dir={out_dir}", *TOY, *overrides]
    if nproc > 1:
        return torchrun(args, env, nproc)
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(out_dir, step):
    return load_file(out_dir / "checkpoints" / ckpt_lib.step_dir_name(step) / "model.safetensors")


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=2e-5, atol=2e-6, msg=key)


def reference_gradient(keep, world, micro):
    """The gradient of the mean loss over exactly the samples the engine's micro-batches kept."""
    seed_everything(0)
    net = MLP(dropout=0.0)
    data = PairsDataset()
    order = StreamOrder(len(data), seed=0)
    per_rank = len(keep) // world
    xs, ys = [], []
    for rank in range(world):
        for i in range(per_rank):  # global micro-batch i covers positions [i*micro*world, ...)
            keys = order.keys(i * micro * world + rank * micro, micro)[: keep[rank * per_rank + i]]
            xs += [data[k]["x"] for k in keys]
            ys += [data[k]["y"] for k in keys]
    loss = (net(torch.stack(xs)) - torch.stack(ys)).square().mean()
    return dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))


def test_uneven_micro_batches_give_the_gradient_of_the_whole_batch_on_one_rank(tmp_path):
    keep = [3, 5]  # two micro-batches of 8 samples keep 3 and 5: 8 in all
    cfg = load_config(None, [*TOY, f"run.out_dir={tmp_path}", "train.max_steps=1", "train.micro_batch_size=8",
                             "train.grad_clip=0", f"toy.keep={keep}"])
    trainer = make_trainer(cfg, CPU)
    grads = capture_gradients(trainer)
    trainer.fit()
    expected = reference_gradient(keep, world=1, micro=8)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_uneven_micro_batches_give_the_gradient_of_the_whole_batch_on_two_ranks(tmp_path, subprocess_env, parallel):
    keep = [1, 2, 4, 1]  # rank 0 keeps 1 + 2 samples, rank 1 keeps 4 + 1
    torchrun([str(TESTS / "support" / "engine_checks.py"), "grads", str(tmp_path), *TOY, "train.max_steps=1",
              "train.micro_batch_size=4", "train.grad_clip=0", f"toy.keep={keep}", f"train.parallel={parallel}"],
             subprocess_env)
    expected = reference_gradient(keep, world=2, micro=4)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads_rank{rank}.pt")
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=f"{name} rank {rank}")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The same toy run on 2 ranks with DDP and with FSDP (accumulation 2, clipping on), 8 steps."""
    from conftest import subprocess_env_for

    env = subprocess_env_for()
    root = tmp_path_factory.mktemp("two_ranks")
    for parallel in ("ddp", "fsdp"):
        train(root / parallel, env, "train.max_steps=8", "train.micro_batch_size=4", f"train.parallel={parallel}",
              nproc=2)
    return root


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_saves_shards_per_rank(two_rank_runs):
    assert_close(weights(two_rank_runs / "ddp", 8), weights(two_rank_runs / "fsdp", 8))
    shards = two_rank_runs / "fsdp" / "checkpoints" / "step_00000008" / "train_state"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (two_rank_runs / "ddp" / "checkpoints" / "step_00000008" / "train_state").exists()


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_ranks_resumes_on_one(two_rank_runs, tmp_path, subprocess_env):
    middle = two_rank_runs / "fsdp" / "checkpoints" / "step_00000004"
    result = train(tmp_path, subprocess_env, "train.max_steps=8", "train.micro_batch_size=4",
                   "train.parallel=fsdp", f"run.resume={middle}")
    assert "saved with 2 ranks, now 1" in result.stdout
    assert_close(weights(two_rank_runs / "fsdp", 8), weights(tmp_path, 8))


@pytest.mark.slow
def test_fsdp_checkpoint_of_one_rank_resumes_on_two(tmp_path, subprocess_env):
    train(tmp_path / "one", subprocess_env, "train.max_steps=8", "train.micro_batch_size=4", "train.parallel=fsdp")
    middle = tmp_path / "one" / "checkpoints" / "step_00000004"
    train(tmp_path / "two", subprocess_env, "train.max_steps=8", "train.micro_batch_size=4",
          "train.parallel=fsdp", f"run.resume={middle}", nproc=2)
    assert_close(weights(tmp_path / "one", 8), weights(tmp_path / "two", 8))


@pytest.mark.slow
def test_fsdp_accumulation_reduces_gradients_once_per_step(tmp_path, subprocess_env):
    steps, accumulation, fsdp_groups = 3, 4, 3  # the MLP's two blocks and its root are sharded separately
    torchrun([str(TESTS / "support" / "engine_checks.py"), "reductions", str(tmp_path), *TOY,
              f"train.max_steps={steps}", "train.micro_batch_size=2", "train.parallel=fsdp"], subprocess_env)
    for rank in range(2):
        counted = json.loads((tmp_path / f"reductions_rank{rank}.json").read_text())["reduce_scatters"]
        assert counted == steps * fsdp_groups, f"{counted} reduce-scatters for {steps} steps x {accumulation} micro"


@pytest.mark.slow
def test_activation_checkpointing_and_per_block_compile_train_like_the_plain_model(tmp_path):
    def final(name, *overrides):
        cfg = load_config(None, [*TOY, f"run.out_dir={tmp_path / name}", "train.max_steps=4",
                                 "toy.dropout=0.1", *overrides])
        make_trainer(cfg, CPU).fit()
        return weights(tmp_path / name, 4)

    plain = final("plain")
    # Recomputation replays the dropout masks (the RNG state is stashed): exactly the same numbers.
    checkpointed = final("ac", "train.activation_checkpointing=true")
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    # Compiled dropout draws from another generator, so compare without it.
    eager = final("eager", "toy.dropout=0.0")
    compiled = final("compiled", "toy.dropout=0.0", "train.compile=blocks", "train.activation_checkpointing=true")
    assert compiled.keys() == eager.keys()  # no _orig_mod / checkpoint-wrapper prefixes in the weights
    assert_close(eager, compiled)


@pytest.mark.slow
def test_a_network_frozen_in_one_phase_trains_in_the_next_under_fsdp(tmp_path, subprocess_env):
    """The GAN's G runs under no_grad in D's phase and is trained in its own: FSDP must give it gradients
    then (regression: the root's gathered parameters kept requires_grad=False and G trained only its blocks)."""
    gan = [str(TESTS.parent / "configs" / "gan" / "digits.yaml"), "data.resolution=16",
           "model.generator.base_channels=8", "model.discriminator.base_channels=8", "train.max_steps=4",
           "train.ckpt_every=4", "train.eval_every=100", "gan.fd_samples=32", "gan.num_samples=16",
           "data.num_workers=0", "train.batch_size=16", "gan.augment=''", "run.loggers=[]"]
    for parallel in ("ddp", "fsdp"):
        result = subprocess.run([sys.executable, "-m", "vistrain", "train", *gan, f"run.out_dir={tmp_path / parallel}",
                                 f"train.parallel={parallel}"], env=subprocess_env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = weights(tmp_path / "ddp", 4), weights(tmp_path / "fsdp", 4)
    generator = [k for k in ddp if k.startswith("G.")]
    assert_close({k: ddp[k] for k in generator}, {k: fsdp[k] for k in generator})


@pytest.fixture
def one_rank_group():
    from vistrain.engine.dist import init_distributed, shutdown

    ctx = init_distributed("cpu", 60, always=True)
    yield ctx
    shutdown(ctx)


def _model_calls():
    """(name, network, inputs) of every model family at a tiny size, fp32, no dropout."""
    from vistrain.models.llama import LlamaConfig
    from vistrain.models.var import VAR, VARConfig
    from vistrain.models.vit import ViTConfig
    from vistrain.models.vlm import VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    var = VAR(VARConfig(depth=2, num_classes=4, vocab_size=32, z_channels=4, patch_nums=[1, 2], cond_drop_rate=0.0,
                        drop_path_rate=0.0))
    yield "var", var, (torch.tensor([0, 3]), torch.randn(2, 4, 4))
    vlm = VisionLanguageModel(VLMConfig(
        vision=ViTConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2),
        lm=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1),
        pixel_shuffle_factor=2, image_token_id=39))
    yield "vlm", vlm, (torch.tensor([[1, 39, 5, 6, 7]]), torch.randn(1, 3, 8, 8))


def test_fsdp_modules_never_return_views_so_an_in_place_op_keeps_the_backward_right(one_rank_group):
    """FSDP2 hooks its pre-backward on a module's output; an in-place op on an output that is a view would drop
    it. The engine copies view outputs, so FSDP never warns and the gradient of `out.mul_(2)` is right."""
    import copy
    import warnings

    from vistrain.engine.config_sections import TrainConfig
    from vistrain.engine.parallel import Parallel

    for name, model, inputs in _model_calls():
        plain = copy.deepcopy(model)
        Parallel({name: model}, (name,), TrainConfig(parallel="fsdp"), one_rank_group)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*returned a view tensor")
            out = model(*inputs)
        out.mul_(2).square().sum().backward()
        plain(*inputs).mul(2).square().sum().backward()
        for (key, p), q in zip(model.named_parameters(), plain.parameters()):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, q.grad, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
