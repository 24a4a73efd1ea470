"""[engine] Errors a user can fix, and how the scripts tell the user things.

Every script's main catches UserError and prints it as one line, `error: <message>`, exit
code 1; any other exception is a bug and keeps its traceback. A message says which file or
flag is wrong, what is wrong with it, and what to do.

    UserError             a bad flag, a missing or damaged file, a machine that lacks something
    ├── TrainError        train.py's flags or a run's state; the loop records it in metrics.jsonl
    ├── DataError         a tokenized .jsonl, its sidecar or its token cache
    ├── CheckpointError   a checkpoint .npz; a run's folder passes over a damaged one (run_dir.py)
    ├── TokenizerError    a tokenizer, its model file or the text it reads; the Hugging Face export
    │                     adds that it wrote nothing
    ├── HFError           a Hugging Face folder that cannot be exported to or read
    ├── GGUFError         a model or tokenizer llama.cpp's GGUF file cannot express (export_gguf.py)
    ├── DeviceError       --device cuda cannot run here (scripts/gpu_parity.py stops on it)
    └── DownloadError     a download that failed for good; prepare_tinystories.py falls back on
                          the bundled sample

A subclass exists where some caller, a test included, tells it apart from the others.
"""
import sys


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class TrainError(UserError):
    """Bad training flags, or a run that cannot go on (a NaN loss, a full disk)."""


class DataError(UserError):
    """A data file is missing, malformed, or does not fit the model."""


class CheckpointError(UserError):
    """A file is not a usable checkpoint."""


class TokenizerError(UserError):
    """A tokenizer that cannot be built (bad model file, flag or text to read)."""


class HFError(UserError):
    """A folder or checkpoint that cannot be exported to or imported from the Hugging Face format."""


class GGUFError(UserError):
    """A checkpoint that cannot be exported as a GGUF file for llama.cpp, or an output that must not be written."""


class DeviceError(UserError):
    """--device cuda cannot run here; the message says what to install or check."""


class DownloadError(UserError):
    """A download that failed for good (after retries, or a client error)."""


def say(message):
    """A line for the user on stderr, at once (notes, progress, and the one line of an error)."""
    print(message, file=sys.stderr, flush=True)
