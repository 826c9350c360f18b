"""No L x L tensor in the mask protocol: a tiny random Llama scores a 32K-token window under
every method within a memory bound far below one L x L matrix (4 GiB in float32, 1 GiB even as
booleans). Run in a fresh process, whose peak resident set measures this work alone."""
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

import cabattn.methods

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)

LENGTH = 32768
# Activations, logits (32K x 320 floats), the loss's copies and the block tables of a 32K
# window take about 250 MiB here; one L x L boolean mask alone would be 1024 MiB.
BOUND_MIB = 700
SCRIPT = """
import resource, sys, torch
import cabattn
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(2)
length = int(sys.argv[1])
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)).eval()
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with torch.inference_mode(), cabattn.apply(model, "h2o", 0.9):  # warm-up: libraries, pools
    model(torch.randint(320, (1, 1024)), labels=torch.randint(320, (1, 1024)))
base = peak_mib()
ids = torch.randint(320, (1, length))
for method in sys.argv[2:]:
    with torch.inference_mode(), cabattn.apply(model, method, 0.9) as stats:
        loss = float(model(ids, labels=ids).loss)
    print(method, loss, stats.density, peak_mib() - base, flush=True)
"""


def test_mask_protocol_at_32k_tokens_keeps_no_length_squared_tensor():
    names = cabattn.methods.available()
    env = subprocess_env(threads=2)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(LENGTH), *names], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"method, loss, density, peak growth (MiB) at L = {LENGTH}:\n{done.stdout}")
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [row[0] for row in rows] == list(names), done.stdout
    for method, loss, density, growth in rows:
        assert 0 < float(loss) < 20, (method, loss)
        assert float(growth) < BOUND_MIB, (f"{method} at L = {LENGTH}: peak memory grew by "
                                           f"{float(growth):.0f} MiB (bound {BOUND_MIB} MiB)")
    densities = dict((row[0], float(row[2])) for row in rows)
    assert densities["dense"] == 1.0 and densities["h2o"] < 0.3  # the sparse ones ran sparse
