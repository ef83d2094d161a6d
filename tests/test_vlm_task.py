"""The VLM task: packed training with exact resume, answers by generation, the public model API, export,
and a VLM built from local Hugging Face folders."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vistrain import cli
from vistrain.config import load_config
from vistrain.data.vqa import digits_vqa, pack_row
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.models.vlm import VisionLanguageModel
from vistrain.registry import make_trainer

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "vlm" / "digits.yaml"
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["data.seq_length=128", "train.batch_size=4", "data.val_size=8", "vlm.val_questions=6",
        "model.lm.num_layers=2", "model.lm.hidden_size=64", "model.lm.intermediate_size=128",
        "model.vision.num_layers=1", "run.loggers=[jsonl]", "train.log_every=2"]


def tiny(out_dir, *overrides, cache=None):
    return load_config(DIGITS, [*TINY, f"run.out_dir={out_dir}", f"data.cache_dir={cache or out_dir.parent / 'cache'}",
                                "data.num_workers=0", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "run"
    make_trainer(tiny(out, "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=6", "train.keep_last=0"),
                 CPU).fit()
    return out


def test_packed_training_logs_what_a_vlm_user_reads_and_resumes_exactly(run, tmp_path):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"][-1]
    for key in ("loss", "grad_norm/main", "lr/main", "tokens_per_s", "samples_per_s", "time/data_s",
                "time/fwd_bwd_s", "images_per_sample", "packing_efficiency"):
        assert key in train, key
    assert 1.0 <= train["images_per_sample"] <= 2.0 and 0.5 < train["packing_efficiency"] <= 1.0
    val = [e for e in events if e["split"] == "val"][-1]
    assert {"val_loss", "acc", "acc/digit", "acc/parity", "acc/same"} <= set(val) or {"val_loss", "acc"} <= set(val)
    middle = run / "checkpoints" / "step_00000003"
    assert (middle / "tokenizer" / "tokenizer.json").is_file()  # the checkpoint is usable alone
    make_trainer(tiny(tmp_path / "b", "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=6",
                      f"run.resume={middle}", cache=run.parent / "cache"), CPU).fit()
    a, b = ckpt_lib.load_weights(run), ckpt_lib.load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_packed_sample_gets_the_logits_it_gets_alone(run):
    """nanoVLM's issue 201: without position reset and the document mask, packed samples see each other."""
    from vistrain.tasks.vlm import VLMTask

    trainer = make_trainer(tiny(run.parent / "probe", "train.max_steps=1", f"model.init={run}"), CPU)
    task: VLMTask = trainer.task
    model = task.nets["vlm"].eval()
    val = digits_vqa("val", 16)
    samples = [task.encoder.encode(val[i]) for i in (0, 150)]  # a one-image and a two-image question
    row = pack_row(samples, 128, task.pad_id)
    with torch.no_grad():
        packed = model(row["input_ids"][None], row["pixel_values"], row["position_ids"][None], row["doc_ids"][None])
        start = 0
        for s in samples:
            alone = model(s["input_ids"][None], s["pixel_values"])
            n = len(s["input_ids"])
            torch.testing.assert_close(packed[0, start:start + n], alone[0], rtol=1e-4, atol=1e-4)
            start += n
        leaky = model(row["input_ids"][None], row["pixel_values"])  # no doc ids: the second sample sees the first
    n0 = len(samples[0]["input_ids"])
    assert not torch.allclose(leaky[0, n0:n0 + 5], packed[0, n0:n0 + 5], atol=1e-4)


