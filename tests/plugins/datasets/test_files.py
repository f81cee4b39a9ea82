"""data=files / data=jsonl: every format, field mapping, each kind of bad record as a
clear error or a count, and the loaders fuzzed with hypothesis."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.errors import ConfigError, DataError
from rlhfkit.interfaces import Comparison, Example
from rlhfkit.plugins.datasets.files import FieldNames, FileData, FileDataConfig, render_plain, split_transcript


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def data(path, **kw):
    return FileData(FileDataConfig(path=str(path), test_fraction=0.0, **kw))


def test_prompt_completion_and_messages(tmp_path):
    p = _jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "2+2=", "completion": " 4"},
        {"prompt": "hi", "response": "hello"},
        {"messages": [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "Bob"}]},
    ])
    d = data(p)
    ex = d.sft_examples("train")
    assert ex[:2] == [Example("2+2=", " 4"), Example("hi", "hello")]
    assert ex[2] == Example("\n\nHuman: name?\n\nAssistant:", "Bob")
    assert d.prompts("train") == ["2+2=", "hi", "\n\nHuman: name?\n\nAssistant:"]
    assert ex[0].source == f"{p}:1"


def test_messages_use_the_tokenizers_chat_template(tmp_path):
    p = _jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    d = data(p)
    d.bind_tokenizer(Tok())
    assert d.sft_examples("train") == [Example("<user>q<assistant>", "a")]


def test_pairs_hh_and_ranked_with_ties(tmp_path):
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    p = _jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"chosen": hh + " a good one", "rejected": hh + " no"},
        {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [2, 1, 2, 3]},
        {"prompt": "r", "responses": ["x", "y"], "scores": [0.1, 0.9]},
    ])
    d = data(p)
    c = d.comparisons("train", sample=None)
    assert c[0] == Comparison("p", ("good", "bad"), (1.0, 0.0))
    assert c[1] == Comparison(hh, ("a good one", "no"), (1.0, 0.0))
    assert c[2] == Comparison("q", ("a", "b", "c", "d"), (-2.0, -1.0, -2.0, -3.0))  # a and c tie
    assert c[3].scores == (0.1, 0.9)
    # preferences also feed SFT (the best response) and RL (the prompts)
    assert [e.response for e in d.sft_examples("train")] == ["good", "a good one", "b", "y"]
    assert d.prompts("train") == ["p", hh, "q", "r"]


def test_conversational_pairs(tmp_path):
    p = _jsonl(tmp_path / "prefs.jsonl", [{
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }])
    assert data(p).comparisons("train", None) == [Comparison("\n\nHuman: hi\n\nAssistant:", ("hello", "go away"), (1.0, 0.0))]


def test_field_mapping_and_prompt_only(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"question": "why", "better": "because", "worse": "no"}])
    d = data(p, fields=FieldNames(prompt="question", chosen="better", rejected="worse"))
    assert d.comparisons("train", None) == [Comparison("why", ("because", "no"), (1.0, 0.0))]
    q = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    assert data(q).prompts("train") == ["a", "b"]


def test_json_and_parquet_files(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert len(data(tmp_path / "a.json").comparisons("train", None)) == 3
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    got = data(tmp_path / "a.parquet").comparisons("train", None)
    assert [c.prompt for c in got] == ["p0", "p1", "p2"] and got[0].source == f"{tmp_path / 'a.parquet'} row 0"


HH = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
      for i in range(4)]


def test_a_dataset_saved_to_disk_by_path(tmp_path):
    import datasets

    datasets.Dataset.from_list(HH).save_to_disk(str(tmp_path / "one"))
    got = data(tmp_path / "one").comparisons("train", None)
    assert [c.responses for c in got] == [(f"good {i}", f"bad {i}") for i in range(4)]
    assert got[3].prompt == "\n\nHuman: q3\n\nAssistant:" and got[0].source == f"{tmp_path / 'one'}[train] row 0"
    # a DatasetDict: data.split and data.test_split pick its splits
    datasets.DatasetDict({"train": datasets.Dataset.from_list(HH[:3]), "test": datasets.Dataset.from_list(HH[3:])}).save_to_disk(
        str(tmp_path / "dict"))
    d = FileData(FileDataConfig(path=str(tmp_path / "dict"), test_split="test", test_fraction=0))
    assert len(d.comparisons("train", None)) == 3 and [c.responses for c in d.comparisons("test", None)] == [("good 3", "bad 3")]


def _cache_hub_dataset(hf_home, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """Write ``repo_id`` into ``hf_home``'s datasets cache in the layout a download from the
    hub leaves (``<namespace>___<name>/default/0.0.0/<revision>/``), without the hub."""
    import datasets

    class Rows(datasets.GeneratorBasedBuilder):
        def _info(self):
            return datasets.DatasetInfo(features=datasets.Features({k: datasets.Value("string") for k in HH[0]}))

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name=name, gen_kwargs={"rows": rows}) for name, rows in splits.items()]

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    Rows(cache_dir=str(hf_home / "datasets"), repo_id=repo_id, dataset_name=repo_id.split("/")[-1],
         hash="0123abcd").download_and_prepare()


def test_a_hub_dataset_by_name_from_the_local_cache_offline(tmp_path):
    _cache_hub_dataset(tmp_path / "hf", "Anthropic/hh-rlhf", {"train": HH[:3], "test": HH[3:]})
    code = """if 1:
        import json
        from rlhfkit.errors import DataError
        from rlhfkit.plugins.datasets.files import FileData, FileDataConfig
        d = FileData(FileDataConfig(path="Anthropic/hh-rlhf", test_split="test", test_fraction=0))
        out = {split: [c.responses for c in d.comparisons(split, None)] for split in ("train", "test")}
        out["source"] = d.comparisons("test", None)[0].source
        try:
            FileData(FileDataConfig(path="Anthropic/not-cached")).comparisons("train", None)
        except DataError as exc:
            out["error"] = str(exc)
        print(json.dumps(out))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["train"] == [[f"good {i}", f"bad {i}"] for i in range(3)] and out["test"] == [["good 3", "bad 3"]]
    assert out["source"] == "Anthropic/hh-rlhf[test] row 0"
    assert "'Anthropic/not-cached'" in out["error"] and "\n" not in out["error"]


