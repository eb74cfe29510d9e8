"""numba's threading layer: TBB when the `tbb` wheel is installed (engine/threading_layer.py), and
the same bits from every layer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.threading_layer import tbb_library

# a prefill chunk beside a second sequence, then decode steps of both, on 2 threads; prints the
# layer numba chose and saves every logit
SCRIPT = """
import sys
import numba
import numpy as np
from tiller import BUILTIN_MODEL
from tiller.engine.engine import Engine, SeqRequest

eng = Engine.load(BUILTIN_MODEL, max_tokens=64, prefix_cache=False)
a, b = eng.new_sequence(), eng.new_sequence()
rng = np.random.default_rng(0)
prompt_a = rng.integers(3, eng.config.vocab_size, 45).tolist()
prompt_b = rng.integers(3, eng.config.vocab_size, 9).tolist()
out = {}
r = eng.step([SeqRequest(a, prompt_a, logits="all"), SeqRequest(b, prompt_b, logits="all")])
out["prefill_a"], out["prefill_b"] = r[0].logits, r[1].logits
for i in range(4):
    r = eng.step([SeqRequest(b, [5 + i]), SeqRequest(a, [7 + i])])
    out[f"decode_{i}"] = np.stack([x.logits for x in r])
np.savez(sys.argv[1], **out)
print(numba.threading_layer())
"""


def _run(tmp_path: Path, layer: str | None) -> tuple[str, dict[str, np.ndarray]]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["NUMBA_NUM_THREADS"] = "2"
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    path = tmp_path / f"{layer}.npz"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)
    with np.load(path) as saved:
        return done.stdout.strip().splitlines()[-1], dict(saved)


@pytest.mark.skipif(tbb_library() is None, reason="the tbb wheel is not installed here")
def test_tbb_is_the_layer_and_every_layer_gives_the_same_bits(tmp_path):
    layer, want = _run(tmp_path, None)
    assert layer == "tbb"
    for other in ("omp", "workqueue"):
        chosen, got = _run(tmp_path, other)
        assert chosen == other
        assert want.keys() == got.keys()
        for key in want:
            assert np.array_equal(want[key], got[key]), (other, key)
