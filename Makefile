# make demo: install, fetch the chinese-poetry corpus, and run the whole pipeline on it: pretraining, then chat
# fine-tuning (SFT), scored chat answers and preference tuning (DPO), the evaluations, and a report card
# (out/demo/report.md)
# make demo-zh: the same pipeline on public modern-Chinese and medical data (~40 min, out/zh/report.md): a general +
# medical chat model and a classical -> modern translator, scored on held-out sets
# make test: install and run the test suite (make test-fast: without the slow subprocess runs)
PYTHON ?= python3
COMMA := ,
DEMO := out/demo
TOK := $(DEMO)/tok8k.model

.PHONY: install install-dev redis-server chromium llama-cpp demo demo-zh clean-demo-zh test test-fast download tokenizer tokens pretrain samples sft-data sft chat-samples dpo-data dpo poetry-bench evals report bench bench-clean bench-eval bench-serve clean clean-demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

# the Redis-shared dedup index is tested against a real redis-server (Debian package); without apt-get (or
# root / sudo) the install is skipped and that one test says why it skips
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }; } || \
	  echo "redis-server not installed: the Redis test will be skipped"

# the chat page is tested in Debian's headless chromium through chromedriver (no browser download by pip); without
# apt-get the browser test says why it skips
chromium:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { command -v apt-get >/dev/null && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }; } || \
	  echo "chromium not installed: the browser test will be skipped"

# llama.cpp itself reads our GGUF files in the tests marked slow: llama-cpp-python compiles it at install (minutes on
# 2 cores, once: pip keeps the wheel); without a C++ compiler and cmake the install fails and those tests say why
llama-cpp:
	@$(PYTHON) -c "import llama_cpp" 2>/dev/null || $(PYTHON) -m pip install -q "llama-cpp-python==0.3.36" || \
	  echo "llama-cpp-python not installed: the llama.cpp tests will be skipped"

# one test process per core (pytest-xdist): the suite's many small subprocess runs overlap
test: install-dev redis-server chromium llama-cpp
	$(PYTHON) -m pytest -q -n auto --dist worksteal tests

test-fast: install-dev redis-server chromium
	$(PYTHON) -m pytest -q -n auto --dist worksteal -m "not slow" tests

# ---- the demo: every stage a file target, so a re-run of make demo skips the finished stages -----------------
CORPUS := data/chinese-poetry/package.json
CLEAN := $(DEMO)/clean/clean.parquet
TOKENS := $(DEMO)/data/meta.json
# (each target is the file its stage writes last: a stage killed half-way is not taken for done)
# each stage's wall time goes to $(DEMO)/stages.jsonl for the summary
# (an optional third argument: the run folder, $(DEMO) by default)
timed = @printf '%s\n' "$(2)"; mkdir -p $(or $(3),$(DEMO)); t0=$$(date +%s%N); $(2) && \
	echo "{\"stage\": \"$(1)\", \"seconds\": $$(( ($$(date +%s%N) - t0) / 1000000 ))e-3}" >> $(or $(3),$(DEMO))/stages.jsonl

$(CORPUS):
	$(PYTHON) data_process.py --download=poetry

$(TOK): $(CORPUS)
	$(call timed,tokenizer,$(PYTHON) -m tokenizer --input=data/chinese-poetry --vocab_size=8000 --model_prefix=$(DEMO)/tok8k)

$(DEMO)/clean/report.json: $(CORPUS)
	$(call timed,clean,$(PYTHON) -m clean_data --input=data/chinese-poetry --out_dir=$(DEMO)/clean)

$(TOKENS): $(DEMO)/clean/report.json $(TOK)
	$(call timed,tokens,$(PYTHON) data_process.py --input=$(CLEAN) --tokenizer_model=$(TOK) --out_dir=$(DEMO)/data)

$(DEMO)/pretrain/summary.json: $(TOKENS) config/demo_cpu.py
	$(call timed,pretrain,$(PYTHON) pretrain.py config/demo_cpu.py --overwrite=True)

# continuations of a few prompts and the loss on every validation token
$(DEMO)/pretrain/eval.json: $(DEMO)/pretrain/summary.json
	$(call timed,samples,$(PYTHON) eval.py --ckpt_path=$(DEMO)/pretrain/ckpt.pt --mode=all --val_data=$(DEMO)/data/val.bin --results_file=$@)

