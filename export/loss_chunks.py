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

Order (`run_each_node_late`). Lowering sorts the graph breadth-first (torch.fx's
`legalize_graph`), which lines up all the chunks' heads, then all their log-softmaxes, then
all their gathers: every chunk's logits alive at once again. Placing each node just before its
first reader gives back one chunk after another, and elsewhere only shortens lifetimes.
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


def run_each_node_late(graph_module: torch.fx.GraphModule) -> PassResult:
    """Move every computing node to just before its first reader (an edge-program pass)."""
    graph = graph_module.graph
    for node in reversed(list(graph.nodes)):
        # Readers are visited first and only ever move later, so the node stays after its inputs.
        if node.op != "call_function" or not node.users:
            continue
        position = {n: i for i, n in enumerate(graph.nodes)}
        first_reader = min(node.users, key=position.__getitem__)
        if position[first_reader] != position[node] + 1:
            first_reader.prepend(node)
    graph.lint()
    graph_module.recompile()
    return PassResult(graph_module, True)