def test_train_test_hold_out_is_deterministic_and_disjoint(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    d = FileData(FileDataConfig(path=p, test_fraction=0.1))
    train, test = d.prompts("train"), d.prompts("test")
    assert len(test) == 4 and not set(train) & set(test) and len(train) == 36
    assert FileData(FileDataConfig(path=p, test_fraction=0.1)).prompts("test") == test


BAD = [
    ("{not json", "malformed JSON", ""),
    ('["a list"]', "record is not a JSON object", ""),
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'", ""),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty response in field 'chosen'", ""),
    ({"prompt": "p", "completion": ""}, "empty response in field 'completion'", ""),
    ({"prompt": 3, "completion": "x"}, "field 'prompt' is not a string", "got int"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1]}, "field 'ranking' does not have one number per response", ""),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}, "field 'ranking' ties every response", ""),
    ({"chosen": "no turns", "rejected": "x"}, "transcript without an 'Assistant:' turn", ""),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
     "chosen and rejected transcripts do not share a prompt", ""),
    ({"something": "else"}, "unrecognised record", ""),
    ('{"prompt": "a \\ud800 b", "completion": "x"}', "lone surrogate in a string", "'\\ud800' is half of a UTF-16 pair"),
]


@pytest.mark.parametrize("line,reason,detail", BAD)
def test_a_bad_record_is_an_error_naming_file_line_and_field(tmp_path, line, reason, detail):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError) as err:
        data(p).comparisons("train", None) and data(p).sft_examples("train")
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: {reason}") and detail in msg and "bad_data=skip" in msg


