"""The lmms-eval adapter (lmms.py): a vistrain VLM folder answers and scores lmms-eval's own requests.

A tiny VLM is trained for a fraction of a second to say "a red square" / "a blue square" about a red / blue
image, so that greedy answers are known words. lmms-eval's evaluator is not run (it needs the full install,
torchvision included); the requests are lmms-eval `Instance`s, built with the arguments its tasks give them.
Needs lmms-eval importable: `pip install --no-deps lmms-eval pyyaml pytz loguru`.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (pip install --no-deps lmms-eval "
                                                   "pyyaml pytz loguru)")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from vistrain import lmms as adapter  # noqa: E402
from vistrain.data.vqa import IGNORE_INDEX, VQAEncoder, train_tokenizer  # noqa: E402
from vistrain.data.vqa_images import ImageProcessor  # noqa: E402
from vistrain.models.llama import LlamaConfig  # noqa: E402
from vistrain.models.vit import ViTConfig  # noqa: E402
from vistrain.models.vlm import VisionLanguageModel, VLMConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What colour is the square?"
TASK, SPLIT = "colours", "test"
DOCS = [
    {"image": Image.new("RGB", (16, 16), (220, 30, 30)), "answer": "a red square"},
    {"image": Image.new("RGB", (16, 16), (30, 30, 220)), "answer": "a blue square"},
]
RED, BLUE = 0, 1


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_target(doc):
    return doc["answer"]


def generate_request(doc_id, gen_kwargs, context=QUESTION, visual=doc_to_visual):
    return Instance(request_type="generate_until", arguments=(context, gen_kwargs, visual, doc_id, TASK, SPLIT),
                    idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def loglikelihood_request(doc_id, continuation, context=QUESTION):
    """continuation: a string (multiple_choice requests) or doc_to_target (loglikelihood requests)."""
    return Instance(request_type="loglikelihood",
                    arguments=(context, continuation, doc_to_visual, doc_id, TASK, SPLIT),
                    idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    """A VLM model folder (config.json, model.safetensors, tokenizer/) that has learnt the two answers."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer([QUESTION, "a red square", "a blue square", "Which shape is it?"] * 20,
                                vocab_size=400)
    cfg = VLMConfig(
        vision=ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2),
        lm=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=256),
        pixel_shuffle_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))
    model = VisionLanguageModel(cfg)
    encoder = VQAEncoder(tokenizer, ImageProcessor(16, 16), cfg.image_token_length)
    rows = [encoder.encode({"images": [d["image"]], "texts": [{"user": QUESTION, "assistant": d["answer"]}]})
            for d in DOCS]
    ids, labels = torch.stack([r["input_ids"] for r in rows]), torch.stack([r["labels"] for r in rows])
    pixels = torch.cat([r["pixel_values"] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(ids, pixels)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("lmms") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    return out


@pytest.fixture(scope="module")
def lm(folder):
    model = adapter.adapter_class()(pretrained=str(folder), device="cpu", batch_size=1)
    model.task_dict = {TASK: {SPLIT: DOCS}}  # what lmms-eval's evaluator fills in
    return model


def test_the_adapter_is_an_lmms_eval_simple_model(lm):
    assert isinstance(lm, lmms) and lm.is_simple
    assert type(lm).__name__ == "VistrainLMMS" and type(lm) is adapter.VistrainLMMS
    with pytest.raises(NotImplementedError, match="single-round"):
        lm.generate_until_multi_round([])


def test_greedy_answers_are_deterministic_strings_and_those_of_vistrain_generate(lm, folder, tmp_path):
    greedy = {"temperature": 0, "max_new_tokens": 8, "until": []}
    requests = [generate_request(RED, greedy), generate_request(BLUE, dict(greedy))]
    answers = lm.generate_until(requests)
    assert answers == ["a red square", "a blue square"]
    assert lm.generate_until(requests) == answers
    assert lm.generate_until([generate_request(RED, {})]) == ["a red square"]  # the defaults are greedy too
    # the same prompt as `vistrain generate` builds: images before the text, one ChatML user turn
    from vistrain.tasks.capabilities import Prompt
    from vistrain.tasks.vlm_inference import VLMAnswerer

    image = tmp_path / "red.png"
    DOCS[RED]["image"].save(image)
    prompt = Prompt(QUESTION, [str(image)], max_new_tokens=8)
    assert VLMAnswerer().answer(folder, prompt, torch.device("cpu")) == answers[0]
    # doc_to_visual may give paths, a bare image, or nothing (a text-only task)
    assert lm.generate_until([generate_request(RED, greedy, visual=lambda doc: [str(image)]),
                              generate_request(RED, greedy, visual=lambda doc: doc["image"])]) == [answers[0]] * 2
    text_only = lm.generate_until([generate_request(RED, greedy, visual=lambda doc: [])])
    assert isinstance(text_only[0], str)


def test_stop_strings_cut_the_answer(lm):
    def answer(doc_id, until):
        return lm.generate_until([generate_request(doc_id, {"temperature": 0, "max_new_tokens": 8,
                                                            "until": until})])[0]

    assert answer(RED, ["square"]) == "a red "
    assert answer(RED, [" square", "red"]) == "a "  # the earliest of several
    assert answer(BLUE, "blue") == "a "  # a single string, as some task configs write it
    assert answer(BLUE, ["green"]) == "a blue square"


def test_max_new_tokens_is_honoured(lm):
    def answer(n, **kw):
        return lm.generate_until([generate_request(RED, {"temperature": 0, "max_new_tokens": n, **kw})])[0]

    assert [answer(n) for n in (0, 1, 2, 3)] == ["", "a", "a red", "a red square"]
    for kw in ({"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9}, {"temperature": 2.0, "top_k": 5}):
        sampled = answer(2, **kw)
        assert isinstance(sampled, str) and len(lm.tokenizer(sampled, add_special_tokens=False)["input_ids"]) <= 2
    assert answer(8, temperature=0.7, do_sample=False) == "a red square"  # do_sample=False: greedy


def test_loglikelihood_is_the_sum_of_the_continuation_log_probs(lm, folder):
    continuations = ["a red square", "a blue square", "a red", " a red square"]
    results = lm.loglikelihood([loglikelihood_request(RED, c) for c in continuations])
    assert all(isinstance(ll, float) and isinstance(g, bool) for ll, g in results)
    # by hand: vistrain's own prompt encoding and model logits
    model = VisionLanguageModel.from_pretrained(folder)
    tokenizer = lm.tokenizer
    encoder = VQAEncoder(tokenizer, ImageProcessor(16, 16), model.cfg.image_token_length)
    prompt = encoder.encode_prompt({"images": [DOCS[RED]["image"]], "texts": [{"user": QUESTION, "assistant": ""}]})
    for c, (ll, _) in zip(continuations, results):
        cont = torch.tensor(tokenizer(c, add_special_tokens=False)["input_ids"])
        ids = torch.cat([prompt["input_ids"], cont])[None]
        with torch.no_grad():
            logp = model(ids, prompt["pixel_values"])[0].float().log_softmax(-1)
        n = len(prompt["input_ids"])
        expected = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(cont.tolist()))
        assert ll == pytest.approx(expected, rel=1e-5, abs=1e-5), c
    (red, red_greedy), (blue, blue_greedy), (prefix, prefix_greedy), (_, spaced_greedy) = results
    assert red_greedy and prefix_greedy  # the greedy answer, and a prefix of it
    assert not blue_greedy and not spaced_greedy and blue < red - 1.0
    assert red > -0.5 and prefix >= red  # it learnt the answer; a prefix is at least as likely
    # the loglikelihood output type passes doc_to_target instead of a string
    assert lm.loglikelihood([loglikelihood_request(BLUE, doc_to_target)])[0][1] is True
    assert lm.loglikelihood([loglikelihood_request(RED, "")]) == [(0.0, True)]


def test_lmms_eval_finds_the_model_by_name(folder):
    from lmms_eval import models

    adapter.register_with_lmms_eval()
    cls = models.get_model("vistrain")
    assert cls is adapter.adapter_class() and "vistrain" in models.AVAILABLE_MODELS
    # what `lmms-eval --model vistrain --model_args pretrained=DIR --device cpu --batch_size 1` constructs
    made = cls.create_from_arg_string(f"pretrained={folder}",
                                      {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert made.runner.folder == folder and made.batch_size == 1
    manifest = adapter.lmms_eval_manifest()  # the entry point's payload
    assert manifest.model_id == "vistrain" and manifest.simple_class_path == "vistrain.lmms.VistrainLMMS"


def test_run_lmms_eval_without_the_evaluator_names_the_failed_import(folder, tmp_path, monkeypatch):
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as e:  # the --no-deps install: torchvision, accelerate, ... are missing
        failed = e.name or str(e)
    else:
        monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)
        failed = "lmms_eval.evaluator"
    out = tmp_path / "lmms.json"
    with pytest.raises(adapter.LmmsEvalMissing) as info:
        adapter.run_lmms_eval(folder, "mmstar", out, batch_size=1, device="cpu")
    assert failed in str(info.value) and "full lmms-eval install" in str(info.value)
    assert isinstance(info.value, ImportError) and not out.exists()


def test_run_lmms_eval_writes_the_metrics_json(folder, tmp_path, monkeypatch):
    """With a stand-in for simple_evaluate that asks the model lmms-eval's way and returns results shaped like
    lmms-eval's (results[task]["metric,filter"])."""
    seen = {}

    def simple_evaluate(model, tasks, batch_size, device, limit, log_samples):
        seen.update(tasks=tasks, limit=limit, model=model)
        model.task_dict = {TASK: {SPLIT: DOCS}}
        answers = model.generate_until([generate_request(i, {"temperature": 0, "max_new_tokens": 8})
                                        for i in range(len(DOCS))])
        score = sum(a == d["answer"] for a, d in zip(answers, DOCS)) / len(DOCS)
        return {"results": {TASK: {"alias": TASK, "exact_match,none": score, "exact_match_stderr,none": "N/A",
                                   "exact_match,flexible-extract": score}}}

    monkeypatch.setattr(adapter, "_import_simple_evaluate", lambda: simple_evaluate)
    step_folder = tmp_path / "run" / "checkpoints" / "step_00000042"
    shutil.copytree(folder, step_folder)
    out = tmp_path / "eval" / "lmms.json"
    record = adapter.run_lmms_eval(step_folder, "colours, ", out, batch_size=1, device="cpu", limit=2)
    assert json.loads(out.read_text()) == record == {
        "step": 42, "checkpoint": str(step_folder), "tasks": [TASK], "limit": 2,
        "metrics": {"colours/exact_match": 1.0, "colours/exact_match,flexible-extract": 1.0}}
    assert seen["tasks"] == [TASK] and seen["limit"] == 2 and isinstance(seen["model"], adapter.VistrainLMMS)
    assert adapter.run_lmms_eval(folder, [TASK], out, 1, "cpu")["step"] is None  # a model folder has no step


def test_vistrain_imports_the_module_without_lmms_eval(folder, tmp_path, subprocess_env):
    """Blocked lmms_eval: the module imports; the class and run_lmms_eval say which extra to install."""
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"
        "import vistrain.lmms as m\n"
        "try:\n    m.VistrainLMMS\nexcept m.LmmsEvalMissing as e:\n    print(e)\n"
        "try:\n    m.run_lmms_eval(sys.argv[1], 'mmstar', sys.argv[2])\n"
        "except m.LmmsEvalMissing as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "x.json")], env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    class_error, run_error = done.stdout.strip().splitlines()
    assert "vistrain[lmms]" in class_error and "--no-deps lmms-eval" in class_error
    assert "lmms_eval.evaluator" in run_error and "full lmms-eval install" in run_error
    assert not (tmp_path / "x.json").exists()