# chat fine-tuning of the demo model on questions built from the corpus' own titles and authors
$(DEMO)/sft_data/stats.json: $(CORPUS) $(TOK)
	$(call timed,sft-data,$(PYTHON) sft_data_process.py --demo_poetry=data/chinese-poetry --tokenizer_model=$(TOK) --out_dir=$(DEMO)/sft_data)

$(DEMO)/sft/summary.json: $(DEMO)/pretrain/summary.json $(DEMO)/sft_data/stats.json config/sft_demo.py
	$(call timed,sft,$(PYTHON) sft.py config/sft_demo.py --overwrite=True)

# greedy answers to the held-out poems' questions, scored: the base model (before SFT), after SFT, after DPO
CHAT = $(PYTHON) eval.py --mode=chat --questions_file=$(DEMO)/sft_data/eval_questions.jsonl --temperature=0.0 \
	--repetition_penalty=1.0 --batch_size=100 --max_new_tokens=96
$(DEMO)/pretrain/chat.json: $(DEMO)/pretrain/summary.json $(DEMO)/sft_data/stats.json
	$(call timed,chat-base,$(CHAT) --ckpt_path=$(DEMO)/pretrain/ckpt.pt --answers_file=$(DEMO)/pretrain/answers.jsonl --results_file=$@)
$(DEMO)/sft/chat.json: $(DEMO)/sft/summary.json
	$(call timed,chat-sft,$(CHAT) --ckpt_path=$(DEMO)/sft/ckpt.pt --answers_file=$(DEMO)/sft/answers.jsonl --results_file=$@)
$(DEMO)/dpo/chat.json: $(DEMO)/dpo/summary.json
	$(call timed,chat-dpo,$(CHAT) --ckpt_path=$(DEMO)/dpo/ckpt.pt --answers_file=$(DEMO)/dpo/answers.jsonl --results_file=$@)

# preference tuning (DPO) of the SFT model on pairs built from the corpus (real vs corrupted poem, right vs wrong
# author); prints the held-out preference accuracy before and after
$(DEMO)/dpo_data/stats.json: $(CORPUS)
	$(call timed,dpo-data,$(PYTHON) dpo_data_process.py --demo_poetry=data/chinese-poetry --out_dir=$(DEMO)/dpo_data)

$(DEMO)/dpo/summary.json: $(DEMO)/sft/summary.json $(DEMO)/dpo_data/stats.json config/dpo_demo.py
	$(call timed,dpo,$(PYTHON) dpo.py config/dpo_demo.py --overwrite=True)

# the poetry benchmark (multiple choice from held-out documents: which line comes next, who wrote it), how many
# of its questions have a near-duplicate in the training tokens, and the three models' scores on it
BENCH := $(DEMO)/poetry_bench
$(BENCH)/about.json: $(TOKENS)
	$(call timed,poetry-bench,$(PYTHON) poetry_bench.py --corpus=$(CLEAN) --token_meta=$(TOKENS) --out_dir=$(BENCH))
$(BENCH)/contamination.json: $(BENCH)/about.json
	$(call timed,contamination,$(PYTHON) contamination.py --eval_set=$(BENCH) --train_data=$(DEMO)/data/train.bin)
MC = $(PYTHON) eval.py --mode=mc --mc_data=$(BENCH) --contamination_file=$(BENCH)/contamination.json --batch_size=64
MC_JSON := eval_mc_poetry_bench_val_0shot.json
$(DEMO)/pretrain/$(MC_JSON): $(DEMO)/pretrain/summary.json $(BENCH)/contamination.json
	$(call timed,mc-base,$(MC) --ckpt_path=$(DEMO)/pretrain/ckpt.pt)
$(DEMO)/sft/$(MC_JSON): $(DEMO)/sft/summary.json $(BENCH)/contamination.json
	$(call timed,mc-sft,$(MC) --ckpt_path=$(DEMO)/sft/ckpt.pt)
$(DEMO)/dpo/$(MC_JSON): $(DEMO)/dpo/summary.json $(BENCH)/contamination.json
	$(call timed,mc-dpo,$(MC) --ckpt_path=$(DEMO)/dpo/ckpt.pt)

DEMO_OUTPUTS := $(DEMO)/pretrain/eval.json $(DEMO)/pretrain/chat.json $(DEMO)/sft/chat.json $(DEMO)/dpo/chat.json \
	$(DEMO)/pretrain/$(MC_JSON) $(DEMO)/sft/$(MC_JSON) $(DEMO)/dpo/$(MC_JSON)
