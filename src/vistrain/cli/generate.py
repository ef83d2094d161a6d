"""`vistrain generate SOURCE --image X --prompt '...'`: a VLM's answer to a prompt about images (a task with a
PromptAnswerer)."""

from __future__ import annotations

import argparse
import math

from vistrain.cli.common import add_source, fail, find_source, source_message

NAME = "generate"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="answer a prompt about images with a vision-language model")
    add_source(parser)
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--prompt", required=True, help="the question, e.g. 'What digit is this?'")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="the most likely token each time (the default)")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature instead")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine.checkpoint_files import CheckpointError
    from vistrain.engine.dist import pick_device
    from vistrain.errors import ConfigError
    from vistrain.tasks.capabilities import Prompt, PromptAnswerer

    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens {args.max_new_tokens}: must be at least 1", 2)
    if args.temperature is not None and (args.greedy or not 0 < args.temperature < math.inf):
        return fail("--temperature samples (and must be a finite number > 0); --greedy takes the most likely "
                    "token: give one", 2)
    if args.top_k < 0 or not 0 <= args.top_p <= 1:
        return fail(f"--top-k {args.top_k} --top-p {args.top_p}: top-k must be >= 0 and top-p in [0, 1] (0 = off)", 2)
    prompt = Prompt(text=args.prompt, images=list(args.image), max_new_tokens=args.max_new_tokens,
                    greedy=args.temperature is None, temperature=args.temperature or 1.0, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    try:
        device = pick_device(args.device, 0)
        folder, _, spec = find_source(args.source, args.which)
        answerer = spec.capability(PromptAnswerer)
        if answerer is None:
            return fail(f"{folder} holds a {spec.name!r} model, which does not generate text", 2)
        text = answerer.answer(folder, prompt, device)
    except ConfigError as e:  # a flag the model cannot honour (--max-new-tokens beyond its context)
        return fail(str(e), 2)
    except (CheckpointError, ValueError) as e:
        return fail(source_message(e, args), 1)
    print(text)
    return 0
