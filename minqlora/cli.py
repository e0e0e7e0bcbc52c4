"""The `minqlora` command: quantize, finetune, generate, merge, export-gguf, eval, report.

Each subcommand maps its flags onto the library (finetune: one flag per TrainConfig field, same defaults), prints
where it wrote its outputs, and refuses unknown flags. User errors (a missing file, a bad value, an output that
already exists) exit with status 2 and one line naming the flag or file, no traceback; `--traceback` (before the
subcommand) shows it anyway. Ctrl-C exits with 130 (finetune first saves a checkpoint: sft.py).

Leaves out: the work itself (checkpoint.py, sft.py, generate.py, lora.py, gguf_io.py, report.py) and the demo
(scripts/demo.py).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from . import distributed, report as report_mod
from .cli_args import DTYPES, build_parser as _build_parser
from .checkpoint import gguf_io, load_pretrained, save_pretrained
from .data import has_own_chat_template
from .generate import GenerationConfig, stream_text
from .lora import load_adapter, merge_lora, read_adapter_config
from .sft import TrainConfig, run as run_finetune
from .tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, ImportError)


class UsageError(Exception):
    """A flag value that is wrong in a way only visible after parsing (e.g. --device cuda without a GPU)."""


# -- argument types and shared helpers ------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    return device


def load_tokenizer(model: str, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer of a model directory or GGUF file (or of `tokenizer`, a directory or GGUF, when given)."""
    source = Path(tokenizer or model)
    if source.is_file():
        if gguf_io is None:
            raise ImportError(f"{source} is a GGUF file: reading it needs the `gguf` package "
                              "(pip install 'minqlora[gguf]')")
        return gguf_io.load_tokenizer(source)
    return Tokenizer.from_pretrained(source)


def copy_tokenizer(model: str, out_dir: Path) -> list[str]:
    """Put the model's tokenizer files next to a saved checkpoint (converted from the GGUF for a GGUF file)."""
    source = Path(model)
    if source.is_file():
        if gguf_io is None:
            raise ImportError("converting a GGUF tokenizer needs the `gguf` package (pip install 'minqlora[gguf]')")
        gguf_io.export_tokenizer(source, out_dir)
        return ["tokenizer (from GGUF)"]
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
            copied.append(name)
    if not copied:
        print(f"warning: no tokenizer files in {source}; {out_dir} holds the weights only", file=sys.stderr)
    return copied


def check_output(path: Path, overwrite: bool, flag: str) -> None:
    """Refuse to write into a non-empty directory or over a file unless --overwrite."""
    if path.is_file() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{flag} {path} is a non-empty directory; pass --overwrite to write into it")


def load_model(args, quantize: str | None, dtype: torch.dtype | None = torch.bfloat16, **kwargs):
    """load_pretrained(args.model) on --device, then --adapter if the command has one; prints what it loaded."""
    device = resolve_device(args.device)
    if getattr(args, "adapter", None):
        read_adapter_config(args.adapter)  # a bad adapter fails before the model is loaded
    tick = time.perf_counter()
    model = load_pretrained(args.model, quantize=quantize, device=device, dtype=dtype, **kwargs)
    what = f"{quantize.upper()} base" if quantize else "16-bit"
    print(f"loaded {args.model} ({what}) on {device} in {time.perf_counter() - tick:.1f}s", file=sys.stderr)
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter)
        print(f"loaded adapter {args.adapter}", file=sys.stderr)
    return model, device


# -- subcommands ------------------------------------------------------------------------------------------------------

def cmd_quantize(args) -> None:
    out = Path(args.out)
    check_output(out, args.overwrite, "OUT")
    model, _ = load_model(args, args.quant_type, DTYPES[args.dtype], double_quant=args.double_quant,
                          blocksize=args.blocksize)
    save_pretrained(model, out)
    copy_tokenizer(args.model, out)
    print(f"wrote {args.quant_type.upper()}{' + DQ' if args.double_quant else ''} checkpoint "
          f"(bitsandbytes format) to {out}")


