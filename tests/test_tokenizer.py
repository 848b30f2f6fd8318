"""Tokenizer in the package: the byte-level tokenizer of the presets and trained-small, the files a
package carries, and `mlamoe generate --prompt` printing text.

References: Python's own UTF-8 codec (the byte-level ids are the bytes), the eager PyTorch model's
greedy continuation of the same bytes, the `tokenizers` library reading the packaged files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import models
from models import tokenizer as tk
from pipeline.cli import main

TRAINED = Path(__file__).resolve().parents[1] / "models" / "trained" / "trained-small"
TEXTS = ["def main():\n    return 0\n", "héllo wörld € 🙂", "\t\x00\x7f\xff?", ""]


def run(*args):
    r = CliRunner().invoke(main, list(args))
    assert "Traceback" not in r.output, r.output
    return r


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_ids_are_the_utf8_bytes_and_decode_back(text):
    tok = tk.byte_level_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.get_vocab_size() == 256


def test_trained_small_ships_the_byte_level_tokenizer_it_was_trained_with():
    assert tk.tokenizer_files(TRAINED) == tk.byte_level_files()
    tok, config = tk.load(TRAINED, vocab_size=256)
    assert tok.encode("def", add_special_tokens=False).ids == [100, 101, 102]
    assert tk.apply_chat_template(config, "hi") == "<|user|>\nhi\n<|assistant|>\n"


def test_checkpoint_or_preset_without_tokenizer_gets_a_note(tmp_path):
    files, note = tk.package_tokenizer(tmp_path, 256)
    assert files == {} and "ships no tokenizer.json" in note
    files, note = tk.package_tokenizer("small", 8192)
    assert files == {} and "vocab_size 8192 has no tokenizer" in note


def test_foreign_or_damaged_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(tk.TokenizerError, match="tokenizer.json: not a readable tokenizer"):
        tk.load(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(tk.byte_level_files()["tokenizer.json"])
    with pytest.raises(tk.TokenizerError, match="more than the model's vocab_size 100"):
        tk.load(tmp_path, vocab_size=100)


def test_generate_prompt_on_a_checkpoint_equals_the_eager_continuation():
    r = run("generate", str(TRAINED), "--prompt", "def main():", "--max-new-tokens", "12", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    tokens, _ = models.greedy_generate(models.load(TRAINED), list(b"def main():"), 12)
    assert got["tokens"] == tokens[0].tolist()
    assert got["text"] == bytes(tokens[0].tolist()).decode("utf-8", errors="replace")


def test_generate_argument_errors_are_one_line():
    assert run("generate", "tiny").exit_code == 2
    r = run("generate", "tiny", "--prompt-ids", "1", "--chat")
    assert r.exit_code == 2 and "--chat applies to --prompt" in r.output
    r = run("generate", "small", "--prompt", "x")
    assert r.exit_code == 2 and "has no tokenizer" in r.output
