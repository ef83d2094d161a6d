"""`vistrain train | sample`: the one entry point (also `python -m vistrain`, and under torchrun).

A thin face: it parses arguments, asks the task registry for the task, hands the engine a way to build it,
and turns the errors that speak to the user into one line and an exit status (2: bad config or arguments,
1: the run could not go on, 75: preempted, checkpoint written, rerun to continue).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

USAGE_EXAMPLES = """examples:
  vistrain train configs/gan/digits.yaml
  vistrain train configs/gan/digits.yaml train.max_steps=100 run.out_dir=runs/try
  torchrun --nproc_per_node=2 -m vistrain train configs/gan/digits.yaml
  vistrain sample runs/gan_digits --out grid.png --num 64 --labels 3,7
  vistrain eval runs/var_digits --metrics judge --num 1000
  torchrun --nproc_per_node=8 -m vistrain eval runs/var_d16 --metrics fid,is,pr --ref imagenet_val/ --num-images 50000
  vistrain import var --vae vae_ch160v4096z32.pth --var var_d16.pth --out models/var_d16
  vistrain import nanovlm nanoVLM-460M --tokenizer SmolLM2-360M-Instruct --out models/nanovlm_460m
  vistrain info runs/gan_digits
  vistrain report runs/gan_digits --out report.html
  vistrain runs runs
