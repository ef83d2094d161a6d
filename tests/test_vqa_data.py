"""VQA data for the VLM task: sources, images, token layout, labels, packing, resume, digits, tokenizer."""

import io
import itertools
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.data.loader import MicroBatchStream
from vistrain.data.vqa import (
    DIGITS_QUESTIONS,
    GLOBAL_IMAGE_TOKEN,
    IGNORE_INDEX,
    IM_END,
    IMAGE_TOKEN,
    ImageProcessor,
    PackedOrder,
    PackedVQADataset,
    StreamingPacker,
    VQAEncoder,
    VQASource,
    add_vqa_special_tokens,
    collate_packed,
    collate_padded,
    digits_vqa,
    first_fit_decreasing,
    grid_token,
    image_token_length,
    kept_turns,
    load_vqa_sources,
    sample_lengths,
    train_tokenizer,
    vqa_special_tokens,
    vqa_texts,
)

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

T = 4  # image tokens per tile in these tests (a 32 px tile, patch 8, pixel shuffle 2)
TILE = 32


@pytest.fixture(scope="module")
def digits_val():
    return digits_vqa("val")


@pytest.fixture(scope="module")
def tokenizer(digits_val):
    return train_tokenizer(vqa_texts(digits_val))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return VQAEncoder(tokenizer, ImageProcessor(TILE, 4 * TILE), image_token_length=T)


def solid(width, height, rgb=(10, 200, 255)):
    return Image.new("RGB", (width, height), rgb)


def cauldron_row(texts, n_images=1, **ratings):
    return {"images": [solid(20, 20) for _ in range(n_images)], "texts": texts, **ratings}


def labelled_text(tokenizer, sample):
    keep = sample["labels"] != IGNORE_INDEX
    return tokenizer.decode(sample["input_ids"][keep])


# --- ratings and sources -----------------------------------------------------------------------------------


def test_rating_filters_drop_turns_and_empty_samples(encoder):
    turns = [{"user": f"q{k}", "assistant": f"a{k}"} for k in range(3)]
    sample = cauldron_row(turns, relevance_ratings=[5, 1, 4], formatting_ratings=[2, 5, None])
    mins = {"relevance_ratings": 3, "formatting_ratings": 2}
    assert kept_turns(sample, mins) == [("q0", "a0"), ("q2", "a2")]  # None is unrated: kept
    assert kept_turns(sample, {"relevance_ratings": None}) == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]

    strict = VQAEncoder(encoder.tokenizer, encoder.image_processor, T, min_ratings={"relevance_ratings": 5})
    encoded = strict.encode(sample)
    assert labelled_text(encoder.tokenizer, encoded) == f"a0{IM_END}"  # turns 1 and 2 are gone
    hopeless = cauldron_row(turns[:1], relevance_ratings=[1])
    assert strict.encode(hopeless) is None
    tokens, images = strict.measure([hopeless, sample])
    assert tokens[0] == 0 and tokens[1] == len(encoded["input_ids"]) and images.tolist() == [0, 1]
    with pytest.raises(ValueError, match="data.min_ratings"):
        VQAEncoder(encoder.tokenizer, encoder.image_processor, T, min_ratings={"relevance": 3})


