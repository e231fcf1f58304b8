"""runtime.keep_freed_memory: a rank reuses the memory its steps free."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# A process that sets up a federation the way `fedrpc bench round` does, then runs a
# step-like burst of tensor work (tensors of 16-32 MB, freed at the end of each step)
# and prints the page faults of one such step, averaged over 20.
STEPS = textwrap.dedent("""
    import resource, sys
    import torch
    from fedrpc.bench import build_local
    from fedrpc.config import load_config
    torch.set_num_threads(1)
    cfg = load_config(None, ["data.synthetic.users=24", "data.synthetic.items=60",
                             "data.synthetic.mean_interactions=12",
                             "runtime.keep_freed_memory=" + sys.argv[1]])
    server, workers = build_local(cfg)
    x = torch.ones(2 ** 20, 4)
    def step():
        a = x * 2.0
        b = a + x
        return float(torch.cat([a, b]).sum())
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    server.transport.close()
""")


def _faults_per_step(keep: bool) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, str(keep).lower()], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_steps_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """With runtime.keep_freed_memory (the default) a step's large tensors reuse the
    memory the previous step freed: next to no page faults, where without it every
    step faults its tensors' pages in again (4 KiB each: about 8,000 for this step)."""
    off, on = _faults_per_step(False), _faults_per_step(True)
    assert off > 2000
    assert on < off / 10
