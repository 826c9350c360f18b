"""Agreement of the prefill protocol's keep sets with NVIDIA kvpress 0.5.5 (docs/baselines.md,
Agreement with kvpress).

    python scripts/compare_kvpress.py                    # 12 prompts, ratios 0.5 and 0.8
    python scripts/compare_kvpress.py --methods snapkv tova --ratios 0.5 --prompts 4

Both sides compress the same token ids: SmolLM2-135M in float32 on the CPU, `--prompts`
single-needle prompts of `--length` tokens (eval.tasks.prompt.synthetic_samples, task
niah_single, the text haystack). Each sample's context, the tokens before its
`question_start`, is what both sides compress (question-agnostic, as kvpress's pipeline does);
the question is the continuation, then `--max-new-tokens` greedy tokens.

- kvpress's side runs in a subprocess, in a virtual environment of its own (kvpress pins
  transformers < 5.3, so it can never be a dependency of the project): each press compresses
  the context inside kvpress's KVPressTextGenerationPipeline (its `_forward`, given our token
  ids), which then answers the question. The keep sets are recorded by wrapping the press's
  `compress`: a score-based press returns the kept keys themselves (gathered), so each kept
  index is found by matching them against the keys it was given; AdaKVPress keeps every key
  and marks the pruned ones in the layer's `masked_key_indices`. The answer's ids are read
  as the pipeline decodes them.
- our side: cabattn.PrefillProtocol with k_min=1, its `generate` with
  context_length=question_start, and `stats.kept_positions`.

Printed (a Markdown table): per method and compression ratio r (our sparsity s = r), the mean
budget per (layer, KV head) on each side, the share of (prompt, layer, KV head) keep sets that
are identical, the share in which one set holds the other (the same ranking at different
budgets), the mean Jaccard overlap of the sets that differ, the share that differ by the
newest context entry alone (one side keeps it in place of one other entry), the share that
differ otherwise (and in which layers), and how many of the greedy answers agree token for
token (kvpress stops after the end-of-text token; ours is cut there) and find the needle. Rows
marked with a variant remove one documented difference on our side to show that it is the
whole cause (docs/baselines.md).

The environment: `.venv-kvpress/` in the repository (git ignores it), made on the first run
and reused after: a venv of this interpreter whose own site-packages hold kvpress 0.5.5,
transformers 5.2.0 and what they need that the project's environment lacks or holds at a
version they refuse (tokenizers, huggingface_hub, pandas < 3, peft, ...: about 240 MB). It
sees the project's torch (and everything else) through a .pth file that puts the project's
site-packages *after* its own, so its older transformers shadows ours and torch is not
installed twice. pip installs into that venv only. `--venv` puts it elsewhere.
kvpress's keep sets and answers are kept in the cabattn cache folder (kvpress/<hash of the
prompts and the press>/, one per press and ratio), so a rerun computes only what is new there
and our side.
"""
import argparse
import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-kvpress"
PINS = ("kvpress==0.5.5", "transformers==5.2.0")
PTH_NAME = "cabattn-shared-site-packages.pth"