def test_sources_load_from_disk_and_parquet_and_report_failures(tmp_path, digits_val):
    digits_val.select(range(6)).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": digits_val.select(range(2)), "test": digits_val.select(range(3))}).save_to_disk(
        str(tmp_path / "dict")
    )
    rated = datasets.Dataset.from_list(
        [cauldron_row([{"user": "q", "assistant": "a"}], relevance_ratings=[4], source="x") for _ in range(4)]
    )
    rated.to_parquet(str(tmp_path / "rated.parquet"))
    (tmp_path / "hub").mkdir()  # a folder of parquet files, split by file name as on the Hub
    digits_val.select(range(2)).to_parquet(str(tmp_path / "hub" / "train-00000-of-00001.parquet"))
    digits_val.select(range(5)).to_parquet(str(tmp_path / "hub" / "test-00000-of-00001.parquet"))
    sources = [
        VQASource("saved", str(tmp_path / "saved")),
        VQASource("broken", str(tmp_path / "missing.parquet")),
        VQASource("dict", str(tmp_path / "dict"), split="test"),
        VQASource("rated", str(tmp_path / "rated.parquet")),
        VQASource("rated_stream", str(tmp_path / "rated.parquet"), streaming=True),
        VQASource("hub", str(tmp_path / "hub"), split="test"),
    ]
    with pytest.warns(UserWarning, match="'broken'"):
        loaded = load_vqa_sources(sources, cache_dir=str(tmp_path / "hf"))
    assert loaded.loaded == ["saved", "dict", "rated", "rated_stream", "hub"] and list(loaded.failed) == ["broken"]
    assert loaded.sizes == {"saved": 6, "dict": 3, "rated": 4, "hub": 5}
    rows = loaded.rows
    assert len(rows) == 18 and "source" not in rows[12]  # only VQA columns are kept
    assert rows[0]["qtype"] == "digit" and rows[0]["relevance_ratings"] is None  # missing columns are None
    assert rows[12]["relevance_ratings"] == [4] and rows[12]["qtype"] is None
    assert rows[12]["images"][0].size == (20, 20) and rows.where(12) == "source 'rated', row 3"
    assert rows.where(17) == "source 'hub', row 4" and rows.select(range(7, 10)).where(0) == "source 'dict', row 1"
    assert [r["texts"][0]["assistant"] for r in loaded.stream] == ["a"] * 4

    bad = [VQASource("nope", str(tmp_path / "nope")), VQASource("wrong_split", str(tmp_path / "dict"), split="val")]
    with warnings.catch_warnings(), pytest.raises(ValueError, match="nope.*wrong_split"):
        warnings.simplefilter("ignore")
        load_vqa_sources(bad)
    digits_val.select_columns(["texts"]).save_to_disk(str(tmp_path / "no_images"))
    with pytest.warns(UserWarning, match="no_images.*missing column"), pytest.raises(ValueError, match="no VQA"):
        load_vqa_sources([VQASource("no_images", str(tmp_path / "no_images"))])


# --- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, grid",
    [
        ((10, 10), (1, 1)),  # small: one tile, never less
        ((64, 32), (1, 2)),  # (width, height) -> (rows, cols)
        ((100, 50), (2, 3)),  # 50/32 = 1.56 rounds up, 100/32 = 3.1 down: the NEAREST multiple
        ((300, 100), (1, 4)),  # scaled to 128 x 42.7 first
        ((1000, 1000), (4, 4)),  # never past max_image_size
        ((40, 200), (4, 1)),
    ],
)
def test_tile_grid(size, grid):
    tiles, got = ImageProcessor(TILE, 4 * TILE)(solid(*size))
    assert got == grid
    rows, cols = grid
    assert tiles.shape == (1 if rows * cols == 1 else 1 + rows * cols, 3, TILE, TILE)


