"""The `minqlora` command line's flags: the argparse parser, its argument types, and the help texts with examples.

Split from cli.py (which parses and reports errors) and cli_commands.py (which runs the subcommands): the
declarations alone are about half of the command line. This file imports neither torch nor the rest of the package,
so `minqlora --help` answers at once; finetune's defaults come in as an argument (TrainConfig()). Every argument
error is one line naming the flag, with a pointer to --help (_Parser.error), never argparse's usage block.
Leaves out what the commands do.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DTYPE_NAMES = ("bfloat16", "float16", "float32")
STORAGE_NAMES = ("uint8", "bfloat16", "float16", "float32")  # quant.STORAGE_DTYPES by name
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # quant.BLOCKSIZES
LORA_PATHS = ("fused", "shared-dropout", "reference")  # lora_fused.LORA_PATHS (tests/test_cli.py checks they agree)
DECODE_MODES = ("auto", "eager", "static", "graph", "compile")  # sampling.DECODE_MODES (likewise)
COMMANDS = ("quantize", "finetune", "generate", "merge", "export-gguf", "eval", "report")


# -- argument types: each error message is the part after "argument --flag: " ----------------------------------------

def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}" if not Path(text).exists() else
                                         f"{text} is a directory, not a file")
    return text


def adapter_dir(text: str) -> str:
    """A PEFT adapter directory, or a finetune run directory holding one in adapter/ (what finetune writes)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return str(path / "adapter")
    return text


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends where asked)."""
    def parse(text: str):
        value = _number(text, kind)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, 1)
non_negative_int = _bounded(int, 0)
any_int = _bounded(int)
non_negative_float = _bounded(float, 0.0)
positive_float = _bounded(float, 0.0, low_open=True)
fraction = _bounded(float, 0.0, 1.0, high_open=True)  # [0, 1)
probability_mass = _bounded(float, 0.0, 1.0, low_open=True)  # (0, 1]


def quantize_choice(text: str) -> str | None:
    return None if text == "none" else text


# -- the parser -------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """One line per argument error, naming the flag, and where to read more: argparse's default prints the whole
    usage block first (23 lines for finetune), which buries the one line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written; appends "(default: X)" where a default means something."""

    def _get_help_string(self, action):
        text = action.help or ""
        meaningful = action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0
        if meaningful and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _sub(subs, name: str, help_: str, examples: str):
    return subs.add_parser(name, help=help_, description=help_, formatter_class=_Formatter,
                           epilog="examples:\n" + examples)


def _device_flag(p) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")


def _model_flags(p, adapter: str | None, quantize: bool = True) -> None:
    """--model, --adapter (adapter: "optional", "required" or None), --tokenizer, --quantize, --device."""
    p.add_argument("--model", required=True, type=existing_path, help="HF directory, bnb-4bit directory or GGUF file")
    if adapter:
        p.add_argument("--adapter", required=adapter == "required", type=adapter_dir,
                       help="PEFT LoRA adapter directory (or a finetune --out directory) to apply")
    p.add_argument("--tokenizer", type=existing_path, help="tokenizer directory or GGUF (default: the model's own)")
    if quantize:
        p.add_argument("--quantize", type=quantize_choice, default="nf4", choices=("nf4", "fp4", None),
                       metavar="{nf4,fp4,none}", help="load the projections in 4 bits (as QLoRA trains) or 16-bit")
    _device_flag(p)


def _text_flags(p, required: bool, seq_len: int, max_tokens: int) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--data", type=existing_file, help="JSONL (any fine-tune shape): loss on the trained tokens")
    group.add_argument("--text", type=existing_file, help="plain-text file: loss on every token")
    p.add_argument("--seq-len", type=_bounded(int, 2), default=seq_len, help="tokens per window / example")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--max-tokens", type=non_negative_int, default=max_tokens,
                   help="evaluate the first N tokens (0: all)")


class _FlagGroup:
    """An argument group whose flags show their own name as metavar (--r R, not --r LORA_R)."""

    def __init__(self, parser, title: str):
        self.group = parser.add_argument_group(title)

    def add_argument(self, flag: str, **kwargs):
        if kwargs.get("action") not in ("store_true", "store_false") and "choices" not in kwargs:
            kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        return self.group.add_argument(flag, **kwargs)


def _finetune_flags(p, d) -> None:
    """One flag per TrainConfig field a user tunes; dest is the field, the default is TrainConfig's (d)."""
    io = _FlagGroup(p, "inputs and outputs")
    io.add_argument("--model", dest="model", required=True, type=existing_path,
                    help="base model: HF directory, bnb-4bit directory or GGUF file")
    io.add_argument("--data", dest="data", required=True, type=existing_file, help="training JSONL")
    io.add_argument("--out", dest="output_dir", required=True,
                    help="run directory: adapter/ (the final adapter), checkpoints/, metrics.jsonl, loss.png")
    io.add_argument("--eval-data", dest="eval_data", type=existing_file,
                    help="held-out JSONL (default: hold out --eval-fraction of --data)")
    io.add_argument("--tokenizer", dest="tokenizer", type=existing_path, help="tokenizer directory (default: model's)")
    io.add_argument("--quantize", dest="quantize", type=quantize_choice, default=d.quantize,
                    choices=("nf4", "fp4", None), metavar="{nf4,fp4,none}", help="base model format")
    _device_flag(io)
    ranks = _FlagGroup(p, "ranks (run under torchrun --nproc-per-node N -m minqlora finetune ...)")
    ranks.add_argument("--parallel", dest="parallel", default=d.parallel, choices=("none", "ddp", "fsdp2"),
                       help="none: one process; ddp: 4-bit base on every rank; fsdp2: base sharded per layer")
    ranks.add_argument("--dist-backend", dest="dist_backend", default=d.dist_backend, choices=("auto", "gloo", "nccl"),
                       help="auto: nccl on CUDA, gloo on CPU")
    ranks.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=d.dist_timeout,
                       help="seconds a collective waits before a stuck rank fails the run")
    lora = _FlagGroup(p, "LoRA")
    lora.add_argument("--r", dest="lora_r", type=positive_int, default=d.lora_r, help="adapter rank")
    lora.add_argument("--alpha", dest="lora_alpha", type=positive_float, default=d.lora_alpha, help="scale alpha / r")
    lora.add_argument("--dropout", dest="lora_dropout", type=fraction, default=d.lora_dropout, help="adapter dropout")
    lora.add_argument("--targets", dest="lora_targets", default=",".join(d.lora_targets),
                      help="comma-separated module names to adapt")
    lora.add_argument("--lora-path", dest="lora_path", default=d.lora_path, choices=LORA_PATHS,
                      help="fused: fast, peft's math; shared-dropout: one mask per input; reference: lora.py's")
    data = _FlagGroup(p, "data")
    data.add_argument("--seq-len", dest="seq_len", type=_bounded(int, 2), default=d.seq_len,
                      help="tokens per example")
    data.add_argument("--prompt-format", dest="prompt_format", default=d.prompt_format,
                      choices=("auto", "chat", "plain"), help="how prompt/completion records are rendered")
    data.add_argument("--overflow", dest="overflow", default=d.overflow, choices=("truncate", "drop", "error"),
                      help="examples longer than --seq-len")
    data.add_argument("--packing", dest="packing", action="store_true", help="several examples per row")
    data.add_argument("--eval-fraction", dest="eval_fraction", type=fraction, default=d.eval_fraction,
                      help="share of --data held out when --eval-data is not given")
    opt = _FlagGroup(p, "optimisation")
    opt.add_argument("--batch-size", dest="batch_size", type=positive_int, default=d.batch_size,
                     help="rows per micro-batch of each rank")
    opt.add_argument("--grad-accum", dest="grad_accum", type=positive_int, default=d.grad_accum,
                     help="micro-batches per optimizer step")
    opt.add_argument("--steps", dest="max_steps", type=non_negative_int, default=d.max_steps,
                     help="optimizer steps (0: use --epochs)")
    opt.add_argument("--epochs", dest="epochs", type=positive_float, default=d.epochs, help="passes over the data")
    opt.add_argument("--lr", dest="lr", type=non_negative_float, default=d.lr, help="peak learning rate")
    opt.add_argument("--lr-schedule", dest="lr_schedule", default=d.lr_schedule, choices=("cosine", "constant"),
                     help="after warmup")
    opt.add_argument("--warmup-ratio", dest="warmup_ratio", type=_bounded(float, 0.0, 1.0),
                     default=d.warmup_ratio, help="share of steps warming up")
    opt.add_argument("--weight-decay", dest="weight_decay", type=non_negative_float, default=d.weight_decay,
                     help="AdamW decay")
    opt.add_argument("--optim-bits", dest="optim_bits", type=any_int, default=d.optim_bits, choices=(32, 8),
                     help="optimizer state width")
    opt.add_argument("--paging", dest="paging", type=quantize_choice, default=d.paging,
                     choices=("managed", "host", None), metavar="{managed,host,none}",
                     help="optimizer state paging on CUDA")
    opt.add_argument("--max-grad-norm", dest="max_grad_norm", type=non_negative_float, default=d.max_grad_norm,
                     help="gradient clipping (0: off)")
    opt.add_argument("--precision", dest="precision", default=d.precision, choices=("auto", "bf16", "fp32"),
                     help="auto: bf16 autocast on CUDA")
    opt.add_argument("--checkpointing", dest="gradient_checkpointing", default=d.gradient_checkpointing,
                     choices=("full", "selective", "none"),
                     help="recompute decoder layers in backward: full; selective (keeps attention outputs); none")
    opt.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                     help="same as --checkpointing none (faster, more memory)")
    opt.add_argument("--offload-checkpoints", dest="offload_checkpoints", action="store_true",
                     help="keep checkpointed layer inputs in pinned host memory (long context on CUDA)")
    opt.add_argument("--keep-last-layers", dest="keep_last_layers", type=non_negative_int,
                     default=d.keep_last_layers, help="with checkpointing, the last N layers are not recomputed")
    opt.add_argument("--host-layers", dest="host_layers", type=non_negative_int, default=d.host_layers,
                     help="N layers (the first, or every --host-stride-th) are not recomputed and keep their "
                          "activations in pinned host memory (copies overlap compute on CUDA; with checkpointing "
                          "they may not reach into the last --keep-last-layers)")
    opt.add_argument("--host-prefetch", dest="host_prefetch", type=non_negative_int, default=d.host_prefetch,
                     help="a host layer comes back when the backward of the layer N after it starts (more: fewer "
                          "stalls; with checkpointing, N - 1 layers' activations more at the peak)")
    opt.add_argument("--host-stride", dest="host_stride", type=positive_int, default=d.host_stride,
                     help="park layers 0, N, 2N, ... instead of the first --host-layers in a row: each copy hides "
                          "behind N layers' compute, so N >= 3 (with --host-prefetch below N) keeps about one parked "
                          "layer on the GPU at a time")
    opt.add_argument("--embed-on-host", dest="embed_on_host", action="store_true",
                     help="keep the frozen input embedding in pinned host memory and copy in each batch's rows "
                          "(1 GB less GPU memory at 8B; not for models whose lm_head shares it)")
    opt.add_argument("--loss-chunk", dest="loss_chunk", type=non_negative_int, default=d.loss_chunk,
                     help="tokens per piece of the fused output layer + loss (0: full logits at once)")
    book = _FlagGroup(p, "bookkeeping")
    book.add_argument("--seed", dest="seed", type=any_int, default=d.seed, help="split, order, LoRA init, dropout")
    book.add_argument("--log-every", dest="log_every", type=positive_int, default=d.log_every,
                      help="metrics.jsonl line every N steps")
    book.add_argument("--eval-every", dest="eval_every", type=non_negative_int, default=d.eval_every,
                      help="eval loss every N steps (0: never)")
    book.add_argument("--eval-batches", dest="eval_batches", type=non_negative_int, default=d.eval_batches,
                      help="micro-batches per eval (0: all)")
    book.add_argument("--save-every", dest="checkpoint_every", type=non_negative_int, default=d.checkpoint_every,
                      help="checkpoint every N steps (0: only at the end and on Ctrl-C / SIGTERM)")
    book.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=positive_int, default=d.keep_checkpoints,
                      help="newest checkpoints kept")
    book.add_argument("--resume", dest="resume", action="store_true",
                      help="continue from the newest checkpoint in --out (says so when there is none)")
    book.add_argument("--overwrite", dest="overwrite", action="store_true", help="replace another run in --out")
    book.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def command_in(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not a top-level flag), or None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(train_defaults=None) -> argparse.ArgumentParser:
    """The whole command line. train_defaults: a TrainConfig() for finetune's defaults; without it (`minqlora
    --help`, which must not import torch) the subcommands are listed but have no flags."""
    parser = _Parser(
        prog="minqlora", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="QLoRA written out in full: 4-bit NF4 base models, LoRA adapters, fine-tuning and export.",
        epilog="run `minqlora COMMAND --help` for a command's flags and examples")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    full = train_defaults is not None

    p = _sub(subs, "quantize", "pre-quantize a checkpoint to 4 bits (bitsandbytes-compatible safetensors)",
             "  minqlora quantize ./Llama-3.2-1B ./Llama-3.2-1B-nf4\n"
             "  minqlora quantize model.gguf ./model-fp4 --quant-type fp4 --no-double-quant\n"
             "  minqlora quantize ./Llama-3.2-1B ./l1b-fsdp --quant-storage bfloat16   # FSDP-style storage")
    if full:
        p.add_argument("model", type=existing_path, help="HF directory or GGUF file")
        p.add_argument("out", help="output directory")
        p.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"), help="4-bit data type")
        p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="values per absmax block")
        p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                       help="keep absmax in fp32 (4.5 instead of 4.127 bits per parameter)")
        p.add_argument("--quant-storage", default="uint8", choices=STORAGE_NAMES,
                       help="dtype the packed bytes are stored as (bitsandbytes' bnb_4bit_quant_storage; bfloat16 "
                            "for FSDP, whose shards need one dtype): a view of the same bytes")
        p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                       help="dtype of the weights left 16-bit and of the 4-bit layers' compute")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
        _device_flag(p)

    p = _sub(subs, "finetune", "QLoRA fine-tune: train a LoRA adapter on a JSONL file",
             "  minqlora finetune --model ./SmolLM2-135M-Instruct --data train.jsonl --out runs/a --steps 200\n"
             "  minqlora finetune --model m.gguf --data d.jsonl --out runs/b --epochs 3 --r 8 --lr 1e-4\n"
             "  minqlora finetune --model m.gguf --data d.jsonl --out runs/b --epochs 3 --r 8 --lr 1e-4 --resume\n"
             "  # on a CPU (the demo's settings):\n"
             "  minqlora finetune --model m.gguf --data d.jsonl --out runs/c --steps 150 --seq-len 128 "
             "--batch-size 8 --grad-accum 1 --no-gradient-checkpointing")
    if full:
        _finetune_flags(p, train_defaults)

    p = _sub(subs, "generate", "generate text (chat template applied when the tokenizer has one), streamed",
             "  minqlora generate --model ./SmolLM2-135M-Instruct --prompt 'Name three primes.'\n"
             "  minqlora generate --model m.gguf --adapter runs/a --prompt 'Date: 5 May 2001' --max-new-tokens 16\n"
             "  minqlora generate --model ./base --prompt 'Once upon a time' --no-chat --temperature 0.8 --top-p 0.9\n"
             "  minqlora generate --model ./Llama-3.1-8B-Instruct --prompt 'Name three primes.' --lm-head-4bit")
    if full:
        _model_flags(p, adapter="optional")
        p.add_argument("--prompt", required=True,
                       help="the user message (or raw text with --no-chat; an empty one starts from BOS)")
        p.add_argument("--system", help="a system message (chat only)")
        p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
        p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens to generate at most")
        p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy; > 0: sample")
        p.add_argument("--top-k", type=non_negative_int, default=0, help="sample from the k most likely (0: all)")
        p.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus sampling mass (1: all)")
        p.add_argument("--seed", type=any_int, default=0, help="sampling seed")
        p.add_argument("--decode", default="auto", choices=DECODE_MODES,
                       help="the decode loop: auto (a CUDA graph per token on a GPU, the readable loop on a CPU); "
                            "eager (the readable loop); static (preallocated cache, op by op); graph; compile "
                            "(torch.compile reduce-overhead: on the H200 188.7 tok/s against the graph's 146.8 for "
                            "an 8B model, after a compile that takes its first call)")
        p.add_argument("--lm-head-4bit", action="store_true",
                       help="compute the logits with an NF4 + double-quant copy of the 16-bit output layer, made "
                            "once at start: at 8B it reads 0.27 GB per token instead of 1.05 GB and holds 0.27 GB "
                            "more; the tokens are those of a 4-bit head, so they may differ from the 16-bit head's. "
                            "The fast loop only (not --decode eager; on a CPU, auto runs static with it)")

    p = _sub(subs, "merge", "fold a LoRA adapter into the base weights; save a 16-bit HF checkpoint",
             "  minqlora merge --model ./SmolLM2-135M-Instruct --adapter runs/a --out ./merged\n"
             "  minqlora merge --model m.gguf --adapter runs/a --out ./merged --quantize none --dtype float16")
    p.epilog += ("\n\n--quantize nf4 (default) merges into the dequantized NF4 weights the adapter was trained "
                 "against (QLoRA);\n--quantize none merges into the original 16-bit weights.")
    if full:
        _model_flags(p, adapter="required")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="dtype of the merged weights")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")

    p = _sub(subs, "export-gguf", "export a (merged) model as a GGUF file for llama.cpp",
             "  minqlora export-gguf --model ./merged --out merged.gguf\n"
             "  minqlora export-gguf --model ./merged --out merged.q8_0.gguf --dtype q8_0")
    if full:
        p.add_argument("--model", required=True, type=existing_path,
                       help="HF directory (a merged model) or GGUF file")
        p.add_argument("--out", required=True, help="output .gguf file")
        p.add_argument("--dtype", default="f16", choices=("f16", "bf16", "q8_0", "f32"), help="tensor type")
        p.add_argument("--tokenizer", type=existing_path, help="tokenizer directory (default: the model's)")
        p.add_argument("--name", help="general.name in the GGUF metadata")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        _device_flag(p)

    p = _sub(subs, "eval", "loss and perplexity of a model (optionally with an adapter) on JSONL or text",
             "  minqlora eval --model m.gguf --data data/iso_dates_test.jsonl\n"
             "  minqlora eval --model m.gguf --adapter runs/a --data data/iso_dates_test.jsonl\n"
             "  minqlora eval --model ./base --text wiki.txt --seq-len 512 --max-tokens 20000 --quantize none")
    if full:
        _model_flags(p, adapter="optional")
        _text_flags(p, required=True, seq_len=1024, max_tokens=0)

    p = _sub(subs, "report", "quantization error per layer and perplexity: NF4 vs FP4 vs Int4, +/- DQ",
             "  minqlora report --model m.gguf --text wiki.txt --out reports/smollm2\n"
             "  minqlora report --model ./Llama-3.2-1B --data eval.jsonl --out reports/l1b --blocksize 128\n"
             "  minqlora report --model ./Llama-3.2-1B --out reports/l1b-errors   # errors only, no perplexity")
    if full:
        _model_flags(p, adapter=None, quantize=False)
        _text_flags(p, required=False, seq_len=512, max_tokens=16384)
        p.add_argument("--out", required=True,
                       help="output directory: report.md, summary.csv, layers.csv, report.png")
        p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES,
                       help="values per absmax block (all formats)")
        p.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                       help="dtype of the 16-bit reference model (auto: float32 on CPU, bfloat16 on CUDA)")
    return parser