"""
MAX_GRID_IMAGES = 4096  # a .png grid beyond this is unreadable and huge; .npz is for many images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vistrain", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    train.add_argument("--smoke", action="store_true",
                       help="a few steps on tiny shapes in a temporary folder: checks a config in seconds")
    sample = sub.add_parser("sample", help="draw images from a trained model")
    sample.add_argument("source", help="a run folder (uses its latest checkpoint) or a checkpoint folder")
    sample.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.npz (arr_0: N x H x W x 3 uint8)")
    sample.add_argument("--num", type=int, default=64, help="number of images")
    sample.add_argument("--labels", default=None, help="comma-separated class ids to cycle through, e.g. 0,1,2")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    sample.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="for a run folder: which checkpoint to use")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda")
    gen = sub.add_parser("generate", help="answer a prompt about images with a vision-language model")
    gen.add_argument("source", help="a run folder (its latest checkpoint), a checkpoint or a model folder")
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--prompt", required=True, help="the question, e.g. 'What digit is this?'")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--greedy", action="store_true", help="the most likely token each time (the default)")
    gen.add_argument("--temperature", type=float, default=None, help="sample at this temperature instead")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--which", choices=("latest", "best"), default="latest")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda")
    evaluation = sub.add_parser("eval", help="score a checkpoint: FID/KID/IS/PR, the digits judge, rFID/PSNR/SSIM, "
                                             "lmms-eval benchmarks; writes JSON")
    evaluation.add_argument("source", help="a run folder (its latest checkpoint), a checkpoint or a model folder")
    evaluation.add_argument("--metrics", default="",
                            help="comma-separated; samples (gan, var): fid,kid,is,pr,judge; tokenizers (vqvae): "
                                 "rfid,psnr,ssim")
    evaluation.add_argument("--ref", default=None, help="real images for fid/kid/pr: a folder, or a statistics .npz "
                                                        "(mu, sigma, count[, features]); folder statistics are cached")
    # not `--num` alone: under torchrun that prefix is ambiguous with torchrun's own --numa-binding
    evaluation.add_argument("--num-images", "--num", dest="num", type=int, default=10000,
                            help="images to generate (or reconstruct: at most the val split)")
    evaluation.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    evaluation.add_argument("--detector", default=None,
                            help="the FID Inception TorchScript file (inception-2015-12-05.pt); default: the torch hub "
                                 "cache, downloaded when online")
    evaluation.add_argument("--lmms-tasks", default="", help="vlm: lmms-eval tasks, e.g. mmstar,mmmu_val")
    evaluation.add_argument("--lmms-limit", type=float, default=None,
                            help="vlm: lmms-eval's --limit (a count, or a fraction below 1): a smoke test only")
    evaluation.add_argument("--out", default=None, help="the result JSON; default <run>/eval/step_N.json")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--which", choices=("latest", "best"), default="latest",
                            help="for a run folder: which checkpoint")
    evaluation.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    export = sub.add_parser("export", help="write a release folder: weights, config, assets, a model card")
    export.add_argument("source", help="a run folder (its latest or best checkpoint) or a checkpoint folder")
    export.add_argument("--out", required=True, help="a new folder")
    export.add_argument("--format", choices=("vistrain", "transformers"), default="vistrain",
                        help="transformers: an Idefics3 (SmolVLM) folder for AutoModelForImageTextToText and "
                             "AutoProcessor, for a VLM of the smolvlm image layout")
    export.add_argument("--which", choices=("latest", "best"), default="best",
                        help="for a run folder: which checkpoint (best falls back to latest when there is none)")
    imports = sub.add_parser("import", help="turn another project's weights into a vistrain model folder")
    imports.add_argument("kind", choices=("var", "vlm", "nanovlm", "smolvlm"),
                         help="var: the official FoundationVision/VAR files; vlm: a SigLIP and a Llama folder; "
                              "nanovlm: a folder written by huggingface/nanoVLM's save_pretrained; smolvlm: a "
                              "transformers SmolVLM / Idefics3 folder")
    imports.add_argument("source", nargs="?", default=None,
                         help="nanovlm: the folder with nanoVLM's config.json and model.safetensors (or --source); "
                              "smolvlm: the SmolVLM / Idefics3 folder")
    imports.add_argument("--source", dest="source_opt", default=None, help="nanovlm, smolvlm: the same as SOURCE")
    imports.add_argument("--tokenizer", default=None,
                         help="nanovlm: a local folder of the tokenizer that config.json's lm_tokenizer names "
                              "(needed unless lm_tokenizer is itself a local folder)")
    imports.add_argument("--out", required=True, help="a new folder: config.json + model.safetensors (+ assets)")
    imports.add_argument("--vae", help="var: the official tokenizer file, e.g. vae_ch160v4096z32.pth")
    imports.add_argument("--var", help="var: the official transformer file, e.g. var_d16.pth")
    imports.add_argument("--vision", help="vlm: a local Hugging Face SigLIP folder")
    imports.add_argument("--lm", help="vlm: a local Hugging Face Llama-family folder with its tokenizer")
    imports.add_argument("--pixel-shuffle-factor", type=int, default=4, help="vlm: the projector's fold (nanoVLM: 4)")
    imports.add_argument("--patch-nums", default=None,
                         help="comma-separated scale sizes, e.g. 1,2,3,4,5,6,8,10,13,16: needed only when the "
                              "transformer's shapes do not tell them (the released models' are known)")
    info = sub.add_parser("info", help="what a checkpoint or model folder is: step, metrics, checksums, provenance")
    info.add_argument("source", help="a checkpoint or model folder, or a run folder (its latest checkpoint)")
    info.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="for a run folder: which checkpoint")
    report = sub.add_parser("report", help="one self-contained HTML page of a run: curves, evals, samples, config")
    report.add_argument("run", help="a run folder (its run.out_dir)")
    report.add_argument("--out", default=None, help="the HTML file to write; default RUN/report.html")
    runs = sub.add_parser("runs", help="list the runs under a folder: task, step, state, best, last eval, size")
    runs.add_argument("folder", help="the folder to look in, e.g. runs")
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if args.command == "info":
        return run_info(parser.parse_args(argv))
    if args.command == "report":
        return run_report(parser.parse_args(argv))
    if args.command == "runs":
        return run_runs(parser.parse_args(argv))
    if args.command == "import":
        return run_import(parser.parse_args(argv))
    if args.command == "generate":
        return run_generate(parser.parse_args(argv))
    if args.command == "export":
        return run_export(parser.parse_args(argv))
    if args.command == "train":
        # Flags may stand anywhere, also between overrides (`train CONFIG --smoke a=1`): argparse then leaves
        # the overrides after the flag unparsed; they are overrides all the same.
        unknown = [item for item in extra if item.startswith("-") or "=" not in item]
        if unknown:
            train.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides += extra
        return run_train(args)
    if args.command == "eval":
        return run_eval(parser, evaluation, argv)
    return run_sample(parser, sample, argv)


def run_import(args) -> int:
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_folder

    try:
        check_output_folder(args.out, "--out")
    except ConfigError as e:
        return _fail(str(e), 2)
    if args.kind == "nanovlm":
        return run_import_nanovlm(args)
    if args.kind == "smolvlm":
        return run_import_smolvlm(args)
    if args.source or args.source_opt or args.tokenizer:
        return _fail(f"import {args.kind} takes no SOURCE, --source or --tokenizer (those are for nanovlm)", 2)
    if args.kind == "vlm":
        return run_import_vlm(args)
    if not (args.vae and args.var):
        return _fail("import var needs --vae and --var (the official files)", 2)
    from vistrain.engine.checkpoint import CheckpointError, write_model_folder
    from vistrain.interop.var_official import OfficialFormatError, import_official
    from vistrain.provenance import collect

    patch_nums = None
    if args.patch_nums is not None:
        try:
            patch_nums = [int(p) for p in args.patch_nums.split(",")]
        except ValueError:
            return _fail(f"--patch-nums {args.patch_nums}: expected comma-separated sizes, e.g. 1,2,3,4", 2)
    try:
        model_config, weights = import_official(args.vae, args.var, patch_nums)
        refuse_non_finite(weights, {"vae.": f"--vae {args.vae}", "var.": f"--var {args.var}"})
        folder = write_model_folder(Path(args.out), weights, model_config, provenance_record=collect("import"))
    except (ValueError, CheckpointError) as e:  # OfficialFormatError is a ValueError: a bad input file
        return _fail(str(e), 1 if isinstance(e, CheckpointError) else 2)
    depth = model_config["model"]["depth"]
    print(f"imported VAR-d{depth} and its tokenizer into {folder}: sample with `vistrain sample {folder} --out x.png`, "
          f"fine-tune with var.init={folder} var.tokenizer={folder}")
    return 0


def run_import_vlm(args) -> int:
    from vistrain.engine.checkpoint import CheckpointError, write_model_folder
    from vistrain.errors import ConfigError
    from vistrain.provenance import collect
    from vistrain.tasks.vlm import import_hf

    if not (args.vision and args.lm):
        return _fail("import vlm needs --vision (a SigLIP folder) and --lm (a Llama-family folder)", 2)
    for flag, path in (("--vision", args.vision), ("--lm", args.lm)):
        if not Path(path).is_dir():  # never a hub id: vistrain does not download
            return _fail(f"{flag} {path} is not a folder: give a local Hugging Face model folder (download it first, "
                         "e.g. `huggingface-cli download <repo id> --local-dir <folder>`)", 2)
    try:
        model_config, weights, assets = import_hf(args.vision, args.lm, args.pixel_shuffle_factor)
        refuse_non_finite(weights, {"vlm.vision.": f"--vision {args.vision}", "vlm.lm.": f"--lm {args.lm}"})
        folder = write_model_folder(Path(args.out), weights, model_config, assets, provenance_record=collect("import"))
    except (ConfigError, ValueError) as e:
        return _fail(str(e), 2)
    except CheckpointError as e:
        return _fail(str(e), 1)
    print(f"imported a VLM into {folder} (a new projector): fine-tune with model.init={folder}")
    return 0


def run_import_nanovlm(args) -> int:
    from vistrain.engine.checkpoint import CheckpointError, write_model_folder
    from vistrain.interop.nanovlm import NanoVLMFormatError
    from vistrain.provenance import collect
    from vistrain.tasks.vlm import import_nanovlm

    if args.source and args.source_opt and args.source != args.source_opt:
        return _fail(f"import nanovlm: two sources given ({args.source} and --source {args.source_opt})", 2)
    source = args.source or args.source_opt
    if not source:
        return _fail("import nanovlm needs the folder nanoVLM's save_pretrained wrote (SOURCE or --source)", 2)
    try:
        model_config, weights, assets = import_nanovlm(source, args.tokenizer)
        refuse_non_finite(weights, {"": source})
        folder = write_model_folder(Path(args.out), weights, model_config, assets, provenance_record=collect("import"))
    except (NanoVLMFormatError, ValueError) as e:
        return _fail(str(e), 2)
    except CheckpointError as e:
        return _fail(str(e), 1)
    grid = f"{model_config['max_image_size'] // model_config['model']['vision']['image_size']}"
    print(f"imported nanoVLM from {source} into {folder} (images up to {grid}x{grid} tiles, processed as nanoVLM "
          f"does): answer with `vistrain generate {folder} --image x.png --prompt '...'`, fine-tune with "
          f"model.init={folder}")
    return 0


def run_import_smolvlm(args) -> int:
    from vistrain.engine.checkpoint import CheckpointError, write_model_folder
    from vistrain.interop.smolvlm import import_smolvlm
    from vistrain.provenance import collect
    from vistrain.tasks.vlm import tokenizer_assets

    if args.source and args.source_opt and args.source != args.source_opt:
        return _fail(f"import smolvlm: two sources given ({args.source} and --source {args.source_opt})", 2)
    source = args.source or args.source_opt
    if not source or args.tokenizer:
        return _fail("import smolvlm needs the SmolVLM / Idefics3 folder (SOURCE or --source), which holds its "
                     "tokenizer too (--tokenizer is for nanovlm)", 2)
    if not Path(source).is_dir():  # never a hub id: vistrain does not download
        return _fail(f"{source} is not a folder: give a local SmolVLM / Idefics3 folder (download it first, e.g. "
                     "`huggingface-cli download HuggingFaceTB/SmolVLM-256M-Instruct --local-dir <folder>`)", 2)
    try:
        model_config, weights, tokenizer = import_smolvlm(source)
        refuse_non_finite(weights, {"": source})
        folder = write_model_folder(Path(args.out), weights, model_config, tokenizer_assets(tokenizer),
                                    provenance_record=collect("import"))
    except ValueError as e:  # SmolVLMFormatError and the key maps' errors: a folder that is not what it should be
        return _fail(str(e), 2)
    except CheckpointError as e:
        return _fail(str(e), 1)
    print(f"imported {model_config['imported_from']['format']} from {source} into {folder} (SmolVLM's prompt and "
          f"image tiling): answer with `vistrain generate {folder} --image x.png --prompt '...'`, fine-tune with "
          f"model.init={folder}, export back with `vistrain export RUN --format transformers`")
    return 0


def refuse_non_finite(weights: dict, sources: dict[str, str]) -> None:
    """Imported weights that hold nan or inf would only fail later, deep in sampling or training: refuse them here,
    naming the tensor and the input it came from (`sources`: key prefix -> flag and file)."""
    import torch

    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            source = next((s for prefix, s in sources.items() if key.startswith(prefix)), "the input")
            raise ValueError(f"{source}: tensor {key} holds non-finite values (nan or inf); the file is damaged or "
                             "comes from a diverged run, so it was not imported")


def run_generate(args) -> int:
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.engine.dist import pick_device
    from vistrain.errors import ConfigError
    from vistrain.tasks import get_spec

    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens {args.max_new_tokens}: must be at least 1", 2)
    if args.temperature is not None and (args.greedy or not 0 < args.temperature < float("inf")):
        return _fail("--temperature samples (and must be a finite number > 0); --greedy takes the most likely "
                     "token: give one", 2)
    if args.top_k < 0 or not 0 <= args.top_p <= 1:
        return _fail(f"--top-k {args.top_k} --top-p {args.top_p}: top-k must be >= 0 and top-p in [0, 1] (0 = off)", 2)
    try:
        device = pick_device(args.device, 0)
        folder = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        spec = get_spec(str(ckpt_lib.load_model_config(folder).get("task")))
        if spec.generate is None:
            return _fail(f"{folder} holds a {spec.name!r} model, which does not generate text", 2)
        greedy = args.temperature is None
        text = spec.generate(folder, args.image, args.prompt, args.max_new_tokens, greedy,
                             args.temperature or 1.0, args.top_k, args.top_p, args.seed, device)
    except ConfigError as e:  # a flag the model cannot honour (--max-new-tokens beyond its context)
        return _fail(str(e), 2)
    except (ckpt_lib.CheckpointError, ValueError) as e:
        return _fail(_sample_message(e, args), 1)
    print(text)
    return 0


def run_export(args) -> int:
    """Copy a checkpoint's model files (weights, config, assets) into a release folder with a model card."""
    from vistrain import provenance
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_folder

    try:
        check_output_folder(args.out, "--out")
    except ConfigError as e:
        return _fail(str(e), 2)
    try:
        try:
            folder = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        except ckpt_lib.CheckpointError:
            if args.which != "best":
                raise
            folder = ckpt_lib.find_checkpoint(Path(args.source), "latest")
        ckpt_lib.verify_checkpoint(folder)
        model_config = ckpt_lib.load_model_config(folder)
        weights = ckpt_lib.load_weights(folder)
        if args.format == "transformers":
            return run_export_transformers(folder, model_config, weights, Path(args.out))
        # the checkpoint's provenance.json goes inside the export's own, under "from"
        skip = {ckpt_lib.MODEL_FILE, ckpt_lib.CONFIG_FILE, ckpt_lib.TRAIN_STATE_FILE, ckpt_lib.CHECKSUMS_FILE,
                ckpt_lib.METRICS_FILE, provenance.FILE}
        assets = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                  if p.is_file() and p.relative_to(folder).parts[0] not in skip | {ckpt_lib.SHARDS_DIR}}
        record = provenance.collect("export", **{"from": provenance.read(folder)})
        assets["README.md"] = model_card(folder, model_config, weights, record).encode()
        out = ckpt_lib.write_model_folder(Path(args.out), weights, model_config, assets, provenance_record=record)
    except ckpt_lib.CheckpointError as e:
        return _fail(str(e), 1)
    print(f"exported {folder} to {out}")
    return 0


