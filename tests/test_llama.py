"""models/llama.py and interop/hf.py: a Llama decoder that matches transformers' LlamaForCausalLM.

Reference models are tiny random transformers LlamaForCausalLM (vocab 128, hidden 64, 2 layers, 4 heads,
2 kv heads, rope_theta 100000), tied and untied, saved with save_pretrained and imported from that folder:
the path a user takes with a downloaded SmolLM2. Every weight is drawn from N(0, 0.1) and every norm weight
around 1, so a swapped or misrouted tensor changes the numbers (unit norms would hide a swapped norm).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vistrain.interop.hf import (
    LlamaFormatError,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_state_dict_from_hf,
    llama_state_dict_to_hf,
    load_llama_from_hf,
)
from vistrain.models.llama import KVCache, LanguageModel, LlamaConfig, linear_cross_entropy, positions_from_doc_ids

transformers = pytest.importorskip("transformers")

CLOSE = dict(rtol=0.0, atol=1e-5)  # float32, the same math in a different op order
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=256)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_model(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    """(transformers model, folder it was saved to, our model imported from that folder)."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    hf.save_pretrained(folder)
    cfg, ours = load_llama_from_hf(folder)
    assert cfg.tie_embeddings is request.param and cfg.rope_theta == 100000.0
    return hf, folder, ours


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# parity with transformers


def test_logits_equal_transformers(pair) -> None:
    hf, _, ours = pair
    ids = _ids(3, 17)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **CLOSE)
        # embeddings in (the VLM's path) give the same logits as ids
        torch.testing.assert_close(ours(inputs_embeds_BTD=ours.embed(ids)), hf(ids).logits, **CLOSE)


def test_greedy_generation_equals_transformers_generate(pair) -> None:
    hf, _, ours = pair
    N = 12
    prompts = _ids(2, 6, seed=3)
    for prompt in (prompts[:1], prompts):  # one prompt, and a batch of two of equal length
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=N,
                           eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
        assert want.shape == (prompt.shape[0], N)
        assert torch.equal(ours.generate(prompt, max_new_tokens=N), want)

    # eos: take a token that row 0 produces at step 3; both stop that row there and pad it with eos
    eos = int(want[0, 3])
    want = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=N,
                       eos_token_id=eos, pad_token_id=eos)[:, prompts.shape[1]:]
    got = ours.generate(prompts, max_new_tokens=N, eos_token_id=eos)
    assert torch.equal(got, want)
    first = int((got[0] == eos).nonzero()[0])
    assert first <= 3 and (got[0, first:] == eos).all()


def test_kv_cached_logits_equal_the_uncached_forward(pair) -> None:
    _, _, ours = pair
    ids = _ids(2, 12, seed=4)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(capacity=12)
        # a prefill, a chunk of several tokens over a cached prefix, then one token at a time
        parts = [ours(ids[:, :5], kv_cache=cache), ours(ids[:, 5:8], kv_cache=cache)]
        parts += [ours(ids[:, t : t + 1], kv_cache=cache) for t in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **CLOSE)
    with pytest.raises(ValueError, match="capacity"):
        ours(ids[:, :1], kv_cache=cache)


