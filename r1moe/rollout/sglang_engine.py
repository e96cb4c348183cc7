"""The SGLang rollout engine: `sglang.Engine` in this process, token ids in and out, weights synced from the trainer.

    engine = SGLangEngine(model_path, tokenizer, eos_ids, settings=cfg.rollout.sglang, context_length=4096)
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=1024, stop=["</answer>"]))
    engine.sleep()                               # colocated: SGLang's weights and KV cache leave the GPU
    engine.update_weights(policy_named_tensors)  # wakes the weights, loads the new ones (HF names, full tensors)

Placement. One engine, created by rank 0's process, drives SGLang's own scheduler processes on this node's GPUs
base_gpu_id .. base_gpu_id + tp*dp - 1: by default the GPUs the training ranks use (colocated, weights by CUDA
IPC), or GPUs of its own (weights broadcast over NCCL by rank 0; not yet run on GPUs). The other ranks receive rank 0's generations by
broadcast. SGLang takes the GPU memory `mem_fraction_static` of what is there when it starts; with `colocate`, its
weights and KV cache are released while the policy trains (`release_memory_occupation`, needs SGLang's
`enable_memory_saver`) and taken back for the next rollout.

What SGLang returns and what we make of it (SGLang 0.5.17, sglang/srt/layers/sampler.py):
- per-token logprobs are `log softmax(logits / T)` of the token sampled, before top-p / top-k truncation (with
  T = 0, greedy, the logprob is at T = 1). That is exactly `Generation.logprobs` (rollout/base.py) and what the
  trainers compute with `compute_token_logprobs(temperature=T)`.
- `output_token_logprobs` carries (logprob, token id) for every generated token, the matched EOS / stop token
  included; it is the source of both `token_ids` and `logprobs` here, so the two always line up.
- Stop strings: a stop string that is one token of the vocabulary (the R1 tags are added tokens) becomes a stop
  token id, and SGLang stops there. A stop string of several tokens is applied to the returned tokens: the
  completion is cut after the first token whose text completes the string. The tokens before it are what an
  engine stopping there would have produced (sampling is left to right); only the compute after it is wasted.
- Routing replay (`return_routed_experts`): SGLang's `enable_return_routed_experts` captures the top-k expert ids
  of every layer for every token it ran forward (prompt and generated, all but the last generated token), int32
  [tokens, num_hidden_layers, K] in base64; dense layers' rows are zeros and are dropped here.
- `seed`: passed as SGLang's per-request `sampling_seed` (seed + request index). Whether SGLang's sampling
  backends make a step's rollouts bitwise reproducible with it has not been measured; runs with SGLang are not
  claimed to resume bit for bit (the built-in engine's are).

The constructor fails with a clear message (no fallback) where SGLang cannot run: `check_sglang`. When one of
SGLang's own processes fails (its traceback goes to the log), SGLang's default is to SIGKILL the whole process
tree, this trainer included, which ends a run with "Killed" and loses its output; here SGLang's processes are
stopped and the call in progress raises `SGLangFailure` instead, so the run ends with an error and a traceback.

The weights' formats (what `update_weights` sends, and the direct loader's half inside SGLang) are in
sglang_weights.py; this module (a little over 500 lines) is the engine and the process control it needs of SGLang.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .base import Generation, SamplingParams, check_prompts, compact_routes, ends_in_stop, split_stops
from .sglang_weights import (
    DIRECT_LOADER,
    Packed,
    aligned_order,
    direct_buckets,
    engine_tensors,
    pack_direct,
    resolve_direct_loader,
)

_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


class SGLangFailure(RuntimeError):
    """One of SGLang's processes (scheduler, detokenizer) failed; its traceback is in the log above."""


_OTHER_CHILDREN: set[int] = set()
"""This process's children that are not SGLang's (wandb's service, another engine's, a sandbox): the pids there
were before the engine being started launched its own."""


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process (Linux /proc; SGLang runs on Linux only)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _children(pid: int | None = None) -> set[int]:
    pid = os.getpid() if pid is None else pid
    return {p for p, (parent, _) in _process_table().items() if parent == pid}


