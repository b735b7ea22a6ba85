"""Chat data for fine-tuning, torch-free: the conversation formats people download and the unified file
sft_data_process.py writes (conversations.py), preference pairs for DPO (preferences.py), and the demo sets
built from the chinese-poetry corpus with the one well-formed-poem rule (poetry.py). Files are read through
clean_data.readers.iter_records, so every skipped record is named file:line in a ReadErrors."""
