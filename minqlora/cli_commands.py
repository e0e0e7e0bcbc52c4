"""The subcommands of `minqlora`: quantize, finetune, generate, merge, export-gguf, eval, report.

Each maps its parsed flags (cli_args.py) onto the library (finetune: one flag per TrainConfig field, same defaults)
and prints where it wrote its outputs. Whatever can be checked before a model loads is checked first (outputs,
data records, sampling settings), and every refusal names the flag or file as the user typed it: cli.py prints it as
one line and exits with 2. This module imports torch and the package; cli.py imports it only once a subcommand is
named, so `minqlora --help` stays fast.

Leaves out: parsing and error reporting (cli.py, cli_args.py), the work itself (checkpoint.py, sft.py, generate.py,
lora.py, gguf_io.py, report.py) and the demo (scripts/demo.py).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from . import distributed, report as report_mod
from .checkpoint import gguf_io, load_pretrained, save_pretrained
from .data import has_own_chat_template, read_jsonl, record_shape, split_eval
from .decode import Decoder
from .generate import GenerationConfig, stream_text
from .lora import load_adapter, merge_lora, read_adapter_config
from .lora_fused import set_lora_path
from .sft import TrainConfig, run as run_finetune
from .sft_state import check_output_dir
from .tokenizer import Tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORAGE = {"uint8": torch.uint8, **DTYPES}
TRAIN_DEFAULTS = TrainConfig()  # finetune's flag defaults (cli_args.build_parser)
# What one CPU training step costs, from the demo (README): SmolLM2-135M on 2 cores, ≈310 tokens/s.
CPU_TOKENS_PER_S = 310
CPU_RECIPE = "--seq-len 128 --batch-size 8 --grad-accum 1 --no-gradient-checkpointing"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


class UsageError(Exception):
    """A flag value that is wrong in a way only visible after parsing (e.g. --device cuda without a GPU)."""


def _flag_for(path, flag: str) -> str:
    return f"{flag} {path}" if flag.startswith("-") else str(path)


# -- shared helpers ------------------------------------------------------------------------------------------------

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


def check_output(text: str, overwrite: bool, flag: str, kind: str = "dir") -> Path:
    """The output `flag` names (`text` as typed): kind "dir" (created, parents too) or "file" (its folder must
    exist). Refuses the wrong kind, and an existing output unless --overwrite, before any work starts."""
    path = Path(text)
    where = _flag_for(text, flag)
    if kind == "dir":
        if path.exists() and not path.is_dir():
            raise UsageError(f"{where} is a file; it must name a directory (to be created or empty)")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise UsageError(f"{where} is a non-empty directory; pass --overwrite to write into it")
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"{where}: {blocker} is a file, so the directory cannot be created")
    else:
        if path.is_dir():
            raise UsageError(f"{where} is a directory; it must name a file")
        if path.exists() and not overwrite:
            raise UsageError(f"{where} already exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise UsageError(f"{where}: the folder {path.parent} does not exist")
    return path


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
        # The fast branch (lora_fused.py): siblings share one x·Aᵀ, and without autograd the cast adapter weights are
        # kept, which is what makes an unmerged adapter cheap in a decode step.
        set_lora_path(model, "fused")
        print(f"loaded adapter {args.adapter}", file=sys.stderr)
    return model, device


# -- subcommands ------------------------------------------------------------------------------------------------------

def cmd_quantize(args) -> None:
    out = check_output(args.out, args.overwrite, "OUT")
    model, _ = load_model(args, args.quant_type, DTYPES[args.dtype], double_quant=args.double_quant,
                          blocksize=args.blocksize, quant_storage=STORAGE[args.quant_storage])
    save_pretrained(model, out)
    copy_tokenizer(args.model, out)
    storage = f", {args.quant_storage} storage" if args.quant_storage != "uint8" else ""
    print(f"wrote {args.quant_type.upper()}{' + DQ' if args.double_quant else ''} checkpoint "
          f"(bitsandbytes format{storage}) to {out}")


def check_data(path: str, flag: str, eval_fraction: float | None) -> None:
    """Every record of a JSONL file has a shape finetune knows (errors name the file and line), and, when
    eval_fraction is given, enough records to hold that share out: before any model loads."""
    records = read_jsonl(path)
    for line, record in records:
        record_shape(record, f"{path}:{line}")
    if eval_fraction:
        try:
            split_eval(records, eval_fraction, seed=0)
        except ValueError:
            raise UsageError(f"{flag} {path} has {len(records)} record{'s' * (len(records) != 1)}: too few to hold "
                             f"out --eval-fraction {eval_fraction} (pass --eval-data FILE or --eval-fraction 0)") \
                from None


def cpu_cost_note(config: TrainConfig) -> str | None:
    """On a CPU, a line saying what a step of these settings costs when it is far from the demo's."""
    tokens = config.seq_len * config.batch_size * config.grad_accum  # at most, per optimizer step
    if tokens <= 4096:
        return None
    return (f"note: training on the CPU with up to {tokens:,} tokens per step (--seq-len {config.seq_len} x "
            f"--batch-size {config.batch_size} x --grad-accum {config.grad_accum}); at the demo's ≈{CPU_TOKENS_PER_S} "
            f"tokens/s on 2 cores that is up to {tokens / CPU_TOKENS_PER_S:.0f} s per step for a 135M model"
            f"{' (more with gradient checkpointing)' if config.gradient_checkpointing else ''}. "
            f"The CPU recipe: {CPU_RECIPE}")


