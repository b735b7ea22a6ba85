# make demo: install, fetch the chinese-poetry corpus, and run the whole pipeline on it (~15 min on 2 cores)
# make test: install and run the test suite
PYTHON ?= python3
DEMO := out/demo
TOK := $(DEMO)/tok8k.model

.PHONY: install install-dev demo test download tokenizer tokens pretrain samples bench clean-demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

test: install-dev
	$(PYTHON) -m pytest -q tests

download:
	$(PYTHON) -c "from clean_data.readers import download_poetry; print(download_poetry('data'))"

$(TOK):
	$(PYTHON) tokenizer/train_tokenizer.py --input=data/chinese-poetry --vocab_size=8000 --model_prefix=$(DEMO)/tok8k

tokenizer: download $(TOK)

tokens: tokenizer
	$(PYTHON) data_process.py --input=data/chinese-poetry --tokenizer_model=$(TOK) --out_dir=$(DEMO)/data

pretrain: tokens
	$(PYTHON) pretrain.py config/demo_cpu.py

samples:
	$(PYTHON) eval.py --ckpt_path=$(DEMO)/pretrain/ckpt.pt --mode=all --val_data=$(DEMO)/data/val.bin

demo: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory pretrain && $(MAKE) --no-print-directory samples && \
	echo "make demo: $$(( $$(date +%s) - start )) s"

bench: install
	$(PYTHON) bench.py config/bench_rival.py
	$(PYTHON) bench.py config/bench_rival.py --dtype=bfloat16 --compile=True

clean-demo:
	rm -rf $(DEMO)
