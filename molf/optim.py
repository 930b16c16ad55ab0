"""MoLFAdamW: per layer and per step, the experts compete by score (EPD or PFN) and only the
top_k winners take the AdamW update; every expert's moments advance. `../shared/molf-algorithm.md` §2.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from itertools import repeat
from operator import is_not

import torch

from . import _backend, _checks, _cpu
from ._dist import check_columns, local, shard_group, state_columns
from ._layout import build_layout
from ._math import EPS_SCORE, check_hyperparameters, expert_score_terms, route, stochastic_round_bf16  # noqa: F401
from .kernels._env import to_device

MOLF_META = ("molf_step", "molf_seed", "molf_score", "molf_top_k")  # the optimizer's own entries in its state dict
_STEP_WRAPPERS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def _caller_of_step() -> int:
    """The stacklevel, for a warning raised by the function that calls this, of the code that called step():
    the first frame outside molf and torch (no_grad, torch.compiler.disable, the optimizer's hooks and an LR
    scheduler wrap step; how many frames each adds varies with torch's version)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_STEP_WRAPPERS):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class StepPlan:
    """The parameters that have gradients this step, in a fixed order: MoLF experts first, then the rest."""
    params: list            # parameters with a gradient
    owner: list[int]        # layer * n_experts + expert, or -1 outside MoLF layers
    group: list[int]        # index of the parameter's param group
    n_molf: int             # params[:n_molf] belong to MoLF experts
    inv_n: torch.Tensor     # [L, E] 1/N_e (EPD) or 1/sqrt(N_e) (PFN); 0 where no gradient
    no_grad: torch.Tensor   # [L, E] experts none of whose parameters has a gradient


def _warn_fp16_moments(layout, state_dtype, eps) -> None:
    """float16 moments with an eps that rounds to 0 in float16 (the default 1e-8 does): v = (1 - b2) g^2
    underflows to 0 for |g| < 7.7e-3 and such an element steps by lr m / eps or m / 0. torch.optim.AdamW too,
    silently; molf says it once, at construction."""
    if torch.tensor(eps, dtype=torch.float16).item() != 0:
        return
    if any((state_dtype or p.dtype) == torch.float16 for g in layout.groups for p in g["params"]):
        warnings.warn(f"Adam moments in float16 ({'state_dtype' if state_dtype else 'the parameters dtype'}) with "
                      f"eps={eps:g}, which rounds to 0 in float16: v = (1 - beta2) g^2 underflows to 0 for "
                      "|g| < 7.7e-3 and such elements take steps of lr m / eps or m / 0 (inf or NaN weights after "
                      "a step or two, as torch.optim.AdamW gives); pass state_dtype=torch.float32, or keep float32 "
                      "weights under torch.autocast", RuntimeWarning, stacklevel=3)


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW with MoLF routing.

    Args:
        model: a model wrapped by `molf.wrap` (or holding MoLFLinear layers).
        lr, weight_decay: the full expert (its bias gets weight decay 0) and every trainable parameter
            outside MoLF layers (plain AdamW there; weight decay 0 for biases and norm weights).
        lora_lr (default `lr`), lora_weight_decay: the LoRA experts.
        betas, eps: Adam's. As lr, weight decay and eps, betas are read from the param groups at each step
            (OneCycleLR cycles beta1 there), one pair for all groups.
        score: "epd" (lr_e / N_e * sum m^2/(sqrt(v)+1e-8)) or "pfn" (||m/(sqrt(v)+1e-8)|| / sqrt(N_e)).
        top_k: experts updated per layer and step.
        backend: "auto", "eager" or "triton".
        state_dtype: dtype of the moments (default: the parameter's dtype, as torch.optim.AdamW; float16
            moments with eps < 3e-8 warn: they underflow, see the README's "Behaviour on bad input").
        stochastic_rounding: round bf16 parameters stochastically after the update (unbiased: an update
            smaller than half a bf16 ulp still moves the weight in expectation); other dtypes unaffected.
        history_size: how many recent steps of routing and scores are kept on the device for
            `routing_history()` / `write_routing_jsonl()` (the oldest are dropped beyond it; the next read warns,
            saying how many; `history_full` says when the next step would drop one).

    After `step()`: `routing` (bool [n_layers, n_experts]) and `scores` (float32, same shape), on the
    parameters' device; layers in `layer_names` order, experts in `expert_names` order.
    """

    def __init__(self, model, lr: float, lora_lr: float | None = None, weight_decay: float = 0.0,
                 lora_weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, score: str = "epd",
                 top_k: int = 1, backend: str = "auto", state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, history_size: int = 10000):
        hp = check_hyperparameters(lr, lora_lr, weight_decay, lora_weight_decay, betas, eps, score, top_k)
        lr, lora_lr, weight_decay, betas, eps = hp["lr"], hp["lora_lr"], hp["weight_decay"], hp["betas"], hp["eps"]
        layout = build_layout(model, lr, lora_lr, weight_decay, hp["lora_weight_decay"])
        top_k = _checks.integer("top_k (experts updated per layer, at most the number of experts)", hp["top_k"], 1,
                                len(layout.expert_names))
        _backend.check_backend(backend)
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype or None, got {state_dtype!r}")
        stochastic_rounding = _checks.flag("stochastic_rounding", stochastic_rounding)
        history_size = _checks.integer("history_size", history_size, low=0)
        _warn_fp16_moments(layout, state_dtype, eps)
        super().__init__(layout.groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._groups_fixed = True  # see add_param_group
        self.score, self.top_k, self.backend, self.state_dtype = score, top_k, backend, state_dtype
        self._model, self._layout_args = model, (lr, lora_lr, weight_decay, hp["lora_weight_decay"])
        self._bind(layout)
        self._warned_bypassed: set[str] = set()
        self._warned_unfrozen = False
        self.routing: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self._history: deque = deque(maxlen=history_size)
        self._history_dropped = 0  # steps pushed out of a full history before anyone read them
        self.step_betas = betas  # read from the param groups at each step
        self.molf_step = 0  # steps taken (kept in the state dict, so routing logs continue after a resume)
        self.stochastic_rounding = stochastic_rounding
        # Non-finite scores seen so far (experts x steps), on the device: read only where history is flushed.
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)  # _rebind moves it
        self._warned_nonfinite = False
        # Drawn from torch's RNG once: runs seeded alike round alike; per step, seed + step (resumes exactly).
        self._seed_base = int(torch.randint(0, 2 ** 30, (1,)).item()) if stochastic_rounding else 0

    def _bind(self, layout) -> None:
        """Take `layout` (the model's MoLF layers and trainable parameters, as build_layout reads them): the
        parameters this optimizer steps, its device, and everything cached from them."""
        devices = {p.device for per in layout.experts for ps in per for p in ps}
        if len(devices) > 1:
            where = {}
            for name, per in zip(layout.layer_names, layout.experts):
                first = next((p for ps in per for p in ps), None)  # None: the layer frozen whole
                if first is not None:
                    where.setdefault(str(first.device), name)
            raise ValueError(
                f"MoLF layers must live on one device, found {len(devices)}: " +
                ", ".join(f"{d} (e.g. {n})" for d, n in sorted(where.items())) + ". A model split over GPUs by "
                "device_map='auto' is not supported: load it on one GPU (device_map='cuda:0', or a quantized base "
                "for MoLF-E), or train on several GPUs with DDP or FSDP2 (README, 'Beyond one GPU')")
        self.layout, self.layer_names, self.expert_names = layout, layout.layer_names, layout.expert_names
        self.device = devices.pop() if devices else torch.device("cpu")
        # The full expert's lr is its weight's group (its bias's where every weight is frozen); a LoRA expert's
        # is the lora group. An expert with no trainable parameter anywhere has no group: it never scores.
        kinds = [g["kind"] for g in self.param_groups]
        def first_group(*wanted):
            return next((kinds.index(k) for k in wanted if k in kinds), None)
        self._expert_group = [first_group("full", "full_bias") if name == "full" else first_group("lora")
                              for name in self.expert_names]
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._plans: dict[tuple[bool, ...], StepPlan] = {}
        n_exp = len(self.expert_names)
        self._flat = [(p, li * n_exp + ei) for li, per in enumerate(layout.experts) for ei, ps in enumerate(per)
                      for p in ps] + [(p, -1) for p in layout.others]
        self._set_dtypes()
        # FSDP2: each rank holds a shard of every expert; the per-expert sums are all-reduced once per step.
        self._reduce_group = shard_group(p for per in layout.experts for ps in per for p in ps)
        self._impl = None

    # What _bind derives from the parameters' identities (id-keyed tables, plans, device tables, a process group):
    # not pickled or deep-copied, read again from the copied model by __setstate__.
    _BOUND = ("layout", "layer_names", "expert_names", "device", "_expert_group", "_group_of", "_plans", "_flat",
              "_dtypes", "_kernels_lack_dtypes", "_reduce_group", "_impl")

    def __getstate__(self) -> dict:
        """copy.deepcopy and pickle: the optimizer with its model (deep-copy them together, `copy.deepcopy((model,
        opt))`, and the copy steps the copied model). Hooks and a step method patched by an LR scheduler stay
        behind, as torch.optim's own __getstate__ leaves them (a scheduler's wrapper would step the original)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in self._BOUND and k != "step" and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also torch.optim's load_state_dict, with "state" and "param_groups" alone
        if "_model" not in state:
            return
        layout = build_layout(self._model, *self._layout_args)
        now = [[id(p) for p in g["params"]] for g in layout.groups]
        if now != [[id(p) for p in g["params"]] for g in self.param_groups]:
            raise RuntimeError("the copied MoLFAdamW's param groups are not its copied model's trainable parameters "
                               "(the model's parameters were replaced or frozen while it was being copied)")
        self._bind(layout)

    def _dtypes_now(self) -> tuple[torch.dtype, ...]:
        """The dtypes the step computes in (parameters, moments): they pick the backend under "auto"."""
        moments = {st["exp_avg"].dtype for st in self.state.values() if st}
        return tuple({p.dtype for p, _ in self._flat} | moments | ({self.state_dtype} if self.state_dtype else set()))

    def _set_dtypes(self) -> None:
        """Read the dtypes (_dtypes_now); where "auto" takes torch ops only for them (float64 on a GPU), the step
        reads them again each time, to go back to the kernels once they fit (model.double(), then .float())."""
        self._dtypes = self._dtypes_now()
        self._kernels_lack_dtypes = _backend.requested(self.backend) == "auto" and \
            _backend.resolve(self.backend, self.device) == "triton" != _backend.resolve(self.backend, self.device,
                                                                                        self._dtypes)

    def _rebind(self) -> str | None:
        """Before the first step (no state yet), re-read the model's parameters where they were replaced or
        moved: FSDP2's fully_shard after the optimizer was built (transformers' Trainer and accelerate.prepare
        build it first, then point its param groups at the sharded parameters), accelerate.prepare's move to the
        GPU, load_state_dict(assign=True), to_empty. As torch.optim, which keeps no state before its first step.
        None when done, else why not (nothing changed)."""
        if any(self.state.values()):
            return "MoLFAdamW has stepped since (its moments belong to the old tensor)"
        layout = build_layout(self._model, *self._layout_args)
        now = [(g["kind"], len(g["params"])) for g in layout.groups]
        before = [(g["kind"], len(g["params"])) for g in self.param_groups]
        if now != before:
            return (f"the model's trainable parameters now fill the param groups (kind, size) {now}, not {before} "
                    "(frozen or unfrozen since)")
        for group, new in zip(self.param_groups, layout.groups):  # the groups' hyperparameters are kept
            group["params"] = new["params"]
        self.state.clear()
        self._bind(layout)
        self._nonfinite = self._nonfinite.to(self.device)
        return None

    # -- planning (host side, cached per pattern of which parameters have gradients) --
    def _warn_bypassed(self, counts: list[int]) -> None:
        """Warn once per layer whose base took a gradient while its trainable LoRA experts took none: the model
        reads that base weight without calling the layer (as Mamba's kernels do), so its experts never apply."""
        if "full" not in self.expert_names:
            return
        n, full = len(self.expert_names), self.expert_names.index("full")
        bypassed = [name for li, name in enumerate(self.layer_names) if name not in self._warned_bypassed
                    and counts[li * n + full] and any(self.layout.experts[li][e] and not counts[li * n + e]
                                                      for e in range(n) if e != full)]
        if bypassed:
            self._warned_bypassed.update(bypassed)
            warnings.warn(f"{bypassed[:3]} ({len(bypassed)} MoLF layers): the base weight got a gradient but the "
                          "LoRA experts none, so the model reads the weight without calling the layer and the "
                          "experts never apply (only the full expert trains there); leave these layers out of "
                          "target_modules", UserWarning, stacklevel=_caller_of_step())

    def _plan(self) -> tuple[StepPlan, list]:
        """The plan of this step's pattern of gradients (cached per pattern), and the gradients of its params."""
        lay, flat = self.layout, self._flat
        grads = [p.grad for p, _ in flat]
        key = tuple(map(is_not, grads, repeat(None)))
        plan = self._plans.get(key)
        if plan is None:
            with_grad = [(p, o) for (p, o), has in zip(flat, key) if has]
            sparse = next((p for p, _ in with_grad if p.grad.layout != torch.strided), None)
            if sparse is not None:  # as torch.optim.AdamW (checked when a new pattern of gradients is planned)
                raise RuntimeError(f"MoLFAdamW does not support sparse gradients: {self.param_name(sparse)} has a "
                                   f"{sparse.grad.layout} gradient (nn.Embedding(sparse=True)?)")
            n_layers, n_experts = len(lay.layer_names), len(self.expert_names)
            counts = [0] * (n_layers * n_experts)
            for p, o in with_grad:
                if o >= 0:
                    counts[o] += p.numel()
            self._warn_bypassed(counts)
            inv = [(1.0 / c if self.score == "epd" else 1.0 / math.sqrt(c)) if c else 0.0 for c in counts]
            plan = StepPlan(
                params=[p for p, _ in with_grad], owner=[o for _, o in with_grad],
                group=[self._group_of[id(p)] for p, _ in with_grad],
                n_molf=sum(o >= 0 for _, o in with_grad),
                inv_n=to_device(inv, torch.float32, self.device).view(n_layers, n_experts),
                no_grad=to_device([c == 0 for c in counts], torch.bool, self.device).view(n_layers, n_experts))
            self._plans[key] = plan
        return plan, [g for g in grads if g is not None]

    def rounding_seed(self) -> int:
        """The stochastic-rounding seed of the step being taken (a host int: no device read)."""
        return (self._seed_base + self.molf_step) % (2 ** 31 - 1)

    def _check_params_not_replaced(self, rebound: bool = False):
        """Every step (one identity and one device check per parameter): a parameter replaced in its module or
        moved to another device after the optimizer's first step would otherwise train a detached tensor
        silently, or meet state and tables left on the old device. Before the first step the model's parameters
        as they are now are taken (_rebind): accelerate.prepare moves the model after the optimizer is built,
        FSDP2 replaces its parameters."""
        dev = self.device
        for mod, attr, p in self.layout.slots:
            replaced = mod._parameters.get(attr) is not p
            if not replaced and p.device == dev:
                continue
            why = None if rebound else self._rebind()
            if why is None and not rebound:
                return self._check_params_not_replaced(rebound=True)
            name = self.layout.names[id(p)]
            if replaced:
                raise RuntimeError(
                    f"the parameter {name} was replaced after MoLFAdamW was created (by load_state_dict("
                    f"assign=True), fully_shard, to_empty, ...) and {why}: this optimizer would train a stale "
                    "tensor. Replace parameters before the first step, or create the optimizer after loading, "
                    "sharding or moving the model.")
            if rebound:
                raise RuntimeError(f"the parameter {name} is on {p.device} but the MoLF layers' experts on {dev}: "
                                   "MoLFAdamW steps the trainable parameters of one device; move the whole model")
            raise RuntimeError(
                f"the parameter {name} is on {p.device}, but MoLFAdamW was created for parameters on {dev} and "
                f"{why}: the model was moved after that. Move the model before the first step, or create the "
                "optimizer after moving it.")

    def _warn_unfrozen(self) -> None:
        """Warn (once) when parameters frozen at build time have gradients: unfrozen since, they are not trained."""
        late = [n for n, p in self.layout.frozen if p.grad is not None]
        if late:
            self._warned_unfrozen = True
            warnings.warn(f"{late[:3]} ({len(late)} parameters) have gradients but were frozen when MoLFAdamW was "
                          "built: it trains the parameters that required grad then, so these are not updated; to "
                          "train them, build MoLFAdamW after unfreezing", UserWarning, stacklevel=_caller_of_step())

    def param_name(self, p) -> str:
        """A readable name of a parameter this optimizer trains: its layer, expert and tensor."""
        return self.layout.names.get(id(p), "<a parameter outside the model>")

    def add_param_group(self, param_group):
        if getattr(self, "_groups_fixed", False):
            raise NotImplementedError(
                "MoLFAdamW builds its param groups from the model's MoLF layers (kinds full, full_bias, lora, decay, "
                "no_decay) and cannot take more: add the parameters to the model before creating the optimizer, "
                "or give them an optimizer of their own")
        super().add_param_group(param_group)

    def _states(self, params) -> tuple[list[dict], bool]:
        """The state of each parameter (step, moments), created where there is none; and whether any was."""
        state = self.state
        sts = [state[p] for p in params]
        if all(sts):
            return sts, False
        for p, st in zip(params, sts):
            if not st:
                dt = self.state_dtype or p.dtype
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return sts, True

    def _backend_impl(self):
        name = _backend.resolve(self.backend, self.device, self._dtypes)
        if self._impl is None or self._impl.name != name:
            if name == "triton":
                from ._triton_optim import TritonRoutedAdamW
                self._impl = TritonRoutedAdamW(self)
            else:
                self._impl = EagerRoutedAdamW(self)
        return self._impl

    def _group_betas(self) -> tuple[float, float]:
        """(beta1, beta2) of this step, read from the param groups as torch.optim.AdamW does (OneCycleLR and
        CyclicLR cycle beta1 there). One pair for every group: the moments of all experts advance in one launch."""
        kinds, pairs = [g["kind"] for g in self.param_groups], [tuple(g["betas"]) for g in self.param_groups]
        other = next((i for i, b in enumerate(pairs) if b != pairs[0]), None)
        if other is not None:
            raise ValueError(f"the param groups have different betas ({kinds[0]} {pairs[0]}, {kinds[other]} "
                             f"{pairs[other]}): MoLFAdamW takes one pair for all groups (the moments of every "
                             "expert advance in one launch); set the same betas on every param group")
        if len(pairs[0]) != 2:
            raise ValueError(f"betas must be two floats in [0, 1), got {pairs[0]!r} in the param groups")
        return tuple(_checks.real(f"betas[{i}] of the param groups", b, 0.0, 1.0, high_open=True)
                     for i, b in enumerate(pairs[0]))

    # Not traced by torch.compile (a compiled function calling step() runs it as is): the step is already one
    # launch per phase over pointer tables, which dynamo cannot trace.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params_not_replaced()
        if not self._warned_unfrozen:
            self._warn_unfrozen()
        self.step_betas = self._group_betas()
        plan, grads = self._plan()
        states, created = self._states(plan.params)
        if self._impl is not None and created:  # state made anew (opt.state cleared): tables rebuilt
            self._impl = None
        if self._kernels_lack_dtypes:  # O(tensors), only while "auto" runs torch ops for float64
            self._set_dtypes()
        impl = self._backend_impl()
        if not impl.prepare(plan, grads, states):  # triton under "auto", model.double() since: torch ops
            self._set_dtypes()
            impl = self._backend_impl()
            impl.prepare(plan, grads, states)
        lrs = [0.0 if g is None else self.param_groups[g]["lr"] for g in self._expert_group]
        # The CPU's C loops take the whole step in one call where no collective sits between sums and routing.
        done = impl.routed_step(plan, lrs) if impl.name == "eager" and self._reduce_group is None else None
        if done is None:
            sums = impl.moments_and_sums(plan)
            if self._reduce_group is not None:
                torch.distributed.all_reduce(sums, group=self._reduce_group)  # one collective for the whole model
            self.routing, self.scores = route(sums, plan.inv_n, plan.no_grad, lrs, self.score, self.top_k)
            self._nonfinite += (~self.scores.isfinite() & ~plan.no_grad).sum()  # on the device, no synchronisation
            impl.update(plan, self.routing)
        else:
            self.routing, self.scores, nonfinite = done
            if nonfinite:
                self._nonfinite += nonfinite
        self.molf_step += 1
        if self._history.maxlen:
            self._history_dropped += self.history_full
            self._history.append((self.molf_step, self.routing, self.scores))
        return loss

    @property
    def history_size(self) -> int:
        """How many recent steps of routing and scores are kept (the constructor's history_size)."""
        return self._history.maxlen

    @property
    def history_full(self) -> bool:
        """True when the next step pushes the oldest kept step out of the history (`history_size` unread steps)."""
        return 0 < len(self._history) == self._history.maxlen

    # -- routing history: kept on the device, one transfer per flush --
    def routing_history(self, clear: bool = False) -> dict:
        """Recent steps as host tensors: {"step": int64 [S], "routing": bool [S, L, E], "scores": float32 [S, L, E]}.

        Scores are kept as computed: -inf for an expert without gradients, NaN or inf for one whose moments
        are not finite (it did not win while another expert of its layer had a finite score). The first
        flush after a non-finite score warns once."""
        L, E = len(self.layer_names), len(self.expert_names)
        steps = torch.tensor([s for s, _, _ in self._history], dtype=torch.int64)
        if self._history:
            packed = torch.stack([torch.stack([sc, r.to(sc.dtype)]) for _, r, sc in self._history]).cpu()
            scores, routing = packed[:, 0], packed[:, 1].bool()
        else:
            scores, routing = torch.empty(0, L, E), torch.empty(0, L, E, dtype=torch.bool)
        if clear:
            self._history.clear()
        if self._history_dropped:
            warnings.warn(f"MoLFAdamW: the routing of {self._history_dropped} earlier step(s) was dropped before it "
                          f"was read: history_size={self._history.maxlen} keeps the last {self._history.maxlen} "
                          "steps; read routing_history() or write_routing_jsonl() at least that often, or pass a "
                          "larger history_size", UserWarning, stacklevel=3)
            self._history_dropped = 0
        self._warn_nonfinite()
        return {"step": steps, "routing": routing, "scores": scores}

    def nonfinite_scores(self) -> int:
        """How many (step, layer, expert) scores were NaN or inf so far (one device read)."""
        return int(self._nonfinite.item())

    def _warn_nonfinite(self):
        if self._warned_nonfinite:
            return
        n = self.nonfinite_scores()
        if n:
            self._warned_nonfinite = True
            warnings.warn(
                f"MoLFAdamW: {n} expert score(s) were NaN or inf (non-finite gradients or moments). Such an expert "
                "never wins while another expert of its layer has a finite score; its moments stay non-finite "
                "until they decay. Check the loss scale, clip gradients, or use torch.amp.GradScaler (which skips "
                "steps with inf/NaN gradients).", RuntimeWarning, stacklevel=3)

    def routing_records(self, clear: bool = False) -> list[dict]:
        """One record per step: {"step", "selections": {layer: {"winners": [...], "scores": {expert: float}}},
        "non_finite": n}. A NaN or inf score is written as null (JSON has neither) and counted in
        "non_finite"; an expert without gradients is left out of "scores"."""
        h = self.routing_history(clear)
        out = []
        for s, r, sc in zip(h["step"].tolist(), h["routing"].tolist(), h["scores"].tolist()):
            sel, bad = {}, 0
            for name, win, score in zip(self.layer_names, r, sc):
                scores = {}
                for e, v in zip(self.expert_names, score):
                    if math.isfinite(v):
                        scores[e] = v
                    elif v != -math.inf:
                        scores[e], bad = None, bad + 1
                sel[name] = {"winners": [e for e, w in zip(self.expert_names, win) if w], "scores": scores}
            out.append({"step": s, "selections": sel, "non_finite": bad})
        return out

    def write_routing_jsonl(self, path, clear: bool = True) -> int:
        """Append the kept steps to a JSONL file (the format the paper's routing plots are drawn from)."""
        records = self.routing_records(clear)
        with open(path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        return len(records)

    def state_dict(self):
        sd = super().state_dict()
        meta = dict(molf_step=self.molf_step, molf_seed=self._seed_base, molf_score=self.score, molf_top_k=self.top_k)
        sd.update(meta)
        # torch.distributed.checkpoint's get_optimizer_state_dict (FSDP2 checkpoints: accelerate, the Trainer) keeps
        # only "state" and "param_groups": the same entries in the first group survive it
        sd["param_groups"][0].update(meta)
        return sd

    def _check_state_dict(self, state_dict) -> None:
        """Raise (before anything changes) unless state_dict fits this optimizer: same param groups, kinds
        and sizes, and every moment shaped like its parameter."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (from MoLFAdamW.state_dict()), "
                            f"got {type(state_dict).__name__}")
        groups = state_dict["param_groups"]
        if not all(isinstance(g, dict) and "kind" in g for g in groups):
            raise ValueError("this state dict's param groups have no 'kind' tag: it comes from another optimizer "
                             "(torch.optim.AdamW?), whose groups and moments molf cannot map onto its experts; "
                             "load a MoLFAdamW state dict, or start the MoLF optimizer fresh")
        mine = [(g["kind"], len(g["params"])) for g in self.param_groups]
        theirs = [(g["kind"], len(g["params"])) for g in groups]
        if mine != theirs:
            raise ValueError(f"the state dict's param groups (kind, size) {theirs} do not match this optimizer's "
                             f"{mine}: it was saved for another model or another wrap (ranks, train_base, "
                             "freeze_others)")
        saved = state_dict["state"]
        for g, sg in zip(self.param_groups, groups):
            for p, i in zip(g["params"], sg["params"]):
                st = saved.get(i)
                if st is None:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    t = st.get(key) if isinstance(st, dict) else None
                    if not isinstance(t, torch.Tensor):
                        raise ValueError(f"the state of {self.param_name(p)} has no tensor {key!r}")
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"the state of {self.param_name(p)} does not fit it: {key} has shape "
                                         f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
                    if not t.is_floating_point():
                        raise ValueError(f"the state of {self.param_name(p)}: {key} has dtype {t.dtype}")
                step = st.get("step")
                if step is None or torch.as_tensor(step).numel() != 1:
                    raise ValueError(f"the state of {self.param_name(p)} has no scalar 'step'")

    def load_state_dict(self, state_dict):
        """As torch's, but checked first (a state dict of another model or optimizer raises a ValueError naming
        the parameter, and nothing changes), moments keep `state_dtype` (torch would cast them to the
        parameter's dtype) and take their parameter's memory layout, and step counters live on the parameter's
        device. The routing history kept for `routing_history()` is cleared: it described the replaced state's
        steps (read it first to keep it)."""
        self._check_state_dict(state_dict)
        saved = state_dict["state"]
        meta = {**state_dict["param_groups"][0], **state_dict} if state_dict["param_groups"] else state_dict
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            for k in MOLF_META:
                g.pop(k, None)
        self.molf_step = int(meta.get("molf_step", 0))
        self._history.clear()  # the replaced state's steps (torch.distributed.checkpoint steps once before loading)
        self._history_dropped = 0
        saved_routing = (meta.get("molf_score", self.score), meta.get("molf_top_k", self.top_k))
        if saved_routing != (self.score, self.top_k):
            warnings.warn(f"the optimizer state was saved routing with score={saved_routing[0]!r}, "
                          f"top_k={saved_routing[1]}; this optimizer routes with score={self.score!r}, "
                          f"top_k={self.top_k} (kept: pass the saved ones to MoLFAdamW to continue that run)",
                          UserWarning, stacklevel=2)
        self._seed_base = int(meta.get("molf_seed", self._seed_base))
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                src, st = saved[i], self.state[p]
                dt = self.state_dtype or p.dtype
                st["exp_avg"] = _moment_like(p, src["exp_avg"], dt)
                st["exp_avg_sq"] = _moment_like(p, src["exp_avg_sq"], dt)
                st["step"] = torch.as_tensor(src["step"], dtype=torch.float32).to(p.device, copy=True)
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._impl = None  # tables of state pointers must be rebuilt


def _moment_like(p: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a saved moment on p's device, in dtype and in p's memory layout, as the step makes moments (the
    fused kernels walk a parameter, its gradient and its moments as one flat array: a moment saved for a
    transposed parameter and loaded for a row-major one would otherwise be refused). A DTensor (FSDP2) keeps the
    layout it was saved with: its local shards are laid out by FSDP."""
    if type(saved) is not torch.Tensor or type(p.data) is not torch.Tensor:
        return saved.to(device=p.device, dtype=dtype, copy=True)
    return torch.empty_like(p, dtype=dtype).copy_(saved)  # p's strides where p is dense, else row-major


class EagerRoutedAdamW:
    """The routed step in torch ops (foreach moments, per-expert sums, the winners' AdamW update); on the CPU,
    C loops over every tensor instead (molf/_cpu.py): one call for the whole step (`routed_step`), or two
    around torch's routing (a collective between, stochastic rounding, tensors the loops do not take)."""
    name = "eager"

    def __init__(self, opt: MoLFAdamW):
        self.opt = weakref.proxy(opt)  # the optimizer owns this backend: no reference cycle keeping it alive
        # Losers are skipped on the host where reading the routing costs nothing; on a GPU they are masked.
        self.host_routing = opt.device.type == "cpu"
        self._tables: dict[int, _cpu.Table] = {}  # per plan (id): the native CPU loops' rows
        self._tab = None  # this step's table, from moments_and_sums to update
        self._cols = None  # this step's columns, from prepare to routed_step or moments_and_sums
        self.sharded = any(local(p) is not p for p, _ in opt._flat)  # FSDP2: the ops take the local shards

    @staticmethod
    def _score_sums(ms, vs, score: str) -> list[torch.Tensor]:
        """Per tensor, the sum of the score terms in fp32 (EPD m*m/d, PFN (m/d)*(m/d), d = sqrt(v) + eps_s,
        as the kernels compute them, overflow to NaN included), with foreach ops over all tensors at once."""
        if not ms:
            return []
        if any(m.dtype != torch.float32 for m in ms + vs) or ms[0].device.type != "cpu":
            return [expert_score_terms(m, v, score).sum() for m, v in zip(ms, vs)]
        d = torch._foreach_sqrt(vs)
        torch._foreach_add_(d, EPS_SCORE)
        if score == "epd":
            q = torch._foreach_mul(ms, ms)
            torch._foreach_div_(q, d)
        else:
            q = torch._foreach_div(ms, d)
            torch._foreach_mul_(q, q)
        return list(torch._foreach_norm(q, 1))  # the terms are >= 0 (or NaN): their 1-norm is their sum

    def _native_table(self, plan: StepPlan, ps, gs, ms, vs, steps):
        """The native CPU loops' table (molf/_cpu.py) for this step's rows that they take (contiguous CPU
        tensors of a dtype they store, fp32 step counts), or None. Kept per plan while no parameter, moment or
        step tensor moves; the gradient column is rewritten every step (new storage after zero_grad)."""
        if not self.host_routing or not _cpu.available():
            return None
        key = tuple(t.data_ptr() for col in (ps, ms, vs, steps) for t in col)
        tab = self._tables.get(id(plan))
        if tab is None or tab.key != key:
            check_columns(self.opt, plan.params, (ps, gs, ms, vs))  # the loops index each row by the param's numel
            rows = [i for i in range(len(ps)) if _cpu.takes(ps[i]) and _cpu.takes(ms[i])
                    and _cpu.takes(vs[i]) and steps[i].is_cpu and steps[i].dtype == torch.float32]
            pick = lambda col: [col[i] for i in rows]  # noqa: E731
            tab = _cpu.Table(key, pick(ps), pick(ms), pick(vs), pick(steps), pick(plan.owner), pick(plan.group))
            tab.rows = rows
            owners = [plan.owner[i] for i in rows]  # routed_step_ wants MoLF rows layer-major, then the others
            tab.ordered = all(a <= b or b < 0 for a, b in zip(owners, owners[1:])) and \
                all(b < 0 for a, b in zip(owners, owners[1:]) if a < 0)
            self._tables[id(plan)] = tab
        grads = [gs[i] for i in tab.rows]
        if not all(map(_cpu.takes, grads)):  # a strided or odd-dtype gradient: torch ops this step
            return None
        tab.set_grads(grads)
        return tab

    def _group_hyperparameters(self) -> torch.Tensor:
        """float64 [groups, 3]: each param group's (lr, weight decay, eps) as the C loops read them (read every
        step: a scheduler changes lr)."""
        return torch.tensor([[g["lr"], g["weight_decay"], g["eps"]] for g in self.opt.param_groups],
                            dtype=torch.float64)

    def prepare(self, plan: StepPlan, grads: list, states: list) -> bool:
        """This step's columns (parameters, gradients, moments, step counters; FSDP2: the local shards) from the
        gradients and states of plan.params as the optimizer read them this step."""
        self._cols = cols = state_columns(plan.params, grads, states, self.sharded)
        if not (self.host_routing and _cpu.available()):  # torch ops (the C loops check in _native_table): a
            # moment of another size would fail in their per-tensor fallback after some tensors moved
            numels = list(map(torch.Tensor.numel, cols[0]))
            if any(list(map(torch.Tensor.numel, c)) != numels for c in cols[1:4]):
                check_columns(self.opt, plan.params, cols)  # raises, naming the parameter
        return True

    def routed_step(self, plan: StepPlan, expert_lrs: list[float]):
        """The whole step in one call of the C loops (molf/_cpu.py routed_step_: a few layers at a time, so
        the update reads the moments back from cache) when they take every tensor; (winners, scores) as
        molf._math.route gives them and the count of non-finite scores, or None (then the caller runs the step
        in parts)."""
        opt = self.opt
        if not self.host_routing or opt.stochastic_rounding or not _cpu.available():
            return None
        tab = self._native_table(plan, *self._cols)
        if tab is None or len(tab.rows) != len(plan.params) or not tab.ordered:
            return None
        self._cols = None  # taken: the gradients are not kept past the step (zero_grad frees them)
        hp = self._group_hyperparameters()
        beta1, beta2 = opt.step_betas
        return _cpu.routed_step_(tab, hp, beta1, beta2, opt.score == "pfn", plan.inv_n, plan.no_grad, expert_lrs,
                                 opt.top_k)

    def moments_and_sums(self, plan: StepPlan) -> torch.Tensor:
        opt = self.opt
        beta1, beta2 = opt.step_betas
        (ps, gs, ms, vs, steps), self._cols = self._cols, None  # taken, as in routed_step
        tab = self._tab = self._native_table(plan, ps, gs, ms, vs, steps)
        n = plan.inv_n.numel()
        if tab is not None:
            sums = torch.zeros(n, dtype=torch.float64)
            _cpu.moments_score_(tab, beta1, beta2, opt.score == "pfn", sums)
            sums = sums.float()
        taken = set(tab.rows) if tab is not None else set()
        rest = [i for i in range(len(plan.params)) if i not in taken]
        if rest:
            r_ms, r_vs = [ms[i] for i in rest], [vs[i] for i in rest]
            r_gs = [gs[i] if gs[i].dtype == ms[i].dtype else gs[i].to(ms[i].dtype) for i in rest]
            torch._foreach_lerp_(r_ms, r_gs, 1.0 - beta1)
            torch._foreach_mul_(r_vs, beta2)
            torch._foreach_addcmul_(r_vs, r_gs, r_gs, value=1.0 - beta2)
            torch._foreach_add_([steps[i] for i in rest], 1.0)
        small = [i for i in rest if i < plan.n_molf]
        if small or tab is None:
            zero = torch.zeros((), dtype=torch.float32, device=opt.device)
            per_expert = [[] for _ in range(n)]
            for i, term in zip(small, self._score_sums([ms[i] for i in small], [vs[i] for i in small], opt.score)):
                per_expert[plan.owner[i]].append(term)
            rest_sums = torch.stack([sum(ts[1:], ts[0]) if ts else zero for ts in per_expert])  # fixed order
            sums = rest_sums if tab is None else sums + rest_sums
        return sums.view_as(plan.inv_n)

    def update(self, plan: StepPlan, winners: torch.Tensor) -> None:
        """p <- p (1 - lr wd) - lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps) for winners (and parameters outside
        MoLF layers); a loser's weights stay bitwise unchanged, whatever its moments hold (NaN included).

        On the CPU the winners are read on the host (a synchronisation costs nothing there) and losers are
        skipped; on a GPU the new values are selected by torch.where, without a host synchronisation."""
        opt = self.opt
        beta1, beta2 = opt.step_betas
        gen = None
        if opt.stochastic_rounding:
            gen = torch.Generator(device=opt.device).manual_seed(opt.rounding_seed())
        tab, self._tab = self._tab, None
        done = set()
        if tab is not None and gen is None:  # one native call; losers skipped where the routing lies
            hp = self._group_hyperparameters()
            _cpu.adamw_update_(tab, winners.reshape(-1).contiguous(), hp, beta1, beta2)
            done = set(tab.rows)
        if len(done) == len(plan.params):
            return
        host_win = winners.view(-1).tolist() if self.host_routing else None
        win = winners.view(-1)
        batch: dict[tuple, list] = {}
        for i, p in enumerate(plan.params):
            if i in done:
                continue
            molf_param = i < plan.n_molf
            if molf_param and host_win is not None and not host_win[plan.owner[i]]:
                continue
            g, st = opt.param_groups[plan.group[i]], opt.state[p]
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            p, m, v, step = local(p), local(st["exp_avg"]), local(st["exp_avg_sq"]), st["step"]
            if host_win is not None and gen is None:  # CPU: bias corrections as host floats (float64), as the reference
                t = step.item()
                if p.dtype == m.dtype:  # small tensors: batched below
                    batch.setdefault((lr, wd, eps), []).append((p, m, v, math.sqrt(1.0 - beta2 ** t),
                                                                -lr / (1.0 - beta1 ** t)))
                    continue
            # Bias corrections in float64: in fp32, 1 - 0.999^t loses ~1e-5 of its value to cancellation.
            t = step.double()
            step_size = (lr / (1.0 - torch.pow(beta1, t))).float()
            bc2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt().float()
            decay = 1.0 - lr * wd
            upd = v.sqrt().div_(bc2_sqrt).add_(eps)  # one temporary, reused in place
            torch.div(m, upd, out=upd).mul_(step_size)
            masked = molf_param and host_win is None
            if gen is not None and p.dtype == torch.bfloat16:
                new = stochastic_round_bf16(p.float() * decay - upd.float(), gen)
            elif not masked and p.dtype == torch.promote_types(p.dtype, m.dtype):
                p.mul_(decay).sub_(upd)
                continue
            else:  # masked, or wider moments than parameters (state_dtype): one rounding
                new = (p.to(upd.dtype) * decay).sub_(upd).to(p.dtype)
            p.copy_(torch.where(win[plan.owner[i]], new, p) if masked else new)
        for (lr, wd, eps), rows in batch.items():  # p *= 1 - lr wd; p -= lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps)
            ps, ms, vs, bc2_sqrts, steps = map(list, zip(*rows))
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, bc2_sqrts)
            torch._foreach_add_(denom, eps)
            torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_addcdiv_(ps, ms, denom, steps)
