"""``reward=labeller``: the dataset's labeller scores RL rollouts; a dataset without one
is refused before any work."""

import json

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import Run
from rlhfkit.plugins.rewards.labeller import LabellerReward, LabellerRewardConfig
from rlhfkit.rlhf.sampling import Rollout

from ...helpers import SMOKE, compose


def text_rollout(prompts, responses):
    """A rollout whose rows only matter by their text (token ids are placeholders)."""
    B = len(prompts)
    return Rollout(input_ids=torch.zeros(B, 3, dtype=torch.long), attention_mask=torch.ones(B, 3, dtype=torch.long),
                   prompt_width=1, response_mask=torch.ones(B, 2), logprobs=torch.zeros(B, 2),
                   ended=torch.ones(B, dtype=torch.bool), responses=list(responses), prompts=list(prompts))


class Ctx:
    def __init__(self, data):
        self.components = {"data": data}


def test_scores_are_the_labellers(synthetic):
    source = LabellerReward(LabellerRewardConfig())
    assert source.needs == ()
    source.setup(Ctx(synthetic), tokenizer=None)
    prompts = ["reverse c a f =", "reverse c a f =", "count a in c a b a ="]
    responses = ["f a c", "c a f !", "2"]
    scores = source(text_rollout(prompts, responses))
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.tolist() == pytest.approx(synthetic.labeller.score(prompts, responses))
    assert scores.tolist() == pytest.approx([1.0, 1 / 3 + 0.1, 1.0])


def test_a_dataset_without_a_labeller_fails_before_any_work(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(8)))
    plugins, registry = setup()
    cfg = compose(SMOKE + ["logger=[]", "stages=[sft,rl]", "reward=labeller", "data=jsonl", f"data.path={data}"])
    with pytest.raises(ConfigError, match=r"reward=labeller: the dataset \(FileData\) has no programmatic labeller.*"
                                          r"data=synthetic, data=verifiable"):
        Run(cfg, registry, plugins, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
