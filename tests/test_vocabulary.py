"""workbench.models.vocabulary: characters a tokenizer lacks become tokens with mean-initialised embeddings."""

from __future__ import annotations

import pytest
import torch

from workbench.models.vocabulary import add_missing_characters, extend_vocabulary, missing_characters

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "中", "，", "。"]
TEXTS = ["中国人民，中国。", "人民日报 abc", "北京人"]  # 人 x3, 民 x2, 国 x2, 日 报 北 京 x1


@pytest.fixture()
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)


def tiny_bert(kind: str = "tokens"):
    from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=3)
    return BertForTokenClassification(config) if kind == "tokens" else BertForMaskedLM(config)


def test_missing_characters_most_frequent_first_without_known_or_whitespace(tokenizer):
    assert missing_characters(tokenizer, TEXTS) == ["人", "国", "民", "日", "报", "北", "京"]


def test_min_count_drops_rare_characters(tokenizer):
    assert missing_characters(tokenizer, TEXTS, min_count=2) == ["人", "国", "民"]


@pytest.mark.parametrize("bad", [0, -1])
def test_min_count_below_one_is_refused(tokenizer, bad):
    with pytest.raises(ValueError, match=rf"min_count must be at least 1, got {bad}"):
        missing_characters(tokenizer, TEXTS, min_count=bad)


def test_added_characters_get_their_own_ids_and_mean_rows(tokenizer):
    model = tiny_bert()
    before = model.get_input_embeddings().weight.detach().clone()
    added = add_missing_characters(tokenizer, model, TEXTS)
    assert added == ["人", "国", "民", "日", "报", "北", "京"]
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == len(VOCAB) + len(added)
    assert torch.equal(weight[:len(VOCAB)], before)  # old rows untouched
    for row in weight[len(VOCAB):]:
        assert torch.allclose(row, before.mean(dim=0))
    ids = tokenizer(list("北京人民"), is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == 4


def test_words_stay_one_token_each_for_tagging(tokenizer):
    add_missing_characters(tokenizer, tiny_bert(), TEXTS)
    enc = tokenizer(list("中国人民日报，北京。"), is_split_into_words=True)
    assert enc.word_ids() == [None, *range(10), None]


def test_nothing_missing_adds_nothing(tokenizer):
    model = tiny_bert()
    assert add_missing_characters(tokenizer, model, ["中，abc。"]) == []
    assert model.get_input_embeddings().weight.shape[0] == len(VOCAB) == len(tokenizer)


def test_second_call_is_a_no_op(tokenizer):
    model = tiny_bert()
    add_missing_characters(tokenizer, model, TEXTS)
    size = len(tokenizer)
    assert add_missing_characters(tokenizer, model, TEXTS) == []
    assert len(tokenizer) == size == model.get_input_embeddings().weight.shape[0]


def test_tied_output_embedding_grows_too(tokenizer):
    model = tiny_bert("mlm")
    added = add_missing_characters(tokenizer, model, TEXTS)
    assert model.get_output_embeddings().weight.shape[0] == len(VOCAB) + len(added)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_save_and_reload_keep_the_new_ids(tokenizer, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = tiny_bert()
    add_missing_characters(tokenizer, model, TEXTS)
    text = list("北京人民")
    ids = tokenizer(text, is_split_into_words=True)["input_ids"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    tokenizer.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    model2 = AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
    assert tok2(text, is_split_into_words=True)["input_ids"] == ids
    with torch.no_grad():
        assert torch.allclose(model2(input_ids=torch.tensor([ids])).logits, logits, atol=1e-6)


def test_a_reloaded_run_gets_the_same_ids_from_the_kept_list(tokenizer):
    from transformers import BertTokenizer

    trained = tiny_bert()
    added = add_missing_characters(tokenizer, trained, TEXTS)
    fresh_tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)
    fresh = tiny_bert()
    assert extend_vocabulary(fresh_tokenizer, fresh, added) == added
    text = list("北京人民日报")
    assert (fresh_tokenizer(text, is_split_into_words=True)["input_ids"]
            == tokenizer(text, is_split_into_words=True)["input_ids"])
    assert fresh.get_input_embeddings().weight.shape == trained.get_input_embeddings().weight.shape


def test_extend_vocabulary_skips_known_and_repeated_tokens(tokenizer):
    model = tiny_bert()
    assert extend_vocabulary(tokenizer, model, ["中", "人", "人", "a"]) == ["人"]
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] == len(VOCAB) + 1