# the report card: every stage's numbers, curves and evaluation tables (always rewritten)
$(DEMO)/report.md: $(DEMO_OUTPUTS) FORCE
	$(PYTHON) report.py --run_dir=$(DEMO)
FORCE:

# the stages by name (each runs what it needs first, and nothing already done)
download: $(CORPUS)
tokenizer: $(TOK)
clean: $(DEMO)/clean/report.json
tokens: $(TOKENS)
pretrain: $(DEMO)/pretrain/summary.json
samples: $(DEMO)/pretrain/eval.json
sft-data: $(DEMO)/sft_data/stats.json
sft: $(DEMO)/sft/summary.json
chat-samples: $(DEMO)/sft/chat.json
dpo-data: $(DEMO)/dpo_data/stats.json
dpo: $(DEMO)/dpo/summary.json
poetry-bench: $(BENCH)/contamination.json
evals: $(DEMO_OUTPUTS)
report: $(DEMO)/report.md

demo: install
	@start=$$(date +%s); $(MAKE) --no-print-directory $(DEMO)/report.md && \
	echo "make demo: $$(( $$(date +%s) - start )) s (stages already done were skipped; make clean-demo starts over)"

# fp32 eager, then this CPU's fast path (bench.py prints which and why)
bench: install
	$(PYTHON) bench.py config/bench_rival.py --dtype=float32 --compile=False
	$(PYTHON) bench.py config/bench_rival.py

# 100k poems (MinHash speed against baby-llama2-chinese's own code, accuracy), then a 1M-document planted corpus
# (whole pipeline, peak RSS, recall) cleaned again by 1, 2 and 4 Redis shards (kept sets compared)
bench-clean: install
	$(PYTHON) bench_clean.py
	$(PYTHON) bench_clean.py --scale=1000000 --redis_workers=1,2,4

# multiple-choice scoring speed: one prompt at a time against batched and prefix-cached (C-Eval val, 5-shot, on a
# random model with a 1024-token context, so the shots fit)
bench-eval: install
	$(PYTHON) bench_eval.py --ckpt_path= --n_questions=200

# serving: tokens/s of 1, 8 and 32 concurrent clients and the time to the first token (median, p95), through a server it starts
bench-serve: install
	$(PYTHON) bench_serve.py --ckpt_path=$(DEMO)/sft/ckpt.pt

clean-demo:
	rm -rf $(DEMO)

# ---- demo-zh: modern Chinese + medicine, from public data (babyllama/zh_sources.py: source, license, sha256) ------
ZH := out/zh
ZTOK := $(ZH)/tok8k.model
ZSOURCES := data/zh/sources.json
ZGENERAL := data/zh/niutrans_modern.parquet,data/zh/peoples_daily_199801.jsonl
ZMEDICAL := data/zh/medical_fever.txt,data/zh/huatuo_llama_data.json
ZMODELS := pretrain medical sft dpo
CEVAL ?= ../shared/data/ceval
CMMLU ?= ../shared/data/cmmlu

# the sets: a local copy with the pinned sha256 (../shared/data here), else downloaded from the source and checked
$(ZSOURCES):
	$(PYTHON) data_process.py --download=zh

$(ZTOK): $(ZSOURCES)
	$(call timed,tokenizer,$(PYTHON) -m tokenizer --input=$(ZGENERAL)$(COMMA)$(ZMEDICAL) --vocab_size=8000 --model_prefix=$(ZH)/tok8k,$(ZH))

# general text (the modern side of 97 books, People's Daily 1998-01) and medical text (a textbook excerpt, Huatuo's
# answers) are cleaned and tokenized apart, so pretraining can mix them with weights of its own
$(ZH)/clean/report.json: $(ZSOURCES)
	$(call timed,clean,$(PYTHON) -m clean_data --input=$(ZGENERAL) --out_dir=$(ZH)/clean,$(ZH))
$(ZH)/clean_medical/report.json: $(ZSOURCES)
	$(call timed,clean-medical,$(PYTHON) -m clean_data --input=$(ZMEDICAL) --out_dir=$(ZH)/clean_medical,$(ZH))
$(ZH)/data/meta.json: $(ZH)/clean/report.json $(ZTOK)
	$(call timed,tokens,$(PYTHON) data_process.py --input=$(ZH)/clean/clean.parquet --tokenizer_model=$(ZTOK) --val_fraction=0.02 --out_dir=$(ZH)/data,$(ZH))
