"""tokenize_preference splits prompt and completions exactly where TRL's DPOTrainer does.

The reference is TRL's own tokenization: ``DPOTrainer._prepare_dataset`` (a method; called here on a trainer
object that holds the one attribute it reads, ``_tokenizer``), and for truncation TRL's
``DataCollatorForPreference``. Offline tokenizers are built in code; the real Mistral tokenizer and real data
are used when ../shared (or $PREFIXSHARE_SHARED) has them, else those tests skip.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixshare import PrefixShareCollator
from prefixshare.tokenization import tokenize_preference

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

SHARED = Path(os.environ.get("PREFIXSHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MISTRAL_TOKENIZER = SHARED / "tokenizers" / "mistral-7b-v0.1-tokenizer.model"
HH_RLHF = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DPO_EN_DEMO = SHARED / "data" / "llamafactory-dpo-en-demo.json"

# A template that writes its own BOS, marks turns with plain characters, and takes an optional kwarg.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if style %}[{{ style }}]{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# Alone with the generation prompt the prompt ends in "<assistant>\n"; followed by an answer it has no "\n":
# the case where the rendered prompt is not a prefix of the rendered conversation.
ODD_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n{% endif %}"
)
# Merges across the prompt/completion boundary: "? " and "= " become one token.
MERGES = [("?", " "), ("=", " "), ("a", "b")]


def build_tokenizer(merges=MERGES, chat_template=CHAT_TEMPLATE):
    """A character-level BPE tokenizer (plus a few merges), BOS added in front; built offline."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>", "<unk>"]
    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(special + characters + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    backend.add_special_tokens(special)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def trl_tokenize(rows, tokenizer, tmp_path, max_length=None):
    """TRL 1.x's tokenization of ``rows``, by the method DPOTrainer.__init__ calls on its datasets."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=max_length)
    trainer = DPOTrainer.__new__(DPOTrainer)  # _prepare_dataset reads only self._tokenizer
    trainer._tokenizer = tokenizer
    dataset = trainer._prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [
        {"prompt_input_ids": r["prompt_ids"], "chosen_input_ids": r["chosen_ids"], "rejected_input_ids": r["rejected_ids"]}
        for r in dataset
    ]


def ours(rows, tokenizer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [tokenize_preference(row, tokenizer, **kwargs) for row in rows]


STANDARD = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Spell ab: ", "chosen": "a b", "rejected": "b a<eos>"},  # EOS already there on one side
    {"prompt": "x = ", "chosen": "1", "rejected": "22"},  # "= " merges inside the prompt
    {"prompt": "Why?", "chosen": " Because.", "rejected": " No"},  # "? " merges across the boundary
    {"prompt": "Tell me\nabout a", "chosen": "b", "rejected": "ba"},  # "ab" merges across the boundary
    {"prompt": "", "chosen": "empty prompt", "rejected": "still fine"},
]

CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
        "chat_template_kwargs": {"style": ""},
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
        ],
        "chosen": [{"role": "assistant", "content": "6"}],
        "rejected": [{"role": "assistant", "content": "seven"}],
        "chat_template_kwargs": {"style": "terse"},
    },
]


# ---------------------------------------------------------------------------------------------- offline
def test_standard_format_matches_trl(tmp_path):
    tokenizer = build_tokenizer()
    assert ours(STANDARD, tokenizer) == trl_tokenize(STANDARD, tokenizer, tmp_path)


def test_standard_format_conventions():
    tokenizer = build_tokenizer(merges=[])
    out = tokenize_preference({"prompt": "Hi", "chosen": " yes", "rejected": " no"}, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert out["prompt_input_ids"] == [bos] + tokenizer.convert_tokens_to_ids(list("Hi"))
    assert out["chosen_input_ids"] == tokenizer.convert_tokens_to_ids(list(" yes")) + [eos]
    assert out["rejected_input_ids"][-1] == eos and out["rejected_input_ids"].count(eos) == 1


def test_boundary_merge_moves_the_split_and_warns(tmp_path):
    tokenizer = build_tokenizer()
    row = {"prompt": "Why?", "chosen": " Because.", "rejected": " No"}
    with pytest.warns(UserWarning, match="not a prefix"):
        out = tokenize_preference(row, tokenizer)
    # "?" alone ends the prompt's tokens, but "? " is one token in prompt+completion: it goes to the completions
    assert tokenizer.convert_ids_to_tokens(out["chosen_input_ids"][:1]) == ["? "]
    assert out == trl_tokenize([row], tokenizer, tmp_path)[0]


def test_conversational_format_matches_trl(tmp_path):
    tokenizer = build_tokenizer()
    got = ours(CONVERSATIONAL, tokenizer)
    assert got == trl_tokenize(CONVERSATIONAL, tokenizer, tmp_path)
    # the chat template's kwargs reached the template, and the prompt ends with the generation prompt
    assert tokenizer.decode(got[1]["prompt_input_ids"]).startswith("<bos>[terse]")
    assert tokenizer.decode(got[0]["prompt_input_ids"]).endswith("<assistant>")


def test_conversational_prompt_rendered_differently_matches_trl(tmp_path):
    tokenizer = build_tokenizer(chat_template=ODD_TEMPLATE)
    rows = [{k: v for k, v in row.items() if k != "chat_template_kwargs"} for row in CONVERSATIONAL]
    got = ours(rows, tokenizer)
    assert got == trl_tokenize(rows, tokenizer, tmp_path)
    assert not tokenizer.decode(got[0]["prompt_input_ids"]).endswith("\n")  # the "\n" is left out, as in TRL


def test_implicit_prompt_matches_trl(tmp_path):
    tokenizer = build_tokenizer()
    standard = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in STANDARD[:5]]
    standard.append({"chosen": "Same start, then A", "rejected": "Same start, then A and more"})  # a prefix
    conversational = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL
    ]
    for rows in (standard, conversational):
        assert ours(rows, tokenizer) == trl_tokenize(rows, tokenizer, tmp_path)


def test_batched_map_equals_one_by_one():
    tokenizer = build_tokenizer()
    for rows in (STANDARD, CONVERSATIONAL):
        dataset = datasets.Dataset.from_list(rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batched = dataset.map(tokenize_preference, fn_kwargs={"tokenizer": tokenizer}, batched=True, batch_size=4)
            single = dataset.map(tokenize_preference, fn_kwargs={"tokenizer": tokenizer})
        keys = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
        assert batched.select_columns(keys).to_list() == single.select_columns(keys).to_list()
        assert single.select_columns(keys).to_list() == ours(rows, tokenizer)
    # a plain dict of lists works too, and batched= can be forced
    batch = {key: [row[key] for row in STANDARD] for key in ("prompt", "chosen", "rejected")}
    out = ours([batch], tokenizer, batched=True)[0]
    assert [dict(zip(out, values)) for values in zip(*out.values())] == ours(STANDARD, tokenizer)


def test_max_length_truncates_like_trls_collator(tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = build_tokenizer()
    rows = STANDARD + [{"prompt": "Long answers", "chosen": " " + "x" * 30, "rejected": " " + "y" * 12}]
    max_length = 16
    trl_rows = trl_tokenize(rows, tokenizer, tmp_path, max_length=max_length)  # TRL drops too-long prompts
    kept = [row for row in rows if len(ours([row], tokenizer)[0]["prompt_input_ids"]) < max_length]
    assert len(kept) == len(trl_rows) >= 5
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    batch = collator(
        [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]}
         for r in trl_rows]
    )
    n = len(trl_rows)
    truncated = ours(kept, tokenizer, max_length=max_length)
    for i, ids in enumerate(truncated):
        for k, key in enumerate(("chosen_input_ids", "rejected_input_ids")):
            row = k * n + i
            want = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert ids["prompt_input_ids"] + ids[key] == want
    # prefixshare's collator truncates the same way at batch time
    untruncated = ours(kept, tokenizer)
    shared = PrefixShareCollator(0, max_length=max_length, truncation="truncate_responses").normalize(untruncated)
    assert [[ex.prompt, *ex.responses] for ex in shared] == [
        [t["prompt_input_ids"], t["chosen_input_ids"], t["rejected_input_ids"]] for t in truncated
    ]


def test_max_length_rejects_prompts_that_leave_no_completion():
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="leaves no completion token"):
        tokenize_preference({"prompt": "a long prompt", "chosen": "x", "rejected": "y"}, tokenizer, max_length=5)


def test_errors_are_clear():
    tokenizer = build_tokenizer()
    mixed = {"prompt": "text", "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    with pytest.raises(ValueError, match="all be strings"):
        tokenize_preference(mixed, tokenizer)
    with pytest.raises(ValueError, match="no common beginning"):
        tokenize_preference({"chosen": "abc", "rejected": "xyz"}, tokenizer)
    with pytest.raises(ValueError, match="vision"):
        tokenize_preference({"prompt": "p", "chosen": "c", "rejected": "r", "images": []}, tokenizer)
    with pytest.raises(ValueError, match="'rejected'"):
        tokenize_preference({"prompt": "p", "chosen": "c"}, tokenizer)
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_preference({"prompt": "p", "chosen": "c", "rejected": "r"}, no_eos)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_preference({"prompt": "p", "chosen": "c", "rejected": "r"}, tokenizer, max_length=0)


USER = [{"role": "user", "content": "Hi?"}]
ANSWER = [{"role": "assistant", "content": "Hello."}]
OTHER = [{"role": "assistant", "content": "Go away"}]

# (example, message): each failed deep in the tokenizer, gave a message without the field, or went through
BAD_TEXT = {
    "chosen a number": ({"prompt": "p", "chosen": 5, "rejected": "r"}, "'chosen' is int 5; expected a string"),
    "rejected a number": ({"prompt": "p", "chosen": "c", "rejected": 5}, "'rejected' is int 5; expected a string"),
    "chosen None": ({"prompt": "p", "chosen": None, "rejected": "r"}, "'chosen' is None; expected a string"),
    "chosen bytes": ({"prompt": "p", "chosen": b"c", "rejected": "r"}, "'chosen' is bytes b'c'; expected"),
    "prompt None": (  # went through as an implicit prompt
        {"prompt": None, "chosen": "ab c", "rejected": "ab d"},
        r"'prompt' is None; expected .* \(leave the 'prompt' field out for an implicit prompt",
    ),
    "conversational prompt None": (
        {"prompt": None, "chosen": USER + ANSWER, "rejected": USER + OTHER},
        "'prompt' is None; expected",
    ),
    "prompt a number": ({"prompt": 7, "chosen": "c", "rejected": "r"}, "'prompt' is int 7; expected"),
    "token ids": (
        {"prompt": "p", "chosen": [5, 6], "rejected": "r"},
        r"'chosen' is a list of int; expected .*\(token ids\? .* as chosen_input_ids\)",
    ),
    "one message outside a list": (
        {"prompt": USER, "chosen": ANSWER[0], "rejected": OTHER},
        r"'chosen' is dict \{'role': 'assistant', 'content': 'Hello.'\}; expected .*\(one message goes in a list",
    ),
    "a message without a role": (  # went through: the template rendered the missing role as ""
        {"prompt": USER, "chosen": ANSWER + [{"content": "more"}], "rejected": OTHER},
        r"'chosen'\[1\] is dict \{'content': 'more'\}; every message of a conversation must be a mapping with a 'role'",
    ),
    "a string among messages": (
        {"prompt": USER, "chosen": ANSWER, "rejected": OTHER + ["oops"]},
        r"'rejected'\[1\] is str 'oops'; every message",
    ),
    "an empty conversation": ({"prompt": [], "chosen": ANSWER, "rejected": OTHER}, "'prompt' is an empty list; expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_text_fields_are_named(case):
    """Each case raises ValueError naming the field and its type, alone and as example 1 of a batch."""
    example, message = BAD_TEXT[case]
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="^" + message):
        tokenize_preference(example, tokenizer)
    standard = not isinstance(example["chosen"], (list, dict))
    good = {"prompt": "Hi", "chosen": " yes", "rejected": " no"} if standard else dict(prompt=USER, chosen=ANSWER, rejected=OTHER)
    batch = {key: [good[key], example[key]] for key in example}
    with pytest.raises(ValueError, match="^example 1 of the batch: " + message):
        tokenize_preference(batch, tokenizer, batched=True)


def test_batch_errors_name_the_example():
    """Any error of one row of a batch says which row (before: the message alone, no index)."""
    tokenizer = build_tokenizer()
    batch = {"chosen": ["Same start A", "abc", "Same start B"], "rejected": ["Same start B", "xyz", "Same start C"]}
    with pytest.raises(ValueError, match="^example 1 of the batch: chosen and rejected have no common beginning"):
        tokenize_preference(batch, tokenizer)
    long_prompt = {"prompt": ["Hi", "a long prompt"], "chosen": [" yes", "x"], "rejected": [" no", "y"]}
    with pytest.raises(ValueError, match="^example 1 of the batch: the prompt has 14 tokens, max_length=5"):
        tokenize_preference(long_prompt, tokenizer, max_length=5)


def test_batch_fields_must_be_lists():
    """A string where a batch needs a list was repeated for every example, silently: refused now.

    So is one example forced through ``batched=True`` (before: tokenized once per character of ``chosen``).
    """
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="^a batch needs a list with one entry per example in 'rejected', got str 'r'$"):
        tokenize_preference({"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": "r"}, tokenizer)
    with pytest.raises(ValueError, match=r"in 'prompt', got str 'p' \(one example\? leave batched unset"):
        tokenize_preference({"prompt": "p", "chosen": "abc", "rejected": "xyz"}, tokenizer, batched=True)
    # a batch forced through batched=False is named as such
    with pytest.raises(ValueError, match=r"^'prompt' is a list of str; expected .*\(a batch of examples\? pass batched=True\)"):
        tokenize_preference({"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": ["r", "s"]}, tokenizer, batched=False)


def test_mixed_formats_name_each_field():
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="all be strings.*; got prompt: a string, chosen: messages, rejected: messages$"):
        tokenize_preference({"prompt": "text", "chosen": ANSWER, "rejected": OTHER}, tokenizer)


NOT_TEXT = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.binary(min_size=1, max_size=4),
    st.lists(st.integers(0, 99), min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["content", "text"]), st.text(max_size=3), min_size=1),  # no 'role'
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bad=NOT_TEXT, conversational=st.booleans(), batched=st.booleans())
def test_any_non_text_value_is_named(data, bad, conversational, batched):
    """A value that is neither text nor a conversation, in any field of any row: ValueError naming the row (in a
    batch), the field and the type; never a tokenizer error, never tokenized."""
    tokenizer = build_tokenizer()
    rows = [dict(row) for row in (CONVERSATIONAL if conversational else STANDARD[:4])]
    rows = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]
    i = data.draw(st.integers(0, len(rows) - 1)) if batched else 0
    field = data.draw(st.sampled_from(["prompt", "chosen", "rejected"]))
    rows[i][field] = bad
    kind = "None" if bad is None else ("a list of int" if isinstance(bad, list) else type(bad).__name__)
    where = f"example {i} of the batch: " if batched else ""
    example = {key: [row[key] for row in rows] for key in rows[0]} if batched else rows[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=f"^{re.escape(where)}'{field}' is {re.escape(kind)}"):
            tokenize_preference(example, tokenizer, batched=batched)


def test_output_feeds_the_collator():
    tokenizer = build_tokenizer()
    examples = ours(STANDARD + CONVERSATIONAL, tokenizer)
    batch = PrefixShareCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    assert batch.layout.num_examples == len(examples)


# ---------------------------------------------------------------------------------------------- real data
def mistral_tokenizer():
    """The Mistral-7B v0.1 tokenizer from its sentencepiece model, converted offline (no protobuf needed)."""
    if not MISTRAL_TOKENIZER.is_file():
        pytest.skip(f"no Mistral tokenizer at {MISTRAL_TOKENIZER}")
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip("this transformers has no generate_merges to convert a sentencepiece model")
    processor = spm.SentencePieceProcessor(model_file=str(MISTRAL_TOKENIZER))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    assert tokenizer("Hello world")["input_ids"] == [processor.bos_id()] + processor.encode("Hello world")
    # Mistral v0.1 (a base model) has no chat template; use the instruct models' [INST] format
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    )
    return tokenizer


@pytest.fixture(scope="module")
def mistral():
    return mistral_tokenizer()


def hh_rlhf_rows(n):
    if not HH_RLHF.is_file():
        pytest.skip(f"no hh-rlhf data at {HH_RLHF}")
    rows = []
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = row["chosen"][:cut]
            if row["rejected"].startswith(prompt):
                rows.append({"prompt": prompt, "chosen": row["chosen"][cut:], "rejected": row["rejected"][cut:]})
            if len(rows) == n:
                break
    return rows


def test_mistral_hh_rlhf_matches_trl(mistral, tmp_path):
    rows = hh_rlhf_rows(12)
    got = ours(rows, mistral)
    assert got == trl_tokenize(rows, mistral, tmp_path)
    for ids in got:
        assert ids["prompt_input_ids"][0] == mistral.bos_token_id
        assert ids["chosen_input_ids"][-1] == ids["rejected_input_ids"][-1] == mistral.eos_token_id
    # the implicit-prompt route (no "prompt" field) agrees with TRL as well
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    assert ours(implicit, mistral) == trl_tokenize(implicit, mistral, tmp_path)


def test_mistral_conversational_matches_trl(mistral, tmp_path):
    if not DPO_EN_DEMO.is_file():
        pytest.skip(f"no dpo-en-demo data at {DPO_EN_DEMO}")
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    rows = []
    for row in json.loads(DPO_EN_DEMO.read_text(encoding="utf-8"))[:8]:
        rows.append({
            "prompt": [{"role": role[m["from"]], "content": m["value"]} for m in row["conversations"]],
            "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
        })
    assert ours(rows, mistral) == trl_tokenize(rows, mistral, tmp_path)
