"""benchmarks/scale_model.py's memory side against real ZeroOptimizers on
torch's fake process group (construction, a step, memory_bytes())."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import scale_model  # noqa: E402


def test_memory_model_matches_memory_bytes_on_fake_process_groups():
    results = scale_model.validate(sizes=(8, 1024))
    assert [r["world_size"] for r in results] == [8, 1024]
    for r in results:
        assert r["measured"] == r["model"], r
        assert r["measured"]["optimizer_state"] > 0  # a step ran and allocated the state


def test_llama3_8b_rows_from_the_real_layout():
    rows = [r for r in scale_model.rows_for("llama3-8b")
            if r["bucket_rule"] == "default_bucket_numel"]
    n_params = rows[0]["n_params"]
    assert 8.0e9 < n_params < 8.1e9  # Llama-3 8B, untied embeddings
    for r in rows:
        s = r["shard_size"]
        # z and exp_avg_sq: fp32, 1/S of the parameters plus padding below 1 %
        assert n_params / s * 8 <= r["memory_bytes"]["optimizer_state"] < n_params / s * 8 * 1.01
        assert r["padding_pct_of_shard"] < 1.0