def cmd_finetune(args) -> None:
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    fields["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if not fields["lora_targets"]:
        raise UsageError("--targets names no module")
    resolve_device(args.device)  # fail before loading anything
    config = TrainConfig(**fields)
    try:
        result = run_finetune(config)
    finally:
        distributed.shutdown()
    print(f"finished at step {result['step']}: train loss {result['loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""))
    print(f"adapter (PEFT format), metrics.jsonl, loss.png and checkpoints/: {result['adapter_dir']}")


def cmd_generate(args) -> None:
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model, device = load_model(args, args.quantize)
    chat = not args.no_chat and has_own_chat_template(tokenizer)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        stops = tokenizer.stop_ids
    else:
        ids = tokenizer.encode(args.prompt, add_eos=False)
        stops = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                              stop_ids=stops)
    generator = torch.Generator(device).manual_seed(args.seed)
    input_ids = torch.tensor([ids], device=device)
    tick = time.perf_counter()
    for piece in stream_text(model, tokenizer, input_ids, config, generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{'chat' if chat else 'plain'} prompt of {len(ids)} tokens; {time.perf_counter() - tick:.1f}s]",
          file=sys.stderr)


def cmd_merge(args) -> None:
    out = Path(args.out)
    check_output(out, args.overwrite, "--out")
    model, _ = load_model(args, args.quantize, DTYPES[args.dtype])
    merge_lora(model)  # Linear4bit bases become 16-bit nn.Linear holding dequant(W) + ΔW
    save_pretrained(model, out)
    copy_tokenizer(args.model, out)
    print(f"wrote the merged {args.dtype} model (Hugging Face safetensors + tokenizer) to {out}")


def cmd_export_gguf(args) -> None:
    out = Path(args.out)
    check_output(out, args.overwrite, "--out")
    if gguf_io is None:
        raise ImportError("export-gguf needs the `gguf` package (pip install 'minqlora[gguf]')")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model, _ = load_model(args, None, dtype=None)
    tick = time.perf_counter()
    path = gguf_io.export_gguf(model, tokenizer, out, args.dtype, name=args.name)
    print(f"wrote {args.dtype} GGUF ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - tick:.1f}s) "
          f"to {path}")


def eval_examples(args, tokenizer):
    if args.data:
        examples = report_mod.jsonl_examples(tokenizer, args.data, args.seq_len)
    else:
        text = Path(args.text).read_text(encoding="utf-8")
        examples = report_mod.text_examples(tokenizer, text, args.seq_len, source=args.text)
    return report_mod.limit_tokens(examples, args.max_tokens)


def pad_id(tokenizer) -> int:
    return next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)


def cmd_eval(args) -> None:
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    examples = eval_examples(args, tokenizer)
    model, device = load_model(args, args.quantize)
    loss, tokens = report_mod.mean_loss(model, examples, args.batch_size, device, pad_id(tokenizer),
                                        bf16=device.type == "cuda", desc="eval")
    print(f"loss {loss:.4f}  perplexity {math.exp(loss):.4f}  over {tokens} predicted tokens "
          f"({len(examples)} examples from {args.data or args.text})")


def cmd_report(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.model, args.tokenizer) if (args.data or args.text) else None
    examples = eval_examples(args, tokenizer) if tokenizer else None
    model, device = load_model(args, None, dtype)
    result = report_mod.quantization_report(model, args.blocksize, examples, args.batch_size,
                                            pad_id(tokenizer) if tokenizer else 0, bf16=False)
    paths = report_mod.write_report(result, out, title=f"{Path(args.model).name}: 4-bit formats, blocksize "
                                                       f"{args.blocksize}")
    print(report_mod.summary_table(result))
    if examples is None:
        print("(no --data or --text: perplexity not measured)")
    for kind, path in paths.items():
        print(f"{kind}: {path}")


COMMANDS = {"quantize": cmd_quantize, "finetune": cmd_finetune, "generate": cmd_generate, "merge": cmd_merge,
            "export-gguf": cmd_export_gguf, "eval": cmd_eval, "report": cmd_report}


def build_parser():
    """The argparse parser of cli_args.py, wired to the commands above."""
    return _build_parser(COMMANDS)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags: argparse prints usage and exits with 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        args.func(args)
    except UsageError as e:
        print(f"minqlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.traceback:
            raise
        print(f"minqlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nminqlora {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0
