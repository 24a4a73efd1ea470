"""[command] Draw training and validation loss curves from a train.py metrics file (needs matplotlib).

    python3 plot_metrics.py checkpoints_small/metrics.jsonl                 # -> checkpoints_small/loss.png
    python3 plot_metrics.py checkpoints_small/metrics.jsonl --out curves.png

matplotlib is optional for the project: without it this script says so and exits 1.
"""
import argparse
import json
import os
import sys

from errors import UserError


def read_metrics(path):
    """(train, eval) lists of records from a metrics.jsonl written by train.py."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("type") == "train":
                train.append(rec)
            elif rec.get("type") == "eval":
                evals.append(rec)
    return train, evals


def plot(path, out):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(path)
    if not train and not evals:
        raise UserError(f"{path} has no train or eval records yet")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(path))) or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot train/val loss from train.py's metrics.jsonl to a PNG.")
    parser.add_argument("metrics", help="metrics.jsonl in a --save_dir")
    parser.add_argument("--out", default=None, help="output PNG (default: loss.png next to the metrics file)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "loss.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(1, "error: matplotlib is not installed (pip install matplotlib); it is optional for training\n")
    try:
        plot(args.metrics, out)
    except (UserError, OSError, ValueError) as e:  # ValueError: a line that is not JSON
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
