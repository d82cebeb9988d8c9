"""Curated mutation testing: realistic bugs, one at a time, each with the
tests that must catch it (``make mutants``; minutes on 2 cores, so not part
of the default test run).

Each mutant replaces one snippet (which must occur exactly once) in a copy
of the tracked tree, runs its tests there, and is *killed* when they fail.
A surviving mutant is either an equivalent one (say why, in its entry) or a
blind spot of the suite: add a test.  Exit status 1 when any survives.

    python tools/mutants.py            # all
    python tools/mutants.py -k sharding   # those whose name contains the word
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

# (name, file, old snippet, new snippet, tests that must fail)
MUTANTS = [
    # -- the math (spec.py): tested against torch.optim and schedulefree
    ("spec: bias correction one step late", "zero_sf/spec.py",
     "bias_correction2=1.0 - beta2 ** (k + 1),", "bias_correction2=1.0 - beta2 ** (k + 2),",
     ["tests/optim/test_schedule_free.py", "tests/test_spec.py"]),
    ("spec: weight decay evaluated at z", "zero_sf/spec.py",
     "u.add_(y32, alpha=weight_decay)", "u.add_(z, alpha=weight_decay)",
     ["tests/optim/test_schedule_free.py", "tests/test_spec.py"]),
    ("spec: y not averaged towards z", "zero_sf/spec.py",
     "y32.lerp_(z32, ck)", "y32.lerp_(z32, 0.0)",
     ["tests/optim/test_schedule_free.py", "tests/test_spec.py"]),
    # -- compressed state (issue #14)
    ("storage: stochastic rounding adds the random bits to the kept half", "zero_sf/storage.py",
     "b = (b + (bits & 0xFFFF)) & 0xFFFF0000", "b = (b + (bits & 0xFFFF0000)) & 0xFFFF0000",
     ["tests/test_compressed.py", "tests/optim/test_compressed_state.py"]),
    ("storage: the remainder split rounds ties down", "zero_sf/storage.py",
     "hi = ((b >> 16) + (lo >= 0x8000).to(torch.int64)) & 0xFFFF",
     "hi = ((b >> 16) + (lo > 0x8000).to(torch.int64)) & 0xFFFF",
     ["tests/test_compressed.py"]),
    ("cpu: remainder join forgets the rounding carry", "zero_sf/cpu/zsf_cpu.c",
     "uint32_t hi = (uint16_t)(p[i] - (lo >= 0x8000u ? 1u : 0u));", "uint32_t hi = (uint16_t)p[i];",
     ["tests/test_compressed.py"]),
    ("cpu: v rounded with z's random bits", "zero_sf/cpu/zsf_cpu.c",
     "store_state(a, k->p[3], v, rb0, 1, off, m); /* LANE_V */",
     "store_state(a, k->p[3], v, rb0, 0, off, m); /* LANE_V */",
     ["tests/test_compressed.py"]),
    ("kernel: v rounded with z's random bits", "zero_sf/kernels/triton_kernels.py",
     "_store_state(v_ptr, offs, v, mask, r, True, SR)", "_store_state(v_ptr, offs, v, mask, r, False, SR)",
     ["tests/test_compressed.py"]),
    ("kernel: stochastic rounding ignores the index's high half", "zero_sf/kernels/triton_kernels.py",
     "return _mix32(_mix32(idx.to(tl.uint32) ^ k) ^ (idx >> 32).to(tl.uint32))",
     "return _mix32(_mix32(idx.to(tl.uint32) ^ k))",
     ["tests/test_compressed.py"]),
    # -- issue #21: users' configurations, killed by the scenario generator
    ("sharding: the fp32 master named like the constructor flag (issue #21, item 1)",
     "zero_sf/sharding/params.py",
     "if (master and state_dtype_for(flat) != flat.dtype) or offload:\n"
     "                    y32 = torch.cat(",
     "if (master and state_dtype_for(flat) != flat.dtype) or offload:\n"
     "                    y32 = master = torch.cat(",
     ["tests/test_scenarios.py"]),
    ("offload: a switch copies the uninitialized host staging into the model (item 2)",
     "zero_sf/sharding/zero.py",
     "            self.weights.master_to_model()\n        self.weights.gather(",
     "            self.staging.outs_to_device()\n        self.weights.gather(",
     ["tests/test_scenarios.py"]),
    ("fsdp2: an empty local shard keeps its stochastic-rounding counter (item 3)",
     "zero_sf/dispatch.py",
     "store.sr,\n                                   _pick(store.index_bases, keep))",
     "store.sr,\n                                   store.index_bases)",
     # the 100 default torch seeds no longer draw the FSDP2 case that caught
     # it (200 did); the pinned users' configurations do
     ["tests/integrations/test_fsdp.py", "tests/test_scenarios.py"]),
    ("optim: a user's write keeps the old remainder", "zero_sf/optim/compressed.py",
     "                rem.zero_()\n", "                pass\n",
     ["tests/optim/test_compressed_state.py"]),
    ("sharding: every rank numbers its chunks from 0", "zero_sf/sharding/zero.py",
     "first[b.slots[0].index] + self.rank * b.chunk for b", "first[b.slots[0].index] for b",
     ["tests/sharding/test_zero_compressed.py"]),
    ("sharding: a user's write keeps the old remainders", "zero_sf/sharding/zero.py",
     "                rem[lo:hi].zero_()", "                pass",
     ["tests/sharding/test_zero_compressed.py"]),
    ("checkpoint: the loaded master is not split back", "zero_sf/checkpoint/reshard.py",
     "    view.store_master(joined)\n", "",
     ["tests/sharding/test_zero_compressed.py"]),
    ("deepspeed: partitions not numbered", "zero_sf/integrations/deepspeed.py",
     "    _bind_partition_bases(out[0])\n", "",
     ["tests/test_deepspeed.py::test_bf16_state_from_the_config_matches_single_process_bit_for_bit"]),
    # -- the kernels: tested against the spec under TRITON_INTERPRET=1
    ("kernel: eps inside the square root (SF-AdamW)", "zero_sf/kernels/triton_kernels.py",
     "denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps",
     "denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2) + eps)",
     ["tests/kernels"]),
    ("kernel: centred variance with the wrong sign", "zero_sf/kernels/triton_kernels.py",
     "avg = v - gavg * gavg", "avg = v + gavg * gavg", ["tests/kernels"]),
    ("kernel: a tensor's last partial block runs unmasked", "zero_sf/kernels/triton_kernels.py",
     "return offs, offs < n, (pid + 1) * BLOCK <= n", "return offs, offs < n, pid * BLOCK <= n",
     ["tests/kernels/test_triton_kernels.py"]),
    # -- the kernels as a GPU compiles them (tests/kernels/test_compile.py, no GPU needed)
    ("kernel launch: FMA contraction back on", "zero_sf/kernels/host.py",
     "LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)",
     "LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=True)",
     ["tests/kernels/test_compile.py"]),
    ("kernel: multi-tensor full chunks lose their alignment hint",
     "zero_sf/kernels/triton_kernels.py",
     "        p = tl.multiple_of(p, 16)\n", "        p = p\n",
     ["tests/kernels/test_compile.py"]),
    ("kernel launch: unaligned tensors sent down the unmasked path", "zero_sf/kernels/host.py",
     "full = aligned[t] and start + BLOCK <= n", "full = start + BLOCK <= n",
     ["tests/kernels/test_triton_kernels.py"]),
    # -- the fused CPU backend: bit for bit against the spec
    ("cpu: the second moment's addcmul not fused as torch fuses it", "zero_sf/cpu/zsf_cpu.c",
     "float vi = fmaf(c * gi, gi, v[i] * beta2);", "float vi = v[i] * beta2 + c * gi * gi;",
     ["tests/cpu"]),
    ("cpu: the last claimed chunk of a job skipped", "zero_sf/cpu/zsf_cpu.c",
     "        if (b >= j->nblocks) break;\n", "        if (b + j->claim >= j->nblocks) break;\n",
     ["tests/cpu", "tests/sharding/test_zero.py::test_offload_cpu_equals_no_offload"]),
    ("offload: the gradient shard never reaches the host", "zero_sf/sharding/zero.py",
     "                self.staging.grads_to_host()\n", "                pass\n",
     ["tests/sharding/test_zero.py::test_offload_cpu_equals_no_offload"]),
    # -- the optimizers' bookkeeping
    ("RMSProp: the first parameter's step count for the whole group", "zero_sf/optim/rmsprop.py",
     'by_step.setdefault(int(self.state[p]["step"]), []).append(p)',
     'by_step.setdefault(int(self.state[params[0]]["step"]), []).append(p)',
     ["tests/optim/test_rmsprop.py"]),
    # -- sharding: tested against single processes fed the averaged gradients
    ("sharding: grad_scale without 1/dp_size", "zero_sf/sharding/zero.py",
     "grad_scale = (self._clip_coef or 1.0) / self.dp_size",
     "grad_scale = (self._clip_coef or 1.0)",
     ["tests/sharding/test_zero.py::test_matches_single_process"]),
    ("sharding: stage 1 leaves the last bucket unreduced", "zero_sf/sharding/grads.py",
     "for b, chunk in zip(buf.buckets, self.chunks[bi]):  # in place",
     "for b, chunk in zip(buf.buckets[:-1], self.chunks[bi][:-1]):  # in place",
     ["tests/sharding/test_zero.py::test_matches_single_process"]),
    ("sharding: stage 2 micro-batches overwrite instead of adding", "zero_sf/sharding/grads.py",
     "chunk.add_(out)", "chunk.copy_(out)",
     ["tests/sharding/test_zero.py::test_matches_single_process"]),
    ("sharding: stage 1 ignores a gradient the user replaced", "zero_sf/sharding/grads.py",
     "view.copy_(grad.reshape(-1))", "pass",
     ["tests/sharding/test_grads.py"]),
    ("sharding: stage 2 zero_grad leaves the reduced sum", "zero_sf/sharding/grads.py",
     "self.chunks[bi][bk][own.in_chunk].zero_()", "pass",
     ["tests/sharding/test_grads.py"]),
    ("sharding: weights written by the user are not seen", "zero_sf/sharding/params.py",
     "elif force or p._version != self._versions[i]:", "elif force:",
     ["tests/sharding/test_params.py"]),
    ("sharding: the master takes the model's bf16 value everywhere", "zero_sf/sharding/params.py",
     "touched = model != master.to(model.dtype)", "touched = model == model",
     ["tests/sharding/test_params.py", "tests/test_checkpoint.py::test_save_at_4_load_at"]),
    ("sharding: ranks that disagree are not detected", "zero_sf/sharding/agreement.py",
     "    return any(world_size * sums[1 + 2 * j] != sums[2 * j] ** 2 for j in range(3))",
     "    return False",
     ["tests/sharding/test_params.py"]),
    # -- checkpoints
    ("checkpoint: a bf16 model's master from its rounded weights, not the saved fp32 ones",
     "zero_sf/checkpoint/reshard.py",
     'torch.empty_like(v, device="cpu", dtype=entries[f"model.{k}"].properties.dtype)',
     'torch.empty_like(v, device="cpu")',
     ["tests/test_checkpoint.py::test_resume_across_parameter_dtypes_and_from_a_version_path"]),
    ("checkpoint: the lr of the last step is saved", "zero_sf/sharding/state_view.py",
     "self.hyper.push()  # what param_groups hold now", "pass  # what param_groups hold now",
     ["tests/test_checkpoint.py"]),
    ("checkpoint: checksums not verified", "zero_sf/checkpoint/verify.py",
     "if crcs.get(key) != crc(t):", "if False:",
     ["tests/test_checkpoint.py::test_flipped_bytes_inside_a_tensor_fail_its_checksum"]),
    ("checkpoint: negative second moments accepted", "zero_sf/checkpoint/verify.py",
     "if key in NONNEGATIVE and (t < 0).any():", "if False:",
     ["tests/test_checkpoint.py"]),
    # -- DeepSpeed
    # -- y/x through wrappers and trainers
    ("modes: a DeepSpeed model does not follow the optimizer's switches", "zero_sf/modes.py",
     "            cur.optimizer.add_switch_hook(cur.update_lp_params)\n", "            pass\n",
     ["tests/test_deepspeed.py::test_config_and_client_routes_match_single_process",
      "tests/integrations/test_transformers.py::test_trainer_deepspeed_route_saves_x_and_resumes_exactly"]),
    ("transformers: the Trainer saves without switching to x", "zero_sf/integrations/transformers.py",
     "            self._resolve(optimizer).eval()\n", "            pass\n",
     ["tests/integrations/test_transformers.py"]),
    ("deepspeed: load_checkpoint skips the fp32 partition", "zero_sf/integrations/deepspeed.py",
     "part.copy_(cut(flats[i], size))", "pass",
     ["tests/test_deepspeed.py::test_checkpoint_save_at_2_load_at"]),
    ("deepspeed: load_checkpoint resets the loss scaler", "zero_sf/integrations/deepspeed.py",
     "zopt._load_global_state(sds[0])", "pass",
     ["tests/test_deepspeed.py"]),
    # -- DeepSpeed ZeRO-3 (issue #23)
    ("split step: a continuing call does not rewind the scalars", "zero_sf/optim/split_step.py",
     "            for g, s in zip(groups, self.start):\n                g.update(s)\n",
     "            pass\n",
     ["tests/optim/test_split_step.py"]),
    # (Skipping the persistent parameters' all-gather is an equivalent
    # mutant: the release before it makes the next forward gather them.)
    ("zero3: a switch leaves the model's partitions at the old weights",
     "zero_sf/integrations/deepspeed_zero3.py",
     "            z._reassign_or_swap_out_partitioned_parameters(i)\n", "            pass\n",
     ["tests/integrations/test_deepspeed_zero3.py::test_zero3_matches_single_process_in_train_and_eval_mode"]),
    ("zero3: every partition's slices numbered from the parameter's start",
     "zero_sf/integrations/deepspeed_zero3.py",
     "first[id(p)] + start))", "first[id(p)]))",
     ["tests/integrations/test_deepspeed_zero3.py::test_bf16_state_matches_single_process_bit_for_bit"]),
    ("zero3: a loaded step count shared by every partition (scenario seed 5074)",
     "zero_sf/integrations/deepspeed_zero3.py",
     "state[key] = value.clone() if torch.is_tensor(value) else value", "state[key] = value",
     ["tests/integrations/test_deepspeed_zero3.py::test_rmsprop_under_zero3_matches_single_process_and_resumes"]),
    ("zero3: load_checkpoint cuts every rank's slice from the start",
     "zero_sf/integrations/deepspeed_zero3.py",
     "piece = whole[j][rank * size:(rank + 1) * size]", "piece = whole[j][:size]",
     ["tests/integrations/test_deepspeed_zero3.py::test_checkpoint_save_at_2_load_at"]),
    # -- issue #24: the overlapped parameter all-gather.  (Removing the wait
    # in ZeroOptimizer.adopt_model_writes alone is an equivalent mutant:
    # every path behind it -- the sync gather of eval/train and checkpoint
    # loads, start_gather, model.state_dict()'s hooks -- finishes first too.
    # eval()/train() are safe even with finish_gather a no-op: their own
    # synchronous gather rewrites every bucket after the pending ones, on
    # the same group; the save and model.state_dict() are not.)
    ("prefetch: model.state_dict() does not wait for the pending gathers",
     "zero_sf/sharding/prefetch.py",
     "    def _finish(self, *_hook_args) -> None:\n        self.weights.finish_gather()",
     "    def _finish(self, *_hook_args) -> None:\n        pass",
     ["tests/sharding/test_prefetch.py"]),
    ("params: the pending gathers not waited for before eval/save (finish_gather a no-op)",
     "zero_sf/sharding/params.py",
     "        if not self.gathering:\n            return\n        self.launch(len(self._queue))",
     "        return",
     ["tests/sharding/test_prefetch.py"]),
    ("prefetch: a module's forward does not wait for its buckets", "zero_sf/sharding/prefetch.py",
     "            if self.weights.wait(key):", "            if False:",
     ["tests/sharding/test_prefetch.py"]),
    # -- issue #24: hierarchical sharding
    ("topology: the replicas' all-reduce of the shard skipped", "zero_sf/sharding/grads.py",
     "        if self.replicate_group is not None:\n            comm.all_reduce_sum(chunk, self.replicate_group)",
     "        pass",
     ["tests/sharding/test_hierarchical.py"]),
    ("topology: every replica adds its shard's squares to the norm", "zero_sf/sharding/zero.py",
     "        if self._replica_rank == 0:  # the other replicas hold the same shards",
     "        if True:",
     ["tests/sharding/test_hierarchical.py"]),
]


def _tracked(repo: str) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def run(mutant, repo: str, python: str) -> tuple[bool, float, str]:
    name, file, old, new, tests = mutant
    with tempfile.TemporaryDirectory(prefix="zero_sf-mutant-") as tmp:
        for rel in _tracked(repo):
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(repo, rel), dst)
        path = os.path.join(tmp, file)
        with open(path) as f:
            text = f.read()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: the snippet occurs {text.count(old)} times in "
                             f"{file}, not once; update tools/mutants.py")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp, PYTHONDONTWRITEBYTECODE="1")
        t0 = time.time()
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider",
                               *tests], cwd=tmp, env=env, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        return proc.returncode != 0, time.time() - t0, tail[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    survivors = []
    chosen = [m for m in MUTANTS if args.k in m[0]]
    for i, m in enumerate(chosen, 1):
        killed, seconds, tail = run(m, repo, sys.executable)
        print(f"[{i}/{len(chosen)}] {'killed ' if killed else 'SURVIVED'} {seconds:5.0f}s  {m[0]}  "
              f"({' '.join(m[4])}: {tail})", flush=True)
        if not killed:
            survivors.append(m[0])
    print(f"{len(chosen) - len(survivors)} killed, {len(survivors)} survived"
          + (f": {survivors}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
