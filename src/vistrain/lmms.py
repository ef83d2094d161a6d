"""A vistrain vision-language model as an lmms-eval model (the optional `lmms` extra), and `run_lmms_eval` for
`vistrain eval RUN --lmms-tasks mmstar,mmmu_val,...`.

    from vistrain.lmms import run_lmms_eval, register_with_lmms_eval
    run_lmms_eval("runs/vlm/checkpoints/step_00020000", ["mmstar"], "mmstar.json", batch_size=1, device="cuda")
    register_with_lmms_eval()  # then lmms_eval.models.get_model("vistrain"); pip-installed, the entry point does it

What lmms-eval 0.7.3 asks of a "simple" model (`lmms_eval.api.model.lmms`, is_simple = True): three abstract
methods, each taking a list of `lmms_eval.api.instance.Instance` whose `args` are

    generate_until             (context, gen_kwargs, doc_to_visual, doc_id, task, split)     -> list[str]
    loglikelihood              (context, continuation, doc_to_visual, doc_id, task, split)  -> list[(float, bool)]
    generate_until_multi_round (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)

The images are `doc_to_visual(self.task_dict[task][split][doc_id])` (the evaluator fills `task_dict`). For the
`loglikelihood` output type the continuation is the task's `doc_to_target` function (called on the doc); for
`multiple_choice` it is the choice's text, a string with its leading delimiter (" A"). This adapter answers
the first two and refuses the third (multi-round tasks are not supported).

Every request becomes the prompt `vistrain generate` builds (tasks/vlm_inference.py: `load_for_generation`,
`encode_question`, `answer_ids`, `decode_answer`): the images in the order the task gives them, then the
context, as one ChatML user turn up to the assistant header, with the folder's own image processing. gen_kwargs
honoured: max_new_tokens, temperature (0, or do_sample=False: greedy), top_p, top_k and until (the answer is
cut before the first stop string; the model still writes up to max_new_tokens or its end-of-turn token). A
loglikelihood is the sum of the log-probabilities of the continuation's tokens (tokenised alone, after the
prompt's tokens: the tokens the model would write) given images + context, and whether greedy decoding writes
exactly those tokens. Requests run one at a time: prompts of different lengths cannot share a batch, as the
decoder's generate takes no padding; batch_size is accepted and not used.

lmms-eval is imported only when the adapter class is first used, so vistrain works without it. Models are
found by name in 0.7.3 through `lmms_eval.models.MODEL_REGISTRY_V2` (built-in manifests, then the entry-point
group "lmms_eval.models", which vistrain's pyproject declares), not through `api.registry.register_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from vistrain.data.vqa_images import as_pil
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.rundir import write_text_atomic
from vistrain.outpaths import check_output_file
from vistrain.tasks.vlm_inference import answer_ids, context_room, decode_answer, encode_question, load_for_generation

MODEL_NAME = "vistrain"  # lmms-eval's --model name
CLASS_NAME = "VistrainLMMS"
INSTALL_ADAPTER = "pip install --no-deps lmms-eval pyyaml pytz loguru"
INSTALL_FULL = "pip install 'vistrain[lmms]'"
DEFAULT_MAX_NEW_TOKENS = 256  # when a task's gen_kwargs do not say
DEFAULT_SEED = 1234  # the sampling generator's, so that sampled answers repeat run to run


class LmmsEvalMissing(ImportError):
    """lmms-eval (or the part of it a call needs) is not importable; the message says what to install."""


# ------------------------------------------------------------------------------------------ the model


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    until: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # gen_kwargs keys that mean something vistrain cannot do


def generation_settings(gen_kwargs: Optional[dict], default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
                        ) -> GenerationSettings:
    """An lmms-eval task's gen_kwargs as vistrain's sampling arguments. Greedy when temperature is 0 (the
    default) or do_sample is false; top_p None or 0 and top_k None or 0 filter nothing."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(kw.get("temperature") or 0.0)
    greedy = temperature <= 0 or kw.get("do_sample") is False
    max_new_tokens = kw.get("max_new_tokens")
    ignored = [k for k in ("num_beams",) if (kw.get(k) or 1) != 1]
    return GenerationSettings(
        max_new_tokens=int(default_max_new_tokens if max_new_tokens is None else max_new_tokens),
        greedy=greedy, temperature=temperature if not greedy else 1.0,
        top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 0.0),
        until=[s for s in until if s], ignored=ignored)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the earliest occurrence of any stop string (all of it if none occurs)."""
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(hits)] if hits else text


def as_images(visuals: Any) -> list:
    """What a task's doc_to_visual gives (a PIL image, a path, a {bytes, path} dict, a list of them, None) as a
    list of PIL images; videos and audio are refused."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for v in visuals:
        if isinstance(v, (list, tuple)):
            images.extend(as_images(v))
        elif isinstance(v, Image.Image):
            images.append(v)
        elif isinstance(v, (str, os.PathLike)):
            try:
                images.append(Image.open(v))
            except (OSError, ValueError) as e:
                raise ValueError(f"{v}: not an image vistrain can read ({e}); vistrain VLMs take images only, "
                                 f"not video or audio") from None
        elif isinstance(v, dict) and (v.get("bytes") is not None or v.get("path")):
            images.append(as_pil(v))
        else:
            raise TypeError(f"the task gives a {type(v).__name__} as a visual; vistrain VLMs take images only "
                            f"(PIL images, image files), not video or audio")
    return images


