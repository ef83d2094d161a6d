"""Parallelism applied to a task's trainable networks from outside, in torchtitan's order.

    0. memory format: channels_last              train.channels_last
    1. activation checkpointing per block        train.activation_checkpointing
    2. torch.compile per block or whole network  train.compile: model | blocks
    3. DDP, or FSDP2 per block and then the root  train.parallel: ddp | fsdp

A model takes part by naming its repeated blocks in one attribute, `blocks` (an nn.ModuleList or
nn.Sequential, or a property listing submodules registered elsewhere); nothing else in a model knows about
parallelism. A network without `blocks` is treated as
one block. Frozen networks (a GAN's EMA copy, VAR's tokenizer) are left alone: no wrapper, no gradients.

All three steps keep parameter names as they are (composable activation checkpointing, in-place
`Module.compile`, FSDP2 in place), so the state-dict keys of a wrapped network are those of the plain model.

Evaluation runs with every sharded parameter gathered (`Parallel.gathered`): a task's evaluate may then call
any method of a network (VAR's and the VLM's `generate`, which FSDP's forward hooks never see) as often as
it likes on each rank, with no collective inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vistrain.engine.config_sections import TrainConfig
from vistrain.engine.dist import DistContext


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model names in `blocks` (a ModuleList, a Sequential, or a plain list of its
    submodules when they are registered under other names); the whole module when it names none."""
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential, list, tuple)) and len(blocks) > 0:
        return list(blocks)
    return [module]


class Parallel:
    """Wraps the trainable networks once; hands each phase the view of every network it should call."""

    def __init__(self, nets: dict[str, nn.Module], trainable: tuple[str, ...], cfg: TrainConfig,
                 dist: DistContext):
        self.nets = nets
        self.fsdp = cfg.parallel == "fsdp"
        self.precision = cfg.precision
        self._device_type = dist.device.type
        self._wrapped: dict[str, nn.Module] = {}
        mesh = self._device_mesh(dist) if self.fsdp else None
        for name in trainable:
            net = nets[name]
            # First: compiled graphs are specialised to it, DDP's buckets follow it. FSDP2 shards contiguous
            # parameters only; there the images' layout alone (to_device) makes the convolutions run channels_last.
            if cfg.channels_last and not self.fsdp:
                net.to(memory_format=torch.channels_last)
            blocks = blocks_of(net)
            if cfg.activation_checkpointing:
                from torch.distributed._composable import checkpoint

                for block in blocks:
                    checkpoint(block)
            if cfg.compile == "blocks":
                for block in blocks:
                    block.compile()
                _allow_graphs_for(len(blocks))
            elif cfg.compile == "model":
                net.compile()
            if self.fsdp:
                self._wrapped[name] = self._fully_shard(net, blocks, mesh, cfg.precision)
            elif dist.distributed:
                ids = [dist.device.index] if dist.device.type == "cuda" else None
                self._wrapped[name] = DDP(net, device_ids=ids)
            else:
                self._wrapped[name] = net

    @staticmethod
    def _device_mesh(dist: DistContext):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(dist.device.type, (dist.world_size,))

    @staticmethod
    def _fully_shard(net: nn.Module, blocks: list[nn.Module], mesh, precision: str) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: parameters are all-gathered and used in bf16, gradients reduced in fp32 (torchtitan's choice).
        param_dtype = torch.bfloat16 if precision == "bf16" else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks:
            if block is not net:
                _never_return_a_view(block)
                fully_shard(block, mesh=mesh, mp_policy=policy)
        _never_return_a_view(net)
        # The root too gives its parameters back after the forward (FSDP2 keeps a root's by default): each
        # forward then gathers them anew and takes their current requires_grad. A network frozen in one phase
        # (a GAN's G under no_grad while D trains) would otherwise stay gathered without gradients.
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        return net

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every FSDP network's parameters all-gathered (one collective per FSDP group, on every rank) and kept
        gathered until the block ends; DDP and plain networks are left as they are.

        FSDP2 gathers a module's parameters in its forward hooks only, and gives them back after each forward:
        a method other than forward (generation) would meet sharded parameters, and a loop whose length
        differs between ranks (answers of different lengths) would call the collectives a different number of
        times on each rank and hang. Gathered up front, with resharding after forward switched off, the forward
        hooks have nothing to do. Under bf16 the gathered parameters are bf16 (the policy's), so the block also
        runs under bf16 autocast, as training does, for inputs that come from outside the network.
        """
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for name in self._wrapped for m in self.nets[name].modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            with torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                yield
        finally:
            for module in modules:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)

    def views(self, trains: tuple[str, ...]) -> dict[str, nn.Module]:
        """Networks as a phase that trains `trains` calls them: wrapped for those, plain for the rest.

        Under DDP a network that the phase does not train is called without its wrapper, so that DDP does not
        wait for gradients that never come; FSDP modules are sharded in place and always called as they are.
        """
        return {name: self._wrapped[name] if name in trains else net for name, net in self.nets.items()}

    def gradient_sync(self, trains: tuple[str, ...], enabled: bool) -> contextlib.AbstractContextManager:
        """No gradient all-reduce / reduce-scatter until the last micro-batch of an optimizer step."""
        if enabled:
            return contextlib.nullcontext()
        return self._no_sync([self._wrapped[name] for name in trains])

    @contextlib.contextmanager
    def _no_sync(self, modules: list[nn.Module]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for module in modules:
                if isinstance(module, DDP):
                    stack.enter_context(module.no_sync())
                elif self.fsdp:
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
            yield



def _allow_graphs_for(num_blocks: int) -> None:
    """Let torch.compile keep up to four graphs per block of a network (training and no_grad calls, inputs with and
    without gradients) instead of its 8 per function.

    Every block of a model runs one forward function, and torch.compile keeps at most `recompile_limit` graphs
    per function, then runs further calls eagerly with one warning that is easy to miss. Blocks that differ (a
    GAN's, one width per resolution; spectral norm's layers, each of a class of its own) need a graph each, twice
    over for a GAN's two phases: a 256 px ResNet pair needs 12 per network, and blocks past the eighth graph would
    stay eager. Raised, never lowered: it is torch's process-wide setting."""
    from torch._dynamo import config  # loads slowly: only runs that compile per block pay for it

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), 4 * num_blocks))


def _never_return_a_view(module: nn.Module) -> None:
    """Make `module` return a copy wherever its output would be a view (a Linear over (B, L, C) returns one).

    FSDP2 hooks its pre-backward (which gathers the module's parameters again for the backward) on the
    module's output; an in-place op on an output that is a view re-bases it and silently drops that hook
    (FSDP2 warns: "returned a view tensor"). Copying such outputs once -- one memcpy of an activation -- makes
    that impossible whatever the caller does. Registered before fully_shard, so FSDP's hook sees the copy.
    """

    def copy_views(_module: nn.Module, _args, output):
        if isinstance(output, Tensor) and output._is_view():
            return output.clone()
        if type(output) is tuple:
            return tuple(t.clone() if isinstance(t, Tensor) and t._is_view() else t for t in output)
        return output

    module.register_forward_hook(copy_views)
