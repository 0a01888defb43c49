"""The bounds on the CPU benchmark's deterministic measurements (benchmarks/bench_cpu.py, a scaled-down
FLUX of the real structure), the analytic accounting both benchmarks use, and the GPU script's helpers and code
paths (run end to end on the CPU at tiny size). No timing is asserted anywhere."""

import json

import pytest
import torch

from benchmarks import accounting as A
from benchmarks import bench_cpu as B
from benchmarks import bench_gpu as G
from benchmarks.measure import count_flops
from flux_lora.model.flux import PRESETS, Flux

FULL = PRESETS["flux-dev"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the counts do not depend on it, and on a shared 2-core machine two OpenMP threads waiting for
    a busy core made these tests 10-40 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return B.random_dit(B.SMALL)


@pytest.fixture(scope="module")
def batch():
    return B.small_batch()


@pytest.fixture(scope="module")
def base32():  # for the counts that do not depend on the dtype (bf16 matmuls are slow on CPUs)
    return B.random_dit(B.SMALL, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch32():
    return B.small_batch(torch.float32)


@pytest.mark.parametrize("params", [FULL, B.SMALL], ids=["flux-dev", "small"])
def test_accounting_lists_exactly_the_models_linears(params):
    with torch.device("meta"):
        model = Flux(params)
    actual = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {s.name: (s.in_features, s.out_features) for s in A.dit_linears(params)} == actual


def test_lora_counts_match_the_reference_figures():
    """304 targets; rank 16: 76.6 M parameters with modulation, 56.0 M on the token-path linears."""
    assert len(A.lora_targets(FULL)) == 304
    assert A.lora_parameter_count(FULL, 16) == 1558 * 3072 * 16  # 46 d r per double block, 18 d r per single
    assert round(A.lora_parameter_count(FULL, 16) / 1e6, 1) == 76.6
    assert round(A.lora_parameter_count(FULL, 16, rows=("img", "txt", "all")) / 1e6, 1) == 56.0


@pytest.mark.parametrize("res, fwd, step, step_ckpt", [(512, 21.49, 45.5, 66.9), (1024, 74.38, 171.1, 245.4)])
def test_analytic_flops_match_the_reference_tables(res, fwd, step, step_ckpt):
    """FLUX.1-dev step FLOPs worked out by hand (512 T5 tokens, frozen base, LoRA FLOPs left out)."""
    n_img, n_txt = A.tokens(res, res, 512)
    assert A.forward_flops(FULL, n_img, n_txt)["total"] / 1e12 == pytest.approx(fwd, rel=2e-3)
    assert A.step_flops(FULL, n_img, n_txt, checkpointing=False, lora_rank=0) / 1e12 == pytest.approx(step, rel=2e-3)
    assert A.step_flops(FULL, n_img, n_txt, checkpointing=True, lora_rank=0) / 1e12 == pytest.approx(
        step_ckpt, rel=2e-3
    )


def test_analytic_forward_equals_torchs_flop_counter_at_full_size():
    """The accounting bench_gpu divides by is what torch counts for FLUX.1-dev at 1024 px (on the meta device)."""
    with torch.device("meta"):
        model = Flux(FULL).to(torch.bfloat16)
        x = dict(
            img=torch.zeros(1, 4096, 64, dtype=torch.bfloat16),
            img_ids=torch.zeros(1, 4096, 3),
            txt=torch.zeros(1, 512, 4096, dtype=torch.bfloat16),
            txt_ids=torch.zeros(1, 512, 3),
            timesteps=torch.zeros(1),
            y=torch.zeros(1, 768, dtype=torch.bfloat16),
            guidance=torch.zeros(1),
        )
    assert count_flops(lambda: model(**x))["total"] == A.forward_flops(FULL, 4096, 512)["total"]


def test_storage_ratio(base):
    r = B.storage(base)
    full = r["full_flux_dev"]
    assert full["all"]["ratio"] <= 0.51  # every Linear in fp8, per-channel scales included
    assert full["blocks"]["ratio"] <= 0.51  # the default (embedders and final layer in bf16): 0.503
    assert full["all"]["GB"] < full["blocks"]["GB"] < 0.51 * full["bf16_GB"]
    for policy in B.POLICIES:  # measured bytes are the closed form: 1 B per fp8 weight + 4 B per row, 2 B else
        assert r["small"][policy]["bytes"] == r["small"][policy]["closed_form_bytes"]
        assert full[policy]["GB"] == pytest.approx(full[policy]["closed_form_GB"], rel=1e-12)
    assert r["small"]["all"]["ratio"] < r["small"]["blocks"]["ratio"] < 1  # small widths weigh the rest more
    assert "txt_in" in full["blocks"]["kept_in_bf16"] and "txt_in" not in full["all"]["kept_in_bf16"]


def test_fp8_keeps_no_more_for_backward_than_bf16(base, batch):
    r = B.held_bytes(base, batch)
    for mode in ("no_checkpointing", "checkpointing"):
        row = r[mode]
        assert row["fp8"]["held"] <= row["bf16"]["held"], mode
        assert row["fp8"]["saved"] <= row["bf16"]["saved"], mode
    # The control: a naive cast keeps a bf16 copy of every block weight whose input needs a gradient.
    token_path = sum(s.weights for s in A.lora_targets(B.SMALL) if s.rows != "sample")
    assert r["naive_minus_bf16_bytes"] == 2 * token_path > 0
    assert r["checkpointing"]["bf16"]["held"] < r["no_checkpointing"]["bf16"]["held"] / 5


def test_flop_ratios(base32, batch32):
    r = B.flop_ratios(base32, batch32)
    assert r["forward"] == r["analytic_forward"]  # counter and accounting agree exactly, LoRA included
    assert 1.9 <= r["no_checkpointing"]["ratio"] <= 2.4
    assert 2.9 <= r["checkpointing"]["ratio"] <= 3.4
    assert r["control_base_weight_grads_ratio"] > 2.9  # a frozen base computing dW would fail the first bound
    assert 1.9 <= r["full_flux_dev_1024px"]["ratio_no_checkpointing"] <= 2.4
    assert 2.9 <= r["full_flux_dev_1024px"]["ratio_checkpointing"] <= 3.4


def test_trainable_parameters_and_optimizer_state(base32, batch32):
    r = B.trainable_audit(base32, batch32)
    assert (
        r["trainable"]
        == r["with_grad"]
        == r["analytic"]
        == B.RANK * sum(s.in_features + s.out_features for s in A.lora_targets(B.SMALL))
    )
    assert r["only_lora"]
    assert r["adamw_moment_bytes"] == 2 * 4 * r["analytic"]


def test_no_encoder_work_in_a_cached_step(base32, batch32):
    r = B.encoder_work(B.variant(base32, "fp8", rank=B.RANK), batch32)
    assert r["cached_step_encoder_calls"] == 0
    assert r["uncached_step_encoder_calls"] > 0  # the same hooks do see encoders that run
    share = r["full_size_share"]
    assert share["t5_TFLOP"] == pytest.approx(4.84, rel=0.02)  # ~2 x 4.7 B weights x 512 tokens
    assert share["1024px"]["t5_share_of_step"] < share["512px"]["t5_share_of_step"]


def test_scaled_fp8_error_is_below_plain_cast(base, batch):
    r = B.fp8_error(base, batch)
    assert r["fp8_vs_bf16_on_dequantized_weights"] < 1e-4  # fp8 storage computes as bf16 on its weights (0 here)
    for policy in B.POLICIES:
        assert r[f"{policy}_scaled"] < r[f"{policy}_plain"]
        assert r[f"{policy}_scaled"] < 0.05
    assert r["one_linear"]["scaled"] < r["one_linear"]["plain"]


def test_gpu_script_helpers():
    full = G.train_matrix()
    assert len(full) == 13 and len(set(full)) == 13
    assert full[-1] == G.BenchConfig(1024, True, False, kontext=True)  # Kontext: its own group, last
    assert G.BenchConfig(1024, True, True, fp8_matmul=True) in full
    assert G.BenchConfig(1024, True, True, fp8_matmul=True, selective=True) in full
    assert full[:2] == [G.BenchConfig(1024, True, False), G.BenchConfig(512, True, False)]  # the goal first
    assert all(not c.compiled for c in G.train_matrix(compile=False))
    jobs = [(part, [c.res for c in group]) for part, group in G.schedule({"train", "peer", "infer"}, full)]
    assert jobs[:3] == [("train", [1024, 512]), ("peer", [1024, 512]), ("infer", [])] and len(jobs) == 15
    assert G.schedule({"infer"}, full) == [("infer", [])]
    assert G.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and G.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert G.step_cost(FULL, 1024, True) == A.step_flops(FULL, 4096, 512, checkpointing=True, lora_rank=16)
    rows = [dict(res=1024, checkpointing=True, compiled=False, median_s_per_step=0.7, peak_allocated_GB=19.0)]
    goals = G.goal_report(rows)
    assert goals["1024px ckpt eager s/step"]["met"] is True
    assert goals["1024px ckpt eager peak_GB"]["met"] is False
    assert goals["1024px ckpt compiled s/step"]["measured"] is None
    peer = [dict(rows[0], median_s_per_step=1.4, peak_allocated_GB=38.0)]
    assert G.compare(rows, peer)[0]["time_peer_over_ours"] == pytest.approx(2.0)


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    """Every part of bench_gpu.py (ours, the diffusers peer, inference in all four memory modes) at tiny size."""
    pytest.importorskip("diffusers")
    out = tmp_path / "smoke.json"
    rc = G.main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--quick",
            "--eager-only",
            "--sizes",
            "64,32",
            "--txt-tokens",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--min-config-s",
            "0",
        ]
    )
    r = json.loads(out.read_text())
    assert rc == 0 and not r["errors"]
    assert [row["res"] for row in r["train"]] == [64, 32] and all("median_s_per_step" in x for x in r["train"])
    assert all("median_s_per_step" in x for x in r["peer"]) and len(r["peer_over_ours"]) == 2
    assert [row["mode"] for row in r["infer"]] == ["bf16", "fp8", "fp8 + model offload", "fp8 + block offload"]
    assert all("s_per_image" in x and "peak_reserved_GB" in x for x in r["infer"])
    [trainer] = r["trainer"]  # the first configuration through Lightning, beside its bare row
    assert (trainer["res"], trainer["checkpointing"], trainer["compiled"]) == (64, True, False)
    assert trainer["steps_timed"] == 1 and trainer["trainer_over_bare"] > 0, trainer