$(ZH)/data_medical/meta.json: $(ZH)/clean_medical/report.json $(ZTOK)
	$(call timed,tokens-medical,$(PYTHON) data_process.py --input=$(ZH)/clean_medical/clean.parquet --tokenizer_model=$(ZTOK) --val_fraction=0.05 --out_dir=$(ZH)/data_medical,$(ZH))

# the training side of the translation pairs as text (the held-out pairs, and every pair of a validation document,
# left out: the same rule as the SFT set's), for continued pretraining
$(ZH)/pairs/stats.json: $(ZH)/data/meta.json $(ZSOURCES)
	$(call timed,pairs,$(PYTHON) sft_data_process.py config/zh_sft_data.py --inputs=data/zh/niutrans_pairs.jsonl --ratios=1 --out_dir=$(ZH)/pairs,$(ZH))
$(ZH)/data_pairs/meta.json: $(ZH)/pairs/stats.json
	$(call timed,tokens-pairs,$(PYTHON) data_process.py --input=$(ZH)/pairs/train.jsonl --tokenizer_model=$(ZTOK) --val_fraction=0 --out_dir=$(ZH)/data_pairs,$(ZH))

# pretraining on general text, then continued pretraining with medical text and the translation pairs mixed in
# (config/zh_medical_cpu.py)
$(ZH)/pretrain/summary.json: $(ZH)/data/meta.json config/zh_cpu.py
	$(call timed,pretrain,$(PYTHON) pretrain.py config/zh_cpu.py --overwrite=True,$(ZH))
$(ZH)/medical/summary.json: $(ZH)/pretrain/summary.json $(ZH)/data_medical/meta.json $(ZH)/data_pairs/meta.json config/zh_medical_cpu.py
	$(call timed,medical,$(PYTHON) pretrain.py config/zh_medical_cpu.py --overwrite=True,$(ZH))

# SFT on general, medical and translation conversations; the held-out doctor questions and translation pairs (with
# their baselines) go to eval_questions.jsonl
$(ZH)/sft_data/stats.json: $(ZH)/data/meta.json config/zh_sft_data.py
	$(call timed,sft-data,$(PYTHON) sft_data_process.py config/zh_sft_data.py,$(ZH))
$(ZH)/sft/summary.json: $(ZH)/medical/summary.json $(ZH)/sft_data/stats.json config/zh_sft_cpu.py
	$(call timed,sft,$(PYTHON) sft.py config/zh_sft_cpu.py --overwrite=True,$(ZH))
$(ZH)/dpo_data/stats.json: $(ZH)/sft_data/stats.json
	$(call timed,dpo-data,$(PYTHON) dpo_data_process.py --mismatched=$(ZH)/sft_data/train.jsonl --mismatched_sources=medical_dialogue_internal.csv$(COMMA)niutrans_pairs.jsonl --out_dir=$(ZH)/dpo_data,$(ZH))
$(ZH)/dpo/summary.json: $(ZH)/sft/summary.json $(ZH)/dpo_data/stats.json config/zh_dpo_cpu.py
	$(call timed,dpo,$(PYTHON) dpo.py config/zh_dpo_cpu.py --overwrite=True,$(ZH))

# evaluation sets: next-sentence multiple choice from held-out documents, and how much of every evaluation set the
# training data holds (pretraining, medical and SFT text)
$(ZH)/cloze/about.json: $(ZH)/data/meta.json
	$(call timed,cloze,$(PYTHON) poetry_bench.py --kind=prose --corpus=$(ZH)/clean/clean.parquet --token_meta=$(ZH)/data/meta.json --out_dir=$(ZH)/cloze,$(ZH))
$(ZH)/cloze/contamination.json: $(ZH)/cloze/about.json $(ZH)/sft_data/stats.json $(ZH)/data_medical/meta.json $(ZH)/data_pairs/meta.json
	$(call timed,contamination-cloze,$(PYTHON) contamination.py --eval_set=$(ZH)/cloze --train_data=$(ZTRAIN),$(ZH))
$(ZH)/sft_data/contamination.json: $(ZH)/sft_data/stats.json $(ZH)/data_medical/meta.json $(ZH)/data_pairs/meta.json
	$(call timed,contamination-qa,$(PYTHON) contamination.py --eval_set=$(ZH)/sft_data/eval_questions.jsonl --train_data=$(ZTRAIN),$(ZH))
ZTRAIN = $(ZH)/data/train.bin$(COMMA)$(ZH)/data_medical/train.bin$(COMMA)$(ZH)/data_pairs/train.bin$(COMMA)$(ZH)/sft_data/train.jsonl