def test_global_view_first_and_values_normalised():
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    proc = ImageProcessor(TILE, 4 * TILE, mean, std)
    rgb = (10, 200, 255)
    tiles, grid = proc(solid(90, 60, rgb))
    assert grid == (2, 3)
    expected_3 = (torch.tensor(rgb, dtype=torch.float32) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(tiles, expected_3.view(1, 3, 1, 1).expand_as(tiles), rtol=0, atol=1e-6)

    # Left half red, right half blue, 64 x 32 -> one row of two tiles: red, then blue; the global view has both.
    half = Image.new("RGB", (64, 32), (255, 0, 0))
    half.paste((0, 0, 255), (32, 0, 64, 32))
    tiles, grid = ImageProcessor(TILE, 4 * TILE, (0, 0, 0), (1, 1, 1))(half)
    assert grid == (1, 2) and tiles.shape[0] == 3
    assert tiles[0, 0, :, :8].min() == 1 and tiles[0, 2, :, -8:].min() == 1  # global: red left, blue right
    assert tiles[1, 0].min() == 1 and tiles[1, 2].max() == 0  # tile (1, 1): all red
    assert tiles[2, 2].min() == 1 and tiles[2, 0].max() == 0  # tile (1, 2): all blue


def test_grey_and_transparent_images_become_rgb():
    proc = ImageProcessor(TILE, TILE, (0, 0, 0), (1, 1, 1))
    grey, _ = proc(Image.new("L", (16, 16), 51))
    assert grey.shape == (1, 3, TILE, TILE) and torch.allclose(grey, torch.full_like(grey, 0.2))
    clear, _ = proc(Image.new("RGBA", (16, 16), (0, 0, 0, 0)))
    assert clear.min() == 1  # transparent is white paper, not the hidden black
    png = io.BytesIO()
    Image.new("L", (16, 16), 51).save(png, format="PNG")
    from_bytes, _ = proc({"bytes": png.getvalue(), "path": None})  # undecoded datasets image
    assert torch.equal(from_bytes, grey)


def test_image_settings_are_checked():
    assert image_token_length(512, 16, 4) == 64
    with pytest.raises(ValueError, match="data.max_image_size"):
        ImageProcessor(32, 48)
    with pytest.raises(ValueError, match="at most 8"):
        ImageProcessor(32, 9 * 32)


# --- tokens and labels -------------------------------------------------------------------------------------


def test_special_tokens(tokenizer):
    tokens = vqa_special_tokens()
    assert len(tokens) == len(set(tokens)) == 66
    assert tokens[:2] == [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN] and tokens[-1] == "<row_8_col_8>"
    assert add_vqa_special_tokens(tokenizer) == 0  # the trained tokenizer has them all
    plain = train_tokenizer(["hello world"] * 4, special_tokens=[])
    with pytest.raises(ValueError, match="add_vqa_special_tokens"):
        VQAEncoder(plain, ImageProcessor(TILE, TILE), T)
    assert add_vqa_special_tokens(plain) == 66
    VQAEncoder(plain, ImageProcessor(TILE, TILE), T)


def test_token_layout_of_a_2x3_grid(encoder, tokenizer):
    sample = {"images": [solid(90, 60)], "texts": [{"user": "Count?", "assistant": "3"}]}
    out = encoder.encode(sample)
    assert out["num_images"] == 1 and out["pixel_values"].shape == (7, 3, TILE, TILE)
    toks = tokenizer.convert_ids_to_tokens(out["input_ids"].tolist())
    start = toks.index(GLOBAL_IMAGE_TOKEN)
    expected = [GLOBAL_IMAGE_TOKEN] + [IMAGE_TOKEN] * T
    for i in (1, 2):
        for j in (1, 2, 3):
            expected += [grid_token(i, j)] + [IMAGE_TOKEN] * T
    assert toks[start : start + len(expected)] == expected
    header = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert toks[:start] == tokenizer.convert_ids_to_tokens(header)
    assert toks.count(IMAGE_TOKEN) == 7 * T  # one run per tile sent to the encoder
    # The images come before the question text.
    assert tokenizer.decode(out["input_ids"][start + len(expected) :]).startswith("Count?<|im_end|>")


def test_labels_cover_answers_and_end_of_turn_only(encoder, tokenizer):
    turns = [{"user": "What digit is this?", "assistant": "7"}, {"user": "Is it odd?", "assistant": "yes it is"}]
    out = encoder.encode({"images": [solid(20, 20), solid(20, 20)], "texts": turns})
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    runs = [list(g) for k, g in itertools.groupby(range(len(ids)), key=lambda t: bool(keep[t])) if k]
    assert [tokenizer.decode(ids[r]) for r in runs] == [f"7{IM_END}", f"yes it is{IM_END}"]
    assert not keep[0]  # a packed neighbour is never trained to predict this sample's first token
    text = tokenizer.decode(ids)
    assert text.count(GLOBAL_IMAGE_TOKEN) == 2 and text.index(GLOBAL_IMAGE_TOKEN) < text.index("What digit")
    assert text.count(IMAGE_TOKEN) == 2 * T and "Is it odd?" in text.split(IM_END)[2]
    # The tokenizer's own chat template (ChatML here) gives the same ids and labels.
    templated = VQAEncoder(tokenizer, encoder.image_processor, T, chat_template="tokenizer")
    again = templated.encode({"images": [solid(20, 20), solid(20, 20)], "texts": turns})
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["labels"], labels)
    # measure() agrees with encode() without touching pixels.
    tokens, images = encoder.measure([{"images": [solid(90, 60)], "texts": turns}])
    assert images[0] == 1 and tokens[0] == len(encoder.encode({"images": [solid(90, 60)], "texts": turns})["input_ids"])


