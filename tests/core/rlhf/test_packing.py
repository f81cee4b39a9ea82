import torch

from rlhfkit.rlhf.losses import causal_lm_loss
from rlhfkit.rlhf.packing import pack
from rlhfkit.rlhf.tokenize import pad_rows, tokenize_pair


def test_packed_loss_equals_padded_loss(tiny_policy):
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    pairs = [("copy a b =", "a b !"), ("reverse a b c d e f =", "f e d c b a"), ("count a in a a =", "2")]
    rows = [tokenize_pair(tok, p, r) for p, r in pairs]
    packed = pack(rows, pack_length=64, pad_id=tok.pad_token_id, mask_prompt=True, device=torch.device("cpu"))
    assert packed.input_ids.shape[0] == 1  # all three share one row
    padded = pad_rows(rows, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp = causal_lm_loss(model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids).logits, packed.input_ids, packed.loss_mask)
        ld = causal_lm_loss(model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits, padded.input_ids, padded.loss_mask)
    torch.testing.assert_close(lp, ld, atol=1e-5, rtol=1e-5)
    assert int(packed.loss_mask.sum()) == int(padded.loss_mask.sum())
