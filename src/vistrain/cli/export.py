"""`vistrain export SOURCE --out DIR [--format F]`: a release folder of a trained model.

--format vistrain (the default): the checkpoint's model files (weights, config, assets such as a tokenizer)
with a model card and the provenance, loadable by every vistrain command. Other formats are another project's
files, written by the task's Exporter (tasks/capabilities.py): `transformers` for a VLM of SmolVLM's layout,
`var-official` for VAR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vistrain.cli.common import fail

NAME = "export"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="write a release folder: weights, config, assets, a model card")
    parser.add_argument("source", help="a run folder (its latest or best checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--format", default="vistrain",
                        help="vistrain (default); transformers: an Idefics3 (SmolVLM) folder for "
                             "AutoModelForImageTextToText and AutoProcessor, for a VLM of the smolvlm image layout; "
                             "var-official: the vae_*.pth and var_*.pth files of FoundationVision/VAR")
    parser.add_argument("--which", choices=("latest", "best"), default="best",
                        help="for a run folder: which checkpoint (best falls back to latest when there is none)")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain import provenance
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_folder
    from vistrain.registry import get_spec
    from vistrain.tasks.capabilities import Exporter

    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out, "--out")
    except ConfigError as e:
        return fail(str(e), 2)
    try:
        try:
            folder = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        except ckpt_lib.CheckpointError:
            if args.which != "best":
                raise
            folder = ckpt_lib.find_checkpoint(Path(args.source), "latest")
        ckpt_lib.verify_checkpoint(folder)
        model_config = ckpt_lib.load_model_config(folder)
        record = provenance.collect("export", **{"from": provenance.read(folder)})
        if args.format == "vistrain":
            out = export_vistrain(folder, model_config, Path(args.out), record)
        else:
            spec = get_spec(str(model_config.get("task")))
            exporter = spec.capability(Exporter)
            formats = ["vistrain", *(exporter.formats if exporter is not None else ())]
            if args.format not in formats:
                return fail(f"--format {args.format}: a {spec.name!r} model exports as {', '.join(formats)}", 2)
            out = exporter.export(args.format, folder, Path(args.out), record)
    except ConfigError as e:  # a model the format cannot hold, named by the exporter
        return fail(str(e), 2)
    except ckpt_lib.CheckpointError as e:
        return fail(str(e), 1)
    print(f"exported {folder} to {out}" + ("" if args.format == "vistrain" else f" ({args.format})"))
    return 0


def export_vistrain(folder: Path, model_config: dict, out: Path, record: dict) -> Path:
    """The checkpoint's model files and assets, a model card, and the provenance (the checkpoint's under "from")."""
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain import provenance
    from vistrain.engine import checkpoint_files as ckpt_lib

    weights = ckpt_lib.load_weights(folder)
    skip = {ckpt_lib.MODEL_FILE, ckpt_lib.CONFIG_FILE, ckpt_lib.TRAIN_STATE_FILE, ckpt_lib.CHECKSUMS_FILE,
            ckpt_lib.METRICS_FILE, provenance.FILE, ckpt_lib.SHARDS_DIR}
    assets = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
              if p.is_file() and p.relative_to(folder).parts[0] not in skip}
    assets["README.md"] = model_card(folder, model_config, weights, record).encode()
    return ckpt_lib.write_model_folder(out, weights, model_config, assets, provenance_record=record)


def model_card(folder: Path, model_config: dict, weights: dict, record: dict) -> str:
    # imported here: CLI start-up (see cli/__init__.py)
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