def test_tokenizer_chat_template_with_a_system_prompt(digits_val):
    tok = train_tokenizer(vqa_texts(digits_val))
    tok.chat_template = (
        "<|im_start|>system\nYou look at digits.<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = VQAEncoder(tok, ImageProcessor(TILE, TILE), T, chat_template="tokenizer")
    turns = [{"user": "a?", "assistant": " 7 "}, {"user": "b?", "assistant": "no"}]
    out = enc.encode({"images": [], "texts": turns})
    keep = out["labels"] != IGNORE_INDEX
    runs = [list(g) for k, g in itertools.groupby(range(len(keep)), key=lambda t: bool(keep[t])) if k]
    assert [tok.decode(out["input_ids"][r]) for r in runs] == [f"7{IM_END}", f"no{IM_END}"]
    assert tok.decode(out["input_ids"]).startswith("<|im_start|>system\nYou look at digits.")
    assert out["pixel_values"].shape == (0, 3, TILE, TILE) and out["num_images"] == 0

    tok.chat_template = "{% for m in messages[-2:] %}{{ m['content'] }}<|im_end|>{% endfor %}"  # forgets turns
    with pytest.raises(ValueError, match="data.chat_template=chatml"):
        VQAEncoder(tok, ImageProcessor(TILE, TILE), T, chat_template="tokenizer").encode({"images": [], "texts": turns})
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        VQAEncoder(tok, ImageProcessor(TILE, TILE), T, chat_template="tokenizer")


def test_prompt_for_generation(encoder, tokenizer, digits_val):
    prompt = encoder.encode_prompt(digits_val[0])
    assert prompt["answer"] == digits_val[0]["texts"][0]["assistant"] and prompt["qtype"] == "digit"
    assert tokenizer.decode(prompt["input_ids"]).endswith("What digit is this?<|im_end|>\n<|im_start|>assistant\n")
    full = encoder.encode(digits_val[0])["input_ids"]
    assert torch.equal(full[: len(prompt["input_ids"])], prompt["input_ids"])


# --- lengths and the packed order --------------------------------------------------------------------------


def test_lengths_are_cached_on_disk(tmp_path, encoder, digits_val, monkeypatch):
    small = digits_val.select(list(range(0, 540, 45)))
    tokens, images = sample_lengths(small, encoder, cache_dir=str(tmp_path))
    assert tokens.tolist() == [len(encoder.encode(small[i])["input_ids"]) for i in range(len(small))]
    assert images.tolist() == [len(small[i]["images"]) for i in range(len(small))]
    assert len(list(tmp_path.glob("vqa_lengths/*/lengths.npy"))) == 1

    def no_measuring(samples):
        raise AssertionError("lengths were recomputed instead of read from the cache")

    monkeypatch.setattr(encoder, "measure", no_measuring)
    cached = sample_lengths(small, encoder, cache_dir=str(tmp_path))
    assert np.array_equal(cached[0], tokens) and np.array_equal(cached[1], images)


def random_lengths(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 120, n), rng.integers(0, 4, n)


def test_bins_respect_length_and_image_caps_and_drops_are_counted():
    tokens, images = random_lengths()
    tokens[[3, 7]] = [129, 500]  # too long
    images[11] = 9  # too many images
    tokens[13] = 0  # every turn filtered out
    with pytest.warns(UserWarning, match="2 of 300 samples are longer than data.seq_length=128"):
        order = PackedOrder(tokens, images, seq_length=128, max_images_per_pack=5, seed=1, window=64)
    assert (order.num_too_long, order.num_too_many_images, order.num_empty) == (2, 1, 1)
    assert order.num_samples == 296 and order.windows_per_epoch == 5
    bins = order.keys(0, 400)
    for b in bins:
        idx = [i for i, _ in b]
        assert 0 < tokens[idx].sum() <= 128 and images[idx].sum() <= 5
        assert not {3, 7, 11, 13} & set(idx)
    # Windows: the bins of each window hold each sample at most once; an epoch covers every sample once.
    epoch_bins, position = [], 0
    for w in range(order.windows_per_epoch):
        count = order._starts[w + 1] - order._starts[w]
        window = [i for b in bins[position : position + count] for i, _ in b]
        assert len(window) == len(set(window)) <= 60
        epoch_bins += window
        position += count
    assert sorted(epoch_bins) == sorted(set(range(300)) - {3, 7, 11, 13})


def test_packed_order_is_a_pure_function_of_seed_and_position():
    tokens, images = random_lengths()
    a = PackedOrder(tokens, images, 128, 5, seed=7, window=50)
    reference = a.keys(0, 300)  # several epochs of bins
    b = PackedOrder(tokens, images, 128, 5, seed=7, window=50)
    assert b.keys(250, 50) + b.keys(0, 250) == reference[250:] + reference[:250]  # out of order
    c = PackedOrder(tokens, images, 128, 5, seed=7, window=50)
    assert [c.keys(p, 1)[0] for p in (123, 7, 299, 124)] == [reference[p] for p in (123, 7, 299, 124)]
    assert PackedOrder(tokens, images, 128, 5, seed=8, window=50).keys(0, 50) != reference[:50]
    # Sample seeds differ between epochs, and bins are shuffled: not in first-fit order within a window.
    seeds = [s for b in reference for _, s in b]
    assert len(set(seeds)) == len(seeds)
    first_window = reference[: a._starts[1]]
    assert [sum(tokens[i] for i, _ in b) for b in first_window] != sorted(
        (sum(tokens[i] for i, _ in b) for b in first_window), reverse=True
    )


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 7, 3, 2], [0, 0, 0, 0], 10, 4) == [[1, 2], [0, 3]]
    assert first_fit_decreasing([1, 1, 1], [2, 2, 1], 10, 3) == [[0, 2], [1]]  # the image cap opens a bin
    with pytest.raises(ValueError):
        first_fit_decreasing([11], [0], 10, 4)


