# demo-zh's chat fine-tuning set (make demo-zh): general, medical and translation conversations from public data
# (babyllama/zh_sources.py), each input's share set by its ratio (a ratio r keeps r times the input: 0.2 a random
# fifth, 3 three copies). 200 doctor questions and 200 translation pairs are held out as evaluation questions; the
# pairs only from the pretraining corpus' validation documents, so no model here saw an evaluated translation.
inputs = ",".join(["data/zh/medical_dialogue_internal.csv",  # 7,644 real doctor answers (internal medicine)
                   "data/zh/niutrans_pairs.jsonl",  # 60,000 classical -> modern pairs, asked as instructions
                   "data/zh/huatuo_llama_data.json",  # 8,658 model-generated medical Q&A (CMeKG + ChatGPT)
                   "data/zh/medical_sft_1K_format.jsonl",  # MedicalGPT's 1,000 medical conversations
                   "data/zh/alpaca_zh_demo.json",  # 1,000 general instructions
                   "data/zh/sharegpt_zh_1K_format.jsonl",  # 1,000 general multi-turn conversations
                   "data/zh/identity.json"])  # 91 who-are-you templates, filled with the project's name
ratios = "1,1,0.5,1,1,1,3"  # every training pair: translation gains most from more parallel text
fill = "name=BabyLlama,author=the babyllama project"
tokenizer_model = "out/zh/tok8k.model"
max_seq_len = 256
overlong = "truncate"  # a long ShareGPT conversation keeps the exchanges that fit
eval_holdout = 200
heldout_corpus = "out/zh/clean/clean.parquet"
token_meta = "out/zh/data/meta.json"
out_dir = "out/zh/sft_data"
