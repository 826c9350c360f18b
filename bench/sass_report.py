"""Structural facts of the tensor-core kernels, read off the compiler without a GPU.

Compiles each tensor-core source (csrc/cuda/*_tc.cu) for one architecture with
`nvcc -cubin -Xptxas -v`, and reports per kernel instantiation (dtype, head dim, warps, with or
without the logit soft-cap): registers per thread, spill stores/loads and stack frame (ptxas),
HMMA / LDSM / LDGSTS instruction counts (cuobjdump -sass), dynamic shared memory per block
(FlashTcTraits::kSmemBytes) and the thread blocks and warps per SM that registers and shared
memory allow on an H100/H200.

    python bench/sass_report.py [--arch 90] [--record]

tests/kernels/test_sass.py asserts on the same data (HMMA present, no spills).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSOR_CORE_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*_tc.cu")))

# sm_90 (H100/H200) per-SM limits, from the CUDA occupancy calculator's table.
SM90 = dict(registers=65536, register_unit=256, shared=233472, shared_reserved=1024,
            max_warps=64, max_blocks=32)


def cuda_home():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def cuobjdump():
    """cuobjdump from the toolkit, or the one the triton wheel ships."""
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    site = sysconfig.get_paths()["purelib"]
    found = glob.glob(os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return found[0] if found else shutil.which("cuobjdump")


def nvcc_command(source: str, cubin: str, arch: int) -> list:
    """setup.py's nvcc flags for one source, to a cubin of one architecture."""
    import torch.utils.cpp_extension as cpp_extension
    includes = [os.path.join(REPO, "csrc")] + cpp_extension.include_paths()
    site = sysconfig.get_paths()["purelib"]
    includes += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))[:1]
    return [os.path.join(cuda_home(), "bin", "nvcc"), "-cubin", "-O3", "-std=c++20",
            "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas", "-v", *[f"-I{d}" for d in includes], source, "-o", cubin]


def ptxas_usage(log: str) -> dict:
    """{mangled kernel: {registers, spill_stores, spill_loads, stack}} from ptxas -v output."""
    usage, kernel = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
            usage[kernel] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and kernel:
            usage[kernel].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                 spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            usage[kernel]["registers"] = int(m.group(1))
    return usage


def sass_counts(cubin: str) -> dict:
    """{mangled kernel: {opcode: count}} for HMMA, LDSM, LDGSTS, LDL, STL in the cubin's SASS."""
    sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    counts, kernel = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            kernel = m.group(1)
            counts[kernel] = dict.fromkeys(("HMMA", "LDSM", "LDGSTS", "LDL", "STL"), 0)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m and kernel and m.group(1) in counts[kernel]:
            counts[kernel][m.group(1)] += 1
    return counts


def compile_and_read(source: str, arch: int, workdir: str) -> dict:
    """{mangled kernel: ptxas usage + SASS counts} of one source."""
    cubin = os.path.join(workdir, os.path.basename(source) + f".sm_{arch}.cubin")
    build = subprocess.run(nvcc_command(source, cubin, arch), capture_output=True, text=True)
    if build.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{build.stderr[-4000:]}")
    usage = ptxas_usage(build.stdout + build.stderr)
    for kernel, counts in sass_counts(cubin).items():
        usage.setdefault(kernel, {}).update(counts)
    return usage


def traits_of(kernel: str):
    """(dtype, head_dim, warps, softcap) from a mangled kernel<FlashTcTraits<T, D, W>, kSoftcap>
    instantiation."""
    m = re.search(r"FlashTcTraitsIN3c10(\d+)(\w+?)ELi(\d+)ELi(\d+)EE+Lb([01])E", kernel)
    if not m:
        return None
    dtype = {"Half": "fp16", "BFloat16": "bf16"}[m.group(2)]
    return dtype, int(m.group(3)), int(m.group(4)), m.group(5) == "1"


def keys_per_tile(head_dim: int, warps: int) -> int:
    """FlashTcTraits::kBlockN: 64 keys, 32 for 1- and 2-warp blocks and at head dim 256."""
    return 64 if warps >= 4 and head_dim <= 128 else 32


def dynamic_shared_bytes(kernel: str, head_dim: int, warps: int) -> int:
    """FlashTcTraits::kSmemBytes (attention: Q tile, two stages of K and V tiles) or
    kScoresSmemBytes (block_scores: Q tile, two stages of K, a (sum, max) per warp and slot)."""
    block_m, block_n = 16 * warps, keys_per_tile(head_dim, warps)
    if "block_scores" in kernel:
        slots = block_n // min(block_m, block_n)
        return (block_m * head_dim + 2 * block_n * head_dim) * 2 + warps * slots * 2 * 4
    return (block_m * head_dim + 2 * 2 * block_n * head_dim) * 2


def occupancy(registers: int, threads: int, shared: int, sm=SM90):
    """(thread blocks, warps) per SM allowed by registers, shared memory and the SM limits."""
    warps = threads // 32
    per_warp = -(-registers * 32 // sm["register_unit"]) * sm["register_unit"]
    by_registers = sm["registers"] // per_warp // warps
    by_shared = sm["shared"] // (shared + sm["shared_reserved"])
    blocks = min(by_registers, by_shared, sm["max_warps"] // warps, sm["max_blocks"])
    return blocks, blocks * warps


def short_name(kernel: str) -> str:
    m = re.search(r"([a-z][a-z_]*_kernel)", kernel)
    return m.group(1) if m else kernel


def rows(arch: int):
    with tempfile.TemporaryDirectory() as workdir:
        for source in TENSOR_CORE_SOURCES:
            for kernel, u in sorted(compile_and_read(source, arch, workdir).items()):
                traits = traits_of(kernel)
                if traits is None:
                    continue
                dtype, head_dim, warps, softcap = traits
                shared = dynamic_shared_bytes(kernel, head_dim, warps)
                blocks, warps_per_sm = occupancy(u["registers"], 32 * warps, shared)
                yield (f"| {short_name(kernel)} | {dtype} | {head_dim} | {16 * warps} | "
                       f"{'yes' if softcap else 'no'} | "
                       f"{32 * warps} | {u['registers']} | {u['spill_stores']}/{u['spill_loads']}"
                       f" | {shared / 1024:.1f} KiB | {blocks} ({warps_per_sm} warps) | {u['HMMA']} |"
                       f" {u['LDSM']} | {u['LDGSTS']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    if cuda_home() is None:
        sys.exit("nvcc not found (set CUDA_HOME)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import report
    header = (f"sm_{args.arch}, nvcc -O3; occupancy for an H100/H200 SM (64K registers, 228 KiB"
              " shared)")
    table = ["| kernel | dtype | d | block rows | softcap | threads | registers | spills st/ld |"
             " dynamic smem | blocks/SM (warps) | HMMA | LDSM | LDGSTS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    report("Tensor-core kernels: registers, shared memory, occupancy (sass_report.py)", header,
           table + list(rows(args.arch)), record=args.record)


if __name__ == "__main__":
    main()