class VLMRunner:
    """A vistrain VLM checkpoint or model folder, ready to answer and score (images, text) prompts the way
    `vistrain generate` asks them. No lmms-eval in here: the adapter class below wraps it."""

    def __init__(self, folder: str | Path, device: Optional[str | torch.device] = None, seed: int = DEFAULT_SEED):
        self.folder = ckpt_lib.find_checkpoint(Path(folder))  # a run or checkpoints folder: its latest
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, self.encoder, self.eos_id = load_for_generation(self.folder, self.device)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))

    def prompt(self, images: list, text: str) -> dict[str, Any]:
        return encode_question(self.encoder, images, text)

    @torch.no_grad()
    def answer(self, images: list, text: str, settings: GenerationSettings) -> str:
        encoded = self.prompt(images, text)
        # a benchmark's max_new_tokens is the most it wants, not a demand: the model's context bounds it
        max_new_tokens = max(0, min(settings.max_new_tokens, context_room(self.model, encoded)))
        ids = answer_ids(self.model, encoded, max_new_tokens, self.eos_id,
                         greedy=settings.greedy, temperature=settings.temperature, top_k=settings.top_k,
                         top_p=settings.top_p, generator=None if settings.greedy else self.generator,
                         compile=self.device.type == "cuda")  # a benchmark asks many: compiling pays on a GPU
        return cut_at_stop(decode_answer(self.tokenizer, ids.cpu(), self.eos_id), settings.until)

    @torch.no_grad()
    def loglikelihood(self, images: list, context: str, continuation: str) -> tuple[float, bool]:
        """(sum of log p(continuation token | images, context, earlier continuation tokens), whether each
        continuation token is the argmax there: greedy decoding would write the continuation)."""
        encoded = self.prompt(images, context)
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            return 0.0, True
        prompt = encoded["input_ids"]
        ids = torch.cat([prompt, torch.tensor(cont, dtype=torch.long)])[None].to(self.device)
        logits = self.model(ids, encoded["pixel_values"].to(self.device))[0, len(prompt) - 1: -1].float()
        target = ids[0, len(prompt):]
        logp = logits.log_softmax(dim=-1).gather(-1, target[:, None])
        return float(logp.sum()), bool((logits.argmax(dim=-1) == target).all())


# --------------------------------------------------------------------------------- the lmms-eval class


def _import_lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise LmmsEvalMissing(
            f"the lmms-eval adapter needs the `lmms` extra; lmms_eval.api.model did not import ({type(e).__name__}: "
            f"{e}). Install it with `{INSTALL_FULL}` (or, for the adapter alone, `{INSTALL_ADAPTER}`).") from e
    return lmms


def _define_adapter(lmms: type) -> type:
    from loguru import logger

    class VistrainLMMS(lmms):
        """lmms-eval model "vistrain": model_args pretrained=FOLDER (a checkpoint, model, run or checkpoints
        folder), device, batch_size (accepted, unused: one request at a time), seed (sampling),
        max_new_tokens (when a task does not say)."""

        is_simple = True

        def __init__(self, pretrained: str, device: Optional[str] = None, batch_size: int | str = 1,
                     seed: int = DEFAULT_SEED, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs: Any) -> None:
            super().__init__()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("the vistrain lmms-eval model runs in one process; launch lmms-eval without "
                                 "accelerate/torchrun for several processes")
            unused = sorted(k for k, v in kwargs.items() if v is not None)
            if unused:
                logger.warning(f"vistrain model: ignoring model_args {unused}")
            self.runner = VLMRunner(str(pretrained), device, seed)
            self.batch_size = 1 if str(batch_size) == "auto" else int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
            self._warned: set[str] = set()

        @property
        def model(self) -> torch.nn.Module:
            return self.runner.model

        @property
        def tokenizer(self) -> Any:
            return self.runner.tokenizer

        @property
        def device(self) -> torch.device:
            return self.runner.device

        def _images(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list:
            return as_images(doc_to_visual(self.task_dict[task][split][doc_id]))

        def generate_until(self, requests: list) -> list[str]:
            from tqdm import tqdm

            answers = []
            for request in tqdm(requests, disable=self.rank != 0, desc="vistrain answering"):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                settings = generation_settings(gen_kwargs, self.max_new_tokens)
                for key in set(settings.ignored) - self._warned:
                    logger.warning(f"vistrain model: gen_kwargs {key}={gen_kwargs[key]!r} is not supported; "
                                   f"decoding is {'greedy' if settings.greedy else 'sampling'}")
                    self._warned.add(key)
                answers.append(self.runner.answer(self._images(doc_to_visual, doc_id, task, split), context,
                                                  settings))
            return answers

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            from tqdm import tqdm

            results = []
            for request in tqdm(requests, disable=self.rank != 0, desc="vistrain scoring"):
                context, continuation, doc_to_visual, doc_id, task, split = request.args
                if not isinstance(continuation, str):  # the loglikelihood output type: doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                results.append(self.runner.loglikelihood(self._images(doc_to_visual, doc_id, task, split),
                                                         context, str(continuation)))
            return results

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("the vistrain lmms-eval model answers single-round tasks only "
                                      "(generate_until, loglikelihood, multiple_choice)")

    VistrainLMMS.__module__ = __name__
    VistrainLMMS.__qualname__ = CLASS_NAME
    return VistrainLMMS


