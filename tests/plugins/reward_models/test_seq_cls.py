"""reward_model=seq_cls, hf_rm on another base, and re-tokenized scoring."""

import torch

from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
from rlhfkit.plugins.reward_models.seq_cls import SeqClsConfig, SeqClsLoader
from rlhfkit.rlhf.retokenize import Retokenized, same_vocabulary
from rlhfkit.rlhf.tokenize import encode_pairs

from ...helpers import save_tiny_model

TEXTS = ["reverse a b c = c b a", "hello there, how are you?"] * 20


def head(h):
    return LastTokenHead(h, LastTokenConfig())


def test_a_trained_classifier_scores_at_the_last_attended_token_with_either_padding(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = save_tiny_model("llama", str(tmp_path / "rm"), TEXTS, seq_cls=True)
    loader = SeqClsLoader(SeqClsConfig(path=path))
    assert loader.pretrained_path == path
    rm = loader.load(path, head)
    ids = torch.tensor([[3, 4, 5, 6]])
    full = rm(ids, torch.ones_like(ids))
    hf = AutoModelForSequenceClassification.from_pretrained(path)
    torch.testing.assert_close(full, hf(ids).logits[:, 0])  # the model's own score, unpadded
    left = rm(torch.tensor([[0, 0, 3, 4, 5, 6]]), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    right = rm(torch.tensor([[3, 4, 5, 6, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(left, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(right, full, atol=1e-5, rtol=1e-4)
    assert rm.token_values(ids, torch.ones_like(ids)).shape == (1, 4)
    rm.set_bias(0.5)
    # as a critic, its values are on the rewards' scale: the last token's value is the reward
    values = rm(ids, torch.ones_like(ids), per_token=True)
    torch.testing.assert_close(values, rm.token_values(ids, torch.ones_like(ids)) - 0.5)
    torch.testing.assert_close(values[:, -1], full - 0.5)
    right_values = rm(torch.tensor([[3, 4, 5, 6, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]), per_token=True)
    torch.testing.assert_close(right_values[:, 3], right - 0.5)
    rm.save(str(tmp_path / "again"))
    torch.testing.assert_close(loader.load(str(tmp_path / "again"), head)(ids, torch.ones_like(ids)), full - 0.5)


def test_hf_rm_on_another_base_keeps_its_tokenizer_and_retokenizes_the_policys_text(tmp_path):
    policy_dir = save_tiny_model("gpt2", str(tmp_path / "policy"), TEXTS)
    other = save_tiny_model("llama", str(tmp_path / "other"), TEXTS[::-1] + ["zzz qqq"])
    rm = HFRewardLoader(HFRewardConfig(model=other)).build(other, head)
    from transformers import AutoTokenizer

    ptok = AutoTokenizer.from_pretrained(policy_dir)
    assert not same_vocabulary(rm.tokenizer, ptok) and same_vocabulary(None, ptok)
    e = encode_pairs(ptok, ["reverse a b ="], [" b a"], torch.device("cpu"))
    scorer = Retokenized(rm, rm.tokenizer, ptok, max_length=128)
    assert scorer.texts(e.input_ids, e.attention_mask) == ["reverse a b = b a"]
    direct = encode_pairs(rm.tokenizer, ["reverse a b = b a"], [""], torch.device("cpu"))
    torch.testing.assert_close(scorer(e.input_ids, e.attention_mask), rm(direct.input_ids, direct.attention_mask))
    rm.save(str(tmp_path / "saved"))
    assert same_vocabulary(HFRewardLoader(HFRewardConfig()).load(str(tmp_path / "saved"), head).tokenizer, rm.tokenizer)
