"""Tokenizers between GGUF metadata and Hugging Face tokenizer files.

GGUF -> files (`write_tokenizer_files`): tokenizer.ggml.model "llama" (sentencepiece BPE: tokens, scores, types)
becomes a `tokenizer.model`, a sentencepiece ModelProto serialized here by hand (protobuf is not a dependency; the
field numbers are sentencepiece_model.proto's); "gpt2" (byte-level BPE: tokens, merges, types and the pre-tokenizer
name) becomes a `tokenizer.json` for the `tokenizers` package. Both come with a tokenizer_config.json holding the
special tokens, the BOS/EOS flags and the chat template, so `Tokenizer.from_pretrained` (tokenizer.py) loads them.
Files -> GGUF (`vocab_from_tokenizer`, `add_to_writer`): the reverse, from tokenizer.model or a byte-level
tokenizer.json, with the keys llama.cpp's converter writes.

Split from gguf_io.py because vocabularies are their own concern (two formats each way, a protobuf codec) and
gguf_io.py would otherwise pass 500 lines. Leaves out: other GGUF vocab types (bert, t5, rwkv), tokenizer.json files
holding a sentencepiece-style BPE without a tokenizer.model, and pre-tokenizers other than llama-bpe / gpt-2 / smollm
(exported as llama.cpp's "default" with a warning).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf

from .tokenizer import Tokenizer

T = gguf.TokenType  # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: sentencepiece's numbering too
# Pre-tokenizer regexes, as Llama-3's tokenizer.json and GPT-2's byte-level BPE spell them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_NAMES = ("bos", "eos", "unk", "pad")
GGUF_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


@dataclass
class Vocab:
    """A tokenizer as GGUF stores it."""
    model: str                         # "llama" (sentencepiece BPE) or "gpt2" (byte-level BPE)
    tokens: list[str]                  # one per id
    types: list[int]                   # gguf.TokenType per id
    scores: list[float] | None = None  # sentencepiece piece scores (merge priority); llama only
    merges: list[str] | None = None    # "a b" merge rules in priority order; gpt2 only
    pre: str = "default"               # llama.cpp's pre-tokenizer name (gpt2)
    ids: dict | None = None            # {"bos": id or None, "eos", "unk", "pad"}
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True      # sentencepiece normalizer flags (llama only)
    remove_extra_whitespaces: bool = False
    charsmap: bytes = b""
    chat_template: str | None = None


# -- a minimal protobuf codec: varints, length-delimited fields and float32 are all sentencepiece models use --------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields (pad_id = -1) are 10-byte two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, (bool, int)):
        return _varint(num << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return n, i


def _parse(buf: bytes) -> list[tuple[int, object]]:
    """[(field number, int | bytes)] of one message; fixed32 values stay as their 4 bytes."""
    fields, i = [], 0
    try:
        while i < len(buf):
            key, i = _read_varint(buf, i)
            wire = key & 7
            if wire == 0:
                value, i = _read_varint(buf, i)
            elif wire == 2:
                size, i = _read_varint(buf, i)
                value, i = buf[i:i + size], i + size
            elif wire in (1, 5):
                width = 8 if wire == 1 else 4
                value, i = buf[i:i + width], i + width
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            fields.append((key >> 3, value))
    except IndexError:
        raise ValueError("truncated protobuf message") from None
    return fields


# -- GGUF -> files ------------------------------------------------------------------------------------------------

def _spm_model_proto(v: Vocab) -> bytes:
    """A sentencepiece ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    unk = v.ids.get("unk")
    if unk is None:
        unk = next((i for i, t in enumerate(v.types) if t == T.UNKNOWN), None)
    if unk is None:
        raise ValueError("a sentencepiece vocabulary needs an unknown token; this GGUF names none")
    pieces = b"".join(_field(1, _field(1, tok) + _field(2, float(score)) + _field(3, int(ty)))
                      for tok, score, ty in zip(v.tokens, v.scores, v.types))
    # trainer_spec: model_type 3 (BPE = 2), vocab_size 4, byte_fallback 35, unk/bos/eos/pad ids 40-43 and pieces
    # 45-48 (sentencepiece answers bos_id() by looking up bos_piece).
    trainer = _field(3, 2) + _field(4, len(v.tokens)) + _field(35, T.BYTE in v.types)
    for k, name in enumerate(("unk", "bos", "eos", "pad")):
        i = unk if name == "unk" else v.ids.get(name)
        trainer += _field(40 + k, -1 if i is None else i)
        if i is not None:
            trainer += _field(45 + k, v.tokens[i])
    # normalizer_spec: name 1, precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4,
    # escape_whitespaces 5 (spaces become U+2581).
    normalizer = (_field(1, "identity") + (_field(2, v.charsmap) if v.charsmap else b"")
                  + _field(3, v.add_space_prefix) + _field(4, v.remove_extra_whitespaces) + _field(5, True))
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _pre_tokenizer_json(pre: str) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "llama-bpe":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    if pre == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (llama-bpe, gpt-2, smollm, default)")


