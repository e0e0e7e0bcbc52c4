"""Loading a sharded checkpoint into 4 bits keeps host memory at about the largest tensor group, not the model:
benchmarks/bench_load.py writes a synthetic sharded checkpoint and measures the peak RSS of a fresh process loading
it (its docstring states the bound). Here on a CPU with a model of 0.37 GB in bf16 whose largest group is 23 MB."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_load.py"


def test_peak_rss_stays_within_the_stated_bound(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--hidden", "1024", "--intermediate", "2816", "--layers",
           "16", "--vocab", "8000", "--dir", str(tmp_path / "ckpt"), "--shard-gb", "0.05", "--device", "cpu",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) >= 4, shards  # really sharded
    assert r["hwm_reset"], "could not reset VmHWM: the peak would not be the load's"
    assert r["within_bound"], r
    # What loading added beyond the 4-bit model itself is well under the bf16 checkpoint (a load that held it all
    # would add all of it), and the measurement does see the model arrive.
    extra = r["peak_over_before"] - r["model_4bit_bytes"]
    assert extra < r["checkpoint_bf16_bytes"] / 2, r
    assert r["peak_over_before"] > r["model_4bit_bytes"] // 2, r