def cmd_finetune(args) -> None:
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    fields["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if not fields["lora_targets"]:
        raise UsageError("--targets names no module")
    device = resolve_device(args.device)  # fail before loading anything
    config = TrainConfig(**fields)
    check_output(args.output_dir, True, "--out")  # a directory (another run in it: check_output_dir below)
    check_output_dir(Path(config.output_dir), config)
    check_data(config.data, "--data", None if config.eval_data else config.eval_fraction)
    if config.eval_data:
        check_data(config.eval_data, "--eval-data", None)
    if device.type == "cpu" and (note := cpu_cost_note(config)):
        print(note, file=sys.stderr)
    try:
        result = run_finetune(config)
    finally:
        distributed.shutdown()
    print(f"finished at step {result['step']}: train loss {result['loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""))
    print(f"adapter (PEFT format): {result['adapter_dir']}; metrics.jsonl, loss.png and checkpoints/ beside it in "
          f"{config.output_dir}")


def prompt_ids(args, tokenizer) -> tuple[list[int], set[int], bool]:
    """(token ids, stop ids, chat?) of --prompt. An empty plain prompt starts from the BOS token, as unconditional
    sampling does; a tokenizer without one has nothing to start from, and that is refused."""
    chat = not args.no_chat and has_own_chat_template(tokenizer)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        stops = tokenizer.stop_ids
    else:
        ids = tokenizer.encode(args.prompt, add_eos=False)
        stops = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if not ids:
        if tokenizer.bos_id is None:
            raise UsageError("--prompt is empty and the tokenizer has no BOS token to start from; give some text")
        ids = [tokenizer.bos_id]
    return ids, stops, chat


def cmd_generate(args) -> None:
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    ids, stops, chat = prompt_ids(args, tokenizer)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                              stop_ids=stops, decode=args.decode)
    if args.decode == "graph" and (where := resolve_device(args.device)).type != "cuda":  # before loading anything
        raise UsageError(f"--decode graph needs a CUDA device; this run is on {where} (use auto, static or eager)")
    if args.lm_head_4bit and args.decode == "eager":  # the readable loop calls the model's own head
        raise UsageError("--lm-head-4bit runs in the fast decode loop; it does not apply to --decode eager "
                         "(use auto, static, graph or compile)")
    model, device = load_model(args, args.quantize)
    # A Decoder of our own only to give it the 4-bit head; otherwise stream_text picks the loop from --decode.
    decoder = (Decoder(model, 1, len(ids) + args.max_new_tokens, args.decode, lm_head_4bit=True)
               if args.lm_head_4bit else None)
    generator = torch.Generator(device).manual_seed(args.seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    tick = time.perf_counter()
    for piece in stream_text(model, tokenizer, input_ids, config, generator, decoder):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{'chat' if chat else 'plain'} prompt of {len(ids)} tokens; {time.perf_counter() - tick:.1f}s]",
          file=sys.stderr)


def cmd_merge(args) -> None:
    out = check_output(args.out, args.overwrite, "--out")
    model, _ = load_model(args, args.quantize, DTYPES[args.dtype])
    merge_lora(model)  # Linear4bit bases become 16-bit nn.Linear holding dequant(W) + ΔW
    save_pretrained(model, out)
    copy_tokenizer(args.model, out)
    print(f"wrote the merged {args.dtype} model (Hugging Face safetensors + tokenizer) to {out}")


def cmd_export_gguf(args) -> None:
    out = check_output(args.out, args.overwrite, "--out", kind="file")
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
    out = check_output(args.out, True, "--out")  # report files are replaced
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
