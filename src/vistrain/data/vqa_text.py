"""A VQA sample -> token ids, loss labels and image tiles; the special tokens; a small trainable tokenizer.

Token layout of one sample (ChatML, the default template):

    <|im_start|>user\\n IMAGES question<|im_end|>\\n<|im_start|>assistant\\n answer<|im_end|>\\n  (more turns)
                                                                            ^^^^^^^^^^^^^^^^^ loss

where IMAGES, for each image in order, is

    <|global_image|> <|image|> x T                          the global view
    <row_1_col_1> <|image|> x T  <row_1_col_2> ...          each tile, row-major (only for 2+ tiles)

and T = image_token_length, the encoder's tokens per tile after pixel shuffle. Images go before the text of
the first user turn. With ``image_labels`` (nanoVLM's layout) a sample of several images puts the plain text
``<image: k>`` (k from 0) before each image's tokens; a single image gets no label. The loss covers each
answer and its end-of-turn token, so the model learns to stop; every other token has label -100. Labels are
aligned with input_ids: the model shifts them.

One code path builds the text and the character spans of the answers, tokenises the whole text once and
labels the tokens that overlap a span. With ``chat_template="tokenizer"`` the tokenizer's own chat template
renders the text instead; an answer's span is then what rendering its turn added, without trailing
whitespace (for ChatML-like templates: the answer and the end-of-turn token).

The ``"smolvlm"`` layout (IMAGE_LAYOUTS) is SmolVLM's and Idefics3's, as transformers' Idefics3Processor
writes it, so that such a model is trained and asked here as it was made:

    <|im_start|>User:IMAGES question<end_of_utterance>\\nAssistant: answer<end_of_utterance>\\n
                                                                   ^^^^^^^^^^^^^^^^^^^^^^^^^ loss

rendered by the tokenizer's chat template with structured content (an ``{"type": "image"}`` item per image,
then the text), each ``<image>`` it writes then replaced by that image's tokens:

    <fake_token_around_image><row_1_col_1><image> x T ... <fake_token_around_image><row_1_col_C><image> x T \\n
    ... one line per row of tiles ...
    \\n<fake_token_around_image><global-img><image> x T<fake_token_around_image>      the global view, LAST

or, for an image of one tile, ``<fake_token_around_image><global-img><image> x T<fake_token_around_image>``.
Its tiles come in that order too (vqa_images.py, resize "smolvlm"), and ``<end_of_utterance>`` ends a turn.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

from vistrain.data.vqa_images import (
    SMOLVLM_MAX_GRID_SIDE,
    SMOLVLM_MODES,
    ImageProcessor,
    UnreadableImage,
    as_pil,
    images_of,
    load_images,
)
from vistrain.errors import ConfigError

IMAGE_TOKEN = "<|image|>"
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
IMAGE_LAYOUTS = ("vistrain", "smolvlm")  # the module docstring shows both
# SmolVLM / Idefics3 (transformers' Idefics3Processor): image token, the token around each image and tile, the
# global view's tag, the end of a turn
SMOLVLM_IMAGE_TOKEN, FAKE_IMAGE_TOKEN, SMOLVLM_GLOBAL_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD_TOKEN = "<|pad|>"
IGNORE_INDEX = -100  # label of tokens without loss (the value torch's cross_entropy ignores by default)
UNREADABLE = -1  # the token count ``measure`` gives a sample with an image it cannot read

# the_cauldron's per-turn quality ratings (1..5); a turn rated below the minimum of any column is dropped.
RATING_COLUMNS = (
    "relevance_ratings",
    "image_correspondence_ratings",
    "visual_dependency_ratings",
    "formatting_ratings",
)
DEFAULT_MIN_RATINGS = {c: 1 for c in RATING_COLUMNS}

# A ChatML template for tokenizers trained here, so chat_template="tokenizer" works with them too.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def grid_token(row: int, col: int) -> str:
    """The token before the tile at (row, col), both counted from 1."""
    return f"<row_{row}_col_{col}>"


def vqa_special_tokens() -> list[str]:
    """The 66 image special tokens: image, global image and the 8 x 8 row/column tokens."""
    return [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN] + [grid_token(i, j) for i in range(1, 9) for j in range(1, 9)]


def smolvlm_special_tokens() -> list[str]:
    """SmolVLM's 40 special tokens: the around-image token, image, end of utterance (Idefics3Processor adds these
    three), the global image tag and the 6 x 6 row/column tokens it looks up."""
    side = SMOLVLM_MAX_GRID_SIDE
    return [FAKE_IMAGE_TOKEN, SMOLVLM_IMAGE_TOKEN, END_OF_UTTERANCE, SMOLVLM_GLOBAL_TOKEN] + [
        grid_token(i, j) for i in range(1, side + 1) for j in range(1, side + 1)]


# SmolVLM's chat format for a model trained here with the smolvlm layout (an imported model keeps its own
# template): "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n", the
# colon without a space before an image. Content is a list of {"type": "image"} and {"type": "text"} items.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}{{ part['text'] if part['type'] == 'text' else '<image>' }}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def layout_special_tokens(layout: str) -> list[str]:
    """The image (and end-of-turn) tokens a tokenizer needs for an image layout."""
    return smolvlm_special_tokens() if layout == "smolvlm" else vqa_special_tokens()


def layout_eos_token(layout: str) -> str:
    """The token that ends an answer in an image layout (with the chatml template for vistrain's)."""
    return END_OF_UTTERANCE if layout == "smolvlm" else IM_END


def image_token_length(tile_size: int, patch_size: int, pixel_shuffle_factor: int) -> int:
    """Tokens per tile: (tile / patch)^2 patches, merged pixel_shuffle_factor^2 at a time (64 for 512/16/4)."""
    if tile_size % patch_size:
        raise ValueError(f"data.tile_size={tile_size} is not a multiple of the encoder's patch size {patch_size}.")
    side = tile_size // patch_size
    if side % pixel_shuffle_factor:
        raise ValueError(
            f"{side} x {side} patches per tile cannot be pixel-shuffled by a factor {pixel_shuffle_factor}: "
            f"the patch grid side must be a multiple of it."
        )
    return (side // pixel_shuffle_factor) ** 2


def add_vqa_special_tokens(tokenizer: Any, chatml: bool = True) -> int:
    """Add the image tokens (and ChatML's, if ``chatml`` and missing) as special tokens; returns how many
    were new -- resize the language model's embeddings by that much.

    Special tokens are matched verbatim before any other splitting, are never merged with neighbours and
    are dropped by ``decode(..., skip_special_tokens=True)``.
    """
    return _add_special_tokens(tokenizer, vqa_special_tokens() + ([IM_START, IM_END] if chatml else []))


def add_layout_tokens(tokenizer: Any, layout: str) -> int:
    """``add_vqa_special_tokens`` for an image layout: for "smolvlm", SmolVLM's tokens and SmolVLM's chat template
    (this layout renders with the tokenizer's template). Returns how many tokens were new."""
    if layout != "smolvlm":
        return add_vqa_special_tokens(tokenizer)
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    return _add_special_tokens(tokenizer, smolvlm_special_tokens())


def _add_special_tokens(tokenizer: Any, wanted: Sequence[str]) -> int:
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [AddedToken(t, special=True, normalized=False) for t in wanted if t not in vocab]
    return tokenizer.add_tokens(new, special_tokens=True) if new else 0


def _usable(turn: Any, answered: bool = True) -> bool:
    """A turn trains the model: a dict with a ``user`` text (may be empty: a caption prompt) and an answer
    (a non-empty text). A question to answer (``answered=False``) needs no answer."""
    if not isinstance(turn, Mapping) or not isinstance(turn.get("user"), str):
        return False
    assistant = turn.get("assistant")
    return not answered or isinstance(assistant, str) and bool(assistant.strip())


def kept_turns(
    sample: Mapping[str, Any], min_ratings: Mapping[str, Optional[int]], answered: bool = True
) -> list[tuple[str, str]]:
    """The (user, assistant) turns of a sample that are usable and whose ratings all reach their minimum.

    A usable turn is a {"user": str, "assistant": non-empty str} dict (``turn_problem`` says what is wrong
    with a sample that has none); with ``answered=False`` (prompts) the answer may be missing. A sample
    without a rating column, or a turn without a rating in it (shorter list, None, not a number), is unrated
    there and kept: only a rating known to be low drops a turn.
    """
    turns = sample.get("texts")
    if not isinstance(turns, (list, tuple)):
        return []
    keep = [_usable(t, answered) for t in turns]
    for column, minimum in min_ratings.items():
        ratings = sample.get(column)
        if minimum is None or not isinstance(ratings, (list, tuple)):
            continue
        for k, rating in enumerate(ratings[: len(turns)]):
            if isinstance(rating, (int, float)) and rating < minimum:
                keep[k] = False
    return [(t["user"], t.get("assistant") or "") for t, ok in zip(turns, keep) if ok]


def turn_problem(texts: Any) -> Optional[str]:
    """Why a sample's ``texts`` holds no usable turn, naming the first bad turn and key; None if one is usable."""
    if not isinstance(texts, (list, tuple)):
        return f"texts is {_kind(texts)}, not a list of {{user, assistant}} turns"
    if not texts:
        return "texts is an empty list"
    if any(_usable(t) for t in texts):
        return None
    turn = texts[0]
    if not isinstance(turn, Mapping):
        return f"texts[0] is {_kind(turn)}, not a {{user, assistant}} dict"
    if "user" not in turn or "assistant" not in turn:
        return f"texts[0] has the keys {sorted(turn)}; a turn needs 'user' and 'assistant'"
    if not isinstance(turn["user"], str):
        return f"texts[0].user is {_kind(turn['user'])}, not a text"
    return f"texts[0].assistant is {_kind(turn['assistant'])}, not a non-empty text"


def _kind(value: Any) -> str:
    if value is None or value == "":
        return repr(value)
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return f"a {type(value).__name__}"


class VQAEncoder:
    """Turns the_cauldron-shaped samples (``images`` + ``texts`` + optional ratings) into training rows.

    Args:
        tokenizer: a ``transformers`` fast tokenizer (a ``PreTrainedTokenizerFast``: one trained with
            ``train_tokenizer`` or a model's tokenizer folder) that already has the special tokens
            (``add_vqa_special_tokens``).
        image_processor: resizes and tiles the images.
        image_token_length: T, the image tokens per tile.
        chat_template: "chatml" (built here) or "tokenizer" (``tokenizer.apply_chat_template``).
        min_ratings: minimum rating per rating column (None or absent: no filter on that column); defaults
            to 1 on every column, which drops only turns rated 0.
        image_labels: ``<image: k>`` before each image of a multi-image sample, as nanoVLM writes them.
        layout: "vistrain" or "smolvlm" (see the module docstring): SmolVLM's tokens and prompt, which need
            chat_template="tokenizer" (SmolVLM's template) and an image processor of a smolvlm resize mode.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor,
        image_token_length: int,
        chat_template: str = "chatml",
        min_ratings: Optional[Mapping[str, Optional[int]]] = None,
        image_labels: bool = False,
        layout: str = "vistrain",
    ) -> None:
        _check_layout(layout, chat_template, image_processor, image_labels)
        if chat_template not in ("chatml", "tokenizer"):
            raise ConfigError(f"data.chat_template must be 'chatml' or 'tokenizer', got {chat_template!r}.")
        if chat_template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.chat_template=tokenizer, but this tokenizer has no chat template; use data.chat_template="
                "chatml or a tokenizer folder whose tokenizer_config.json defines one."
            )
        if image_token_length < 1:
            raise ValueError(f"image_token_length must be >= 1, got {image_token_length}.")
        min_ratings = dict(DEFAULT_MIN_RATINGS if min_ratings is None else min_ratings)
        unknown = sorted(set(min_ratings) - set(RATING_COLUMNS))
        if unknown:
            raise ConfigError(f"unknown rating columns {unknown} in data.min_ratings; valid: {list(RATING_COLUMNS)}.")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_length = image_token_length
        self.chat_template = chat_template
        self.min_ratings = min_ratings
        self.image_labels = bool(image_labels)
        self.layout = layout
        needed = layout_special_tokens(layout) + ([IM_START, IM_END] if chat_template == "chatml" else [])
        missing = [t for t in needed if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
        if missing:
            add = ("vistrain.data.vqa.add_vqa_special_tokens(tokenizer)" if layout == "vistrain"
                   else f"vistrain.data.vqa_text.add_layout_tokens(tokenizer, {layout!r})")
            raise ValueError(
                f"the tokenizer splits {len(missing)} special token(s) ({', '.join(missing[:3])}, ...): call "
                f"{add} first and resize the embeddings."
            )
        image_token = SMOLVLM_IMAGE_TOKEN if layout == "smolvlm" else IMAGE_TOKEN
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))

    # --- text -----------------------------------------------------------------------------------------

    def image_string(self, rows: int, cols: int) -> str:
        if self.layout == "smolvlm":
            return self._smolvlm_image_string(rows, cols)
        run = IMAGE_TOKEN * self.image_token_length
        parts = [GLOBAL_IMAGE_TOKEN + run]
        if rows * cols > 1:  # a 1 x 1 grid is the global view alone (vqa_images.py says why)
            parts += [grid_token(i, j) + run for i in range(1, rows + 1) for j in range(1, cols + 1)]
        return "".join(parts)

    def images_string(self, grids: Sequence[tuple[int, int]]) -> str:
        """The tokens of all images of a sample, in order (with their labels under image_labels)."""
        labelled = self.image_labels and len(grids) > 1
        return "".join((f"<image: {k}>" if labelled else "") + self.image_string(r, c)
                       for k, (r, c) in enumerate(grids))

    def _smolvlm_image_string(self, rows: int, cols: int) -> str:
        """Idefics3Processor's tokens of one image: its tiles a line per row, then the global view."""
        run = SMOLVLM_IMAGE_TOKEN * self.image_token_length
        glob = FAKE_IMAGE_TOKEN + SMOLVLM_GLOBAL_TOKEN + run + FAKE_IMAGE_TOKEN
        if rows * cols == 1:
            return glob
        lines = ["".join(FAKE_IMAGE_TOKEN + grid_token(i, j) + run for j in range(1, cols + 1)) + "\n"
                 for i in range(1, rows + 1)]
        return "".join(lines) + "\n" + glob

    def _messages(self, turns: Sequence[tuple[str, str]], grids: Sequence[tuple[int, int]]) -> list[dict]:
        if self.layout == "smolvlm":  # structured content: the template writes <image> for each image item
            images, text = [{"type": "image"}] * len(grids), lambda t: [{"type": "text", "text": t}]
            messages = []
            for k, (user, assistant) in enumerate(turns):
                messages.append({"role": "user", "content": (images if k == 0 else []) + text(user)})
                messages.append({"role": "assistant", "content": text(assistant)})
            return messages
        images = self.images_string(grids)
        messages = []
        for k, (user, assistant) in enumerate(turns):
            messages.append({"role": "user", "content": (images if k == 0 else "") + user})
            messages.append({"role": "assistant", "content": assistant})
        return messages

    def _conversation(self, turns: Sequence[tuple[str, str]],
                      grids: Sequence[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        return self._render(self._messages(turns, grids), grids)

    def _chat(self, messages: list[dict], prompt: bool, grids: Sequence[tuple[int, int]]) -> str:
        """The tokenizer's chat template on messages; under the smolvlm layout each <image> it wrote is replaced by
        that image's tokens, as Idefics3Processor does with the text it is given."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        if self.layout != "smolvlm":
            return text
        parts = text.split(SMOLVLM_IMAGE_TOKEN)
        if len(parts) != len(grids) + 1:
            raise ValueError(f"the tokenizer's chat template wrote {len(parts) - 1} {SMOLVLM_IMAGE_TOKEN} for "
                             f"{len(grids)} image(s): it is not a SmolVLM template (image items as "
                             "{'type': 'image'})")
        return parts[0] + "".join(self.image_string(*grid) + part for grid, part in zip(grids, parts[1:]))

    def _render(self, messages: list[dict], grids: Sequence[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans that carry loss."""
        if self.chat_template == "chatml":
            text, spans = "", []
            for m in messages:
                text += f"{IM_START}{m['role']}\n"
                start = len(text)
                text += m["content"] + IM_END
                if m["role"] == "assistant":
                    spans.append((start, len(text)))
                text += "\n"
            return text, spans
        return self._render_with_tokenizer(messages, grids)

    def _render_with_tokenizer(self, messages: list[dict],
                               grids: Sequence[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        def render(msgs: list[dict], prompt: bool) -> str:
            return self._chat(msgs, prompt, grids)

        text = render(messages, False)
        spans = []
        for k in range(1, len(messages), 2):
            prefix, upto = render(messages[:k], True), render(messages[: k + 1], False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise ValueError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so the answers cannot be located; use data.chat_template=chatml."
                )
            spans.append((len(prefix), len(upto.rstrip())))
        return text, spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        loss = np.zeros(len(ids), dtype=bool)
        for s0, s1 in spans:  # a token overlapping an answer is part of it (a merge across its border, say)
            loss |= (offsets[:, 1] > s0) & (offsets[:, 0] < s1)
        labels = torch.where(torch.from_numpy(loss), ids, torch.full_like(ids, IGNORE_INDEX))
        return ids, labels

    # --- samples --------------------------------------------------------------------------------------

    def turns(self, sample: Mapping[str, Any], answered: bool = True) -> list[tuple[str, str]]:
        return kept_turns(sample, self.min_ratings, answered)

    def _grids(self, sample: Mapping[str, Any]) -> list[tuple[int, int]]:
        # PIL reads the size from the header: no pixels are decoded here.
        return [self.image_processor.grid(*as_pil(im).size) for im in images_of(sample)]

    def encode(self, sample: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """``{input_ids (L,), labels (L,), pixel_values (V, 3, tile, tile), num_images}``; None if no turn is
        usable or every turn was filtered out. V counts the tiles of all images, in the order their tokens
        appear. Raises UnreadableImage for an image that cannot be decoded."""
        turns = self.turns(sample)
        if not turns:
            return None
        pixel_values, grids = self._images(sample)
        ids, labels = self._tokenize(*self._conversation(turns, grids))
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "num_images": len(grids),
        }

    def measure(self, samples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, images) per sample, as ``encode`` would give them, without processing pixels; a sample
        that ``encode`` gives None has 0 tokens, one with an image whose header cannot be read UNREADABLE.
        Tokenises the batch in one call (the Rust tokenizer's threads)."""
        texts, where = [], []
        images = np.zeros(len(samples), dtype=np.int64)
        tokens = np.zeros(len(samples), dtype=np.int64)
        for i, sample in enumerate(samples):
            turns = self.turns(sample)
            if turns:
                try:
                    grids = self._grids(sample)
                except UnreadableImage:
                    tokens[i] = UNREADABLE
                    continue
                texts.append(self._conversation(turns, grids)[0])
                where.append(i)
                images[i] = len(grids)
        if texts:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            tokens[where] = [len(x) for x in ids]
        return tokens, images

    def encode_prompt(self, sample: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """The first kept turn as a generation prompt: ``{input_ids (up to and including the assistant
        header), pixel_values, num_images, answer (the reference text), qtype (or None)}``. The turn needs
        no answer."""
        turns = self.turns(sample, answered=False)
        if not turns:
            return None
        pixel_values, grids = self._images(sample)
        user = self._messages(turns[:1], grids)[:1]
        if self.chat_template == "chatml":
            text = f"{IM_START}user\n{user[0]['content']}{IM_END}\n{IM_START}assistant\n"
        else:
            text = self._chat(user, True, grids)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_images": len(grids),
            "answer": turns[0][1],
            "qtype": sample.get("qtype"),
        }

    def _images(self, sample: Mapping[str, Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """All tiles of the sample's images, in token order, and each image's grid."""
        tiles, grids = [], []
        for image in load_images(images_of(sample)):
            views, grid = self.image_processor(image)
            tiles.append(views)
            grids.append(grid)
        t = self.image_processor.tile_size
        return (torch.cat(tiles) if tiles else torch.zeros(0, 3, t, t)), grids

    def fingerprint(self) -> str:
        """A hash of everything that decides a sample's token count: a length cache's key."""
        tok = self.tokenizer
        settings = {
            "version": 2,  # 2: unusable turns are dropped, unreadable images measured as UNREADABLE
            "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
            "chat_template": self.chat_template,
            "template_text": tok.chat_template if self.chat_template == "tokenizer" else None,
            "image_token_length": self.image_token_length,
            "tile_size": self.image_processor.tile_size,
            "max_image_size": self.image_processor.max_image_size,
            "min_ratings": sorted(self.min_ratings.items()),
        }
        # only when not the defaults, so that the caches of earlier versions stay valid
        resize = getattr(self.image_processor, "resize", "vistrain")
        if resize != "vistrain":
            settings["image_resize"] = resize
        if self.image_labels:
            settings["image_labels"] = True
        if self.layout != "vistrain":
            settings["image_layout"] = self.layout
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_layout(layout: str, chat_template: str, image_processor: ImageProcessor, image_labels: bool) -> None:
    """The smolvlm layout is SmolVLM's whole prompt: its template, its image processing, no nanoVLM labels."""
    if layout not in IMAGE_LAYOUTS:
        raise ConfigError(f"data.image_layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {layout!r}.")
    smolvlm_images = getattr(image_processor, "resize", "vistrain") in SMOLVLM_MODES
    if layout == "smolvlm" and (chat_template != "tokenizer" or not smolvlm_images or image_labels):
        raise ValueError("the smolvlm image layout renders with the tokenizer's (SmolVLM's) chat template and tiles "
                         "images as SmolVLM does: give chat_template='tokenizer', an ImageProcessor of resize "
                         f"{' or '.join(SMOLVLM_MODES)}, and no image labels")
    if layout == "vistrain" and smolvlm_images:
        raise ValueError("SmolVLM's image processing puts the global view last, which only the smolvlm image layout's "
                         "tokens say: give layout='smolvlm'")


def train_tokenizer(
    texts: Iterable[str],
    special_tokens: Optional[Sequence[str]] = None,
    vocab_size: int = 512,
    min_frequency: int = 2,
) -> Any:
    """A small byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Byte-level BPE: any text round-trips exactly (every byte is in the alphabet, nothing is unknown), a
    lone digit is one byte and so one token, and with room in the vocabulary every frequent word of the
    corpus becomes one token -- which is what makes short answers like "odd" or "yes" single tokens. It
    carries <|pad|> (id 0), ChatML's <|im_start|> and <|im_end|> (the end-of-sequence token),
    ``special_tokens`` (default: the 66 image tokens) and a ChatML chat template. ``vocab_size`` is the
    whole vocabulary: 256 bytes, the special tokens and the learnt merges. Keep the tokenizer with
    ``tokenizer.save_pretrained(folder)``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = list(vqa_special_tokens() if special_tokens is None else special_tokens)
    specials = [PAD_TOKEN, IM_START, IM_END] + [t for t in extra if t not in (PAD_TOKEN, IM_START, IM_END)]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + len(specials):
        raise ValueError(
            f"tokenizer vocab_size={vocab_size} leaves no room for merges after {len(alphabet)} bytes and "
            f"{len(specials)} special tokens; ask for more than {len(alphabet) + len(specials)}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # The role names are in every ChatML header: make them words of the corpus too.
    backend.train_from_iterator(_with_roles(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        clean_up_tokenization_spaces=False,  # decode must give back the text exactly
        model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _with_roles(texts: Iterable[str]) -> Iterable[str]:
    yield from texts
    for _ in range(8):
        yield from ("user", "assistant", "system")
