"""`fedrpc` that records what each rank loaded, for tests/test_rpc.py.

    FEDRPC_PROBE_DIR=<dir> python tests/rpc_probe.py run <config> <overrides>

After the run, rank R writes <dir>/rank<R>.json: the content/encoder functions it called
and which model libraries it imported (workers must call and import none of them).
"""
import json
import os
import sys
from pathlib import Path

import fedrpc.runtime as runtime
from fedrpc.cli import main

HEAVY = ("open_clip", "transformers", "timm", "sentence_transformers", "torchvision")
calls = []


def spy(name, fn):
    def wrapped(*a, **kw):
        calls.append(name)
        return fn(*a, **kw)
    return wrapped


runtime.server_features = spy("server_features", runtime.server_features)
runtime.load_item_content = spy("load_item_content", runtime.load_item_content)

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    out = Path(os.environ["FEDRPC_PROBE_DIR"]) / f"rank{os.environ.get('RANK', '?')}.json"
    out.write_text(json.dumps({"calls": calls, "rc": rc,
                               "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
                               "encoders_loaded": sorted(m for m in sys.modules
                                                         if m.startswith("fedrpc.encoders."))}))
    sys.exit(rc)
