#!/usr/bin/env bash
# CoDAT's multi-seed comparison on Multi30k De->En (README "dp vs reward vs codat over seeds"):
# the arms dp | reward | codat continue the same stage-1 DAT for the same number of updates, one
# run per (arm, seed). Each run's best checkpoint (lookahead BLEU on val) is then decoded on
# test_2016_flickr and test_2017_flickr with lookahead and with 128 samples + rerank, and analysed
# on val (Spearman correlation of s_k and sentence BLEU over the 128 samples, Oracle BLEU), and
# with NCM_SCORER (an AT run on the same spm.model) the paper's NCM on test_2016_flickr.
# Every output that exists is kept and training resumes (--resume auto): after an interruption,
# run the same command again. scripts/codat_summary.py OUT RAW_DIR makes the tables.
#
# usage: scripts/codat_experiment.sh BASE DATA_DIR RAW_DIR OUT [key=value ...]
#   BASE     the stage-1 checkpoint (or run directory) every arm starts from
#   DATA_DIR the prepared data of BASE (codat prepare); RAW_DIR the raw Multi30k (*.de.gz, *.en.gz)
#   env: SEEDS ("1 2 3"), ARMS ("dp reward codat"), UPDATES (30), THREADS (1), NCM_SCORER (""),
#        REWARD_WEIGHT (0.0025: codat.weight of the reward arm, see below),
#        STAGE (all | train | eval), BASE_EVAL (1: also evaluate the base itself, as OUT/base);
#        extra key=value overrides go to every `codat train`. Several copies of this script
#        may share one OUT, each with its own SEEDS / ARMS (and BASE_EVAL=0 in all but one).
set -euo pipefail
base=${1:?usage: codat_experiment.sh BASE DATA_DIR RAW_DIR OUT [key=value ...]}
data=${2:?usage}
raw=${3:?usage}
out=${4:?usage}
shift 4
seeds=${SEEDS-1 2 3}
arms=${ARMS-dp reward codat}
updates=${UPDATES:-30}
threads=${THREADS:-1}
stage=${STAGE:-all}
tests="test_2016_flickr test_2017_flickr"
# The paper's sampling and ranking (Algorithm 2 on the probability scale, tau 0.1, top-p 0.5, one
# token per vertex; top 25% by the model's score; pairs averaged per sentence, Appendix C;
# "+Reward" as Appendix A's reverse KL), glancing kept at the base's final ratio, ~8k target
# tokens per update (1k-token micro-batches x 8).
common=(
  "data.dir=$data" "train.init_from=$base" "train.threads=$threads"
  "train.max_tokens=1024" "train.update_freq=8" "train.max_steps=$updates"
  "train.lr=2e-4" "train.warmup_steps=3" "train.eval_every=$(( (updates + 2) / 3 ))"
  "train.eval_max_sentences=300" "train.keep_best=1" "train.log_every=1"
  "train.glance_start=0.1" "train.glance_end=0.1"
  "codat.sampler=paper" "codat.temperature=0.1" "codat.top_p=0.5" "codat.top_tokens=1"
  "codat.filter=score" "codat.pair_average=sentence" "codat.reward_temperature=0.1"
  "codat.eval_sentences=100"
)
# Appendix A's reverse-KL gradient at T = 0.1 is ~65x the DP gradient on this model, REINFORCE on
# R - mean(R) ~0.01x and the ranking term ~0.16x (scripts/codat_gradient_norms.py): the reward arm
# is weighted so that its gradient is about the size of the ranking term's.
sample=(--sampler paper --samples 128 --temperature 0.1 --top-p 0.5 --top-tokens 1)
mkdir -p "$out/raw"
for t in $tests; do
  for lang in de en; do
    [[ -s "$out/raw/$t.$lang" ]] || gzip -dc "$raw/$t.$lang.gz" > "$out/raw/$t.$lang"
  done
done

evaluate() {  # evaluate CHECKPOINT EVAL_DIR
  local ckpt=$1 dir=$2
  mkdir -p "$dir"
  for t in $tests; do
    [[ -s "$dir/$t.lookahead.hyp" ]] || codat generate "$ckpt" -i "$out/raw/$t.de" \
      -o "$dir/$t.lookahead.hyp" --decoder lookahead --threads "$threads"
    [[ -s "$dir/$t.sample.hyp" ]] || codat generate "$ckpt" -i "$out/raw/$t.de" \
      -o "$dir/$t.sample.hyp" --decoder sample "${sample[@]}" --threads "$threads"
  done
  [[ -s "$dir/val_analyze.json" ]] || codat analyze "$ckpt" --data-dir "$data" --split val \
    --max-sentences 200 "${sample[@]}" --threads "$threads" -o "$dir/val_analyze.json" > /dev/null
  if [[ -n "${NCM_SCORER:-}" && ! -s "$dir/ncm_test_2016_flickr.json" ]]; then
    # NCM only: two samples per sentence keep the (unused) sampling statistics cheap.
    codat analyze "$ckpt" --data-dir "$data" --split test_2016_flickr --samples 2 \
      --ncm-scorer "$NCM_SCORER" --threads "$threads" -o "$dir/ncm_test_2016_flickr.json" > /dev/null
  fi
}

if [[ $stage != train && ${BASE_EVAL:-1} == 1 ]]; then
  evaluate "$base" "$out/base/eval"
fi
for seed in $seeds; do
  for arm in $arms; do
    run="$out/$arm-s$seed"
    if [[ $stage != eval ]]; then
      echo "== $arm seed $seed"
      weight=()
      [[ $arm == reward ]] && weight=("codat.weight=${REWARD_WEIGHT:-0.0025}")
      codat train multi30k_deen_codat_small "run_dir=$run" "train.objective=$arm" \
        "train.seed=$seed" "${common[@]}" "${weight[@]}" "$@" --resume auto
    fi
    if [[ $stage != train ]]; then
      evaluate "$run/best" "$run/eval"
    fi
  done
done
