"""`vistrain import KIND ... --out MODEL`: another project's weights as a vistrain model folder (interop/).

    var       the official FoundationVision/VAR files (--vae, --var)
    vlm       a SigLIP folder and a Llama-family folder with its tokenizer (--vision, --lm): a new projector
    nanovlm   a folder written by huggingface/nanoVLM's save_pretrained (SOURCE, --tokenizer)
    smolvlm   a transformers SmolVLM / Idefics3 folder (SOURCE), with its processing
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vistrain.cli.common import fail

NAME = "import"
DOWNLOAD_HINT = "vistrain does not download: fetch it first, e.g. `huggingface-cli download <repo id> --local-dir DIR`"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="turn another project's weights into a vistrain model folder")
    parser.add_argument("kind", choices=("var", "vlm", "nanovlm", "smolvlm"),
                        help="var: the official FoundationVision/VAR files; vlm: a SigLIP and a Llama folder; "
                             "nanovlm: a folder written by huggingface/nanoVLM's save_pretrained; smolvlm: a "
                             "transformers SmolVLM / Idefics3 folder")
    parser.add_argument("source", nargs="?", default=None,
                        help="nanovlm: the folder with nanoVLM's config.json and model.safetensors (or --source); "
                             "smolvlm: the SmolVLM / Idefics3 folder")
    parser.add_argument("--source", dest="source_opt", default=None, help="nanovlm, smolvlm: the same as SOURCE")
    parser.add_argument("--tokenizer", default=None,
                        help="nanovlm: a local folder of the tokenizer that config.json's lm_tokenizer names "
                             "(needed unless lm_tokenizer is itself a local folder)")
    parser.add_argument("--out", required=True, help="a new folder: config.json + model.safetensors (+ assets)")
    parser.add_argument("--vae", help="var: the official tokenizer file, e.g. vae_ch160v4096z32.pth")
    parser.add_argument("--var", help="var: the official transformer file, e.g. var_d16.pth")
    parser.add_argument("--vision", help="vlm: a local Hugging Face SigLIP folder")
    parser.add_argument("--lm", help="vlm: a local Hugging Face Llama-family folder with its tokenizer")
    parser.add_argument("--pixel-shuffle-factor", type=int, default=4, help="vlm: the projector's fold (nanoVLM: 4)")
    parser.add_argument("--patch-nums", default=None,
                        help="comma-separated scale sizes, e.g. 1,2,3,4,5,6,8,10,13,16: needed only when the "
                             "transformer's shapes do not tell them (the released models' are known)")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine.checkpoint_files import CheckpointError, write_model_folder
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_folder
    from vistrain.provenance import collect

    args = parser.parse_args(argv)
    importer = {"var": _var, "vlm": _vlm, "nanovlm": _nanovlm, "smolvlm": _smolvlm}[args.kind]
    try:
        check_output_folder(args.out, "--out")
        model_config, weights, assets, sources, hint = importer(args)
        refuse_non_finite(weights, sources)
        folder = write_model_folder(Path(args.out), weights, model_config, assets, provenance_record=collect("import"))
    except (ConfigError, ValueError) as e:  # a bad flag or input file (the format errors are ValueErrors)
        return fail(str(e), 2)
    except CheckpointError as e:
        return fail(str(e), 1)
    print(f"imported {args.kind} into {folder}: {hint.format(folder=folder)}")
    return 0


def _one_source(args: argparse.Namespace) -> str:
    if args.source and args.source_opt and args.source != args.source_opt:
        raise ValueError(f"import {args.kind}: two sources given ({args.source} and --source {args.source_opt})")
    source = args.source or args.source_opt
    if not source:
        raise ValueError(f"import {args.kind} needs the folder to import (SOURCE or --source)")
    return source


def _no_source(args: argparse.Namespace) -> None:
    if args.source or args.source_opt or args.tokenizer:
        raise ValueError(f"import {args.kind} takes no SOURCE, --source or --tokenizer (those are for nanovlm and "
                         "smolvlm)")


def _var(args: argparse.Namespace):
    from vistrain.interop.var_official import import_official  # imported here: CLI start-up (see cli/__init__.py)

    _no_source(args)
    if not (args.vae and args.var):
        raise ValueError("import var needs --vae and --var (the official files)")
    patch_nums = None
    if args.patch_nums is not None:
        try:
            patch_nums = [int(p) for p in args.patch_nums.split(",")]
        except ValueError:
            raise ValueError(f"--patch-nums {args.patch_nums}: expected comma-separated sizes, e.g. 1,2,3,4") from None
    model_config, weights = import_official(args.vae, args.var, patch_nums)
    hint = (f"VAR-d{model_config['model']['depth']} and its tokenizer: sample with `vistrain sample {{folder}} --out "
            "x.png`, fine-tune with var.init={folder} var.tokenizer={folder}")
    return model_config, weights, {}, {"vae.": f"--vae {args.vae}", "var.": f"--var {args.var}"}, hint


def _vlm(args: argparse.Namespace):
    from vistrain.interop.vlm_parts import import_hf  # imported here: CLI start-up (see cli/__init__.py)

    _no_source(args)
    if not (args.vision and args.lm):
        raise ValueError("import vlm needs --vision (a SigLIP folder) and --lm (a Llama-family folder)")
    for flag, path in (("--vision", args.vision), ("--lm", args.lm)):
        if not Path(path).is_dir():  # never a hub id
            raise ValueError(f"{flag} {path} is not a folder: give a local Hugging Face model folder ({DOWNLOAD_HINT})")
    model_config, weights, assets = import_hf(args.vision, args.lm, args.pixel_shuffle_factor)
    sources = {"vlm.vision.": f"--vision {args.vision}", "vlm.lm.": f"--lm {args.lm}"}
    return model_config, weights, assets, sources, "a new projector: fine-tune with model.init={folder}"


def _nanovlm(args: argparse.Namespace):
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.interop.nanovlm import import_nanovlm
    from vistrain.interop.tokenizers import tokenizer_assets

    source = _one_source(args)
    model_config, weights, tokenizer = import_nanovlm(source, args.tokenizer)
    grid = model_config["max_image_size"] // model_config["model"]["vision"]["image_size"]
    hint = (f"images up to {grid}x{grid} tiles, processed as nanoVLM does: answer with `vistrain generate {{folder}} "
            "--image x.png --prompt '...'`, fine-tune with model.init={folder}")
    return model_config, weights, tokenizer_assets(tokenizer), {"": source}, hint


def _smolvlm(args: argparse.Namespace):
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.interop.smolvlm import import_smolvlm
    from vistrain.interop.tokenizers import tokenizer_assets

    source = _one_source(args)
    if args.tokenizer:
        raise ValueError("import smolvlm takes the tokenizer from its folder (--tokenizer is for nanovlm)")
    if not Path(source).is_dir():  # never a hub id
        raise ValueError(f"{source} is not a folder: give a local SmolVLM / Idefics3 folder ({DOWNLOAD_HINT})")
    model_config, weights, tokenizer = import_smolvlm(source)
    hint = ("SmolVLM's prompt and image tiling: answer with `vistrain generate {folder} --image x.png --prompt '...'`, "
            "fine-tune with model.init={folder}, export back with `vistrain export RUN --format transformers`")
    return model_config, weights, tokenizer_assets(tokenizer), {"": source}, hint


def refuse_non_finite(weights: dict, sources: dict[str, str]) -> None:
    """Imported weights that hold nan or inf would only fail later, deep in sampling or training: refuse them here,
    naming the tensor and the input it came from (`sources`: key prefix -> flag and file)."""
    import torch  # imported here: CLI start-up (see cli/__init__.py)

    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            source = next((s for prefix, s in sources.items() if key.startswith(prefix)), "the input")
            raise ValueError(f"{source}: tensor {key} holds non-finite values (nan or inf); the file is damaged or "
                             "comes from a diverged run, so it was not imported")
