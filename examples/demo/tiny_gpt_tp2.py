"""Train the tiny Qwen-shaped megatron-core GPT for a few steps with TP=2 on gloo (launched by torchrun).

The task is learnable on purpose (next token = (token * 3 + 1) mod V), so a falling loss shows that TP
forward, backward and the optimizer step are wired correctly, not just that the code runs.
"""

from __future__ import annotations

import argparse
import time

import torch

import m2mega.runtime as rt
from m2mega.testing.tiny_gpt import TinyGPTShape, build_tiny_gpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    info = rt.init(args.tp, 1, seed=1234)
    shape = TinyGPTShape()
    model = build_tiny_gpt(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)  # same data on every TP rank, as megatron's broadcast would give
    pos = torch.arange(args.seq).expand(args.batch, args.seq)
    first = last = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq), generator=g)
        labels = (tokens * 3 + 1) % shape.vocab_size
        loss = model(tokens, pos, None, labels=labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if info.rank == 0 and (step == 1 or step % 5 == 0):
            print(f"[tiny-gpt TP={info.tp}] step {step:3d}  loss {last:.4f}", flush=True)
    if info.rank == 0:
        dt = time.perf_counter() - t0
        verdict = "loss fell" if last < first else "LOSS DID NOT FALL"
        print(f"[tiny-gpt TP={info.tp}] {args.steps} steps in {dt:.1f}s: loss {first:.4f} -> {last:.4f} ({verdict})")
    rt.shutdown()


if __name__ == "__main__":
    main()
