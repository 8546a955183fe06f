"""Where a training job's CPU time goes, by kind of operation, from `perf record`.

    python profile_categories.py OUT.md -- COMMAND ARGS...

Runs COMMAND under `perf record -F 499` (every thread, kernel included where
`perf_event_paranoid` allows), then sorts self time by symbol and files each symbol under one
category by its name (GEMM and packing, element-wise kernels, attention, softmax and cross
entropy, copies, memory and page faults, threading, the interpreter and autograd, other).
The same rules apply to both sides of a comparison, so the train binary and the PyTorch script
are profiled by the same tool and their tables line up. Writes a Markdown table (share of
samples and absolute samples per category), each category's three hottest symbols and the 15
hottest overall to OUT.md, and prints it.
"""

import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# First match wins; patterns are tried on the demangled symbol (and its DSO).
CATEGORIES = [
    ("attention (flash kernels)", r"flash_attention|flash_attn|attention_lse|attention_fwd|attention_bwd"),
    ("GEMM incl. packing", r"gemm|sgemm|mkl_blas|dnnl|brgemm|jit_avx|matmul|pack_lhs|pack_rhs|nano_gemm|cpublas"),
    ("softmax / cross entropy", r"softmax|log_sum|logsumexp|nll_loss|cross_entropy|linear_nll"),
    ("threading and scheduling", r"gomp|omp_|kmp|__kmp|rayon|crossbeam|sched_yield|futex|pthread|spin_loop|__schedule|try_to_wake|_raw_spin|do_sched|native_queued|pick_next|finish_task|cpuidle|intel_idle|poll_idle"),
    ("memory: allocation, page faults, zeroing", r"clear_page|page_fault|handle_mm|do_anonymous|memcg|lru|alloc_pages|__alloc|get_page|folio|zap_|unmap|munmap|mmap|madvise|_int_free|_int_malloc|malloc|free|cfree|__memset|memset|rmqueue|mem_cgroup|release_pages|tlb|free_pages|page_|pte_"),
    ("copies", r"memcpy|memmove|copy_|StridedIter|contiguous|clone|copy_kernel|cat_|index_select|gather|scatter|permute|transpose"),
    ("element-wise kernels", r"callback_fn<at::native|TensorIterator|cpu_kernel|Vectorized|vectorized|burn_flex::ops|binary_op|unary_op"),
    ("python and autograd bookkeeping", r"^_?Py|python|autograd|c10::|at::Tensor::|TensorImpl|intrusive_ptr|Dispatch|OperatorHandle|burn_autodiff|burn_tensor|burn_backend|Graph|NodeRef|Arc|drop_in_place|hashbrown|HashMap"),
    ("element-wise kernels", r"Vectorized|vectorized|binary|unary|mul|add|sub|div|exp|silu|sigmoid|sqrt|rsqrt|pow|where|compare|mask|fill|cpu_kernel|loop_2d|basic_loop|VectorizedLoop|rms_norm|swiglu|rotary|adamw|lerp|addcmul|addcdiv|clamp|neg|abs|reduce|sum|mean|norm|max|min"),
]
COMPILED = [(name, re.compile(pat, re.IGNORECASE)) for name, pat in CATEGORIES]


def categorise(symbol, dso):
    for name, pat in COMPILED:
        if pat.search(symbol):
            return name
    if "gomp" in dso or "iomp" in dso:
        return "threading and scheduling"
    if "python" in dso:
        return "python and autograd bookkeeping"
    if "kernel" in dso or dso.startswith("[k"):
        return "kernel (other)"
    return "other"


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    command = sys.argv[3:]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        subprocess.run(["perf", "record", "-F", "499", "-q", "-o", str(data), "--"] + command,
                       check=True, stdout=subprocess.DEVNULL)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-F", "sample,dso,sym",
             "--percent-limit", "0", "-q"],
            check=True, capture_output=True, text=True).stdout
    per_cat = defaultdict(int)
    per_sym = defaultdict(int)
    cat_syms = defaultdict(lambda: defaultdict(int))
    total = 0
    for line in report.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*)$", line)
        if not m:
            continue
        samples, dso, sym = int(m.group(1)), m.group(2), m.group(3).strip()
        total += samples
        cat = categorise(sym, dso)
        per_cat[cat] += samples
        cat_syms[cat][(sym[:60], dso)] += samples
        per_sym[(sym[:90], dso)] += samples
    if total == 0:
        sys.exit("perf recorded no samples")
    lines = [f"Command: `{' '.join(command)}`; {total} samples at 499 Hz.", "",
             "| category | share | samples |", "|---|---:|---:|"]
    for name, n in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {100 * n / total:.1f} % | {n} |")
    lines += ["", "| category | its three hottest symbols |", "|---|---|"]
    for name, _ in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        top = sorted(cat_syms[name].items(), key=lambda kv: -kv[1])[:3]
        cells = "; ".join(f"`{s}` ({d}) {100 * n / total:.1f} %".replace("|", "\\|") for (s, d), n in top)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| hottest symbols | dso | share |", "|---|---|---:|"]
    for (sym, dso), n in sorted(per_sym.items(), key=lambda kv: -kv[1])[:15]:
        sym = sym.replace("|", "\\|")
        lines.append(f"| `{sym}` | {dso} | {100 * n / total:.1f} % |")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
