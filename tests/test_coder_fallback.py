"""Without the C extension (an install on a machine with no C compiler) taskcodec still imports, picks the
numpy/Python coder, verifies the default bundle's golden bytes and decodes what the C coder wrote."""

import json
import subprocess
import sys

import numpy as np

from taskcodec.bundle import load_bundle
from taskcodec.coding import RangeCoder, compress

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "taskcodec.coding._tcc":
            raise ImportError("no C extension on this machine")
sys.meta_path.insert(0, Block())
"""

CHILD = BLOCK + """
import json, numpy as np
from taskcodec.coding import range_coder, RangeCoder, decompress
from taskcodec.bundle import load_bundle
b = load_bundle()
coder = RangeCoder(b.tables)
with np.load(b.file("golden")) as z:
    symbols, blob, offsets = z["symbols"], z["streams"].tobytes(), z["offsets"]
golden_ok = all(coder.compress(s, b.model_tag) == blob[offsets[i]:offsets[i + 1]] for i, s in enumerate(symbols))
payloads = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
print(json.dumps({"c": range_coder.c_available(), "backend": coder.backend, "golden_ok": bool(golden_ok),
                  "decoded": [decompress(p, coder, b.model_tag).tolist() for p in payloads]}))
"""


def test_without_the_extension_the_fallback_reads_and_writes_the_same_bytes():
    bundle = load_bundle()
    rng = np.random.default_rng(0)
    symbols = rng.integers(-3, 4, (50, bundle.latent_dim)).astype(np.int32)
    symbols[::7, 3] = 10**6  # escapes
    coder = RangeCoder(bundle.tables)  # the C coder where it is built
    payloads = [compress(s, coder, bundle.model_tag).hex() for s in symbols]
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(payloads), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["c"] is False and out["backend"] == "python" and out["golden_ok"]
    assert np.array_equal(np.array(out["decoded"]), symbols)
