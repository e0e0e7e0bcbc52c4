"""Measuring a model: loss / perplexity on text or JSONL, and the quantization report (QLoRA Table 2, in small).

The report quantizes the seven projections of every decoder layer (what QLoRA quantizes; embeddings, norms and
lm_head stay 16-bit) in each 4-bit format, with and without double quantization (DQ), at one blocksize:
- per tensor: relative Frobenius error ||W - Q(W)||_F / ||W||_F and max |W - Q(W)|;
- per format: the perplexity of the whole model with every projection replaced by Q(W) ("fake quantization": the
  dequantized weight in the model's dtype, which is what Linear4bit's gemm_4bit multiplies by), next to the
  16-bit model's. Weights are swapped in place one format at a time; the 16-bit originals are kept in memory.
Formats: NF4 and FP4 through minqlora's kernels (ops.py, bitsandbytes' tables), and Int4 — a REFERENCE-ONLY path
here in plain torch, never a kernel: symmetric absmax integer quantization (Dettmers & Zettlemoyer 2022, the Int4 of
QLoRA Table 2) per block of `blocksize` values, code = round(x / absmax * 7) in [-7, 7] (round half to even, as
torch.round), stored as code + 8 in 4 bits (16 code points; -8 is never produced), decoded as code / 7 * absmax.
Its DQ variant quantizes the absmax vector exactly as NF4's DQ does (quant.double_quantize_ref).

Outputs (write_report): report.md (summary + per-tensor table), summary.csv, layers.csv, report.png.
Leaves out: loading (checkpoint.py), the command line (cli.py), activation quantization, and formats other than
these three.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops, quant
from .checkpoint import PROJECTIONS
from .data import IGNORE_INDEX, Example, iter_batches, read_jsonl, tokenize_records
from .sft import token_loss_sum

try:  # optional extra [plot]: without it the report has no PNG
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

FORMATS = ("nf4", "fp4", "int4")
INT4_LEVELS = 7  # symmetric: codes -7..7 of absmax / 7


@dataclass(frozen=True)
class Variant:
    fmt: str  # "nf4", "fp4" or "int4"
    double_quant: bool  # absmax quantized to 8 bits in blocks of 256 (QLoRA §3)

    @property
    def name(self) -> str:
        return self.fmt.upper() + (" + DQ" if self.double_quant else "")


VARIANTS = tuple(Variant(f, dq) for f in FORMATS for dq in (False, True))


# -- the formats ----------------------------------------------------------------------------------------------------

def int4_roundtrip(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """Reference Int4: blockwise absmax, code = round(x / absmax * 7), decoded as code / 7 * absmax (module docstring).

    w any shape -> same shape and dtype. The last block may be partial (zero padded, like the 4-bit kernels).
    """
    quant.check_blocksize(blocksize)
    x = w.detach().float().reshape(-1)
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % blocksize)).view(-1, blocksize)  # (B, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (B,) float32
    codes = torch.round(blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None] * INT4_LEVELS)
    codes = codes.clamp(-INT4_LEVELS, INT4_LEVELS).to(torch.int8)  # (B, blocksize), stored as codes + 8
    if double_quant:  # the same 8-bit absmax coding as NF4/FP4 with DQ; decoded as quant.decode_absmax_ref does
        absmax_codes, absmax2, offset = quant.double_quantize_ref(absmax)
        absmax = quant.dequantize_blockwise_8bit_ref(absmax_codes, absmax2, quant.DYNAMIC_SIGNED.to(x.device),
                                                     quant.NESTED_BLOCKSIZE)
        absmax = absmax + torch.tensor(offset, dtype=torch.float32, device=x.device)
    out = codes.float() / INT4_LEVELS * absmax[:, None]
    return out.reshape(-1)[:n].view(w.shape).to(w.dtype)


def roundtrip(w: torch.Tensor, variant: Variant, blocksize: int = 64) -> torch.Tensor:
    """dequantize(quantize(w)) in `variant`: same shape and dtype as w."""
    if variant.fmt == "int4":
        return int4_roundtrip(w, blocksize, variant.double_quant)
    packed, state = ops.quantize_4bit(w.detach(), blocksize, variant.fmt, variant.double_quant)
    return ops.dequantize_4bit(packed, state)


def bits_per_param(blocksize: int, double_quant: bool) -> float:
    """4-bit codes plus the absmax: fp32 per block, or (DQ) 8 bits per block + fp32 per 256 blocks."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * quant.NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error), computed in float32."""
    diff = w.detach().float() - w_hat.detach().float()
    norm = w.detach().float().norm()
    rel = float(diff.norm() / norm) if norm > 0 else float(diff.norm())
    return rel, float(diff.abs().max()) if diff.numel() else 0.0


def quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The 16-bit projections QLoRA quantizes: name -> nn.Linear, in model order."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS}
    if not found:
        raise ValueError("the model has no 16-bit projections to quantize (load it with quantize=None)")
    return found


# -- loss and perplexity ----------------------------------------------------------------------------------------------

def text_examples(tokenizer, text: str, seq_len: int, source: str = "text") -> list[Example]:
    """Plain text -> windows of at most seq_len tokens (BOS + text + EOS, cut without overlap); every token is
    predicted except each window's first."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer.encode(text, add_eos=True)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    out = [Example(w, [IGNORE_INDEX, *w[1:]], f"{source}[{k}]") for k, w in enumerate(windows) if len(w) > 1]
    if not out:
        raise ValueError(f"{source}: too little text to predict anything ({len(ids)} tokens)")
    return out


def jsonl_examples(tokenizer, path, seq_len: int) -> list[Example]:
    """A JSONL file (any shape data.py reads) -> Examples with labels on the tokens a fine-tune would train."""
    examples, _ = tokenize_records(read_jsonl(path), path, tokenizer, seq_len)
    return examples


def limit_tokens(examples: list[Example], max_tokens: int) -> list[Example]:
    """The leading examples holding at most max_tokens tokens (at least one); 0 keeps all."""
    if not max_tokens:
        return examples
    kept, total = [], 0
    for ex in examples:
        if kept and total + len(ex.input_ids) > max_tokens:
            break
        kept.append(ex)
        total += len(ex.input_ids)
    return kept


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, device, pad_id: int, bf16: bool = False,
              desc: str | None = "loss") -> tuple[float, int]:
    """(mean next-token cross-entropy per predicted token, predicted tokens). Perplexity is exp of the first."""
    model.eval()
    rows = [[ex] for ex in examples]
    total, tokens = torch.zeros((), device=device), 0
    batches = iter_batches(rows, batch_size, pad_id)
    for batch in tqdm(batches, total=math.ceil(len(rows) / batch_size), desc=desc, disable=desc is None,
                      unit="batch", leave=False):
        total += token_loss_sum(model, batch, torch.device(device), bf16)
        tokens += batch.num_label_tokens
    return total.item() / max(tokens, 1), tokens  # SYNC: once per evaluation


# -- the report -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def quantization_report(model, blocksize: int = 64, examples: list[Example] | None = None, batch_size: int = 4,
                        pad_id: int = 0, bf16: bool = False, variants=VARIANTS, progress: bool = True) -> dict:
    """Errors per tensor and variant, and (with examples) perplexity per variant and for the 16-bit model.

    Returns {"layers": [{"tensor", "shape", "<variant>/rel_error", "<variant>/max_abs_error", ...}],
    "summary": [{"format", "double_quant", "bits_per_param", "rel_error", "mean_rel_error", "max_abs_error",
    "loss", "perplexity"}]} with the 16-bit model first in summary ("bf16"/"fp32"... as its dtype).
    The model comes back with its original weights.
    """
    linears = quantizable(model)
    device = next(model.parameters()).device
    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    layers = [{"tensor": f"{name}.weight", "shape": "x".join(map(str, m.weight.shape))} for name, m in linears.items()]
    dtype = next(iter(originals.values())).dtype
    summary = [{"format": str(dtype).removeprefix("torch."), "double_quant": False,
                "bits_per_param": 8 * dtype.itemsize, "rel_error": 0.0, "mean_rel_error": 0.0, "max_abs_error": 0.0}]
    if examples:
        summary[0]["loss"], _ = mean_loss(model, examples, batch_size, device, pad_id, bf16,
                                          "perplexity 16-bit" if progress else None)
    try:
        for variant in variants:
            sq_err = sq_norm = 0.0
            rels, max_abs = [], 0.0
            bar = tqdm(list(linears.items()), desc=f"quantize {variant.name}", disable=not progress, unit="tensor",
                       leave=False)
            for row, (name, m) in zip(layers, bar):
                w = originals[name]
                w_hat = roundtrip(w, variant, blocksize)
                rel, mx = weight_error(w, w_hat)
                row[f"{variant.name}/rel_error"], row[f"{variant.name}/max_abs_error"] = rel, mx
                norm2 = float(w.float().norm()) ** 2
                sq_err, sq_norm = sq_err + rel * rel * norm2, sq_norm + norm2
                rels.append(rel)
                max_abs = max(max_abs, mx)
                m.weight.copy_(w_hat)
            entry = {"format": variant.fmt, "double_quant": variant.double_quant,
                     "bits_per_param": bits_per_param(blocksize, variant.double_quant),
                     "rel_error": math.sqrt(sq_err / sq_norm) if sq_norm else 0.0,
                     "mean_rel_error": sum(rels) / len(rels), "max_abs_error": max_abs}
            if examples:
                entry["loss"], _ = mean_loss(model, examples, batch_size, device, pad_id, bf16,
                                             f"perplexity {variant.name}" if progress else None)
            summary.append(entry)
    finally:
        for name, m in linears.items():
            m.weight.copy_(originals[name])
    for entry in summary:
        if "loss" in entry:
            entry["perplexity"] = math.exp(entry["loss"])
    return {"blocksize": blocksize, "layers": layers, "summary": summary}


def _variant_label(entry: dict) -> str:
    if entry["format"] not in FORMATS:
        return f"{entry['format']} (unquantized)"
    return entry["format"].upper() + (" + DQ" if entry["double_quant"] else "")


def summary_table(report: dict) -> str:
    """The summary as a markdown table (also what the CLI prints)."""
    has_ppl = any("perplexity" in e for e in report["summary"])
    head = ["format", "bits/param", "rel. Frobenius error", "mean per-tensor rel. error", "max abs error"]
    head += ["loss", "perplexity"] if has_ppl else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in report["summary"]:
        cells = [_variant_label(e), f"{e['bits_per_param']:.3f}", f"{e['rel_error']:.4f}",
                 f"{e['mean_rel_error']:.4f}", f"{e['max_abs_error']:.4f}"]
        if has_ppl:
            cells += [f"{e['loss']:.4f}", f"{e['perplexity']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layers_table(report: dict) -> str:
    """Per-tensor relative Frobenius errors, one column per variant, as markdown."""
    names = [v.name for v in VARIANTS if f"{v.name}/rel_error" in report["layers"][0]]
    lines = ["| tensor | shape | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in report["layers"]:
        lines.append(f"| {row['tensor']} | {row['shape']} | "
                     + " | ".join(f"{row[n + '/rel_error']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def plot_report(report: dict, png: Path, title: str = "") -> Path | None:
    """Left: relative error per tensor for each variant; right: perplexity per format (when measured)."""
    if Figure is None:
        return None
    has_ppl = any("perplexity" in e for e in report["summary"])
    fig = Figure(figsize=(12 if has_ppl else 8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if has_ppl else 1, 1)
    styles = {"nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:green"}
    for v in VARIANTS:
        key = f"{v.name}/rel_error"
        if key in report["layers"][0]:
            ax.plot([row[key] for row in report["layers"]], color=styles[v.fmt], linestyle="-" if v.double_quant
                    else ":", linewidth=1, label=v.name)
    ax.set(xlabel="tensor (model order)", ylabel="relative Frobenius error",
           title=f"per-tensor error, blocksize {report['blocksize']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_ppl:
        ax2 = fig.add_subplot(1, 2, 2)
        entries = [e for e in report["summary"] if "perplexity" in e]
        labels = [_variant_label(e) for e in entries]
        colors = [styles.get(e["format"], "tab:gray") for e in entries]
        bars = ax2.bar(range(len(entries)), [e["perplexity"] for e in entries], color=colors)
        ax2.bar_label(bars, fmt="%.2f", fontsize=8)
        ax2.set_xticks(range(len(entries)), labels, rotation=30, ha="right", fontsize=8)
        ax2.set(ylabel="perplexity", title="perplexity on the eval text")
        ax2.set_ylim(bottom=min(e["perplexity"] for e in entries) * 0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = png.with_name(f".tmp-{png.name}")
    fig.savefig(tmp, format="png")
    tmp.replace(png)
    return png


def write_report(report: dict, out_dir, title: str = "minqlora quantization report") -> dict[str, Path]:
    """report.md, summary.csv, layers.csv and report.png (without matplotlib: no PNG) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "summary_csv": out / "summary.csv", "layers_csv": out / "layers.csv"}
    has_ppl = any("perplexity" in e for e in report["summary"])
    scope = ("errors are over the seven projections of every decoder layer"
             + ("; the perplexity rows quantize all of them at once" if has_ppl else ""))
    text = (f"# {title}\n\nBlocksize {report['blocksize']}; {scope}. Int4 is the reference absmax integer format "
            "(minqlora/report.py).\n\n" + summary_table(report) + "\n\n## Per tensor: relative Frobenius error\n\n"
            + layers_table(report) + "\n")
    tmp = paths["markdown"].with_name(".tmp-report.md")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(paths["markdown"])
    _write_csv(paths["summary_csv"], report["summary"])
    _write_csv(paths["layers_csv"], report["layers"])
    png = plot_report(report, out / "report.png", title)
    if png is not None:
        paths["png"] = png
    return paths