def _stop_processes(pids: Iterable[int], wait_s: float | None = None) -> None:
    """SIGKILL these processes of one engine and all their descendants, never the rest of this process's children
    (SGLang's own `Engine.shutdown` kills every child of this process: wandb's service, a code sandbox, another
    engine). With `wait_s`, wait until they have exited (their GPU memory is free then)."""
    table = _process_table()
    tree, todo = [], [p for p in pids if p in table]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, (parent, _) in table.items() if parent == pid]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + (wait_s or 0)
    while wait_s is not None:
        table = _process_table()
        left = [p for p in tree if p in table and table[p][1] != "Z"]  # a zombie has exited; its parent reaps it
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"SGLang's processes {left} did not exit within {wait_s} s of SIGKILL")
        time.sleep(0.05)


def _on_launch_failure(signum, frame) -> None:
    """SIGQUIT from an SGLang child while the engine starts (sglang's `custom_sigquit_handler`)."""
    _stop_processes(_children() - _OTHER_CHILDREN)
    raise SGLangFailure("an SGLang process failed while the engine started (its traceback is in the log above)")


def _running_failure_handler(owner: SGLangEngine):
    """SGLang's tokenizer-manager signal handler with the SIGQUIT of a failed child turned into an error of the
    call in progress (SGLang's own handler SIGKILLs this process)."""
    from sglang.srt.managers.tokenizer_manager import SignalHandler

    class OnChildFailure(SignalHandler):
        def running_phase_sigquit_handler(self, signum=None, frame=None):
            owner.failed = True
            _stop_processes(owner.pids)
            for task in asyncio.all_tasks(self.tokenizer_manager.event_loop):
                task.cancel()

    return OnChildFailure


def _load_transformer_engine_first() -> None:
    """With megatron-core + Transformer Engine installed next to SGLang, load them before SGLang. Seen on an H200
    (SGLang 0.5.17, TE 2.20.2, megatron-core 0.19.2): in a process that imported SGLang first, the first reply of
    SGLang's detokenizer needed megatron.core to unpickle, whose TE import then failed on cuDNN
    (`libcudnn_heuristic.so.9: undefined symbol`), and SGLang killed the process. With TE and megatron loaded
    before SGLang (as the megatron backend's runs do) both stacks ran in one process. Measured since: what breaks TE
    is cuDNN already in use by torch (`torch.backends.cudnn.version()` then `import transformer_engine` fails the
    same way; after SGLang's import alone it loads), so this runs before the process's first GPU work."""
    if "transformer_engine.pytorch" in sys.modules or importlib.util.find_spec("transformer_engine") is None:
        return
    try:
        importlib.import_module("transformer_engine.pytorch")
    except OSError as e:
        raise RuntimeError(f"Transformer Engine failed to load ({str(e)[:200]}): with TE installed beside SGLang, "
                           "load r1moe.rollout.sglang_engine.check_sglang (or transformer_engine) before this "
                           "process first uses cuDNN") from e
    if importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None:
        importlib.import_module("megatron.core")


def check_sglang(where: str = "rollout.engine=sglang", num_gpus: int = 1) -> None:
    """ValueError naming what is missing for SGLang rollouts (CUDA, enough GPUs, the package)."""
    _load_transformer_engine_first()
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch sees no GPU)")
    elif torch.cuda.device_count() < num_gpus:
        missing.append(f"{num_gpus} GPUs on this node (torch sees {torch.cuda.device_count()})")
    try:
        importlib.import_module("sglang")
    except (ImportError, OSError, RuntimeError) as e:
        missing.append(f"the sglang package (import sglang: {str(e).splitlines()[0][:120]}); "
                       f"pip install 'r1moe[sglang]'")
    if missing:
        raise ValueError(f"{where} needs {'; '.join(missing)}. Run on a GPU machine with SGLang installed, or use "
                         f"the built-in engine (rollout.engine=builtin)")


