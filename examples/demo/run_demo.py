"""`make demo`: the main job on CPU.

Stage available now: a tiny Qwen-shaped megatron-core GPT trained with TP=2 on gloo via torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _torchrun(script: Path, nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    _torchrun(HERE / "tiny_gpt_tp2.py", 2, "--tp", "2")


if __name__ == "__main__":
    main()
