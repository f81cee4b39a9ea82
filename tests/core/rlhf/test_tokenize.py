import torch

from rlhfkit.rlhf.tokenize import encode_pairs, encode_prompts


def test_prompts_are_left_padded(tiny_policy):
    tok = tiny_policy.tokenizer
    ids, mask = encode_prompts(tok, ["copy a b =", "reverse a b c d ="], torch.device("cpu"))
    assert ids.shape == (2, 6)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1]
    assert ids[0, 0].item() == tok.pad_token_id


def test_prompt_masking(tiny_policy):
    tok = tiny_policy.tokenizer
    e = encode_pairs(tok, ["copy a b ="], ["a b"], torch.device("cpu"))
    # prompt is 4 tokens; targets are "a b <eos>"
    assert e.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert e.input_ids[0, -1].item() == tok.eos_token_id
