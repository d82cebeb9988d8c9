#!/usr/bin/env bash
# `make dist-check`: build the sdist and the wheel, check that the sdist holds
# every tracked file (so its tests run), install the wheel into a fresh venv
# (torch first, pinned as in the Makefile), take one step with the fused CPU
# backend from it, outside the source tree, and run the self-check there.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
$PY -m build --sdist --wheel --outdir "$out/dist" . > "$out/build.log"
sdist=$(ls "$out"/dist/*.tar.gz)
wheel=$(ls "$out"/dist/*.whl)
missing=$(comm -23 <(git ls-files | sort) \
                   <(tar tzf "$sdist" | sed 's|^[^/]*/||' | sort))
if [ -n "$missing" ]; then
    echo "dist-check: the sdist lacks tracked files:"; echo "$missing"; exit 1
fi
echo "dist-check: sdist holds all $(git ls-files | wc -l) tracked files"
python3 -m venv "$out/venv"
"$out/venv/bin/python" -m pip install -q "$TORCH"
"$out/venv/bin/python" -m pip install -q "$wheel"
cd "$out"
"$out/venv/bin/python" - <<'PY'
import torch, zero_sf
from zero_sf import cpu
assert zero_sf.__file__.startswith(__import__("sys").prefix), zero_sf.__file__
p = torch.nn.Parameter(torch.ones(1000))
opt = zero_sf.ScheduleFreeAdamW([p], lr=0.1, backend="cpu")
opt.train()
p.grad = torch.ones(1000)
opt.step()
assert torch.all(p < 1), "no step taken"
print(f"dist-check: wheel installed at {zero_sf.__file__}; one fused CPU step ran")
PY
# The self-check from the wheel (no Triton there): the fused CPU backend's
# cases must run and pass, and what could not run must say so.
"$out/venv/bin/python" -m zero_sf.check --seconds 0.5 > "$out/check.txt" || {
    cat "$out/check.txt"; echo "dist-check: the self-check failed from the wheel"; exit 1; }
passed=$(grep -c '^PASS  cpu backend' "$out/check.txt" || true)
cases=$("$out/venv/bin/python" -c 'from zero_sf import check; print(len(check.kernel_cases()))')
if [ "$passed" -ne "$cases" ]; then
    cat "$out/check.txt"; echo "dist-check: $passed of $cases CPU-backend cases passed"; exit 1
fi
echo "dist-check: self-check from the wheel: $(tail -1 "$out/check.txt") ($passed CPU-backend cases)"
grep '^SKIP' "$out/check.txt" || true
