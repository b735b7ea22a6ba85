# make demo: install, fetch the chinese-poetry corpus, and run the whole pipeline on it: pretraining, then chat
# fine-tuning (SFT), scored chat answers and preference tuning (DPO) (~17 min on 2 cores)
# make test: install and run the test suite (make test-fast: without the slow subprocess runs)
PYTHON ?= python3
DEMO := out/demo
TOK := $(DEMO)/tok8k.model

.PHONY: install install-dev demo test test-fast download tokenizer tokens pretrain samples sft-data sft chat-samples dpo-data dpo bench bench-clean clean clean-demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

test: install-dev
	$(PYTHON) -m pytest -q tests

test-fast: install-dev
	$(PYTHON) -m pytest -q -m "not slow" tests

download:
	$(PYTHON) -c "from clean_data.readers import download_poetry; print(download_poetry('data'))"

$(TOK):
	$(PYTHON) tokenizer/train_tokenizer.py --input=data/chinese-poetry --vocab_size=8000 --model_prefix=$(DEMO)/tok8k

tokenizer: download $(TOK)

CLEAN := $(DEMO)/clean/clean.parquet

$(CLEAN):
	$(PYTHON) -m clean_data --input=data/chinese-poetry --out_dir=$(DEMO)/clean

clean: download $(CLEAN)

tokens: tokenizer clean
	$(PYTHON) data_process.py --input=$(CLEAN) --tokenizer_model=$(TOK) --out_dir=$(DEMO)/data

pretrain: tokens
	$(PYTHON) pretrain.py config/demo_cpu.py --overwrite=True

samples:
	$(PYTHON) eval.py --ckpt_path=$(DEMO)/pretrain/ckpt.pt --mode=all --val_data=$(DEMO)/data/val.bin

# chat fine-tuning of the demo model on questions built from the corpus' own titles and authors
sft-data: tokenizer
	$(PYTHON) sft_data_process.py --demo_poetry=data/chinese-poetry --tokenizer_model=$(TOK) --out_dir=$(DEMO)/sft_data

sft: sft-data
	$(PYTHON) sft.py config/sft_demo.py --overwrite=True

# greedy answers to the held-out poems' questions (scored), the first few printed
chat-samples:
	$(PYTHON) eval.py --mode=chat --ckpt_path=$(DEMO)/sft/ckpt.pt --questions_file=$(DEMO)/sft_data/eval_questions.jsonl \
		--answers_file=$(DEMO)/sft/answers.jsonl --temperature=0.0 --repetition_penalty=1.0 --batch_size=50

# preference tuning (DPO) of the SFT model on pairs built from the corpus (real vs corrupted poem, right vs wrong
# author); prints the held-out preference accuracy before and after
dpo-data: download
	$(PYTHON) dpo_data_process.py --demo_poetry=data/chinese-poetry --out_dir=$(DEMO)/dpo_data

dpo: dpo-data
	$(PYTHON) dpo.py config/dpo_demo.py --overwrite=True

demo: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory pretrain && $(MAKE) --no-print-directory samples && \
	$(MAKE) --no-print-directory sft && $(MAKE) --no-print-directory chat-samples && \
	$(MAKE) --no-print-directory dpo && \
	echo "make demo: $$(( $$(date +%s) - start )) s"

bench: install
	$(PYTHON) bench.py config/bench_rival.py
	$(PYTHON) bench.py config/bench_rival.py --dtype=bfloat16 --compile=True

bench-clean: install
	$(PYTHON) -m clean_data.bench

clean-demo:
	rm -rf $(DEMO)