# --- packed rows -------------------------------------------------------------------------------------------


def test_packed_rows_restart_positions_and_separate_documents(encoder, tokenizer, digits_val):
    pad = tokenizer.pad_token_id
    data = PackedVQADataset(digits_val, encoder, seq_length=96, pad_id=pad)
    bin_keys = [(0, 11), (539, 12), (200, 13)]  # a digit, a pair and a parity question
    encoded = [encoder.encode(digits_val[i]) for i, _ in bin_keys]
    lengths = [len(e["input_ids"]) for e in encoded]
    row = data[bin_keys]
    S, total = 96, sum(lengths)
    assert row["input_ids"].shape == row["labels"].shape == row["doc_ids"].shape == row["position_ids"].shape == (S,)
    pieces = [*lengths, S - total]  # three samples, then the padding
    assert row["doc_ids"].tolist() == [d for d, n in enumerate(pieces) for _ in range(n)]
    assert row["position_ids"].tolist() == [p for n in pieces for p in range(n)]
    assert torch.equal(row["input_ids"][:total], torch.cat([e["input_ids"] for e in encoded]))
    assert (row["input_ids"][total:] == pad).all() and (row["labels"][total:] == IGNORE_INDEX).all()
    assert torch.equal(row["pixel_values"], torch.cat([e["pixel_values"] for e in encoded]))
    assert (row["num_samples"], row["num_images"], row["num_tokens"]) == (3, 4, total)
    assert row["num_loss_tokens"] == sum(int((e["labels"] != IGNORE_INDEX).sum()) for e in encoded) == 6

    batch = collate_packed([row, data[[(5, 0)]]])
    assert batch["input_ids"].shape == batch["doc_ids"].shape == (2, S)
    assert batch["pixel_values"].shape == (5, 3, TILE, TILE)
    assert (batch["num_samples"], batch["num_images"]) == (4, 5)
    assert batch["num_tokens"] == total + len(encoder.encode(digits_val[5])["input_ids"])