def sampling_dict(params: SamplingParams, stop_token_ids: list[int]) -> dict:
    """Our SamplingParams as SGLang's sampling_params dict (0 = no top-k is SGLang's -1)."""
    return {"temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1, "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(stop_token_ids), "skip_special_tokens": False, "no_stop_trim": True}


def cut_at_stop(tokens: list[int], logprobs: list[float], tokenizer: Tokenizer, stops: list[str]
                ) -> tuple[list[int], list[float], bool]:
    """Tokens up to and including the first one whose text completes a stop string; (tokens, logprobs, cut)."""
    if not stops:
        return tokens, logprobs, False
    for i in range(len(tokens)):
        if ends_in_stop(tokenizer, tokens, stops, end=i + 1):
            return tokens[:i + 1], logprobs[:i + 1], True
    return tokens, logprobs, False


class SGLangEngine:
    """RolloutEngine over `sglang.Engine` (module docstring). `model_path` holds config.json and, unless
    `dummy_weights`, the weights to start from; `update_weights` replaces them before they matter."""

    def __init__(self, model_path: str | Path, tokenizer: Tokenizer, eos_ids: list[int], settings,
                 context_length: int, seed: int = 0, dummy_weights: bool = False, routing_model=None,
                 nccl_sync: bool = False):
        """`routing_model`: the served model's ModelConfig, to return the experts each token was routed to
        (routing replay); None: not asked for. `nccl_sync`: SGLang is on GPUs of its own (settings.base_gpu_id);
        `update_weights` broadcasts from this process's GPU over NCCL instead of handing over CUDA IPC handles."""
        check_sglang(num_gpus=settings.base_gpu_id + settings.tp * settings.dp)
        import sglang

        config = json.loads((Path(model_path) / "config.json").read_text())
        self.fp8_layers = None  # FP8 serving: the decoder layers whose projections are quantized on sync
        if settings.quantization == "fp8":
            if not dummy_weights or (config.get("quantization_config") or {}).get("quant_method") != "fp8":
                raise ValueError("rollout.sglang.quantization=fp8: SGLang starts from write_engine_dir(..., "
                                 "quantization='fp8') with dummy weights; the weights come by update_weights")
            self.fp8_layers = int(config["num_hidden_layers"])

        self.direct = resolve_direct_loader(settings, config, nccl_sync)
        if routing_model is not None and not routing_model.is_moe:
            raise ValueError("routing replay (rollout.routing_replay): the model has no MoE layers to route")
        self.routing_model = routing_model
        self.tokenizer = tokenizer
        self.eos_ids = sorted(set(eos_ids))
        self.settings = settings
        self.colocate = settings.colocate
        kwargs = {"model_path": str(model_path), "tp_size": settings.tp, "dp_size": settings.dp,
                  "ep_size": settings.ep, "mem_fraction_static": settings.mem_fraction_static,
                  "attention_backend": settings.attention_backend, "sampling_backend": settings.sampling_backend,
                  "grammar_backend": "none", "skip_tokenizer_init": True, "dtype": settings.dtype,
                  "random_seed": seed, "log_level": settings.log_level,
                  "context_length": settings.context_length or context_length,
                  "enable_memory_saver": settings.colocate, "load_format": "dummy" if dummy_weights else "auto",
                  "enable_return_routed_experts": routing_model is not None, "base_gpu_id": settings.base_gpu_id,
                  "custom_sigquit_handler": _on_launch_failure}
        if self.direct is not None:
            kwargs["custom_weight_loader"] = [DIRECT_LOADER]
        if settings.cuda_graph_max_bs:
            kwargs["cuda_graph_max_bs_decode"] = settings.cuda_graph_max_bs
        else:
            kwargs["disable_cuda_graph"] = True
        if settings.max_running_requests:
            kwargs["max_running_requests"] = settings.max_running_requests
        t0 = time.perf_counter()
        # SGLang's scheduler processes inherit this environment: torchrun's rendezvous variables would describe
        # the trainer's world, not SGLang's own (it sets up its process groups from its own arguments)
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k in _LAUNCHER_VARS or k.startswith("TORCHELASTIC")}
        _OTHER_CHILDREN.clear()
        _OTHER_CHILDREN.update(_children())
        try:
            self.engine = sglang.Engine(**kwargs)
        finally:
            os.environ.update(saved)
        self.pids = sorted(_children() - _OTHER_CHILDREN)  # SGLang's scheduler(s) and detokenizer
        self.start_s = time.perf_counter() - t0
        self.failed = self.stopped = False  # SGLang's processes failed / were shut down: calls refuse
        self.nccl_sync, self._group = nccl_sync, None
        self.engine.tokenizer_manager.signal_handler_class = _running_failure_handler(self)
        self.asleep: set[str] = set()
        self.weights_loaded = True  # from model_path (or dummy ones, replaced before the first rollout)

    def _call(self, fn, *args, **kwargs):
        if self.failed:
            raise SGLangFailure("SGLang's processes failed earlier in this run; the engine is stopped")
        if self.stopped:
            raise RuntimeError("this SGLang engine was shut down")
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # a failed child cancels the call's asyncio tasks (CancelledError)
            if self.failed:
                raise SGLangFailure(f"an SGLang process failed during {fn.__name__} (its traceback is in the log "
                                    f"above); SGLang's processes were stopped") from e
            raise

    # ------------------------------------------------------------------------------------------ memory
    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            # the trainer's caching allocator keeps what training took of the memory SGLang released: hand it back
            # to the driver first, or SGLang's resume finds too little (the other ranks: the policy's export_to)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self._call(self.engine.resume_memory_occupation, tags=todo)
            self.asleep.difference_update(todo)

    def sleep(self) -> None:
        """Colocated: give SGLang's weights, KV cache and CUDA graphs back to the trainer until the next call.
        Released weights are gone (measured: greedy output all token 0 after a plain resume), so the next
        `generate` needs an `update_weights` first; it refuses to run without one."""
        if self.colocate and not self.asleep:
            self._call(self.engine.flush_cache)
            self._call(self.engine.release_memory_occupation)
            self.asleep = {"weights", "kv_cache", "cuda_graph"}
            self.weights_loaded = False
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full HF-named tensors (any device, any order) in buckets of `rollout.sglang.weight_bucket_mb`, each
        packed into one flat tensor that SGLang reads through one CUDA IPC handle: with `weight_loader` direct, as
        SGLang's own parameters (`_update_direct`), else in SGLang's `flattened_bucket` format for its checkpoint
        loader. fp32 matrices travel in the engine's dtype (half the bytes; SGLang would cast them on load anyway)."""
        self._wake(["weights"])
        if self.direct is not None:
            self._update_direct(named_tensors)
            self.weights_loaded = True
            return
        bucket, size, limit = [], 0, self.settings.weight_bucket_mb << 20
        for name, t in engine_tensors(named_tensors, self.settings.dtype, self.fp8_layers):
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= limit:
                self._send(bucket, flush=False)
                bucket, size = [], 0
        self._send(bucket, flush=True)
        self.weights_loaded = True

    def _update_direct(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`weight_loader: direct`: SGLang's parameters packed whole (`direct_buckets`) into flat buckets, each copied
        in by `load_direct` (r1moe/rollout/sglang_weights.py) inside SGLang."""
        for bucket, first, final in direct_buckets(named_tensors, self.direct, self.settings.dtype,
                                                   self.settings.weight_bucket_mb << 20):
            self._send_direct(bucket, first=first, final=final)

    def _send_direct(self, bucket: list[Packed], first: bool, final: bool) -> None:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        # a new allocation (and CUDA IPC mapping) per bucket: keeping one buffer mapped between syncs was measured
        # no faster (benchmarks/results/rollout_engines_h200.json, direct_remapped) and would hold its memory
        spec, flat = pack_direct(bucket, torch.device("cuda", torch.cuda.current_device()))
        spec.update(first=first, final=final)
        monkey_patch_torch_reductions()  # CUDA tensors are named by device UUID, as SGLang's receiver expects
        result = self._call(self.engine.update_weights_from_tensor, [(json.dumps(spec), flat)],
                            load_format=DIRECT_LOADER, flush_cache=final)
        if not _succeeded(result):
            raise RuntimeError(f"SGLang refused the weight update (bucket from "
                               f"{bucket[0].name if bucket else 'the end'}): {result}")
        if final:
            torch.cuda.synchronize()

    def _send(self, bucket: list[tuple[str, torch.Tensor]], flush: bool) -> None:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        if not bucket:
            if flush:
                self._call(self.engine.flush_cache)
            return
        bucket = aligned_order(bucket)
        flat = FlattenedTensorBucket(named_tensors=bucket)
        if self.nccl_sync:
            return self._broadcast(bucket, flat.get_flattened_tensor(), flush)
        monkey_patch_torch_reductions()  # CUDA tensors are named by device UUID, as SGLang's receiver expects
        # one payload per SGLang TP rank: each deserializes only its own (SGLang's CUDA-IPC refcounting)
        payloads = [MultiprocessingSerializer.serialize({"flattened_tensor": flat.get_flattened_tensor(),
                                                         "metadata": flat.get_metadata()})
                    for _ in range(self.settings.tp)]
        result = self._call(self.engine.update_weights_from_tensor, payloads, load_format="flattened_bucket",
                            flush_cache=flush)
        if not _succeeded(result):
            raise RuntimeError(f"SGLang refused the weight update (bucket from {bucket[0][0]}): {result}")
        if flush:
            torch.cuda.synchronize()

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]], flat: torch.Tensor, flush: bool) -> None:
        """One bucket over NCCL: SGLang allocates the same flattened layout from (names, dtypes, shapes) and
        receives it by broadcast from rank 0 of the weight group (this process)."""
        import torch.distributed as dist

        flat = flat.cuda() if not flat.is_cuda else flat
        group = self._weight_group(flat.device)
        result, sent = self._call_beside(
            lambda: dist.broadcast(flat, src=0, group=group), flat.device, self.engine.update_weights_from_distributed,
            names=[n for n, _ in bucket], dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
            shapes=[list(t.shape) for _, t in bucket], group_name=WEIGHT_GROUP, flush_cache=flush,
            load_format="flattened_bucket")
        if isinstance(sent, BaseException):
            raise RuntimeError(f"broadcasting weights to SGLang failed: {sent}") from sent  # noqa: TRY004
        if not _succeeded(result):
            raise RuntimeError(f"SGLang refused the weight update (bucket from {bucket[0][0]}): {result}")

    def _weight_group(self, device: torch.device):
        """The NCCL group {this process (rank 0), SGLang's TP ranks (1 ..)}, made on first use."""
        if self._group is None:
            from sglang.srt.utils import init_custom_process_group

            port, world = _free_port(), 1 + self.settings.tp
            result, group = self._call_beside(
                lambda: init_custom_process_group(backend="nccl", init_method=f"tcp://127.0.0.1:{port}",
                                                  world_size=world, rank=0, group_name=WEIGHT_GROUP),
                device, self.engine.init_weights_update_group, master_address="127.0.0.1", master_port=port,
                rank_offset=1, world_size=world, group_name=WEIGHT_GROUP, backend="nccl")
            if not _succeeded(result) or group is None or isinstance(group, BaseException):
                raise RuntimeError(f"the NCCL weight group with SGLang did not form: {result}; "
                                   f"{group if group is not None else 'no answer'}")
            self._group = group
        return self._group

    def _call_beside(self, side, device: torch.device, fn, **kwargs):
        """(fn's answer, side()'s value or exception): `side` (this process's half of a collective with SGLang) runs
        in a thread on `device` while this thread makes the engine call that SGLang's half answers, which blocks
        until both halves are done."""
        box: list = []

        def run():
            try:
                torch.cuda.set_device(device)
                box.append(side())
            except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
                box.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        result = self._call(fn, **kwargs)
        thread.join()
        return result, box[0] if box else None

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        check_prompts(prompts)
        if not self.weights_loaded:
            raise RuntimeError("SGLangEngine.generate after sleep() without update_weights(): SGLang released the "
                               "weights; load the policy's weights first")
        self._wake(["weights", "kv_cache", "cuda_graph"])
        stop_ids, text_stops = split_stops(self.tokenizer, params.stop)
        sp = sampling_dict(params, [*self.eos_ids, *stop_ids])
        if params.seed is not None:
            sps = [{**sp, "sampling_seed": (params.seed + i) % (1 << 62)} for i in range(len(prompts))]
        else:
            sps = [sp] * len(prompts)
        outs = self._call(self.engine.generate, input_ids=[list(p) for p in prompts], sampling_params=sps,
                          return_logprob=True, return_routed_experts=self.routing_model is not None)
        return [self._generation(p, o, stop_ids, text_stops) for p, o in zip(prompts, outs)]

    def _generation(self, prompt: list[int], out: dict, stop_ids: list[int], text_stops: list[str]) -> Generation:
        entries = out["meta_info"]["output_token_logprobs"]
        tokens = [int(e[1]) for e in entries]
        logps = [float(e[0]) for e in entries]
        tokens, logps, cut = cut_at_stop(tokens, logps, self.tokenizer, text_stops)
        last = tokens[-1] if tokens else None
        if cut:
            reason = "stop"
        elif last in self.eos_ids:
            reason = "eos"
        elif last in stop_ids:
            reason = "stop"
        else:
            reason = "length"
        text_ids = [t for t in tokens if t not in self.eos_ids]
        routes = None if self.routing_model is None else self._routes(out, len(prompt) + len(tokens) - 1)
        return Generation(prompt_ids=list(prompt), token_ids=tokens, logprobs=logps,
                          text=self.tokenizer.decode(text_ids, skip_special_tokens=False), finish_reason=reason,
                          routed_experts=routes)

    def _routes(self, out: dict, fed: int) -> torch.Tensor:
        raw = out["meta_info"].get("routed_experts")
        if raw is None:
            raise RuntimeError("SGLang returned no routed_experts although the engine was started with "
                               "enable_return_routed_experts (routing replay)")
        return decode_routes(raw, self.routing_model, fed)

    def shutdown(self) -> None:
        """Stop this engine's processes, and only those (SGLang's own shutdown kills every child of this process,
        another engine's included). Waits until they are gone, so their GPU memory is free on return."""
        if self.failed or self.stopped:
            return
        self.stopped = True  # later calls refuse at once
        manager = self.engine.tokenizer_manager
        if getattr(manager, "_subprocess_watchdog", None) is not None:
            manager._subprocess_watchdog.stop()  # it would take the stopped processes for crashed ones
        _stop_processes(self.pids, wait_s=60)


WEIGHT_GROUP = "r1moe_weights"


def _succeeded(result) -> bool:
    """SGLang's weight-update calls answer (success, message), or an object with `.success`."""
    return result[0] if isinstance(result, tuple) else getattr(result, "success", True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decode_routes(raw: str, cfg, fed: int) -> torch.Tensor:
    """SGLang's base64 int32 [tokens, num_hidden_layers, K] -> the MoE layers' rows of the first `fed` tokens."""
    ids = torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.int32)
    per_token = cfg.num_hidden_layers * cfg.num_experts_per_tok
    if ids.numel() % per_token or ids.numel() // per_token < fed:
        raise RuntimeError(f"SGLang returned {ids.numel()} routed expert ids; the sequence fed {fed} tokens x "
                           f"{cfg.num_hidden_layers} layers x {cfg.num_experts_per_tok} experts")
    ids = ids.view(-1, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    return compact_routes(ids[:fed, cfg.moe_layer_ids()], cfg.n_routed_experts)
