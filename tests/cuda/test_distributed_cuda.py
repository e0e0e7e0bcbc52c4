"""--parallel ddp and fsdp2 on one GPU (NCCL, one process under torchrun): QLoRA steps with the losses of
--parallel none, through benchmarks/bench_distributed.py on a small shape (the 8B shape is the benchmark's default,
for the lead's run and benchmarks/README.md)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_ddp_and_fsdp2_losses_match_one_process_on_nccl():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                           str(ROOT / "benchmarks" / "bench_distributed.py"), "--shape", "tiny", "--seq-len", "256",
                           "--steps", "3", "--device", "cuda"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diffs = {m: float(d) for m, d in re.findall(r"(\w+): losses .* vs none (\S+)", proc.stdout)}
    assert diffs.keys() == {"none", "ddp", "fsdp2"}, proc.stdout
    assert diffs["ddp"] <= 1e-5 and diffs["fsdp2"] <= 1e-5, proc.stdout