_ADAPTER: Optional[type] = None


def adapter_class() -> type:
    """The lmms-eval model class (made on first use: importing this module does not import lmms-eval)."""
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = _define_adapter(_import_lmms_base())
    return _ADAPTER


def __getattr__(name: str) -> Any:  # `vistrain.lmms.VistrainLMMS`, the path lmms-eval's registry imports
    if name == CLASS_NAME:
        return adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lmms_eval_manifest() -> Any:
    """lmms-eval's registration record for "vistrain" (the payload of the "lmms_eval.models" entry point)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as e:
        raise LmmsEvalMissing(f"lmms_eval.models did not import ({type(e).__name__}: {e}); install the `lmms` "
                              f"extra: `{INSTALL_FULL}`") from e
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{CLASS_NAME}")


def register_with_lmms_eval() -> None:
    """Make `lmms_eval.models.get_model("vistrain")` (and `--model vistrain`) find the adapter in this process,
    for when vistrain is not pip-installed (then its entry point does this)."""
    manifest = lmms_eval_manifest()
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_NAME


# ------------------------------------------------------------------------------------------ benchmarks


def _import_simple_evaluate() -> Any:
    try:
        from lmms_eval.evaluator import simple_evaluate
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise LmmsEvalMissing(
            f"lmms-eval's evaluator (lmms_eval.evaluator) did not import: {type(e).__name__}: {e} (missing: "
            f"{missing}). Running benchmarks needs the full lmms-eval install with its dependencies "
            f"(accelerate, torchvision, datasets, ...): `{INSTALL_FULL}`; `{INSTALL_ADAPTER}` is enough for the "
            f"adapter class alone.") from e
    return simple_evaluate


def flatten_metrics(results: dict) -> dict[str, float]:
    """{task/metric: value} from simple_evaluate's results["results"] (keys "metric,filter"; the filter is kept
    after a comma unless it is "none"); non-numeric entries (aliases, "N/A" stderrs) are left out."""
    flat: dict[str, float] = {}
    for task, entries in sorted((results.get("results") or {}).items()):
        for key, value in entries.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric}" + (f",{filt}" if filt and filt != "none" else "")] = float(value)
    return flat


def run_lmms_eval(folder: str | Path, tasks: str | Sequence[str], out_json: str | Path | None, batch_size: int = 1,
                  device: Optional[str] = None, limit: Optional[int | float] = None) -> dict:
    """Run lmms-eval tasks (names, or one comma-separated string) on a VLM checkpoint, model, run or checkpoints
    folder, and write {"step", "checkpoint", "metrics": {task/metric: value}, "tasks", "limit"} to out_json
    (step is None for a model folder; no file when out_json is None: `vistrain eval` writes its own). `limit`
    (a count, or a fraction below 1) is for smoke runs: results on a limited run are not the benchmark's.
    Returns what was written. Raises LmmsEvalMissing when lmms-eval's evaluator cannot be imported (the
    adapter alone installs with --no-deps; the evaluator needs the full install)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no lmms-eval task given (e.g. mmstar,mmmu_val)")
    if out_json is not None:  # before the benchmark: its result must have a place to go
        check_output_file(out_json, "out_json")
    ckpt = ckpt_lib.find_checkpoint(Path(folder))
    simple_evaluate = _import_simple_evaluate()
    lm = adapter_class()(pretrained=str(ckpt), device=device, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=names, batch_size=batch_size, device=device, limit=limit,
                              log_samples=False)
    if results is None:  # only rank 0 gets results; the adapter runs in one process
        raise RuntimeError("lmms-eval returned no results")
    record = {"step": ckpt_lib.checkpoint_step(ckpt), "checkpoint": str(ckpt), "metrics": flatten_metrics(results),
              "tasks": names, "limit": limit}
    if out_json is None:
        return record
    write_text_atomic(Path(out_json), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
