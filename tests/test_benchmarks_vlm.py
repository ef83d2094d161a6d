"""benchmarks/vs_nanovlm.py: vistrain's half runs at the tiny shape without --ref (nanoVLM's half needs its
checkout, which is not part of the repository), so the benchmark cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_nanovlm.py"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_nanovlm", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_vistrain_half_at_the_tiny_shape(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "results.json"
    assert bench.main(["--shape", "tiny", "--rounds", "1", "--steps", "1", "--gen-compile", "eager",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny (2 x 128 rows, batch 4, fp32, compile false) | vistrain |" in printed
    assert "| tiny (batch 1, 4 new tokens) | vistrain |" in printed
    assert printed.rstrip().splitlines()[-1] == "vistrain/original: n/a (no --ref: vistrain's half only)"
    result = json.loads(out.read_text())["results"][0]
    train, generate = result["train"]["vistrain"], result["generate"]["vistrain"]
    assert set(result["train"]) == {"vistrain"}
    # packed rows: the useful tokens of a step are most of its 4 rows x 128 tokens, never more
    assert 0.5 * 4 * 128 < train["tokens_per_step"] <= 4 * 128
    assert train["tokens_per_s"] > 0 and train["ms_per_step"] > 0 and train["mfu"] is None  # no peak on a CPU
    assert generate["tokens_per_s"] > 0 and generate["prompt_tokens"] > 16  # one tile of image tokens at least
    assert generate["same_as_eager"] == 4  # the compiled decoding (backend eager here) agrees with eager


def test_the_stand_in_tokenizer_has_the_vocabulary_asked_for(bench, tmp_path):
    from transformers import AutoTokenizer

    folder = bench.standin_tokenizer(tmp_path / "tok", 1000)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tokenizer) == 1000 and tokenizer.eos_token == "<|im_end|>"
    text = "what is in the picture? a cat"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) * 0.7  # letter pairs are merged


def test_a_ref_that_is_no_nanovlm_checkout_is_named(bench, tmp_path):
    with pytest.raises(SystemExit, match=f"--ref {tmp_path}: not a checkout of huggingface/nanoVLM"):
        bench.main(["--ref", str(tmp_path), "--shape", "tiny"])
