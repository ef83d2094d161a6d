"""`vistrain VERB ...`: the one entry point (also `python -m vistrain`, and under torchrun).

A thin face. Each verb is a module of this package with `add_parser(subparsers)` and `run(parser, argv)`; VERBS
lists them, so a new verb is a new module and one line here. Errors that speak to the user become one line and
an exit status: 2 bad config or arguments, 1 the run could not go on, 75 preempted (a checkpoint was written:
rerun to continue), 130 / 143 stopped by Ctrl-C / SIGTERM.

The verb modules import vistrain's heavy parts (torch, the tasks, transformers) inside their functions, each
marked "CLI start-up": `vistrain --help` and every verb load only what they use.
"""

from __future__ import annotations

import argparse
import sys

from vistrain.cli import evaluate, export, generate, imports, info, report, runs, sample, train

VERBS = (train, sample, generate, evaluate, export, imports, info, report, runs)

USAGE_EXAMPLES = """examples:
  vistrain train configs/gan/digits.yaml
  vistrain train configs/gan/digits.yaml train.max_steps=100 run.out_dir=runs/try
  torchrun --nproc_per_node=2 -m vistrain train configs/gan/digits.yaml
  vistrain sample runs/gan_digits --out grid.png --num 64 --labels 3,7
  vistrain eval runs/var_digits --metrics judge --num 1000
  torchrun --nproc_per_node=8 -m vistrain eval runs/var_d16 --metrics fid,is,pr --ref imagenet_val/ --num-images 50000
  vistrain generate runs/vlm_digits --image seven.png --prompt 'What digit is this?'
  vistrain export runs/vlm_smol --format transformers --out smolvlm_finetuned
  vistrain import var --vae vae_ch160v4096z32.pth --var var_d16.pth --out models/var_d16
  vistrain import nanovlm nanoVLM-460M --tokenizer SmolLM2-360M-Instruct --out models/nanovlm_460m
  vistrain info runs/gan_digits
  vistrain report runs/gan_digits --out report.html
  vistrain runs runs
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vistrain", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {verb.NAME: (verb, verb.add_parser(sub)) for verb in VERBS}
    args, _ = parser.parse_known_args(argv)  # which verb (the verb parses its own arguments; --help exits here)
    verb, verb_parser = parsers[args.command]
    return verb.run(verb_parser, argv[argv.index(args.command) + 1:])


__all__ = ["VERBS", "main"]
