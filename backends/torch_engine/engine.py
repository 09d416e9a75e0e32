"""Engine: prefill and decode a batch of sequences over paged per-head KV, driven by a policy.

The loop is nano-vllm's: ``prefill`` runs the prompts and lets the policy compress each
layer (the phase itself lives in ``prefill``); ``decode`` runs one token per sequence;
``generate`` is greedy decoding on top. The engine owns the state both phases share: the
paged KV, the executor of the policy's actions and the static decode inputs.

    engine = Engine(load_checkpoint(path), EngineConfig(max_seq_len=8192))
    out = engine.generate([[1, 2, 3]], max_new_tokens=16, policy=HeteroCachePolicy(...))

Positions: prompts of a batch are left-aligned to the longest one in *logical* positions
(what actions speak in; a sequence of length L_b starts at L_max - L_b, as HF's left
padding), but nothing is stored for the padding, and RoPE sees each sequence from 0.

Decode observations (``observer``): without CUDA graphs the policy sees each layer during
the step (after the new token is stored, before attention), exactly as the HF backend runs
it ('inline'). With CUDA graphs the step is one captured graph: the queries are recorded
inside it and the policy reads them after the step ('deferred'); its actions (a recall)
take effect from the next step (``recall``: the replay waits for the copies on the device,
or the recall lands asynchronously). With a ``DeviceMonitor`` and async recalls the host
never waits on a decision: it reads the decision while the next step runs, acts on a
share of the fired monitors per step until the next decision, and issues each share's
recalls in the step after (``_act``). A policy that acts every N steps
(``Requirements.decode_period``) is called once per N steps with N queries. Policies that
need Attend views (Quest) must see the step before attending: they need 'inline'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Sequence

import torch

from hcpolicy.actions import Attend, Offload, Recall, Select
from hcpolicy.capabilities import Capabilities, Requirements, unmet
from hcpolicy.kernels.paged_decode import paged_decode, resolve_kernel
from hcpolicy.observe import Observation, Phase
from hcpolicy.policy.base import Policy
from hcpolicy.runtime import TransferRuntime

from .engine_config import EngineConfig, GenerateOutput
from .executor import PagedExecutor
from .fused import resolve_ops
from .graphs import DecisionGraph, DecodeGraph
from .kv import PagedKV
from .model import Transformer
from .monitor import DeviceMonitor, monitor_for
from .observer import DecodeObserver
from .prefill import Prefill

_STOP_CHECK = 8  # decode steps between checks whether every sequence has stopped
CAPABILITIES = Capabilities(actions={Select, Offload, Recall, Attend}, per_head_lengths=True, cuda_graphs=True)
_ids = itertools.count(1)


class Engine:
    name = "torch_engine"

    def __init__(self, model: Transformer, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config = config or EngineConfig()
        self.mc = model.config
        self.spec = model.config.spec()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kernel = resolve_kernel(config.decode_kernel, self.device)
        self.ops = resolve_ops(config.fused_kernels, self.device, self.dtype)
        self.graphs_enabled = config.cuda_graphs and self.device.type == "cuda"
        if config.observe == "inline" and self.graphs_enabled:
            raise ValueError("observe='inline' runs the policy inside the decode step, which a CUDA graph cannot: "
                             "use observe='deferred' or cuda_graphs=False")  # fmt: skip
        self.deferred = config.observe == "deferred" or (config.observe == "auto" and self.graphs_enabled)
        pages_per_head = -(-config.max_seq_len // config.page_size)
        num_pages = config.num_pages or config.max_batch_size * self.mc.num_layers * self.mc.num_kv_heads * pages_per_head
        self.kv = PagedKV(
            num_layers=self.mc.num_layers, batch_size=config.max_batch_size, num_kv_heads=self.mc.num_kv_heads,
            head_dim=self.mc.head_dim, num_pages=num_pages, page_size=config.page_size,
            max_pages_per_head=pages_per_head, device=self.device, dtype=self.dtype,
        )  # fmt: skip
        self.runtime = TransferRuntime(self.device, check_device_rows=False)  # recall rows are found, in range
        self.executor = PagedExecutor(self.kv, self.runtime, next(_ids), landing=config.recall_landing,
                                      async_pages=config.async_recall_pages,
                                      async_step_bytes=config.async_recall_step_bytes)  # fmt: skip
        self.scale = 1.0 / math.sqrt(self.mc.head_dim)
        b, h_q, d = config.max_batch_size, self.mc.num_heads, self.mc.head_dim
        self._tokens = torch.zeros(b, 1, dtype=torch.int64, device=self.device)  # static decode inputs
        self._rope_pos = torch.zeros(b, 1, dtype=torch.int64, device=self.device)
        self._logical = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.observer = DecodeObserver(self.mc.num_layers, b, h_q, d, self.device, self.dtype)
        # benches only: (layer, first step, queries [B, H_q, N, D]) -> the queries the policy sees
        self.query_hook: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
        # benches only: (layer, q [B, H_q, 1, D]) -> the decode query the step uses (device ops)
        self.step_query_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self.monitor: DeviceMonitor | None = None
        self.monitors_made = 0
        self._decision_graph: DecisionGraph | None = None
        self._decided = False  # a window was decided; its act comes in the next step (async recalls)
        self._acted: torch.cuda.Event | None = None  # that act's device work, on the side stream
        self._actions: list | None = None  # what that act asked for, applied in the following step
        self._graphs: dict[tuple, DecodeGraph] = {}
        self.policy: Policy | None = None
        self._needs = Requirements()
        self.batch = 0
        self.prompt_length = 0
        self.step = 0
        self.steps_left = 0
        self._entries_bound = 0
        self.starts: torch.Tensor | None = None
        self._in_graph = False
        self.graph_steps = 0
        self.eager_steps = 0

    # -- setup ---------------------------------------------------------------------------------
    def check(self, policy: Policy | None) -> None:
        """Raise ValueError if the engine cannot serve ``policy`` with its settings."""
        if policy is None:
            return
        needs = policy.requirements()
        reasons = unmet(CAPABILITIES, needs)
        if reasons:
            raise ValueError(f"torch_engine cannot serve {type(policy).__name__}: " + "; ".join(reasons))
        if self.deferred and Attend in needs.actions:
            raise ValueError(
                f"{type(policy).__name__} emits Attend views, which must be applied inside the decode step: "
                "deferred observations (CUDA graphs) cannot run it; build the engine with "
                "EngineConfig(cuda_graphs=False) (observe='auto' or 'inline')"
            )

    def _begin(self, lengths: list[int], policy: Policy | None, max_new_tokens: int) -> None:
        self.check(policy)
        if not lengths or min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(lengths)
        limit = self.mc.max_position  # the model's context: RoPE past it is not what it was trained on
        if longest > limit:
            raise ValueError(f"the prompt of {longest} tokens is longer than the model's context of {limit} tokens "
                             "(max_position): shorten it")  # fmt: skip
        if longest + max_new_tokens > limit:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                             f"{limit} tokens (max_position): shorten the prompt or generate fewer tokens")  # fmt: skip
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {self.config.max_seq_len}"
            )
        self.release()
        self.kv.start(len(lengths))
        self.policy = policy
        self._needs = policy.requirements() if policy is not None else Requirements()
        self.observer.start(self._needs, self.config.batch_observations)
        self.batch, self.prompt_length = len(lengths), longest
        self.step, self.steps_left = 0, max_new_tokens - 1
        # fixed for the whole generation, so one captured graph serves every step
        self._entries_bound = longest + max_new_tokens
        self.executor.reserve = max_new_tokens
        starts = [longest - n for n in lengths]
        self.starts = torch.tensor(starts, device=self.device) if any(starts) else None
        self._starts_host = starts
        if policy is not None:
            policy.reset(self.spec, self.batch)

    def release(self) -> None:
        """Free every page and host copy of the current sequences."""
        self.executor.reset()
        self.kv.release()
        self.policy = None
        self.monitor = self._decision_graph = None
        self._decided, self._acted, self._actions = False, None, None

    # -- prefill (the phase itself: prefill.Prefill) -------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]] | torch.Tensor, policy: Policy | None = None, *,
                max_new_tokens: int) -> torch.Tensor:  # fmt: skip
        """Run the prompts (one list of ids each, lengths may differ) and let ``policy``
        compress each layer. Returns the last prompt token's logits [B, V]."""
        seqs = [torch.as_tensor(p, dtype=torch.int64).flatten().to(self.device) for p in prompts]
        lengths = [int(s.numel()) for s in seqs]
        self._begin(lengths, policy, max_new_tokens)
        logits = Prefill(self, lengths).run(seqs)
        self._finish_prefill(lengths)
        return logits

    @torch.no_grad()
    def prefill_random(self, lengths: Sequence[int], policy: Policy | None = None, *, max_new_tokens: int,
                       seed: int = 0) -> None:  # fmt: skip
        """Fill the cache with random K/V as if prompts of ``lengths`` had been prefilled, and
        let ``policy`` compress it with random queries, layer by layer (for benchmarks where
        prefill time is not the point; peak memory stays near the compressed size)."""
        lengths = [int(n) for n in lengths]
        self._begin(lengths, policy, max_new_tokens)
        Prefill(self, lengths).run_random(seed)
        self._finish_prefill(lengths)

    def _finish_prefill(self, lengths: list[int]) -> None:
        """Ready decode: the final page tables on the device, and the static decode inputs
        at each sequence's first generated token."""
        self.executor.check_deferred()  # the prefill's Select checks: its one wait for the device
        self.kv.push_tables()
        self.executor.recaller.prepare()
        b = self.batch
        self._logical[:b] = self.prompt_length
        self._rope_pos[:b, 0] = torch.tensor(lengths, device=self.device)
        self.monitor = monitor_for(self)

    # -- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (tokens [B] int64, on any device) -> logits [B, V]."""
        if self.batch == 0:
            raise RuntimeError("decode before prefill")
        if self.steps_left < 1:
            raise RuntimeError("max_new_tokens reached: the cache has no room reserved for another token")
        b, exe = self.batch, self.executor
        self._tokens[:b, 0].copy_(tokens.view(-1), non_blocking=True)
        if self.graphs_enabled and not (exe.pending and self.config.recall_landing == "eager_step"):
            graph = self._graph()
            exe.recaller.wait_all()  # the replay starts after pending recalls, on the device
            logits = graph.replay()
            self.kv.advance()
            self.graph_steps += 1
        else:
            logits = self._step_body()
            self.eager_steps += 1
        # async recalls whose copies finished switch to their new pages from the next step on
        # (the host does it while this step runs)
        exe.recaller.land_ready()
        if self._actions is not None:  # acted on in the previous step: issue its recalls now
            actions, self._actions = self._actions, None
            exe.apply(actions)
        if self._decided or (self.monitor is not None and self.monitor.pending):
            self._decided = False  # the previous step's window: act on (a share of) it now
            self._act()
        if self.deferred and self.observer.due(self.step):
            self._observe_recorded()
        exe.recaller.pace(quiet=self.observer.due(self.step + 1))  # async gathers: the next step's share
        self.step += 1
        self.steps_left -= 1
        return logits[:, 0]

    def _graph(self) -> DecodeGraph:
        bound = self._entries_bound  # no head holds more entries than this in this generation
        key = (self.batch, bound, self.observer.active, self.observer.period,
               self.monitors_made if self.monitor is not None else 0)  # the taps' buffers are baked in
        graph = self._graphs.get(key)
        if graph is None:
            self._graphs.clear()  # one graph per generation shape; older ones hold memory
            graph = self._graphs[key] = DecodeGraph(self, bound)
        return graph

    def graph_state(self) -> tuple[torch.Tensor, ...]:
        """The device state one decode step advances (a graph's warm-up step restores it)."""
        return self.kv._lengths, self._rope_pos, self._logical, self.observer.slot

    def _step_body(self) -> torch.Tensor:
        """The decode forward over the static inputs: [B, 1, V]. Captured as is in graphs."""
        b = self.batch
        logits = self.model(self._tokens[:b], self._rope_pos[:b], self._decode_attend, ops=self.ops)
        self._rope_pos[:b] += 1
        self._logical[:b] += 1
        if self.observer.active:
            self.observer.advance()
        return logits

    def _decode_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv, exe, b = self.kv, self.executor, self.batch
        if self.step_query_hook is not None:
            q = self.step_query_hook(layer, q)
        kv.append(layer, k, v, self._logical[:b], fused=self.ops.fused)
        if self.observer.active and self.monitor is None:  # a DeviceMonitor taps the kernel instead
            self.observer.record(layer, q)
        if self._in_graph:
            bound = self._bound
        else:
            kv.advance(layer)
            exe.wait(layer)  # a recall issued after the previous step
            if not self.deferred and self.observer.due(self.step):
                self._observe(layer, self.observer.queries(b, layer), self.observer.first_step(self.step))
                exe.wait(layer)  # a recall the observation just issued
            bound = int(kv.host_lengths[layer].max())
        q0 = q[:, :, 0]  # [B, H_q, D]
        if layer in exe.attend_views:
            rows, lengths, width = exe.row_table(layer)
            out = paged_decode(q0, kv.keys, kv.values, rows, lengths, 1, self.scale, max_length=width,
                               kernel=self.kernel, config=self.config.decode_config)  # fmt: skip
        else:
            tap = self.monitor.tap(layer) if self.monitor is not None else None
            work = int(kv.host_lengths[layer, :b].sum())  # balances the grid: heads keep unequal lengths
            out = paged_decode(q0, kv.keys, kv.values, kv.page_table[layer], kv.lengths[layer], kv.page_size,
                               self.scale, max_length=bound, kernel=self.kernel, config=self.config.decode_config,
                               tap=tap, work=work)  # fmt: skip
        return out.view(b, 1, -1)

    def _observe(self, layer: int, queries: torch.Tensor, first_step: int) -> None:
        """The policy's decode call for ``layer``: queries [B, H_q, N, D] of steps first_step.."""
        obs = self._observation(layer, queries, first_step)
        if obs is not None:
            self.executor.apply(list(self.policy.decode(obs)))

    def _observation(self, layer: int, queries: torch.Tensor, first_step: int) -> Observation | None:
        heads = self.policy.observed_heads(layer)
        if heads is not None and len(heads) == 0:
            return None
        heads = None if heads is None else list(heads)
        if self.query_hook is not None:
            queries = self.query_hook(layer, first_step, queries)
        n = queries.shape[2]
        positions = self.prompt_length + first_step + torch.arange(n, dtype=torch.int64, device=self.device)
        return Observation(
            phase=Phase.DECODE, layer=layer, queries=queries, query_positions=positions,
            cache=self.kv.view(layer, heads, starts=self.starts), prompt_length=self.prompt_length,
            step=first_step, heads=heads, recorded=True,
        )  # fmt: skip

    def _observe_recorded(self) -> None:
        """After a step that completes a period: the device monitor scores the window (a
        captured graph under CUDA graphs) and the policy acts where it fired; without one,
        the policy sees every layer's recorded queries in one call
        (``Policy.decode_layers``). Then each layer's actions apply."""
        if self.monitor is not None:
            while self.monitor.pending:  # the last decision's acts finish before this one
                self._act()
            if self._acted is not None:  # the previous decision's act still reads the scores
                torch.cuda.current_stream(self.device).wait_event(self._acted)
                self._acted = None
            if self.graphs_enabled:
                if self._decision_graph is None or self._decision_graph.monitor is not self.monitor:
                    self._decision_graph = DecisionGraph(self.monitor)
                self._decision_graph.replay()
            else:
                self.monitor.decide()
            if self.executor.recaller.landing == "async":
                self.monitor.stage()  # read during the next step, which does not wait for it
                self._decided = True
            else:
                self._act()
            return
        queries = self.observer.queries(self.batch)  # [N, B, H_q, period, D]
        first = self.observer.first_step(self.step)
        observations = [self._observation(layer, queries[layer], first) for layer in range(self.mc.num_layers)]
        observations = [obs for obs in observations if obs is not None]
        for actions in self.policy.decode_layers(observations):
            self.executor.apply(list(actions))

    def _act(self) -> None:
        """The monitor's actions for its last decision, in layer order: applied now, or with
        async recalls a share of the fired monitors per step, each share's recalls issued in
        the step after (the host's work of a decision then spreads over the steps before the
        next one, each share hidden behind its step's replay), their device work on the
        recalls' side stream, off the decode steps."""
        rec = self.executor.recaller
        if rec.landing != "async":
            self.executor.apply([a for _, acts in sorted(self.monitor.act().items()) for a in acts])
            return
        side = rec.async_.side()
        spread = max(1, self.observer.period - 1)  # each share acted on, then issued, before the next decision
        actions = [a for _, acts in sorted(self.monitor.act(stream=side, spread=spread).items()) for a in acts]
        if actions:
            self._actions = (self._actions or []) + actions
        if side is not None and actions:
            self._acted = torch.cuda.Event()
            self._acted.record(side)

    # -- generate ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
                 policy: Policy | None = None, eos_token_ids: Collection[int] | None = None) -> GenerateOutput:  # fmt: skip
        """Greedy decoding of up to ``max_new_tokens`` tokens per prompt, until every sequence
        has produced one of ``eos_token_ids`` (None: the model's own, ``ModelConfig.eos_token_ids``;
        empty: never stop early). See ``GenerateOutput`` for what a stopped sequence returns."""
        stops = torch.tensor(sorted(self.mc.eos_token_ids if eos_token_ids is None else eos_token_ids),
                             dtype=torch.int64, device=self.device)  # fmt: skip
        logits = self.prefill(prompts, policy, max_new_tokens=max_new_tokens)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=self.device)  # [B]
        steps = [logits]
        for step in range(1, max_new_tokens):
            token = steps[-1].argmax(-1)  # [B]
            done |= torch.isin(token, stops)
            # host sync, once per _STOP_CHECK steps: stopping saves steps, asking every step stalls the queue
            if stops.numel() and step % _STOP_CHECK == 0 and bool(done.all()):
                break
            steps.append(self.decode(token))
        logits = torch.stack(steps, dim=1)  # [B, T, V]
        tokens = logits.argmax(-1)  # [B, T]
        lengths = _lengths(tokens, stops)  # [B]
        t = int(lengths.max())  # the steps past every stop token (up to _STOP_CHECK - 1) are dropped
        return GenerateOutput(tokens=tokens[:, :t], logits=logits[:, :t], lengths=lengths)

    # -- accounting ----------------------------------------------------------------------------
    def kv_bytes_device(self) -> int:
        """Bytes of the KV pages the sequences hold now."""
        return self.kv.used_bytes()

    def kv_bytes_full(self) -> int:
        """Bytes a full cache of the same sequences would hold (pages of prompt + reserve)."""
        kv = self.kv
        per_token = 2 * self.mc.head_dim * kv.kv.element_size()
        tokens = sum(self.prompt_length - s for s in self._starts_host) if self.batch else 0
        return tokens * per_token * self.mc.num_layers * self.mc.num_kv_heads

    def kv_bytes_read(self) -> int:
        """Bytes of K/V the next decode step reads (every kept entry, plus the new token)."""
        per_token = 2 * self.mc.head_dim * self.kv.kv.element_size()
        return (self.kv.kept_tokens() + self.kv.num_layers * self.batch * self.kv.num_kv_heads) * per_token

    def host_bytes(self) -> int:
        return self.runtime.host_bytes()


def _lengths(tokens: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """[B]: tokens of each row up to and including its first stop token (all T if none)."""
    hit = torch.isin(tokens, stops)  # [B, T]
    first = hit.int().argmax(dim=1) + 1  # argmax gives the first of equal maxima
    return torch.where(hit.any(dim=1), first, torch.full_like(first, tokens.shape[1]))
