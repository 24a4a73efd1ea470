"""[command] Draw training and validation loss curves from a train.py metrics file (needs matplotlib).

    python3 plot_metrics.py checkpoints_small/metrics.jsonl                 # -> checkpoints_small/loss.png
    python3 plot_metrics.py checkpoints_small/metrics.jsonl --out curves.png
    python3 plot_metrics.py checkpoints_small/metrics.jsonl --out plots/    # -> plots/loss.png

The log is read one record at a time (metrics.Records: lines that are not train.py's records are
skipped and counted), and at most --max_points points of each curve are kept, spread evenly over
it, so memory does not grow with the log's length. The picture is written atomically and never over
the metrics file itself. matplotlib is optional for the project: without it this script says so and
exits 1.
"""
import os
import sys

from atomic import atomic_write, refuse_inputs
from errors import UserError, say
from flag_types import Number, Parser
from metrics import Records, Thinned

FORMATS = (".png", ".pdf", ".svg")  # what matplotlib writes without extra packages
MAX_POINTS = Number(int, 2, 10**6)


def read_curves(path, max_points=2000):
    """(train, evals, skipped): Thinned (step, loss) and (step, val_loss) points of a metrics.jsonl, and the
    number of lines that were not usable records."""
    records = Records(path, error=UserError)
    train, evals = Thinned(max_points), Thinned(max_points)
    for r in records:
        if r["type"] == "train":
            train.add(r["step"], r["loss"])
        elif r["type"] == "eval":
            evals.add(r["step"], r["val_loss"])
    return train, evals, records.skipped


def output_path(metrics, out):
    """The file to write: --out as given (a picture file), loss.png in --out when it names a folder (one that
    exists, or a path ending in /), loss.png beside the metrics file without --out."""
    if out is None:
        return os.path.join(os.path.dirname(os.path.abspath(metrics)), "loss.png")
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return os.path.join(out, "loss.png")
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise UserError(f"--out {out}: name a {', '.join(FORMATS)} file or a folder (matplotlib picks the format "
                        "from the extension)")
    return out


def plot(path, out, max_points=2000, log=say):
    """Draw the curves of the metrics file path into the picture file out; returns out. The log is read
    (and its mistakes reported) before matplotlib is needed."""
    refuse_inputs([out], [("metrics file", path)], error=UserError)
    train, evals, skipped = read_curves(path, max_points)
    if skipped:
        log(f"note: {path}: skipped {skipped:,} line(s) that are not train.py records")
    if not len(train) and not len(evals):
        raise UserError(f"{path} has no train or eval records yet")
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed (pip install matplotlib); it is optional for training") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(train):
        ax.plot(*train.points(), label="train loss", lw=1)
    if len(evals):
        ax.plot(*evals.points(), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(path))) or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(out, "wb") as f:
            fig.savefig(f, dpi=120, format=os.path.splitext(out)[1][1:].lower())
    finally:
        plt.close(fig)
    return out


def main(argv=None):
    parser = Parser(description="Plot train/val loss from train.py's metrics.jsonl to a picture.")
    parser.add_argument("metrics", help="metrics.jsonl in a --save_dir")
    parser.add_argument("--out", default=None, help="output picture (.png, .pdf or .svg), or a folder to write "
                                                    "loss.png in (default: loss.png next to the metrics file)")
    parser.add_argument("--max_points", type=MAX_POINTS, default=2000,
                        help=f"most points drawn per curve, spread evenly over the run: {MAX_POINTS} (default: 2000)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.metrics, output_path(args.metrics, args.out), args.max_points)
    except UserError as e:
        parser.exit(1, f"error: {e}\n")
    except OSError as e:  # a metrics file that cannot be read, a folder that cannot be written, a full disk
        parser.exit(1, f"error: {e.filename or args.metrics}: {e.strerror}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted; nothing written\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