def test_skip_mode_counts_each_bad_record_once_by_reason(tmp_path):
    rows = [{"prompt": "ok", "chosen": "a", "rejected": "b"}] + [line for line, _, _ in BAD] + ["{bad again"]
    p = _jsonl(tmp_path / "d.jsonl", rows)
    d = FileData(FileDataConfig(path=p, on_error="skip", test_fraction=0.3))
    d.comparisons("train", None), d.comparisons("test", None), d.sft_examples("train"), d.prompts("test")
    assert sum(d.skipped.values()) == len(BAD) + 1
    assert d.skipped["malformed JSON"] == 2
    assert d.issues.first["malformed JSON"] == f"{p}:2"


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs a source"):
        FileData(FileDataConfig())
    with pytest.raises(ConfigError, match="data.format"):
        FileData(FileDataConfig(path="x.jsonl", format="csv"))
    with pytest.raises(DataError, match="no such file"):
        FileData(FileDataConfig(path=str(tmp_path / "missing.jsonl"))).prompts("train")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        FileData(FileDataConfig(path=str(tmp_path / "bad.json"))).prompts("train")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown file type"):
        FileData(FileDataConfig(path=str(tmp_path / "x.csv"))).prompts("train")


def test_helpers():
    assert split_transcript("\n\nHuman: a\n\nAssistant: b") == ("\n\nHuman: a\n\nAssistant:", "b")
    assert render_plain([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], True) == \
        "\n\nSystem: s\n\nHuman: u\n\nAssistant:"


# --- fuzzing: whatever the bytes, the loader returns records or raises DataError --------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["prompt", "completion", "response", "messages", "chosen", "rejected", "responses", "ranking", "scores", "role", "content"])
records = st.dictionaries(keys, json_values | st.lists(st.fixed_dictionaries({"role": st.text(max_size=9), "content": json_values}), max_size=3), max_size=5)
lines = st.lists(st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30),
                           st.binary(max_size=20).map(lambda b: b.decode("latin-1"))), max_size=12)


def _load_all(d):
    return d.sft_examples("train"), d.comparisons("train", None), d.prompts("train"), d.prompts("test"), d.vocabulary()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines, mode=st.sampled_from(["error", "skip"]), fmt=st.sampled_from(["auto", "pairs", "ranked", "messages"]))
def test_fuzzed_jsonl_never_crashes_the_loader(tmp_path, lines, mode, fmt):
    path = os.path.join(tmp_path, "fuzz.jsonl")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write("\n".join(x.replace("\n", " ").replace("\r", " ") for x in lines))
    d = FileData(FileDataConfig(path=path, on_error=mode, format=fmt, test_fraction=0.2))
    try:
        sft, comps, prompts, test, vocab = _load_all(d)
    except DataError as exc:  # skip mode too, once nothing usable is left: naming the file
        nothing_usable = str(exc).startswith(f"data.path={path}: no ")
        assert str(exc).startswith(path) and mode == "error" or nothing_usable
        return
    for e in sft:
        assert isinstance(e.prompt, str) and e.prompt.strip() and isinstance(e.response, str) and e.response.strip()
    for c in comps:
        assert len(c.responses) == len(c.scores) >= 2 and len(set(c.scores)) >= 2
        assert all(isinstance(r, str) and r.strip() for r in c.responses)
    assert all(isinstance(p, str) for p in prompts + test + vocab)
    if mode == "skip":
        nonblank = sum(1 for x in lines if x.replace("\n", " ").replace("\r", " ").strip())
        assert sum(d.skipped.values()) <= nonblank


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200))
def test_fuzzed_bytes_in_json_and_parquet_files_are_data_errors(tmp_path, payload):
    for name in ("f.json", "f.parquet", "f.jsonl"):
        path = os.path.join(tmp_path, name)
        with open(path, "wb") as f:
            f.write(payload)
        try:
            _load_all(FileData(FileDataConfig(path=path, on_error="skip")))
        except DataError as exc:
            assert path in str(exc)


def _word_level(words):
    from rlhfkit.plugins.policies.hf import word_level_tokenizer

    return word_level_tokenizer(words)


def _pretrained(tmp_path):
    from transformers import AutoTokenizer

    from ...helpers import CHAT_TEMPLATE, save_tiny_model

    return AutoTokenizer.from_pretrained(save_tiny_model("gpt2", str(tmp_path / "gpt2"), ["a b c <eos>"] * 5, CHAT_TEMPLATE))


