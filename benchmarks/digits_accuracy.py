"""Are class-conditional digits samples the digit they were asked for? Prints a table.

The digits judge (vistrain.eval.digits_judge: a small CNN trained on the 8x8 digits of vistrain's fixed
train split, cached in $VISTRAIN_CACHE_DIR) classifies K samples of every class from a GAN or VAR run (its
latest checkpoint), pooled to 8x8 grey like the real data. The judge's accuracy on the real val split is
printed beside, as the ceiling, with the judge's fd_judge and is_judge of the whole sample set.

    python benchmarks/digits_accuracy.py runs/var_digits [--per-class 50] [--seed 0] [--cfg 1.5 --top-k 0 ...]
"""

from __future__ import annotations

import argparse

import torch

from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.eval.digits_judge import DigitsJudge, judge_metrics
from vistrain.registry import get_spec
from vistrain.tasks.capabilities import ImageSampler, SampleRequest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    args = parser.parse_args()
    model_config = ckpt_lib.load_model_config(args.run)
    weights = ckpt_lib.load_weights(args.run)
    spec = get_spec(model_config["task"])
    classes = 10
    labels = [c for c in range(classes) for _ in range(args.per_class)]
    options = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "more_smooth": False,
               "num_per_class": None}  # the labels below ask for each class in turn
    request = SampleRequest(len(labels), labels, args.seed, 250, options)
    images = torch.cat(list(spec.capability(ImageSampler).sample(model_config, weights, request, torch.device("cpu"))))
    judge = DigitsJudge.load()
    truth = torch.tensor(labels)
    predicted = judge.logits(images).argmax(1).cpu()
    metrics = judge_metrics(judge, images, truth)
    print(f"\ndigits class accuracy of {len(labels)} class-conditional samples of {args.run} "
          f"({model_config['task']}, seed {args.seed}), by the digits judge\n")
    print("| class | " + " | ".join(str(c) for c in range(classes)) + " | all |")
    print("|---" * (classes + 2) + "|")
    per_class = [100 * float((predicted[truth == c] == c).float().mean()) for c in range(classes)]
    print("| acc % | " + " | ".join(f"{a:.0f}" for a in per_class) + f" | {metrics['class_acc']:.1f} |")
    print(f"\nfd_judge {metrics['fd_judge']:.2f} (to the real val digits), "
          f"is_judge {metrics['is_judge']:.2f} (10 at most)")
    print(f"the judge on the real val digits: {100 * judge.accuracy_on_val(images.shape[-1]):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
