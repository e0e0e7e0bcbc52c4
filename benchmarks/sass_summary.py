"""Instruction counts of CUDA kernels from `cuobjdump -sass` output (stdin): per kernel, the total and the opcodes
that dominate, and per loop (a backward branch) the same for the loop body, which is where a memory-bound kernel's
issue slots go. Run by `bash benchmarks/gpu.sh sass` on the GPU machine; the workstation has no SASS tools.

    cuobjdump -sass minqlora/_C*.so | python3 benchmarks/sass_summary.py --match gemv_4bit_kernel --dump sass.txt
"""

import argparse
import re
import subprocess
import sys
from collections import Counter

FUNC = re.compile(r"^\s*Function : (\S+)")
INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*(.*?);")


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(lines, match):
    """{mangled kernel name: [(address, opcode with modifiers, operands)]} for kernels whose name contains match."""
    kernels, cur = {}, None
    for line in lines:
        m = FUNC.match(line)
        if m:
            cur = m.group(1) if match in m.group(1) else None
            if cur is not None:
                kernels[cur] = []
            continue
        if cur is None:
            continue
        m = INSN.match(line)
        if m:
            kernels[cur].append((int(m.group(1), 16), m.group(3) + m.group(4), m.group(5)))
    return kernels


def loops(insns):
    """(start, end) index ranges of loop bodies: a branch whose target lies before it."""
    index = {addr: i for i, (addr, _, _) in enumerate(insns)}
    out = []
    for i, (_, op, args) in enumerate(insns):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) in index and index[int(m.group(1), 16)] < i:
                out.append((index[int(m.group(1), 16)], i + 1))
    return out


def histogram(insns, top):
    c = Counter(op.split(".")[0] for _, op, _ in insns)
    return ", ".join(f"{op} {n}" for op, n in c.most_common(top))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", default="gemv_4bit_kernel", help="substring of the mangled kernel names to keep")
    ap.add_argument("--dump", help="also write the matching kernels' SASS here")
    ap.add_argument("--top", type=int, default=14, help="opcodes listed per kernel and loop")
    args = ap.parse_args()
    lines = sys.stdin.read().splitlines()
    kernels = parse(lines, args.match)
    if not kernels:
        sys.exit(f"no kernel name contains {args.match!r} in the cuobjdump output ({len(lines)} lines)")
    if args.dump:
        keep, on = [], False
        for line in lines:
            m = FUNC.match(line)
            if m:
                on = args.match in m.group(1)
            if on:
                keep.append(line)
        with open(args.dump, "w") as f:
            f.write("\n".join(keep) + "\n")
    for (name, insns), pretty in zip(kernels.items(), demangle(list(kernels))):
        print(f"{pretty}\n  {len(insns)} instructions: {histogram(insns, args.top)}")
        for a, b in loops(insns):
            print(f"  loop {a}..{b} ({b - a} instructions): {histogram(insns[a:b], args.top)}")


if __name__ == "__main__":
    main()
