"""babyllama/contamination.py: a planted near-duplicate of an eval item is found (its source and line named, its
containment the share of the item's shingles the document holds), a reordered text is not; a token file's
documents are decoded in its meta.json's dtype (uint32 for a vocabulary over 65,535)."""
import json
import random

from conftest import wide_tokenizer
import numpy as np
import pytest

from babyllama.contamination import find_contamination, flagged, training_documents


def test_contamination_finds_a_planted_near_duplicate_and_not_a_reordered_text():
    items = [{"key": "q1", "text": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"},
             {"key": "q2", "text": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"},
             {"key": "q3", "text": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"}]
    shuffled = list("白日依山尽黄河入海流欲穷千里目更上一层楼")
    random.Random(0).shuffle(shuffled)
    docs = [{"text": "静夜思\n李白\n床前明月光，疑似地上霜。举头望明月，低头思故乡。", "source": "a.txt", "line": 7},
            {"text": "".join(shuffled), "source": "b.txt", "line": 1},
            {"text": "另一首不相干的诗在这里，没有一句相同。", "source": "c.txt", "line": 2}]
    best, n = find_contamination(items, iter(docs), chunk=2)
    hits = flagged(items, best, 0.5)
    assert n == 3 and [h["key"] for h in hits] == ["q1"] and (hits[0]["source"], hits[0]["line"]) == ("a.txt", 7)
    # one character changed (是 -> 似) loses the 5 shingles that cover it: 11 of the 16 remain
    assert hits[0]["containment"] == pytest.approx(11 / 16)
    assert best[1]["containment"] == 0 and best[2]["containment"] == 0



def test_a_uint32_token_file_is_decoded_document_by_document(tmp_path):
    wide = wide_tokenizer(tmp_path)  # 70,000 pieces: the texts' ids are above 65,535
    docs = ["床前明月光，疑是地上霜。", "What is two plus two?", "白日依山尽"]
    ids = np.array([t for d in docs for t in wide.encode(d, eos=True)], dtype=np.uint32)
    assert ids.max() > 65_535
    ids.tofile(tmp_path / "train.bin")
    meta = {"dtype": "uint32", "vocab_size": wide.vocab_size, "tokenizer_model": wide.model_path,
            "tokens_per_file": {"train.bin": len(ids)}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert [d["text"] for d in training_documents(str(tmp_path / "train.bin"))] == docs
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, dtype="uint16")))  # not the file's dtype: refused
    with pytest.raises(ValueError, match="meta.json.*dtype uint16 cannot hold the ids of vocab_size 70000"):
        list(training_documents(str(tmp_path / "train.bin")))


def test_held_out_questions_are_checked_by_their_reference_against_several_training_files(tmp_path):
    from conftest import write_jsonl
    from babyllama.contamination import evaluation_items
    write_jsonl(tmp_path / "q.jsonl", [
        {"question": "坐久了头晕怎么办？", "reference": "久坐后头晕多与颈椎和血压有关，建议起身活动并测量血压。", "kind": "qa"},
        {"question": "把下面的文言文翻译成现代文：\n学而时习之", "reference": "学习了知识并且按时温习它，不也很愉快吗？", "kind": "pairs"}])
    items = evaluation_items(str(tmp_path / "q.jsonl"), "val")
    assert items == [{"key": "qa/1", "text": "久坐后头晕多与颈椎和血压有关，建议起身活动并测量血压。"},
                     {"key": "pairs/2", "text": "学习了知识并且按时温习它，不也很愉快吗？"}]
    (tmp_path / "corpus.txt").write_text("与本题无关的一行文字，讲的是别的事情。\n", encoding="utf-8")
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "头晕"}, {"role": "assistant",
                                          "content": "久坐后头晕多与颈椎和血压有关，建议起身活动并测量血压。"}]}])
    docs = list(training_documents(f"{tmp_path / 'corpus.txt'},{tmp_path / 'sft.jsonl'}"))
    assert [d["source"] for d in docs] == [str(tmp_path / "corpus.txt"), str(tmp_path / "sft.jsonl")]
    assert docs[1]["text"] == "头晕\n久坐后头晕多与颈椎和血压有关，建议起身活动并测量血压。"  # a conversation's turns
    best, _ = find_contamination(items, iter(docs))
    assert [h["key"] for h in flagged(items, best, 0.5)] == ["qa/1"]
