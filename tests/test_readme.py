"""The README's quickstart is the code a user pastes: it runs here on a local tiny model directory."""

import json
import re
from pathlib import Path

import torch

from prefixshare.data import load_toy_preferences, toy_tokenizer
from prefixshare.testing import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```\s*<!-- /quickstart -->", text, re.S)
    assert block, "the README lost its quickstart block"
    return block.group(1)


def test_readme_quickstart_runs_on_a_local_model(tmp_path, capsys):
    tokenizer = toy_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in load_toy_preferences("add")[:16]))

    code = quickstart_code()
    assert '"Qwen/Qwen2.5-0.5B-Instruct"' in code and '"pairs.jsonl"' in code
    code = code.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(model_dir))).replace('"pairs.jsonl"', repr(str(pairs)))
    torch.manual_seed(0)
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "quickstart"})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss ")]
    assert len(lines) == 2  # 16 pairs, 8 per step
    assert all(float(line.split()[1]) > 0 for line in lines)


def test_readme_stays_short_and_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    for target in re.findall(r"\]\(((?:docs|examples|compat|bench)/[^)#]*|LICENSE)\)", text):
        assert (README.parent / target).exists(), target
