"""benchmarks.serve_load end to end on a tiny model: every setting, every request answered once."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai", reason="the load benchmark drives the official client: pip install openai")
pytest.importorskip("fastapi", reason="the server needs FastAPI and uvicorn: pip install -e '.[serve]'")

from benchmarks import serve_load  # noqa: E402


def test_serve_load_reports_every_setting(tmp_path):
    rc = serve_load.main(["--model", "tiny:qwen2", "--defenses", "system_prompt", "--clients", "3", "--requests", "6",
                          "--rounds", "2", "--max-tokens", "3", "--max-batch", "4", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "serve_load.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows) == {s.name for s in serve_load.settings(4)}
    for r in rows.values():
        assert r["requests"] == 6 and len(r["requests_per_s_by_round"]) == 2 and r["p95_s"] >= r["p50_s"] > 0
    assert rows["bare, batching off"]["mean_batch"] == 1.0 and rows["guarded, streamed"]["mean_batch"] == 1.0
    assert result["machine"]["versions"]["torch"]
    assert "| guarded, batching on (4) | 6 |" in (tmp_path / "serve_load.md").read_text()
