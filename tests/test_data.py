"""One loader for every preference file format, used by the command line and every example."""

import gzip
import json

import pytest

from prefixshare.data import load_preferences, load_toy_preferences, tokenize_preferences, toy_tokenizer

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},  # standard
    {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},  # implicit prompt
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
     "rejected": [{"role": "assistant", "content": "no"}]},  # conversational
    {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "yo"},
     "rejected": {"from": "gpt", "value": "no"}},  # ShareGPT
]


@pytest.mark.parametrize("layout", ["jsonl", "jsonl.gz", "json", "json.gz"])
def test_every_format_loads_and_tokenizes(tmp_path, layout):
    path = tmp_path / f"data.{layout}"
    text = json.dumps(ROWS) if layout.startswith("json.") or layout == "json" else "\n".join(map(json.dumps, ROWS))
    if layout.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    rows = load_preferences(path)
    assert rows[:3] == ROWS[:3]
    assert rows[3]["prompt"] == [{"role": "user", "content": "hi"}]
    assert load_preferences(path, limit=2) == ROWS[:2]
    examples = tokenize_preferences(toy_tokenizer(), rows)  # no chat template: conversations as plain text
    assert len(examples) == 4 and all(e["chosen_input_ids"] and e["prompt_input_ids"] for e in examples)
    assert examples[2] == examples[3]  # ShareGPT and conversational rows of the same dialogue


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no rejected"):
        load_preferences(path)
    path.write_text(json.dumps([ROWS[0], 5]))
    with pytest.raises(ValueError, match="example 1: a int"):
        load_preferences(path)


def test_toy_data_goes_through_the_same_loader():
    rows = load_toy_preferences("add")
    assert rows and all(r["task"] == "add" for r in rows)
