#!/usr/bin/env bash
# The whole job end to end on the bundled sample, with no network:
#   prepare -> tokenize -> train a tiny model (a minute or two) -> generate stories.
# Everything it writes goes under demo_out/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
PY=.venv/bin/python
OUT=demo_out

echo "== 1/4 prepare: the bundled TinyStories sample -> $OUT/data/*.txt"
$PY prepare_tinystories.py --data_dir $OUT/data --offline

echo "== 2/4 tokenize with GPT-2's BPE (tiktoken, from the bundled ranks)"
for split in train valid; do
  $PY tokenizer.py $OUT/data/tinystories_${split}_sample.txt $OUT/data/${split}_tokenized.jsonl \
      --tokenizer tiktoken --encoding gpt2 --max_length 512
done

echo "== 3/4 train a tiny model (d_model 64, 2 layers) for 800 steps"
$PY train.py --train_data $OUT/data/train_tokenized.jsonl --val_data $OUT/data/valid_tokenized.jsonl \
    --vocab_size 50257 --d_model 64 --n_heads 2 --d_ff 256 --n_layers 2 \
    --batch_size 16 --seq_len 64 --max_steps 800 --learning_rate 3e-3 --min_lr 3e-4 --warmup_steps 50 \
    --save_dir $OUT/checkpoints --log_interval 100 --eval_interval 400 --eval_batches 20 \
    --overwrite  # a second demo starts over (without it train.py refuses to replace a finished run)

echo "== 4/4 generate"
$PY generate.py --checkpoint $OUT/checkpoints/checkpoint_final.npz --prompt "Once upon a time" \
    --max_length 80 --temperature 0.8 --top_k 40 --num_samples 2 --seed 0

echo
echo "demo done: data in $OUT/data, checkpoints and metrics.jsonl in $OUT/checkpoints"
