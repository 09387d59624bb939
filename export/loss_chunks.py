"""Lowering the causal-LM loss's chunks so that they share memory: a delegate per chunk, run in turn.

ExecuTorch's memory planner reuses a buffer's memory once the buffer's last reader has run, in
the order of the graph's nodes. Two things stand between the chunks and that reuse.

Partitioning (`LossChunkPartitioner`). 
XNNPACK's partitioner puts every supported node it can into as few delegates as a cycle-free
graph allows. The chunks' LM heads (`fwdfed.model.loss.ChunkNll`) do not depend on one another
and all read the final hidden state, so it would lower them all, with the decoder's last ops,
as one delegate call whose outputs, the logits of every chunk, are alive together until each
chunk's log-softmax (a portable op) has run: the memory the chunking is there to save. This
partitioner runs first and gives each chunk's call its own partition; the ordinary partitioner
then lowers the rest, where the already lowered chunks are opaque calls it leaves alone.

Order (`order_depth_first`). Lowering sorts the graph breadth-first (torch.fx's
`legalize_graph`), which lines up all the chunks' heads, then all their log-softmaxes, then
all their gathers: every chunk's logits alive at once again. Ordering it depth-first from the
output, which reads the chunks' results in turn, gives back one chunk after another; elsewhere
it computes each value just before it is needed, which only shortens lifetimes.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir.backend.canonical_partitioners.pattern_op_partitioner import (
    generate_grouped_partitions_from_list_of_nodes)
from torch.export import ExportedProgram
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.partitioner import Partition

from fwdfed.model.loss import CHUNK_MODULE_PATH


def chunk_call(node: torch.fx.Node) -> str | None:
    """Which chunk's call `node` was traced in (torch.export keys a module's repeated calls
    apart: `...chunk_nll`, `...chunk_nll@1`, ...), or None outside the chunks."""
    for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
        if path == CHUNK_MODULE_PATH:
            return key
    return None


class LossChunkPartitioner(XnnpackPartitioner):
    """XNNPACK's partitioner restricted to the loss's chunks, one or more partitions per chunk and
    none shared between chunks; it takes XnnpackPartitioner's options."""

    def generate_partitions(self, ep: ExportedProgram) -> list[Partition]:
        by_chunk: dict[str, list[list[torch.fx.Node]]] = defaultdict(list)
        for group in self.get_matched_nodes_from_configs(ep):
            calls = {chunk_call(n) for n in group if n.op == "call_function"}
            if len(calls) == 1 and None not in calls:  # wholly inside one chunk
                by_chunk[calls.pop()].append(group)
        partitions: list[Partition] = []
        for groups in by_chunk.values():
            for partition in generate_grouped_partitions_from_list_of_nodes(ep.graph_module, groups):
                partitions.append(Partition(id=len(partitions), nodes=partition.nodes))
        return partitions


def order_depth_first(graph_module: torch.fx.GraphModule) -> PassResult:
    """Order the graph's nodes depth-first from its outputs (an edge-program pass): each node comes
    right after the last of what it reads, and the readers of a node, in the order of their
    arguments, each with all of its own inputs before the next one starts."""
    graph = graph_module.graph
    nodes = list(graph.nodes)
    # Placeholders first, as they were; then everything each root (a node nothing reads: the
    # output, checks on sizes) reads, depth-first.
    roots = [n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op != "placeholder" and not n.users]
    order: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(root.all_input_nodes))]
        while stack:  # a loop, not recursion: a decoder's graph is thousands of nodes deep
            node, inputs = stack[-1]
            for i in inputs:
                if i not in seen:
                    seen.add(i)
                    stack.append((i, iter(i.all_input_nodes)))
                    break
            else:
                stack.pop()
                order.append(node)
    for before, node in zip(order, order[1:]):
        before.append(node)
    graph.lint()
    graph_module.recompile()
    return PassResult(graph_module, True)
