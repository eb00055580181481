"""Find a model's repeated trunk(s) and label everything else embedding / head / other.

Why from structure and not from names: a block is called ``h``, ``layers``,
``layer``, ``block`` or ``blocks`` depending on who wrote the model, but every
transformer stacks structurally identical blocks in a ``ModuleList`` or
``Sequential``. That run of children is the trunk; what the model registers
before it is the embedding, what it registers after it is the head. An
encoder-decoder has two trunks, and each part is judged against the trunk(s)
in its own scope (an encoder's final norm is after the encoder's trunk).

A model without a trunk but with a recurrent core (an LSTM, a GRU) has that
core as its block bucket, placed the same way; an ``nn.Embedding`` is the
embedding bucket wherever it is registered (outside a trunk block). Once a
forward has run, the order in which the modules ran replaces the order in
which they were registered: a Transformer whose input embedding is registered
after its encoder still has it run first.

Every unique parameter lands in exactly one bucket, so buckets always sum to
the unique total. A tied tensor is charged to the first bucket (in the order
embedding, block, head, other) that reaches it, and its other aliases are
reported where they live.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.nn.parameter import is_lazy

from .inventory import Inventory, owner_path

__all__ = [
    "BUCKETS",
    "BlockParam",
    "Buckets",
    "Structure",
    "Trunk",
    "bucket_resolver",
    "find_buckets",
    "find_structure",
]

BUCKETS: tuple[str, ...] = ("embedding", "block", "head", "other")

# A run of identical children smaller than this share of the largest run is a
# detail inside the model (a few stacked heads, a pair of convs), not a trunk.
_MIN_TRUNK_SHARE = 0.10


@dataclass(frozen=True)
class BlockParam:
    """One parameter of a representative block, as a hand count would list it."""

    module: str  # path relative to the block ("attn.c_attn")
    type: str
    name: str  # "weight", "bias", ...
    shape: tuple[int, ...]
    numel: int


@dataclass
class Trunk:
    """A run of structurally alike blocks in one container."""

    path: str  # the container ("transformer.h")
    block_paths: list[str]
    params: int  # unique parameters of all its blocks
    params_per_block: int  # of the representative block
    representative: str  # path of the block whose breakdown is shown
    breakdown: list[BlockParam] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return len(self.block_paths)


@dataclass
class Buckets:
    trunks: list[Trunk]
    module_bucket: dict[str, str]  # module path -> bucket, or "mixed" for containers of a trunk
    param_bucket: dict[str, str]  # canonical parameter name -> charged bucket
    alias_bucket: dict[str, str]  # every alias -> the bucket of the module that registers it
    totals: dict[str, int]
    bytes: dict[str, int]
    cores: list[str] = field(default_factory=list)  # recurrent modules that are the block bucket (no trunk)
    run_order: bool = False  # placed by the order the modules ran in (a forward was seen), not registered in


def _signature(module: nn.Module) -> tuple:
    """What two blocks must share to be "the same block": types and parameter shapes."""
    return (
        type(module).__name__,
        tuple(
            (n, None if is_lazy(p) else tuple(p.shape), str(p.dtype))
            for n, p in module.named_parameters(remove_duplicate=False)
        ),
        tuple(type(m).__name__ for m in module.modules()),
    )


def _runs(container: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Maximal runs of consecutive, structurally alike children, at least two long.

    A ``ModuleList`` of composite layers is one run whatever their classes.

    Composite children (blocks with submodules) are alike when they share a
    class: a stack may mix dense and mixture-of-experts layers of one class
    (DeepSeek's first dense layers, Switch Transformer's alternation), or give
    block 0 an extra table (T5's relative attention bias). Leaf children (a
    stack of Linears) must also have the same parameter shapes, so an MLP whose
    layers merely share the Linear class is not a trunk.
    """
    children = list(container.named_children())
    if (
        isinstance(container, nn.ModuleList)
        and len(children) >= 2
        and all(any(True for _ in c.children()) and any(True for _ in c.parameters()) for _, c in children)
    ):
        # A list holding only composite layers is a stack even when its layer
        # classes alternate (dense and MoE layers, attention and Mamba layers).
        return [children]
    runs, i = [], 0
    while i < len(children):
        j = i + 1
        while j < len(children) and type(children[j][1]) is type(children[i][1]):
            j += 1
        same_class = children[i:j]
        i = j
        if len(same_class) < 2 or not any(True for _ in same_class[0][1].parameters()):
            continue
        if any(True for _ in same_class[0][1].children()):
            runs.append(same_class)
            continue
        run: list[tuple[str, nn.Module]] = []
        for child in same_class:
            if run and _signature(child[1]) != _signature(run[-1][1]):
                if len(run) >= 2:
                    runs.append(run)
                run = []
            run.append(child)
        if len(run) >= 2:
            runs.append(run)
    return runs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _find_trunks(model: nn.Module, inventory: Inventory) -> list[Trunk]:
    params_of = {m.path: m.params for m in inventory.modules}
    candidates: list[Trunk] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        for run in _runs(mod):
            sigs = [_signature(m) for _, m in run]
            common = Counter(sigs).most_common(1)[0][0]
            rep_name = next(n for (n, _), s in zip(run, sigs) if s == common)
            block_paths = [_join(path, n) for n, _ in run]
            rep = _join(path, rep_name)
            candidates.append(
                Trunk(
                    path=path,
                    block_paths=block_paths,
                    params=0,
                    params_per_block=params_of[rep],
                    representative=rep,
                    breakdown=_breakdown(dict(run)[rep_name]),
                )
            )
    # Keep the outermost runs: the experts inside an MoE block are not a trunk.
    outer = [
        t
        for t in candidates
        if not any(o is not t and any(_inside(t.path, b) for b in o.block_paths) for o in candidates)
    ]
    unique_per_block = _unique_params_under(inventory, [b for t in outer for b in t.block_paths])
    for t in outer:
        t.params = sum(unique_per_block[b] for b in t.block_paths)
    if not outer:
        return []
    largest = max(t.params for t in outer)
    return [t for t in outer if t.params >= _MIN_TRUNK_SHARE * largest and t.params > 0]


