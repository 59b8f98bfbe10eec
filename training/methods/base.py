"""The contract between a self-supervised method and the shared training engine.

A method owns only what its paper changes: the networks around the backbone (heads, key
encoder, predictor), its buffers (queue, memory bank) and its loss. The engine
(`training/engine.py`) owns data, augmentation, optimiser, schedules, AMP, checkpoints,
the kNN monitor, logging and distribution, identically for every method.

Buffers registered with `register_buffer` (queue, memory bank, queue pointer) travel in
`state_dict()`, so checkpoints and exact resume need nothing method-specific.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from training.config import PAPER, MethodParams
from training.errors import TrainingError
from training.models import network_spec


@dataclass
class StepOutput:
    """What `Method.forward` returns for one training step."""

    loss: torch.Tensor  # scalar, the quantity to minimise
    # Extra scalars for TensorBoard (floats or 0-d tensors, detached), e.g. {"acc/instance": ...}.
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set `name` and implement `forward` and `embedding_network`."""

    name: str = "method"
    # How many augmented views of each image a step needs (InstDisc 1, the others 2).
    num_views: int = 2

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        """One step's loss.

        views: `num_views` float tensors, each NxCxHxW, already augmented and normalised (then
            --local-crops smaller ones, for methods that accept them).
        indices: N int64 data-set indices of the images (InstDisc's memory bank uses them).
        """
        raise NotImplementedError

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """Called after each optimiser step; progress in [0, 1] over the whole run.

        MoCo: momentum update of the key encoder (v3: momentum on a cosine schedule to 1).
        """

    def embedding_network(self) -> nn.Module:
        """The network whose L2-normalised output is the retrieval embedding (BxD)."""
        raise NotImplementedError

    # Extensions, all backward compatible.
    # Whether DDP should broadcast buffers from rank 0 each forward (InstDisc's bank: no need).
    ddp_broadcast_buffers: bool = True
    # Whether the engine should convert BN to SyncBatchNorm under DDP (SimCLR's global BN, MoCo v3).
    sync_batch_norm: bool = False

    # The paper, as data (training/cli.py maps it to flags and layers it under what is given):
    # the method's own hyper-parameters, their defaults the paper's (constructor keyword names),
    Params: ClassVar[type[MethodParams]] = MethodParams
    # the engine settings the paper fixes, and Params values a variant changes (MoCo v1 vs v2),
    paper_defaults: ClassVar[dict[str, Any]] = {}
    # Where paper_defaults come from, as --help and the settings print name it: "paper", or
    # "recipe" for a method that is this project's measured recipe rather than a paper's.
    defaults_source: ClassVar[str] = PAPER
    # and the recipe for small images (native side <= 64 px: MNIST, CIFAR), over the paper's.
    small_image_defaults: ClassVar[dict[str, Any]] = {}
    notes: ClassVar[str | None] = None  # shown in --help above the method's flags
    # The retrieval embedding is a head's output (InstDisc's 128-d), not the pooled backbone: the
    # engine's --embedding-grid (a pooling of the backbone) does not apply.
    embedding_is_head: ClassVar[bool] = False
    # Whether `forward` takes multi-crop's local views (--local-crops): then `views` holds the
    # `num_views` full-size views followed by the local ones, which are smaller (--local-crop-size).
    accepts_local_crops: ClassVar[bool] = False
    # Whether the method is given, before training, the retrieval embeddings of the training images
    # by the finished encoder that --init starts from (`use_initial_embeddings`): then --init is required.
    needs_initial_embeddings: ClassVar[bool] = False

    def view_sources(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Per view, the N data-set indices of the images it is made from (`indices`: the batch's
        N). Every paper here makes each view from the image itself; a method whose positives are
        other images (mined neighbours) draws them here."""
        return [indices] * self.num_views

    @torch.no_grad()
    def use_initial_embeddings(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> str:
        """NxD unit rows: the --init encoder's retrieval embeddings of the N training images, given
        once before training when `needs_initial_embeddings`, with the images themselves (NxCxHxW
        uint8). `labels` (N class ids, -1 where none) may only be reported, as the kNN monitor
        does: never trained on. Returns a log line."""
        return ""

    def start_from_encoder(self, record: dict[str, Any]) -> None:
        """--init: a finished encoder's weights into `embedding_network()` (whose parameters are
        the method's own); its whitening is not taken (the engine fits a new one when it saves).
        TrainingError when the encoder's network is not the one this run builds."""
        ours = self.encoder_spec()
        theirs = {k: v for k, v in record["network"].items() if k not in ("grid", "scales", "whitening")}
        if theirs != ours:
            raise TrainingError(
                f"--init: the encoder's network ({theirs['arch']} {theirs.get('kwargs')}, head "
                f"{theirs.get('head')}) is not this run's ({ours['arch']} {ours.get('kwargs')}, head "
                f"{ours.get('head')}); leave --arch/--width/--small-stem to --init or match them"
            )
        state = {k: v for k, v in record["state_dict"].items() if not k.startswith("whitening.")}
        self.embedding_network().load_state_dict(state)
        self.on_weights_loaded()

    @torch.no_grad()
    def on_weights_loaded(self) -> None:
        """After `start_from_encoder`: re-derive what was copied from the online weights when the
        method was built (MoCo's key encoder starts equal to the query encoder)."""

    @classmethod
    def paper_values(cls) -> dict[str, Any]:
        """Every value the paper sets: Params defaults and paper_defaults."""
        params = {f.name: f.default for f in dataclasses.fields(cls.Params)}
        return params | dict(cls.paper_defaults)

    @classmethod
    def from_config(
        cls, params: MethodParams, arch: str, backbone_kwargs: dict[str, Any], num_samples: int
    ) -> Method:
        """The method with these hyper-parameters (Params fields are constructor keywords)."""
        return cls(arch, backbone_kwargs, **dataclasses.asdict(params))

    # Methods built on training.models.EmbeddingNetwork get these two for free.
    # The backbone they were built with, for `encoder_spec`; set by subclasses.
    arch: str = ""
    backbone_kwargs: dict = {}  # read-only default; subclasses assign their own in __init__

    def encoder_spec(self) -> dict:
        """The spec `training.models.build_embedding_network` rebuilds `embedding_network()` from.

        The engine writes the encoder file with
        `make_encoder_record(m.name, m.encoder_spec(), m.embedding_network(), m.embed_dim(), ...)`.
        """
        head = getattr(self.embedding_network(), "head", None)
        return network_spec(self.arch, self.backbone_kwargs, head.spec if head is not None else None)

    def embed_dim(self) -> int:
        """D, the size of the retrieval embedding."""
        network = self.embedding_network()
        head = getattr(network, "head", None)
        return int(head.out_dim if head is not None else network.backbone.feature_dim)
