"""kvcore's caches and files under mlx.distributed: two ranks on this machine
(``mlx.launch --backend ring -n 2``, no network) decode a tensor-parallel
sharded random model and must give the unsharded model's results, each rank
saving and reloading its own prompt cache (tests/distributed/shard_decode.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def launcher():
    beside = Path(sys.executable).with_name("mlx.launch")
    if beside.exists():
        return str(beside)
    return shutil.which("mlx.launch")


@pytest.mark.skipif(launcher() is None, reason="mlx.launch is not installed")
def test_two_ranks_decode_a_sharded_model_on_kvcore(tmp_path):
    cmd = [launcher(), "--backend", "ring", "-n", "2", sys.executable,
           str(HERE / "distributed" / "shard_decode.py"), str(tmp_path)]
    # The ranks import the kvcore this interpreter has (installed or editable).
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    results = []
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results.append(json.loads(path.read_text()))
    for rank, r in enumerate(results):
        assert (r["rank"], r["size"]) == (rank, 2)
        assert r["kv_heads"] == 1  # the model's 2 KV heads, one per rank
        assert r["sharded"] == r["reference"]
        assert r["from_file"] == r["reference"]
        assert r["same_state"]
        assert r["metadata"] == {"rank": str(rank), "size": "2"}
        assert r["forced_argmax"] == r["forced_argmax_reference"]
        assert r["forced_max_diff"] < 1e-4
    assert (tmp_path / "rank0.safetensors").exists() and (tmp_path / "rank1.safetensors").exists()