def _unique_params_under(inventory: Inventory, block_paths: list[str]) -> dict[str, int]:
    """Parameters per block with a tensor shared by two blocks charged to the first."""
    counts = {b: 0 for b in block_paths}
    for p in inventory.parameters:
        for alias in p.aliases:
            owner = owner_path(alias)
            hit = next((b for b in block_paths if _inside(owner, b)), None)
            if hit is not None:
                counts[hit] += p.numel
                break
    return counts


def _breakdown(block: nn.Module) -> list[BlockParam]:
    out = []
    for mpath, mod in block.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if is_lazy(p):
                continue
            out.append(BlockParam(mpath, type(mod).__name__, pname, tuple(p.shape), p.numel()))
    return out


def _recurrent_cores(model: nn.Module) -> list[str]:
    """The outermost recurrent modules (``nn.RNNBase``: LSTM, GRU, RNN), the body of a model without a trunk."""
    found = [path for path, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    return [p for p in found if not any(o != p and _inside(p, o) for o in found)]


def _anchors(trunks: list[Trunk], cores: list[str]) -> list[tuple[str, list[str]]]:
    """(scope, block paths) of what the other buckets are placed around: each trunk, or each recurrent core."""
    return [(t.path, t.block_paths) for t in trunks] + [(c, [c]) for c in cores]


def _trunk_spans(
    inventory: Inventory, anchors: list[tuple[str, list[str]]], run_order: dict[str, int] | None = None
) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """An index of every module, and the index range each anchor's blocks cover.

    The order the modules ran in when it is known and covers every anchor
    (modules that did not run keep no index); else their registration order.
    """
    order = {m.path: i for i, m in enumerate(inventory.modules)}
    if run_order and all(any(_inside(p, b) for p in run_order for b in blocks) for _, blocks in anchors):
        order = dict(run_order)
    spans = []
    for scope, blocks in anchors:
        inside = [i for path, i in order.items() if any(_inside(path, b) for b in blocks)]
        spans.append((scope, min(inside), max(inside)))
    return order, spans


def _bucket_of_modules(
    inventory: Inventory,
    anchors: list[tuple[str, list[str]]],
    embeddings: set[str],
    registered: tuple[dict[str, int], list[tuple[str, int, int]]],
    ran: tuple[dict[str, int], list[tuple[str, int, int]]],
) -> dict[str, str]:
    """Each module's bucket; ``registered`` and ``ran``: ``_trunk_spans`` in registration and in run order."""
    (order, spans), (registered_order, registered_spans) = ran, registered
    blocks = [b for _, paths in anchors for b in paths]
    result: dict[str, str] = {}
    for m in inventory.modules:
        path = m.path
        if any(_inside(path, b) for b in blocks):
            result[path] = "block"
            continue
        if any(_inside(path, e) for e in embeddings):
            result[path] = "embedding"  # a lookup table of the input, wherever it is registered
            continue
        if any(_inside(s[0], path) for s in spans):
            result[path] = "mixed"  # holds a trunk: its own parameters are judged below
            continue
        if path in order:
            result[path] = _position_bucket(path, order[path], spans)
        else:  # (did not run in the forward seen)
            result[path] = _position_bucket(path, registered_order[path], registered_spans)
    # A container of a trunk whose subtree holds one bucket only (the ModuleList
    # of blocks itself) is that bucket, not "mixed".
    for m in inventory.modules:
        if result[m.path] == "mixed":
            inner = {result[o.path] for o in inventory.modules if o.own_params and _inside(o.path, m.path)}
            if m.own_params:  # parameters of a container: where they are registered
                inner.add(_position_bucket(m.path, registered_order[m.path], registered_spans))
            inner.discard("mixed")
            if len(inner) == 1:
                result[m.path] = inner.pop()
    return result


def _position_bucket(path: str, index: int, spans: list[tuple[str, int, int]]) -> str:
    """Before / after the trunks of the innermost scope that contains any."""
    if not spans:
        return "other"
    scope_parts = path.split(".") if path else []
    for depth in range(len(scope_parts), -1, -1):
        scope = ".".join(scope_parts[:depth])
        local = [s for s in spans if _inside(s[0], scope)]
        if local:
            if index < min(s[1] for s in local):
                return "embedding"
            if index > max(s[2] for s in local):
                return "head"
            return "other"
    return "other"


@dataclass(frozen=True)
class Structure:
    """What of the buckets the order the modules run in does not change: read once, before any forward."""

    trunks: list[Trunk]
    cores: list[str]
    anchors: list[tuple[str, list[str]]]
    embeddings: set[str]
    registered: tuple[dict[str, int], list[tuple[str, int, int]]]  # ``_trunk_spans`` in registration order


def find_structure(model: nn.Module, inventory: Inventory) -> Structure:
    """The trunks, recurrent cores, embeddings and registration-order spans ``find_buckets`` places modules by.

    Taken apart so that placing the buckets by run order, once the first
    forward ran (inside the training step), does not walk the model again.
    """
    trunks = _find_trunks(model, inventory)
    cores = [] if trunks else _recurrent_cores(model)
    anchors = _anchors(trunks, cores)
    embeddings = {p for p, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    return Structure(trunks, cores, anchors, embeddings, _trunk_spans(inventory, anchors))


def find_buckets(
    model: nn.Module,
    inventory: Inventory,
    run_order: dict[str, int] | None = None,
    structure: Structure | None = None,
) -> Buckets:
    """Label every parameter embedding / block / head / other from the structure.

    ``run_order``: module path -> the order of its first call in a forward that
    was seen; modules are then placed by when they ran. ``structure``:
    ``find_structure(model, inventory)`` when it was read before.
    """
    s = structure if structure is not None else find_structure(model, inventory)
    trunks, cores, anchors, embeddings, registered = s.trunks, s.cores, s.anchors, s.embeddings, s.registered
    ran = _trunk_spans(inventory, anchors, run_order) if run_order else registered
    module_bucket = _bucket_of_modules(inventory, anchors, embeddings, registered, ran)
    order, spans = registered

    alias_bucket: dict[str, str] = {}
    param_bucket: dict[str, str] = {}
    totals = {b: 0 for b in BUCKETS}
    nbytes = {b: 0 for b in BUCKETS}
    for p in inventory.parameters:
        seen = []
        for alias in p.aliases:
            owner = owner_path(alias)
            bucket = module_bucket[owner]
            if bucket == "mixed":
                # A parameter registered directly on a module that holds a trunk
                # (a root-level position table, a CLS token) sits before its
                # children in registration order.
                bucket = _position_bucket(owner, order[owner], spans)
            alias_bucket[alias] = bucket
            seen.append(bucket)
        charged = min(seen, key=BUCKETS.index)
        param_bucket[p.name] = charged
        totals[charged] += p.numel
        nbytes[charged] += p.nbytes
    return Buckets(trunks, module_bucket, param_bucket, alias_bucket, totals, nbytes, cores, bool(run_order))


_STATE_BUCKET = {"before": "embedding", "in": "block", "after": "head"}


def bucket_resolver(buckets: Buckets) -> Callable[[str, str], str]:
    """Map (module path, where execution is relative to the trunk) to a bucket.

    A module inside one bucket is that bucket. Work done by a container of the
    trunk itself, or outside the model (a loss computed in the script), is
    placed by when it ran: before the first block, among the blocks, or after.
    Needed before any measurement: the tracker charges each saved tensor with it.
    """
    module_bucket = buckets.module_bucket
    has_trunk = bool(buckets.trunks or buckets.cores)

    def resolve(path: str, state: str) -> str:
        bucket = module_bucket.get(path)
        if bucket is not None and bucket != "mixed":
            return bucket
        if not has_trunk:
            return "other"
        return _STATE_BUCKET.get(state, "other")

    return resolve
