"""What the Triton decode kernel compiles to for the H100/H200 (sm_90), checked on the CPU.

Triton's bundled ptxas and nvdisasm compile and disassemble without a GPU, so a code-generation
regression that no CPU test of the results can see is caught here. The fp8 decode kernel once read
its V tile from shared memory a byte at a time (128 ``LDS.U8`` per thread per 128-token tile),
because the product with P wants V transposed and ldmatrix transposes only 16-bit elements; it
read its bytes at half the device's copy bandwidth. Then it widened V in registers and staged it
through shared memory again as fp16 for a transposing ldmatrix; an fp8 pool now stores V
transposed (kv_cache.py), and V takes K's path: 16-byte copies of whole pages, widened on the way
to the MMA. Not a timing: the instructions themselves.
The compile runs in a child process, since the test session runs Triton in interpreter mode
(TRITON_INTERPRET=1), which compiles nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_bin(name: str) -> Path | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else (Path(p) if (p := shutil.which(name)) else None)


def decode_sass(kv_dtype: str, v_transposed: bool = False) -> str:
    """SASS of the decode kernel with the shipped launch configuration, for sm_90, compiled in a
    child process without the interpreter."""
    if _nvidia_bin("nvdisasm") is None or _nvidia_bin("ptxas") is None:
        pytest.skip("no ptxas/nvdisasm for the CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, __file__, kv_dtype, str(int(v_transposed))],
                           capture_output=True, env=env, cwd=ROOT, timeout=300)
    if child.returncode == 3:
        pytest.skip(child.stderr.decode().strip().splitlines()[-1])
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    return child.stdout.decode()


def _compile_decode_sass(kv_dtype: str, v_transposed: bool) -> str:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"this Triton has no ahead-of-time compile API: {e}", file=sys.stderr)
        sys.exit(3)
    from fairswitch.config import CacheConfig
    from fairswitch.kernels import paged_attention as pa

    fn = pa._decode_split_kernel
    fp8 = kv_dtype == "fp8e4nv"
    launch = pa.decode_launch(1 if fp8 else 2)
    block_size = CacheConfig(kv_cache_dtype="fp8" if fp8 else "auto").tokens_per_block
    constexprs = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_SIZE=block_size,
                      BLOCK_N=launch.pop("BLOCK_N"), WRITE_OUT=True, DOT_PRECISION="tf32",
                      KV_FP8=fp8, V_T=v_transposed)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = ("*bf16" if name in ("q_ptr", "out_ptr")
                           else f"*{kv_dtype}" if name in ("k_cache_ptr", "v_cache_ptr")
                           else "*i32" if name in ("block_tables_ptr", "seq_lens_ptr")
                           else "*fp32" if name.endswith("_ptr")
                           else "fp32" if name in ("qk_scale", "one") else "i32")
        if signature[name].startswith("*") or (name.startswith("stride")
                                                 and name != "stride_bt"):
            # as Triton specializes them at launch (stride_bt is not specialized on)
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(_nvidia_bin("nvdisasm")), "-c", cubin.name],
                              capture_output=True, check=True).stdout.decode()


def test_fp8_decode_reads_transposed_v_like_k():
    """As the engine runs it (V transposed in the pool): no tile is read bytewise (as V was when
    the compiler could not see that a page's tokens are contiguous, or when the page mask's hint
    was set on a function's argument, where Triton drops it), and none is staged for a
    transposing ldmatrix."""
    sass = decode_sass("fp8e4nv", v_transposed=True)
    assert "HMMA" in sass  # it did compile the kernel's matmuls
    assert not re.search(r"\b(LDS|LDG\.E)\.U8\b", sass), "fp8 tiles read bytewise"
    assert not re.search(r"\bLDSM\.16\.MT88", sass), "V staged for a transposing ldmatrix"


def test_fp8_decode_over_untransposed_v_stages_it_for_ldmatrix():
    sass = decode_sass("fp8e4nv")
    assert not re.search(r"\bLDS\.U8\b", sass), "fp8 tiles read from shared memory bytewise"
    assert re.search(r"\bLDSM\.16\.MT88", sass), "V not staged for a transposing ldmatrix"


def test_bf16_decode_reads_v_with_a_transposing_ldmatrix():
    sass = decode_sass("bf16")
    assert re.search(r"\bLDSM\.16\.MT88", sass) and not re.search(r"\bLDS\.U(8|16)\b", sass)


if __name__ == "__main__":
    print(_compile_decode_sass(sys.argv[1], sys.argv[2] == "1"))
