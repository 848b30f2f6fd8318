"""Greedy generation with onnxruntime-genai, printed as JSON (run by tests/test_genai.py in the genai
environment: this file imports onnxruntime_genai and numpy only, never the compiler).

    .venv-genai/bin/python tests/genai_generate.py GENAI_FOLDER (--prompt TEXT | --prompt-ids 1,2,3)
        [--max-new-tokens 16] [--chat]

-> {"prompt_ids": [...], "tokens": [...], "text": "...", "step_logits": [[...], ...]}
   step_logits: the logits genai chose each token from (Generator.get_logits() after each step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--prompt")
    p.add_argument("--prompt-ids")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    model = og.Model(args.folder)
    # a package without a tokenizer (random-weight presets other than the vocab-256 ones): --prompt-ids only
    has_tokenizer = (Path(args.folder) / "tokenizer_config.json").is_file() or args.prompt is not None
    tokenizer = og.Tokenizer(model) if has_tokenizer else None
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",")]
    else:
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": text}]),
                                                 add_generation_prompt=True)
        ids = [int(x) for x in tokenizer.encode(text)]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + args.max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    tokens, logits = [], []
    # get_logits() read before a step holds the logits that step picks from (after it, those of the
    # next step). Read it only while not done: in 0.18.0 get_logits() after the last step clears the
    # done state, and the next generate_next_token() then fails at max_length.
    while not gen.is_done():
        logits.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1).tolist())
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    text = tokenizer.decode(np.asarray(tokens, np.int32)) if tokenizer is not None else None
    print(json.dumps({"prompt_ids": ids, "tokens": tokens, "text": text, "step_logits": logits}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
