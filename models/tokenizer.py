"""The checkpoint's tokenizer: which files travel into a package, and the byte-level one of the presets.

A Hugging Face checkpoint ships `tokenizer.json` (the `tokenizers` library's format) beside
`tokenizer_config.json` (special tokens, `chat_template`) and sometimes `special_tokens_map.json` /
`chat_template.jinja`. Those files are copied into the package as they are (hashed like every file);
nothing is re-derived. The presets and trained-small use a byte-level vocabulary of 256 (token id =
byte value, no merges), which `byte_level_tokenizer()` writes as a real tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import MlamoeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# A plain role-tagged template for the byte-level models: they were trained on Python source, not on
# chats, so this only shows the mechanism (a checkpoint's own template is used as shipped).
BYTE_LEVEL_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class TokenizerError(MlamoeError):
    """A tokenizer file is missing, unreadable, or does not fit the model."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` whose token ids are the UTF-8 bytes of the text (vocab 256, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_level_files() -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json (with a chat template) for a byte-level model."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
              "chat_template": BYTE_LEVEL_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": byte_level_tokenizer().to_str().encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")}


def package_tokenizer(model_spec: str | Path, vocab_size: int) -> tuple[dict[str, bytes], str]:
    """(files, what they are) for a package: a checkpoint's own tokenizer files; for a preset with the
    byte-level vocabulary of 256, the byte-level tokenizer; otherwise none, said so."""
    if Path(model_spec).is_dir():
        files = tokenizer_files(model_spec)
        if "tokenizer.json" in files:
            return files, f"the checkpoint's own {', '.join(sorted(files))}, copied unchanged"
        return {}, ("the checkpoint ships no tokenizer.json: the package takes and returns token ids only "
                    "(copy the model's tokenizer files beside config.json and recompile to include them)")
    if vocab_size == 256:
        return byte_level_files(), "preset: byte-level tokenizer (token id = UTF-8 byte value, vocab 256)"
    return {}, f"preset with vocab_size {vocab_size} has no tokenizer: the package takes token ids only"


def tokenizer_files(folder: str | Path) -> dict[str, bytes]:
    """The tokenizer files a checkpoint folder ships (possibly none), read as bytes."""
    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}


def load(folder: str | Path, vocab_size: int | None = None):
    """(tokenizers.Tokenizer, tokenizer_config dict) from a folder holding tokenizer.json."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json; this package or checkpoint carries no tokenizer "
                             "(use --prompt-ids with token ids instead)")
    return from_files(tokenizer_files(folder), str(folder), vocab_size)


def from_files(files: dict[str, bytes], where: str, vocab_size: int | None = None):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the files' bytes; checks that the ids fit the
    model's vocabulary when vocab_size is given."""
    from tokenizers import Tokenizer
    if "tokenizer.json" not in files:
        raise TokenizerError(f"{where}: no tokenizer.json; use --prompt-ids with token ids instead")
    try:
        tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses for bad files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{where}/tokenizer.json: not a readable tokenizer ({first}); copy it again from "
                             "the checkpoint") from None
    config: dict = {}
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{where}/tokenizer_config.json: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{where}/tokenizer_config.json: expected a JSON object")
    if "chat_template.jinja" in files and "chat_template" not in config:
        config["chat_template"] = files["chat_template.jinja"].decode("utf-8", errors="replace")
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise TokenizerError(f"{where}/tokenizer.json: {tok.get_vocab_size()} tokens, more than the model's "
                             f"vocab_size {vocab_size}; the tokenizer belongs to another model")
    return tok, config


def apply_chat_template(config: dict, text: str) -> str:
    """The prompt for one user message, rendered with the tokenizer's own chat template (Jinja, as
    transformers renders it: `messages`, `add_generation_prompt`, the special tokens as variables)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise TokenizerError("the tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja); "
                             "pass the prompt without --chat")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TokenizerError(f"the chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    try:
        return env.from_string(template).render(messages=[{"role": "user", "content": text}],
                                                add_generation_prompt=True, **special)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template cannot be rendered ({e})") from None