def run_export_transformers(folder: Path, model_config: dict, weights: dict, out: Path) -> int:
    """`vistrain export --format transformers`: an Idefics3 folder that transformers loads (the smolvlm layout only);
    a checkpoint error propagates to run_export."""
    from vistrain import provenance
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.interop.smolvlm import to_transformers
    from vistrain.tasks.vlm import checkpoint_tokenizer

    record = provenance.collect("export", **{"from": provenance.read(folder)})
    try:
        tokenizer = checkpoint_tokenizer(folder) if model_config.get("task") == "vlm" else None
        hf_config, hf_weights, files = to_transformers(model_config, weights, tokenizer, str(folder),
                                                       provenance.describe(record))
    except ValueError as e:  # SmolVLMFormatError: a model that transformers' classes cannot hold
        return _fail(str(e), 2)
    written = ckpt_lib.write_model_folder(out, hf_weights, hf_config, files, provenance_record=record)
    print(f"exported {folder} to {written} (transformers' Idefics3: AutoModelForImageTextToText and AutoProcessor "
          "load it)")
    return 0


def model_card(folder: Path, model_config: dict, weights: dict, record: dict) -> str:
    import json

    import yaml

    from vistrain import provenance

    metrics_file = folder / "metrics.json"
    try:  # not checksummed (best and eval add to it), so read it with care: a card without metrics is still a card
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except (OSError, ValueError):
        metrics = {}
    if not isinstance(metrics, dict):
        metrics = {}
    n_params = sum(v.numel() for v in weights.values())
    lines = [f"# A vistrain {model_config.get('task')} model", "",
             f"Exported from `{folder}` ({n_params / 1e6:.1f}M parameters in model.safetensors).", "",
             "## Use", "", "```bash"]
    if model_config.get("task") == "vlm":
        lines += ["vistrain generate THIS_FOLDER --image photo.png --prompt 'What is in the image?'", "```", "",
                  "```python", "from vistrain.models.vlm import VisionLanguageModel",
                  "model = VisionLanguageModel.from_pretrained('THIS_FOLDER')", "```"]
    else:
        lines += ["vistrain sample THIS_FOLDER --out samples.png", "```"]
    lines += ["", "## Files", "", "- `model.safetensors`: the weights; `config.json`: the architecture; "
              "`provenance.json`: the code, command and config that made it; `checksums.json`: sha256 of every file",
              ""]
    if metrics:
        lines += ["## Metrics at export", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    lines += ["", "## Config", "", "```json", json.dumps(model_config, indent=2, sort_keys=True), "```", ""]
    lines += ["## Provenance", "", "```text", *provenance.describe(record), "```", ""]
    trained = provenance.training_config(record)
    if trained is not None:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(trained, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def run_info(args) -> int:
    """Print what a checkpoint or model folder is: its step, task, metrics, checksum status, provenance and the
    config it was trained with. Exit 1 when it is not one, or when a file differs from its checksum."""
    import json

    import yaml

    from vistrain import provenance
    from vistrain.engine import checkpoint as ckpt_lib

    try:
        folder = ckpt_lib.find_checkpoint(Path(args.source), args.which)
    except ckpt_lib.CheckpointError as e:
        return _fail(_sample_message(e, args), 1)
    if not (folder / ckpt_lib.CONFIG_FILE).is_file() and not (folder / ckpt_lib.MODEL_FILE).is_file():
        return _fail(f"{folder} is not a checkpoint or model folder (it has no config.json or model.safetensors)", 1)
    step = ckpt_lib.checkpoint_step(folder)
    try:
        task = json.loads((folder / ckpt_lib.CONFIG_FILE).read_text(encoding="utf-8")).get("task", "?")
    except (OSError, ValueError, AttributeError):
        task = "? (config.json is unreadable)"
    try:
        metrics = json.loads((folder / ckpt_lib.METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}  # not checksummed: read it with care
    if (folder / ckpt_lib.CHECKSUMS_FILE).exists() or (folder / ckpt_lib.TRAIN_STATE_FILE).exists():
        damaged = ckpt_lib.damaged_files(folder)
        checksums = "; ".join(f"{name} {what}" for name, what in damaged) or "every file matches"
    else:
        damaged, checksums = [], "none recorded (not written by vistrain), nothing to check"
    record = provenance.read(folder)
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))) or "none"
    lines = [str(folder), f"  {'checkpoint at step ' + str(step) if step is not None else 'model folder'}, "
             f"task {task}", f"  metrics: {shown}", f"  checksums: {checksums}", "provenance:"]
    lines += provenance.describe(record, "  ") if record else ["  none recorded (written before vistrain kept it)"]
    trained = provenance.training_config(record) if record else None
    if trained is not None:
        lines += ["training config:", *("  " + line for line in yaml.safe_dump(trained, sort_keys=False).splitlines())]
    print("\n".join(lines))
    return 1 if damaged else 0


