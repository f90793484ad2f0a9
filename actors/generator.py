"""vLLM generator engines: a plain class (``VLLMGenerator``), its thin Ray actor, and a pool of them.

Behaviour logprobs. ``Sample.logprobs[t]`` is vLLM's logprob of the sampled token ``token_ids[t]``. In vLLM 0.32
what that means is the engine's ``logprobs_mode`` (``vllm.config.ModelConfig.logprobs_mode``):

* ``"raw_logprobs"`` (default here and in vLLM) — ``log_softmax`` of the model's raw logits, *before* temperature,
  top-p/top-k and other logits processors: log π_θ(token) at temperature 1.
* ``"processed_logprobs"`` — after temperature and top-p/top-k: the log-probability under the distribution the
  token was actually drawn from (the true behaviour policy when temperature ≠ 1 or top_p < 1).

A training run samples at ``generator.temperature`` T and its learner scores softmax(logits / T): the run's
engines report raw logprobs at T = 1 and processed ones otherwise (``GeneratorPool.from_config``), so the PPO ratio
is exactly 1 on-policy either way (tests/test_sampling_contract.py). top_p < 1 is refused by the config.

Every ``Sample`` records the mode it was produced with. ``score`` uses prompt logprobs, which vLLM never processes
(temperature 1, no truncation) in either mode.

Seeds. Request ``i`` of a call gets ``request_seed(seed, i)`` where ``i`` is the prompt's index in the caller's
list (the pool passes global indices), and vLLM seeds its ``n`` sub-requests ``seed_i + j``. The mixing keeps the
ranges of different prompts from overlapping, so a result does not depend on how prompts were split over engines
or batched. ``seed=None`` draws the call's seed from the generator's own seed and a call counter: reproducible for
the same sequence of calls.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from cluster.devices import device_spec

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
_MASK62 = (1 << 62) - 1


@dataclasses.dataclass
class Sample:
    """One completion. ``logprobs[t]`` belongs to ``token_ids[t]`` (same length), in ``logprobs_mode``."""

    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    logprobs: List[float]
    finish_reason: Optional[str]  # "stop" (EOS or stop string), "length" (max_tokens), "abort"
    logprobs_mode: str = "raw_logprobs"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def request_seed(seed: int, index: int) -> int:
    """Seed of prompt ``index`` in a call seeded ``seed``: a 62-bit hash, so ``+ j`` for the n sub-requests of
    one prompt practically never collides with another prompt's range."""
    return _splitmix64(_splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ int(index)) & _MASK62


def _check_sampling(n: int, temperature: float, top_p: float, max_tokens: int) -> None:
    bad = []
    if not (isinstance(n, int) and n >= 1):
        bad.append(f"n must be an int ≥ 1 (got {n!r})")
    if not temperature >= 0:
        bad.append(f"temperature must be ≥ 0 (got {temperature!r})")
    if not 0 < top_p <= 1:
        bad.append(f"top_p must be in (0, 1] (got {top_p!r})")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        bad.append(f"max_tokens must be an int ≥ 1 (got {max_tokens!r})")
    if bad:
        raise ValueError("generate: " + "; ".join(bad))


def assign_balanced(costs: Sequence[float], load: Sequence[float]) -> List[List[int]]:
    """Split item indices over engines: longest-processing-time first, each onto the currently least-loaded
    engine (``load``: work already queued per engine; ties go to the lowest engine index). Each part is sorted."""
    if not load:
        raise ValueError("assign_balanced: no engines")
    cur = [float(x) for x in load]
    parts: List[List[int]] = [[] for _ in cur]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        e = min(range(len(cur)), key=lambda e: (cur[e], e))
        parts[e].append(i)
        cur[e] += costs[i]
    for part in parts:
        part.sort()
    return parts


Prompt = Union[str, Sequence[int]]


