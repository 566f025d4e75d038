"""benchmarks/scaling: the collective counts, times and projections of the scaling model, checked by hand.

The same counts are checked against real gloo runs of the engines in tests/test_bench_scaling_dist.py.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from scaling import comm_model as M  # noqa: E402
from scaling import projection as P  # noqa: E402


def toy_net() -> M.Net:
    """root: emb (4, 8) + frozen pos (1, 3, 8); two blocks of w (8, 8) + b (8,), 10 tokens each; root head (2, 8).
    Trainable 32 + 2 x 72 + 16 = 192 elements; 216 in all."""
    P_ = M.Param
    params = [P_("emb.weight", (4, 8), True, 0, 0), P_("pos", (1, 3, 8), False, 0, -1),
              P_("blocks.0.fc.weight", (8, 8), True, 1, 0), P_("blocks.0.fc.bias", (8,), True, 1, 1),
              P_("blocks.1.fc.weight", (8, 8), True, 2, 0), P_("blocks.1.fc.bias", (8,), True, 2, 1),
              P_("head.weight", (2, 8), True, 0, 0)]
    return M.Net("toy", params, ["root", "blocks.0", "blocks.1"], [0, 10, 10])


def keys(ops):
    return sorted(op.key() for op in ops)


def test_ring_factors():
    assert M.ring_send_bytes("all_reduce", 4, 1000) == 1500          # 2 (g-1)/g
    assert M.ring_send_bytes("reduce_scatter", 4, 1000) == 750       # (g-1)/g of the full input
    assert M.ring_send_bytes("all_gather", 8, 800) == 700            # (g-1)/g of the full output
    assert M.ring_send_bytes("all_reduce", 1, 1000) == 0
    with pytest.raises(ValueError, match="collective 'alltoall'"):
        M.ring_send_bytes("alltoall", 2, 1)
    op = M.Op("all_reduce", "world", 4, 250, "bf16")
    assert op.payload_bytes == 500 and op.send_bytes == 750


def test_net_weights_and_gradient_order():
    net = toy_net()
    assert net.numel == 216 and net.trainable_numel == 192
    assert net.weights() == [0.0, 0.5, 0.5]
    # head first (end of forward), block 1, block 0, then the embedding
    assert [p.name for p in net.grad_order()] == ["head.weight", "blocks.1.fc.bias", "blocks.1.fc.weight",
                                                  "blocks.0.fc.bias", "blocks.0.fc.weight", "emb.weight"]
    assert net.grad_ready(net.params[0]) == 1.0 and net.grad_ready(net.params[-1]) == 0.0
    assert net.grad_ready(net.params[4]) == 0.5 and net.grad_ready(net.params[2]) == 1.0


def test_ddp_buckets_in_reverse_registration_order():
    net = toy_net()
    mib = 1 << 20
    # caps in bytes of the fp32 parameters: first bucket closes at >= 100 B, the others at >= 300 B
    spec = M.EngineSpec("ddp", reduce_dtype="bf16", ddp_first_bucket_mb=100 / mib, ddp_bucket_mb=300 / mib)
    ops = M.step_ops(net, spec, 4)
    # reverse order: head 16 (64 B), b1.bias 8 (96 B), b1.w 64 -> 88 el closes bucket 0; then 8 + 64 + 32 = 104 el
    assert [op.numel for op in ops] == [88, 104]
    assert all(op.kind == "all_reduce" and op.dtype == "bf16" and op.size == 4 for op in ops)
    assert [op.ready for op in ops] == [0.5, 1.0]
    assert M.sent_bytes(ops) == 2 * 3 / 4 * 192 * 2
    assert M.step_ops(net, spec, 1) == []


def test_fsdp2_padding_reshard_and_hsdp():
    net = toy_net()
    ops = M.step_ops(net, M.EngineSpec("fsdp2", param_dtype="bf16", reduce_dtype="fp32"), 3)
    # dim 0 padded to a multiple of 3: emb 6x8 = 48, pos 3x24 = 72, head 3x8 = 24 -> root 144; block 9x8 + 9 = 81
    root, blk = 144, 81
    assert keys(ops) == sorted([("all_gather", 3, root, "bf16")] * 2 + [("all_gather", 3, blk, "bf16")] * 4 +
                               [("reduce_scatter", 3, 72, "fp32")] + [("reduce_scatter", 3, blk, "fp32")] * 2)
    no = M.step_ops(net, M.EngineSpec("fsdp2", reshard_after_forward=False), 3)
    assert sum(op.kind == "all_gather" for op in no) == 3
    h = M.step_ops(net, M.EngineSpec("hsdp", param_dtype="fp32", shard_size=2), 4)
    # shards of 2: root 4x8 + 2x24 (pos: dim0 1 -> 2) + 2x8 = 96; block 8x8 + 8 = 72; root trainable 32 + 16 = 48
    ar = sorted(op.key() for op in h if op.kind == "all_reduce")
    assert ar == [("all_reduce", 2, 24, "fp32"), ("all_reduce", 2, 36, "fp32"), ("all_reduce", 2, 36, "fp32")]
    assert {op.group for op in h if op.kind != "all_reduce"} == {"shard"}
    assert sorted(op.numel for op in h if op.kind == "all_gather") == [72] * 4 + [96] * 2
    with pytest.raises(ValueError, match="shard_size 3 must divide"):
        M.step_ops(net, M.EngineSpec("hsdp", shard_size=3), 4)


def test_zero12_allreduce_then_partition_gather():
    net = toy_net()
    ops = M.step_ops(net, M.EngineSpec("zero2", param_dtype="bf16", reduce_dtype="bf16", ds_reduce_bucket=100), 2)
    # gradient-ready order head 16, b1.bias 8, b1.w 64, b0.bias 8 (96); b0.w 64 would overflow 100: flush; 64 + 32
    assert [(op.kind, op.numel) for op in ops if op.phase == "bwd"] == [("all_reduce", 96), ("all_reduce", 96)]
    # groups: decay (emb 32 + w 64 + w 64 + head 16 = 176) and no-decay (16): padded to multiples of 2 x 2
    assert sorted(op.numel for op in ops if op.phase == "step") == [16, 176]
    ops3 = M.step_ops(net, M.EngineSpec("zero1", param_dtype="fp32", reduce_dtype="fp32"), 3)
    assert sorted(op.numel for op in ops3 if op.phase == "step") == [18, 180]   # multiples of 6
    assert [op.numel for op in ops3 if op.kind == "all_reduce"] == [192]


def test_zero3_persistence_reuse_and_prefetch():
    net = toy_net()
    base = dict(param_dtype="fp32", reduce_dtype="fp32")
    # default thresholds: everything is persistent (<= 1e5 elements): one gather of all after the step
    ops = M.step_ops(net, M.EngineSpec("zero3", **base), 2)
    assert keys(ops) == [("all_gather", 2, 216, "fp32"), ("reduce_scatter", 2, 192, "fp32")]
    assert [op.phase for op in ops] == ["bwd", "step"]
    # threshold 20: the 32, 24 and 64-element params live partitioned; per module padded to a multiple of 3
    spec = M.EngineSpec("zero3", ds_persistence=20, **base)
    ops = M.step_ops(net, spec, 3)
    fwd = [op.numel for op in ops if op.phase == "fwd"]
    assert fwd == [33, 24, 66, 66]                        # emb 32->33, pos 24, the two fc weights 64->66
    assert [op.numel for op in ops if op.phase == "step"] == [9 + 9 + 18]
    assert not [op for op in ops if op.phase == "bwd" and op.kind == "all_gather"]   # reuse 1e9: kept
    # reuse distance 100: kept iff 2 x (elements after its module) < 100, or inside the prefetch window (not root)
    r = M.zero3_regathered(net, M.EngineSpec("zero3", ds_persistence=20, ds_max_reuse=100, ds_prefetch_bucket=0,
                                             **base))
    # after: emb 160 (x2 = 320), pos ("" module) 160, blocks.0.fc 88 (176), blocks.1.fc 16 (32), head 0
    assert [p.name for p in r] == ["emb.weight", "pos", "blocks.0.fc.weight"]
    r = M.zero3_regathered(net, M.EngineSpec("zero3", ds_persistence=20, ds_max_reuse=0, ds_prefetch_bucket=10 ** 6,
                                             **base))
    assert [p.name for p in r] == ["pos"]                 # the prefetch window does not keep the top module's own


def test_op_seconds_links():
    spec = M.EngineSpec("fsdp2")
    card = M.Card("X", 100.0, nvlink_GBps=400.0, nic_Gbps=400.0)            # NIC 50 GB/s
    link = M.LinkModel(nvlink_eff=0.5, nic_eff=0.5, alpha_intra_us=10, alpha_inter_us=20)
    op = M.Op("all_reduce", "world", 8, 10 ** 9, "bf16")                     # 2 GB payload, 3.5 GB sent
    assert M.op_seconds(op, card, link, 8, spec) == pytest.approx(10e-6 + 3.5e9 / 200e9)
    op16 = M.Op("all_reduce", "world", 16, 10 ** 9, "bf16")                  # 3.75 GB sent
    # ring over 2 nodes, 8 members per node: 1/8 on the NIC (25 GB/s eff.) vs all on NVLink (200 GB/s eff.)
    assert M.op_seconds(op16, card, link, 16, spec) == pytest.approx(20e-6 + max(3.75e9 / 200e9, 3.75e9 / 8 / 25e9))
    allnet = M.LinkModel(nvlink_eff=0.5, nic_eff=0.5, alpha_intra_us=10, alpha_inter_us=20, net_share="all")
    assert M.op_seconds(op16, card, allnet, 16, spec) == pytest.approx(20e-6 + 3.75e9 / 25e9)
    # HSDP's replicate group over 4 nodes: one member per node, everything on the NIC
    rep = M.Op("all_reduce", "replicate", 4, 10 ** 9, "bf16")
    assert M.group_layout(rep, 32, M.EngineSpec("hsdp", shard_size=8), 8) == (4, 1)
    assert M.op_seconds(rep, card, link, 32, M.EngineSpec("hsdp", shard_size=8)) == pytest.approx(20e-6 + 3e9 / 25e9)
    assert M.group_layout(rep, 32, M.EngineSpec("hsdp", shard_size=2), 8) == (4, 4)


def test_timelines_by_hand():
    ddp = M.EngineSpec("ddp")
    ops = [M.Op("all_reduce", "world", 8, 1, "fp32", ready=0.5), M.Op("all_reduce", "world", 8, 1, "fp32", ready=1.0)]
    # buckets start at 1 + 2 x 0.5 = 2 and 3 on the channel: 2 + 0.5 = 2.5, then max(2.5, 3) + 0.3 = 3.3
    assert M.timeline([0, 1], ddp, ops, [0.5, 0.3], t_fwd=1, t_bwd=2) == pytest.approx(3.3)
    assert M.timeline([0, 1], M.EngineSpec("zero1"), ops, [0.5, 0.3], t_fwd=1, t_bwd=2) == pytest.approx(3.8)
    f = M.EngineSpec("fsdp2")
    ag = lambda u, ph: M.Op("all_gather", "world", 8, 1, "bf16", ph, u)     # noqa: E731
    rs = lambda u: M.Op("reduce_scatter", "world", 8, 1, "fp32", "bwd", u)  # noqa: E731
    ops = [ag(0, "fwd"), ag(1, "fwd"), ag(2, "fwd"), ag(2, "bwd"), ag(1, "bwd"), ag(0, "bwd"), rs(2), rs(1), rs(0)]
    sec = [0.1, 1, 1, 1, 1, 0.1, 0.5, 0.5, 0.2]
    # forward: root gather 0.1, b1 gather 1.1, b1 1.1-2.1, b2 gathered 2.1, b2 2.1-3.1; backward: b2 regathered 4.1,
    # b2 4.1-6.1 (b1 gathered 5.1), RS b2 6.6, b1 6.1-8.1 (root gathered 6.7), RS b1 8.6, root, RS root 8.8
    assert M.timeline([0, 0.5, 0.5], f, ops, sec, t_fwd=2, t_bwd=4) == pytest.approx(8.8)
    # without communication the step is the compute
    assert M.timeline([0, 0.5, 0.5], f, [], [], t_fwd=2, t_bwd=4, t_pre=1) == 7


def test_one_gpu_point_is_the_measured_rate():
    net = toy_net()
    link, card = M.LinkModel(), M.CARDS["H200"]
    for kind in M.ENGINE_KINDS:
        st = M.project(net, M.EngineSpec(kind), card, link, rate=500.0, global_batch=64, world=1)
        assert st.step_s == pytest.approx(64 / 500.0) and st.sent_bytes == 0 and st.efficiency == 1.0
        assert 64 / st.step_s == pytest.approx(500.0)
    run = M.Run("r", "r", "toy", steps=1000, global_batch=64)
    wall, gpu = M.run_days(run, st, 1)
    assert wall == gpu == pytest.approx(1000 * 64 / 500.0 / 86400)
    # 8 GPUs: compute is 1/8, communication comes on top; HSDP on one node is FSDP2
    s8 = M.project(net, M.EngineSpec("hsdp"), card, link, rate=500.0, global_batch=64, world=8)
    f8 = M.project(net, M.EngineSpec("fsdp2"), card, link, rate=500.0, global_batch=64, world=8)
    assert s8.step_s == f8.step_s and s8.compute_s == pytest.approx(8 / 500.0) and s8.step_s > s8.compute_s
    with pytest.raises(ValueError, match="does not split"):
        M.project(net, M.EngineSpec("ddp"), card, link, rate=500.0, global_batch=64, world=24)


def fake_nets():
    n = toy_net()
    return {"MAE-XL": n, "DiT-XL/2": n, "SiT-XL/2": n}


def test_projection_rates_online_input_and_parallel_items():
    s = P.Setup(rates={"MAE-XL": 2000.0, "DiT-XL/2": 500.0}, rate_card="H200", cards=("H200", "H20"), nodes=(1, 2),
                engines=("ddp",), cache_img_per_s=1000.0, cache_views=2, fid_gpu_hours=2.0)
    assert s.rate("SiT-XL/2", "H200") == 500.0                       # falls back to DiT-XL/2's
    assert s.rate("MAE-XL", "H20") == pytest.approx(2000.0 * 148 / 989.4)
    assert s.vae_rate("H200") == pytest.approx(2000.0 * 166 / 207)    # derived from FLOPs
    assert P.Setup(rates={"MAE-XL": 1.0}, rate_card="H200", vae_img_per_s=800.0).vae_rate("H20") == \
        pytest.approx(800.0 * 148 / 989.4)
    pts = P.project_all(s, fake_nets())
    mae = [p for p in pts if p.run == "mae_1600" and p.card == "H200" and p.nodes == 1][0]
    assert mae.local_batch == 512 and mae.step.compute_s == pytest.approx(512 / 2000.0)
    assert mae.wall_days == pytest.approx(1600 * 1_281_167 / 4096 * mae.step.step_s / 86400)
    assert mae.gpu_days == pytest.approx(8 * mae.wall_days)
    cache = [p for p in pts if p.run == "cache" and p.card == "H20" and p.nodes == 2][0]
    assert cache.gpu_days == pytest.approx(2 * 1_281_167 / (1000.0 * 148 / 989.4) / 86400)
    assert cache.wall_days == pytest.approx(cache.gpu_days / 16)
    fid = [p for p in pts if p.run == "fid50k" and p.card == "H200" and p.nodes == 1][0]
    assert fid.gpu_days == pytest.approx(2.0 / 24)
    usp = P.pipeline(pts, s, "H200", 1)
    assert [p.run for p in usp["parts"]] == ["mae_1600", "dit_400k", "cache", "fid50k"]
    assert usp["gpu_days"] == pytest.approx(sum(p.gpu_days for p in usp["parts"]))
    online = P.Setup(**{**s.__dict__, "pretrain_input": "online"})
    on = [p for p in P.project_all(online, fake_nets()) if p.run == "mae_1600" and p.card == "H200" and p.nodes == 1][0]
    # the encoder runs serially before the forward: exactly local batch / encoder rate more per step
    assert on.step.step_s - mae.step.step_s == pytest.approx(512 / (2000.0 * 166 / 207))
    md = P.to_markdown(s, pts, fake_nets()) + P.input_comparison_md(s, online, pts, P.project_all(online, fake_nets()))
    assert "98 H20-days" in md and "622 H20-days" in md and "online" in md and "Assumptions" in md
    with pytest.raises(ValueError, match="pretrain_input"):
        P.Setup(rates={}, rate_card="H200", pretrain_input="disk")
    with pytest.raises(ValueError, match="card 'A100'"):
        P.Setup(rates={}, rate_card="A100")
    with pytest.raises(ValueError, match="no measured rate for MAE-XL"):
        P.Setup(rates={"DiT-XL/2": 1.0}, rate_card="H200").rate("MAE-XL", "H200")


def test_plot_writes_png(tmp_path):
    s = P.Setup(rates={"MAE-XL": 2000.0, "DiT-XL/2": 500.0}, rate_card="H200", cards=("H200",), nodes=(1, 2, 4))
    path = P.plot(s, P.project_all(s, fake_nets()), str(tmp_path / "w.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
