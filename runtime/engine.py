"""Forward engines: run the exported program's methods on a batch and P adapter vectors.

`ProgramEngine` runs the `.pte` through the ExecuTorch runtime, as a phone does. The eager
reference lives with the exporter (`fwdfed.model.program`); the two are compared at export time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle, Manifest
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.errors import first_line
from runtime.executorch import EngineError, runtime
from runtime.stream import StreamedEngine

# ExecuTorch's ScalarType codes of the inputs the engine passes: token ids and labels, adapters.
INT64, FLOAT32 = 4, 6
DTYPE_NAMES = {INT64: "int64", FLOAT32: "float32"}


class ProgramEngine:
    def __init__(self, program: bytes | Path | str, max_perturbations: int):
        # The runtime wraps `bytes` without copying and loads methods lazily: keep the bytes
        # and the Program referenced for as long as the methods are used.
        self._source = program if isinstance(program, bytes) else str(program)
        try:
            self._program = runtime().load_program(self._source)
            names = self._program.method_names
            # An inference-only program (a fedkd teacher) has predict alone.
            self._forward = self._program.load_method("forward") if "forward" in names else None
            self._predict = self._program.load_method("predict")
            # Exported for classifiers since the features method was added; older bundles lack it.
            self._features = self._program.load_method("features") if "features" in names else None
            # `python -m export --distillation`: the P adapter vectors' logits of a classifier.
            self._logits = self._program.load_method("logits") if "logits" in names else None
            # `python -m export --adapter-blocks top:K`: the frozen prefix once per example, the adapted top per pass.
            self._prefix = self._program.load_method("prefix") if "prefix" in names else None
            self._top = self._program.load_method("top") if "top" in names else None
            self._top_features = self._program.load_method("top_features") if "top_features" in names else None
        except Exception as e:
            raise EngineError(f"cannot load the ExecuTorch program: {first_line(e)}") from None
        self.max_perturbations = max_perturbations

    @property
    def has_forward(self) -> bool:
        return self._forward is not None

    @property
    def has_features(self) -> bool:
        return self._features is not None

    @property
    def has_batched_logits(self) -> bool:
        return self._logits is not None

    @property
    def has_split(self) -> bool:
        return self._prefix is not None and self._top is not None

    def release(self) -> None:
        """Drop the program and its methods (their planned buffers and the backend's state go with them)."""
        self._forward = self._predict = self._features = self._logits = self._program = None
        self._prefix = self._top = self._top_features = None
        self._source = None

    @classmethod
    def for_bundle(cls, bundle: Bundle):
        """The bundle's program, refused at load when it does not take the inputs its manifest describes;
        for a streamed bundle, the engine that runs its stages one at a time (`runtime.stream`)."""
        if bundle.manifest.streamed:
            return StreamedEngine.for_bundle(bundle)
        engine = cls(bundle.program_path, bundle.manifest.inputs.max_perturbations)
        engine.check_signature(bundle.manifest)
        return engine

    def check_signature(self, manifest: Manifest) -> None:
        """Compare the methods' inputs with the manifest's shapes: a program from another export, or a
        manifest edited since, would otherwise fail (or run on misread inputs) at the first task."""
        b, l, p = manifest.inputs.batch_size, manifest.inputs.seq_len, manifest.inputs.max_perturbations
        d = manifest.adapter_dim
        tokens = ((b, l), INT64, "batch_size x seq_len")
        labels = ((b,), INT64, "batch_size") if manifest.task == SEQ_CLS else tokens
        adapters = ((p, d), FLOAT32, "max_perturbations x adapter_dim")
        expected = {
            "forward": {"input_ids": tokens, "attention_mask": tokens, "labels": labels, "adapters": adapters},
            "predict": {"input_ids": tokens, "attention_mask": tokens, "adapter": ((1, d), FLOAT32, "1 x adapter_dim")},
            "logits": {"input_ids": tokens, "attention_mask": tokens, "adapters": adapters},
            "prefix": {"input_ids": tokens, "attention_mask": tokens},
        }
        if self._top is not None:
            hidden = manifest.program.split.hidden_size if manifest.program.split else 0
            expected["top"] = {"hidden": ((b, l, hidden), FLOAT32, "batch_size x seq_len x split.hidden_size"),
                               "attention_mask": tokens, "labels": labels, "adapters": adapters}
            expected["top_features"] = {"hidden": expected["top"]["hidden"], "attention_mask": tokens,
                                        "adapter": ((1, d), FLOAT32, "1 x adapter_dim")}
        if self._forward is None and "forward" in manifest.program.methods:
            raise EngineError("the program does not match its manifest: it has no forward method")
        for name, method in (("forward", self._forward), ("predict", self._predict), ("logits", self._logits),
                             ("prefix", self._prefix), ("top", self._top), ("top_features", self._top_features)):
            if method is None:
                continue
            meta, inputs = method.metadata, expected[name]
            if meta.num_inputs() != len(inputs):
                raise EngineError(f"the program does not match its manifest: its {name} takes {meta.num_inputs()} "
                                  f"inputs, the manifest describes {len(inputs)}")
            for i, (input_name, (shape, dtype, what)) in enumerate(inputs.items()):
                try:
                    info = meta.input_tensor_meta(i)
                except (IndexError, RuntimeError):
                    raise EngineError(f"the program does not match its manifest: its {name} input {i} "
                                      "is not a tensor") from None
                if (tuple(info.sizes()), info.dtype()) != (shape, dtype):
                    raise EngineError(
                        f"the program does not match its manifest: its {name} input {input_name} is "
                        f"{DTYPE_NAMES.get(info.dtype(), f'dtype {info.dtype()}')} {list(info.sizes())}, "
                        f"the manifest's {what} is {DTYPE_NAMES[dtype]} {list(shape)}")

    def losses(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        """Per-example loss [P, B] of `batch` under each of the P adapter vectors: through the top alone when
        the batch carries its prefix states (`prefix_states`) and the program is split."""
        if batch.prefix_states is not None and self._top is not None:
            hidden = torch.from_numpy(np.ascontiguousarray(batch.prefix_states, dtype=np.float32))
            return self._over_adapters(self._top, "top", [hidden, batch.attention_mask, batch.labels], adapters)
        if self._forward is None:
            raise EngineError("this program is inference-only (a teacher's): it has no forward method to train with")
        return self._over_adapters(self._forward, "forward", [batch.input_ids, batch.attention_mask, batch.labels],
                                   adapters)

    def batched_logits(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        """A classifier's logits [P, B, C] of `batch` under each of the P adapter vectors."""
        if self._logits is None:
            raise EngineError("this program has no logits method, which distillation (fedkd) trains with: export "
                              "the student with `python -m export ... --distillation`")
        return self._over_adapters(self._logits, "logits", [batch.input_ids, batch.attention_mask], adapters)

    def _over_adapters(self, method, name: str, inputs: list, adapters: np.ndarray) -> np.ndarray:
        """`method` on `inputs` and the adapter vectors, at most the program's P of them per call."""
        adapters = np.ascontiguousarray(np.atleast_2d(adapters), dtype=np.float32)
        out = []
        for start in range(0, adapters.shape[0], self.max_perturbations):
            chunk = torch.from_numpy(adapters[start : start + self.max_perturbations])
            (result,) = self._execute(method, name, [*inputs, chunk])
            out.append(result.numpy())
        return np.concatenate(out, axis=0)

    def prefix_states(self, batch: Batch) -> np.ndarray:
        """The frozen prefix's output [B, L, H] for `batch`: what `top` reads instead of the tokens."""
        if self._prefix is None:
            raise EngineError("this program has no prefix method: export it with --adapter-blocks top:K")
        (hidden,) = self._execute(self._prefix, "prefix", [batch.input_ids, batch.attention_mask])
        return hidden.numpy()

    def features(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        """What the classification head reads, [B, H], under `adapter`."""
        vector = torch.from_numpy(np.ascontiguousarray(adapter, dtype=np.float32).reshape(1, -1))
        if batch.prefix_states is not None and self._top_features is not None:
            hidden = torch.from_numpy(np.ascontiguousarray(batch.prefix_states, dtype=np.float32))
            (features,) = self._execute(self._top_features, "top_features", [hidden, batch.attention_mask, vector])
            return features.numpy()
        if self._features is None:
            raise EngineError("this program has no features method (a classifier exported before it was added, "
                              "or not a classifier): export the bundle again")
        (features,) = self._execute(self._features, "features", [batch.input_ids, batch.attention_mask, vector])
        return features.numpy()

    def logits(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        vector = torch.from_numpy(np.ascontiguousarray(adapter, dtype=np.float32).reshape(1, -1))
        (logits,) = self._execute(self._predict, "predict", [batch.input_ids, batch.attention_mask, vector])
        return logits.numpy()

    @staticmethod
    def _execute(method, name: str, inputs: list):
        try:
            return method.execute(inputs)
        except (RuntimeError, ValueError) as e:
            raise EngineError(f"the ExecuTorch program's {name} failed: {first_line(e)}") from None
