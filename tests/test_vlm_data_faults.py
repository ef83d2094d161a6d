"""Bad VLM data, as a new user brings it: undecodable images, malformed rows and sources, wrong split and data
settings. A bad sample is skipped with a warning naming its source and row, the same way on a resumed run and
with loader workers; a source that is wrong as a whole, or a bad setting, stops the start with a message that
names it, and leaves every run folder as it was."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from test_faults import snapshot, vistrain  # noqa: E402
from vistrain.data.loader import MicroBatchStream  # noqa: E402
from vistrain.data.vqa import (  # noqa: E402
    UNREADABLE,
    ImageProcessor,
    PackedOrder,
    PackedVQADataset,
    ReadableRows,
    StreamingPacker,
    UnreadableImage,
    VQAEncoder,
    VQARows,
    VQASource,
    collate_packed,
    digits_vqa,
    load_vqa_sources,
    sample_lengths,
    train_tokenizer,
    vqa_texts,
)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "vlm" / "digits.yaml"
FEATURES = datasets.Features({
    "images": [datasets.Image()],
    "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
})
NOT_AN_IMAGE = {"bytes": b"this is not an image", "path": None}  # its header cannot be read
TINY = ["data.name=vqa", "data.seq_length=128", "train.batch_size=4", "data.val_size=8", "vlm.val_questions=2",
        "model.lm.num_layers=1", "model.lm.hidden_size=64", "model.lm.intermediate_size=128",
        "model.vision.num_layers=1", "run.loggers=[jsonl]", "train.log_every=2", "train.max_steps=4",
        "train.eval_every=4", "train.ckpt_every=4", "data.num_workers=0"]


def digit_rows(n):
    """n the_cauldron-shaped rows of digits questions, images as PNG {bytes, path} dicts."""
    rows = digits_vqa("val", 16).select(range(n)).with_format("arrow")[:].to_pylist()
    return [{"images": r["images"], "texts": r["texts"]} for r in rows]


def truncated(image):
    """The PNG cut short: its header reads, its pixels do not."""
    return {"bytes": image["bytes"][: len(image["bytes"]) // 2], "path": None}


def save(rows, folder, features=FEATURES):
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return str(folder)


def save_parquet(rows, folder):
    path = f"{folder}.parquet"
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def encoder():
    tokenizer = train_tokenizer(vqa_texts(digits_vqa("val", 16)))
    return VQAEncoder(tokenizer, ImageProcessor(16, 64), image_token_length=4)


# --- an undecodable image ----------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_where_they_come_up_the_same_on_resume_and_with_workers(tmp_path, encoder):
    rows = digit_rows(60)
    rows[5]["images"][0] = NOT_AN_IMAGE  # found when the lengths are measured
    rows[9]["images"][0] = truncated(rows[9]["images"][0])  # found only when its pixels are decoded
    loaded = load_vqa_sources([VQASource("mine", save(rows, tmp_path / "mine"))])
    with pytest.warns(UserWarning, match=r"1 of 60 training samples have an image that cannot be read; each is "
                                         r"skipped .* source 'mine', row 5: images\[0\] cannot be read \("
                                         r"UnidentifiedImageError"):
        tokens, images = sample_lengths(loaded.rows, encoder, cache_dir=str(tmp_path / "cache"))
    assert tokens[5] == UNREADABLE and tokens[9] > 0 and (tokens > 0).sum() == 59
    order = PackedOrder(tokens, images, seq_length=96, max_images_per_pack=6, seed=3, window=32)
    data = PackedVQADataset(loaded.rows, encoder, 96, encoder.tokenizer.pad_token_id)

    def stream(workers):
        return MicroBatchStream(data, order, 2, rank=0, world_size=1, num_workers=workers, collate_fn=collate_packed)

    with pytest.warns(UserWarning) as caught:
        reference = list(itertools.islice(stream(0), 24))  # two epochs and more
    skips = [str(w.message) for w in caught if "skipping a training sample" in str(w.message)]
    assert any("source 'mine', row 5: images[0] cannot be read" in m for m in skips)
    assert any("source 'mine', row 9: images[0] cannot be read (OSError: image file is truncated" in m for m in skips)
    bins = order.keys(0, 48)
    met = sum(index in (5, 9) for b in bins for index, _ in b)
    assert met >= 4 and sum(b["num_skipped"] for b in reference) == met  # every time they come up
    assert sum(b["num_samples"] for b in reference) == sum(len(b) for b in bins) - met

    resumed = stream(2)  # loader workers, from a saved position: the same rows, the same skips
    resumed.load_state_dict({"position": 6})
    for ref, got in zip(reference[3:], itertools.islice(resumed, 21)):
        assert torch.equal(ref["input_ids"], got["input_ids"]) and ref["num_skipped"] == got["num_skipped"]


def test_a_bin_of_unreadable_samples_packs_into_a_row_of_padding(tmp_path, encoder):
    rows = digit_rows(3)
    rows[0]["images"][0] = rows[1]["images"][0] = NOT_AN_IMAGE
    loaded = load_vqa_sources([VQASource("bad", save(rows, tmp_path / "bad"))])
    with pytest.warns(UserWarning, match="2 of 3 training samples have an image that cannot be read"):
        tokens, images = sample_lengths(loaded.rows, encoder, cache_dir=str(tmp_path / "cache"))
    order = PackedOrder(tokens, images, 96, 6, seed=0, window=1)  # a window, and so a bin, per sample
    data = PackedVQADataset(loaded.rows, encoder, 96, encoder.tokenizer.pad_token_id)
    with pytest.warns(UserWarning, match="skipping a training sample: source 'bad', row"):
        batch = collate_packed([data[b] for b in order.keys(0, 3)])
    assert (batch["num_samples"], batch["num_skipped"], batch["num_images"]) == (1, 2, 1)
    assert batch["input_ids"].shape == (3, 96) and batch["pixel_values"].shape == (1, 3, 16, 16)
    assert (batch["labels"] != -100).sum() == batch["num_loss_tokens"] > 0


def test_validation_reads_past_an_unreadable_row(tmp_path):
    rows = digit_rows(4)
    rows[1]["images"][0] = NOT_AN_IMAGE
    val = ReadableRows(load_vqa_sources([VQASource("val", save(rows, tmp_path / "val"))]).rows)
    with pytest.raises(UnreadableImage, match=r"source 'val', row 1: images\[0\] cannot be read"):
        val.rows[1]
    with pytest.warns(UserWarning, match=r"validation data: source 'val', row 1: images\[0\].*next row is used"):
        sample = val[1]
    assert sample["texts"] == rows[2]["texts"] and sample["images"][0].size == (16, 16)


def test_a_streaming_source_skips_an_unreadable_image_instead_of_ending(tmp_path, encoder):
    rows = digit_rows(30)
    rows[4]["images"][0] = NOT_AN_IMAGE
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(tmp_path / "part.parquet"))
    stream = load_vqa_sources([VQASource("s", str(tmp_path / "part.parquet"), streaming=True)]).stream
    packer = StreamingPacker(stream, encoder, 96, 6, encoder.tokenizer.pad_token_id, buffer_size=16)
    with pytest.warns(UserWarning, match=r"skipping a training sample: sample 4 of the stream: images\[0\]"):
        packed = list(packer)
    assert sum(r["num_samples"] for r in packed) == 29 and sum(r["num_skipped"] for r in packed) == 1
    assert packer.num_unreadable == 1


# --- malformed rows and sources ----------------------------------------------------------------------------


def _rows_with(texts=None, images=None, n=20):
    rows = digit_rows(n)
    for r in rows:
        if texts is not None:
            r["texts"] = texts
        if images is not None:
            r["images"] = images
    return rows


@pytest.mark.parametrize("rows, features, needle", [
    (_rows_with(texts=[{"question": "What digit is this?", "answer": "7"}]), None,
     "column 'texts' holds turns of ['answer', 'question']; each row's texts must be a list of {user: text, "
     "assistant: non-empty text} turns (rename the keys"),
    (_rows_with(texts=[{"user": "", "assistant": None}]), None,
     "none of the 16 rows read has a usable turn (row 0: texts[0].assistant is None, not a non-empty text)"),
    (_rows_with(texts="What digit is this? 7"), None, "column 'texts' holds Value("),
    (_rows_with(images=[NOT_AN_IMAGE]), FEATURES, "no image of the 16 rows read can be decoded (row 0: images[0] "
                                                  "cannot be read (UnidentifiedImageError"),
    (_rows_with(images=["missing/0.png"]), None, "images[0] cannot be read (FileNotFoundError"),
], ids=["question_answer", "empty_turns", "texts_a_string", "no_image_decodes", "no_image_file"])
def test_a_source_that_is_wrong_as_a_whole_is_refused_by_name(tmp_path, rows, features, needle):
    path = save(rows, tmp_path / "bad", features)
    with pytest.warns(UserWarning, match="VQA source 'bad' .* of data.val_sources cannot be used, skipped"), \
            pytest.raises(ValueError) as error:
        load_vqa_sources([VQASource("bad", path)], key="data.val_sources")
    assert str(error.value).startswith("no VQA source could be loaded (data.val_sources): bad (")
    assert needle in str(error.value)


def test_malformed_rows_of_a_good_source_are_named_and_left_out(tmp_path, encoder):
    rows = digit_rows(20)
    rows[2]["texts"] = [{"user": "", "assistant": None}]
    rows[3]["texts"] = [{"user": "What digit is this?", "assistant": ""}, rows[3]["texts"][0]]  # one good turn
    rows[4]["texts"] = []
    loaded = load_vqa_sources([VQASource("mixed", save(rows, tmp_path / "mixed"))])
    with pytest.warns(UserWarning, match=r"training samples without a usable turn are left out, e\.g\. source "
                                         r"'mixed', row 2: texts\[0\]\.assistant is None.*source 'mixed', row 4: "
                                         r"texts is an empty list"):
        tokens, _ = sample_lengths(loaded.rows, encoder, cache_dir=str(tmp_path / "cache"))
    assert tokens[[2, 4]].tolist() == [0, 0] and tokens[3] > 0
    good_turn_only = {**loaded.rows[3], "texts": rows[3]["texts"][1:]}  # row 3 keeps its good turn alone
    assert torch.equal(encoder.encode(loaded.rows[3])["input_ids"], encoder.encode(good_turn_only)["input_ids"])


def test_image_paths_are_read_from_the_source_folder(tmp_path, monkeypatch):
    from PIL import Image

    source = tmp_path / "source"
    (source / "img").mkdir(parents=True)
    rows = digit_rows(20)
    for k, r in enumerate(rows):
        Image.open(io.BytesIO(r["images"][0]["bytes"])).save(source / "img" / f"{k}.png")
        r["images"] = [f"img/{k}.png"]
    datasets.Dataset.from_list(rows).to_parquet(str(source / "train.parquet"))
    save(digit_rows(4), tmp_path / "embedded")
    monkeypatch.chdir(tmp_path / "source" / "img")  # not where the paths are relative to
    loaded = load_vqa_sources([VQASource("paths", str(source / "train.parquet")),
                               VQASource("embedded", str(tmp_path / "embedded")),
                               VQASource("stream", str(source / "train.parquet"), streaming=True)],
                              cache_dir=str(tmp_path / "hf"))
    expected = digits_vqa("val", 16)[7]["images"][0]
    assert np.array_equal(np.asarray(loaded.rows[7]["images"][0]), np.asarray(expected))
    assert loaded.rows.where(21) == "source 'embedded', row 1"  # sources of different image kinds, side by side
    streamed = next(itertools.islice(loaded.stream, 7, None))  # its path resolved: it reads from anywhere
    assert np.array_equal(np.asarray(VQARows.of([streamed])[0]["images"][0]), np.asarray(expected))


@pytest.mark.parametrize("make, needle", [
    (save, "split='test', but {} is a saved Dataset (not a DatasetDict), which has no splits"),
    (save_parquet, "split='test', but {} is a parquet file or glob, which has no splits"),
])
def test_a_split_is_refused_where_there_are_no_splits(tmp_path, make, needle):
    path = make(digit_rows(4), tmp_path / "plain")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no VQA source could be loaded") as error:
        load_vqa_sources([VQASource("plain", path, split="test")], cache_dir=str(tmp_path / "hf"))
    assert needle.format(path) in str(error.value)
    whole = load_vqa_sources([VQASource("plain", path)], cache_dir=str(tmp_path / "hf")).rows
    assert len(whole) == 4  # the default split is the whole of it


# --- from the command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    rows = digit_rows(40)
    rows[2]["images"][0] = NOT_AN_IMAGE  # a val row (data.val_size=8 takes the first 8)
    rows[20]["images"][0] = NOT_AN_IMAGE  # a training row
    save(rows, folder / "mixed")
    save(_rows_with(images=[NOT_AN_IMAGE]), folder / "unreadable")
    save(_rows_with(texts=[{"question": "q", "answer": "a"}]), folder / "renamed", features=None)
    return folder


@pytest.fixture(scope="module")
def vlm_run(sources, tmp_path_factory):
    run = tmp_path_factory.mktemp("vlm") / "run"
    with pytest.warns(UserWarning) as caught:
        assert vistrain("train", DIGITS, *TINY, f"data.sources=[{{name: mixed, path: {sources / 'mixed'}}}]",
                        f"data.cache_dir={run.parent / 'cache'}", f"run.out_dir={run}") == 0
    return run, [str(w.message) for w in caught]


def test_a_run_skips_an_unreadable_image_names_it_and_counts_it(vlm_run):
    run, warned = vlm_run
    assert any("skipping a training sample: source 'mixed', row 20: images[0] cannot be read" in w for w in warned)
    assert any("validation data: source 'mixed', row 2: images[0] cannot be read" in w for w in warned)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert sum(e["unreadable_frac"] for e in train) > 0 and [e for e in events if e["split"] == "val"]
    assert (run / "checkpoints" / "step_00000004").is_dir()


@pytest.mark.parametrize("overrides, needle", [
    (["data.sources=[{name: unreadable, path: SOURCES/unreadable}]"],
     "no VQA source could be loaded (data.sources): unreadable (SOURCES/unreadable): ValueError: no image of the 16 "
     "rows read can be decoded (row 0: images[0] cannot be read"),
    (["data.val_sources=[{name: renamed, path: SOURCES/renamed}]"],
     "no VQA source could be loaded (data.val_sources): renamed (SOURCES/renamed): ValueError: column 'texts' holds "
     "turns of ['answer', 'question']"),
    (["data.sources=[{name: mixed, path: SOURCES/mixed, split: validation}]"], "split='validation', but"),
    (["data.sources=[{name: mixed, path: SOURCES/mixed}, {name: s, path: SOURCES/mixed, streaming: true}]"],
     "data.sources mixes streaming and map-style sources"),
    (["data.chat_template=llama"], "data.chat_template must be 'chatml' or 'tokenizer', got 'llama'"),
    (["data.min_ratings={relevance: 3}"], "unknown rating columns ['relevance'] in data.min_ratings"),
], ids=["unreadable_source", "bad_val_source", "split", "streaming_and_not", "chat_template", "min_ratings"])
def test_bad_vlm_data_stops_the_start_naming_it_and_touches_nothing(vlm_run, sources, capsys, overrides, needle):
    run, _ = vlm_run
    before = snapshot(run)
    base = [f"data.sources=[{{name: mixed, path: {sources / 'mixed'}}}]", f"data.cache_dir={run.parent / 'cache'}"]
    overrides = [o.replace("SOURCES", str(sources)) for o in overrides]
    status = vistrain("train", DIGITS, *TINY, *base, *overrides, "train.max_steps=6", f"run.out_dir={run}")
    err = capsys.readouterr().err
    assert status == 2, err
    assert needle.replace("SOURCES", str(sources)) in err and "Traceback" not in err
    assert snapshot(run) == before