SPECIAL_ROWS = [  # one record per place a special token can hide, in each tokenizer's spelling
    ({"prompt": "p {t} q", "chosen": "a", "rejected": "b"}, "special token in field 'prompt'"),
    ({"prompt": "p", "chosen": "a {t}", "rejected": "b"}, "special token in field 'chosen'"),
    ({"prompt": "p", "completion": "{t}"}, "special token in field 'completion'"),
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "{t} a"}]}, "special token in field 'messages'"),
    ({"prompt": "p", "responses": ["a", "b{t}"], "ranking": [1, 2]}, "special token in field 'responses'"),
]


@pytest.mark.parametrize("kind,token,role", [
    ("word-level", "<eos>", "eos_token"), ("word-level", "<pad>", "pad_token"), ("word-level", "<unk>", "unk_token"),
    ("pretrained", "<|endoftext|>", "bos_token and eos_token"), ("pretrained", "<|user|>", "special token"),
])
def test_a_special_token_in_the_text_is_bad_data_for_either_tokenizer(tmp_path, kind, token, role):
    """The policy: a literal special token in a record's text would be read as that token
    (an EOS in mid-response), so the record is an error naming it, or skipped and counted."""
    tok = _word_level(["a", "b", "p", "q", token]) if kind == "word-level" else _pretrained(tmp_path)
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    for row, reason in SPECIAL_ROWS:
        bad = json.loads(json.dumps(row).replace("{t}", token))
        p = _jsonl(tmp_path / "d.jsonl", [good, bad])
        d = data(p)
        d.bind_tokenizer(tok)
        with pytest.raises(DataError) as err:
            d.sft_examples("train")
        assert str(err.value).startswith(f"{p}:2: {reason} ('{token}' is the tokenizer's {role}, so it would not be read as text)")
        d = data(p, on_error="skip")
        d.bind_tokenizer(tok)
        assert d.sft_examples("train") == [Example("p", "a", source=f"{p}:1")] and d.skipped == {reason: 1}


def test_text_that_only_looks_special_is_kept_and_chat_markers_come_from_the_template(tmp_path):
    tok = _pretrained(tmp_path)  # "<eos>" is not one of its special tokens: plain text
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a <eos> b", "completion": "c"},
                                      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}])
    d = data(p)
    d.bind_tokenizer(tok)
    first, chat = d.sft_examples("train")
    assert first.prompt == "a <eos> b" and tok.eos_token_id not in tok(first.prompt)["input_ids"]
    assert chat.prompt == "<|user|> q <|assistant|>"  # rendered by the chat template: its markers are meant


def test_a_source_with_nothing_usable_names_the_file_and_the_skip_counts(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(text)
        for mode in ("error", "skip"):
            with pytest.raises(DataError, match=rf"^data.path={tmp_path / name}: no records \(the file is empty or blank\)"):
                FileData(FileDataConfig(path=str(tmp_path / name), on_error=mode)).vocabulary()
    p = _jsonl(tmp_path / "bad.jsonl", ["{not json", {"x": 1}, {"prompt": "p", "chosen": ""}, {"prompt": "p", "rejected": "a"}])
    with pytest.raises(DataError) as err:
        FileData(FileDataConfig(path=p, on_error="skip", test_fraction=0.3)).sft_examples("train")
    assert str(err.value).startswith(
        f"data.path={p}: no usable record (bad_data=skip skipped 4 bad record(s): ") and "1 x malformed JSON" in str(err.value)
    assert "1 x unrecognised record" in str(err.value) and "1 x missing field 'chosen'" in str(err.value)
    prompts = _jsonl(tmp_path / "prompts.jsonl", ["{not json"])
    with pytest.raises(DataError, match=rf"^data.prompts={prompts}: no records \(bad_data=skip skipped 1 bad record\(s\): "
                                        rf"1 x malformed JSON \(first at {prompts}:1\)\)"):
        FileData(FileDataConfig(path=p, prompts=prompts, on_error="skip")).prompts("train")