def test_generate_from_embeddings_and_sampling(pair) -> None:
    _, _, ours = pair
    prompt = _ids(2, 5, seed=5)
    greedy = ours.generate(prompt, max_new_tokens=6)
    assert torch.equal(ours.generate(inputs_embeds_BTD=ours.embed(prompt), max_new_tokens=6), greedy)
    # top_k = 1 sampling is greedy; a seeded generator repeats its draws
    assert torch.equal(ours.generate(prompt, max_new_tokens=6, greedy=False, top_k=1), greedy)
    draws = [ours.generate(prompt, max_new_tokens=6, greedy=False, temperature=2.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (2, 6)
    assert ours.generate(prompt, max_new_tokens=0).shape == (2, 0)


def test_generate_runs_blocks_compiled_by_the_engine_eagerly() -> None:
    """train.compile=blocks compiles each block in place; decoding must not recompile them at every step."""
    torch.manual_seed(0)
    model = LanguageModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                      num_heads=2, num_kv_heads=1)).eval()
    prompt = _ids(1, 5) % 64
    want = model.generate(prompt, max_new_tokens=6)
    for block in model.blocks:
        block.compile(backend="eager")
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(prompt, max_new_tokens=6), want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def _tiny_model(seed: int = 0, **changes) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    return LanguageModel(LlamaConfig(**{**cfg, **changes})).eval()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_decoding_gives_the_eager_tokens_with_one_graph(backend) -> None:
    """generate(compile=...) traces the decoding step whole (fullgraph) over the static cache: the same tokens
    as eager decoding, and one graph for every step and for every prompt of the same capacity bucket."""
    model = _tiny_model()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompts = _ids(2, 6, seed=9) % 64
    for prompt, n in ((prompts, 10), (prompts[:, :4], 7)):
        want = model.generate(prompt, max_new_tokens=n)
        assert torch.equal(model.generate(prompt, max_new_tokens=n, compile=backend), want)
        eos = int(want[1, 2])  # row 1 stops at step 2 or before, row 0 goes on
        assert torch.equal(model.generate(prompt, max_new_tokens=n, eos_token_id=eos, compile=backend),
                           model.generate(prompt, max_new_tokens=n, eos_token_id=eos))
        draws = [model.generate(prompt, max_new_tokens=n, greedy=False, temperature=2.0, top_k=20, compile=c,
                                generator=torch.Generator().manual_seed(3)) for c in (False, backend)]
        assert torch.equal(draws[0], draws[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    # a copy of the model compiles its own step (the compiled function holds the original)
    assert torch.equal(copy.deepcopy(model).generate(prompts, max_new_tokens=3, compile=backend),
                       model.generate(prompts, max_new_tokens=3))


def test_compiled_decoding_with_blocks_the_engine_compiled() -> None:
    model = _tiny_model(seed=1)
    prompt = _ids(1, 5, seed=2) % 64
    want = model.generate(prompt, max_new_tokens=6)
    for block in model.blocks:
        block.compile(backend="eager")
    assert torch.equal(model.generate(prompt, max_new_tokens=6, compile="eager"), want)


def test_a_decoding_step_that_cannot_compile_falls_back_to_eager(monkeypatch) -> None:
    """A block dynamo cannot trace whole (here: a graph break, refused by fullgraph) leaves eager decoding."""
    model = _tiny_model(seed=2)
    prompt = _ids(1, 5, seed=3) % 64
    want = model.generate(prompt, max_new_tokens=5)
    traced_whole = model.blocks[0].forward

    def with_a_graph_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return traced_whole(*args, **kwargs)

    monkeypatch.setattr(model.blocks[0], "forward", with_a_graph_break)
    with pytest.warns(UserWarning, match="compiled decoding step failed.*decoding eagerly"):
        got = model.generate(prompt, max_new_tokens=5, compile="eager")
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------
# the loss on hidden states: chunked, labelled rows only


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_linear_cross_entropy_equals_the_plain_one(chunk_size: int) -> None:
    """Loss and both gradients are those of F.cross_entropy over F.linear's logits, in float64 to the last
    bits: ignored rows count for nothing, every chunk (the last one short) counts once."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::3] = -100
    got = linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(2.5 * got, (h, w))  # an upstream gradient other than 1 is applied too
    want = F.cross_entropy(F.linear(h, w), labels, reduction="sum")
    want_grads = torch.autograd.grad(2.5 * want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for ours, theirs in zip(got_grads, want_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert got_grads[0][::3].abs().max() == 0  # an ignored row gets no gradient


@pytest.mark.parametrize("tied", [True, False])
def test_next_token_loss_is_the_cross_entropy_of_the_shifted_logits(tied: bool) -> None:
    """forward(labels_BT=...) = F.cross_entropy(logits[:, :-1], labels[:, 1:]) summed, with its gradients for
    every parameter; a misaligned target (the bug a shift invites) gives another value."""
    model = _tiny_model(seed=3, tie_embeddings=tied).train()
    ids = _ids(2, 12, seed=10) % 64
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt has no labels
    labels[1, 9] = -100
    loss = model(ids, labels_BT=labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(ids)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum")
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for ours, theirs in zip(grads, want_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    misaligned = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), reduction="sum")
    assert not torch.allclose(misaligned, loss, rtol=1e-6, atol=0)  # what the check above would catch
    with pytest.raises(ValueError, match="labels_BT must have shape"):
        model(ids, labels_BT=labels[:, 1:])


def test_linear_cross_entropy_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, labels, chunk_size=16)
        want = F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum")
    assert got.dtype == torch.float32
    got_grads, want_grads = torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the same bf16 logits, each summed in float32
    assert got_grads[0].dtype == h.dtype and got_grads[1].dtype == w.dtype
    for ours, theirs in zip(got_grads, want_grads):  # bf16 products, accumulated in another order
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_the_loss_never_makes_the_logits_of_every_token() -> None:
    """Only the labelled rows reach the head, chunk_size at a time: no tensor with a vocabulary axis (other than
    the head's weight and its gradient) holds more rows than a chunk, in the forward or the backward; the
    plain loss holds all B x T."""
    from torch.overrides import TorchFunctionMode

    V, D = 97, 32

    class LargestWithVocabAxis(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and V in t.shape
                        and tuple(t.shape) not in ((V, D), (D, V))):
                    self.rows = max(self.rows, t.numel() // V)
            return out

    model = _tiny_model(seed=4, vocab_size=V, hidden_size=D).train()
    ids = _ids(4, 16, seed=11) % V
    labels = torch.full_like(ids, -100)
    labels[:, 10:14] = ids[:, 10:14]  # 4 x 4 labelled tokens, predicted from positions 9..12
    with LargestWithVocabAxis() as mode:
        model(ids, labels_BT=labels).backward()
    assert mode.rows == 16  # the labelled targets alone (the default chunk holds them all)
    with LargestWithVocabAxis() as mode:
        linear_cross_entropy(torch.randn(64, D, requires_grad=True), model.head_weight, labels.reshape(-1),
                             chunk_size=5).backward()
    assert mode.rows == 5
    with LargestWithVocabAxis() as mode:
        model(ids).float().sum().backward()
    assert mode.rows == 64  # the plain logits: every one of the 4 x 16 tokens


def test_the_loss_under_no_grad_makes_no_gradients() -> None:
    """Evaluation: one product with the head per chunk, not three (the logits and the two gradients)."""
    from torch.overrides import TorchFunctionMode

    class Matmuls(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += getattr(func, "__name__", "") in ("__matmul__", "matmul", "mm")
            return func(*args, **(kwargs or {}))

    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (10,))
    with torch.no_grad(), Matmuls() as mode:
        evaluated = linear_cross_entropy(h, w, labels, chunk_size=4)
    assert mode.count == 3  # 3 chunks
    with Matmuls() as mode:
        trained = linear_cross_entropy(h, w, labels, chunk_size=4)
    assert mode.count == 9 and torch.equal(evaluated, trained.detach())


# ---------------------------------------------------------------------------------------------------
# packed rows (nanoVLM issue 201)


def test_packed_samples_give_the_logits_of_each_sample_alone(pair) -> None:
    hf, _, ours = pair
    a, b = _ids(1, 5, seed=6), _ids(1, 7, seed=7)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        alone_a, alone_b = hf(a).logits, hf(b).logits
        got = ours(packed, position_ids_BT=positions, doc_ids_BT=doc_ids)
        torch.testing.assert_close(got[:, :5], alone_a, **CLOSE)
        torch.testing.assert_close(got[:, 5:], alone_b, **CLOSE)
        # positions restart by themselves when only doc ids are given
        assert torch.equal(positions_from_doc_ids(doc_ids), positions)
        torch.testing.assert_close(ours(packed, doc_ids_BT=doc_ids), got, **CLOSE)
        # the bug this guards against: no mask and running positions -> sample B sees A, shifted
        naive = ours(packed)
        torch.testing.assert_close(naive[:, :5], alone_a, **CLOSE)  # A comes first: unaffected
        assert (naive[:, 5:] - alone_b).abs().max() > 1e-2
        # the mask is the half that matters: restarted positions alone do not help ...
        assert (ours(packed, position_ids_BT=positions)[:, 5:] - alone_b).abs().max() > 1e-2
        # ... while inside the mask running positions change only rounding: RoPE scores depend on q - k alone
        running = ours(packed, doc_ids_BT=doc_ids, position_ids_BT=torch.arange(12)[None])
        torch.testing.assert_close(running[:, 5:], alone_b, **CLOSE)


def test_packed_batch_with_different_splits_per_row(pair) -> None:
    _, _, ours = pair
    ids = _ids(2, 10, seed=8)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [4, 4, 4, 4, 4, 4, 9, 9, 9, 9]])
    with torch.no_grad():
        got = ours(ids, doc_ids_BT=doc_ids)
        for row, cut in ((0, 3), (1, 6)):
            torch.testing.assert_close(got[row, :cut], ours(ids[row : row + 1, :cut])[0], **CLOSE)
            torch.testing.assert_close(got[row, cut:], ours(ids[row : row + 1, cut:])[0], **CLOSE)
    with pytest.raises(ValueError, match="doc_ids_BT"):
        ours(ids, doc_ids_BT=doc_ids[:, :4])
    with pytest.raises(ValueError, match="kv_cache"):
        ours(ids, doc_ids_BT=doc_ids, kv_cache=KVCache(10))


# ---------------------------------------------------------------------------------------------------
# vocabulary and tied embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_keeps_old_rows_and_old_logits(tied: bool) -> None:
    torch.manual_seed(0)
    model = LanguageModel(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=1,
                                      num_heads=2, num_kv_heads=1, tie_embeddings=tied)).eval()
    ids = _ids(2, 9) % 100
    old_embed, old_head = model.embed_tokens.weight.clone(), model.head_weight.clone()
    with torch.no_grad():
        before = model(ids)
    model.resize_vocab(164, generator=torch.Generator().manual_seed(3))
    assert model.cfg.vocab_size == 164 and model.embed_tokens.weight.shape == (164, 32)
    assert model.head_weight.shape == (164, 32)
    assert torch.equal(model.embed_tokens.weight[:100], old_embed)
    assert torch.equal(model.head_weight[:100], old_head)
    new_rows = model.embed_tokens.weight[100:].detach()
    assert abs(float(new_rows.std()) - 0.02) < 0.003 and abs(float(new_rows.mean())) < 0.003
    assert (model.head_weight is model.embed_tokens.weight) is tied
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after[..., :100], before, rtol=0.0, atol=1e-6)
    assert after.shape[-1] == 164
    # the same generator seed gives the same new rows
    again = LanguageModel(dataclasses.replace(model.cfg, vocab_size=100))
    again.load_state_dict({k: v[:100] if v.shape[0] == 164 else v for k, v in model.state_dict().items()})
    again.resize_vocab(164, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)
    with pytest.raises(ValueError, match="new_size"):
        model.resize_vocab(10)


def test_tied_embeddings_are_one_parameter(tmp_path) -> None:
    cfg = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2)
    tied, untied = LanguageModel(LlamaConfig(**cfg)), LanguageModel(LlamaConfig(**cfg, tie_embeddings=False))
    assert tied.head_weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()
    n = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n + 50 * 16
    opt = torch.optim.AdamW(tied.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tied.parameters()))
    # gradients of the input and the output use land in the one tensor
    tied(_ids(1, 4) % 50).sum().backward()
    assert tied.embed_tokens.weight.grad is not None and tied.embed_tokens.weight.grad.abs().sum() > 0
    save_file(tied.state_dict(), tmp_path / "tied.safetensors")  # safetensors refuses shared tensors


# ---------------------------------------------------------------------------------------------------
# the importer


def test_state_dict_maps_both_ways(pair) -> None:
    _, folder, ours = pair
    hf_state = load_file(folder / "model.safetensors")
    back = llama_state_dict_to_hf(ours.state_dict(), ours.cfg)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)
    mapped = llama_state_dict_from_hf(back, ours.cfg)
    assert all(torch.equal(mapped[k], v) for k, v in ours.state_dict().items())
    # the config maps back too: transformers reads ours, and we read it again
    cfg2 = llama_config_from_hf(transformers.LlamaConfig(**llama_config_to_hf(ours.cfg)).to_dict())
    assert cfg2 == ours.cfg


def test_sharded_folder_loads_like_a_single_file(pair, tmp_path) -> None:
    _, folder, ours = pair
    hf_state = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(hf_state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: hf_state[k] for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, model = load_llama_from_hf(tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.state_dict().items())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LlamaFormatError, match="model-00002-of-00002.safetensors: missing"):
        load_llama_from_hf(tmp_path)


def test_config_forms_of_transformers_4_and_5() -> None:
    base = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True}
    v4 = llama_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    v5 = llama_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.head_dim == 0 and v4.num_kv_heads == 2
    assert llama_config_from_hf({**base, "rope_scaling": {"type": "default"}}).rope_theta == 10000.0
    assert llama_config_from_hf({**base, "head_dim": 32}).resolved_head_dim == 32
    assert llama_config_from_hf({k: v for k, v in base.items() if k != "num_key_value_heads"}).num_kv_heads == 4
    for bad, match in [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.*llama3"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.*linear"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per layer type"),
        ({"model_type": "qwen2"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"vocab_size": "many"}, "vocab_size"),
    ]:
        with pytest.raises(LlamaFormatError, match=match):
            llama_config_from_hf({**base, **bad}, source="somewhere/config.json")
    with pytest.raises(LlamaFormatError, match="somewhere/config.json.*'hidden_size' is missing"):
        llama_config_from_hf({k: v for k, v in base.items() if k != "hidden_size"}, source="somewhere/config.json")


def test_llama_config_validation_names_the_key() -> None:
    for bad, key in [({"num_heads": 0}, "num_heads"), ({"num_kv_heads": 4}, "num_kv_heads"),
                     ({"head_dim": 7}, "head_dim"), ({"rope_theta": -1.0}, "rope_theta"),
                     ({"attn_impl": "xformers"}, "attn_impl"), ({"tie_embeddings": 1}, "tie_embeddings"),
                     ({"hidden_size": 961}, "hidden_size")]:
        with pytest.raises(ValueError, match=f"LlamaConfig.{key}"):
            LlamaConfig(**bad)


def test_import_errors_name_the_folder_and_key(pair, tmp_path) -> None:
    _, folder, ours = pair
    config = json.loads((folder / "config.json").read_text())
    hf_state = load_file(folder / "model.safetensors")

    with pytest.raises(LlamaFormatError, match=f"{tmp_path}: no config.json"):
        load_llama_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlamaFormatError, match=f"{tmp_path}: no weights.*model.safetensors"):
        load_llama_from_hf(tmp_path)

    missing = {k: v for k, v in hf_state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(LlamaFormatError, match=f"{tmp_path}: key 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_llama_from_hf(tmp_path)

    wrong = {**hf_state, "model.norm.weight": torch.ones(65)}
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(LlamaFormatError, match="'model.norm.weight' has shape"):
        load_llama_from_hf(tmp_path)

    extra = {**hf_state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(LlamaFormatError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"):
        load_llama_from_hf(tmp_path)

    if ours.cfg.tie_embeddings:  # a stored head must be the embedding; an equal one is fine
        save_file({**hf_state, "lm_head.weight": hf_state["model.embed_tokens.weight"].clone()},
                  tmp_path / "model.safetensors")
        load_llama_from_hf(tmp_path)
        save_file({**hf_state, "lm_head.weight": torch.zeros_like(hf_state["model.embed_tokens.weight"])},
                  tmp_path / "model.safetensors")
        with pytest.raises(LlamaFormatError, match="'lm_head.weight' differs"):
            load_llama_from_hf(tmp_path)


# SmolLM2-135M's config.json in the transformers-4 form it was published in (top-level rope_theta, an integer;
# rope_scaling null; nanotron's rope_interleaved false).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "vocab_size": 49152,
}


def test_parameter_count_of_smollm2_135m_on_meta() -> None:
    cfg = llama_config_from_hf(SMOLLM2_135M)
    assert cfg == LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                              num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                              max_position_embeddings=8192)
    with torch.device("meta"):
        ours = LanguageModel(cfg)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(SMOLLM2_135M))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters()) == 134_515_008
    assert all(p.is_meta for p in ours.parameters())
    with pytest.raises(LlamaFormatError, match="rope_interleaved"):
        llama_config_from_hf({**SMOLLM2_135M, "rope_interleaved": True})