# kvpress's presses at the parameters compared: (class, keyword arguments); adakv wraps snapkv
SNAPKV = {"window_size": 64, "kernel_size": 5}
PRESSES = {
    "snapkv": ("SnapKVPress", SNAPKV),
    "streaming_llm": ("StreamingLLMPress", {"n_sink": 4}),
    "tova": ("TOVAPress", {}),
    "knorm": ("KnormPress", {}),
    "pyramidkv": ("PyramidKVPress", {**SNAPKV, "beta": 20}),
    "adakv": ("AdaKVPress", {"alpha_safeguard": 0.2}),
    "observed_attention": ("ObservedAttentionPress", {}),
    "dense": ("no press", {}),
}
# Presses whose layers keep different numbers of entries: transformers builds the question's
# sdpa mask for the first layer's length (it supports uneven layers under flash attention
# only, which the CPU lacks), so kvpress's pipeline cannot answer after them here; their keep
# sets come from the pipeline's prefill alone
NO_PIPELINE_ANSWER = {"pyramidkv": "no kvpress answer: uneven layers need flash attention"}
ADAKV_ALPHA = PRESSES["adakv"][1]["alpha_safeguard"]
OUR_SNAPKV = {"window_size": 64, "kernel_size": 5, "pooling": "avg"}
# (row label, our method, its parameters, the press compared, variant): a variant removes one
# documented difference on our side (docs/baselines.md, Agreement with kvpress)
ROWS = (
    ("snapkv", "snapkv", OUR_SNAPKV, "snapkv", None),
    ("streaming_llm", "streaming_llm", {"n_sink": 4}, "streaming_llm", None),
    ("tova", "tova", {"per_head": False}, "tova", None),
    ("knorm", "knorm", {}, "knorm", None),
    ("pyramidkv", "pyramidkv", {**OUR_SNAPKV, "beta": 20}, "pyramidkv", None),
    ("pyramidkv", "pyramidkv", {**OUR_SNAPKV, "beta": 20}, "pyramidkv", "kvpress_budgets"),
    ("adakv", "adakv", {**OUR_SNAPKV, "floor_ratio": ADAKV_ALPHA}, "adakv", None),
    ("adakv", "adakv", OUR_SNAPKV, "adakv", "kvpress_floor"),
    ("h2o", "h2o", {}, "observed_attention", None),
    ("h2o", "h2o", {"h2o_recent_ratio": 0.0}, "observed_attention", "recent_ratio_0"),
)
VARIANTS = {
    "kvpress_budgets": "at kvpress's per-layer budgets",
    "kvpress_floor": "floor = kvpress's safeguard beyond the window",
    "recent_ratio_0": "h2o_recent_ratio 0",
}


