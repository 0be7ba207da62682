"""The W4A16 GEMM (nanovllm/kernels/w4a16_gemm.py) at decode batch sizes: its memory bandwidth on
the packed weights, beside torch's bf16 matmul of the same layer.

    python benchmarks/bench_w4a16.py            # Llama-3.2-1B's four linears, 1-16 rows, group 128

Bytes counted: the packed int32 weights, the scales and mins, the activations in and out. Each
time is triton.testing.do_bench_cudagraph's median (launches replayed from a CUDA graph, as the
engine's decode steps are). The bandwidth is set against a device-to-device copy measured here.
"""
import torch
import triton

from nanovllm.kernels.w4a16_gemm import w4a16_gemm

# Llama-3.2-1B: (name, N output features, K input features)
LAYERS = [("qkv_proj", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up_proj", 16384, 2048), ("down_proj", 2048, 8192)]
GROUP = 128


def copy_bandwidth() -> float:
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms / 1e3)


def main() -> None:
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {copy / 1e12:.2f} TB/s")
    print(f"{'layer':<13} {'rows':>4} {'w4a16 us':>9} {'GB/s':>7} {'% copy':>7} {'bf16 us':>8} {'bf16/w4a16':>10}")
    for name, n, k in LAYERS:
        qweight = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device="cuda")
        scales = torch.rand(n, k // GROUP, dtype=torch.bfloat16, device="cuda") * 0.01
        mins = -8 * scales
        dense = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ms = triton.testing.do_bench_cudagraph(lambda: w4a16_gemm(x, qweight, scales, mins, 4, GROUP))
            ms_dense = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, dense))
            moved = qweight.numel() * 4 + 2 * scales.numel() * 2 + (m * k + m * n) * 2
            rate = moved / (ms / 1e3)
            print(f"{name:<13} {m:>4} {1e3 * ms:>9.1f} {rate / 1e9:>7.0f} {100 * rate / copy:>6.1f}% "
                  f"{1e3 * ms_dense:>8.1f} {ms_dense / ms:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
