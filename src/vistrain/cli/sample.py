"""`vistrain sample SOURCE --out FILE.png|FILE.npz`: images from a trained model (a task with an ImageSampler).

.npz files are written as the chunks come (memory stays bounded for any --num), with a progress bar on a
terminal; Ctrl-C or SIGTERM stop it with one line and leave no file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from vistrain.cli.common import add_source, add_task_options, fail, find_source, source_message, task_options

NAME = "sample"
MAX_GRID_IMAGES = 4096  # a .png grid beyond this is unreadable and huge; .npz is for many images


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="draw images from a trained model")
    add_source(parser, what="a run folder (uses its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.npz (arr_0: N x H x W x 3 uint8)")
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--labels", default=None, help="comma-separated class ids to cycle through, e.g. 0,1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.tasks.capabilities import ImageSampler

    args, _ = parser.parse_known_args(argv)  # the task's own flags are not known yet
    try:
        ckpt, model_config, spec = find_source(args.source, args.which)
    except (ckpt_lib.CheckpointError, ConfigError) as e:
        return fail(source_message(e, args), 1)
    sampler = spec.capability(ImageSampler)
    if sampler is None:
        return fail(f"task {spec.name!r} of {ckpt} cannot sample images", 2)
    add_task_options(parser, sampler.options)
    args = parser.parse_args(argv)
    try:
        request, out, device = _request(args, sampler)
        count = sampler.count(model_config, request)
        if out.suffix == ".png" and count > MAX_GRID_IMAGES:
            raise ValueError(f"{count} images in a .png grid: at most {MAX_GRID_IMAGES}; write .npz for more")
        columns = sampler.grid_columns(model_config, request)
    except ValueError as e:  # ConfigError too: every flag is checked before any work
        return fail(str(e), 2)
    try:
        with _signals_stop_sampling():
            weights = ckpt_lib.load_weights(ckpt)
            written = _write_samples(sampler.sample(model_config, weights, request, device), out, count, columns)
    except (ckpt_lib.CheckpointError, ValueError) as e:
        return fail(source_message(e, args), 1)
    except _Stopped as e:
        print(f"vistrain: sampling stopped by {e.name}; {out} was not written", file=sys.stderr, flush=True)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    print(f"wrote {written} images from {ckpt} to {out}")
    return 0


def _request(args: argparse.Namespace, sampler):
    """Check the flags of `vistrain sample`; every message names the flag."""
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine.dist import pick_device
    from vistrain.outpaths import check_output_file
    from vistrain.tasks.capabilities import SampleRequest

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
    request = SampleRequest(args.num, labels, args.seed, args.batch_size, task_options(args, sampler.options))
    return request, out, device


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
    # imported here: CLI start-up (see cli/__init__.py)
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