# -- kvpress's environment ------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    """kvpress's venv (the module's doc): made on first use, reused while it holds the pins."""
    python = venv_python(venv)
    if python.exists() and _pins_ok(python):
        return python
    # the project's torch: its site-packages is what the venv sees after its own
    shared = Path(torch.__file__).resolve().parent.parent
    print(f"making kvpress's environment in {venv} (seeing {shared} after its own packages)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Written before pip runs, so that pip sees the project's torch as installed and does not
    # fetch another; a package the pins need at another version than the project's goes into
    # the venv (pip never removes what lies outside the environment it installs into).
    (Path(site) / PTH_NAME).write_text(f"{shared}\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True)
    if not _pins_ok(python):
        raise SystemExit(f"{venv}: the pins {PINS} do not import after installing them")
    return python


def _pins_ok(python: Path) -> bool:
    check = ("import importlib.metadata as m, sys; "
             f"pins = {[p.split('==') for p in PINS]!r}; "
             "sys.exit(any(m.version(n) != v for n, v in pins))")
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


# -- kvpress's side (runs in its venv: imports neither cabattn nor eval) ---------------------

def kvpress_worker(request_path: Path, out_dir: Path) -> None:
    """Runs every job (a press at a ratio) of the request on every prompt; writes, per job,
    KEY.npz (kept: bool [P, layers, Hkv, n], True where kept) then KEY.json (the answer ids
    per prompt, or None, and the versions)."""
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(1)
    transformers.logging.disable_progress_bar()
    request = json.loads(request_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    answer_ids = []
    decode = tokenizer.decode

    def recording_decode(ids, *args, **kwargs):  # the pipeline decodes each answer once
        answer_ids.append([int(i) for i in ids])
        return decode(ids, *args, **kwargs)

    tokenizer.decode = recording_decode
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    width = max(len(p["context"]) for p in request["prompts"])
    versions = {"kvpress": importlib.metadata.version("kvpress"),
                "transformers": transformers.__version__, "torch": torch.__version__}
    for job in request["jobs"]:
        start = time.perf_counter()
        press = _make_press(kvpress, job["press"], job["ratio"])
        # ObservedAttentionPress reads the attention weights, which only eager returns;
        # AdaKVPress refuses eager; the others compute what they read themselves
        model.set_attn_implementation("eager" if job["press"] == "observed_attention"
                                      else "sdpa")
        kept = np.zeros((len(request["prompts"]), layers, hkv, width), dtype=bool)
        answers = []
        for p, prompt in enumerate(request["prompts"]):
            context = torch.tensor([prompt["context"]])
            kept[p, :, :, :context.shape[1]] = True  # what a layer no press compressed keeps
            with _recording(press, kept[p]), torch.inference_mode():
                if job["press"] in NO_PIPELINE_ANSWER:  # the pipeline's prefill alone
                    with press(model):
                        model.model(input_ids=context, past_key_values=DynamicCache())
                    answers.append(None)
                    continue
                answer_ids.clear()
                pipe._forward({"context_ids": context,
                               "questions_ids": [torch.tensor([prompt["question"]])]},
                              max_new_tokens=request["max_new_tokens"], press=press)
                answers.append(answer_ids[0])
        np.savez_compressed(out_dir / f"{job['key']}.npz", kept=kept)
        (out_dir / f"{job['key']}.json").write_text(json.dumps({"answers": answers,
                                                                 **versions}))
        print(f"  kvpress {job['key']}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def _make_press(kvpress, name: str, ratio: float):
    if name == "dense":
        return None
    cls, params = PRESSES[name]
    if name == "adakv":  # AdaKVPress shares out the scores of the press it wraps
        return kvpress.AdaKVPress(press=kvpress.SnapKVPress(compression_ratio=ratio, **SNAPKV),
                                  **params)
    return getattr(kvpress, cls)(compression_ratio=ratio, **params)


def _rows_of(rows, table):
    """int [H, k]: for every row of rows [H, k, d], its index among table's rows [H, n, d]
    (float32), found by an integer hash of its bits (exact, whatever the shapes; a float
    product may round differently in a matrix of another shape) and checked to be the one
    identical row."""
    coefficients = torch.randint(1, 2 ** 62, (table.shape[-1],),
                                 generator=torch.Generator().manual_seed(0))

    def hashed(x):  # int64 arithmetic wraps around: exact and order-free
        return (x.contiguous().view(torch.int32).long() * coefficients).sum(-1)

    hashes, order = hashed(table).sort(-1)
    index = order.gather(-1, torch.searchsorted(hashes, hashed(rows))
                         .clamp(max=table.shape[1] - 1))
    found = table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))
    if not bool((found == rows).all()) or bool((index.sort(-1).values.diff(dim=-1) == 0).any()):
        raise RuntimeError("a kept key is not one of the keys the press was given")
    return index.numpy()


class _recording:
    """Wraps press.compress for one prompt: mask [layers, Hkv, n] of the context's entries,
    set to what each layer kept."""

    def __init__(self, press, mask):
        self.press, self.mask = press, mask

    def __enter__(self):
        if self.press is not None:
            self.compress = self.press.compress
            self.press.compress = self.record
        return self

    def __exit__(self, *exc):
        if self.press is not None:
            del self.press.compress  # the class's method again
        return False

    def record(self, module, hidden_states, keys, values, attentions, kwargs):
        out_keys, out_values = self.compress(module, hidden_states, keys, values, attentions,
                                             kwargs)
        mask = self.mask[module.layer_idx]
        pruned = getattr(module, "masked_key_indices", None)
        if out_keys.shape[2] == keys.shape[2] and pruned is not None:  # AdaKVPress
            batch, head, seq = (t.cpu().numpy() for t in pruned)
            mask[head[batch == 0], seq[batch == 0]] = False
        else:  # the kept keys are gathered copies: find each among the keys given
            mask[:] = False
            heads = np.arange(keys.shape[1])[:, None]
            mask[heads, _rows_of(out_keys[0], keys[0])] = True
        return out_keys, out_values


def kvpress_side(python: Path, request: dict):
    """({job key: kvpress's kept mask}, {job key: its answers and versions}) of the request's
    jobs: from the cabattn cache folder (kvpress/<hash of the job and the prompts>) where a
    run left them, the rest computed by kvpress_worker in kvpress's venv."""
    from eval.cache import atomic_path, cache_dir
    common = {name: value for name, value in request.items() if name != "jobs"}
    folder = {job["key"]: cache_dir() / "kvpress" / hashlib.sha256(json.dumps(
        {**common, "job": job, "pins": PINS}, sort_keys=True).encode()).hexdigest()[:16]
        for job in request["jobs"]}
    missing = [job for job in request["jobs"] if not (folder[job["key"]] / "run.json").is_file()]
    if missing:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            (scratch / "request.json").write_text(json.dumps({**common, "jobs": missing}))
            subprocess.run([str(python), str(Path(__file__).resolve()), "--kvpress-worker",
                            str(scratch / "request.json"), str(scratch)],
                           check=True, cwd=scratch)
            for job in missing:  # run.json last: a folder holding it is whole
                for suffix, name in (("npz", "kept.npz"), ("json", "run.json")):
                    with atomic_path(folder[job["key"]] / name) as path:
                        shutil.copyfile(scratch / f"{job['key']}.{suffix}", path)
    kept, runs = {}, {}
    for key, entry in folder.items():
        with np.load(entry / "kept.npz") as npz:
            kept[key] = npz["kept"]
        runs[key] = json.loads((entry / "run.json").read_text())
    return kept, runs


# -- our side --------------------------------------------------------------------------------

def our_side(model, samples, jobs, max_new_tokens: int):
    """({job key: bool [P, layers, Hkv, n] kept}, {job key: [answer ids per prompt]}) for
    jobs [(key, the method of each prompt, sparsity)], through cabattn.PrefillProtocol; each
    prompt's dense prefill is shared between the jobs."""
    import cabattn

    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    width = max(s.question_start for s in samples)
    kept = {key: np.zeros((len(samples), layers, hkv, width), dtype=bool) for key, *_ in jobs}
    answers = {key: [] for key, *_ in jobs}
    seconds = dict.fromkeys(kept, 0.0)
    for p, sample in enumerate(samples):
        store = cabattn.PrefillStore.for_methods([methods[p] for _, methods, _ in jobs],
                                                 max_bytes=2 ** 31)
        prompt = torch.tensor([sample.prompt_ids])
        for key, methods, sparsity in jobs:
            start = time.perf_counter()
            protocol = cabattn.PrefillProtocol(model, methods[p], sparsity, k_min=1,
                                               context_length=sample.question_start,
                                               prefill_store=store)
            with protocol as stats, torch.inference_mode():
                new = protocol.generate(prompt, max_new_tokens,
                                        context_length=sample.question_start)
            for layer, positions in enumerate(stats.kept_positions):
                for head, row in enumerate(positions[0]):
                    kept[key][p, layer, head, row[row >= 0].numpy()] = True
            answers[key].append(new[0].tolist())
            seconds[key] += time.perf_counter() - start
    for key, value in seconds.items():
        print(f"  ours {key}: {value:.0f} s", file=sys.stderr)
    return kept, answers


def our_jobs(rows, ratios, samples, theirs):
    """Our jobs for the rows: (key, the method for prompt p, our sparsity). theirs: kvpress's
    kept masks, which the variants read kvpress's budgets from."""
    from dataclasses import dataclass
    from cabattn.grid import token_budget
    from cabattn.methods import get_method
    from cabattn.methods.base import param
    from cabattn.methods.pyramidkv import PyramidKV

    @dataclass
    class GivenLayerBudgets(PyramidKV):
        """pyramidkv's rule at given per-layer budgets (kvpress's)."""
        budgets: tuple = param((), "K_l of every layer")

        def layer_budget(self, budget, layer_idx, num_layers, length):
            return self.budgets[layer_idx]

    window = OUR_SNAPKV["window_size"]
    jobs = []
    for label, method, params, press, variant in rows:
        for ratio in ratios:
            per_head = theirs[job_key(press, ratio)].sum(-1)  # kvpress's [P, layers, Hkv]
            if variant == "kvpress_budgets":
                methods = [GivenLayerBudgets(**params, budgets=tuple(map(int, k[:, 0])))
                           for k in per_head]
            elif variant == "kvpress_floor":
                # AdaKVPress.compress: each head first keeps its int(alpha * n_kept) best
                # entries, among them the observation window (scored above everything), so
                # what the floor holds beyond the window is the rest of them; ours is
                # round(floor_ratio * (K - w)) beyond the window
                methods = []
                for k, sample in zip(per_head, samples):
                    n_kept = int(k[0].sum()) // k.shape[1]
                    beyond = max(0, int(n_kept * ADAKV_ALPHA) - window)
                    budget = token_budget(sample.question_start, ratio, 1)
                    methods.append(get_method(method, **params,
                                              floor_ratio=beyond / (budget - window)))
            else:
                methods = [get_method(method, **params)] * len(samples)
            jobs.append((job_key(label, ratio, variant), methods, ratio))
    return jobs


def job_key(label: str, ratio: float, variant=None) -> str:
    return f"{label}@{ratio:g}" + (f"+{variant}" if variant else "")


# -- comparison -------------------------------------------------------------------------------

def compare(ours, theirs, newest) -> dict:
    """Per (prompt, layer, KV head) agreement of two bool masks [P, layers, Hkv, n]; newest:
    the newest context entry of each prompt [P]."""
    only_ours, only_theirs = ours & ~theirs, theirs & ~ours
    n_ours, n_theirs = only_ours.sum(-1), only_theirs.sum(-1)
    identical = (n_ours == 0) & (n_theirs == 0)
    nested = (n_ours == 0) | (n_theirs == 0)
    at_newest = np.take_along_axis(only_ours | only_theirs, newest[:, None, None, None],
                                   -1)[..., 0]
    newest_swap = (n_ours == 1) & (n_theirs == 1) & at_newest
    other = ~nested & ~newest_swap
    jaccard = (ours & theirs).sum(-1) / np.maximum((ours | theirs).sum(-1), 1)
    return {
        "k_ours": ours.sum(-1).mean(), "k_theirs": theirs.sum(-1).mean(),
        "identical": identical.mean(), "nested": nested.mean(),
        "jaccard": jaccard[~identical].mean() if (~identical).any() else None,
        "newest_swap": newest_swap.mean(), "other": other.mean(),
        "other_layers": sorted({int(layer) for layer in np.nonzero(other)[1]}),
    }


def answers_agree(loaded, samples, ours, run, press: str) -> str:
    """"agree | needle ours / kvpress" cells: how many greedy answers agree token for token
    (kvpress's pipeline stops after the end-of-text token: ours is cut there) and how many
    hold the needle."""
    if run["answers"][0] is None:
        return f"- | - / - ({NO_PIPELINE_ANSWER[press]})"
    eos = loaded.model.generation_config.eos_token_id
    agree = found_ours = found_theirs = 0
    for sample, mine, theirs in zip(samples, ours, run["answers"]):
        if eos in mine:
            mine = mine[:mine.index(eos) + 1]
        agree += mine == theirs
        found_ours += _holds_needle(loaded.tokenizer, mine, sample)
        found_theirs += _holds_needle(loaded.tokenizer, theirs, sample)
    return f"{agree}/{len(samples)} | {found_ours} / {found_theirs}"


def _holds_needle(tokenizer, ids, sample) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(answer in text for answer in sample.answers)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted({row[0] for row in ROWS})
    parser.add_argument("--methods", nargs="+", default=names, choices=names,
                        help="our methods to compare, each with its variants (default: all)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.8],
                        help="kvpress's compression ratios r (our sparsity s = r)")
    parser.add_argument("--prompts", type=int, default=12, help="niah_single samples")
    parser.add_argument("--length", type=int, default=1024,
                        help="tokens of each prompt and its answer (niah_single)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42, help="the samples' seed")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help="kvpress's virtual environment (made when missing)")
    parser.add_argument("--kvpress-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kvpress_worker:
        kvpress_worker(*args.kvpress_worker)
        return 0
    started = time.perf_counter()
    python = ensure_venv(args.venv)
    sys.path.insert(0, str(REPO))
    import transformers
    from cabattn.methods import get_method
    from eval.models import converted_default_folder, load_model
    from eval.tasks.prompt import synthetic_samples

    torch.set_num_threads(1)
    loaded = load_model()
    samples = synthetic_samples("niah_single", loaded.tokenizer, args.length, args.prompts,
                                args.seed, haystack="text").samples
    rows = [row for row in ROWS if row[0] in args.methods]
    presses = sorted({row[3] for row in rows})
    request = {
        "model": str(converted_default_folder()), "max_new_tokens": args.max_new_tokens,
        "prompts": [{"context": s.prompt_ids[:s.question_start],
                     "question": s.prompt_ids[s.question_start:]} for s in samples],
        "jobs": [{"key": job_key(p, r), "press": p, "ratio": r}
                 for p in presses for r in args.ratios] + [
                    {"key": "dense", "press": "dense", "ratio": 0.0}],
    }
    theirs, runs = kvpress_side(python, request)
    jobs = our_jobs(rows, args.ratios, samples, theirs)
    jobs.append(("dense", [get_method("dense")] * len(samples), 0.0))
    ours, our_answers = our_side(loaded.model, samples, jobs, args.max_new_tokens)

    versions = runs["dense"]
    print(f"\n{len(samples)} niah_single prompts of {args.length} tokens (text haystack, seed "
          f"{args.seed}), contexts of {sorted({s.question_start for s in samples})} tokens; "
          f"SmolLM2-135M float32 on the CPU; {args.max_new_tokens} new tokens; "
          f"kvpress {versions['kvpress']} (transformers {versions['transformers']}), "
          f"cabattn with transformers {transformers.__version__}, torch {torch.__version__}; "
          f"{platform.node()}, {time.strftime('%Y-%m-%d')}\n")
    print("| method | r | kvpress | K ours / kvpress | identical | nested | Jaccard where "
          "they differ | newest swap | other (layers) | answers agree | needle ours / kvpress |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    newest = np.array([s.question_start - 1 for s in samples])
    rows = [(job_key(label, r, variant), job_key(press, r), label, r, press, variant)
            for label, _, _, press, variant in rows for r in args.ratios]
    rows.append(("dense", "dense", "dense", 0.0, "dense", None))
    for ours_key, their_key, label, ratio, press, variant in rows:
        stats = compare(ours[ours_key], theirs[their_key], newest)
        name = label + (f" ({VARIANTS[variant]})" if variant else "")
        jaccard = "-" if stats["jaccard"] is None else f"{stats['jaccard']:.3f}"
        layers = stats["other_layers"]
        where = (f" ({', '.join(map(str, layers))})" if len(layers) <= 3 else
                 f" ({len(layers)} layers)") if layers else ""
        print(f"| {name} | {ratio:g} | {PRESSES[press][0]} | "
              f"{stats['k_ours']:.1f} / {stats['k_theirs']:.1f} | {stats['identical']:.1%} | "
              f"{stats['nested']:.1%} | {jaccard} | {stats['newest_swap']:.1%} | "
              f"{stats['other']:.1%}{where} | "
              f"{answers_agree(loaded, samples, our_answers[ours_key], runs[their_key], press)} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
