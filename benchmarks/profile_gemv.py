"""One fused gemm_4bit call per case for Nsight Compute (`ncu`): run it under ncu to read the kernel's achieved DRAM
bandwidth, issue-slot use and stall reasons, which timings alone cannot show. On the GPU machine:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy -k regex:gemv python3 benchmarks/profile_gemv.py

Cases: M=1 on 14336x4096, 4096x14336 and 4096x4096, M=16 on 14336x4096 (NF4 + double quantization, bf16 x), in
bitsandbytes' rows or, with --tiles, in the decode layout (minqlora/layout.py). Where the L1 pipe's time goes:
`ncu --metrics breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed --section MemoryWorkloadAnalysis_Tables`.
"""

import argparse

import torch

import minqlora as mq
from minqlora import layout

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--tiles", action="store_true", help="weights in the decode layout (tiles) instead of rows")
args = ap.parse_args()

for (n, k), m in (((14336, 4096), 1), ((4096, 14336), 1), ((4096, 4096), 1), ((14336, 4096), 16)):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    packed, state = mq.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    if args.tiles:
        packed = layout.to_tiles(packed, (n, k))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    mq.gemm_4bit(x, packed, state)
    torch.cuda.synchronize()
