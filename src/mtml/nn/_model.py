"""The multi-task model: per-task stems → shared trunk → per-task heads, by plain composition."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtml.errors import ShapeError, UnknownNameError

__all__ = ["MultiTaskModel"]


def _linear(head: nn.Module) -> nn.Linear | None:
    """The linear map a head is: a plain ``nn.Linear``, or one inside a one-layer ``nn.Sequential`` (what the
    builders make); None for any other head."""
    if type(head) is nn.Sequential and len(head._modules) == 1:  # (_modules: indexing a Sequential is slow)
        head = next(iter(head._modules.values()))
    return head if type(head) is nn.Linear else None


class MultiTaskModel(nn.Module):
    """``head[task](trunk(stem[task](x)))``.

    Args:
        trunk: the meta-learner shared by every task, ``[batch, d_in] → [batch, d_feat]``.
        heads: one task learner per task name, ``[batch, d_feat] → [batch, outputs]``.
        stems: optional input adapters for tasks whose inputs differ from the trunk's
            (``[batch, *task_input] → [batch, d_in]``), by task name, or by a name of your choice that
            ``stem_of`` maps tasks to (tasks on the same rows share one stem); tasks without a stem feed the trunk
            directly.
        input_shapes: optional expected input shape (one example) per task; when given, ``forward`` checks it
            and raises :class:`~mtml.errors.ShapeError` naming the task and both shapes.
        stem_of: task → stem name, for stems shared by several tasks (default: a task uses the stem of its name).

    Parameter names are ``trunk.*``, ``heads.<task>.*`` and ``stems.<stem>.*``, which is what
    :meth:`shared_parameters` and :meth:`task_parameters` split on (and what ``torch.func.functional_call``
    and checkpoints see).
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        stems: Mapping[str, nn.Module] | None = None,
        *,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        stem_of: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskModel needs at least one head (one per task).")
        stems = dict(stems or {})
        stem_of = {**{t: t for t in stems if t in heads}, **dict(stem_of or {})}
        bad = {t: s for t, s in stem_of.items() if t not in heads or s not in stems}
        if bad:
            raise UnknownNameError(f"stem_of maps {bad}, but every entry needs a task with a head and a stem of that "
                                   f"name (heads: {list(heads)}; stems: {list(stems)}).")
        unused = set(stems) - set(stem_of.values())
        if unused:
            raise UnknownNameError(f"stems given for tasks without a head: {sorted(unused)}; name every stem after "
                                   "a task, or map tasks to it with stem_of.")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.stems = nn.ModuleDict(stems)
        self.stem_of = stem_of
        self.input_shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}

    def stem(self, task: str) -> nn.Module | None:
        """``task``'s stem, or None when it feeds the trunk directly."""
        key = self.stem_of.get(task)
        return None if key is None else self.stems[key]

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def _check(self, x: Tensor, task: str) -> None:
        if task not in self.heads:
            raise UnknownNameError(f"unknown task '{task}'; the model has heads for: {', '.join(self.task_names)}.")
        want = self.input_shapes.get(task)
        if want is not None and tuple(x.shape[1:]) != want:
            raise ShapeError(
                f"task '{task}': input has per-example shape {tuple(x.shape[1:])} but the model was built for "
                f"{want}; give x as [batch, {', '.join(map(str, want))}] or rebuild the model for this width."
            )

    def features(self, x: Tensor, task: str | None = None) -> Tensor:
        """Trunk features ``[batch, d_feat]`` of ``x`` (passed through ``task``'s stem if it has one)."""
        if task is not None:
            self._check(x, task)
            stem = self.stem(task)
            if stem is not None:
                x = stem(x)
        return self.trunk(x)

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Output of ``task``'s head for ``x: [batch, *input]`` → ``[batch, outputs]``."""
        feats = self.features(x, task)  # checks the task name first (a bare KeyError otherwise)
        return self.heads[task](feats)

    def trunk_plan(self, inputs: Mapping[str, Tensor]) -> list[list[tuple[Tensor, list[str]]]]:
        """The trunk calls :meth:`forward_many` makes for ``inputs``: each call concatenates its blocks' rows,
        and each block is one distinct input tensor with the tasks that read it.

        Tasks with a stem get a call per stem and input tensor (one block: the raw input, and the tasks that
        share the stem and the tensor). Stem-less tasks go through one call per input shape; a tensor given to
        several tasks is one block (its rows run once, every such task's head reads the same features). In a
        call, blocks read by one task come first, then shared blocks.
        """
        calls: list[list[tuple[Tensor, list[str]]]] = []
        by_stem: dict[tuple[str, int], tuple[Tensor, list[str]]] = {}
        by_shape: dict[tuple[int, ...], dict[int, tuple[Tensor, list[str]]]] = {}
        for task, x in inputs.items():
            key = self.stem_of.get(task)
            if key is not None:
                by_stem.setdefault((key, id(x)), (x, []))[1].append(task)
            else:
                by_shape.setdefault(tuple(x.shape[1:]), {}).setdefault(id(x), (x, []))[1].append(task)
        calls.extend([block] for block in by_stem.values())
        for blocks in by_shape.values():
            calls.append([b for b in blocks.values() if len(b[1]) == 1] + [b for b in blocks.values() if len(b[1]) > 1])
        return calls

    def stem_call(self, call: list[tuple[Tensor, list[str]]]) -> nn.Module | None:
        """The stem a call of :meth:`trunk_plan` runs its rows through first (None: straight into the trunk)."""
        return self.stem(call[0][1][0]) if len(call) == 1 else None

    def forward_many(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Outputs for several tasks at once: ``{task: x}`` → ``{task: output}``.

        The trunk runs once per call of :meth:`trunk_plan`: tasks given the *same tensor* share one pass, and
        stem-less tasks whose inputs share a shape go through the trunk in one concatenated call, so a step over
        many tasks costs one trunk pass rather than one per task. Concatenating rows of different tasks needs a
        trunk that treats rows independently (no batch statistics), which holds for every trunk mtml builds.
        """
        for task, x in inputs.items():
            self._check(x, task)
        outputs: dict[str, Tensor] = {}
        for call in self.trunk_plan(inputs):
            stem = self.stem_call(call)
            if stem is not None:
                x, names = call[0]
                outputs.update(self._heads_on(names, self.trunk(stem(x))))
                continue
            sizes = [x.shape[0] for x, _ in call]
            out = self.trunk(call[0][0] if len(call) == 1 else torch.cat([x for x, _ in call]))
            parts = torch.split(out, sizes) if len(call) > 1 else (out,)  # (a 1-piece split costs a copy backward)
            own = [names[0] for _, names in call if len(names) == 1]
            k = len(own)
            lin = _linear(self.heads[own[0]]) if own else None
            if own and lin is not None and self._stackable(own) and sum(sizes[:k]) * out.shape[1] * lin.out_features \
                    <= 1 << 22:
                feats = out[: sum(sizes[:k])] if k < len(call) else out
                outputs.update(zip(own, torch.split(self._stacked_linear(own, feats, sizes[:k]), sizes[:k]),
                                   strict=True))
            else:
                outputs.update({n: self.heads[n](part) for n, part in zip(own, parts[:k], strict=True)})
            for (_, names), part in zip(call[k:], parts[k:], strict=True):
                outputs.update(self._heads_on(names, part))
        return {task: outputs[task] for task in inputs}

    def forward_rows(self, names: Sequence[str], x: Tensor, sizes: Sequence[int],
                     owner: Tensor | None = None) -> Tensor:
        """Outputs ``[rows, outputs]`` for rows of several stem-less tasks concatenated task after task:
        ``sizes[i]`` rows of ``names[i]`` (``owner [rows]``: each row's position in ``names``, when at hand).

        One trunk pass; linear heads of one shape as one stacked product, other heads one call each. What
        :func:`mtml.engine` uses for own-row tasks drawn as one pack; equal to :meth:`forward_many` on the pieces.
        """
        missing = [n for n in names if n not in self.heads]
        if missing:
            raise UnknownNameError(f"unknown tasks {missing}; the model has heads for: {', '.join(self.task_names)}.")
        for want in {self.input_shapes.get(n) for n in names}:
            if want is not None and tuple(x.shape[1:]) != want:
                raise ShapeError(f"rows have per-example shape {tuple(x.shape[1:])}, but tasks {list(names)[:3]}... "
                                 f"were built for {want}; give x as [rows, {', '.join(map(str, want))}].")
        bad = [n for n in names if n in self.stem_of]
        if bad:
            raise ShapeError(f"forward_rows runs no stems, and tasks {bad[:3]} have one; use forward_many.")
        feats = self.trunk(x)
        names = list(names)
        lin = _linear(self.heads[names[0]])
        if lin is not None and self._stackable(names) and feats.shape[0] * feats.shape[1] * lin.out_features <= 1 << 22:
            return self._stacked_linear(names, feats, list(sizes), owner)
        return torch.cat([self.heads[n](p) for n, p in zip(names, torch.split(feats, list(sizes)), strict=True)])

    def _heads_on(self, names: list[str], feats: Tensor) -> dict[str, Tensor]:
        """Every head of ``names`` on the same features ``[rows, d]``; plain linear heads as one matmul."""
        linears = [_linear(self.heads[n]) for n in names]
        heads = [h for h in linears if h is not None and h.bias is not None]
        if len(heads) < 2 or len(heads) < len(names):
            return {n: self.heads[n](feats) for n in names}
        weight = torch.cat([h.weight for h in heads])  # [Σ out, d]
        bias = torch.cat([h.bias for h in heads if h.bias is not None])
        out = torch.addmm(bias, feats, weight.T)
        widths = [h.out_features for h in heads]
        if len(set(widths)) == 1:  # task-major views: their backward stacks contiguous pieces (a split's is slow)
            parts = out.reshape(out.shape[0], len(heads), widths[0]).transpose(0, 1).unbind(0)
            return dict(zip(names, parts, strict=True))
        return dict(zip(names, torch.split(out, widths, dim=1), strict=True))

    def _stackable(self, names: list[str]) -> bool:
        return self._stacked_heads(names) is not None

    def _stacked_heads(self, names: list[str]) -> list[nn.Linear] | None:
        """The linear maps of ``names``' heads when there are at least 4, all with a bias and of one shape.

        The answer is remembered for the last few name lists and checked against the head modules by identity
        (thousands of heads: their parameter shapes are read once, not on every step)."""
        modules = self.heads._modules
        heads = [modules[n] for n in names]
        cache: dict[tuple[str, ...], tuple[list[nn.Module], list[nn.Linear] | None]] = self.__dict__.setdefault(
            "_stack_cache", {})
        hit = cache.get(key := tuple(names))
        if hit is not None and len(hit[0]) == len(heads) and all(a is b for a, b in zip(hit[0], heads, strict=True)):
            return hit[1]
        linears = [_linear(h) for h in heads]
        first = linears[0]
        answer: list[nn.Linear] | None = None
        if len(linears) >= 4 and first is not None:
            shape = first.weight.shape
            if all(h is not None and h.bias is not None and h.weight.shape == shape for h in linears):
                answer = linears  # type: ignore[assignment]
        if len(cache) >= 8:
            cache.clear()
        cache[key] = (heads, answer)
        return answer

    def _stacked_linear(self, names: list[str], feats: Tensor, sizes: list[int], owner: Tensor | None = None
                        ) -> Tensor:
        """All linear heads of a group in one batched op: row r uses the weights of its own task.

        Gradients flow through ``torch.stack`` back to each head's own parameters, so the result equals
        calling each head on its slice (an oracle test checks this).
        """
        heads = self._stacked_heads(names)
        assert heads is not None
        weight = torch.stack([h._parameters["weight"] for h in heads])  # type: ignore[misc]  # [m, out, d]
        bias = torch.stack([h._parameters["bias"] for h in heads])  # type: ignore[misc]  # [m, out]
        if len(set(sizes)) == 1:
            x = feats.reshape(len(names), sizes[0], -1)
            return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)).reshape(feats.shape[0], -1)
        if owner is None:
            owner = torch.repeat_interleave(torch.arange(len(names), device=feats.device),
                                            torch.tensor(sizes, device=feats.device))
        return torch.einsum("nd,nod->no", feats, weight[owner]) + bias[owner]

    # -- parameter groups --------------------------------------------------------------------------------
    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.trunk.named_parameters():
            yield f"trunk.{name}", p

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the meta-learner (trunk), shared by every task."""
        for _, p in self.named_shared_parameters():
            yield p

    def named_task_parameters(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        if task not in self.heads:
            raise UnknownNameError(f"unknown task '{task}'; the model has heads for: {', '.join(self.task_names)}.")
        key = self.stem_of.get(task)
        if key is not None:
            for name, p in self.stems[key].named_parameters():
                yield f"stems.{key}.{name}", p
        for name, p in self.heads[task].named_parameters():
            yield f"heads.{task}.{name}", p

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters of ``task``'s task learner (its head, and its stem if any)."""
        for _, p in self.named_task_parameters(task):
            yield p