# every model: held-out perplexity (general and medical text), the cloze, the held-out questions answered greedily
$(ZH)/%/eval_ppl.json: $(ZH)/%/summary.json
	$(call timed,ppl-$*,$(PYTHON) eval.py --mode=ppl --ckpt_path=$(ZH)/$*/ckpt.pt --val_data=$(ZH)/data/val.bin --val_max_tokens=200000 --batch_size=32,$(ZH))
$(ZH)/%/eval_ppl_medical.json: $(ZH)/%/summary.json $(ZH)/data_medical/meta.json
	$(call timed,ppl-medical-$*,$(PYTHON) eval.py --mode=ppl --ckpt_path=$(ZH)/$*/ckpt.pt --val_data=$(ZH)/data_medical/val.bin --val_max_tokens=0 --batch_size=32 --results_file=$@,$(ZH))
$(ZH)/%/eval_mc_cloze_val_0shot.json: $(ZH)/%/summary.json $(ZH)/cloze/contamination.json
	$(call timed,cloze-$*,$(PYTHON) eval.py --mode=mc --ckpt_path=$(ZH)/$*/ckpt.pt --mc_data=$(ZH)/cloze --contamination_file=$(ZH)/cloze/contamination.json --batch_size=64,$(ZH))
$(ZH)/%/chat.json: $(ZH)/%/summary.json $(ZH)/sft_data/contamination.json
	$(call timed,chat-$*,$(PYTHON) eval.py --mode=chat --ckpt_path=$(ZH)/$*/ckpt.pt --questions_file=$(ZH)/sft_data/eval_questions.jsonl --contamination_file=$(ZH)/sft_data/contamination.json --answers_file=$(ZH)/$*/answers.jsonl --results_file=$@ --temperature=0.0 --repetition_penalty=1.0 --batch_size=100 --max_new_tokens=128,$(ZH))
# baby-llama2-chinese's README asks its models these three; the final model answers them, greedy
$(ZH)/dpo/three_questions.json: $(ZH)/dpo/summary.json
	@printf '%s\n' "最近我在办公室坐久了会感到头晕，请问这是什么原因?有什么缓解办法吗？" "前列腺囊肿的症状是什么？" "请问，世界上最大的动物是什么？" > $(ZH)/three_questions.txt
	$(call timed,three-questions,$(PYTHON) eval.py --mode=chat --ckpt_path=$(ZH)/dpo/ckpt.pt --questions_file=$(ZH)/three_questions.txt --answers_file=$(ZH)/dpo/three_questions.jsonl --results_file=$@ --temperature=0.0 --repetition_penalty=1.0 --max_new_tokens=128,$(ZH))
# C-Eval and CMMLU (chance for a model this size) for the final model, where the sets are (CEVAL=, CMMLU= folders)
$(ZH)/dpo/eval_mc_ceval_val_0shot.json: $(ZH)/dpo/summary.json
	$(call timed,ceval,$(PYTHON) eval.py --mode=mc --ckpt_path=$(ZH)/dpo/ckpt.pt --mc_data=$(CEVAL) --split=val --batch_size=64,$(ZH))
$(ZH)/dpo/eval_mc_cmmlu_test_0shot.json: $(ZH)/dpo/summary.json
	$(call timed,cmmlu,$(PYTHON) eval.py --mode=mc --ckpt_path=$(ZH)/dpo/ckpt.pt --mc_data=$(CMMLU) --split=test --scoring=letter --batch_size=64,$(ZH))

ZH_OUTPUTS := $(foreach m,$(ZMODELS),$(ZH)/$(m)/eval_ppl.json $(ZH)/$(m)/eval_ppl_medical.json \
	$(ZH)/$(m)/eval_mc_cloze_val_0shot.json $(ZH)/$(m)/chat.json) \
	$(if $(wildcard $(CEVAL)),$(ZH)/dpo/eval_mc_ceval_val_0shot.json) \
	$(if $(wildcard $(CMMLU)),$(ZH)/dpo/eval_mc_cmmlu_test_0shot.json) $(ZH)/dpo/three_questions.json
$(ZH)/report.md: $(ZH_OUTPUTS) FORCE
	$(PYTHON) report.py --run_dir=$(ZH)

demo-zh: install
	@start=$$(date +%s); $(MAKE) --no-print-directory $(ZH)/report.md && \
	echo "make demo-zh: $$(( $$(date +%s) - start )) s (stages already done were skipped; make clean-demo-zh starts over)"

clean-demo-zh:
	rm -rf $(ZH)
