"""Real models and real data through the CLI: tiny GPT-2 and Llama checkpoints saved to
disk and loaded by path, data files in every format written here, LoRA through all three
stages, and a sequence classifier trained elsewhere as the reward model."""

import json
import os
import random

import pytest

from ..helpers import CHAT_TEMPLATE, SMOKE, run_cli, save_tiny_model, save_to_hf_cache

pytestmark = pytest.mark.slow

FAST = SMOKE + ["sft.steps=20", "sft.pack_length=128", "rollout.max_new_tokens=8", "eval.num_prompts=16", "logger=[jsonl]"]


def _task(rng):
    xs = [rng.choice("abcdefgh") for _ in range(4)]
    return "reverse " + " ".join(xs) + " =", " ".join(reversed(xs)), " ".join(rng.sample(xs, 4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data in each format: SFT prompt/completion and chat messages, preference pairs, HH
    transcripts, K-ranked comparisons with ties, prompt-only RL data."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = {name: [] for name in ("sft", "messages", "pairs", "pairs_plain", "hh", "ranked", "prompts")}
    for _ in range(60):
        p, good, bad = _task(rng)
        rows["sft"].append({"prompt": p, "completion": " " + good})
        rows["messages"].append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": good}]})
        rows["pairs"].append({"question": p, "good": good, "bad": bad})
        rows["pairs_plain"].append({"prompt": p, "chosen": good, "rejected": bad})
        rows["hh"].append({"chosen": f"\n\nHuman: {p}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {bad}"})
        rows["ranked"].append({"prompt": p, "responses": [good, bad, bad[::-1], good[:3]], "ranking": [1, 3, 3, 2]})
        rows["prompts"].append({"prompt": p})
    out = {}
    for name, rs in rows.items():
        out[name] = str(d / f"{name}.jsonl")
        with open(out[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    texts = [json.dumps(r) for rs in rows.values() for r in rs]
    out["gpt2"] = save_tiny_model("gpt2", str(d / "gpt2"), texts)
    out["llama"] = save_tiny_model("llama", str(d / "llama"), texts, chat_template=CHAT_TEMPLATE)
    out["rm_llama"] = save_tiny_model("llama", str(d / "rm_llama"), texts[::-1][:50], seq_cls=True)
    return out


def _ok(args, tmp_path, name):
    run_dir = str(tmp_path / name)
    r = run_cli(args + [f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run_dir, json.load(open(os.path.join(run_dir, "eval.json"))), r


CASES = {  # which files feed which stage; field names mapped where the file's differ
    "gpt2-one-pairs-file": ("gpt2", {"path": "pairs"}, ["data.fields.prompt=question", "data.fields.chosen=good",
                                                          "data.fields.rejected=bad"]),
    "llama-messages-ranked-bf16": ("llama", {"sft": "messages", "comparisons": "ranked", "prompts": "prompts"},
                                   ["rm.loss=kwise", "policy.dtype=bfloat16", "reward_model.dtype=bfloat16"]),
    "gpt2-completions-hh": ("gpt2", {"sft": "sft", "comparisons": "hh", "prompts": "prompts"}, []),
    # the reward model on another base (its own tokenizer: it reads the policy's text re-tokenized)
    "gpt2-policy-llama-rm": ("gpt2", {"sft": "sft", "comparisons": "pairs_plain", "prompts": "prompts"},
                             ["reward_model.model={llama}", "reward_head=mean_pool"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_from_disk_through_every_stage(files, tmp_path, case):
    from transformers import AutoModelForCausalLM

    arch, sources, extra = CASES[case]
    args = (FAST + ["data=jsonl", f"policy.model={files[arch]}"] + [f"data.{k}={files[v]}" for k, v in sources.items()]
            + [x.format(**files) for x in extra])
    run_dir, table, _ = _ok(args, tmp_path, case)
    assert {"sft", "rl"} <= set(table["policies"]) and "proxy" in table["policies"]["rl"]
    rl = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "rl"))  # an ordinary HF checkpoint
    assert type(rl).__name__.lower().startswith(arch)
    if case == "gpt2-policy-llama-rm":
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(os.path.join(run_dir, "rm")).model_type == "llama"
        assert os.path.isfile(os.path.join(run_dir, "rm", "tokenizer.json"))


def test_lora_through_all_three_stages(files, tmp_path):
    from transformers import AutoModelForCausalLM

    args = FAST + ["data=jsonl", f"policy.model={files['gpt2']}", f"data.path={files['pairs']}",
                   "data.fields.prompt=question", "data.fields.chosen=good", "data.fields.rejected=bad",
                   "policy.lora.enabled=true", "policy.lora.r=4", "reward_model.lora.enabled=true", "reward_model.lora.r=4",
                   "sft.lr=1e-2", "algorithm.lr=1e-2"]
    run_dir, table, _ = _ok(args, tmp_path, "lora")
    import torch

    base = AutoModelForCausalLM.from_pretrained(files["gpt2"]).state_dict()
    for stage in ("sft", "rl"):  # merged: ordinary checkpoints, and the adapters did train
        assert not os.path.exists(os.path.join(run_dir, stage, "adapter_config.json"))
        got = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, stage)).state_dict()
        assert any(not torch.equal(got[k], base[k]) for k in base if k in got)
    assert os.path.isfile(os.path.join(run_dir, "rm", "reward_head.safetensors"))
    # the same run saving adapters only: each stage's directory names its base
    run_dir, _, _ = _ok(args + ["policy.lora.save=adapter", "reward_model.lora.save=adapter"], tmp_path, "lora-adapter")
    for stage in ("sft", "rm", "rl"):
        files_there = set(os.listdir(os.path.join(run_dir, stage)))
        assert "adapter_model.safetensors" in files_there and "model.safetensors" not in files_there, stage
    assert json.load(open(os.path.join(run_dir, "rl", "adapter_config.json")))["base_model_name_or_path"] == "../sft"


def test_a_sequence_classifier_trained_elsewhere_is_the_reward_model(files, tmp_path):
    args = FAST + ["data=jsonl", f"policy.model={files['gpt2']}", f"data.path={files['sft']}", "stages=[sft,rl]",
                   "reward_model=seq_cls", f"reward_model.path={files['rm_llama']}"]
    for algorithm in ("ppo", "rloo"):  # PPO's critic: the RM reads another vocabulary, so a value head on SFT
        _, table, _ = _ok(args + [f"algorithm={algorithm}"], tmp_path, f"seq-cls-{algorithm}")
        assert "proxy" in table["policies"]["rl"]


def test_a_hub_name_runs_from_the_local_cache_offline(files, tmp_path):
    """policy.model=org/name, as the README writes it, from a model in $HF_HOME's cache."""
    save_to_hf_cache(files["gpt2"], str(tmp_path / "hf" / "hub"), "tiny-org/tiny-gpt2")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = FAST + ["data=jsonl", f"data.path={files['pairs_plain']}"]
    r = run_cli(args + ["policy.model=tiny-org/tiny-gpt2", f"hydra.run.dir={tmp_path / 'hub'}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "proxy" in json.load(open(tmp_path / "hub" / "eval.json"))["policies"]["rl"]
    r = run_cli(args + ["policy.model=tiny-org/absent", f"hydra.run.dir={tmp_path / 'absent'}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (f"'tiny-org/absent' is neither a local directory nor a model in the Hugging Face cache ({tmp_path / 'hf' / 'hub'})"
            in r.stderr and "hf download tiny-org/absent" in r.stderr)


def test_a_bin_weights_file_holding_code_is_refused_in_one_line(files, tmp_path):
    import shutil

    import torch

    model = shutil.copytree(files["gpt2"], str(tmp_path / "bin-only"))
    os.remove(os.path.join(model, "model.safetensors"))
    torch.save({"weight": _Exploit()}, os.path.join(model, "pytorch_model.bin"))
    r = run_cli(FAST + ["data=jsonl", f"data.path={files['pairs_plain']}", f"policy.model={model}",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "UnpicklingError" not in r.stderr
    assert f"{model}: its .bin weights hold more than tensors, so rlhfkit will not load them" in r.stderr
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))
