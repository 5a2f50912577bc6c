"""The bandwidth scenario end to end, small: it runs, counts every frame, and its figures
say what the features do (compact and deflate shrink the bytes per update)."""

from __future__ import annotations

from bench import bandwidth


async def test_the_bandwidth_scenario_measures_every_mode() -> None:
    result = await bandwidth.run(clients=4, rate=20.0, window=0.5, updates=6,
                                 cpu_payloads=("cbor_number",))
    assert [row["payload"] for row in result["bytes"]] == list(bandwidth.PAYLOADS)
    for row in result["bytes"]:
        assert row["coap_bytes"] > row["payload_bytes"]
        sizes = {mode: row[f"{mode}_bytes"] for mode in bandwidth.MODES}
        assert sizes["json_compact"] < sizes["json"], row
        assert sizes["json_deflate"] < sizes["json"], row
        assert sizes["compact_deflate"] <= sizes["json_compact"], row
    assert [row["mode"] for row in result["cpu"]] == list(bandwidth.MODES)
    for row in result["cpu"]:
        assert row["frames"] == row["expected_frames"], row
        assert (row["compressed_frames"] > 0) == bandwidth.MODES[row["mode"]]["deflate"], row
    assert result["memory"]["deflate_bytes_per_connection"] is not None
