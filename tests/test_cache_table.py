"""`mlamoe bench --suite cache-table`: the V4 rows (benchmarks/bench.py, from the cache spec's manifest) against
the figure worked out by hand in docs/cache-table.md (V4-Flash at 1M tokens, bf16)."""
from __future__ import annotations

from benchmarks.bench import cache_table, format_cache_table
from models import preset_config

M = 2**20


def test_v4_flash_at_1m_tokens_matches_the_hand_count():
    table = cache_table(preset_config("deepseek-v3-671b"))
    flash = table["v4"]["deepseek-v4-flash"]
    hca, csa = flash["layer_types"]["heavily_compressed_attention"], flash["layer_types"]["compressed_sparse_attention"]
    assert (hca["layers"], csa["layers"], flash["num_layers"]) == (23, 20, 43)
    D, Di, W1 = 512, 128, 127  # head_dim, index_head_dim, window rows (sliding_window - 1)
    assert hca["values_per_token"] == D / 128 and csa["values_per_token"] == (D + Di) / 4
    window = W1 * D
    hca_bounded = window + 2 * 127 * D                                        # + pending kv/gate, m-1 = 127 rows
    csa_bounded = window + 2 * 3 * 2 * D + 2 * 4 * D + 2 * 3 * 2 * Di + 2 * 4 * Di  # + pending, overlap (+ index)
    assert (hca["bounded_values"], csa["bounded_values"]) == (hca_bounded, csa_bounded)
    growth = 23 * D / 128 + 20 * (D + Di) / 4  # 3292 values / token
    assert flash["bytes_at"][str(M)] == 2 * (growth * M + 23 * hca_bounded + 20 * csa_bounded) == 6_915_910_656
    # at T = 2^20 every pending tensor is empty: the exact count is the growth plus window and overlap rows
    exact = 2 * (growth * M + 43 * window + 20 * (2 * 4 * D + 2 * 4 * Di))
    assert flash["exact_bytes_at"][str(M)] == exact == 6_909_621_248
    mla = table["latent (c_kv + k_pe)"]["bytes_at"][str(M)]
    assert mla == 576 * 61 * 2 * M and flash["vs_mla_at"][str(M)] == flash["bytes_at"][str(M)] / mla
    text = format_cache_table(table, "DeepSeek-V3 671B")
    assert "deepseek-v4-flash" in text and "deepseek-v4-pro" in text and "6.44 GiB" in text