def test_padded_batches_for_validation_and_generation(encoder, tokenizer, digits_val):
    samples = [encoder.encode(digits_val[i]) for i in (0, 539)]  # one image, then two
    batch = collate_padded(samples, pad_id=tokenizer.pad_token_id)
    n0, n1 = (len(s["input_ids"]) for s in samples)
    assert n1 > n0 and batch["input_ids"].shape == batch["labels"].shape == (2, n1)
    assert batch["lengths"].tolist() == [n0, n1] and batch["images_per_row"].tolist() == [1, 2]
    assert batch["attention_mask"][0].tolist() == [True] * n0 + [False] * (n1 - n0)
    assert batch["doc_ids"][0].tolist() == [0] * n0 + [1] * (n1 - n0) and (batch["doc_ids"][1] == 0).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all() and batch["pixel_values"].shape[0] == 3
    prompts = collate_padded([encoder.encode_prompt(digits_val[i]) for i in (0, 539)], tokenizer.pad_token_id)
    assert "labels" not in prompts and prompts["qtype"] == ["digit", "same"] and prompts["answer"][1] in ("yes", "no")


def test_micro_batch_stream_of_packed_rows_resumes(encoder, tokenizer, digits_val):
    tokens, images = encoder.measure([digits_val[i] for i in range(len(digits_val))])
    order = PackedOrder(tokens, images, seq_length=128, max_images_per_pack=6, seed=3, window=256)
    data = PackedVQADataset(digits_val, encoder, 128, tokenizer.pad_token_id)

    def stream():
        return MicroBatchStream(data, order, 2, rank=0, world_size=1, num_workers=0, collate_fn=collate_packed)

    s = stream()
    batches = list(itertools.islice(s, 4))
    assert batches[0]["input_ids"].shape == (2, 128) and all(b["num_images"] <= 12 for b in batches)
    resumed = stream()
    resumed.load_state_dict({"position": 4})
    resumed.num_workers = 2  # loader workers change nothing
    nxt = next(resumed)
    assert torch.equal(nxt["input_ids"], batches[2]["input_ids"])
    assert torch.equal(nxt["pixel_values"], batches[2]["pixel_values"])


# --- streaming ---------------------------------------------------------------------------------------------


