from rlhfkit.secrets import REDACTED, redact


def test_secret_keys_env_values_and_token_shapes_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 12)
    cfg = {
        "logger": {"wandb": {"api_key": "abc", "project": "p", "tags": ["run-with-" + "k" * 12]}},
        "data": {"hf_token": "whatever", "path": "hf_" + "A1" * 20},
        "rl": {"rollout": {"max_new_tokens": 16}},  # not a secret: 'tokens', not 'token'
        "secret": None,
    }
    out = redact(cfg)
    assert out["logger"]["wandb"]["api_key"] == REDACTED and out["logger"]["wandb"]["project"] == "p"
    assert out["logger"]["wandb"]["tags"] == ["run-with-" + REDACTED]
    assert out["data"] == {"hf_token": REDACTED, "path": REDACTED}
    assert out["rl"]["rollout"]["max_new_tokens"] == 16 and out["secret"] is None
    assert cfg["logger"]["wandb"]["api_key"] == "abc"  # a copy: the run's own config is untouched
