"""The rows ``bench_gpu.py`` plans (``--list``, no GPU needed): the trainer row beside its bare step row, and the
peer rows diffusers cannot run marked with the reason."""

from __future__ import annotations

from benchmarks import bench_gpu as G


def test_the_full_run_lists_the_trainer_row_beside_the_bare_one(capsys):
    assert G.main(["--list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "train: 1024px ckpt eager"
    assert "trainer: 1024px ckpt eager" in rows
    assert rows.index("trainer: 1024px ckpt eager") < rows.index("train: 1024px ckpt compiled")  # before the rest
    # diffusers' fp8 storage fails compiled with checkpointing: that peer row stores bf16 (the reason is in the row)
    assert "peer: 1024px ckpt compiled (bf16 storage)" in rows
    assert "peer: 1024px no-ckpt compiled" in rows
    assert "peer: 1024px ckpt compiled fp8-gemm (skipped: no peer equivalent)" in rows
    assert len(rows) == len(set(rows))


def test_the_quick_run_and_the_parts_keep_the_trainer_row(capsys):
    assert G.main(["--list", "--quick"]) == 0
    assert "trainer: 1024px ckpt eager" in capsys.readouterr().out.splitlines()
    assert G.main(["--list", "--parts", "trainer"]) == 0
    assert capsys.readouterr().out.splitlines() == ["trainer: 1024px ckpt eager"]


def test_the_peer_compiled_checkpointed_rows_can_try_fp8(capsys):
    assert G.main(["--list", "--parts", "peer", "--peer-fp8-always"]) == 0
    assert "peer: 1024px ckpt compiled" in capsys.readouterr().out.splitlines()


def test_the_full_run_ends_with_a_kontext_row(capsys):
    assert G.main(["--list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[-2:] == [
        "train: 1024px ckpt eager kontext",
        "peer: 1024px ckpt eager kontext (skipped: no peer equivalent)",
    ]
    assert G.step_cost(G.PRESETS["flux-dev"], 1024, True, kontext=True) > 1.9 * G.step_cost(
        G.PRESETS["flux-dev"], 1024, True
    )