def run_report(args) -> int:
    """Write the HTML report of a run (see report.py)."""
    from vistrain import report, runs
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_file

    try:
        run_folder = runs.check_run_folder(Path(args.run))
        out = check_output_file(args.out or run_folder / "report.html", "--out", example="report.html")
    except (runs.NotARun, ConfigError) as e:
        return _fail(str(e), 2)
    try:
        size = report.write(runs.read_run(run_folder), out)
    except OSError as e:
        return _fail(f"--out {out}: the report could not be written ({e.strerror})", 1)
    print(f"wrote {out} ({runs.human_bytes(size)}): open it in a browser")
    return 0


def run_runs(args) -> int:
    """List the runs under a folder, one line each."""
    from vistrain import runs

    folder = Path(args.folder)
    if not folder.is_dir():
        return _fail(f"{folder} is not a folder; give the folder that holds your runs, e.g. runs", 2)
    rows = runs.table(folder)
    print(runs.format_table(rows) if len(rows) > 1 else f"no runs under {folder}")
    return 0


def _fail(message: str, status: int, prefix: str = "") -> int:
    print(f"{prefix}vistrain: error: {message}", file=sys.stderr, flush=True)
    return status


def run_train(args) -> int:
    from vistrain.config import load_config
    from vistrain.engine.checkpoint import CheckpointError
    from vistrain.engine.dist import init_distributed, shutdown
    from vistrain.engine.rundir import RunDirError
    from vistrain.engine.trainer import EXIT_REQUEUE, AlreadyDone, Preempted, TrainingDiverged
    from vistrain.errors import ConfigError
    from vistrain.tasks import get_spec, make_trainer

    overrides = list(args.overrides)
    try:
        if args.smoke:
            overrides = smoke_overrides(args.config, overrides)
        cfg = load_config(args.config, overrides)
        get_spec(cfg.task)
        ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_s, always=cfg.train.parallel == "fsdp")
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    prefix = f"[rank {ctx.rank}] " if ctx.world_size > 1 else ""
    clean = False
    try:
        final = make_trainer(cfg, ctx).fit()
        clean = True
        if ctx.is_main:
            print(f"done: {final}\n  samples: {Path(cfg.run.out_dir) / 'samples'}", flush=True)
        return 0
    except AlreadyDone as e:
        clean = True
        if ctx.is_main:
            print(f"vistrain: {e}", flush=True)
        return 0
    except Preempted as e:
        clean = True
        # The scheduler may signal again while we exit: that must not turn status 75 into 143.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if ctx.is_main:
            print(f"vistrain: {e}", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except ConfigError as e:
        return _fail(f"config error: {e}", 2, prefix)
    except (CheckpointError, RunDirError, TrainingDiverged, ValueError) as e:
        return _fail(str(e), 1, prefix)
    finally:
        shutdown(ctx, clean)


def smoke_overrides(config_path: str, overrides: list[str]) -> list[str]:
    """Tiny shapes and a handful of steps, in a fresh temporary folder: never near the real run."""
    from vistrain.config import load_config
    from vistrain.tasks import get_spec

    cfg = load_config(config_path, overrides)
    out_dir = tempfile.mkdtemp(prefix="vistrain-smoke-")
    print(f"smoke run in {out_dir}", flush=True)
    smoke = [
        "train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.ckpt_every=3",
        "train.batch_size=8", "train.micro_batch_size=0", "data.num_workers=0", "run.resume=never",
        f"run.out_dir={out_dir}",
    ]
    return overrides + smoke + list(get_spec(cfg.task).smoke_overrides)


def run_sample(parser: argparse.ArgumentParser, sample_parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.tasks import get_spec

    args, _ = parser.parse_known_args(argv)  # the task's own flags are not known yet
    try:
        ckpt = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        model_config = ckpt_lib.load_model_config(ckpt)
        spec = get_spec(str(model_config.get("task")))
    except (ckpt_lib.CheckpointError, ConfigError) as e:
        return _fail(_sample_message(e, args), 1)
    if spec.sample is None:
        return _fail(f"task {spec.name!r} of {ckpt} cannot sample images", 2)
    add_task_options(sample_parser, spec)
    args = parser.parse_args(argv)
    try:
        request, out, device = _sample_request(args, spec)
        count, columns = _sample_layout(spec, model_config, request, out)
    except ValueError as e:  # ConfigError too: every flag is checked before any work
        return _fail(str(e), 2)
    try:
        with _signals_stop_sampling():
            weights = ckpt_lib.load_weights(ckpt)
            written = _write_samples(spec.sample(model_config, weights, request, device), out, count, columns)
    except (ckpt_lib.CheckpointError, ValueError) as e:
        return _fail(_sample_message(e, args), 1)
    except _Stopped as e:
        print(f"vistrain: sampling stopped by {e.name}; {out} was not written", file=sys.stderr, flush=True)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    print(f"wrote {written} images from {ckpt} to {out}")
    return 0


def _sample_layout(spec, model_config: dict, request, out: Path) -> tuple[int, Optional[int]]:
    """The number of images a request makes (the task's own flags may decide it) and the columns of a .png grid;
    the task refuses flags that contradict each other here."""
    count = spec.sample_count(model_config, request) if spec.sample_count else request.num
    if out.suffix == ".png" and count > MAX_GRID_IMAGES:
        raise ValueError(f"{count} images in a .png grid: at most {MAX_GRID_IMAGES}; write .npz for more")
    return count, spec.grid_columns(model_config, request) if spec.grid_columns else None


def _sample_message(err: Exception, args) -> str:
    text = str(err)
    if args.which == "best" and "no checkpoint found" in text:
        return f"{args.source} has no `best` checkpoint (no eval metric was recorded yet); use --which latest"
    return text


def _sample_request(args, spec):
    """Check the flags of `vistrain sample`; every message names the flag."""
    from vistrain.engine.dist import pick_device
    from vistrain.outpaths import check_output_file
    from vistrain.tasks import SampleRequest

    out = check_output_file(args.out, "--out", example="samples.png")
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {out}: expected a file name ending in .png (a grid) or .npz (arr_0 array)")
    if args.num < 1:
        raise ValueError(f"--num {args.num}: must be at least 1")
    if out.suffix == ".png" and args.num > MAX_GRID_IMAGES:
        raise ValueError(f"--num {args.num} with a .png grid: at most {MAX_GRID_IMAGES}; write .npz for more")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    labels = None
    if args.labels:
        try:
            labels = [int(c) for c in args.labels.split(",")]
        except ValueError:
            raise ValueError(f"--labels {args.labels}: expected comma-separated class ids, e.g. 0,3,7") from None
    try:
        device = pick_device(args.device, 0)
    except Exception as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    request = SampleRequest(args.num, labels, args.seed, args.batch_size, task_options(args, spec))
    return request, out, device


def add_task_options(subparser: argparse.ArgumentParser, spec) -> None:
    """The task's own sampling flags (VAR's --cfg, --top-k, ...), once the task is known."""
    for option in spec.sample_options:
        if option.type is bool:
            subparser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            subparser.add_argument(option.flag, type=option.type, default=option.default, help=option.help)


def task_options(args, spec) -> dict:
    """The task's own flags by dest name, each checked by the task that declares it (ConfigError naming it)."""
    for option in spec.sample_options:
        option.check(getattr(args, option.dest))
    return {option.dest: getattr(args, option.dest) for option in spec.sample_options}


def run_eval(parser: argparse.ArgumentParser, eval_parser: argparse.ArgumentParser, argv: list[str]) -> int:
    import dataclasses

    import torch

    from vistrain import evaluate
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.engine.dist import init_distributed, shutdown
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_file
    from vistrain.tasks import get_spec

    args, _ = parser.parse_known_args(argv)
    try:
        ckpt = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        spec = get_spec(str(ckpt_lib.load_model_config(ckpt).get("task")))
    except (ckpt_lib.CheckpointError, ConfigError) as e:
        return _fail(_sample_message(e, args), 1)
    add_task_options(eval_parser, spec)
    args = parser.parse_args(argv)
    names = lambda text: [m.strip() for m in text.split(",") if m.strip()]  # noqa: E731
    try:
        request = evaluate.EvalRequest(names(args.metrics), args.num, args.batch_size, args.seed, args.ref,
                                       args.detector, names(args.lmms_tasks), args.lmms_limit, task_options(args, spec))
        if not (request.metrics or request.lmms_tasks):
            raise ConfigError("nothing to score: give --metrics (e.g. fid,kid,is,pr or judge) or --lmms-tasks")
        if args.num < 1 or args.batch_size < 1:
            raise ConfigError(f"--num-images {args.num} and --batch-size {args.batch_size}: both must be at least 1")
        # the result's place is checked before any work: a score must never be lost to a bad --out
        out = check_output_file(args.out or evaluate.default_result_path(ckpt), "--out")
    except ConfigError as e:
        return _fail(str(e), 2)
    try:
        ctx = init_distributed(args.device.split(":")[0])
        if ":" in args.device:  # one process on a chosen GPU (an eval job beside training)
            ctx = dataclasses.replace(ctx, device=torch.device(args.device))
    except (ConfigError, RuntimeError) as e:
        return _fail(f"--device {args.device}: {e}", 2)
    clean = False
    try:
        record = evaluate.evaluate(ckpt, request, ctx)
        clean = True
    except ConfigError as e:
        return _fail(str(e), 2)
    except (ckpt_lib.CheckpointError, ValueError, ImportError) as e:
        return _fail(str(e), 1)
    finally:
        shutdown(ctx, clean)
    if ctx.is_main:
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record["metrics"].items())
        print(f"{ckpt} ({record['seconds']:.0f} s): {shown}", flush=True)  # first: a failed write loses no score
        try:
            evaluate.write_result(out, record)
        except OSError as e:
            return _fail(f"--out {out}: the result could not be written ({e}); the scores are printed above", 1)
        print(f"wrote {out}", flush=True)
    return 0


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM during sampling. A BaseException, as KeyboardInterrupt is: no `except Exception` on the
    way catches it, and every `with` and `finally` it unwinds cleans up (the .npz writer drops its temporary file)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def _signals_stop_sampling():
    """SIGINT and SIGTERM raise _Stopped, unless this process was started ignoring them (a script's background job
    ignores SIGINT) or this is not the main thread (the only one that may set handlers)."""
    main = threading.current_thread() is threading.main_thread()
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if main and signal.getsignal(sig) != signal.SIG_IGN]

    def stop(signum, frame):
        for sig in handled:  # a second Ctrl-C must not cut short the cleanup of the first
            signal.signal(sig, signal.SIG_IGN)
        raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_samples(chunks, out: Path, num: int, columns) -> int:
    """Write chunks of images as they come (.npz), or as one grid (.png); a progress bar on stderr."""
    import torch
    from tqdm import tqdm

    from vistrain.engine.images import NpzImageWriter, make_grid, save_png

    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=num, unit="img", desc="sampling", file=sys.stderr, disable=None)
    written = 0
    try:
        if out.suffix == ".npz":
            with NpzImageWriter(out, num) as writer:
                for chunk in chunks:
                    writer.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        else:
            images = []
            for chunk in chunks:
                images.append(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            save_png(out, make_grid(torch.cat(images), nrow=columns))
    finally:
        bar.close()
    return written


if __name__ == "__main__":
    sys.exit(main())
