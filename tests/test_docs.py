"""The docs cannot rot (issue #25): every ``python`` block in README.md and
docs/*.md runs here, and the figures they quote that come from code follow it.

A block is preceded by ``<!-- snippet: SETUP -->``, SETUP one of

* ``single``: this process;
* ``ranks``: 2 gloo ranks (tests/distributed.py) with torchrun's environment
  (``LOCAL_WORLD_SIZE`` ...); the harness has joined them already, so the
  block's own ``dist.init_process_group`` is checked (a backend this device
  runs) and answered by the harness's group;
* ``deepspeed``: the same ranks with DeepSpeed's CPU accelerator;
* ``trainer``: this process, ``model`` a tiny GPT-2 and ``dataset`` rows
  of ``input_ids``/``labels``.

One fixture fills in what a user's script has: ``torch`` and ``zero_sf``
imported, ``model`` (launch/gpt.py's GPT,
seeded alike on every rank), ``loader`` (3 batches, other data on each rank),
``loss_fn``, ``evaluate`` and, for ``single``, an ``opt`` in train mode.
Each block runs in a fresh namespace in an empty directory (``ckpt``, ``out``
are its own; ``launch/ds_config.json`` is copied in).  A block that trains
must change the model's weights.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
SETUPS = ("single", "ranks", "deepspeed", "trainer")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_LABEL = re.compile(r"<!-- snippet: (\w+) -->\n$")


def blocks():
    """(file, line, setup, code) of every python block; setup None when
    the block has no label."""
    out = []
    for rel in DOCS:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for m in _BLOCK.finditer(text):
            before = text[:m.start()]
            label = _LABEL.search(before[-60:])
            out.append((rel, before.count("\n") + 1, label.group(1) if label else None, m.group(1)))
    return out


BLOCKS = blocks()


def test_every_python_block_names_a_setup():
    assert len(BLOCKS) >= 9  # README's example and docs/usage.md's eight
    bad = [f"{rel}:{line}: {setup!r}" for rel, line, setup, _ in BLOCKS if setup not in SETUPS]
    assert bad == [], f"label each python block <!-- snippet: one of {SETUPS} -->: {bad}"


# --------------------------------------------------------------------------
# The fixture
# --------------------------------------------------------------------------

def _gpt():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        from gpt import GPT
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    return GPT(dim=32, layers=2, heads=2, seq=16, vocab=64)


def _loss_fn(logits, y):
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def _namespace(rank: int) -> dict:
    model = _gpt()
    gen = torch.Generator().manual_seed(100 + rank)
    loader = []
    for _ in range(3):
        tokens = torch.randint(0, 64, (4, 17), generator=gen)
        loader.append((tokens[:, :-1], tokens[:, 1:]))
    held_out = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(7))

    @torch.no_grad()
    def evaluate(m):
        return _loss_fn(m(held_out[:, :-1]), held_out[:, 1:]).item()

    import zero_sf
    return {"__name__": "__snippet__", "torch": torch, "zero_sf": zero_sf, "model": model,
            "loader": loader, "loss_fn": _loss_fn, "evaluate": evaluate}


def _weights(model) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's DTensors
        out.append(full.detach().float().clone())
    return out


def _assert_trained(code: str, before, model) -> None:
    if "loader" in code or ".train(" in code:
        after = _weights(model)
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), \
            "the snippet trains, but the model's weights did not change"


def _exec(code: str, ns: dict, where: str) -> None:
    before = _weights(ns["model"])
    exec(compile(code, where, "exec"), ns)  # noqa: S102 - the docs' own code
    _assert_trained(code, before, ns["model"])


def _in(tmp: str):
    os.makedirs(os.path.join(tmp, "launch"), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "launch", "ds_config.json"), os.path.join(tmp, "launch"))


class _joined:
    """``dist.init_process_group`` inside a block: the harness's ranks are
    joined already; check the backend the block asks for and keep the group."""

    def __enter__(self):
        import torch.distributed as dist
        self.real = dist.init_process_group

        def init_process_group(backend=None, *args, **kwargs):
            expected = "nccl" if torch.cuda.is_available() else "gloo"
            assert backend in (None, expected), f"backend {backend!r} on this device"
            assert dist.is_initialized()

        dist.init_process_group = init_process_group
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        dist.init_process_group = self.real


def _on_ranks(rank, world_size, code, where, tmp, setup):
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      RANK=str(rank), WORLD_SIZE=str(world_size))
    if setup == "deepspeed":
        from tests.test_deepspeed import _ds_setup
        _ds_setup(rank, world_size)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with _joined():
            _exec(code, _namespace(rank), where)
    finally:
        os.chdir(cwd)


def _trainer_namespace() -> dict:
    pytest.importorskip("transformers", reason="pip install zero-sf[integrations]")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (16,), generator=gen) for _ in range(16)]
    ns = _namespace(0)
    ns.update(model=GPT2LMHeadModel(cfg),
              dataset=[{"input_ids": r, "labels": r.clone()} for r in rows])
    return ns


@pytest.mark.parametrize("rel,line,setup,code", BLOCKS,
                         ids=[f"{rel}:{line}" for rel, line, _, _ in BLOCKS])
def test_snippet_runs(rel, line, setup, code, tmp_path, monkeypatch):
    where = f"{rel}:{line}"
    _in(str(tmp_path))
    if setup in ("ranks", "deepspeed"):
        if setup == "deepspeed":
            pytest.importorskip("deepspeed", reason="pip install zero-sf[deepspeed]")
        spawn(_on_ranks, 2, code, where, str(tmp_path), setup)
        return
    monkeypatch.chdir(tmp_path)
    if setup == "trainer":
        ns = _trainer_namespace()
    else:
        import zero_sf
        ns = _namespace(0)
        ns["opt"] = zero_sf.ScheduleFreeAdamW(ns["model"].parameters(), lr=1e-2)
        ns["opt"].train()
        for x, y in ns["loader"]:
            _loss_fn(ns["model"](x), y).backward()
            ns["opt"].step()
            ns["opt"].zero_grad()
    _exec(code, ns, where)


def test_a_broken_snippet_fails(tmp_path):
    """The runner can fail: a block that raises, and one that claims to train
    but leaves the weights alone."""
    with pytest.raises(NameError):
        _exec("opt = zero_sf.ScheduleFreeAdamW(modle.parameters())", _namespace(0), "t")
    with pytest.raises(AssertionError, match="did not change"):
        _exec("for x, y in loader:\n    pass\n", _namespace(0), "t")


# --------------------------------------------------------------------------
# Figures that come from code
# --------------------------------------------------------------------------

def _docs_text() -> str:
    return "\n".join(open(os.path.join(ROOT, rel)).read() for rel in DOCS)


def test_the_quoted_mutant_count_follows_the_mutants():
    from tools import mutants
    quoted = re.findall(r"injects (\d+) realistic bugs", _docs_text())
    assert quoted == [str(len(mutants.MUTANTS))], (quoted, len(mutants.MUTANTS))


def test_the_self_check_sample_lists_every_case():
    """docs/development.md's sample output of ``python -m zero_sf.check`` on
    CPU has a line for each case the check runs, on each CPU backend."""
    from zero_sf import check
    with open(os.path.join(ROOT, "docs", "development.md")) as f:
        sample = f.read()
    names = [name for name, _, _ in check.kernel_cases()]
    for name in names:
        assert f"PASS  kernel {name} (interpreter) vs spec" in sample, name
        assert f"PASS  cpu backend {name} vs spec" in sample, name
    kernel_lines = re.findall(r"^PASS  (?:kernel|cpu backend) ", sample, re.M)
    assert len(kernel_lines) == 2 * len(names)


# --------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------

LINKED = DOCS + ["CONTRIBUTING.md", "CHANGELOG.md"]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(root: str, files: list[str]) -> list[str]:
    """Relative links (and #anchors) in these markdown files that point
    nowhere."""
    texts = {}
    for rel in files:
        with open(os.path.join(root, rel)) as f:
            texts[rel] = _FENCE.sub("", f.read())
    bad = []
    for rel in files:
        for link in re.findall(r"\]\(([^)\s]+)\)", texts[rel]):
            if re.match(r"[a-z]+://", link):
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(root, target)):
                bad.append(f"{rel}: {link} (no such file)")
            elif anchor and target.endswith(".md"):
                if target not in texts:
                    with open(os.path.join(root, target)) as f:
                        texts[target] = _FENCE.sub("", f.read())
                heads = {_slug(h) for h in re.findall(r"^#+ (.*)$", texts[target], re.M)}
                if anchor not in heads:
                    bad.append(f"{rel}: {link} (no such heading)")
    return bad


def test_every_relative_link_resolves():
    assert broken_links(ROOT, LINKED) == []


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Sharded (`ZeroOptimizer`)\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#sharded-zerooptimizer) [gone](docs/b.md) [bad](docs/a.md#nope)\n"
        "```\n[in a fence](docs/c.md)\n```\n")
    assert broken_links(str(tmp_path), ["README.md"]) == [
        "README.md: docs/b.md (no such file)", "README.md: docs/a.md#nope (no such heading)"]