def _tokenizer_json(v: Vocab) -> dict:
    special = {T.CONTROL, T.USER_DEFINED, T.UNKNOWN}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty != T.USER_DEFINED} for i, (t, ty) in enumerate(zip(v.tokens, v.types)) if ty in special]
    template, specials = [{"Sequence": {"id": "A", "type_id": 0}}], {}
    for name, at in (("bos", 0), ("eos", None)):
        i = v.ids.get(name)
        if i is not None and (v.add_bos if name == "bos" else v.add_eos):
            piece = {"SpecialToken": {"id": v.tokens[i], "type_id": 0}}
            template = [piece, *template] if at == 0 else [*template, piece]
            specials[v.tokens[i]] = {"id": v.tokens[i], "ids": [i], "tokens": [v.tokens[i]]}
    post = {"type": "TemplateProcessing", "single": template, "pair": template + [
        {"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": specials} if specials else None
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(v.pre), "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # llama.cpp's llama-bpe emits a whole pre-token that is itself in the vocabulary (Llama-3 does)
                  "ignore_merges": v.pre == "llama-bpe",
                  "vocab": {t: i for i, t in enumerate(v.tokens)}, "merges": v.merges or []},
    }


def vocab_from_gguf(reader: gguf.GGUFReader, source) -> Vocab:
    def get(key, default=None):
        f = reader.get_field(key)
        return default if f is None else f.contents()

    model = get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{source}: holds no tokenizer (no 'tokenizer.ggml.model' key)")
    if model not in ("llama", "gpt2"):
        raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported (llama, gpt2)")
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source}: 'tokenizer.ggml.tokens' is missing or empty")
    n = len(tokens)
    ids = {name: get(f"tokenizer.ggml.{key}") for name, key in GGUF_ID_KEYS.items()}
    for name, i in ids.items():
        if i is not None and not 0 <= i < n:
            raise ValueError(f"{source}: tokenizer.ggml.{GGUF_ID_KEYS[name]} = {i} is outside the {n} tokens")
    return Vocab(model=model, tokens=tokens, types=get("tokenizer.ggml.token_type") or [T.NORMAL] * n,
                 scores=get("tokenizer.ggml.scores") or [0.0] * n, merges=get("tokenizer.ggml.merges"),
                 pre=get("tokenizer.ggml.pre") or "default", ids=ids,
                 add_bos=bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
                 add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
                 add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
                 remove_extra_whitespaces=bool(get("tokenizer.ggml.remove_extra_whitespaces", False)),
                 charsmap=bytes(get("tokenizer.ggml.precompiled_charsmap") or b""),
                 chat_template=get("tokenizer.chat_template"))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir, source="GGUF") -> Path:
    """tokenizer.model or tokenizer.json, plus tokenizer_config.json, in out_dir (created; stale files removed)."""
    v = vocab_from_gguf(reader, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if v.model == "llama":
        name, data = "tokenizer.model", _spm_model_proto(v)
    else:
        name, data = "tokenizer.json", json.dumps(_tokenizer_json(v), ensure_ascii=False).encode()
    config = {f"{k}_token": v.tokens[i] for k, i in v.ids.items() if i is not None}
    config.update(add_bos_token=v.add_bos, add_eos_token=v.add_eos)
    if v.chat_template:
        config["chat_template"] = v.chat_template
    _write_atomic(out / name, data)
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False).encode())
    # tokenizer.py prefers tokenizer.json: one left over from another GGUF in this directory would win.
    for stale in {"tokenizer.model", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json"} - {name}:
        (out / stale).unlink(missing_ok=True)
    return out


# -- files -> GGUF ------------------------------------------------------------------------------------------------

def _vocab_from_spm(data: bytes) -> Vocab:
    tokens, scores, types, normalizer = [], [], [], {}
    for num, value in _parse(data):
        if num == 1:  # SentencePiece: piece 1, score 2 (float32), type 3 (default NORMAL)
            piece = dict(_parse(value))
            tokens.append(bytes(piece.get(1, b"")).decode("utf-8"))
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(int(piece.get(3, T.NORMAL)))
        elif num == 3:
            normalizer = dict(_parse(value))
    if not tokens:
        raise ValueError("tokenizer.model holds no pieces")
    # proto defaults: add_dummy_prefix and remove_extra_whitespaces are true unless stored
    return Vocab("llama", tokens, types, scores=scores, add_space_prefix=bool(normalizer.get(3, 1)),
                 remove_extra_whitespaces=bool(normalizer.get(4, 1)), charsmap=bytes(normalizer.get(2, b"")))


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer it knows; "default" (with a warning) otherwise."""
    items = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [p.get("type") for p in items]
    if kinds == ["Split", "ByteLevel"] and items[0]["pattern"].get("Regex") == LLAMA3_REGEX \
            and not items[1].get("use_regex", True):
        return "llama-bpe"
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    warnings.warn(f"tokenizer.json pre-tokenizer {kinds} has no llama.cpp name; writing 'default', which llama.cpp "
                  "may split differently")
    return "default"


def _vocab_from_tokenizer_json(tj: dict) -> Vocab:
    model = tj.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise ValueError("tokenizer.json is not a byte-level BPE (a sentencepiece-style vocabulary needs its "
                         "tokenizer.model to export to GGUF)")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    n = max([*model["vocab"].values(), *added]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [T.UNUSED] * n  # ids the file skips stay placeholders
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, T.NORMAL
    for i, a in added.items():
        tokens[i], types[i] = a["content"], T.CONTROL if a.get("special") else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab("gpt2", tokens, types, merges=merges, pre=_pre_name(tj.get("pre_tokenizer")))


def _added_tokens(root: Path) -> dict[int, tuple[str, bool]]:
    """{id: (text, special)} from tokenizer_config.json's added_tokens_decoder or tokenizer.json's added_tokens."""
    config = root / "tokenizer_config.json"
    decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config.is_file() else {}
    found = {int(i): (a["content"], bool(a.get("special", True))) for i, a in decoder.items()}
    if (root / "tokenizer.json").is_file():
        for a in json.loads((root / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", []):
            found.setdefault(a["id"], (a["content"], bool(a.get("special", True))))
    return found


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> Vocab:
    """The Vocab of a tokenizer directory (tokenizer.model preferred: it is what llama.cpp's "llama" vocab is) or of
    a loaded minqlora Tokenizer, padded with unused "[PAD<i>]" tokens to the model's vocab_size."""
    if isinstance(tokenizer, (str, os.PathLike)):
        root = Path(tokenizer)
        tok = Tokenizer.from_pretrained(root)
        if (root / "tokenizer.model").is_file():
            v, added = _vocab_from_spm((root / "tokenizer.model").read_bytes()), _added_tokens(root)
        else:
            v, added = _vocab_from_tokenizer_json(json.loads((root / "tokenizer.json").read_text("utf-8"))), {}
        jinja = root / "chat_template.jinja"
        config = root / "tokenizer_config.json"
        template = jinja.read_text("utf-8") if jinja.is_file() else (
            json.loads(config.read_text("utf-8")).get("chat_template") if config.is_file() else None)
        v.chat_template = template if isinstance(template, str) else None
    else:
        tok, backend = tokenizer, getattr(tokenizer, "backend", None)
        if hasattr(backend, "sp"):
            v = _vocab_from_spm(backend.sp.serialized_model_proto())
            added = {i: (t, True) for i, t in backend.special_by_id.items()}
        elif hasattr(backend, "tok"):
            v, added = _vocab_from_tokenizer_json(json.loads(backend.tok.to_str())), {}
        else:
            raise TypeError(f"tokenizer must be a directory or a minqlora Tokenizer, got {type(tokenizer).__name__}")
        v.chat_template = tok.chat_template
    for i, (text, special) in sorted(added.items()):  # added tokens past the sentencepiece pieces
        if i >= len(v.tokens):
            v.tokens += [f"[PAD{j}]" for j in range(len(v.tokens), i)]
            v.types += [T.UNUSED] * (i - len(v.types))
            v.tokens.append(text)
            v.types.append(T.CONTROL if special else T.USER_DEFINED)
    if len(v.tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(v.tokens)} tokens but the model's vocab_size is {vocab_size}")
    pad = range(len(v.tokens), vocab_size)  # llama.cpp requires one token per embedding row
    v.tokens += [f"[PAD{i}]" for i in pad]
    v.types += [T.UNUSED] * len(pad)
    if v.scores is not None:
        v.scores += [0.0] * (len(v.tokens) - len(v.scores))
    v.ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    v.add_bos, v.add_eos = bool(tok.add_bos), bool(tok.add_eos)
    return v


def add_to_writer(writer: gguf.GGUFWriter, v: Vocab) -> None:
    """The tokenizer.* keys llama.cpp's converter writes for this vocabulary."""
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    if v.model == "llama":
        writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    if v.merges:
        writer.add_token_merges(v.merges)
    for name, i in v.ids.items():
        if i is not None:
            writer.add_uint32(f"tokenizer.ggml.{GGUF_ID_KEYS[name]}", i)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.model == "llama":
        writer.add_add_space_prefix(v.add_space_prefix)
        writer.add_remove_extra_whitespaces(v.remove_extra_whitespaces)
        if v.charsmap:
            writer.add_precompiled_charsmap(v.charsmap)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
