"""PyTorch SDPA rows for benchmarks/attention.py, run in a separate process.

python benchmarks/attention_torch.py '<json list of shapes>' ITERS   -> JSON rows on stdout
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes, iters = json.loads(sys.argv[1]), int(sys.argv[2])
    backends = {"torch_flash": SDPBackend.FLASH_ATTENTION, "torch_cudnn": SDPBackend.CUDNN_ATTENTION}
    rows: list[dict[str, Any]] = []
    for s in shapes:
        b, n, hq, hkv, d, causal = s["batch"], s["seq"], s["heads_q"], s["heads_kv"], s["head_dim"], s["causal"]
        gen = torch.Generator(device="cuda").manual_seed(0)
        sets = [
            [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv, hq)]
            for _ in range(3)
        ]
        q, k, v, do = sets[0]
        gqa = hq != hkv
        with sdpa_kernel([SDPBackend.MATH]):
            qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
            ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, enable_gqa=gqa)
            ref.backward(do.float())
            ref_grads = [x.grad for x in (qf, kf, vf)]
        fwd_flops = 4.0 * b * hq * n * n * d / (2 if causal else 1)
        for name, backend in backends.items():
            for mode in ("fwd", "fwd+bwd"):
                row: dict[str, Any] = {"backend": name, "mode": mode, **s}
                try:
                    with sdpa_kernel([backend]):

                        def run(args: list[torch.Tensor]) -> Any:
                            qq, kk, vv, dd = args
                            if mode == "fwd":
                                with torch.no_grad():
                                    return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=gqa)
                            qq, kk, vv = (x.detach().requires_grad_() for x in (qq, kk, vv))
                            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=gqa)
                            out.backward(dd)
                            return [qq.grad, kk.grad, vv.grad]

                        got = run(sets[0])
                        want = [ref] if mode == "fwd" else ref_grads
                        got = [got] if mode == "fwd" else got
                        row["rel_err"] = max(
                            float((g.float() - w).norm() / w.norm().clamp_min(1e-30)) for g, w in zip(got, want)
                        )
                        for i in range(3):
                            run(sets[i % 3])
                        times = []
                        for i in range(iters):
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            run(sets[i % 3])
                            end.record()
                            torch.cuda.synchronize()
                            times.append(start.elapsed_time(end) / 1000)
                    t = statistics.median(times)
                    row["ms"] = 1000 * t
                    row["tflops"] = fwd_flops * (1 if mode == "fwd" else 3.5) / t / 1e12
                except Exception as e:  # noqa: BLE001 - a refusal is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
        del sets, q, k, v, do, qf, kf, vf, ref, ref_grads
        torch.cuda.empty_cache()
    json.dump(rows, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
