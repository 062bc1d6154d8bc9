#!/usr/bin/env python
"""Convert Qwen2.5-VL checkpoints between HF safetensors and megatron-core distributed checkpoints.

    # HF -> megatron, saved from a TP2 x PP2 layout (spawns 4 local gloo ranks; or run it under
    # torchrun --nproc-per-node 4 with the same arguments)
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen2.5-VL-7B-Instruct --out ckpt/mcore --tp 2 --pp 2

    # megatron (saved at any TP x PP) -> HF, on one process
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir ckpt/mcore --out ckpt/hf --max-shard-size 5GB

The megatron checkpoint loads at any TP x PP (``m2mega.convert.load_mcore_checkpoint``). See docs/convert.md.
"""

# Keep module-level imports light: megatron's checkpoint writer starts a helper process that re-imports
# this file as its main module.
import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> megatron distributed checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--first-stage-layers", type=int, default=None,
                   help="LM layers on PP stage 0 (it also runs the ViT); the rest split evenly")
    a.add_argument("--dtype", default=None, help="cast to this dtype (default: keep the checkpoint's; bit-exact)")
    a.add_argument("--timeout-s", type=float, default=3600.0)
    b = sub.add_parser("mcore-to-hf", help="megatron distributed checkpoint -> HF safetensors directory")
    b.add_argument("--mcore-dir", required=True,
                   help="a checkpoint (converted or iter_* of a training run) or a training save root (its newest "
                        "intact checkpoint); only model weights are read")
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", default=None,
                   help="write weights in this dtype (default: the one the checkpoint's config.json names)")
    b.add_argument("--style", choices=("hub", "transformers"), default="hub",
                   help="tensor names: hub (as released / as save_pretrained writes) or transformers module names")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from m2mega.convert import convert_hf_to_mcore, convert_mcore_to_hf

    if args.cmd == "hf-to-mcore":
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # under torchrun
            import m2mega.runtime as rt

            ws = int(os.environ["WORLD_SIZE"])
            if ws != args.tp * args.pp:
                raise SystemExit(f"torchrun world size {ws} != tp*pp = {args.tp * args.pp}")
            rt.init(args.tp, args.pp)
            try:
                res = convert_hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                                          first_stage_layers=args.first_stage_layers, dtype=args.dtype)
            finally:
                rt.shutdown()
            if int(os.environ.get("RANK", 0)) == 0:
                print(json.dumps({"out": args.out, "ranks": res}))
            return 0
        res = convert_hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                                  first_stage_layers=args.first_stage_layers, dtype=args.dtype,
                                  timeout_s=args.timeout_s)
        print(json.dumps({"out": args.out, "ranks": res}))
        return 0
    res = convert_mcore_to_hf(args.mcore_dir, args.out, max_shard_size=args.max_shard_size, style=args.style,
                              dtype=args.dtype)
    print(json.dumps({"out": args.out, "tensors": res["tensors"], "dtype": res["dtype"],
                      "sidecar_files": res["sidecar_files"],
                      "shards": len(set(res["index"]["weight_map"].values())) if res["index"] else 1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
