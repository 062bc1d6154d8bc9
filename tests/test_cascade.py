"""Cascade attention (m2mega.inference.cascade): shared prompt prefix attended once per group, merged with
each row's own suffix by log-sum-exp, equals plain attention over the concatenated sequence; the cascade
cache's slab interface (load, write, move, release) keeps every row's keys where plain attention over a
KVSlab finds them."""

from __future__ import annotations

import pytest
import torch

from m2mega.inference.cascade import CascadeKV, cascade_attention
from m2mega.inference.kv_cache import KVSlab


def _plain(q, keys, values, scale):
    """Reference: row r attends keys[r] [g, L_r, d] (fp64 softmax)."""
    out = []
    for r in range(q.shape[0]):
        s = torch.matmul(q[r].double(), keys[r].double().transpose(-1, -2)) * scale  # [g, qpg, L]
        out.append(torch.matmul(torch.softmax(s, -1), values[r].double()))
    return torch.stack(out).float()


@pytest.mark.parametrize("g,qpg,d", [(3, 2, 24), (1, 3, 16), (2, 1, 8)])  # (1, 3): TP > KV heads, one replica
def test_cascade_attention_equals_plain_attention(g, qpg, d):
    gen = torch.Generator().manual_seed(g * 100 + qpg)
    P, T = 13, 9
    plen = [5, 13, 1]  # per block, padded to P
    block_of = [0, 2, 1, 0, 1, 1, 2]  # 7 rows, blocks interleaved as the engine's compaction leaves them
    tlen = [1, 9, 4, 7, 2, 9, 3]  # suffix tokens per row
    n, nb = len(block_of), len(plen)
    q = torch.randn(n, g, qpg, d, generator=gen) * 2
    pk, pv = torch.randn(nb, g, P, d, generator=gen) * 2, torch.randn(nb, g, P, d, generator=gen)
    sk, sv = torch.randn(n, g, T, d, generator=gen) * 2, torch.randn(n, g, T, d, generator=gen)
    pbias = torch.full((nb, P), float("-inf"))
    for b, L in enumerate(plen):
        pbias[b, :L] = 0.0
    smask = torch.full((n, T), float("-inf"))
    for r, L in enumerate(tlen):
        smask[r, :L] = 0.0
    members = max(block_of.count(b) for b in range(nb))
    gather, back = [], [0] * n
    for b in range(nb):
        rows = [r for r in range(n) if block_of[r] == b]
        for j, r in enumerate(rows):
            back[r] = b * members + j
        gather += rows + [rows[0]] * (members - len(rows))
    scale = d ** -0.5
    out = cascade_attention(q, pk, pv, pbias, sk, sv, smask, torch.tensor(gather), torch.tensor(back), members, scale)
    keys = [torch.cat([pk[block_of[r], :, :plen[block_of[r]]], sk[r, :, :tlen[r]]], 1) for r in range(n)]
    values = [torch.cat([pv[block_of[r], :, :plen[block_of[r]]], sv[r, :, :tlen[r]]], 1) for r in range(n)]
    ref = _plain(q, keys, values, scale)
    assert out.shape == ref.shape == (n, g, qpg, d)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel


def test_cascade_cache_follows_the_slab_through_loads_moves_and_releases():
    """The same schedule (two prompts' groups, decode writes, a finish that moves the last slot into the
    hole, a refill from a third prompt and from the first one again) on a KVSlab with plain attention and
    on a CascadeKV: every step's attention outputs agree."""
    gen = torch.Generator().manual_seed(0)
    layers, g, qpg, d, slots = 2, 2, 2, 8, 5
    prompts = {i: (torch.randn(layers, g, S, d, generator=gen), torch.randn(layers, g, S, d, generator=gen))
               for i, S in enumerate((4, 7, 2))}
    prompt_kv = {i: ([k[li] for li in range(layers)], [v[li] for li in range(layers)]) for i, (k, v) in prompts.items()}
    slab = KVSlab(layers, slots, g, 7 + 6, d, dtype=torch.float32, device="cpu")
    cas = CascadeKV(layers, slots, 3, g, 7, 6, d, dtype=torch.float32, device="cpu")
    lens: list[int] = []

    def load(prompt, rows):
        for c in (slab, cas):
            c.load_prefix(torch.tensor(rows), *prompt_kv[prompt])
        for r in rows:
            if r == len(lens):
                lens.append(prompts[prompt][0].shape[2])
            else:
                lens[r] = prompts[prompt][0].shape[2]

    def step():
        n = len(lens)
        pos = torch.tensor(lens)
        rows = torch.arange(n)
        slab.attend(rows, pos)
        cas.attend(rows, pos)
        plan = cas.plan(pos)
        for li in range(layers):
            q = torch.randn(n, g, qpg, d, generator=gen)
            k, v = torch.randn(n, g, d, generator=gen), torch.randn(n, g, d, generator=gen)
            for r in range(n):
                slab.k[li, r, :, lens[r]] = k[r]
                slab.v[li, r, :, lens[r]] = v[r]
            span = max(lens) + 1
            s = torch.matmul(q, slab.k[li, :n, :, :span].transpose(-1, -2)) * d ** -0.5 + slab.mask[:n, None, None, :span]
            ref = torch.matmul(torch.softmax(s, -1), slab.v[li, :n, :, :span])
            out = cas.attention(li, q, k, v, plan, d ** -0.5)
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
        for r in range(n):
            lens[r] += 1

    def finish(slot):
        last = len(lens) - 1
        for c in (slab, cas):
            if slot != last:
                c.move(last, slot, lens[last])
            c.release(last)
        if slot != last:
            lens[slot] = lens[last]
        lens.pop()

    load(0, [0])
    load(1, [1, 2])
    load(0, [3, 4])  # the rest of prompt 0's group, admitted later: shares its block
    assert sorted(cas._refs) == [0, 2, 3]
    step()
    step()
    finish(1)  # slot 4 (prompt 0) moves into slot 1
    step()
    finish(0)
    finish(0)
    finish(1)  # the last row: released without a move; prompt 0's block is free again
    assert sorted(cas._refs) == [0, 0, 1]
    load(2, [1, 2])
    step()
    load(0, [3])  # prompt 0 again after its block was freed: loaded anew
    step()
    finish(3)
    finish(0)  # prompt 1's last row: prompt 2's row 2 moves into slot 0
    step()
    assert sorted(cas._refs) == [0, 0, 2] and len(lens) == 2
    with pytest.raises(ValueError, match="prefix capacity"):
        cas.load_prefix(torch.tensor([4]), [torch.zeros(g, 8, d)] * layers, [torch.zeros(g, 8, d)] * layers)
