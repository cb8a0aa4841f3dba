"""What NVIDIA's own 2:4 kernels reach on this GPU, for context in BENCHMARKS.md.

Times, through PyTorch (GPU machine only; not a dependency of the package), the dense
cuBLAS product and the semi-structured 2:4 product (cuSPARSELt, and CUTLASS when
asked) of A [M, K] (2:4 along K) with B [K, N], on the Mixtral up-projection sizes:
M = 14336 (plain 2:4 over every output row) and M = 7168 (the kept rows of 1:2, i.e.
the work a 1:2 kernel would do with free steering). CUDA events, median of --reps,
weights rotated past the L2.

  python3 benchmarks/torch_semistructured.py [--reps 30]
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("reps", 30, "timed products (median)")
flags.DEFINE_integer("k", 4096, "K (shared axis)")
flags.DEFINE_integer("n", 4096, "N (columns of B)")


def main(argv: list[str]) -> None:
    del argv
    import torch
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dev = torch.device("cuda")
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__)

    def timed(fn, copies):
        for c in copies[:3]:
            fn(c)
        torch.cuda.synchronize()
        times = []
        for i in range(FLAGS.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(copies[i % len(copies)])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        times.sort()
        return times[len(times) // 2]

    k, n = FLAGS.k, FLAGS.n
    b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
    for m in (14336, 7168):
        mask = torch.tensor([1, 1, 0, 0], device=dev, dtype=torch.bool).repeat(m, k // 4)
        dense = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) * mask for _ in range(4)]
        flop = 2.0 * m * k * n
        t = timed(lambda a: torch.mm(a, b), dense)
        print(f"M={m} K={k} N={n}  dense cuBLAS        {t:8.1f} us  {flop / t / 1e6:6.0f} TFLOP/s")
        for backend, force_cutlass in (("cuSPARSELt", False), ("CUTLASS", True)):
            try:
                SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
                sparse = [to_sparse_semi_structured(a) for a in dense]
                ref = torch.mm(dense[0].float(), b.float())
                err = (torch.mm(sparse[0], b).float() - ref).norm() / ref.norm()
                t = timed(lambda a: torch.mm(a, b), sparse)
                print(f"M={m} K={k} N={n}  2:4 {backend:<14s}  {t:8.1f} us  "
                      f"{flop / t / 1e6:6.0f} dense-equiv TFLOP/s  rel err {err:.1e}")
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"M={m}  2:4 {backend}: unavailable ({type(e).__name__}: {e})"[:300])


if __name__ == "__main__":
    app.run(main)
