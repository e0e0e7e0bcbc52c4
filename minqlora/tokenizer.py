"""Tokenizers for Hugging Face model directories: sentencepiece `tokenizer.model` or `tokenizer.json`, chat templates.

Covers encode/decode with explicit BOS/EOS control, the special-token ids from tokenizer_config.json /
special_tokens_map.json / the model, and chat templates rendered with jinja2 in a sandbox: the directory's own
template (`chat_template.jinja` or tokenizer_config.json's "chat_template"), else a built-in fallback chosen by the
vocabulary (Llama-3 headers, ChatML, or Llama-2 [INST]).

Leaves out: training tokenizers, GGUF-embedded vocabularies, offsets/alignments, tool-call parsing, and assistant
masks (the `{% generation %}` tag is accepted and rendered as plain text).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2  # a dependency of torch itself, so always present
import jinja2.ext
import sentencepiece
from jinja2.sandbox import ImmutableSandboxedEnvironment

try:
    import tokenizers  # optional extra: only tokenizer.json directories need it
except ImportError:
    tokenizers = None

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # looked for in this order; tokenizer.json knows added tokens
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")  # chat models stop on these as well as on EOS

# Fallback chat templates. Each renders one line per call site; whitespace is exactly what the model was trained on.
# Llama-3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|> (+ assistant header)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML: <|im_start|>user\nHi<|im_end|>\n (+ <|im_start|>assistant\n)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2: <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] More [/INST]
# (the prompt always ends ready for the assistant, so add_generation_prompt changes nothing)
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama-2 chat needs roles alternating user/assistant after an optional system') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + (content | trim) + ' [/INST]' }}"
    "{% else %}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for HF's masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _template_env() -> ImmutableSandboxedEnvironment:
    # Sandboxed: templates come from downloaded model directories and are untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # Special tokens are stored as plain strings or as serialized AddedToken dicts {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


class _SentencePieceBackend:
    """tokenizer.model plus tokenizer_config's added tokens. Control pieces (<s>, </s>) and added tokens found in
    the text become single ids; the text between them is encoded by sentencepiece segment by segment."""

    def __init__(self, path: Path, added: dict[int, str]):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        n = self.sp.get_piece_size()
        specials = {i: self.sp.id_to_piece(i) for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_by_id = {**specials, **added}
        self.id_by_special = {text: i for i, text in self.special_by_id.items()}
        alternatives = sorted(self.id_by_special, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self.vocab_size = max([n - 1, *added]) + 1

    def token_to_id(self, text: str) -> int | None:
        if text in self.id_by_special:
            return self.id_by_special[text]
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None  # piece_to_id answers unk for unknown pieces

    def encode(self, text: str) -> list[int]:
        parts = self.split.split(text) if self.split else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # odd entries are the captured special tokens
                ids.append(self.id_by_special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_by_id])
        out, run = [], []
        for i in ids:
            if i in self.special_by_id:
                out += [self.sp.decode(run), self.special_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def default_adds(self, config: dict, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        # LlamaTokenizer's defaults: BOS on, EOS off, unless tokenizer_config says otherwise.
        return config.get("add_bos_token", True), config.get("add_eos_token", False)


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` package; it recognizes added/special tokens in text itself."""

    def __init__(self, path: Path):
        if tokenizers is None:
            raise ImportError(f"{path} needs the `tokenizers` package: pip install 'minqlora[tokenizers]'")
        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def default_adds(self, config: dict, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        # Without explicit flags, ask the post-processor: does a plain encode gain BOS / EOS?
        ids = self.tok.encode("a", add_special_tokens=True).ids
        add_bos = config.get("add_bos_token", bos_id is not None and ids[:1] == [bos_id])
        add_eos = config.get("add_eos_token", eos_id is not None and ids[-1:] == [eos_id])
        return add_bos, add_eos


class Tokenizer:
    """Text <-> ids for one model, with its special tokens and chat template.

    `encode(text)` adds BOS/EOS the way the model's own tokenizer does by default (tokenizer_config.json's
    add_bos_token / add_eos_token, else the backend's convention); pass add_bos/add_eos to override.
    """

    def __init__(self, backend, special: dict[str, str | None], chat_template: str | None = None,
                 add_bos: bool = True, add_eos: bool = False):
        self.backend = backend
        self.special_tokens = special  # {"bos_token": "<s>", "eos_token": ..., "pad_token": ..., "unk_token": ...}
        ids = {name: backend.token_to_id(text) if text else None for name, text in special.items()}
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id, self.unk_id = ids["pad_token"], ids["unk_token"]
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template or self._fallback_template()
        self._compiled = _template_env().from_string(self.chat_template)

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load from a HF model directory holding tokenizer.json or tokenizer.model (+ optional configs)."""
        root = Path(path)
        found = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"no tokenizer in {root}: looked for {', '.join(TOKENIZER_FILES)}")
        config = _read_json(root / "tokenizer_config.json")
        token_map = _read_json(root / "special_tokens_map.json")
        if found[0].name == "tokenizer.json":
            backend = _TokenizersBackend(found[0])
        else:
            added = {int(i): _token_text(t) for i, t in config.get("added_tokens_decoder", {}).items()}
            backend = _SentencePieceBackend(found[0], added)
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            special[name] = _token_text(config.get(name)) or _token_text(token_map.get(name))
        if isinstance(backend, _SentencePieceBackend):
            # Fall back on the ids baked into the sentencepiece model (-1 means "none").
            sp = backend.sp
            for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()),
                            ("unk_token", sp.unk_id())):
                if special[name] is None and i >= 0:
                    special[name] = sp.id_to_piece(i)
        tok = cls(backend, special, _read_chat_template(root, config))
        tok.add_bos, tok.add_eos = backend.default_adds(config, tok.bos_id, tok.eos_id)
        return tok

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def stop_ids(self) -> set[int]:
        """EOS plus end-of-turn tokens the vocabulary has: what generation should stop on for chat."""
        ids = {self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS} | {self.eos_id}
        return {i for i in ids if i is not None}

    def token_to_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """Render messages [{"role", "content"}, ...]; tokenize=True returns ids (no extra BOS: the template has it).

        Extra keyword arguments (tools, documents, date_string, ...) are passed to the template, like HF's.
        """
        tokens = {name: text or "" for name, text in self.special_tokens.items()}
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**tokens, **kwargs})
        return self.encode(text, add_bos=False, add_eos=False) if tokenize else text

    def _fallback_template(self) -> str:
        # Pick the chat format by which marker tokens exist in the vocabulary.
        if self.backend.token_to_id("<|start_header_id|>") is not None:
            return LLAMA3_TEMPLATE
        if self.backend.token_to_id("<|im_start|>") is not None:
            return CHATML_TEMPLATE
        return LLAMA2_TEMPLATE


def _read_chat_template(root: Path, config: dict) -> str | None:
    """chat_template.jinja (transformers >= 4.47 writes it) over tokenizer_config.json's "chat_template"."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template