def test_streaming_packer_resumes_by_skipping_and_ends(encoder, tokenizer, digits_val):
    stream = digits_val.select(range(0, 540, 9)).to_iterable_dataset()  # 60 samples

    def packer():
        return StreamingPacker(stream, encoder, 128, 6, tokenizer.pad_token_id, buffer_size=16, seed=5)

    reference = list(packer())
    assert sum(r["num_samples"] for r in reference) == 60 and all(r["num_tokens"] <= 128 for r in reference)
    p = packer()
    states = []
    for _ in range(len(reference)):
        states.append(p.state_dict())
        next(p)
    with pytest.raises(StopIteration):
        next(p)
    with pytest.raises(StopIteration):
        next(p)  # stays ended
    for k in (1, len(reference) // 2, len(reference) - 1):
        resumed = packer()
        resumed.load_state_dict(states[k])
        rest = list(resumed)
        assert [r["input_ids"].tolist() for r in rest] == [r["input_ids"].tolist() for r in reference[k:]]
    assert states[-1]["samples"] == 48 and p.samples_consumed == 60


# --- the digits data and its tokenizer ---------------------------------------------------------------------


def test_digits_vqa_questions_answers_and_pairs(digits_val):
    rows = digits_val.with_format("arrow")[:].to_pylist()  # images as PNG bytes: comparable
    assert len(rows) == 3 * 180
    by_type = {q: [r for r in rows if r["qtype"] == q] for q in DIGITS_QUESTIONS}
    assert {q: len(v) for q, v in by_type.items()} == {"digit": 180, "parity": 180, "same": 180}
    label_of = {}
    for r in by_type["digit"]:
        (turn,) = r["texts"]
        assert turn["user"] == "What digit is this?" and turn["assistant"] in [str(d) for d in range(10)]
        label_of[r["images"][0]["bytes"]] = int(turn["assistant"])
    assert sorted(label_of.values()) == sorted(list(range(10)) * 18)
    for r in by_type["parity"]:
        (turn,) = r["texts"]
        assert turn["user"] == "Is this digit even or odd?"
        assert turn["assistant"] == ("even" if label_of[r["images"][0]["bytes"]] % 2 == 0 else "odd")
    answers = []
    for r in by_type["same"]:
        (turn,) = r["texts"]
        a, b = (label_of[im["bytes"]] for im in r["images"])  # both images come from the same split
        assert turn["user"] == "Do these two images show the same digit?" and r["images"][0] != r["images"][1]
        assert turn["assistant"] == ("yes" if a == b else "no")
        answers.append(turn["assistant"])
    assert answers.count("yes") == answers.count("no") == 90
    image = digits_val[0]["images"][0]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert digits_vqa("val", image_size=16)[0]["images"][0].size == (16, 16)


def test_digits_train_asks_four_balanced_pair_questions_per_image():
    # Enough distinct pairs that the default learns to compare two digits rather than recite fixed pairs.
    rows = digits_vqa("train", 16).with_format("arrow")[:].to_pylist()
    assert Counter(r["qtype"] for r in rows) == {"digit": 1617, "parity": 1617, "same": 4 * 1617}
    label_of = {r["images"][0]["bytes"]: int(r["texts"][0]["assistant"]) for r in rows if r["qtype"] == "digit"}
    assert len(label_of) == 1617
    answers_as_first = {image: [] for image in label_of}
    pairs = set()
    for r in rows:
        if r["qtype"] != "same":
            continue
        (turn,) = r["texts"]
        first, second = (im["bytes"] for im in r["images"])
        assert turn["user"] == DIGITS_QUESTIONS["same"] and first != second
        assert turn["assistant"] == ("yes" if label_of[first] == label_of[second] else "no")  # KeyError: not train
        answers_as_first[first].append(turn["assistant"])
        pairs.add((first, second))
    # every image is compared twice with its own digit and twice with another, and the pairs are distinct
    assert all(sorted(a) == ["no", "no", "yes", "yes"] for a in answers_as_first.values())
    assert len(pairs) > 0.99 * 4 * 1617


def test_digits_val_images_are_held_out(digits_val):
    train = digits_vqa("train")
    train_images = {r["images"][0]["bytes"] for r in train.with_format("arrow")[:1617].to_pylist()}
    val_images = {r["images"][0]["bytes"] for r in digits_val.with_format("arrow")[:180].to_pylist()}
    assert len(train_images) == 1617 and len(val_images) == 180 and not train_images & val_images


def test_trained_tokenizer(tokenizer, tmp_path):
    for answer in [str(d) for d in range(10)] + ["odd", "even", "yes", "no"]:
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1, answer
    for text in ["Is this digit even or odd?", "  spaces\tand\nnew lines  ", "unseen: Zürich 東京 ✓", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token == IM_END
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "<|im_start|>user\n<|global_image|><|image|><row_2_col_3>What digit is this?<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
