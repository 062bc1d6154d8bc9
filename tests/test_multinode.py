"""The multi-node launcher (examples/qwen25vl_7b/sft.sh -> _launch.sh -> torchrun) really launches: two
"nodes" on loopback (NNODES=2, NODE_RANK=0/1, one process each) train with exactly the losses of one node
with two processes, and a node whose peer never joins ends with a clear error within RDZV_TIMEOUT instead
of hanging."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_SH = os.path.join(ROOT, "examples", "qwen25vl_7b", "sft.sh")
ITERS = 4


def _config(tmp_path) -> str:
    import yaml

    from test_checkpoint import tiny_cfg

    from m2mega.train.config import to_dict

    # Dropout stays on: each DP rank's RNG stream must be the same however the ranks are placed.
    cfg = tiny_cfg(None, schedule={"train_iters": ITERS}, logging={"progress": "plain"})
    path = tmp_path / "tiny_sft.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return str(path)


def _launch(config: str, port: int, **env) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PYTHONPATH": ROOT, **{k: str(v) for k, v in env.items()}}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GPUS_PER_NODE", "RDZV_ENDPOINT"):
        full.pop(k, None)
    return subprocess.Popen(["bash", SFT_SH, "--tp", "1", "--config", config], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launcher still running after {timeout}s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _losses(stdout: str) -> list[str]:
    return re.findall(r"iter \d+: loss (\S+)", stdout)


def test_two_nodes_on_loopback_match_one_node_with_two_processes(tmp_path):
    from m2mega.runtime.multiproc import free_port

    config = _config(tmp_path)
    rc, out, err = _finish(_launch(config, free_port(), NNODES=1, NPROC_PER_NODE=2))
    assert rc == 0, err[-3000:]
    one_node = _losses(out)
    assert len(one_node) == ITERS and "DP2 TP1 PP1" in out, out

    port = free_port()
    nodes = [_launch(config, port, NNODES=2, NODE_RANK=r, NPROC_PER_NODE=1, RDZV_TIMEOUT=60) for r in (0, 1)]
    (rc0, out0, err0), (rc1, out1, err1) = [_finish(p) for p in nodes]
    assert rc0 == 0 and rc1 == 0, f"node 0:\n{err0[-2000:]}\nnode 1:\n{err1[-2000:]}"
    assert "DP2 TP1 PP1" in out0  # one job of 2 ranks, reported by global rank 0 on node 0
    assert _losses(out0) == one_node, (out0, one_node)
    assert _losses(out1) == []  # node 1 holds rank 1, which does not print progress


def test_node_whose_peer_never_joins_fails_within_the_rendezvous_timeout(tmp_path):
    from m2mega.runtime.multiproc import free_port

    timeout = 6
    t0 = time.monotonic()
    rc, out, err = _finish(_launch(_config(tmp_path), free_port(), NNODES=2, NODE_RANK=0, NPROC_PER_NODE=1,
                                   RDZV_TIMEOUT=timeout), timeout=90)
    elapsed = time.monotonic() - t0
    assert rc != 0
    assert f"did not all join the rendezvous" in err and f"RDZV_TIMEOUT={timeout}s" in err, err[-3000:]
    assert elapsed < timeout + 30, f"took {elapsed:.0f}s with RDZV_TIMEOUT={timeout}"