def test_generate_answers_from_a_run_and_from_an_export(run, tmp_path, capsys):
    image = tmp_path / "seven.png"
    digits_vqa("val", 16)[0]["images"][0].save(image)
    assert cli.main(["generate", str(run), "--image", str(image), "--prompt", "What digit is this?",
                     "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert len(answer) < 40  # a short answer ended by the end-of-turn token (the model is barely trained)
    out = tmp_path / "release"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "checksums.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    model = VisionLanguageModel.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert model.lm(input_ids_BT=ids).shape == (1, 3, model.cfg.lm.vocab_size)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)  # the public API round-trips too
    again = VisionLanguageModel.from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert cli.main(["generate", str(run), "--image", str(tmp_path / "none.png"), "--prompt", "?"]) == 1
    assert "none.png" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_rerun_of_packed_training_is_bit_identical(tmp_path, kill_rng, subprocess_env):
    """With two data workers: the packed stream is a pure function of (seed, position)."""
    steps = ["train.max_steps=40", "train.ckpt_every=4", "train.eval_every=1000", "vlm.val_questions=0"]
    args = [sys.executable, "-m", "vistrain", "train", str(DIGITS), *TINY, "data.num_workers=2",
            f"data.cache_dir={tmp_path / 'cache'}", *steps]
    ref = tmp_path / "ref"
    done = subprocess.run(args + [f"run.out_dir={ref}"], env=subprocess_env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "killed"
    cmd = args + [f"run.out_dir={run}"]
    after = run / "checkpoints" / f"step_{kill_rng.choice((4, 8)):08d}"
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not after.exists():  # then 30 or more steps are still to go
        assert proc.poll() is None, "the run ended before the checkpoint the kill waits for"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(kill_rng.uniform(0.0, 0.3))
    proc.kill()
    proc.wait()
    resumed = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = lambda out: (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())  # noqa: E731
    assert (final(run) / "model.safetensors").read_bytes() == (final(ref) / "model.safetensors").read_bytes()


def test_a_vlm_from_local_hugging_face_folders(tmp_path, capsys):
    """SigLIP + a Llama with its tokenizer, as `vistrain import vlm` and `model.vision_from/lm_from` use them."""
    import transformers

    from vistrain.data.vqa import train_tokenizer, vqa_texts

    torch.manual_seed(0)
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=4))
    vision.save_pretrained(tmp_path / "siglip")
    tokenizer = train_tokenizer(vqa_texts(digits_vqa("val", 32)), special_tokens=[], vocab_size=300)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    out = tmp_path / "vlm"
    assert cli.main(["import", "vlm", "--vision", str(tmp_path / "siglip"), "--lm", str(tmp_path / "llama"),
                     "--out", str(out), "--pixel-shuffle-factor", "2"]) == 0
    model = VisionLanguageModel.from_pretrained(out)
    assert model.cfg.lm.vocab_size == len(tokenizer) + 66  # the image, global image and 64 row/col tokens
    with torch.no_grad():
        pixels = torch.randn(1, 3, 32, 32)
        ours = model.vision(pixels)
        theirs = vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the imported encoder is SigLIP's
    image = tmp_path / "d.png"
    digits_vqa("val", 16)[0]["images"][0].save(image)
    assert cli.main(["generate", str(out), "--image", str(image), "--prompt", "What digit is this?",
                     "--max-new-tokens", "2"]) == 0
    # and training can start from the two folders
    cfg = tiny(tmp_path / "ft", "train.max_steps=1", f"model.vision_from={tmp_path / 'siglip'}",
               f"model.lm_from={tmp_path / 'llama'}", "model.pixel_shuffle_factor=2")
    make_trainer(cfg, CPU).fit()


def test_a_streaming_source_trains_until_it_runs_out_and_says_so(tmp_path, capsys):
    """Packed on the fly per rank; the engine stops (and saves) when the stream ends."""
    digits_vqa("val", 16).select(range(80)).to_parquet(str(tmp_path / "part.parquet"))
    source = f"{{name: digits, path: {tmp_path / 'part.parquet'}, streaming: true}}"
    cfg = tiny(tmp_path / "run", "data.name=vqa", f"data.sources=[{source}]", "data.val_size=8",
               "train.max_steps=1000", "train.ckpt_every=1000", "train.eval_every=1000", "vlm.val_questions=0")
    make_trainer(cfg, CPU).fit()
    out = capsys.readouterr().out
    assert "the training data ran out after step" in out
    steps = int(out.split("ran out after step ")[1].split(";")[0])
    assert 0 < steps < 1000
    assert ckpt_lib.latest_checkpoint(tmp_path / "run" / "checkpoints").name.endswith(f"{steps:08d}")
