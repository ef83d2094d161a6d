"""Are class-conditional digits samples the digit they were asked for? Prints a table.

An independent judge -- scikit-learn's SVC on the real 8x8 digits of vistrain's fixed train split -- classifies
K samples of every class from a GAN or VAR run (its latest checkpoint), pooled to 8x8 like the real data. The
judge's accuracy on the real val split is printed beside, as the ceiling.

    python benchmarks/digits_accuracy.py runs/var_digits [--per-class 50] [--seed 0] [--cfg 1.5 --top-k 0 ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.svm import SVC

from vistrain.data.digits import DigitsDataset
from vistrain.engine import checkpoint as ckpt_lib
from vistrain.tasks import SampleRequest, get_spec


def pixels_8x8(images_BCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> flattened grey 8x8 (area pooling, as the digits were upsampled from 8x8)."""
    return F.adaptive_avg_pool2d(images_BCHW.float().mean(1, keepdim=True), 8).flatten(1).numpy()


def judge() -> tuple[SVC, float]:
    train, val = DigitsDataset("train", 8, 1), DigitsDataset("val", 8, 1)
    x = lambda ds: pixels_8x8(torch.stack([ds[i]["image"] for i in range(len(ds))]))  # noqa: E731
    y = lambda ds: np.array([int(ds[i]["label"]) for i in range(len(ds))])  # noqa: E731
    clf = SVC(gamma="scale", C=10).fit(x(train), y(train))
    return clf, float((clf.predict(x(val)) == y(val)).mean())


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
               "num_per_class": args.per_class}
    request = SampleRequest(len(labels), labels, args.seed, 250, options)
    images = torch.cat(list(spec.sample(model_config, weights, request, torch.device("cpu"))))
    clf, ceiling = judge()
    predicted = clf.predict(pixels_8x8(images))
    truth = np.array(labels)
    print(f"\ndigits class accuracy of {len(labels)} class-conditional samples of {args.run} "
          f"({model_config['task']}, seed {args.seed})\n")
    print("| class | " + " | ".join(str(c) for c in range(classes)) + " | all |")
    print("|---" * (classes + 2) + "|")
    per_class = [100 * float((predicted[truth == c] == c).mean()) for c in range(classes)]
    print("| acc % | " + " | ".join(f"{a:.0f}" for a in per_class) + f" | {100 * float((predicted == truth).mean()):.1f} |")
    print(f"\nthe judge (SVC on the 8x8 train split) on the real val digits: {100 * ceiling:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
