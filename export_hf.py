"""[command] Export a checkpoint as a Hugging Face folder, for `transformers` (weights, config and tokenizer): a
GPT2LMHeadModel for a GPT-2 checkpoint, a LlamaForCausalLM for one trained with --arch llama.

    python3 export_hf.py checkpoints_small/checkpoint_final.npz hf_small
    python3 export_hf.py checkpoints_small/checkpoint_final.npz hf_small --license mit

then, where transformers and torch are installed:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained("hf_small"), AutoTokenizer.from_pretrained("hf_small")
    print(tok.decode(model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=50)[0]))

Such a folder (an export, or GPT-2's own files) is read back by

    python3 train.py --init_from hf_small --train_data ... --val_data ...    # fine-tune from its weights
    python3 generate.py --checkpoint hf_small --prompt "Once upon a time"

The folder's format, both ways, is hf_format.py; this is its command line, and the choice of the
tokenizer files to write: GPT-2's BPE for a checkpoint trained with tiktoken's gpt2, our own BPE (as
the checkpoint embeds it) in the same spelling, else none. An export onto an earlier one replaces
the whole folder, only once the new one is complete.

Nothing in the folder names a path of this machine: config.json's "numpy_gpt" record is
shareable.shareable_record of the checkpoint's (the recipe, files by name alone), and so is what the
model card (README.md, model_card.py) says of the run. --license is the weights' licence in the card's
header; its default "other" chooses none on the exporter's behalf, and the card says so.
"""
import sys

from bpe import BPEModel
from checkpoint import load_checkpoint
from config import GPT2_VOCAB_SIZE
from errors import HFError, TokenizerError, UserError
from flag_types import Parser
from gpt2_files import gpt2_bpe_model
from hf_format import (EXPORT_FORMAT, EXPORT_VERSION, check_exportable, check_feed_forward, safetensors_numpy,
                       write_folder)
from model_card import DEFAULT_LICENSE, card_facts, license_id, model_card
from pretokens import ENDOFTEXT, GPT2_PATTERN
from shareable import file_name, shareable_record
from tokenizer import tokenizer_kind


def tokenizer_to_export(meta, config):
    """(BPEModel, note): the tokenizer the checkpoint was trained with, or (None, why not)."""
    identity = meta.get("tokenizer") or {}
    kind, name = tokenizer_kind(identity.get("type")), identity.get("name")
    if (kind, name) == ("tiktoken", "gpt2") or (not identity and config.vocab_size == GPT2_VOCAB_SIZE):
        return gpt2_bpe_model(), "GPT-2's BPE (tiktoken gpt2)"  # as generate.py assumes
    if kind == "bpe":
        text = meta.get("tokenizer_model_json")
        if text is None:
            return None, "the checkpoint does not embed its BPE model"
        model = BPEModel.from_json(text, "the checkpoint's embedded BPE model")
        if model.pattern != GPT2_PATTERN:
            return None, "its BPE splits text with another pattern than GPT-2's, which transformers' GPT2Tokenizer uses"
        return model, f"our BPE ({model.vocab_size} tokens)"
    if not identity:
        return None, f"the checkpoint names no tokenizer and vocab_size {config.vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}"
    return None, f"tokenizer {identity.get('type')} {name} has no GPT-2 style vocab.json/merges.txt"


def export(checkpoint_path, out_dir, log=print, license=DEFAULT_LICENSE):
    """Write checkpoint_path as a Hugging Face folder out_dir (GPT-2 or Llama, as the checkpoint's arch),
    with its model card under the weights' licence `license`; returns the files written."""
    safetensors_numpy()  # first: without it nothing can be written
    ck = load_checkpoint(checkpoint_path)
    check_feed_forward(ck.config, checkpoint_path)  # before anything is written
    check_exportable(ck.config, checkpoint_path)
    bpe, what = tokenizer_to_export(ck.meta, ck.config)
    eot = bpe.specials[ENDOFTEXT] if bpe is not None else (ck.meta.get("tokenizer") or {}).get("eot_id")
    shared = shareable_record(ck.meta)
    record = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
              "positions": ck.config.positions, **shared, "config": ck.config.to_dict(), "step": ck.meta.get("step"),
              "checkpoint": file_name(checkpoint_path)}
    card = model_card(card_facts(ck, checkpoint_path, shared, tokenizer_files=bpe is not None), license)
    try:
        files = write_folder(out_dir, ck.config, ck.params, bpe, eot, record, card)
    except TokenizerError as e:  # a BPE that vocab.json + merges.txt cannot spell
        raise HFError(f"{checkpoint_path}: {e}; nothing was written to {out_dir}") from None
    log(f"tokenizer: {what} -> vocab.json + merges.txt" if bpe is not None else
        f"note: no tokenizer files written: {what}")
    return files


def main(argv=None):
    p = Parser(
        description="Export a numpy-gpt checkpoint as a Hugging Face folder (config.json, model.safetensors, "
                    "vocab.json + merges.txt, a model card README.md) that transformers' AutoModelForCausalLM and "
                    "AutoTokenizer load: a GPT2LMHeadModel, or a LlamaForCausalLM for a checkpoint trained with "
                    "--arch llama. Nothing in it names a path of this machine.",
        epilog="Example: python3 export_hf.py checkpoints_small/checkpoint_final.npz hf_small")
    p.add_argument("checkpoint", help="a .npz checkpoint written by train.py")
    p.add_argument("out_dir", help="folder to write (new, empty, or an earlier export, which is replaced)")
    p.add_argument("--license", type=license_id, default=DEFAULT_LICENSE,
                   help="the weights' licence in the model card, a Hugging Face hub licence id such as mit, "
                        f"apache-2.0 or cc-by-4.0 (default {DEFAULT_LICENSE}: none chosen for you, as the card says)")
    args = p.parse_args(argv)
    try:
        files = export(args.checkpoint, args.out_dir, license=args.license)
    except UserError as e:
        p.exit(1, f"error: {e}\n")
    except OSError as e:  # a folder we may not write to, a full disk
        p.exit(1, f"error: cannot write {args.out_dir}: {e.strerror} ({e.filename or args.out_dir})\n")
    except KeyboardInterrupt:  # the new folder is removed; an earlier export stays as it was
        p.exit(130, f"interrupted; nothing was written to {args.out_dir}\n")
    print(f"wrote {args.out_dir}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