class VLLMGenerator:
    """One vLLM engine (``vllm.LLM``) with sampling, scoring and weight sync. Usable without Ray.

    ``kv_cache_bytes`` sizes the KV cache on cpu; on cuda/npu the cache is ``gpu_memory_utilization`` of device
    memory. ``enforce_eager=True`` is the default because on CPU torch.compile makes the engine start take ~150 s
    instead of ~30 s for no measurable decode speed-up on small models; on GPUs pass False (CUDA graphs).
    """

    def __init__(self, model_path: str, *, device: str = "cpu", seed: int = 0, kv_cache_bytes: int = 256 * 2**20,
                 max_model_len: int = 512, dtype: str = "float32", tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, transport: Any = None, logprobs_mode: str = "raw_logprobs",
                 gpu_memory_utilization: float = 0.85, max_num_seqs: int = 256,
                 engine_kwargs: Optional[Dict[str, Any]] = None):
        model_dir = Path(model_path)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model_path {model_path!r} is not an HF model directory (no config.json)")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        spec = device_spec(device)
        if device == "cpu" and tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size must be 1 on device 'cpu'")
        spec.import_extension()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        from cluster.weight_sync import checkpoint_params, optional_param_names

        self.model_path = str(model_dir)
        self.device = device
        self.seed = int(seed)
        self.max_model_len = int(max_model_len)
        self.logprobs_mode = logprobs_mode
        self.transport = transport
        # The reference for validating published weights: what this engine loaded at start.
        self.expected_params = checkpoint_params(model_dir)
        self.optional_params = optional_param_names(model_dir)
        self.weights_step: Optional[int] = None
        self._calls = 0

        kwargs: Dict[str, Any] = dict(
            model=self.model_path, dtype=dtype, seed=self.seed, max_model_len=self.max_model_len,
            tensor_parallel_size=int(tensor_parallel_size), enforce_eager=bool(enforce_eager),
            logprobs_mode=logprobs_mode, max_num_seqs=int(max_num_seqs),
        )
        if device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
            # A partially prefilled request has its sampled token discarded and its seeded torch.Generator
            # rewound with set_offset, which CPU generators do not support: the engine dies
            # ("CPU Generator does not use offset") on any large batch of seeded requests. Unchunked
            # prefill never discards a sampled token.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len, 8192)
        else:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if transport is not None:
            kwargs.update(transport.engine_kwargs(device))
        extension = kwargs.get("worker_extension_cls")
        if extension and (engine_kwargs or {}).get("worker_extension_cls", extension) != extension:
            # vLLM takes one extension class; replacing the transport's would leave the engine unable to receive
            raise ValueError(f"engine_kwargs sets worker_extension_cls={engine_kwargs['worker_extension_cls']!r}, "
                             f"but the {transport.kind!r} weight transport needs {extension!r}")
        kwargs.update(engine_kwargs or {})

        import tempfile

        from cluster.worker_logs import ENGINE_ERRORS_ENV, engine_error, use_vllm_logging_config

        # The engine's own error text, should it die starting or at its first request: its processes log it (and
        # the client only says "EngineCore encountered an issue"), so their ERROR records also go to a file here.
        use_vllm_logging_config()
        fd, errors = tempfile.mkstemp(prefix="passk_rl_engine_errors_", suffix=".log")
        os.close(fd)
        os.environ[ENGINE_ERRORS_ENV] = errors
        from vllm import LLM

        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
            self._first_request()
        except Exception as e:  # noqa: BLE001 - re-raised with the engine's own words
            cause = engine_error(errors) or f"{type(e).__name__}: {str(e).strip()[:500]}"
            raise EngineStartError(f"the vLLM engine for {self.model_path} could not start or serve its first "
                                   f"request ({cause}); restarting it cannot help") from e
        finally:
            os.environ.pop(ENGINE_ERRORS_ENV, None)
            Path(errors).unlink(missing_ok=True)
        self.start_seconds = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()

    def _first_request(self) -> None:
        """One greedy token: some model shapes start fine and only fail at their first forward (vLLM's CPU
        attention supports a fixed set of head sizes), which must show here, once, not as a crash mid-run that a
        restart would repeat. Greedy: no random state is used, so seeded sampling is unchanged."""
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1, temperature=0.0),
                          use_tqdm=False)

    # ------------------------------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 prompt_indices: Optional[Sequence[int]] = None) -> List[List[Sample]]:
        """``n`` samples for each prompt (text, or token ids used as-is); result ``[prompt][sample]``.

        ``prompt_indices`` (default ``range(len(prompts))``) are the indices the per-request seeds derive from;
        a pool passes each prompt's position in the full batch.
        """
        from vllm import SamplingParams

        _check_sampling(n, temperature, top_p, max_tokens)
        prompts = list(prompts)
        if prompt_indices is None:
            prompt_indices = range(len(prompts))
        if len(prompt_indices) != len(prompts):
            raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for {len(prompts)} prompts")
        if not prompts:
            return []
        if seed is None:
            seed = request_seed(self.seed, self._calls)
        self._calls += 1
        inputs = [self._as_input(p, i) for i, p in enumerate(prompts)]
        params = [SamplingParams(n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=max_tokens,
                                 seed=request_seed(seed, int(idx)), stop=list(stop) if stop else None, logprobs=0)
                  for idx in prompt_indices]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        result: List[List[Sample]] = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(tids):
                    raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} logprobs for "
                                       f"{len(tids)} generated tokens")
                lps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, tids)]
                group.append(Sample(prompt_token_ids=list(out.prompt_token_ids), token_ids=tids, text=c.text,
                                    logprobs=lps, finish_reason=c.finish_reason, logprobs_mode=self.logprobs_mode))
            result.append(group)
        return result

    def _as_input(self, p: Prompt, i: int) -> Any:
        if isinstance(p, str):
            return p
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is an empty token list")
        return {"prompt_token_ids": ids}

    def score(self, prompt_token_ids: Sequence[Sequence[int]],
              completion_token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        """log π(completion[t] | prompt, completion[:t]) at temperature 1, for every completion token.

        Computed with vLLM prompt logprobs over ``prompt + completion`` (prefix cache not read, so the numbers
        always come from the current weights). Used as the weight-sync probe.
        """
        from vllm import SamplingParams

        if len(prompt_token_ids) != len(completion_token_ids):
            raise ValueError(f"score: {len(prompt_token_ids)} prompts but {len(completion_token_ids)} completions")
        inputs, spans = [], []
        for i, (p, c) in enumerate(zip(prompt_token_ids, completion_token_ids)):
            p, c = [int(t) for t in p], [int(t) for t in c]
            if not p:
                raise ValueError(f"score: prompt {i} is empty (the first token has no logprob)")
            if len(p) + len(c) >= self.max_model_len:
                raise ValueError(f"score: prompt {i} + completion is {len(p) + len(c)} tokens; the engine's "
                                 f"max_model_len is {self.max_model_len}")
            inputs.append({"prompt_token_ids": p + c})
            spans.append((len(p), c))
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False,
                            skip_reading_prefix_cache=True)
        outputs = self.llm.generate(inputs, sp, use_tqdm=False)
        result = []
        for out, (start, c) in zip(outputs, spans):
            plp = out.prompt_logprobs
            result.append([float(plp[start + j][t].logprob) for j, t in enumerate(c)])
        return result

    # ------------------------------------------------------------------------------------------- weights
    def sync_weights(self, handle: Any) -> Dict[str, Any]:
        """Load the weights ``handle`` names through the transport; ``{"step", "seconds", "pid"}`` plus what the
        transport reports (a streaming one: ``checksum``, ``bytes``, ...). A streaming transport receives while the
        learner sends, so this call blocks until the learner's stream has arrived."""
        if self.transport is None:
            raise RuntimeError("sync_weights: this generator was built without a weight transport")
        from cluster.weights import PartialWeightsError

        t0 = time.perf_counter()
        try:
            extra = self.transport.apply(self.llm, handle, expected_params=self.expected_params,
                                         optional_params=self.optional_params) or {}
        except PartialWeightsError:
            self.weights_step = None  # neither the old version nor the new one
            raise
        self.weights_step = handle.step
        return {**extra, "step": handle.step, "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def info(self) -> Dict[str, Any]:
        return {"model_path": self.model_path, "device": self.device, "pid": os.getpid(),
                "start_seconds": self.start_seconds, "weights_step": self.weights_step,
                "logprobs_mode": self.logprobs_mode}

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the engine processes. The generous timeout matters: vLLM's default (5 s) force-kills an engine
        that is slow to exit on a busy machine, which leaks its shared-memory queues (/dev/shm/psm_*, 160 MiB)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown(timeout=timeout_s)
            self.llm = None


class GeneratorActor(VLLMGenerator):
    """The Ray actor: ``VLLMGenerator`` as is (Ray calls its methods remotely). Build it with :meth:`create`."""

    def ready(self) -> Dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {**self.info(), "node_id": ctx.get_node_id(), "placement_group_id": ctx.get_placement_group_id()}

    @staticmethod
    def actor_options(*, device: str = "cpu", tensor_parallel_size: int = 1, num_cpus: float = 0.5,
                      placement_group: Any = None, bundle_index: Optional[int] = None) -> Dict[str, Any]:
        """Ray ``.options()``: ``num_cpus`` plus, on cuda/npu, ``tensor_parallel_size`` of the device resource."""
        from cluster.placement import optional_bundle

        spec = device_spec(device)
        opts: Dict[str, Any] = {"num_cpus": num_cpus}
        if spec.ray_resource == "GPU":
            opts["num_gpus"] = tensor_parallel_size
        elif spec.ray_resource is not None:
            opts["resources"] = {spec.ray_resource: tensor_parallel_size}
        if placement_group is not None:
            opts.update(optional_bundle({"placement_group": placement_group,
                                         "placement_group_bundle_index": bundle_index}))
        return opts

    @classmethod
    def create(cls, engine_kwargs: Dict[str, Any], **option_kwargs: Any) -> Any:
        import ray

        opts = cls.actor_options(device=engine_kwargs.get("device", "cpu"),
                                 tensor_parallel_size=engine_kwargs.get("tensor_parallel_size", 1), **option_kwargs)
        return ray.remote(cls).options(**opts).remote(**engine_kwargs)


class EngineLost(RuntimeError):
    """A generator engine died and could not be brought back (the message says which and how often it was tried)."""


class EngineStartError(EngineLost):
    """An engine could not start or serve its first request (an unsupported head size, dtype or architecture):
    never restarted, since a new engine would fail the same way. The message carries the engine's own error."""


def start_error(err: BaseException) -> Optional[str]:
    """The text of an :class:`EngineStartError` raised in an actor's constructor, from the Ray error around it."""
    text = str(err)
    mark = "EngineStartError: "
    if mark not in text:
        return None
    return text[text.rindex(mark) + len(mark):].strip().splitlines()[0]


def _engine_died(err: BaseException) -> bool:
    """Whether ``err`` means the engine is gone: its actor process died (RayActorError), or the vLLM engine core
    process inside a live actor died (the actor then raises EngineDeadError on every call)."""
    import ray

    if isinstance(err, ray.exceptions.RayActorError):
        return True
    return isinstance(err, ray.exceptions.RayTaskError) and (
        "EngineDeadError" in str(err) or "EngineCore" in str(err) and "died" in str(err).lower())


class GeneratorPool:
    """``num_engines`` generator actors behind one ``generate``/``score``/``sync_weights`` interface.

    Dispatch: each call splits its prompts over the engines by estimated cost (n × (prompt length + max_tokens)),
    greedily onto the least-loaded engine, counting work still in flight from concurrent calls; results come back
    in the caller's order. Engines start concurrently; the constructor returns when all are up (or raises the
    first engine's error).

    Engine death: when an engine's actor or its vLLM engine process dies, the pool starts a new engine in the same
    placement bundle, loads the weights of the last ``sync_weights`` into it, and re-issues exactly the requests
    the dead one held — with the same per-request seeds, so the step's samples are those the dead engine would have
    returned. Up to ``max_restarts`` restarts per call; past that, ``EngineLost``. ``restarts`` counts them all.
    """

    @classmethod
    def from_config(cls, cfg: Any, model_path: str, *, transport: Any = None,
                    placement_group: Any = None, wait: bool = True) -> "GeneratorPool":
        """The engines a run's config asks for (``cfg.generator``, ``cfg.model``, ``cfg.cluster``, ``cfg.run.seed``).

        Behaviour logprobs follow the sampling temperature: at T = 1 vLLM's raw logprobs are the sampling policy's;
        at T ≠ 1 the engine reports processed ones (after temperature), which is what the learner, scoring
        softmax(logits / T), recomputes. Either way the PPO ratio is 1 on-policy."""
        g = cfg.generator
        kwargs = dict(model_path=model_path, device=cfg.cluster.device, seed=cfg.run.seed,
                      kv_cache_bytes=int(g.kv_cache_gib * 2**30), max_model_len=cfg.model.max_model_len,
                      dtype=cfg.model.dtype, tensor_parallel_size=g.tensor_parallel_size,
                      enforce_eager=g.enforce_eager, gpu_memory_utilization=g.gpu_memory_utilization,
                      max_num_seqs=g.max_num_seqs, transport=transport, engine_kwargs=dict(g.engine_kwargs) or None,
                      logprobs_mode="raw_logprobs" if g.temperature == 1.0 else "processed_logprobs")
        return cls(g.num_engines, kwargs, device=cfg.cluster.device, num_cpus_per_engine=g.num_cpus_per_engine,
                   placement_group=placement_group, bundle_indices=list(range(g.num_engines)),
                   max_restarts=g.max_restarts, wait=wait)

    def __init__(self, num_engines: int, engine_kwargs: Dict[str, Any], *, device: str = "cpu",
                 num_cpus_per_engine: float = 0.5, placement_group: Any = None,
                 bundle_indices: Optional[Sequence[int]] = None, max_restarts: int = 2, wait: bool = True):
        """``wait=False`` returns once the engines are spawned; :meth:`wait_ready` then waits for them (the trainer
        starts the learner ranks in between, so the two start-ups overlap)."""
        import ray

        if num_engines < 1:
            raise ValueError(f"num_engines must be ≥ 1, got {num_engines}")
        if bundle_indices is None:
            bundle_indices = list(range(num_engines))
        if placement_group is not None and len(bundle_indices) != num_engines:
            raise ValueError(f"{len(bundle_indices)} bundle indices for {num_engines} engines")
        kwargs = dict(engine_kwargs)
        kwargs["device"] = device
        self.device = device
        self.seed = int(kwargs.get("seed", 0))
        self._calls = 0
        self._lock = threading.Lock()
        self.load = [0.0] * num_engines
        self.max_restarts = int(max_restarts)
        self.restarts = 0
        self.current_handle: Any = None  # the weights every engine holds (None: the model it started from)
        # Called with the engine's index after it is replaced, instead of load_current: how a replaced engine gets
        # the current weights is the transport's business (cluster.transports.WeightSync sets it).
        self.restart_hook: Optional[Any] = None
        self._spawn = lambda i: GeneratorActor.create(
            kwargs, num_cpus=num_cpus_per_engine, placement_group=placement_group,
            bundle_index=bundle_indices[i] if placement_group is not None else None)
        self.engines = [self._spawn(i) for i in range(num_engines)]
        self._ready = [e.ready.remote() for e in self.engines]
        self.engine_info: List[Dict[str, Any]] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> List[Dict[str, Any]]:
        """Wait until every engine has started and served its first request; an engine that cannot (its own error
        text) raises :class:`EngineStartError` after the pool is shut down."""
        import ray

        if self._ready:
            refs, self._ready = self._ready, []
            try:
                self.engine_info = ray.get(refs)
            except Exception as err:
                self.shutdown()
                if start_error(err):
                    raise EngineStartError(start_error(err)) from None
                raise
        return self.engine_info

    def replace_dead(self) -> bool:
        """Replace every engine whose actor is gone or whose vLLM engine died, without loading weights into them
        (the caller re-sends to all); True when any was replaced."""
        import ray

        replaced = False
        for e, actor in enumerate(self.engines):
            try:
                ray.get(actor.score.remote([[1]], [[1]]), timeout=120)  # a one-token forward: the engine core too
            except Exception as err:  # noqa: BLE001 - only deaths are replaced; a live engine's error is its own
                if not _engine_died(err):
                    continue
                self._restart(e, err, load=False)
                replaced = True
        return replaced

    def _restart(self, e: int, why: BaseException, *, load: bool = True) -> None:
        """Replace engine ``e`` by a fresh one (holding the current weights, unless ``load`` is False)."""
        import ray

        self.restarts += 1
        print(f"[passk_rl.generator] engine {e} died ({type(why).__name__}); starting a new one "
              f"(restart {self.restarts})", flush=True)
        try:
            ray.kill(self.engines[e])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.engines[e] = self._spawn(e)
        try:
            self.engine_info[e] = ray.get(self.engines[e].ready.remote())
        except Exception as err:
            if start_error(err):  # a new engine fails the same way: stop here, with its reason
                raise EngineStartError(f"generator engine {e} was restarted and {start_error(err)}") from None
            raise
        if not load:
            return
        if self.restart_hook is not None:
            self.restart_hook(e)
        else:
            self.load_current(e)

    def load_current(self, e: int) -> None:
        """Load the weights of the last ``sync_weights`` into engine ``e`` alone (nothing before the first)."""
        import ray

        if self.current_handle is not None:
            ray.get(self.engines[e].sync_weights.remote(self.current_handle))

    def _gather(self, calls: Dict[int, Any], *, budget: Optional[int] = None) -> Dict[int, Any]:
        """Run ``calls[e](actor) -> ObjectRef`` on every engine e and return their results; an engine that died is
        restarted and its call re-issued (``budget`` times per call at most; default ``max_restarts``)."""
        import ray

        refs = {e: call(self.engines[e]) for e, call in calls.items()}
        out: Dict[int, Any] = {}
        budget = allowed = self.max_restarts if budget is None else budget
        while refs:
            e, ref = next(iter(refs.items()))
            try:
                out[e] = ray.get(ref)
                del refs[e]
            except Exception as err:  # noqa: BLE001 - classified below; anything else propagates unchanged
                if not _engine_died(err):
                    raise
                if budget <= 0:
                    raise EngineLost(f"generator engine {e} died and {allowed} restart(s) in this call did "
                                     f"not bring it back: {type(err).__name__}: {str(err)[:500]}") from err
                budget -= 1
                self._restart(e, err)
                refs[e] = calls[e](self.engines[e])
        return out

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    def _assign(self, costs: Sequence[float]) -> List[List[int]]:
        with self._lock:
            parts = assign_balanced(costs, self.load)
            for e, part in enumerate(parts):
                self.load[e] += sum(costs[i] for i in part)
        return parts

    def _release(self, parts: List[List[int]], costs: Sequence[float]) -> None:
        with self._lock:
            for e, part in enumerate(parts):
                self.load[e] -= sum(costs[i] for i in part)

    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: Optional[int] = None,
                 stop: Optional[Sequence[str]] = None) -> List[List[Sample]]:
        _check_sampling(n, temperature, top_p, max_tokens)
        prompts = list(prompts)
        if not prompts:
            return []
        if seed is None:
            with self._lock:
                seed = request_seed(self.seed, self._calls)
                self._calls += 1
        costs = [float(n * (len(p) + max_tokens)) for p in prompts]
        parts = self._assign(costs)

        def call(part):
            return lambda actor: actor.generate.remote([prompts[i] for i in part], n=n, temperature=temperature,
                                                       top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop,
                                                       prompt_indices=part)

        try:
            got = self._gather({e: call(part) for e, part in enumerate(parts) if part})
        finally:
            self._release(parts, costs)
        out: List[Optional[List[Sample]]] = [None] * len(prompts)
        for e, groups in got.items():
            for i, g in zip(parts[e], groups):
                out[i] = g
        return out  # type: ignore[return-value]

    def score_every_engine(self, prompt_token_ids: Sequence[Sequence[int]],
                           completion_token_ids: Sequence[Sequence[int]]) -> List[List[List[float]]]:
        """``score`` on every engine at once (the post-sync probe: each engine must hold the learner's weights);
        element i is engine i's answer."""
        if len(prompt_token_ids) != len(completion_token_ids):
            raise ValueError(f"score: {len(prompt_token_ids)} prompts but {len(completion_token_ids)} completions")
        p, c = list(prompt_token_ids), list(completion_token_ids)
        got = self._gather({e: (lambda actor: actor.score.remote(p, c)) for e in range(self.num_engines)})
        return [got[e] for e in range(self.num_engines)]

    def score(self, prompt_token_ids: Sequence[Sequence[int]], completion_token_ids: Sequence[Sequence[int]], *,
              engine: Optional[int] = None) -> List[List[float]]:
        """Completion-token logprobs (see ``VLLMGenerator.score``); ``engine=i`` asks that engine only."""
        if len(prompt_token_ids) != len(completion_token_ids):
            raise ValueError(f"score: {len(prompt_token_ids)} prompts but {len(completion_token_ids)} completions")
        if engine is not None:
            if not 0 <= engine < self.num_engines:
                raise ValueError(f"engine must be in [0, {self.num_engines}), got {engine}")
            p, c = list(prompt_token_ids), list(completion_token_ids)
            return self._gather({engine: lambda actor: actor.score.remote(p, c)})[engine]
        costs = [float(len(p) + len(c)) for p, c in zip(prompt_token_ids, completion_token_ids)]
        parts = self._assign(costs)

        def call(part):
            return lambda actor: actor.score.remote([prompt_token_ids[i] for i in part],
                                                    [completion_token_ids[i] for i in part])

        try:
            got = self._gather({e: call(part) for e, part in enumerate(parts) if part})
        finally:
            self._release(parts, costs)
        out: List[List[float]] = [[] for _ in prompt_token_ids]
        for e, rows in got.items():
            for i, r in zip(parts[e], rows):
                out[i] = r
        return out

    def sync_weights(self, handle: Any, *, max_restarts: Optional[int] = None) -> Dict[str, Any]:
        """Apply ``handle`` on every engine in parallel; ``{"step", "seconds" (wall), "engines": [reports]}``.
        ``max_restarts``: engine restarts allowed inside this call (default ``self.max_restarts``; a transport
        whose version cannot be re-sent to one engine alone passes 0)."""
        t0 = time.perf_counter()
        self.current_handle = handle  # an engine restarted from now on loads these
        got = self._gather({e: (lambda actor: actor.sync_weights.remote(handle)) for e in range(self.num_engines)},
                           budget=max_restarts)
        return {"step": handle.step, "seconds": time.perf_counter() - t0, "engines": [got[e] for e in sorted(got)]}

    def info(self) -> List[Dict[str, Any]]:
        import ray

        return ray.get([e.info.remote() for e in self.engines])

    def shutdown(self) -> None:
        import ray

        engines, self.engines = list(getattr(self, "engines", [])), []
        if engines:
            try:
                ray.get([e.shutdown.remote() for e in engines], timeout=120)
            except Exception:
                pass  # killing the actors below reaps the engine processes anyway
        for e in engines:
            try:
                ray.kill(e)
            except Exception:
                pass
